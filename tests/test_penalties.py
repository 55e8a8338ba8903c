"""Penalties in the step (docs/semantics.md, "Penalties"): the torch path against
transformers' own ``RepetitionPenaltyLogitsProcessor`` (the oracle), the reference's
OpenAI rule written out, every backend against the reference on fresh random inputs
(per-row values, padding, repeated tokens, negative logits, -inf, several principles, kl
mode; greedy exactly, sampling through the shared counter-based uniforms), neutral values
taking today's path, and the errors."""
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import linalign
from linalign import reference
from linalign.arguments import Penalties
from linalign.testing import two_branch
from linalign.torch_backend import penalize
from helpers import capture_without_sync

BACKENDS = ["torch", "triton"]


def history(B, H, V, *, seed, few=None):
    """[B, H] int64 histories: ids drawn from ``few`` tokens (so they repeat), some rows
    padded at the end (-1) and one all padding; garbage below -1 counts as padding too."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, few or V, (B, H), generator=g)
    if B > 1:
        h[1, H // 2:] = -1
    if B > 2:
        h[2] = -7
    return h


def penalties(B, seed, device):
    """Per-row penalty values: repetition in [0.5, 2] (below 1 raises), presence and
    frequency of both signs."""
    g = torch.Generator().manual_seed(seed)
    rep = 0.5 + 1.5 * torch.rand(B, generator=g)
    pres = torch.randn(B, generator=g)
    freq = 0.5 * torch.randn(B, generator=g)
    return dict(repetition_penalty=rep.to(device), presence_penalty=pres.to(device),
                frequency_penalty=freq.to(device))


def with_negatives(zp, z0, seed):
    """Shift some rows to negative logits and ban a few tokens in each branch."""
    g = torch.Generator().manual_seed(seed)
    zp, z0 = zp.clone(), z0.clone()
    zp[0] -= 20.0
    z0[0] -= 20.0
    V = zp.shape[-1]
    for z in (zp, z0):
        cols = torch.randint(0, min(V, 12), (zp.shape[0], 3), generator=g)
        z.scatter_(-1, cols.to(z.device), float("-inf"))
    return zp, z0


# ------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("rep", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(rep):
    """The torch path with only the repetition penalty equals Hugging Face's processor run
    on the answer's tokens (padding removed), bit for bit, on positive and negative logits."""
    B, V, H = 4, 300, 25
    zp, _ = two_branch(B, V, seed=1)
    zp[1] = zp[1] - 8.0  # negative logits: multiplied by the penalty
    h = history(B, H, V, seed=2, few=40)
    got = penalize(zp, Penalties(h, rep, 0.0, 0.0))
    hf = RepetitionPenaltyLogitsProcessor(rep)
    for b in range(B):
        ids = h[b][h[b] >= 0]
        want = zp[b:b + 1].clone() if ids.numel() == 0 else hf(ids[None], zp[b:b + 1].clone())
        assert torch.equal(got[b], want[0]), f"row {b}"


def test_openai_rule_written_out():
    """presence and frequency: logit - (frequency * count + presence) on seen tokens only,
    after the repetition penalty; -inf stays -inf."""
    z = torch.tensor([[2.0, -1.0, 0.5, float("-inf"), 3.0]])
    h = torch.tensor([[0, 1, 1, 3, 0, 1, -1]])
    got = penalize(z, Penalties(h, 2.0, 0.25, 0.5))
    want = torch.tensor([[2.0 / 2 - (0.5 * 2 + 0.25), -1.0 * 2 - (0.5 * 3 + 0.25), 0.5,
                          float("-inf"), 3.0]])
    assert torch.equal(got, want)
    assert torch.equal(reference.penalized_row(z[0], h[0], 2.0, 0.25, 0.5), want[0])


