"""The embedded SmolLM2-135M-Instruct end to end: loading, the chat-template branches, both
decoding modes, batching, streaming (Hugging Face's TextStreamer included), and the
command. The first load converts the GGUF into the per-user cache (about 40 s, once)."""
import io
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

import linalign
from linalign import cli, models
from linalign.options import COMMAND_REPETITION_PENALTY

from helpers import assert_same_or_near_tie

pytestmark = pytest.mark.embedded_model
PROMPTS = [
    "How do I cook rice?",
    "What is the capital of France?",
    "Write one sentence about the moon and the tides, please, for my little sister.",
    "Hi",
]
PRINCIPLE = "Answer like a pirate."
N = 24


@pytest.fixture(scope="module")
def smol():
    return models.load_default_model()


@pytest.fixture(scope="module")
def aligner(smol):
    return linalign.LinearAligner(*smol)


def test_default_model_and_its_special_ids(smol):
    model, tokenizer = smol
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert model.generation_config.eos_token_id == 2
    assert models.eos_token_ids(model, tokenizer) == [2]
    cached = models.cache_root() / models._cache_key(models.default_gguf())
    assert (cached / "model.safetensors").is_file()


def test_branches_differ_only_by_the_principle(aligner):
    with_p = aligner.prompt_texts(PROMPTS[0], PRINCIPLE)
    without = aligner.prompt_texts(PROMPTS[0], None)
    base = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert without.startswith(f"<|im_start|>system\n{base}<|im_end|>")
    assert with_p == without.replace(base, base + " " + PRINCIPLE)
    assert with_p.endswith("<|im_start|>assistant\n")


def test_stacked_and_two_caches_agree(aligner, smol):
    """The authors' structure (two caches, two forwards) and one stacked forward of 2B rows
    give the same greedy tokens, prompts of different lengths in one batch."""
    a = aligner.generate(PROMPTS, PRINCIPLE, ratio=3.0, max_new_tokens=N)
    b = aligner.generate(PROMPTS, PRINCIPLE, ratio=3.0, max_new_tokens=N, mode="two-caches")
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    assert len({len(r) for r in ids_with}) == len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert_same_or_near_tie(smol[0], ids_with[i], ids_without[i], a.token_ids[i],
                                b.token_ids[i], ratio=3.0, temperature=0.5, top_p=0.8)


def test_alone_equals_in_a_batch(aligner, smol):
    batch = aligner.generate(PROMPTS, PRINCIPLE, ratio=3.0, max_new_tokens=N)
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLE)
    for i in (0, 2):
        alone = aligner.generate(PROMPTS[i], PRINCIPLE, ratio=3.0, max_new_tokens=N)
        assert_same_or_near_tie(smol[0], ids_with[i], ids_without[i], alone.token_ids[0],
                                batch.token_ids[i], ratio=3.0, temperature=0.5, top_p=0.8)
    # "What is the capital of France?" ends on <|im_end|> long before N tokens.
    assert batch.finish_reasons[1] == "eos" and batch.token_ids[1][-1] == 2
    assert len(batch.token_ids[1]) < N


def test_text_stream_and_hf_textstreamer(aligner, smol):
    from transformers import TextStreamer

    out = aligner.generate(PROMPTS[0], PRINCIPLE, max_new_tokens=N)
    assert out.texts[0] and out.token_ids == aligner.generate_ids(
        *aligner.branches(PROMPTS[0], PRINCIPLE), max_new_tokens=N).token_ids
    assert "".join(aligner.stream(PROMPTS[0], PRINCIPLE, max_new_tokens=N)) == out.text
    buf = io.StringIO()
    with redirect_stdout(buf):
        aligner.generate(PROMPTS[0], PRINCIPLE, max_new_tokens=N,
                         streamer=TextStreamer(smol[1], skip_prompt=True,
                                               skip_special_tokens=True))
    assert buf.getvalue().strip() == out.text.strip()


def test_alignment_changes_the_answer(aligner):
    """Ratio 0 is plain decoding with the principle in the prompt; the default ratio pushes
    the answer further (on this prompt, into pirate talk)."""
    plain = aligner.generate_plain(PROMPTS[0], PRINCIPLE, max_new_tokens=N)
    zero = aligner.generate(PROMPTS[0], PRINCIPLE, ratio=0.0, max_new_tokens=N)
    aligned = aligner.generate(PROMPTS[0], PRINCIPLE, max_new_tokens=N)
    assert zero.token_ids == plain.token_ids
    assert aligned.token_ids != plain.token_ids
    assert "pirate" in aligned.text.lower()


