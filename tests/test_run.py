"""``linalign run`` on the tiny random Llama: results equal ``generate`` (its default ratio,
``--fast`` too), rows written through ``on_finished`` as they finish (no streamer),
restart after an interruption (and a line cut short by a crash) with every id once,
malformed input reported by line number, the bounds of ``linalign.options``, out-of-memory
batches split, several principles and kl mode, and two ``torchrun`` processes (gloo) merged
into the single-process output. Commands run in process (``linalign.runner.main``) except
the torchrun one; at most 8 new tokens per row."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linalign import runner
from linalign.cli_args import TINY_MODEL, load_aligner
from linalign.decoder import LinearAligner
from linalign.constants import MAX_RATIO
from linalign.options import COMMAND_REPETITION_PENALTY, DEFAULT_RATIO, RULES, SamplingParams
from linalign.runner import RunOptions, Settings
from linalign.testing import ByteTokenizer

LINES = [
    {"id": 1, "prompt": "hello there, how are you today?", "principle": "Be kind."},
    {"id": "b", "prompt": "a", "principle": "Be brief.", "ratio": 1.5},
    {"id": "c", "prompt": "Tell me about the sea.", "principle": "Be kind.",
     "max_new_tokens": 3},
    {"id": "d", "prompt": "xyz 123 \u00e9", "principle": "Answer in French.", "ratio": 0},
    {"id": "e", "prompt": "What is a cat? Tell me everything.", "principle": "Shout.",
     "seed": 42},
    {"id": 6, "prompt": "Why?", "principle": "Be kind.", "ratio": [-0.5]},
]
BASE = ["--model", TINY_MODEL, "--device", "cpu", "--threads", "1",
        "--max-new-tokens", "8", "--token-ids", "--no-progress"]


@pytest.fixture(scope="module")
def aligner():
    # the model the command uses (built once per process and device)
    return load_aligner(argparse.Namespace(model=TINY_MODEL, system=None, device="cpu",
                                           dtype="auto", threads=None))


def settings(token_ids=False, **params):
    return Settings(SamplingParams(**params), RunOptions(token_ids=token_ids))


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in lines))
    return path


def results(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def run(tmp_path, *args, lines=LINES, name="out.jsonl", command_defaults=False):
    """``linalign run`` on ``lines``; the repetition penalty neutral, as the library's
    ``generate`` the tests compare with, unless ``command_defaults``."""
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        write_lines(inp, lines)
    neutral = [] if command_defaults else ["--repetition-penalty", "1"]
    return runner.main(["--input", str(inp), "--output", str(tmp_path / name), *BASE,
                        *neutral, *args])


def want_of(aligner, line, n=8, **options):
    """``generate``'s result for one line alone: its own ratio, else generate's default."""
    if "ratio" in line:
        r = line["ratio"]
        options["ratio"] = r[0] if isinstance(r, list) else r
    return aligner.generate(line["prompt"], line["principle"],
                            max_new_tokens=line.get("max_new_tokens", n), **options)


def test_results_equal_generate(tmp_path, aligner, capsys):
    """Each row's tokens and text are generate's for that prompt alone (greedy), with the
    line's ratio (else generate's default, DEFAULT_RATIO) and max_new_tokens; the finished
    file is in input order; settings record what each row ran with. The command's own
    defaults: its repetition penalty too."""
    assert run(tmp_path, "--batch-size", "4", command_defaults=True) == 0
    out = results(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [x["id"] for x in LINES]
    for line, o in zip(LINES, out):
        ratio = line.get("ratio", DEFAULT_RATIO)
        ratio = ratio[0] if isinstance(ratio, list) else ratio
        n = line.get("max_new_tokens", 8)
        want = want_of(aligner, line, repetition_penalty=COMMAND_REPETITION_PENALTY)
        assert o["token_ids"] == want.token_ids[0], o["id"]
        assert o["text"] == want.texts[0] and o["new_tokens"] == len(want.token_ids[0])
        assert o["finish_reason"] == want.finish_reasons[0]
        assert o["prompt"] == line["prompt"] and o["principles"] == [line["principle"]]
        assert o["rank"] == 0 and o["model"] == TINY_MODEL
        assert o["settings"] == {
            "ratio": [float(ratio)], "kl_budget": None, "max_ratio": None,
            "temperature": 0.5, "top_p": 0.8, "greedy": True, "max_new_tokens": n,
            "seed": None, "mode": "stacked", "system": None,
            "repetition_penalty": COMMAND_REPETITION_PENALTY,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "no_repeat_ngram_size": 0,
            "stop": []}
    err = capsys.readouterr().err
    assert "6 rows decoded (0 already done); 6 rows in" in err
    # nothing left to do: a rerun decodes nothing and leaves the file as it was
    before = (tmp_path / "out.jsonl").read_text()
    assert run(tmp_path) == 0
    assert (tmp_path / "out.jsonl").read_text() == before
    assert "0 rows decoded (6 already done)" in capsys.readouterr().err


def test_the_default_ratio_is_generates(tmp_path, aligner):
    """A line without a ratio, and no --ratio: DEFAULT_RATIO, recorded in its settings, the
    tokens of generate with its defaults; --ratio sets it for every such line."""
    lines = [LINES[0], LINES[4]]
    assert run(tmp_path, lines=lines) == 0
    for line, o in zip(lines, results(tmp_path / "out.jsonl")):
        assert o["settings"]["ratio"] == [DEFAULT_RATIO]
        want = aligner.generate(line["prompt"], line["principle"], max_new_tokens=8)
        assert o["token_ids"] == want.token_ids[0]
        assert want.token_ids == want_of(aligner, line, ratio=DEFAULT_RATIO).token_ids
        assert want.token_ids != want_of(aligner, line, ratio=3.0).token_ids  # it matters
    assert run(tmp_path, "--ratio", "2.5", name="r.jsonl") == 0
    for line, o in zip(lines, results(tmp_path / "r.jsonl")):
        assert o["settings"]["ratio"] == [2.5]
        assert o["token_ids"] == want_of(aligner, line, ratio=2.5).token_ids[0]


def test_fast_gives_the_same_lines(tmp_path):
    """--fast (static cache; a CUDA graph on a GPU) writes the same lines as without."""
    assert run(tmp_path, "--batch-size", "4", name="plain.jsonl") == 0
    assert run(tmp_path, "--batch-size", "4", "--fast", name="fast.jsonl") == 0
    plain, fast = results(tmp_path / "plain.jsonl"), results(tmp_path / "fast.jsonl")
    assert len(plain) == len(LINES) and fast == plain
    assert run(tmp_path, "--fast", "--mode", "two-caches", name="x.jsonl") == 2


def test_rows_are_written_through_on_finished(aligner):
    """decode_jobs passes generate an on_finished callback and no streamer (a streamer reads
    every step's tokens: a host synchronisation per step on a GPU); every line is written
    from inside that callback, before its generate call returns."""
    events = []

    class Spy(LinearAligner):
        def generate(self, prompts, principle, params=None, **kw):
            assert kw.get("streamer") is None and callable(kw.get("on_finished"))
            assert kw.get("fast") is False and kw.get("mode") == "stacked"
            events.append("call")
            result = super().generate(prompts, principle, params, **kw)
            events.append("return")
            return result

    spy = Spy(aligner.model, ByteTokenizer())
    s = settings(max_new_tokens=5)
    jobs = [runner.resolve(runner.parse_line(x, i + 1), s, None) for i, x in enumerate(LINES)]
    n = runner.decode_jobs(spy, jobs, s, lambda o: events.append(o["id"]), batch_size=4)
    assert n == len(LINES) and events[-1] == "return"
    calls = "".join("(" if e == "call" else ")" if e == "return" else "r" for e in events)
    batches = runner.plan(jobs, 4)  # each row written inside its batch's call
    assert calls == "".join("(" + "r" * len(b) + ")" for b in batches) and len(batches) > 1
    assert sorted(map(str, (e for e in events if e not in ("call", "return")))) == \
        sorted(str(x["id"]) for x in LINES)


def test_rows_are_written_the_step_they_finish(aligner):
    """A row that ends on its end-of-sequence token is written while the rest of its batch
    is still decoding, and the batch's other rows follow when they end."""
    free = aligner.generate([x["prompt"] for x in LINES[:4]], "Be kind.", max_new_tokens=8)
    stop = free.token_ids[0][2]
    early = LinearAligner(aligner.model, ByteTokenizer())
    early.eos_ids = [stop]
    rows = [runner.parse_line({"id": x["id"], "prompt": x["prompt"], "principle": "Be kind."},
                              i + 1) for i, x in enumerate(LINES[:4])]
    s = settings(token_ids=True, max_new_tokens=8)
    jobs = [runner.resolve(r, s, None) for r in rows]
    progress = runner.Progress(len(jobs), False)
    written = []
    n = runner.decode_jobs(early, jobs, s, lambda o: written.append((o, progress.tokens)),
                           batch_size=4, progress=progress)
    assert n == 4 and progress.rows == 4
    first, tokens_then = written[0]
    assert first["id"] == 1 and first["finish_reason"] == "eos"
    assert first["token_ids"] == free.token_ids[0][:3]
    assert tokens_then < progress.tokens  # the others were still running
    by_id = {o["id"]: o for o, _ in written}
    for i, x in enumerate(LINES[:4]):
        ids = free.token_ids[i]
        cut = ids.index(stop) + 1 if stop in ids else len(ids)
        assert by_id[x["id"]]["token_ids"] == ids[:cut]


def test_sampling_seeds_follow_the_row_not_the_batch(tmp_path, aligner):
    """--sample: a row's seed is its own "seed" or row_seed(--seed, id); the same tokens at
    any batch size, equal to generate with that seed."""
    assert run(tmp_path, "--sample", "--seed", "5", "--temperature", "1.0",
               "--batch-size", "1", name="one.jsonl") == 0
    assert run(tmp_path, "--sample", "--seed", "5", "--temperature", "1.0",
               "--batch-size", "6", name="six.jsonl") == 0
    one, six = results(tmp_path / "one.jsonl"), results(tmp_path / "six.jsonl")
    assert one == six
    for line, o in zip(LINES, one):
        seed = line.get("seed", runner.row_seed(5, str(line["id"])))
        assert o["settings"]["seed"] == seed
        want = want_of(aligner, line, greedy=False, seed=[seed], temperature=1.0)
        assert o["token_ids"] == want.token_ids[0]


def test_restart_after_an_interruption(tmp_path, capsys):
    """Interrupted after 2 rows (exit 130), then a crash cut the next line short: the rerun
    drops the cut line, decodes only the rest, and ends with every id once, as a clean run."""
    assert run(tmp_path, "--batch-size", "2", name="clean.jsonl") == 0
    clean = results(tmp_path / "clean.jsonl")
    assert run(tmp_path, "--batch-size", "2", "--stop-after", "2") == 130
    assert "interrupted" in capsys.readouterr().err
    out = tmp_path / "out.jsonl"
    kept = results(out)
    assert len(kept) == 2
    with open(out, "a") as f:
        f.write(json.dumps(clean[5])[:40])  # a line cut short, no newline
    assert run(tmp_path, "--batch-size", "2") == 0
    assert "4 rows decoded (2 already done)" in capsys.readouterr().err
    assert results(out) == clean


def test_restart_reads_the_parts_of_a_distributed_run(tmp_path, capsys):
    """Parts left by an interrupted torchrun job (one cut short) count as done; a run on one
    process decodes the rest and folds the parts into the output, then removes them."""
    assert run(tmp_path, name="clean.jsonl") == 0
    clean = results(tmp_path / "clean.jsonl")
    part = tmp_path / "out.jsonl.rank1-of-2"
    part.write_text(json.dumps(clean[1]) + "\n" + json.dumps(clean[4]) + "\n" +
                    json.dumps(clean[2])[:30])
    (tmp_path / "out.jsonl").write_text(json.dumps(clean[0]) + "\n")
    assert run(tmp_path) == 0
    assert "3 rows decoded (3 already done)" in capsys.readouterr().err
    assert results(tmp_path / "out.jsonl") == clean
    assert not part.exists()


def test_malformed_lines_are_reported_and_skipped(tmp_path, capsys):
    bad = [
        LINES[0],
        "{not json",
        {"prompt": "q", "principle": "x"},
        {"id": "b", "prompt": "   ", "principle": "x"},
        {"id": "c", "prompt": "q", "principle": []},
        {"id": "d", "prompt": "q", "principle": "x", "ratio": [1, 2]},
        {"id": "e", "prompt": "q", "principle": "x", "ratio": 1, "kl_budget": 0.1},
        {"id": True, "prompt": "q", "principle": "x"},
        {"id": "f", "prompt": "q", "principle": "x", "max_tokens": 3},
        {"id": "g", "prompt": "q", "principle": "x", "seed": -1},
        "",
        {"id": 1, "prompt": "again", "principle": "x"},
        ["a", "list"],
        {"id": "h", "prompt": "q", "principle": ["x", "y"], "kl_budget": 0.1},
        {"id": "i", "prompt": "q", "principle": "x", "ratio": 1e39},
        {"id": "j", "prompt": "q", "principle": "x", "kl_budget": -0.1},
        {"id": "k", "prompt": "q", "principle": "x", "max_new_tokens": -1},
        {"id": "l", "prompt": "q", "principle": "x", "seed": 2**63},
        {"id": "m", "prompt": "q", "principle": "x", "ratio": "2"},
        LINES[1],
    ]
    want = {2: "not valid JSON", 3: "missing 'id'", 4: '"prompt" is empty',
            5: '"principle" must be a string or a non-empty list',
            6: '"ratio" must be a number (a finite number) or a list of 1 (one per',
            7: 'give "ratio" or "kl_budget", not both', 8: '"id" must be',
            9: "unknown field 'max_tokens'", 10: '"seed" must be an int in [0, 2**63)',
            12: "id 1 is already on line 1", 13: "expected a JSON object",
            14: '"kl_budget" is for one principle (docs/semantics.md, "kl mode"); this '
                'line has 2',
            # the bounds of linalign.options, judged in fp32 like the step
            15: '"ratio" must be a number (a finite number)', 16: '"kl_budget" must be '
            'finite and >= 0', 17: '"max_new_tokens" must be an int >= 0; got -1',
            18: '"seed" must be an int in [0, 2**63)', 19: "got '2'"}
    write_lines(tmp_path / "in.jsonl", bad)
    assert run(tmp_path) == 0
    err = capsys.readouterr().err.splitlines()
    for n, words in want.items():
        hits = [e for e in err if f"in.jsonl line {n}: " in e]
        assert len(hits) == 1 and words in hits[0] and hits[0].endswith("line skipped"), n
    assert not any("line 11:" in e for e in err)  # a blank line is not a problem
    assert f"{len(want)} malformed input line(s) skipped" in err[-1]
    assert [o["id"] for o in results(tmp_path / "out.jsonl")] == [1, "b"]
    # --strict: stop before any decoding, exit 2, one line naming the first bad line
    assert run(tmp_path, "--strict", name="strict.jsonl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in.jsonl line 2: not valid JSON" in err[0]
    assert not (tmp_path / "strict.jsonl").exists()


def test_a_row_the_decoder_refuses_is_reported(tmp_path, capsys):
    """A prompt longer than the model's context (512 positions) fails alone: its batch is
    retried row by row, the row is reported (exit code 1), the others are written;
    --strict stops there with exit code 2."""
    lines = LINES[:3] + [{"id": "long", "prompt": "word " * 120, "principle": "Be kind."}]
    write_lines(tmp_path / "in.jsonl", lines)
    assert run(tmp_path, "--batch-size", "4") == 1
    err = capsys.readouterr().err
    assert "input line 4 (id 'long'): " in err and "exceeds the model's context" in err
    assert "row skipped" in err and "1 row(s) refused by the decoder" in err
    assert [o["id"] for o in results(tmp_path / "out.jsonl")] == [1, "b", "c"]
    assert run(tmp_path, "--strict", name="strict.jsonl") == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_bad_arguments_and_outputs(tmp_path, capsys):
    cases = [
        (["--ratio", "2", "--kl-budget", "0.1"], "give --ratio or --kl-budget, not both"),
        (["--batch-size", "0"], "expected an integer >= 1"),
        # the bounds of linalign.options
        (["--top-p", "0"], f"must be {RULES['top_p'].words}"),
        (["--kl-budget", "-1"], f"must be {RULES['kl_budget'].words}"),
        (["--max-ratio", "-1"], f"must be {RULES['max_ratio'].words}"),
        (["--ratio", "1e39"], f"must be {RULES['ratio'].words}"),
        (["--temperature", "-0.5"], f"must be {RULES['temperature'].words}"),
        (["--model", str(tmp_path / "nowhere")], "no such folder or file"),
        (["--device", "gpu7"], "expected cpu, cuda, cuda:N or auto"),
        (["--dtype", "int8"], "invalid choice"),
        (["--fast", "--mode", "two-caches"], "--fast runs the stacked loop"),
    ]
    write_lines(tmp_path / "in.jsonl", LINES)
    for args, words in cases:
        assert run(tmp_path, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert runner.main(["--input", str(tmp_path / "none.jsonl"), "--output",
                        str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert runner.main(["--input", str(tmp_path / "in.jsonl"), "--output",
                        str(tmp_path / "no" / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an output that is not ours is never appended to
    line = '{"id": 1, "text": "", "finish_reason": "length"}\n'
    (tmp_path / "out.jsonl").write_text(line + "something else\n" + line)
    assert run(tmp_path) == 2
    assert "out.jsonl is not a linalign results file (line 2 is not a result line)" in \
        capsys.readouterr().err


def test_out_of_memory_splits_the_batch(aligner):
    """A batch that runs out of memory is retried in halves; rows finished before the error
    are kept, every row is written once, with the tokens of a batch that fits."""
    class Small(LinearAligner):
        def generate(self, prompts, principle, params=None, **kw):
            if len(prompts) > 2:
                raise MemoryError("out of memory decoding (test)")
            return super().generate(prompts, principle, params, **kw)

    small = Small(aligner.model, ByteTokenizer())
    s = settings(token_ids=True, max_new_tokens=4)
    jobs = [runner.resolve(runner.parse_line(x, i + 1), s, None) for i, x in enumerate(LINES)]
    out, logs = [], []
    assert runner.decode_jobs(small, jobs, s, out.append, batch_size=5, log=logs.append) == 6
    assert sorted(map(str, (o["id"] for o in out))) == sorted(str(x["id"]) for x in LINES)
    assert any("retrying" in m for m in logs)
    want = []
    runner.decode_jobs(aligner, jobs, s, want.append, batch_size=1)
    assert {str(o["id"]): o for o in out} == {str(o["id"]): o for o in want}


def test_merge_outputs(tmp_path):
    """--merge / merge_outputs: OUTPUT plus parts, one line per id (the first met), input
    order, ids not in the input last; missing ids reported."""
    inp = write_lines(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    mk = [{"id": x["id"], "text": str(x["id"]), "finish_reason": "length"} for x in LINES]
    write_lines(out, [mk[3]])
    write_lines(tmp_path / "out.jsonl.rank0-of-2", [mk[1], mk[0], dict(mk[0], id="zz")])
    write_lines(tmp_path / "out.jsonl.rank1-of-2", [dict(mk[3], text="dup"), mk[5]])
    assert [p.name for p in runner.part_paths(out)] == ["out.jsonl.rank0-of-2",
                                                        "out.jsonl.rank1-of-2"]
    assert runner.main(["--input", str(inp), "--output", str(out), "--merge"]) == 0
    assert [o["id"] for o in results(out)] == [1, "b", "d", 6, "zz"]
    assert results(out)[2]["text"] == "d"
    summary = runner.merge_outputs(inp, out, [])
    assert summary.missing == ["c", "e"] and summary.extra == ["zz"] and summary.rows == 5


def test_progress_bar(tmp_path):
    class Tty:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    tty = Tty()
    p = runner.Progress(3, True, stream=tty)
    p.update(rows=1, tokens=8, force=True)
    p.update(rows=2, tokens=8)
    p.close()
    assert tty.text.startswith("\r") and "3/3 rows" in tty.text and "tokens/s" in tty.text
    assert tty.text.endswith("\n")
    quiet = Tty()
    p = runner.Progress(3, False, stream=quiet)
    p.update(rows=3, tokens=5)
    p.close()
    assert quiet.text == "" and p.rows == 3 and p.tokens == 5


def test_several_principles_per_line(tmp_path, aligner):
    """A line with a list of principles composes them: its own ratios, else the default
    ratio for each; the tokens of generate for that prompt alone."""
    lines = [{"id": "k2", "prompt": "hello there", "principle": ["Be kind.", "Be brief."],
              "ratio": [1.0, 2.0]},
             {"id": "k2b", "prompt": "a", "principle": ["Shout.", "Be brief."]},
             LINES[0]]
    assert run(tmp_path, lines=lines) == 0
    out = results(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == ["k2", "k2b", 1]
    for line, o, ratio in zip(lines[:2], out, ([1.0, 2.0], [DEFAULT_RATIO] * 2)):
        want = aligner.generate([line["prompt"]], [line["principle"]], ratio=[ratio],
                                max_new_tokens=8)
        assert o["token_ids"] == want.token_ids[0] and o["settings"]["ratio"] == ratio
        assert o["principles"] == line["principle"]


def test_kl_mode(tmp_path, aligner):
    """A line's kl_budget, else --kl-budget for lines without a ratio; --max-ratio caps
    the derived ratio and is recorded for kl rows only."""
    lines = [{"id": "kl", "prompt": "hello there", "principle": "Be kind.",
              "kl_budget": 0.05}, {"id": "default", "prompt": "a", "principle": "Be brief."},
             dict(LINES[1])]
    assert run(tmp_path, "--kl-budget", "0.2", "--max-ratio", "4", lines=lines) == 0
    out = results(tmp_path / "out.jsonl")
    for line, o, budget in zip(lines[:2], out, (0.05, 0.2)):
        want = aligner.generate([line["prompt"]], [line["principle"]], ratio=None,
                                kl_budget=budget, max_ratio=4.0, max_new_tokens=8)
        assert o["token_ids"] == want.token_ids[0]
        assert o["settings"]["kl_budget"] == budget and o["settings"]["ratio"] is None
        assert o["settings"]["max_ratio"] == 4.0
    assert out[2]["settings"]["ratio"] == [1.5]  # a line's ratio wins over --kl-budget
    assert out[2]["settings"]["max_ratio"] is None


def test_kl_budget_and_several_principles(tmp_path, capsys):
    """--kl-budget is for one principle: a line with several and no ratio of its own is
    reported and skipped (kl mode is for one principle per prompt)."""
    lines = [{"id": 1, "prompt": "q", "principle": ["A.", "B."]},
             {"id": 2, "prompt": "q", "principle": ["A.", "B."], "ratio": 2}, LINES[1]]
    write_lines(tmp_path / "in.jsonl", lines)
    assert run(tmp_path, "--kl-budget", "0.1", "--strict") == 2
    assert "line 1: 2 principles and no \"ratio\": --kl-budget" in capsys.readouterr().err


def test_kl_budget_zero_is_accepted(tmp_path, aligner):
    """kl_budget >= 0 everywhere: "kl_budget": 0 on a line and --kl-budget 0 both run, with
    the tokens of generate(kl_budget=0) and the default cap recorded."""
    lines = [{"id": "z", "prompt": "hello there", "principle": "Be kind.", "kl_budget": 0},
             {"id": "d", "prompt": "a", "principle": "Be brief."}]
    assert run(tmp_path, "--kl-budget", "0", "--strict", lines=lines) == 0
    out = results(tmp_path / "out.jsonl")
    for line, o in zip(lines, out):
        want = aligner.generate(line["prompt"], line["principle"], kl_budget=0.0,
                                max_new_tokens=8)
        assert o["token_ids"] == want.token_ids[0]
        assert o["settings"]["kl_budget"] == 0 and o["settings"]["ratio"] is None
        assert o["settings"]["max_ratio"] == MAX_RATIO


def test_ratio_once_per_principle(tmp_path, aligner, capsys):
    """--ratio given twice is the default of lines with two principles; a line with another
    number of principles and no ratio of its own is reported and skipped."""
    lines = [{"id": 1, "prompt": "q", "principle": ["A.", "B."]},
             {"id": 2, "prompt": "q", "principle": "A."},
             {"id": 3, "prompt": "q", "principle": "A.", "ratio": 2}]
    assert run(tmp_path, "--ratio", "0.5", "--ratio", "2", lines=lines) == 0
    assert "line 2: 1 principle(s) and no \"ratio\": --ratio is given 2 times" in \
        capsys.readouterr().err
    out = results(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [1, 3]
    assert out[0]["settings"]["ratio"] == [0.5, 2.0]
    want = aligner.generate(["q"], [["A.", "B."]], ratio=[[0.5, 2.0]], max_new_tokens=8)
    assert out[0]["token_ids"] == want.token_ids[0]


def test_the_linalign_command_has_run(tmp_path):
    from linalign import cli

    write_lines(tmp_path / "in.jsonl", LINES[:2])
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"), *BASE]
    assert cli.main(args) == 0
    assert [o["id"] for o in results(tmp_path / "out.jsonl")] == [1, "b"]
    assert cli.main(args + ["--batch-size", "x"]) == 2


def test_torchrun_two_processes_merge_into_the_single_process_output(tmp_path):
    """torchrun --nproc-per-node 2 (gloo on CPU), restarting an interrupted job: each rank
    skips the ids already in the output or in any part (its own part's cut last line is
    dropped and that row decoded again), decodes the other ids hashed to it into its part;
    rank 0 gathers the parts and writes the output in input order, every id once, the same
    rows as one process; the parts are removed."""
    lines = LINES + [{"id": f"x{i}", "prompt": f"Question number {i}?" * (i % 3 + 1),
                      "principle": "Be kind."} for i in range(6)]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    assert run(tmp_path, "--batch-size", "3", name="single.jsonl", command_defaults=True) == 0
    single = [{k: v for k, v in o.items() if k != "rank"}
              for o in results(tmp_path / "single.jsonl")]
    shard = [runner.shard_of(str(x["id"]), 2) for x in lines]
    zero, one = [i for i, r in enumerate(shard) if r == 0], [i for i, r in enumerate(shard)
                                                            if r == 1]
    assert len(zero) >= 3 and len(one) >= 3
    # the interrupted job: a row in the output, two (and a cut one) in rank 1's part, one
    # in a part of an earlier 3-process run; their texts mark them as not decoded again
    planted = {i: dict(single[i], text=f"planted {i}") for i in (zero[0], one[0], one[1],
                                                                 zero[1])}
    write_lines(tmp_path / "multi.jsonl", [planted[zero[0]]])
    part = tmp_path / "multi.jsonl.rank1-of-2"
    write_lines(part, [planted[one[0]], planted[one[1]]])
    with open(part, "a") as f:
        f.write(json.dumps(single[one[2]])[:50])
    write_lines(tmp_path / "multi.jsonl.rank0-of-3", [planted[zero[1]]])
    # run where the data is, as a user would (the installed linalign; not the repository
    # root, whose top-level kernels/ folder transformers would take for its "kernels")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--monitor-interval", "0.1", "--nproc-per-node", "2", "-m", "linalign.runner",
           "--input", str(inp), "--output", str(tmp_path / "multi.jsonl"), *BASE,
           "--batch-size", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 ranks: {len(lines) - 2} rows from the parts; {len(lines)} rows in" in \
        proc.stderr
    multi = results(tmp_path / "multi.jsonl")
    assert [o["id"] for o in multi] == [x["id"] for x in lines]
    for i, o in enumerate(multi):
        if i in planted:
            assert o == planted[i], o["id"]
        else:
            assert o.pop("rank") == shard[i] and o == single[i], o["id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "multi.jsonl",
                                                          "single.jsonl"]
