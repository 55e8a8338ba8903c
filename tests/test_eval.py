"""The judge-free evaluation (the package linalign/evaluation/): every principle's scorer on
answers that follow it and answers that do not, the metrics against hand-computed values,
the perplexity against a one-sample-at-a-time computation, the harness end to end on the
tiny random Llama, the command's options against ``linalign generate``'s, the command end
to end on the tiny model (and on the embedded model, when installed), and the plot's
handling of a missing or broken matplotlib."""
import importlib.util
import io
import json
import math
import pathlib
import sys

import pytest
import torch

import linalign
from linalign import cli
from linalign import evaluation as ev
from linalign.cli_args import TINY_MODEL, CommandError, load_aligner
from linalign.options import RULES
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


def test_mcnemar_exact():
    assert ev.mcnemar_exact(0, 0) == 1.0 and ev.mcnemar_exact(3, 3) == 1.0
    assert ev.mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # five heads of five, two-sided
    assert ev.mcnemar_exact(1, 4) == ev.mcnemar_exact(4, 1) == pytest.approx(2 * 6 / 32)
    scipy_stats = pytest.importorskip("scipy.stats")
    for wins, losses in ((29, 10), (35, 18), (33, 20), (5, 68), (0, 7)):
        want = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert ev.mcnemar_exact(wins, losses) == pytest.approx(want, rel=1e-9)


def test_paired_tests_by_hand():
    """Pairs on (prompt index, principle) within a decoding; only disagreements count."""
    def s(setting, i, passed, rep3=0.0, decoding="greedy", principle="brief"):
        return dict(setting=setting, decoding=decoding, principle=principle, prompt_index=i,
                    passed=passed, rep3=rep3, distinct2=1.0, nll=1.0, nll_tokens=1,
                    ppl=math.e, n_tokens=1, finish_reason="eos", ratio=None)
    samples = [s("prompt", 0, False), s("prompt", 1, True), s("prompt", 2, False),
               s("prompt", 3, True),
               s("la-r1", 0, True), s("la-r1", 1, True), s("la-r1", 2, True, rep3=0.5),
               s("la-r1", 3, False), s("la-r1", 4, True),  # no prompt answer for 4
               s("la-r1", 0, True, decoding="sampled")]      # no sampled prompt answers
    t = ev.paired_tests(samples)
    assert set(t) == {("la-r1", "greedy")}
    t = t[("la-r1", "greedy")]
    assert (t["pairs"], t["wins"], t["losses"]) == (4, 2, 1)
    assert (t["clean_wins"], t["clean_losses"]) == (1, 1)  # answer 2 loops: not clean
    assert t["p"] == ev.mcnemar_exact(2, 1) and t["clean_p"] == 1.0
    every = [r for r in ev.summarise(samples) if r["principle"] == "all"]
    la = next(r for r in every if r["setting"] == "la-r1" and r["decoding"] == "greedy")
    assert la["vs_prompt_wins"] == 2 and la["vs_prompt_p"] == t["p"]
    assert all("vs_prompt_p" not in r for r in every if r["setting"] == "prompt")


def test_settings_with_modifiers_and_their_baseline():
    st = ev.parse_setting("la-r1+rep1.3+ngram3")
    assert (st.kind, st.value, st.modifiers) == ("la", 1.0, "+rep1.3+ngram3")
    assert st.options == (("repetition_penalty", 1.3), ("no_repeat_ngram_size", 3))
    assert ev.parse_setting("prompt+pres0.5+freq0.5").options == (
        ("presence_penalty", 0.5), ("frequency_penalty", 0.5))
    for bad, message in (("la-r1+rep0", "repetition_penalty must be"),
                         ("la-r1+ngram2.5", "n-gram size is an int"),
                         ("la-r1+temp2", "unknown modifier 'temp2'"), ("la-r1+", "unknown")):
        with pytest.raises(ValueError, match=message):
            ev.parse_setting(bad)
    plan = ev.harness.make_plan(principles=["brief"], prompts=["Q"], settings=[st.name],
                                decodings=["greedy"], max_new_tokens=4, temperature=0.5,
                                top_p=0.8, seed=0, max_ratio=10.0, batch_size=2,
                                ppl_batch_size=None, fast=False)
    params = plan.params_for(st, True, [0])
    assert (params.ratio, params.repetition_penalty, params.no_repeat_ngram_size) == (1.0, 1.3, 3)
    names = {"prompt", "prompt+rep1.3", "la-r1+rep1.3", "la-r1+ngram3"}
    assert ev.harness.baseline_of("la-r1+rep1.3", names) == "prompt+rep1.3"
    assert ev.harness.baseline_of("la-r1+ngram3", names) == "prompt"  # no prompt+ngram3


