"""The decoding loop on a tiny random Llama built in code (fast): caches, padding, positions,
stopping, seeds, streaming and errors, against a slow decoder that recomputes both branches
from scratch every step. The embedded model runs end to end in test_models.py."""
import pytest
import torch

import linalign
from linalign.testing import ByteTokenizer, random_llama

from helpers import assert_same_or_near_tie, naive_decode

PROMPTS = ["hello there, how are you today?", "a", "Tell me about the sea.", "xyz 123 \u00e9"]
PRINCIPLE = "Be kind."
EOS = ByteTokenizer.eos_token_id


@pytest.fixture(scope="module")
def model(device):
    # On a GPU the loop runs there (the fused kernel, a sync every few steps); else on CPU.
    return random_llama("tiny", logit_std=1.5, device=device)


@pytest.fixture
def aligner(model):
    return linalign.LinearAligner(model, ByteTokenizer())


def test_prompt_texts_without_a_chat_template(aligner, model):
    assert aligner.prompt_texts("Q?", "Be kind.") == "Be kind.\n\nQ?"
    assert aligner.prompt_texts("Q?", None) == "Q?"
    system = linalign.LinearAligner(model, ByteTokenizer(), system="Base.")
    assert system.prompt_texts("Q?", "Be kind.") == "Base.\n\nBe kind.\n\nQ?"
    assert system.prompt_texts("Q?", None) == "Base.\n\nQ?"
    ids_with, ids_without = aligner.branches(["Q?"], "Be kind.")
    assert ids_with == [[256] + list(b"Be kind.\n\nQ?")]
    assert ids_without == [[256] + list(b"Q?")]


@pytest.mark.parametrize("mode", ["stacked", "two-caches"])
def test_matches_a_decoder_without_cache_or_padding(aligner, model, mode):
    """Per-row ratios, temperatures and top-p in one batch of prompts of different lengths:
    every row's greedy tokens and logprobs equal the slow decoder's."""
    ratio, T, p = [0.0, 1.0, 3.0, -0.5], [0.5, 1.0, 0.5, 0.7], [0.8, 0.9, 1.0, 0.5]
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    out = aligner.generate_ids(ids_with, ids_without, ratio=ratio, temperature=T, top_p=p,
                               max_new_tokens=10, mode=mode, return_logprobs=True)
    for i in range(len(PROMPTS)):
        want, want_lp = naive_decode(model, ids_with[i], ids_without[i], 10, ratio=ratio[i],
                                     temperature=T[i], top_p=p[i], eos=(EOS,))
        assert_same_or_near_tie(model, ids_with[i], ids_without[i], out.token_ids[i], want,
                                ratio=ratio[i], temperature=T[i], top_p=p[i])
        if out.token_ids[i] == want:
            torch.testing.assert_close(torch.tensor(out.logprobs[i]), torch.tensor(want_lp),
                                       atol=1e-4, rtol=1e-4)


def test_stacked_and_two_caches_agree(aligner):
    kw = dict(max_new_tokens=16, ratio=3.0, temperature=0.5, top_p=0.8)
    a = aligner.generate(PROMPTS, PRINCIPLE, mode="stacked", **kw)
    b = aligner.generate(PROMPTS, PRINCIPLE, mode="two-caches", **kw)
    assert a.token_ids == b.token_ids
    assert a.texts == b.texts


def test_alone_equals_in_a_batch(aligner):
    batch = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=16)
    for i, prompt in enumerate(PROMPTS):
        alone = aligner.generate(prompt, PRINCIPLE, max_new_tokens=16)
        assert alone.token_ids == [batch.token_ids[i]], f"prompt {i}"


def test_text_and_token_apis_agree(aligner):
    text = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=12)
    ids = aligner.generate_ids(*aligner.branches(PROMPTS, PRINCIPLE), max_new_tokens=12)
    assert text.token_ids == ids.token_ids and text.texts == ids.texts
    as_tensors = aligner.generate_ids(*(torch.tensor(r[1]) for r in
                                        [aligner.branches(PROMPTS[0], PRINCIPLE)] * 2),
                                      max_new_tokens=12)
    assert len(as_tensors.token_ids) == 1


