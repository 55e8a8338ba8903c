"""The decoder and the command under bad input: prompts longer than the context,
empty prompts and principles, max_new_tokens 0 or bad, tokenizers without a chat template or
a pad token, running out of memory, interrupted streams, mixed principles, and the
command's one-line errors. Every error is raised before any model compute where it can be;
docs/errors.md lists them. Tiny random Llama + ByteTokenizer: the file runs in seconds."""
import pytest
import torch

import linalign
from linalign import cli, models
from linalign.decoder import BatchTooLargeError
from linalign.testing import ByteTokenizer, random_llama

PROMPTS = ["hello there, how are you today?", "a", "Tell me about the sea.", "xyz 123 \u00e9"]
PRINCIPLE = "Be kind."
EOS = ByteTokenizer.eos_token_id
N = 8


@pytest.fixture(scope="module")
def model(device):
    return random_llama("tiny", logit_std=1.5, device=device)  # context: 512 positions


@pytest.fixture
def aligner(model):
    return linalign.LinearAligner(model, ByteTokenizer())


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens of a fresh aligner, per fast setting."""
    fresh = linalign.LinearAligner(model, ByteTokenizer())
    return {fast: fresh.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast).token_ids
            for fast in (False, True)}


@pytest.fixture
def no_compute(aligner, model, monkeypatch):
    """The model's forward fails the test if called: errors must come before compute."""
    def forward(*a, **k):
        raise AssertionError("the model ran before the bad input was refused")
    monkeypatch.setattr(model, "forward", forward)
    return aligner


# ------------------------------------------------------------------ 1. context length
@pytest.mark.parametrize("mode, fast", [("stacked", False), ("two-caches", False),
                                        ("stacked", True)])  # fast=True: stacked only
def test_prompt_longer_than_the_context(no_compute, mode, fast):
    long = "x" * 495  # with the principle: 1 + 10 + 495 = 506 tokens, without: 496
    with pytest.raises(ValueError, match=r"prompt 1 \(with the principle branch\) has 506 "
                       r"tokens; 506 \+ max_new_tokens=8 = 514 positions exceeds the "
                       r"model's context of 512 positions .*at most 6"):
        no_compute.generate(["hi", long], PRINCIPLE, max_new_tokens=8, mode=mode, fast=fast)
    with pytest.raises(ValueError, match=r"prompt 0 \(with the principle branch\)"):
        no_compute.stream(long, PRINCIPLE, max_new_tokens=8, mode=mode, fast=fast)
    with pytest.raises(ValueError, match=r"prompt 0 \(without the principle branch\) has "
                       r"600 tokens"):
        no_compute.generate_ids([[1] * 5], [[1] * 600], max_new_tokens=0, mode=mode,
                                fast=fast)


def test_prompt_longer_than_the_context_plain(no_compute):
    with pytest.raises(ValueError, match=r"prompt 2 \(plain branch\) has 511 tokens"):
        no_compute.generate_plain(["a", "b", "y" * 510], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        no_compute.generate_plain_ids([[1] * 500], max_new_tokens=13, fast=True)


def test_prompt_that_just_fits(aligner):
    out = aligner.generate_ids([[65] * 500], [[65] * 490], max_new_tokens=12)
    assert out.steps <= 12


# ------------------------------------------------------------------ 2. empty text
@pytest.mark.parametrize("call, error, message", [
    (lambda a: a.generate("", PRINCIPLE), ValueError, "prompt 0 is empty"),
    (lambda a: a.generate(" \n\t", PRINCIPLE), ValueError, "prompt 0 is empty"),
    (lambda a: a.generate(["a", ""], PRINCIPLE), ValueError, "prompt 1 is empty"),
    (lambda a: a.generate("Q", ""), ValueError, "principle 0 is empty.*change nothing"),
    (lambda a: a.generate(["a", "b"], ["x", "  "]), ValueError, "principle 1 is empty"),
    (lambda a: a.generate([], PRINCIPLE), ValueError, "no prompts given"),
    (lambda a: a.generate(["a", "b"], []), ValueError, "no principles given"),
    (lambda a: a.generate("Q", None), TypeError, "principle must be a string"),
    (lambda a: a.stream("", PRINCIPLE), ValueError, "prompt 0 is empty"),
    (lambda a: a.stream("Q", " "), ValueError, "principle 0 is empty"),
    (lambda a: a.generate_plain(""), ValueError, "prompt 0 is empty"),
    (lambda a: a.generate_plain("Q", ""), ValueError, "principle 0 is empty"),
    (lambda a: a.generate_ids([[]], [[1]]), ValueError, r"ids_with\[0\] is empty"),
    (lambda a: a.generate_ids([], []), ValueError, "no prompts given"),
])
def test_empty_prompts_and_principles(no_compute, call, error, message):
    with pytest.raises(error, match=message):
        call(no_compute)


# ------------------------------------------------------------------ 3. max_new_tokens
def test_max_new_tokens_0_runs_nothing(no_compute):
    a = no_compute
    for fast in (False, True):
        out = a.generate(PROMPTS, PRINCIPLE, max_new_tokens=0, fast=fast)
        assert out.texts == [""] * 4 and out.token_ids == [[]] * 4 and out.steps == 0
        ids = a.generate_ids(*a.branches(PROMPTS[:2], PRINCIPLE), max_new_tokens=0, fast=fast)
        assert ids.token_ids == [[], []]
        assert list(a.stream(PROMPTS, PRINCIPLE, max_new_tokens=0, fast=fast)) == []
        assert list(a.stream("Q", PRINCIPLE, max_new_tokens=0, fast=fast)) == []
        assert a.generate_plain("Q", max_new_tokens=0, fast=fast).text == ""


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2.5, TypeError),
                                          ("3", TypeError), (True, TypeError),
                                          (None, TypeError)])