def test_finite_logits_stay_finite_and_bad_ones_stay_bad():
    z = torch.tensor([[1e38, -1e38, float("nan"), float("inf"), 1.0]])
    h = torch.tensor([[0, 1, 2, 3, 4]])
    got = penalize(z, Penalties(h, 1e-30, -3e38, -3e38))
    assert torch.isfinite(got[0, :2]).all() and torch.isnan(got[0, 2])
    assert got[0, 3] == float("inf") and torch.isfinite(got[0, 4])
    torch.testing.assert_close(got[0], reference.penalized_row(z[0], h[0], 1e-30, -3e38, -3e38),
                               rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ every backend
def check_backends(zp, z0, device, **kw):
    want = linalign.step(zp, z0, backend="reference", **kw)
    for backend in BACKENDS:
        got = linalign.step(zp, z0, backend=backend, **kw)
        assert torch.equal(got.tokens.cpu(), want.tokens.cpu()), (backend, got.tokens.tolist(),
                                                                  want.tokens.tolist())
        assert torch.equal(got.status.cpu(), want.status.cpu()), backend
        torch.testing.assert_close(got.logprobs.cpu(), want.logprobs.cpu(), atol=2e-4,
                                   rtol=1e-4)
    return want


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(greedy, dtype, device):
    B, V, H = 5, 257, 33
    for trial in range(2):
        zp, z0 = two_branch(B, V, seed=10 + trial, temperature=0.7, device=device)
        zp, z0 = with_negatives(zp, z0, trial)
        zp, z0 = zp.to(dtype), z0.to(dtype)
        # the history holds the likeliest tokens, so the penalties move the choice
        h = zp.float().topk(8, dim=-1).indices.repeat(1, 5)[:, :H].cpu()
        h[1, 20:] = -1
        h[2] = -1
        kw = dict(ratio=torch.tensor([0.0, 1.0, 3.0, -0.5, 2.0], device=device),
                  temperature=0.7, top_p=0.9, greedy=greedy, history=h.to(device),
                  **penalties(B, trial, device))
        if not greedy:
            kw["seed"] = 123 + trial
        want = check_backends(zp, z0, device, **kw)
        plain = linalign.step(zp, z0, backend="reference",
                              **{k: v for k, v in kw.items() if k in (
                                  "ratio", "temperature", "top_p", "greedy", "seed")})
        assert not torch.equal(want.tokens, plain.tokens), "the penalties changed nothing"


def test_several_principles_and_kl_mode(device):
    B, V, H = 3, 200, 16
    zp, z0 = two_branch(B, V, seed=30, temperature=0.7, device=device)
    z2, _ = two_branch(B, V, seed=31, temperature=0.7, device=device)
    h = zp.topk(6, dim=-1).indices.repeat(1, 3)[:, :H]
    pen = penalties(B, 7, device)
    for greedy in (True, False):
        check_backends(torch.stack([zp, z2]), z0, device, ratio=[1.0, 2.0], temperature=0.7,
                       top_p=0.9, greedy=greedy, seed=None if greedy else 11, history=h,
                       **pen)
    check_backends(zp, z0, device, kl_budget=0.3, temperature=0.7, top_p=0.9, greedy=True,
                   history=h, **pen)
    check_backends(zp, z0, device, kl_budget=0.3, temperature=0.7, top_p=0.9, greedy=False,
                   seed=5, history=h, **pen)


def test_penalties_reach_every_branch():
    """The reference applies them to the principle branches and the base alike: the step on
    penalised copies (penalties off) gives the same result."""
    B, V = 4, 150
    zp, z0 = two_branch(B, V, seed=40, temperature=0.7)
    h = zp.topk(5, dim=-1).indices
    pen = Penalties(h, 1.5, 0.3, 0.2)
    kw = dict(ratio=2.0, temperature=0.7, top_p=0.9, greedy=True)
    a = linalign.step(zp, z0, backend="reference", history=h, repetition_penalty=1.5,
                      presence_penalty=0.3, frequency_penalty=0.2, **kw)
    b = linalign.step(penalize(zp, pen), penalize(z0, pen), backend="reference", **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


def test_sampling_distribution_with_penalties():
    """Draws of the torch path follow the reference distribution of the penalised logits
    (chi-square, docs/statistics.md)."""
    from helpers import chi_square

    n = 20000
    zp, z0 = two_branch(1, 300, seed=41, temperature=1.0, steepness=1.3)
    h = zp.topk(4, dim=-1).indices.repeat(1, 2)
    pen = Penalties(h, 1.4, 0.2, 0.3)
    kw = dict(ratio=1.0, temperature=1.0, top_p=0.95)
    tokens = linalign.sample(zp.expand(n, -1), z0.expand(n, -1), seed=99, backend="torch",
                             history=h.expand(n, -1), repetition_penalty=1.4,
                             presence_penalty=0.2, frequency_penalty=0.3, **kw)
    probs = reference.distribution(penalize(zp, pen), penalize(z0, pen), 1.0, 1.0, 0.95)[0]
    chi_square(tokens, probs)


# ----------------------------------------------------------------- neutral and errors
def test_neutral_penalties_take_todays_path(monkeypatch, device):
    """Neutral numbers (or no history, or an empty one) never reach the penalty code."""
    from linalign import torch_backend

    def boom(*a, **k):
        raise AssertionError("penalty code ran")

    monkeypatch.setattr(torch_backend, "penalize", boom)
    zp, z0 = two_branch(2, 100, seed=50, device=device)
    h = torch.zeros((2, 4), dtype=torch.int64, device=device)
    kw = dict(ratio=1.0, temperature=0.5, top_p=0.8, greedy=True)
    base = linalign.step(zp, z0, backend="torch", **kw)
    for extra in (dict(history=h), dict(history=h[:, :0], repetition_penalty=2.0), {}):
        out = linalign.step(zp, z0, backend="torch", **kw, **extra)
        assert torch.equal(out.tokens, base.tokens)
    args = linalign.arguments.normalize(zp, z0, kl_budget=None, max_ratio=1.0,
                                        temperature=0.5, top_p=0.8, greedy=True,
                                        generator=None, seed=None, offset=0, check=True,
                                        ratio=1.0, history=h)
    assert args.penalties is None


def test_errors(device):
    zp, z0 = two_branch(2, 100, seed=51, device=device)
    kw = dict(ratio=1.0, temperature=0.5, top_p=0.8)
    h = torch.zeros((2, 3), dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="need history="):
        linalign.step(zp, z0, repetition_penalty=1.2, **kw)
    with pytest.raises(ValueError, match=r"repetition_penalty must be finite and > 0"):
        linalign.step(zp, z0, history=h, repetition_penalty=0.0, **kw)
    with pytest.raises(ValueError, match=r"presence_penalty must be a finite number"):
        linalign.step(zp, z0, history=h, presence_penalty=float("nan"), **kw)
    with pytest.raises(ValueError, match=r"history must be an int64 tensor of shape \[B, H\]"):
        linalign.step(zp, z0, history=h[:1], repetition_penalty=1.2, **kw)
    with pytest.raises(ValueError, match=r"history must be an int64"):
        linalign.step(zp, z0, history=h.float(), repetition_penalty=1.2, **kw)
    with pytest.raises(ValueError, match=r"history has token ids >= V = 100 at rows \[1\]"):
        linalign.step(zp, z0, history=torch.tensor([[1, 2, 3], [4, 100, -1]], device=device),
                      repetition_penalty=1.2, **kw)
    # without checking, an id >= V is padding on every backend
    bad = torch.tensor([[1, 2, 3], [4, 100, -1]], device=device)
    check_backends(zp, z0, device, history=bad, repetition_penalty=1.2, presence_penalty=1.0,
                   greedy=True, check=False, **kw)


# ------------------------------------------------------------------------ the decoder
@pytest.fixture(scope="module")
def aligner(device):
    from linalign.testing import ByteTokenizer, random_llama

    return linalign.LinearAligner(random_llama("tiny", logit_std=1.5, device=device),
                                  ByteTokenizer())


PROMPTS = ["hello there, how are you today?", "a"]
PENALTIES = dict(repetition_penalty=1.5, presence_penalty=0.2, frequency_penalty=0.3)


def naive_penalized(model, ids_with, ids_without, n, **kw):
    """Greedy decoding the slow way: both branches recomputed from scratch, the reference
    step with the answer so far as the history."""
    from helpers import branch_logits

    multi = isinstance(ids_with[0], (list, tuple))
    a = [list(x) for x in ids_with] if multi else [list(ids_with)]
    b, toks = list(ids_without), []
    for _ in range(n):
        h = torch.tensor([toks], dtype=torch.int64).reshape(1, -1)
        zs = torch.stack([branch_logits(model, x) for x in a])
        out = reference.step(zs if multi else zs[0], branch_logits(model, b), history=h,
                             greedy=True, **kw)
        t = int(out.tokens[0])
        toks.append(t)
        for x in a:
            x.append(t)
        b.append(t)
    return toks


@pytest.mark.parametrize("fast", [False, True])
def test_decoder_penalties_match_a_naive_decoder(aligner, fast):
    kw = dict(ratio=1.0, temperature=0.5, top_p=0.8, **PENALTIES)
    got = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=20, fast=fast, **kw)
    plain = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=20, fast=fast, ratio=1.0)
    assert got.token_ids != plain.token_ids, "the penalties changed nothing"
    ids_with, ids_without = aligner.branches(PROMPTS, "Be kind.")
    for i in range(len(PROMPTS)):
        want = naive_penalized(aligner.model, ids_with[i], ids_without[i], 20, **kw)
        assert got.token_ids[i] == want[:len(got.token_ids[i])], i


