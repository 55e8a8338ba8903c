"""Stop strings (docs/decoder.md, "Stop strings"): the answer ends before the first
occurrence of any stop string, with finish reason "stop"; its ids run up to the token that
completed it; rows stop independently; streaming never shows text that a stop string later
cuts; the callback of finished rows gets the cut text; the fast loop agrees."""
import pytest

import linalign
from linalign.streaming import first_stop, held_back
from linalign.testing import ByteTokenizer, random_llama

PROMPTS = ["hello there, how are you today?", "a", "Tell me about the sea."]


@pytest.fixture(scope="module")
def aligner(device):
    return linalign.LinearAligner(random_llama("tiny", logit_std=1.5, device=device),
                                  ByteTokenizer())


@pytest.fixture(scope="module")
def free(aligner):
    """The answers without stop strings, and a stop string taken from the middle of the
    second one (printable text, so it decodes the same at any cut)."""
    out = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=40)
    text = out.texts[1]
    return out, text[len(text) // 3:len(text) // 3 + 2]


def shortest_prefix(tokenizer, ids, stop):
    for n in range(1, len(ids) + 1):
        if stop in linalign.prompts.decode_text(tokenizer, ids[:n]):
            return n
    return None


@pytest.mark.parametrize("fast", [False, True])
def test_answer_ends_before_the_stop_string(aligner, free, fast):
    out, stop = free
    got = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=40, stop=[stop, "\uffff"],
                           fast=fast)
    for i, (ids, text) in enumerate(zip(out.token_ids, out.texts)):
        at = text.find(stop)
        if at < 0:
            assert got.token_ids[i] == ids and got.texts[i] == text
            assert got.finish_reasons[i] == out.finish_reasons[i]
            continue
        n = shortest_prefix(aligner.tokenizer, ids, stop)
        assert got.finish_reasons[i] == "stop"
        assert got.token_ids[i] == ids[:n]
        assert got.texts[i] == text[:at] and stop not in got.texts[i]
    assert got.finish_reasons[1] == "stop"


def test_one_string_and_the_callback(aligner, free):
    out, stop = free
    seen = {}
    got = aligner.generate(PROMPTS, "Be kind.", max_new_tokens=40, stop=stop,
                           on_finished=lambda *a: seen.setdefault(a[0], a[1:]))
    assert sorted(seen) == [0, 1, 2]
    for i, (ids, reason, text) in seen.items():
        assert (ids, reason, text) == (got.token_ids[i], got.finish_reasons[i], got.texts[i])


def test_stream_never_shows_what_a_stop_string_cuts(aligner, free):
    out, stop = free
    pieces = list(aligner.stream(PROMPTS[1], "Be kind.", max_new_tokens=40, stop=stop))
    got = aligner.generate(PROMPTS[1], "Be kind.", max_new_tokens=40, stop=stop)
    assert "".join(pieces) == got.text
    shown = ""
    for p in pieces:
        shown += p
        assert stop not in shown and got.text.startswith(shown)
    rows = list(aligner.stream(PROMPTS, "Be kind.", max_new_tokens=40, stop=stop))
    for i, text in enumerate(aligner.generate(PROMPTS, "Be kind.", max_new_tokens=40,
                                              stop=stop).texts):
        assert "".join(p for r, p in rows if r == i) == text


def test_held_back_text():
    assert first_stop("abcabc", ["ca", "bc"]) == 1
    assert first_stop("abc", ["x"]) is None
    assert held_back("hello wor", ["world", "xyz"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abab", ["aba"]) == 2  # the longest proper prefix that ends the text


def test_plain_decoding_and_token_level(aligner, free):
    out, stop = free
    plain = aligner.generate_plain(PROMPTS, None, max_new_tokens=40)
    text = plain.texts[0]
    cut = aligner.generate_plain(PROMPTS, None, max_new_tokens=40, stop=text[5:7])
    assert cut.finish_reasons[0] == "stop" and cut.texts[0] == text[:text.find(text[5:7])]
    ids_with, ids_without = aligner.branches(PROMPTS, "Be kind.")
    got = aligner.generate_ids(ids_with, ids_without, max_new_tokens=40, stop=stop)
    assert got.texts == aligner.generate(PROMPTS, "Be kind.", max_new_tokens=40,
                                         stop=stop).texts