def test_bad_max_new_tokens(no_compute, value, error):
    a = no_compute
    for call in (lambda: a.generate("Q", PRINCIPLE, max_new_tokens=value),
                 lambda: a.generate("Q", PRINCIPLE, max_new_tokens=value, fast=True),
                 lambda: a.stream("Q", PRINCIPLE, max_new_tokens=value),
                 lambda: a.generate_plain_ids([[1]], max_new_tokens=value)):
        with pytest.raises(error, match="max_new_tokens must be an int >= 0"):
            call()


# ------------------------------------------------------------------ 4. tokenizers
class NoPad(ByteTokenizer):
    pad_token_id = None


class NoPadNoEos(ByteTokenizer):
    pad_token_id = None
    eos_token_id = None


def test_tokenizer_without_chat_template_or_pad(model, aligner):
    assert aligner.prompt_texts("Q?", "Be kind.") == "Be kind.\n\nQ?"
    nopad = linalign.LinearAligner(model, NoPad())
    assert nopad.pad_id == EOS  # left padding with the end-of-sequence token
    want = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=N)
    for fast in (False, True):
        got = nopad.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast)
        assert got.token_ids == want.token_ids  # padding is masked: its id does not matter


def test_no_pad_and_no_eos_anywhere(device):
    bare = random_llama("tiny", device=device, eos_token_id=None, pad_token_id=None)
    with pytest.raises(ValueError, match="neither a pad nor an end-of-sequence token.*set "
                       "tokenizer.pad_token_id"):
        linalign.LinearAligner(bare, NoPadNoEos())


# ------------------------------------------------------------------ 5. out of memory
def _failing_forward(model, monkeypatch, error, after=0):
    real, calls = model.forward, [0]

    def forward(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise error
        return real(*a, **k)
    monkeypatch.setattr(model, "forward", forward)


OOMS = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                     "enough memory: you tried to allocate 21474836480 bytes.")]


@pytest.mark.parametrize("error", OOMS, ids=["torch-oom", "cpu-allocator"])
@pytest.mark.parametrize("mode, fast, after", [("stacked", False, 0), ("stacked", False, 3),
                                               ("two-caches", False, 2), ("stacked", True, 0),
                                               ("stacked", True, 3)])
def test_out_of_memory_is_a_clear_error(model, reference, monkeypatch, error, mode, fast,
                                        after):
    a = linalign.LinearAligner(model, ByteTokenizer())
    with monkeypatch.context() as m:
        _failing_forward(model, m, error, after)  # after: forwards that succeed first
        with pytest.raises(BatchTooLargeError, match=r"out of memory decoding 4 prompt\(s\) "
                           r"\(8 rows .*max_new_tokens=8.*pass fewer prompts per call "
                           r"\(e.g. 2\), a lower max_new_tokens") as info:
            a.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, mode=mode, fast=fast)
        assert isinstance(info.value, MemoryError) and info.value.__cause__ is None
        with pytest.raises(BatchTooLargeError):
            list(a.stream(PROMPTS, PRINCIPLE, max_new_tokens=N, mode=mode, fast=fast))
    assert not any(s.busy for s in a.static.sessions.values())
    assert a.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, mode=mode,
                      fast=fast).token_ids == reference[fast]


def test_other_runtime_errors_pass_through(aligner, model, monkeypatch):
    _failing_forward(model, monkeypatch, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        aligner.generate("Q", PRINCIPLE, max_new_tokens=2)


# ------------------------------------------------------------------ 6. interrupted streams
class Stop(Exception):
    pass


@pytest.mark.parametrize("fast", [False, True])
def test_interrupted_streams_leave_the_aligner_usable(aligner, reference, fast):
    def usable():
        assert not any(s.busy for s in aligner.static.sessions.values())
        assert not torch.is_inference_mode_enabled()
        out = aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast)
        assert out.token_ids == reference[fast]

    it = aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast)
    for _ in range(3):
        next(it)
    it.close()
    usable()
    with pytest.raises(Stop):  # an error inside the consuming loop
        for i, _ in enumerate(aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=N,
                                             fast=fast)):
            if i == 2:
                raise Stop
    usable()
    for i, _ in enumerate(aligner.stream("hello", PRINCIPLE, max_new_tokens=N, fast=fast)):
        if i == 1:
            break
    usable()
    it = aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast)
    next(it)
    del it  # abandoned without close
    usable()

    class Breaks:  # a streamer that raises on its third put
        puts, ended = 0, 0

        def put(self, ids):
            self.puts += 1
            if self.puts == 3:
                raise Stop

        def end(self):
            self.ended += 1
    s = Breaks()
    with pytest.raises(Stop):
        aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=fast, streamer=s)
    assert s.ended == 1
    usable()


