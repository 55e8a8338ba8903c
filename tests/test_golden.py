"""Golden token ids: what the decoder gave on the embedded SmolLM2 before the decoding core
was rebuilt, checked after it. Nothing in a refactor may change a token.

The file ``tests/data/golden_tokens.json`` holds, for 8 prompts x 3 principles (24 rows, 16
new tokens each), the greedy token ids of Linear Alignment at ratios 0, 1 and 3, of kl mode
(0.3 nats), of two principles at once, of plain decoding with and without the principle, in
the stacked loop, the two-caches loop and the static-cache loop (``fast=True``), plus one
seeded sampled setting (the per-row seed stream and the step offsets must not move either).
They are the exact fp32 model's (``load_default_model(packed=False)``). The default on the
CPU packs the linear layers with fp16 weights (``linalign.packed_linear``); its tokens are
checked against the same file for the documented agreement: at most ``PACKED_ROWS_DIFFER``
rows of a setting differ (12 of the 336 rows in all, docs/decoder.md), on the settings of
``PACKED_CHECKED``.

    python tests/test_golden.py --record    # rewrite the file (only when a change is meant)
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.embedded_model
GOLDEN = Path(__file__).parent / "data" / "golden_tokens.json"
PROMPTS = [
    "How do I cook rice?",
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Give me three tips for learning a new language.",
    "Hi",
    "Write one sentence about the moon and the tides, please, for my little sister.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "How can I make my small apartment feel bigger?",
]
PRINCIPLES = ["Answer like a pirate.", "Answer in at most 20 words.",
              "Always answer in French, never in English."]
SECOND = "Use simple words."  # the second principle of the two-principle setting
N = 16
COMMON = dict(temperature=0.5, top_p=0.8, max_new_tokens=N)
#: Rows of 24 whose tokens the packed default (fp16 weights) decodes differently from the
#: fp32 golden file, as measured (x86-64 with AVX-512, torch 2.13.0): rows 6 and 23 of
#: plain decoding (from positions 10 and 15), row 19 of ratio 1 and 3 (from position 2).
PACKED_ROWS_DIFFER = {"r0": 2, "r1": 1, "r3": 1, "kl0.3": 0, "two-principles": 0,
                      "plain-none": 0, "plain-prompt": 2, "r3-two-caches": 1, "r1-fast": 1,
                      "kl0.3-fast": 0, "two-principles-fast": 0, "plain-prompt-fast": 2,
                      "r3-sampled": 1, "r3-sampled-fast": 1}


def rows():
    """(prompt, principle) for every row: every prompt under every principle."""
    return [(q, p) for p in PRINCIPLES for q in PROMPTS]


#: name -> (method, keyword arguments); every setting names its ratio, so no default counts
SETTINGS = {
    "r0": ("generate", dict(ratio=0.0)),
    "r1": ("generate", dict(ratio=1.0)),
    "r3": ("generate", dict(ratio=3.0)),
    "kl0.3": ("generate", dict(kl_budget=0.3, max_ratio=10.0)),
    "two-principles": ("generate2", dict(ratio=[[3.0, 1.0]] * 24)),
    "plain-none": ("plain", dict(principle=None)),
    "plain-prompt": ("plain", dict()),
    "r3-two-caches": ("generate", dict(ratio=3.0, mode="two-caches")),
    "r1-fast": ("generate", dict(ratio=1.0, fast=True)),
    "kl0.3-fast": ("generate", dict(kl_budget=0.3, max_ratio=10.0, fast=True)),
    "two-principles-fast": ("generate2", dict(ratio=[[3.0, 1.0]] * 24, fast=True)),
    "plain-prompt-fast": ("plain", dict(fast=True)),
    "r3-sampled": ("generate", dict(ratio=3.0, greedy=False, seed=1234)),
    "r3-sampled-fast": ("generate", dict(ratio=3.0, greedy=False, seed=1234, fast=True)),
}


def decode(aligner, name):
    method, kw = SETTINGS[name]
    kw = {**COMMON, "greedy": True, **kw}
    qs = [q for q, _ in rows()]
    ps = [p for _, p in rows()]
    if method == "generate":
        return aligner.generate(qs, ps, **kw).token_ids
    if method == "generate2":
        return aligner.generate(qs, [[p, SECOND] for p in ps], **kw).token_ids
    principle = kw.pop("principle", ps)
    return aligner.generate_plain(qs, principle, **kw).token_ids


@pytest.fixture(scope="module")
def aligner():
    import linalign

    return linalign.LinearAligner(*linalign.load_default_model(packed=False))


@pytest.fixture(scope="module")
def packed_aligner():
    import linalign
    from linalign.packed_linear import packed_layers

    model, tokenizer = linalign.load_default_model()
    if not packed_layers(model):
        pytest.skip("this CPU or torch does not run FBGEMM: the default is not packed here")
    return linalign.LinearAligner(model, tokenizer)


def rows_differing(got, want):
    return [i for i, (a, b) in enumerate(zip(got, want)) if a != b]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_tokens_match_the_golden_file(aligner, name):
    want = json.loads(GOLDEN.read_text())["settings"][name]
    got = decode(aligner, name)
    diff = rows_differing(got, want)
    assert len(got) == len(want) and not diff, (
        f"{name}: rows {diff[:8]} differ from the golden file, e.g. row {diff[0] if diff else '-'}: "
        f"{got[diff[0]] if diff else ''} against {want[diff[0]] if diff else ''}")


#: The settings the packed default is checked on in every run: one of each mode, and the
#: static-cache loop and sampling once (the packed layers are the same model call in every
#: loop; all 14 were measured once for ``PACKED_ROWS_DIFFER``).
PACKED_CHECKED = ["r0", "r1", "kl0.3", "two-principles", "plain-prompt", "r3-sampled-fast"]


@pytest.mark.parametrize("name", PACKED_CHECKED)
def test_packed_tokens_agree_as_documented(packed_aligner, name):
    """The packed default against the fp32 golden tokens: at most the documented rows
    differ (fp16 weights move a few near-ties)."""
    want = json.loads(GOLDEN.read_text())["settings"][name]
    got = decode(packed_aligner, name)
    diff = rows_differing(got, want)
    assert len(got) == len(want) and len(diff) <= PACKED_ROWS_DIFFER[name], (
        f"{name}: rows {diff} of the packed model differ from the golden file, documented: "
        f"at most {PACKED_ROWS_DIFFER[name]}")


def record():
    import linalign

    torch.set_num_threads(1)
    aligner = linalign.LinearAligner(*linalign.load_default_model(packed=False))
    out = {"prompts": PROMPTS, "principles": PRINCIPLES, "second_principle": SECOND,
           "common": COMMON, "settings": {}}
    for name in SETTINGS:
        out["settings"][name] = decode(aligner, name)
        print(name, file=sys.stderr, flush=True)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    record()
