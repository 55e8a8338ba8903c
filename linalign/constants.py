"""The numbers of the contract, in one place, with no torch or Triton import.

The reference (``linalign.reference``), the torch path (``linalign.torch_backend``) and the
Triton kernels (``linalign.kernels``, which turn them into ``tl.constexpr`` values) all read
them from here; ``tests/test_constants.py`` pins the kernels' copies to these. What each one
means: ``docs/semantics.md``.
"""
import enum

#: The gap rule (docs/semantics.md, "The nucleus"): a token whose principle-branch logit is
#: more than ``GAP * T`` below that branch's best is never in the nucleus.
GAP = 80.0
#: Largest finite fp32 value. Aligned scores and branch differences are clamped to
#: ``[-FMAX, FMAX]`` (docs/semantics.md, "Arithmetic"), so that hostile but finite inputs
#: (+-1e30 with a large ratio) never give ``inf - inf = NaN``.
FMAX = 3.4028234663852886e38
#: ``0 < T < TINY_T`` is treated as ``TINY_T`` (so ``1 / T`` stays finite in fp32).
TINY_T = 1e-30
#: kl mode's default cap on the ratio it derives (docs/semantics.md, "kl mode").
MAX_RATIO = 10.0
#: Golden-ratio increment of 64-bit seeds: row ``i`` of a call with base seed ``s`` samples
#: with the Philox key ``(s + SEED_MIX * (i + 1)) mod 2**63`` (docs/decoder.md, "Randomness"),
#: far apart in key space.
SEED_MIX = 0x9E3779B97F4A7C15
#: Seeds are ints in ``[0, SEED_LIMIT)``.
SEED_LIMIT = 2**63


class Status(enum.IntFlag):
    """Per-row status bits of a step (``StepOutput.status`` holds them as int32)."""

    OK = 0
    #: Every nucleus token is -inf in the without-branch: the row fell back to plain
    #: top-p decoding of the principle branch (ratio taken as 0).
    FALLBACK = 1
    #: NaN or +inf in either branch, or no finite principle logit (only with check=False;
    #: the token is a valid id computed with those entries treated as -inf, or 0).
    BAD_INPUT = 2


class RandomSource(enum.IntEnum):
    """Where the uniform of a sampled row comes from (docs/semantics.md, "Randomness")."""

    #: Uniforms drawn by the caller (``torch.rand`` with a generator), one per row.
    UNIFORMS = 0
    #: One integer seed: Philox key = the seed, counter ``(row, offset)``.
    SEED = 1
    #: A [B] tensor of per-row seeds: key = the row's seed, counter ``(0, offset)``.
    ROW_SEEDS = 2
    #: One seed in a 0-d device tensor, read by the kernel: counter ``(row, offset)``.
    DEVICE_SEED = 3