def test_two_live_fast_streams(aligner, reference):
    one = aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=True)
    two = aligner.stream(PROMPTS, PRINCIPLE, max_new_tokens=N, fast=True)
    next(one), next(two)
    one.close(), two.close()
    assert aligner.generate(PROMPTS, PRINCIPLE, max_new_tokens=N,
                            fast=True).token_ids == reference[True]


# ------------------------------------------------------------------ 7. mixed principles
@pytest.mark.parametrize("mode, fast", [("stacked", False), ("two-caches", False),
                                        ("stacked", True)])
def test_mixed_principles_equal_each_row_alone(aligner, mode, fast):
    principles = ["Be kind.", "Be kind.", "Answer like a pirate, with many words.", "No."]
    batch = aligner.generate(PROMPTS, principles, max_new_tokens=N, mode=mode, fast=fast)
    for i in range(len(PROMPTS)):
        alone = aligner.generate(PROMPTS[i], principles[i], max_new_tokens=N, mode=mode,
                                 fast=fast)
        assert alone.token_ids[0] == batch.token_ids[i], f"row {i}"


# ------------------------------------------------------------------ 8. the command
@pytest.fixture
def command(model, monkeypatch):
    """cli.main in process, with the tiny model in place of the embedded one."""
    from transformers.utils import logging as hf_logging

    loaded = []

    def load_model(path=None, **kw):
        loaded.append(path)
        return model, ByteTokenizer()
    monkeypatch.setattr(models, "load_model", load_model)
    verbosity = hf_logging.get_verbosity()
    yield loaded
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def _main(capsys, *args):
    rc = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args, message", [
    (["", "--principle", "x"], "the prompt is empty"),
    (["  ", "--principle", "x"], "the prompt is empty"),
    (["hi", "--principle", ""], "--principle is empty"),
    (["hi", "--principle", "\t"], "--principle is empty"),
    (["hi", "--principle", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["hi", "--principle", "x", "--max-new-tokens", "2.5"], "--max-new-tokens"),
    (["hi", "--principle", "x", "--model", "/no/such/model"], "no such folder or file"),
    (["hi", "--principle", "x", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["hi", "--principle", "x", "--temperature", "-1"], "--temperature"),
    (["hi", "--principle", "x", "--mode", "fast"], "--mode"),
])
def test_command_bad_arguments(command, capsys, args, message):
    rc, out, err = _main(capsys, *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linalign: error: ") and message in lines[0]
    assert command == []  # refused before loading the model


def test_command_max_new_tokens_0(command, capsys):
    rc, out, err = _main(capsys, "hi", "--principle", "x", "--max-new-tokens", "0")
    assert (rc, out, err) == (0, "\n", "")
    rc, out, err = _main(capsys, "hi", "--principle", "x", "--max-new-tokens", "0", "--stream")
    assert (rc, out, err) == (0, "\n", "")


def test_command_answers(command, capsys, aligner):
    rc, out, err = _main(capsys, "hi", "--principle", "x", "--max-new-tokens", "4")
    assert rc == 0 and err == ""
    # the command's defaults are the library's (linalign.SamplingParams)
    assert out == aligner.generate("hi", "x", max_new_tokens=4).text.strip() + "\n"


def test_command_decoder_value_error_is_one_line(command, capsys):
    rc, out, err = _main(capsys, "y" * 600, "--principle", "x", "--max-new-tokens", "4")
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "exceeds the model's context of 512" in lines[0]


def test_command_model_load_error_is_one_line(command, capsys, monkeypatch):
    def fail(path=None, **kw):
        raise models.ModelLoadError("could not load a causal LM from /m: broken")
    monkeypatch.setattr(models, "load_model", fail)
    rc, out, err = _main(capsys, "hi", "--principle", "x")
    assert rc == 2 and err.strip() == "linalign: error: could not load a causal LM from " \
                                      "/m: broken"


def test_command_nan_logits_are_one_line(command, capsys, model, monkeypatch):
    """A model whose logits turn NaN: exit code 1 and one line naming the rows, no
    traceback (the decoder's BadLogitsError)."""
    real = model.forward

    def forward(*a, **k):
        out = real(*a, **k)
        out.logits[..., 5] = float("nan")
        return out
    monkeypatch.setattr(model, "forward", forward)
    rc, out, err = _main(capsys, "hi", "--principle", "x", "--max-new-tokens", "4")
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "NaN or +inf logits" in lines[0] and "rows [0]" in lines[0]


def test_command_out_of_memory_is_one_line(command, capsys, model, monkeypatch):
    _failing_forward(model, monkeypatch, OOMS[0])
    rc, out, err = _main(capsys, "hi", "--principle", "x", "--max-new-tokens", "4")
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "out of memory decoding 1 prompt(s)" in lines[0]
