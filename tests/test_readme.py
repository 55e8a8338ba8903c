"""The README's Python examples run as written, and its commands are the ones CI runs."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).parents[1]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _example(marker):
    (code,) = [c for c in _blocks("python") if marker in c]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_step_example_runs():
    scope = _example("linalign.sample(")
    out = scope["out"]
    assert scope["tokens"].shape == (4,) and scope["tokens"].dtype == torch.int64
    assert out.tokens.shape == (4,) and (out.status == 0).all()


def test_kl_and_principles_example_runs():
    scope = _example("linalign.sample(")  # it continues the step example
    (code,) = [c for c in _blocks("python") if "kl_budget=0.5" in c]
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.tokens.shape == (4,) and out.ratio.shape == (2, 4)
    assert (out.ratio == torch.tensor([[3.0], [1.0]])).all()


def test_decoder_example_runs(capsys):
    scope = _example("LinearAligner(")
    result = scope["result"]
    assert len(result.texts) == 2 and all(result.texts)
    streamed = capsys.readouterr().out
    assert streamed.endswith(scope["aligner"].generate(
        "How do I cook rice?", "Answer like a pirate.", max_new_tokens=48).text)


def test_ci_runs_the_readme_commands():
    quick = _blocks("bash")[0]
    commands = [line for line in quick.splitlines() if line and not line.startswith("#")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 3
    for command in commands:
        assert command in ci.splitlines(), f"README command not run by .ci/run: {command}"