def test_per_prompt_principles_and_ratios(aligner):
    principles = ["Be kind.", "Answer in French.", "Be brief.", "Shout."]
    ratios = [3.0, 0.0, -1.0, 6.0]
    batch = aligner.generate(PROMPTS, principles, ratio=ratios, max_new_tokens=12)
    for i in range(len(PROMPTS)):
        alone = aligner.generate(PROMPTS[i], principles[i], ratio=ratios[i], max_new_tokens=12)
        assert alone.token_ids[0] == batch.token_ids[i]
    # ratio 0 is plain decoding of the principle branch
    plain = aligner.generate_plain(PROMPTS[1], principles[1], max_new_tokens=12)
    assert plain.token_ids[0] == batch.token_ids[1]


def test_rows_stop_independently(aligner):
    """Make a token that row 0 produces at step 3 the end of sequence: row 0 stops there
    (eos included), the other rows run on unchanged until their own first eos or the
    length limit, and finished rows leave the batch without changing the others."""
    free = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=14)
    stop = free.token_ids[0][3]
    assert stop not in free.token_ids[0][:3]
    aligner.eos_ids = [stop]
    out = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=14)
    stopped = 0
    for i, row in enumerate(free.token_ids):
        n = row.index(stop) + 1 if stop in row else len(row)
        assert out.token_ids[i] == row[:n], f"row {i}"
        assert out.finish_reasons[i] == ("eos" if stop in row else "length")
        stopped += stop in row
    assert out.steps == max(len(r) for r in out.token_ids)
    assert 1 <= stopped  # row 0 at least
    assert out.token_ids[0] == free.token_ids[0][:4]


def test_max_new_tokens(aligner):
    for n in (1, 5):
        out = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n)
        assert all(len(r) == n for r in out.token_ids)  # this model never says eos early
        assert out.finish_reasons == ["length"] * len(PROMPTS) and out.steps == n
    zero = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=0)
    assert zero.token_ids == [[]] * 4 and zero.texts == [""] * 4 and zero.steps == 0


@pytest.mark.parametrize("mode", ["stacked", "two-caches"])
def test_seeded_sampling(aligner, mode):
    kw = dict(greedy=False, temperature=1.0, top_p=0.95, max_new_tokens=12, mode=mode)
    a = aligner.generate(PROMPTS, PRINCIPLE, seed=7, **kw)
    assert aligner.generate(PROMPTS, PRINCIPLE, seed=7, **kw).token_ids == a.token_ids
    assert aligner.generate(PROMPTS, PRINCIPLE, seed=8, **kw).token_ids != a.token_ids
    # Per-row seeds: a row's tokens depend on its seed, not on its batch neighbours.
    seeds = [11, 12, 13, 14]
    batch = aligner.generate(PROMPTS, PRINCIPLE, seed=seeds, **kw)
    alone = aligner.generate(PROMPTS[2], PRINCIPLE, seed=[13], **kw)
    assert alone.token_ids[0] == batch.token_ids[2]
    # seed=None follows torch's global generator.
    torch.manual_seed(3)
    x = aligner.generate(PROMPTS, PRINCIPLE, **kw)
    torch.manual_seed(3)
    assert aligner.generate(PROMPTS, PRINCIPLE, **kw).token_ids == x.token_ids


