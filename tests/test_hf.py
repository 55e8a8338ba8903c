"""linalign.hf: Linear Alignment inside Hugging Face ``generate``. On the tiny random Llama
(fast): the logits processor and the custom_generate callable give LinearAligner's greedy
tokens (prompts of different lengths, per-row parameters), the scores are the reference's
masked aligned scores, sampling stays on the nucleus and follows its seed, stopping and
streaming, and misuse fails clearly. On the embedded SmolLM2: the README example, both ways,
against LinearAligner.generate."""
import pathlib
import re

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import linalign
from linalign import hf, reference
from linalign.options import DEFAULT_RATIO
from linalign.testing import ByteTokenizer, random_llama, two_branch

from helpers import assert_same_or_near_tie, branch_logits

PROMPTS = ["hello there, how are you today?", "a", "Tell me about the sea.", "xyz 123 \u00e9"]
PRINCIPLE = "Be kind."
EOS, PAD = ByteTokenizer.eos_token_id, ByteTokenizer.pad_token_id
#: Per-row Linear Alignment parameters (ratio 0 is plain top-p of the principle branch).
ROWS = dict(ratio=[0.0, 1.0, 3.0, -0.5], temperature=[0.5, 1.0, 0.5, 0.7],
            top_p=[0.8, 0.9, 1.0, 0.5])
N = 10


@pytest.fixture(scope="module")
def model(device):
    return random_llama("tiny", logit_std=1.5, device=device)


@pytest.fixture(scope="module")
def aligner(model):
    return linalign.LinearAligner(model, ByteTokenizer())


@pytest.fixture(scope="module")
def batch(model):
    return hf.prepare(ByteTokenizer(), PROMPTS, PRINCIPLE, device=model.device)


def _new(seq, prompt_len, eos=(EOS,)):
    """Generated ids per row, up to and including the first end of sequence."""
    rows = []
    for r in seq[:, prompt_len:].tolist():
        rows.append(r[:next((i + 1 for i, x in enumerate(r) if x in eos), len(r))])
    return rows


def _processor_inputs(batch):
    b = dict(batch)
    return b, (b.pop("ids_without"), b.pop("attention_mask_without"))


def _assert_aligner_tokens(model, aligner, got, **params):
    """got: generated ids per row -> LinearAligner's greedy tokens, or a near-tie flip."""
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    want = aligner.generate_ids(ids_with, ids_without, max_new_tokens=N, **params).token_ids
    for i in range(len(PROMPTS)):
        row = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items()}
        assert_same_or_near_tie(model, ids_with[i], ids_without[i], got[i], want[i], **row)


# ----------------------------------------------------------------------------- prepare
def test_prepare_builds_the_aligners_branches(model, aligner, batch):
    for system in (None, "Base."):
        b = hf.prepare(ByteTokenizer(), PROMPTS, PRINCIPLE, system=system)
        ids_with, ids_without = linalign.LinearAligner(model, ByteTokenizer(),
                                                       system=system).branches(PROMPTS,
                                                                               PRINCIPLE)
        for ids, mask, rows in ((b["input_ids"], b["attention_mask"], ids_with),
                                (b["ids_without"], b["attention_mask_without"], ids_without)):
            assert ids.shape == (4, max(map(len, rows))) and mask.shape == ids.shape
            for i, r in enumerate(rows):
                assert mask[i].tolist() == [0] * (ids.shape[1] - len(r)) + [1] * len(r)
                assert ids[i, mask[i].bool()].tolist() == r
                assert (ids[i, ~mask[i].bool()] == PAD).all()
    with pytest.raises((ValueError, TypeError), match="one principle per prompt|principle"):
        hf.prepare(ByteTokenizer(), PROMPTS[:1], [["Be kind.", "Be brief."]])