def test_decoder_penalties_with_two_principles_and_kl_mode(aligner):
    """Every principle branch and the base get the penalties (the naive decoder's
    reference step on all K + 1 branches), and kl mode derives its ratio after them."""
    prompt = PROMPTS[:1]
    two = ["Be kind.", "Be brief."]
    kw = dict(temperature=0.5, top_p=0.8, **PENALTIES)
    got = aligner.generate(prompt, [two], max_new_tokens=16, ratio=[[1.0, 2.0]], **kw)
    withs, without = aligner.branches(prompt, [two])
    want = naive_penalized(aligner.model, [w[0] for w in withs], without[0], 16,
                           ratio=[1.0, 2.0], **kw)
    assert got.token_ids[0] == want[:len(got.token_ids[0])]
    got = aligner.generate(prompt, "Be kind.", max_new_tokens=16, kl_budget=0.5, **kw)
    ids_with, ids_without = aligner.branches(prompt, "Be kind.")
    want = naive_penalized(aligner.model, ids_with[0], ids_without[0], 16, kl_budget=0.5,
                           **kw)
    assert got.token_ids[0] == want[:len(got.token_ids[0])]


def test_decoder_per_row_penalties_and_plain_decoding(aligner):
    """One value per prompt; a neutral row decodes as without penalties (alone or not)."""
    kw = dict(ratio=1.0, max_new_tokens=16)
    mixed = aligner.generate(PROMPTS, "Be kind.", repetition_penalty=[1.0, 2.0], **kw)
    none = aligner.generate(PROMPTS, "Be kind.", **kw)
    alone = aligner.generate(PROMPTS[1:], "Be kind.", repetition_penalty=2.0, **kw)
    assert mixed.token_ids[0] == none.token_ids[0]
    assert mixed.token_ids[1] == alone.token_ids[0]
    p = aligner.generate_plain(PROMPTS, None, max_new_tokens=16, frequency_penalty=1.0)
    assert p.token_ids != aligner.generate_plain(PROMPTS, None, max_new_tokens=16).token_ids