def test_sampling_same_in_both_modes(aligner):
    kw = dict(greedy=False, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=5)
    a = aligner.generate(PROMPTS, PRINCIPLE, mode="stacked", **kw)
    b = aligner.generate(PROMPTS, PRINCIPLE, mode="two-caches", **kw)
    assert a.token_ids == b.token_ids


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        assert self.ended == 0
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_protocol(aligner):
    """put(prompt ids [B, L]) first, then each step's [B] tokens, then end(), as generate."""
    rec = Recorder()
    out = aligner.generate(PROMPTS[:2], PRINCIPLE, max_new_tokens=9, streamer=rec)
    ids_with, _ = aligner.branches(PROMPTS[:2], PRINCIPLE)
    assert rec.ended == 1
    first = rec.puts[0]
    assert first.shape == (2, max(map(len, ids_with)))
    assert first[0, -len(ids_with[0]):].tolist() == ids_with[0]
    steps = torch.stack(rec.puts[1:], dim=1)
    assert steps.shape == (2, out.steps)
    for i in range(2):
        assert steps[i, :len(out.token_ids[i])].tolist() == out.token_ids[i]


def test_stream_iterator(aligner):
    text = aligner.generate(PROMPTS[0], PRINCIPLE, max_new_tokens=20).text
    assert "".join(aligner.stream(PROMPTS[0], PRINCIPLE, max_new_tokens=20)) == text
    batch = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=20)
    joined = [""] * len(PROMPTS)
    for row, piece in aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=20):
        joined[row] += piece
    assert joined == batch.texts
    # An abandoned stream leaves the aligner usable.
    it = aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=20)
    next(it)
    it.close()
    assert aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=20).texts == batch.texts


def test_timing_fields(aligner):
    out = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=6)
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.new_tokens == 24
    assert out.decode_tokens_per_second == pytest.approx(24 / out.decode_seconds)


def test_bad_arguments(aligner):
    w, wo = aligner.branches(PROMPTS[:2], PRINCIPLE)
    cases = [
        (lambda: aligner.generate_ids(w, wo[:1]), "ids_with has 2 rows"),
        (lambda: aligner.generate_ids([[1], []], wo), "ids_with\\[1\\] is empty"),
        (lambda: aligner.generate_ids([[1], [5, 320]], wo), "token id 320, outside the "
                                                            "model's vocabulary \\[0, 320\\)"),
        (lambda: aligner.generate_plain_ids([[-1]]), "ids\\[0\\] holds token id -1"),
        (lambda: aligner.generate_ids(w, wo, ratio=float("nan")), "ratio must be"),
        (lambda: aligner.generate_ids(w, wo, ratio=[1.0]), "ratio has 1 values"),
        (lambda: aligner.generate_ids(w, wo, top_p=0.0), "top_p must be"),
        (lambda: aligner.generate_ids(w, wo, temperature=-1.0), "temperature must be"),
        (lambda: aligner.generate_ids(w, wo, max_new_tokens=-1), "max_new_tokens"),
        (lambda: aligner.generate_ids(w, wo, mode="fast"), "mode must be"),
        (lambda: aligner.generate_ids(w, wo, max_new_tokens=600), "exceeds the model's "
                                                                  "context of 512"),
        (lambda: aligner.generate("", PRINCIPLE), "prompt 0 is empty"),
        (lambda: aligner.generate("Q", "  "), "principle 0 is empty"),
        (lambda: aligner.generate(["a", "b"], ["x"]), "1 principles for 2 prompts"),
        (lambda: aligner.generate([], PRINCIPLE), "no prompts"),
        (lambda: aligner.generate_ids(w, wo, greedy=False, seed=-1), "seed must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(f"no ValueError matching {message!r}")
    with pytest.raises(TypeError, match="prompt must be"):
        aligner.generate(3, PRINCIPLE)
    type_cases = [  # ids that int() would truncate or parse
        (lambda: aligner.generate_ids([[1.7], [2]], wo), "ids_with\\[0\\] must hold integer "
                                                        "token ids; got 1.7 \\(float\\)"),
        (lambda: aligner.generate_ids(w, [[True], [2]]), "ids_without\\[0\\] must hold integer"),
        (lambda: aligner.generate_ids(torch.ones(2, 3), wo), "must hold integer token ids; got "
                                                             "a torch.float32 tensor"),
        (lambda: aligner.generate_ids(["12", [2]], wo), "ids_with\\[0\\] must be a list of "
                                                       "token ids \\(ints\\); got str"),
    ]
    for call, message in type_cases:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(TypeError, match="unexpected arguments"):
        aligner.stream("Q", PRINCIPLE, ratios=1)
    with pytest.raises(ValueError, match="top_p must be"):
        aligner.stream("Q", PRINCIPLE, top_p=2.0)  # at the call, before any iteration


def test_nan_logits_fail_loudly(device):
    broken = random_llama("tiny", logit_std=1.5, device=device)
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    aligner = linalign.LinearAligner(broken, ByteTokenizer())
    with pytest.raises(RuntimeError, match="NaN or \\+inf logits"):
        aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=4)


def test_cache_argument_follows_the_installed_transformers(aligner, model):
    """transformers 5.24 renamed past_key_values to cache and 5.17 ignores cache=: the loop
    must pass the name this version reads, and every decode forward sees one new token."""
    import inspect
    params = inspect.signature(model.forward).parameters
    assert aligner.call.cache_kw in params
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=5)
    finally:
        del model.forward
    assert seen[0] > 1 and seen[1:] == [1] * 4