# ----------------------------------------------------------------------------- scores
def _check_scores(s, zp, z0, r, T, p, *, atol=1e-6):
    """s: [B, V] from masked_scores -> softmax(s) is the reference's exact distribution and
    argmax s the reference's greedy token; s is -inf exactly off the distribution's support."""
    want = reference.distribution(zp, z0, r, T, p)
    got = torch.softmax(s.double(), dim=-1)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert torch.equal(s == float("-inf"), want == 0)
    greedy = reference.step(zp, z0, ratio=r, temperature=T, top_p=p, greedy=True).tokens
    assert torch.equal(s.argmax(-1), greedy)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_masked_scores_are_the_reference(backend):
    """Per-row parameters; a row with banned tokens; a row whose nucleus is all banned (falls
    back to r = 0); ties at the nucleus boundary; and a T = 0 row (one-hot on its token)."""
    zp, z0 = two_branch(6, 1000, seed=3, temperature=0.5)
    z0[1, zp[1].topk(3).indices] = float("-inf")            # banned in the base branch
    z0[2, zp[2].topk(50).indices] = float("-inf")           # the whole nucleus banned
    zp[3, zp[3].topk(6).indices] = zp[3].max()              # a six-way tie on top
    r = torch.tensor([3.0, 1.0, 5.0, -0.5, 0.0, 2.0])
    T = torch.tensor([0.5, 0.7, 0.5, 1.0, 0.5, 0.0])
    p = torch.tensor([0.8, 0.95, 0.5, 0.3, 1.0, 0.8])
    s, out = hf.masked_scores(zp, z0, ratio=r, temperature=T, top_p=p, backend=backend)
    assert s.shape == zp.shape and s.dtype == torch.float32
    assert int(out.status[2]) & int(linalign.Status.FALLBACK)
    _check_scores(s[:5], zp[:5], z0[:5], r[:5], T[:5], p[:5])
    row = torch.full((1000,), float("-inf"))
    row[int(zp[5].argmax())] = 0.0
    assert torch.equal(s[5], row)
    # Python numbers, the defaults (linalign.SamplingParams)
    s, _ = hf.masked_scores(zp[:5], z0[:5], backend=backend)
    d = linalign.SamplingParams()
    _check_scores(s, zp[:5], z0[:5], DEFAULT_RATIO, d.temperature, d.top_p)


def test_masked_scores_in_kl_mode():
    """kl_budget= goes to the step unchanged; the scores use the ratio the step reports."""
    zp, z0 = two_branch(4, 1000, seed=5, temperature=0.5)
    s, out = hf.masked_scores(zp, z0, kl_budget=0.05, max_ratio=6.0)
    assert out.ratio.shape == (4,)
    _check_scores(s, zp, z0, out.ratio, 0.5, 0.8, atol=1e-5)


def test_kl_mode_through_generate(model, batch):
    """kl_budget= (one per prompt) reaches the step both ways; the tokens agree."""
    kw = dict(do_sample=False, max_new_tokens=6)
    budget = [0.05, 0.1, 0.2, 0.4]
    seq = model.generate(**batch, custom_generate=hf.generate, kl_budget=budget,
                         max_ratio=6.0, **kw)
    b, without = _processor_inputs(batch)
    proc = hf.LinearAlignmentLogitsProcessor(model, *without, kl_budget=budget, max_ratio=6.0)
    assert torch.equal(model.generate(**b, logits_processor=[proc], **kw), seq)


# ----------------------------------------------------------------------------- processor
def test_processor_greedy_matches_the_aligner(model, aligner, batch):
    """Left-padded prompts of different lengths, per-row parameters: model.generate with the
    processor gives LinearAligner's greedy tokens; called again with the same prompts it
    starts over and gives them again."""
    b, without = _processor_inputs(batch)
    proc = hf.LinearAlignmentLogitsProcessor(model, *without, **ROWS)
    seq = model.generate(**b, logits_processor=[proc], do_sample=False, max_new_tokens=N)
    got = _new(seq, b["input_ids"].shape[1])
    _assert_aligner_tokens(model, aligner, got, **ROWS)
    again = model.generate(**b, logits_processor=[proc], do_sample=False, max_new_tokens=N)
    assert torch.equal(again, seq)


def test_processor_scores_are_the_reference_on_a_step(model, aligner, batch):
    """The processor's output for given principle-branch scores is the reference's masked
    aligned scores against the without-branch logits recomputed from scratch (no padding,
    no cache), on the prefill call and on the next one."""
    b, without = _processor_inputs(batch)
    proc = hf.LinearAlignmentLogitsProcessor(model, *without, **ROWS)
    _, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    r, T, p = (torch.tensor(ROWS[k]) for k in ("ratio", "temperature", "top_p"))
    ids = b["input_ids"]
    tok = torch.tensor([65, 66, 67, 68], device=ids.device)
    for step, x in enumerate((ids, torch.cat([ids, tok[:, None]], dim=1))):
        zp = two_branch(4, 320, seed=step, temperature=0.5)[0].to(ids.device)
        s = proc(x, zp)
        z0 = torch.cat([branch_logits(model, w + tok[i:i + 1].tolist() * step)
                        for i, w in enumerate(ids_without)])
        _check_scores(s.cpu(), zp.cpu(), z0.cpu(), r, T, p, atol=1e-4)