def test_load_model_from_a_folder(aligner):
    folder = models.cache_root() / models._cache_key(models.default_gguf())
    model, tokenizer = models.load_model(folder)
    again = linalign.LinearAligner(model, tokenizer)
    assert again.generate(PROMPTS[1], PRINCIPLE, max_new_tokens=8).token_ids == \
        aligner.generate(PROMPTS[1], PRINCIPLE, max_new_tokens=8).token_ids
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        models.load_model(folder.parent)
    with pytest.raises(models.ModelLoadError, match="no model at"):
        models.load_model(folder / "missing")


def test_unwritable_cache_still_loads(monkeypatch, tmp_path):
    """A cache that cannot be written (read-only home, full disk) gives a warning and a
    direct GGUF load, not a failure."""
    from types import SimpleNamespace

    def refuse(gguf, dest):
        raise PermissionError(13, "Permission denied", str(dest))

    direct = (SimpleNamespace(config=SimpleNamespace(), generation_config=SimpleNamespace()),
              SimpleNamespace())
    monkeypatch.setenv("LINALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert", refuse)
    monkeypatch.setattr(models, "_load_gguf", lambda path, device, dtype: direct)
    with pytest.warns(RuntimeWarning, match="could not write the model cache"):
        model, tokenizer = models.load_default_model()
    assert (model, tokenizer) == direct and tokenizer.pad_token_id == 2


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "linalign", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_command_main_job(aligner):
    run = _cli("generate", PROMPTS[0], "--principle", PRINCIPLE, "--max-new-tokens", str(N),
               "--threads", "1")
    assert run.returncode == 0, run.stderr
    want = aligner.generate(PROMPTS[0], PRINCIPLE, max_new_tokens=N,  # the defaults
                            repetition_penalty=COMMAND_REPETITION_PENALTY).text
    assert run.stdout.strip() == want.strip()


def test_command_compare_and_stream():
    run = _cli("generate", PROMPTS[1], "--principle", PRINCIPLE, "--max-new-tokens", "12",
               "--threads", "1", "--compare")
    assert run.returncode == 0, run.stderr
    heads = [line for line in run.stdout.splitlines() if line.startswith("=== ")]
    assert heads == ["=== without the principle ===", "=== principle in the prompt only ===",
                     "=== Linear Alignment (ratio 1) ==="]
    stream = _cli("generate", PROMPTS[1], "--principle", PRINCIPLE, "--max-new-tokens", "12",
                  "--threads", "1", "--stream", "--sample", "--seed", "3")
    assert stream.returncode == 0 and stream.stdout.strip()


def test_command_several_principles_and_kl(aligner, capsys):
    """In process (the model cache is warm): --principle twice with a ratio each, and
    --kl-budget, give what the Python API gives."""
    two = ["Answer like a pirate.", "Be brief."]
    assert cli.main(["generate", PROMPTS[1], "--principle", two[0], "--principle", two[1],
                     "--ratio", "3", "--ratio", "1", "--max-new-tokens", "10"]) == 0
    want = aligner.generate(PROMPTS[1], [two], ratio=[[3.0, 1.0]], max_new_tokens=10,
                            repetition_penalty=COMMAND_REPETITION_PENALTY).text
    assert capsys.readouterr().out.strip() == want.strip()
    assert cli.main(["generate", PROMPTS[1], "--principle", PRINCIPLE, "--kl-budget", "2",
                     "--max-new-tokens", "10"]) == 0
    want = aligner.generate(PROMPTS[1], PRINCIPLE, kl_budget=2.0, max_new_tokens=10,
                            repetition_penalty=COMMAND_REPETITION_PENALTY).text
    assert capsys.readouterr().out.strip() == want.strip()


@pytest.mark.parametrize("args, message", [
    (["generate", "", "--principle", "x"], "the prompt is empty"),
    (["generate", "hi"], "required: --principle"),
    (["generate", "hi", "--principle", "x", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--principle", "x", "--model", "/no/such/folder"], "no such folder"),
    (["generate", "hi", "--principle", "x", "--ratio", "nan"], "--ratio"),
    (["generate", "hi", "--principle", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "hi", "--principle", "x", "--stream", "--compare"], "not allowed with"),
])
def test_command_bad_arguments(args, message):
    run = _cli(*args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in run.stderr, \
        run.stderr
    assert run.stdout == ""


def test_command_model_folder_that_is_not_a_model(tmp_path):
    run = _cli("generate", "hi", "--principle", "x", "--model", str(tmp_path))
    assert run.returncode == 2 and "no config.json" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