# ---- fast=True: static KV cache, static buffers, a CUDA graph per decode step on a GPU ----

def _same(a, b, logprobs=True):
    assert a.token_ids == b.token_ids
    assert a.texts == b.texts and a.finish_reasons == b.finish_reasons
    assert a.steps == b.steps and a.extra["status"] == b.extra["status"]
    if logprobs:
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=1e-4)


def test_fast_matches_stacked_greedy(aligner):
    """Prompts of different lengths, per-row parameters: the same greedy tokens and logprobs
    as the dynamic-cache loop, for Linear Alignment and for plain decoding; and again from
    the reused static cache (and graph) of a second call of the same shape."""
    kw = dict(ratio=[0.0, 1.0, 3.0, -0.5], temperature=[0.5, 1.0, 0.5, 0.7],
              top_p=[0.8, 0.9, 1.0, 0.5], max_new_tokens=12, return_logprobs=True)
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    assert len({len(r) for r in ids_with}) == len(PROMPTS)
    want = aligner.generate_ids(ids_with, ids_without, **kw)
    for _ in range(2):
        _same(aligner.generate_ids(ids_with, ids_without, fast=True, **kw), want)
    plain = dict(temperature=0.5, top_p=0.8, max_new_tokens=12, return_logprobs=True)
    _same(aligner.generate_plain_ids(ids_with, fast=True, **plain),
          aligner.generate_plain_ids(ids_with, **plain))


def test_fast_matches_stacked_sampled(aligner):
    """Per-row seeds and step offsets are the same, so the same seed samples the same tokens."""
    kw = dict(greedy=False, temperature=1.0, top_p=0.95, max_new_tokens=12,
              return_logprobs=True)
    for seed in (5, [11, 12, 13, 14]):
        want = aligner.generate(PROMPTS, PRINCIPLE, seed=seed, **kw)
        _same(aligner.generate(PROMPTS, PRINCIPLE, seed=seed, fast=True, **kw), want)
    other = aligner.generate(PROMPTS, PRINCIPLE, seed=6, fast=True, **kw)
    assert other.token_ids != want.token_ids
    _same(aligner.generate_plain(PROMPTS, seed=3, fast=True, **kw),
          aligner.generate_plain(PROMPTS, seed=3, **kw))


def test_fast_rows_stop_independently(aligner):
    """A token that some rows produce made the end of sequence: each row stops at its own
    eos, finished rows emit padding (discarded), the loop ends when all are done."""
    free = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=14)
    aligner.eos_ids = [free.token_ids[0][3]]
    for n in (14, 40):
        want = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n, return_logprobs=True)
        got = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n, return_logprobs=True,
                               fast=True)
        _same(got, want)
        assert "eos" in got.finish_reasons
    # every row stops: the loop ends early, at the first check after the last eos
    aligner.eos_ids = sorted({r[0] for r in free.token_ids})
    got = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=14, fast=True)
    assert got.finish_reasons == ["eos"] * 4 and all(len(r) == 1 for r in got.token_ids)
    assert got.steps < 14
    _same(got, aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=14), logprobs=False)


