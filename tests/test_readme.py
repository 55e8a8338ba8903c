"""The README's Python example runs as written."""
import pathlib
import re

import torch


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert scope["tokens"].shape == (4,) and scope["tokens"].dtype == torch.int64
    assert out.tokens.shape == (4,) and (out.status == 0).all()