def test_processor_sampling_stays_on_the_nucleus(model, batch):
    """do_sample=True with no other warper samples from softmax of the processor's scores
    (which generate returns as its scores): every drawn token has a finite score; two
    sequences per prompt (num_return_sequences) expand the without-branch."""
    b, without = _processor_inputs(batch)
    proc = hf.LinearAlignmentLogitsProcessor(model, *without, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    out = model.generate(**b, logits_processor=[proc], do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=0, max_new_tokens=8, num_return_sequences=2,
                         return_dict_in_generate=True, output_scores=True)
    L = b["input_ids"].shape[1]
    assert out.sequences.shape[0] == 8
    for t, s in enumerate(out.scores):
        tok = out.sequences[:, L + t]
        live = (out.sequences[:, L:L + t] != EOS).all(1)
        assert torch.isfinite(s[live].gather(1, tok[live, None])).all(), f"step {t}"
        assert (s == float("-inf")).any(1).all()  # the nucleus is a strict subset


def test_processor_misuse_fails_clearly(model, batch):
    b, without = _processor_inputs(batch)
    gen = dict(do_sample=False, max_new_tokens=2)
    proc = hf.LinearAlignmentLogitsProcessor(model, without[0][:3], without[1][:3])
    with pytest.raises(ValueError, match="generate runs 4 rows of the principle branch but "
                                         "ids_without has 3 rows"):
        model.generate(**b, logits_processor=[proc], **gen)
    proc = hf.LinearAlignmentLogitsProcessor(model, *without)
    model.generate(**b, logits_processor=[proc], **gen)
    other = hf.prepare(ByteTokenizer(), PROMPTS[:2], "Be brief.", device=model.device)
    kw = dict(input_ids=other["input_ids"], attention_mask=other["attention_mask"])
    with pytest.raises(ValueError, match="reset"):
        model.generate(**kw, logits_processor=[proc], **gen)
    proc.reset(ids_without=other["ids_without"],
               attention_mask_without=other["attention_mask_without"])
    model.generate(**kw, logits_processor=[proc], **gen)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**b, logits_processor=[hf.LinearAlignmentLogitsProcessor(
            model, *without)], num_beams=2, max_new_tokens=2)
    with pytest.raises(TypeError, match="generate picks the token"):
        hf.LinearAlignmentLogitsProcessor(model, *without, seed=3)
    with pytest.raises(ValueError, match="ratio has 3 values"):
        model.generate(**b, logits_processor=[hf.LinearAlignmentLogitsProcessor(
            model, *without, ratio=[1.0, 2.0, 3.0])], **gen)


# ----------------------------------------------------------------------------- generate
def test_custom_generate_greedy_matches_the_aligner(model, aligner, batch):
    """model.generate(custom_generate=hf.generate) and hf.generate(model, ...) give
    LinearAligner's greedy tokens; output_scores are the aligned scores (argmax = token)."""
    seq = model.generate(**batch, custom_generate=hf.generate, do_sample=False,
                         max_new_tokens=N, **ROWS)
    L = batch["input_ids"].shape[1]
    _assert_aligner_tokens(model, aligner, _new(seq, L), **ROWS)
    out = hf.generate(model, **batch, do_sample=False, max_new_tokens=N,
                      return_dict_in_generate=True, output_scores=True, output_logits=True,
                      **ROWS)
    assert torch.equal(out.sequences, seq)
    assert len(out.scores) == len(out.logits) == seq.shape[1] - L
    for t, (s, z) in enumerate(zip(out.scores, out.logits)):
        assert s.shape == z.shape == (4, 320)
        live = (seq[:, L:L + t] != EOS).all(1)
        assert torch.equal(s.argmax(-1)[live], seq[live, L + t])