def test_combine_parts_of_one_evaluation(tmp_path):
    """Two runs of one protocol (other settings) summarised together, paired across them;
    a part of another protocol or a setting in two parts is refused."""
    from linalign.evaluation.report import write_outputs

    def sample(setting, i, passed):
        return dict(setting=setting, decoding="greedy", principle="brief", prompt_index=i,
                    passed=passed, rep3=0.0, distinct2=1.0, nll=1.0, nll_tokens=1,
                    ppl=math.e, n_tokens=1, finish_reason="eos", ratio=None)

    def part(name, setting, passes, **meta):
        samples = [sample(setting, i, ok) for i, ok in enumerate(passes)]
        meta = dict(dict(model="m", dtype="float32", max_new_tokens=4, temperature=0.5,
                         top_p=0.8, seed=0, prompts=["a", "b", "c"], settings=[setting],
                         decodings=["greedy"], total_seconds=1.0), **meta)
        write_outputs({"rows": ev.summarise(samples), "samples": samples, "timing": {}},
                      str(tmp_path / name), meta, plot=False)
        return str(tmp_path / name)

    a = part("a", "prompt", [False, False, True])
    b = part("b", "la-r1", [True, True, True])
    paths = ev.combine([a, b], str(tmp_path / "ab"), plot=False)
    assert str(tmp_path / "ab.samples.jsonl.gz") in paths
    summary = json.loads((tmp_path / "ab.json").read_text())
    la = next(r for r in summary["rows"] if r["setting"] == "la-r1" and r["principle"] == "all")
    assert (la["vs_prompt_wins"], la["vs_prompt_losses"]) == (2, 0)
    assert summary["meta"]["settings"] == ["prompt", "la-r1"]
    assert [p["prefix"] for p in summary["meta"]["parts"]] == [a, b]
    with pytest.raises(ValueError, match="max_new_tokens differs"):
        ev.combine([a, part("c", "la-r3", [True] * 3, max_new_tokens=8)], str(tmp_path / "x"),
                plot=False)
    with pytest.raises(ValueError, match="also in an earlier part"):
        ev.combine([a, part("d", "prompt", [True] * 3)], str(tmp_path / "y"), plot=False)


