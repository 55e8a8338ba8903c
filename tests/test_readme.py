"""The README's Python examples run as written, its commands are the ones CI runs, and its
benchmark and evaluation tables are what --report prints from their results files."""
import contextlib
import io
import pathlib
import re
import sys

import pytest
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


@pytest.mark.embedded_model
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


def _section(title):
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _report_blocks():
    """Every table the benchmarks' --report prints from benchmarks/results/, with its
    caption (the line naming the results file, the date and the commit)."""
    bench = ROOT / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import bench_decode
        import bench_step
    finally:
        sys.path.remove(str(bench))
    blocks = []
    for path in sorted((bench / "results").glob("step_*.csv")):
        blocks += bench_step.report_blocks(path)
    for path in sorted((bench / "results").glob("decode_*.csv")):
        blocks += bench_decode.report_blocks(path)
    return blocks


def test_benchmark_tables_are_what_report_prints():
    """Each table of the README's benchmark sections, with the caption above it, is exactly
    a table that `bench_step.py --report FILE` or `bench_decode.py --report FILE` prints
    from the results file the caption names: a figure cannot drift from its file."""
    blocks = _report_blocks()
    shown = 0
    for title in ("Step benchmark", "Decoding benchmark"):
        paragraphs = _section(title).split("\n\n")
        for i, par in enumerate(paragraphs):
            if par.startswith("|"):
                block = paragraphs[i - 1] + "\n\n" + par
                assert block in blocks, f"README, {title}: this table is not what --report " \
                    f"prints:\n{block}"
                shown += 1
    assert shown == 11


def test_evaluation_tables_are_what_report_prints():
    """Each table of the README's evaluation section, with the caption above it, is what
    `linalign eval --report FILE` prints first from the results file the caption names."""
    from linalign import cli

    paragraphs = _section("Does it follow the principle? `linalign eval`").split("\n\n")
    shown = 0
    for i, par in enumerate(paragraphs):
        if par.startswith("|"):
            caption = paragraphs[i - 1]
            path = caption.split("`")[1]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["eval", "--report", str(ROOT / path)]) == 0
            printed = out.getvalue().replace(str(ROOT / path), path)
            assert printed.startswith(caption + "\n\n" + par + "\n"), \
                f"README, evaluation: this table is not what --report prints:\n{caption}"
            shown += 1
    assert shown == 3