def test_custom_generate_sampling_follows_the_seed(model, batch):
    kw = dict(custom_generate=hf.generate, do_sample=True, temperature=1.0, top_p=0.95,
              max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    a = model.generate(**batch, seed=5, **kw)
    assert torch.equal(model.generate(**batch, seed=5, **kw).sequences, a.sequences)
    assert not torch.equal(model.generate(**batch, seed=6, **kw).sequences, a.sequences)
    L = batch["input_ids"].shape[1]
    for t, s in enumerate(a.scores):
        assert torch.isfinite(s.gather(1, a.sequences[:, L + t, None])).all()
    two = model.generate(**batch, num_return_sequences=2, **kw)  # global generator, 8 rows
    assert two.sequences.shape[0] == 8


class _StopRow(StoppingCriteria):
    """Ends one row once it has ``n`` new tokens."""

    def __init__(self, row, prompt_len, n):
        self.row, self.at = row, prompt_len + n

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.row] = input_ids.shape[1] >= self.at
        return done


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_custom_generate_stops_and_streams(model, batch):
    """A stopping criterion ends one row (pad afterwards, the others unchanged); an eos id
    from the call ends rows at it; a streamer given to hf.generate sees the prompt, every
    step's tokens and one end()."""
    L = batch["input_ids"].shape[1]
    kw = dict(do_sample=False, max_new_tokens=N)
    free = hf.generate(model, **batch, **kw)
    rec = Recorder()
    seq = hf.generate(model, **batch, stopping_criteria=StoppingCriteriaList(
        [_StopRow(0, L, 3)]), streamer=rec, **kw)
    assert torch.equal(seq[0, :L + 3], free[0, :L + 3]) and (seq[0, L + 3:] == PAD).all()
    assert torch.equal(seq[1:], free[1:])
    assert rec.ended == 1 and torch.equal(rec.puts[0], batch["input_ids"].cpu())
    assert torch.equal(torch.stack(rec.puts[1:], 1), seq[:, L:].cpu())
    stop = int(free[2, L + 4])
    ended = hf.generate(model, **batch, eos_token_id=stop, **kw)
    for i, row in enumerate(free[:, L:].tolist()):
        n = row.index(stop) + 1 if stop in row else len(row)
        assert ended[i, L:L + n].tolist() == row[:n] and (ended[i, L + n:] == PAD).all()


def test_custom_generate_misuse_fails_clearly(model, batch):
    gen = dict(custom_generate=hf.generate, max_new_tokens=2)
    b, without = _processor_inputs(batch)
    with pytest.raises(ValueError, match="ids_without is missing"):
        model.generate(**b, **gen)
    with pytest.raises(ValueError, match="ids_without has 3 rows"):
        model.generate(**b, ids_without=without[0][:3], attention_mask_without=without[1][:3],
                       **gen)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**batch, num_beams=2, **gen)
    with pytest.raises(ValueError, match="top_k=50"):
        model.generate(**batch, do_sample=True, top_k=50, **gen)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        model.generate(**batch, custom_generate=hf.generate, max_new_tokens=600)
    with pytest.raises(ValueError, match="attention mask has shape"):
        hf.generate(model, **b, ids_without=without[0], attention_mask_without=without[1][:, 1:],
                    max_new_tokens=2)
    with pytest.warns(UserWarning, match="ignores the sampling warpers \\['MinPLogitsWarper'\\]"):
        model.generate(**batch, do_sample=True, min_p=0.1, **gen)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.embedded_model
def test_readme_example_matches_the_aligner():
    """The README's Hugging Face example, as written, on the embedded SmolLM2: custom_generate
    and the processor give LinearAligner.generate's greedy tokens for the same principle."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "custom_generate=" in c]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, tokenizer = scope["model"], scope["tokenizer"]
    prompts, principle, n = scope["prompts"], scope["principle"], scope["n"]
    aligner = linalign.LinearAligner(model, tokenizer)
    want = aligner.generate(prompts, principle, ratio=3.0,
                            max_new_tokens=scope["max_new_tokens"])
    ids_with, ids_without = aligner.branches(prompts, principle)
    for seq in (scope["aligned"], scope["processed"]):
        got = _new(seq, n, eos=(2,))
        for i in range(len(prompts)):
            assert_same_or_near_tie(model, ids_with[i], ids_without[i], got[i],
                                    want.token_ids[i], ratio=3.0, temperature=0.5, top_p=0.8)