def test_fast_max_new_tokens_0_and_1(aligner):
    for n in (0, 1):
        for kw in (dict(), dict(greedy=False, seed=4)):
            want = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n,
                                    return_logprobs=True, **kw)
            got = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n,
                                   return_logprobs=True, fast=True, **kw)
            assert got.steps == n and all(len(r) == n for r in got.token_ids)
            assert got.token_ids == want.token_ids


def test_fast_streams(aligner):
    rec = Recorder()
    out = aligner.generate(PROMPTS[:2], PRINCIPLE, max_new_tokens=9, streamer=rec, fast=True)
    assert rec.ended == 1
    steps = torch.stack(rec.puts[1:], dim=1)
    assert steps.shape == (2, out.steps)
    for i in range(2):
        assert steps[i, :len(out.token_ids[i])].tolist() == out.token_ids[i]
    text = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=10).texts
    joined = [""] * len(PROMPTS)
    for row, piece in aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=10, fast=True):
        joined[row] += piece
    assert joined == text


def test_fast_refuses_what_it_cannot_run(aligner):
    w, wo = aligner.branches(PROMPTS[:2], PRINCIPLE)
    with pytest.raises(ValueError, match='fast=True runs the stacked loop'):
        aligner.generate_ids(w, wo, mode="two-caches", fast=True)
    with pytest.raises(ValueError, match='fast=True runs the stacked loop'):
        aligner.stream("Q", PRINCIPLE, mode="two-caches", fast=True)
    with pytest.raises(TypeError, match="fast must be True or False"):
        aligner.generate_ids(w, wo, fast="yes")
    no_cache = linalign.LinearAligner(_WithoutCacheArgument(aligner.model), ByteTokenizer())
    with pytest.raises(ValueError, match="takes a KV cache"):
        no_cache.generate_plain_ids(w, fast=True)


class _WithoutCacheArgument(torch.nn.Module):
    """A causal LM whose forward takes no KV cache argument (it recomputes everything)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.generation_config = model.generation_config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fast_uses_a_cuda_graph(model):
    """On a GPU the decode steps after the warm-up are graph replays: one capture per shape,
    reused by the next call of that shape, and the tokens equal the dynamic-cache loop's."""
    import warnings

    from linalign.decoder import FAST_WARMUP_STEPS

    aligner = linalign.LinearAligner(model, ByteTokenizer())
    aligner.eos_ids = []  # every row runs all steps
    n = 16
    want = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n, return_logprobs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns: fail here instead
        got = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n, return_logprobs=True,
                               fast=True)
    stats = dict(aligner.fast_stats)
    assert stats["capture_failures"] == 0, stats
    assert stats["captures"] == 1, stats
    assert stats["eager_steps"] == FAST_WARMUP_STEPS, stats
    assert stats["replays"] == n - 1 - FAST_WARMUP_STEPS, stats
    _same(got, want)
    again = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=n, return_logprobs=True,
                             fast=True)
    assert aligner.fast_stats["captures"] == 1
    assert aligner.fast_stats["replays"] == stats["replays"] + n - 1
    _same(again, want)
    sampled = dict(greedy=False, temperature=1.0, top_p=0.95, seed=9, max_new_tokens=n)
    assert aligner.generate(PROMPTS, PRINCIPLE, fast=True, **sampled).token_ids == \
        aligner.generate(PROMPTS, PRINCIPLE, **sampled).token_ids
    assert aligner.fast_stats["captures"] == 2 and aligner.fast_stats["capture_failures"] == 0