def test_neutral_values_take_todays_path(aligner, monkeypatch):
    """Neutral penalties pass no history to the step (exactly today's call)."""
    seen = []

    def spy(zp, z0, **kw):
        seen.append(sorted(kw))
        return linalign.step(zp, z0, **kw)

    monkeypatch.setattr(aligner, "step", spy)
    aligner.generate(PROMPTS, "Be kind.", max_new_tokens=3, repetition_penalty=1.0)
    assert seen and all("history" not in k for k in seen)
    seen.clear()
    aligner.generate(PROMPTS, "Be kind.", max_new_tokens=3, repetition_penalty=1.1)
    assert seen and all("history" in k for k in seen)


# ---------------------------------------------------------------- no-repeat n-grams
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_bans_match_transformers(n):
    """The bans on a history equal Hugging Face's NoRepeatNGramLogitsProcessor run on the
    answer's tokens alone."""
    from transformers import NoRepeatNGramLogitsProcessor

    from linalign.decoding import ban_repeated_ngrams

    V, N = 12, 30
    g = torch.Generator().manual_seed(n)
    for t in (0, 1, 2, 5, 17, 29):
        hist = torch.full((3, N), -1, dtype=torch.int64)
        hist[:, :t] = torch.randint(0, 4, (3, t), generator=g)  # few tokens: many repeats
        z = torch.randn(3, V, generator=g)
        zp, z0 = ban_repeated_ngrams(z, z + 1, hist, torch.full((3,), t), n)
        for b in range(3):
            want = NoRepeatNGramLogitsProcessor(n)(hist[b:b + 1, :t], z[b:b + 1].clone())
            assert torch.equal(zp[b], want[0]), (n, t, b)
            assert torch.equal(z0[b] == float("-inf"), want[0] == float("-inf"))