def test_paired_tests_of_the_committed_answers():
    """The numbers docs/eval.md quotes, from the committed answers of all 48 prompts."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / \
        "eval_cpu_48.samples.jsonl.gz"
    t = ev.paired_tests(ev.read_samples(str(path)))
    r1, r3 = t[("la-r1", "greedy")], t[("la-r3", "greedy")]
    assert (r1["wins"], r1["losses"], r1["clean_wins"], r1["clean_losses"]) == (29, 10, 35, 18)
    assert round(r1["p"], 3) == 0.003 and round(r1["clean_p"], 3) == 0.027
    assert (r3["wins"], r3["losses"]) == (33, 14) and round(r3["clean_p"], 3) == 0.098


def test_parse_setting():
    assert ev.parse_setting("none") == ev.Setting("none", "none")
    assert ev.parse_setting("la-r3") == ev.Setting("la-r3", "la", 3.0)
    assert ev.parse_setting("la-r0.5").value == 0.5
    assert ev.parse_setting("kl-0.3") == ev.Setting("kl-0.3", "kl", 0.3)
    # la-r1e39 and kl-1e39 are not finite in fp32, the decoder's arithmetic
    for bad in ("la", "la-r", "kl-0", "kl-x", "ratio3", "la-r-1", "", "la-r1e39", "kl-1e39"):
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
    assert set(result) == {"rows", "samples", "timing"}
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 3  # settings x decodings x (2 principles + all)
    assert "la-r3/sampled" in log.getvalue()

    meta = dict(model="tiny", device="cpu", prompts=prompts, title="test")
    paths = ev.write_outputs(result, str(tmp_path / "e"), meta, gzip_samples=True,
                             progress=log)
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(rows))
    assert set(summary["principles"]) == {"brief", "no-digits"}
    assert set(summary) == {"meta", "rows", "timing", "principles", "prompts"}
    assert (tmp_path / "e.csv").read_text().count("\n") == len(rows) + 1
    assert str(tmp_path / "e.samples.jsonl.gz") in paths
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ev.markdown_report(summary)
    assert "| la-r3 | sampled |" in report and "| brief |" in report


def test_kl_settings(aligner):
    """kl-<eps> calls generate(kl_budget=eps, max_ratio=...) and reports the decoder's mean
    derived ratio; a decoder without kl mode fails the run (nothing is skipped)."""
    prompts = ["Hi there"]
    res = ev.run_eval(aligner, principles=["brief"], prompts=prompts, settings="kl-0.3",
                      decodings=["greedy"], max_new_tokens=3, max_ratio=4.0, progress=None)
    direct = aligner.generate(prompts, ev.PRINCIPLES["brief"].text, kl_budget=0.3,
                              max_ratio=4.0, max_new_tokens=3)
    assert res["samples"][0]["token_ids"] == direct.token_ids[0]
    assert res["samples"][0]["ratio"] == pytest.approx(direct.extra["ratio"][0])
    assert -1.0 <= res["rows"][-1]["mean_ratio"] <= 4.0  # r_eff = kappa - 1, kappa in [0, 5]
    assert "skipped" not in res

    class NoKl:  # the decoder's interface, refusing kl mode
        def __init__(self, inner):
            self.inner = inner
            self.model, self.pad_id = inner.model, inner.pad_id
            self.encode, self.prompt_texts = inner.encode, inner.prompt_texts

        def generate(self, prompts, principle, params=None, **kw):
            if params is not None and params.kl_budget is not None:
                raise TypeError("this decoder has no kl mode")
            return self.inner.generate(prompts, principle, params, **kw)

        def generate_plain(self, prompts, principle=None, params=None, **kw):
            return self.inner.generate_plain(prompts, principle, params, **kw)

    runs = []
    with pytest.raises(TypeError, match="no kl mode"):
        ev.run_eval(NoKl(aligner), principles=["brief"], prompts=prompts,
                    settings="la-r1,kl-0.3", decodings=["greedy"], max_new_tokens=2,
                    progress=None, on_run=runs.append)
    assert len(runs) == 1  # la-r1 ran (and was checkpointed), then kl-0.3 failed


def test_bad_arguments(aligner, tmp_path):
    with pytest.raises(ValueError, match="unknown principle"):
        ev.run_eval(aligner, principles=["nope"], prompts=["x"], settings="none")
    with pytest.raises(ValueError, match="unknown setting"):
        ev.run_eval(aligner, prompts=["x"], settings="la-3")
    with pytest.raises(ValueError, match="decoding"):
        ev.run_eval(aligner, prompts=["x"], settings="none", decodings=["beam"])
    # sampling options are checked by the decoder's rules before the first answer
    for bad, what in ((dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                      (dict(max_ratio=math.inf), "max_ratio"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=what):
            ev.run_eval(aligner, prompts=["x"], settings="none", progress=None,
                        on_run=pytest.fail, **bad)
    parser = ev.build_eval_parser()
    for argv, what in ((["--settings", "la-3"], "--settings: unknown setting"),
                       (["--settings", ","], "--settings is empty"),
                       (["--decodings", "beam"], "decodings"),
                       (["--principles", "brief,nope"], "unknown principle"),
                       (["--principles", ","], "--principles is empty"),
                       (["--prompt-file", str(tmp_path / "none.txt")], "--prompt-file"),
                       (["--report", str(tmp_path / "none.json")], "--report")):
        with pytest.raises(CommandError, match=what):
            ev.eval_command(parser.parse_args(argv), out=io.StringIO(),
                            progress=io.StringIO())


# The edge values of the real-valued options: each command must take exactly what the
# library's rule takes (judged at fp32: 1e-50 is 0 and 1.0000001 is above 1 there).
EDGE_VALUES = ["0", "-0.0", "1e-50", "1e39", "nan", "inf", "-inf", "1.0000001", "1", "0.8",
               "-1", "3.4e38"]


@pytest.mark.parametrize("option,rule", [("--temperature", "temperature"),
                                         ("--top-p", "top_p"), ("--max-ratio", "max_ratio")])
def test_eval_and_generate_take_the_same_values(option, rule):
    parser = cli.build_parser()
    dest = option[2:].replace("-", "_")

    def outcome(argv):
        try:
            return getattr(parser.parse_args(argv), dest)
        except CommandError:
            return "refused"

    for value in EDGE_VALUES:
        in_eval = outcome(["eval", f"{option}={value}"])
        in_generate = outcome(["generate", "Hi", "--principle", "p", f"{option}={value}"])
        expected = float(value) if RULES[rule].number_ok(float(value)) else "refused"
        assert in_eval == in_generate == expected, (option, value)
    # not vacuous: each option takes some of these values and refuses others
    taken = [v for v in EDGE_VALUES if outcome(["eval", f"{option}={v}"]) != "refused"]
    assert 0 < len(taken) < len(EDGE_VALUES)
    assert outcome(["eval", f"{option}=nan"]) == outcome(["eval", f"{option}=1e39"]) == \
        "refused"


def test_eval_takes_the_shared_options_and_the_protocol_defaults():
    args = cli.build_parser().parse_args(["eval"])
    assert (args.max_new_tokens, args.seed) == (48, 0)  # the protocol's
    assert (args.temperature, args.top_p, args.max_ratio) == (
        linalign.SamplingParams.temperature, linalign.SamplingParams.top_p,
        linalign.SamplingParams.max_ratio)
    assert (args.device, args.dtype, args.fast, args.system) == ("auto", "auto", False, None)
    assert args.run_command is ev.eval_command
    for gone in ("--kl-max-ratio",):
        with pytest.raises(CommandError):
            cli.build_parser().parse_args(["eval", gone, "3"])


def test_command_on_the_tiny_model(tmp_path, capsys):
    """``linalign eval`` end to end through ``linalign.cli.main`` on the tiny random Llama:
    --max-ratio reaches the kl settings, --temperature 0 is taken, the files are written."""
    argv = ["eval", "--model", TINY_MODEL, "--device", "cpu", "--prompts", "2",
            "--principles", "brief,pirate", "--settings", "prompt,la-r3,kl-0.3",
            "--max-new-tokens", "3", "--max-ratio", "4", "--temperature", "0",
            "--out", str(tmp_path / "tiny"), "--no-plot"]
    assert cli.main(argv) == 0
    assert "| kl-0.3 | sampled |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "tiny.json").read_text())
    meta = summary["meta"]
    assert (meta["model"], meta["device"], meta["dtype"]) == (TINY_MODEL, "cpu", "float32")
    assert (meta["max_ratio"], meta["temperature"], meta["max_new_tokens"]) == (4.0, 0.0, 3)
    assert meta["settings"] == ["prompt", "la-r3", "kl-0.3"] and not meta["partial"]
    assert "kl_max_ratio" not in meta and "skipped" not in summary
    assert len(summary["rows"]) == 3 * 2 * 3
    with open(tmp_path / "tiny.samples.jsonl", encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    kl = [s for s in samples if s["setting"] == "kl-0.3" and s["decoding"] == "greedy" and
          s["principle"] == "brief"]
    aligner = load_aligner(cli.build_parser().parse_args(argv))
    direct = aligner.generate(ev.load_prompts()[:2], ev.PRINCIPLES["brief"].text,
                              kl_budget=0.3, max_ratio=4.0, temperature=0.0,
                              max_new_tokens=3)
    assert [s["token_ids"] for s in kl] == direct.token_ids
    assert all(-1.0 <= s["ratio"] <= 4.0 for s in samples if s["setting"] == "kl-0.3")


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
    assert "vs prompt: +/- (p)" in text


@pytest.mark.embedded_model
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


# ------------------------------------------------------------------ the plot
ROWS = ev.summarise([dict(setting="la-r3", decoding="greedy", principle="brief",
                          passed=True, rep3=0.1, distinct2=0.9, nll=1.0, nll_tokens=1,
                          ppl=math.e, n_tokens=1, finish_reason="eos", ratio=3.0)])


@pytest.fixture
def no_matplotlib_imported():
    """sys.modules without matplotlib during the test, as it was after it."""
    def ours(name):
        return name == "matplotlib" or name.startswith("matplotlib.")
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if ours(k)]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: not found
    log = io.StringIO()
    assert ev.plot_summary(ROWS, str(tmp_path / "p.png"), progress=log) is None
    assert "matplotlib is not installed" in log.getvalue()
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("module,code,error", [
    ("__init__", "import linalign_missing_dependency\n", ImportError),
    ("pyplot", "import linalign_missing_dependency\n", ImportError),
    ("pyplot", "raise RuntimeError('no usable backend')\n", RuntimeError)])
def test_a_broken_matplotlib_raises(tmp_path, monkeypatch, no_matplotlib_imported, module,
                                    code, error):
    """An installed matplotlib that does not import is a fault: raised, not a note."""
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    files = {"__init__": "def use(backend):\n    pass\n", "pyplot": ""}
    files[module] = code
    for name, text in files.items():
        (fake / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    log = io.StringIO()
    with pytest.raises(error) as raised:
        ev.plot_summary(ROWS, str(tmp_path / "p.png"), progress=log)
    if error is ImportError:
        assert raised.value.name == "linalign_missing_dependency"
    assert log.getvalue() == ""