def test_decoder_never_repeats_an_ngram(aligner):
    """The tiny model loops without it (a repeated bigram); with it no bigram repeats."""
    def bigrams(ids):
        return [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]

    loose = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=30)
    assert any(len(set(bigrams(t))) < len(bigrams(t)) for t in loose.token_ids)
    for fast in (False, True):
        got = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=30, fast=fast,
                               no_repeat_ngram_size=2)
        for t in got.token_ids:
            assert len(set(bigrams(t))) == len(bigrams(t)), t


def test_option_errors(aligner):
    with pytest.raises(ValueError, match="repetition_penalty must be finite and > 0"):
        aligner.generate("a", "b", repetition_penalty=-1.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
        aligner.generate("a", "b", no_repeat_ngram_size=-1)
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        aligner.generate("a", "b", stop=[1])
    with pytest.raises(ValueError, match="stop has an empty string"):
        aligner.generate("a", "b", stop=[""])


# ----------------------------------------------------------------------- linalign.hf
def _generated(seq, L, eos):
    rows = []
    for r in seq[:, L:].tolist():
        rows.append(r[:next((i + 1 for i, x in enumerate(r) if x == eos), len(r))])
    return rows


def test_hf_generate_applies_the_penalties_once(aligner):
    """generate(repetition_penalty=..., no_repeat_ngram_size=...) with custom_generate:
    applied once, to both branches, on the answer (the aligner's tokens), not by
    generate's own processors on the principle branch (those would give other tokens)."""
    from linalign import hf
    from linalign.testing import ByteTokenizer

    model = aligner.model
    batch = hf.prepare(ByteTokenizer(), PROMPTS, "Be kind.", device=model.device)
    kw = dict(repetition_penalty=1.5, no_repeat_ngram_size=2)
    seq = model.generate(**batch, custom_generate=hf.generate, do_sample=False,
                         max_new_tokens=12, presence_penalty=0.2, frequency_penalty=0.3,
                         ratio=1.0, **kw)
    got = _generated(seq, batch["input_ids"].shape[1], ByteTokenizer.eos_token_id)
    ids_with, ids_without = aligner.branches(PROMPTS, "Be kind.")
    want = aligner.generate_ids(ids_with, ids_without, max_new_tokens=12, ratio=1.0,
                                presence_penalty=0.2, frequency_penalty=0.3, **kw)
    assert got == want.token_ids
    out = hf.generate(model, **batch, do_sample=False, max_new_tokens=12, ratio=1.0,
                      return_dict_in_generate=True, output_scores=True, **kw)
    L = batch["input_ids"].shape[1]
    for t, s in enumerate(out.scores):  # the scores are the penalised aligned scores
        live = (out.sequences[:, L:L + t] != ByteTokenizer.eos_token_id).all(1)
        assert torch.equal(s.argmax(-1)[live], out.sequences[live, L + t])


def test_hf_processor_penalties(aligner):
    """The processor takes the penalties itself and applies them to both branches from the
    tokens generate appended: the aligner's greedy tokens."""
    from linalign import hf
    from linalign.testing import ByteTokenizer

    model = aligner.model
    batch = hf.prepare(ByteTokenizer(), PROMPTS, "Be kind.", device=model.device)
    without = (batch.pop("ids_without"), batch.pop("attention_mask_without"))
    proc = hf.LinearAlignmentLogitsProcessor(model, *without, ratio=1.0, **PENALTIES)
    seq = model.generate(**batch, logits_processor=[proc], do_sample=False, max_new_tokens=12)
    got = _generated(seq, batch["input_ids"].shape[1], ByteTokenizer.eos_token_id)
    ids_with, ids_without = aligner.branches(PROMPTS, "Be kind.")
    want = aligner.generate_ids(ids_with, ids_without, max_new_tokens=12, ratio=1.0,
                                **PENALTIES)
    assert got == want.token_ids


# ------------------------------------------------------------------- graph safety
def penalized_step(zp, z0, h, rep, pres, freq, seeds, offset):
    out = linalign.step(zp, z0, ratio=1.0, temperature=0.5, top_p=0.8, seed=seeds,
                        offset=offset, history=h, repetition_penalty=rep,
                        presence_penalty=pres, frequency_penalty=freq, backend="triton",
                        check=False)
    return out.tokens, out.logprobs, out.status


def graph_inputs(device, B=3, V=700, H=40):
    zp, z0 = two_branch(B, V, seed=60, temperature=0.5, device=device)
    h = zp.topk(10, dim=-1).indices.repeat(1, 4)[:, :H].contiguous()
    h[0, 25:] = -1
    pen = penalties(B, 8, device)
    return [zp, z0, h, *pen.values(), torch.tensor([4, 5, 6], device=device),
            torch.zeros(B, dtype=torch.int64, device=device)]


def test_penalized_step_compiles_fullgraph(device):
    """Under torch.compile(fullgraph=True) the penalties trace (no graph break) and give the
    eager tokens, without recompiling as the history fills."""
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(penalized_step, fullgraph=True,
                       backend="inductor" if device.type == "cuda" else "aot_eager")
    args = graph_inputs(device)
    for i in range(3):
        args[2][:, 30 + i] = i  # the history grows in place
        args[-1].fill_(i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = fn(*args)
        want = penalized_step(*args)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalized_step_captures_without_host_sync():
    """No host synchronisation, and a CUDA graph whose replays on new logits and a longer
    history equal eager calls."""
    dev = torch.device("cuda")
    args = graph_inputs(dev, B=64, V=32000, H=256)
    run = lambda: penalized_step(*args)  # noqa: E731
    for _ in range(3):
        run()
    g, static = capture_without_sync(run)
    for i in range(3):
        new_p, new_0 = two_branch(64, 32000, seed=70 + i, temperature=0.5, device=dev)
        args[0].copy_(new_p)
        args[1].copy_(new_0)
        args[2][:, 100 + i] = 7 + i
        args[-1].fill_(i + 1)
        g.replay()
        want = run()
        for a, b in zip(static, want):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------ the commands
def test_commands_take_the_options(tmp_path, capsys):
    """generate and run take the flags, decode what LinearAligner decodes with them, and
    run's result lines record them."""
    import argparse
    import json

    from linalign import cli, runner
    from linalign.cli_args import TINY_MODEL, load_aligner

    aligner = load_aligner(argparse.Namespace(model=TINY_MODEL, system=None, device="cpu",
                                              dtype="auto", threads=None))
    free = aligner.generate("Tell me about the sea.", "Be kind.", max_new_tokens=12).text
    stop = free[4:6]
    opts = dict(repetition_penalty=1.5, presence_penalty=0.25, frequency_penalty=0.5,
                no_repeat_ngram_size=3, stop=(stop,))
    want = aligner.generate("Tell me about the sea.", "Be kind.", max_new_tokens=12, **opts)
    flags = ["--model", TINY_MODEL, "--device", "cpu", "--threads", "1",
             "--max-new-tokens", "12", "--repetition-penalty", "1.5", "--presence-penalty",
             "0.25", "--frequency-penalty", "0.5", "--no-repeat-ngram-size", "3",
             "--stop", stop]
    assert cli.main(["generate", "Tell me about the sea.", "--principle", "Be kind.",
                     *flags]) == 0
    assert capsys.readouterr().out == want.text.strip() + "\n"
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "Tell me about the sea.",
                               "principle": "Be kind."}) + "\n")
    assert runner.main(["--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                        "--no-progress", "--token-ids", *flags]) == 0
    out = json.loads((tmp_path / "out.jsonl").read_text())
    assert out["text"] == want.text and out["token_ids"] == want.token_ids[0]
    assert out["finish_reason"] == want.finish_reasons[0] == "stop"
    capsys.readouterr()
    s = out["settings"]
    assert (s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"],
            s["no_repeat_ngram_size"], s["stop"]) == (1.5, 0.25, 0.5, 3, [stop])
    for bad in (["--repetition-penalty", "0"], ["--no-repeat-ngram-size", "-1"],
                ["--stop", ""]):
        assert cli.main(["generate", "Q", "--principle", "P", *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_run_lines_carry_their_own_penalties(tmp_path):
    """A line's penalties and no_repeat_ngram_size override the command's, per row, like
    its ratio: each row is what LinearAligner gives that prompt alone with them."""
    import argparse
    import json

    from linalign import runner
    from linalign.cli_args import TINY_MODEL, load_aligner

    aligner = load_aligner(argparse.Namespace(model=TINY_MODEL, system=None, device="cpu",
                                              dtype="auto", threads=None))
    lines = [{"id": 1, "prompt": "Tell me about the sea.", "principle": "Be kind.",
              "repetition_penalty": 2.0, "frequency_penalty": 0.5},
             {"id": 2, "prompt": "hello there", "principle": "Be kind."},
             {"id": 3, "prompt": "a", "principle": "Be kind.", "no_repeat_ngram_size": 2,
              "presence_penalty": -0.5}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert runner.main(["--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                        "--model", TINY_MODEL, "--device", "cpu", "--threads", "1",
                        "--no-progress", "--token-ids", "--max-new-tokens", "10",
                        "--repetition-penalty", "1.2"]) == 0
    out = {o["id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text()
                                   .splitlines())}
    for line in lines:
        opts = dict(repetition_penalty=1.2, presence_penalty=0.0, frequency_penalty=0.0,
                    no_repeat_ngram_size=0)
        opts.update({k: v for k, v in line.items() if k in opts})
        want = aligner.generate(line["prompt"], line["principle"], max_new_tokens=10, **opts)
        o = out[line["id"]]
        assert o["token_ids"] == want.token_ids[0], line["id"]
        assert {k: o["settings"][k] for k in opts} == opts
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "prompt": "a", "principle": "b",
                               "repetition_penalty": 0}) + "\n")
    assert runner.main(["--input", str(bad), "--output", str(tmp_path / "o2.jsonl"),
                        "--model", TINY_MODEL, "--device", "cpu", "--no-progress",
                        "--strict"]) == 2


COMPILE = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linalign.kernels import INTERPRETED, penalties as kp

assert not INTERPRETED
types = dict(src_ptr="*" + sys.argv[1], dst_ptr="*fp32", hist_ptr="*i64", rep_ptr="*fp32",
             pres_ptr="*fp32", freq_ptr="*fp32", rep_v="fp32", pres_v="fp32", freq_v="fp32",
             stride_sk="i64", stride_sb="i64", stride_dk="i64", stride_db="i64",
             stride_h="i64")
for per_row in (False, True):
    const = dict(REP_PER_ROW=per_row, PRES_PER_ROW=per_row, FREQ_PER_ROW=not per_row,
                 BLOCK_H=kp.BLOCK_H)
    sig = {a: "constexpr" if a in const else types.get(a, "i32")
           for a in kp.la_penalty_kernel.arg_names}
    k = triton.compile(ASTSource(fn=kp.la_penalty_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, **kp.COMPILE_OPTIONS))
    assert len(k.asm["cubin"]) > 0
    ptx = k.asm["ptx"]
    assert not re.search(r"\bfma\.rn\.f32\b", ptx), "a fused multiply-add in the penalty"
    assert re.search(r"\bdiv\.rn\.f32\b", ptx), "the division is not IEEE-rounded"
print("ok")
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_penalty_kernel_compiles_for_sm90_without_fused_multiply_adds(dtype):
    """The interpreter accepts what the compiler may reject: the kernel compiles to a cubin
    for sm_90 (the Triton wheel's ptxas), and its PTX has no fused multiply-add and an
    IEEE-rounded division, so the GPU rounds as the reference does."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE, dtype], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
