"""One table of rules (linalign.options.RULES): the step's checks of Python numbers and of
[B] tensors, the decoder's checks (SamplingParams.rows) and the commands' argument types
(linalign.cli_args) accept and refuse exactly the same values, judged at fp32 (the
precision every step computes in), on the edge values below. And one set of defaults:
every front end takes SamplingParams's."""
import argparse
import dataclasses
import math

import pytest
import torch

import linalign
from linalign import cli, cli_args
from linalign.options import INT_RULES, RULES, SamplingParams, as_fp32, check_int, check_number
from linalign.testing import two_branch

EDGES = [0.0, -0.0, 1e-50, 1e-45, 1e-30, 0.5, 1.0, 1.0000000001, 1.0000001, 2.0, -1.0, -1e-50,
         3.4e38, 1e39, -1e39, math.inf, -math.inf, math.nan]


def accepts(fn) -> bool:
    try:
        fn()
        return True
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


@pytest.mark.parametrize("name", list(RULES))
def test_every_check_agrees_on_the_edges(name):
    zp, z0 = two_branch(2, 50, seed=0)
    bound = RULES[name]
    for x in EDGES:
        want = bound.number_ok(x)
        assert accepts(lambda: check_number(name, x)) == want, (name, x)
        t = torch.tensor([x, x], dtype=torch.float32)
        assert bool(bound.tensor_ok(t).all()) == want, (name, x, "tensor")
        assert accepts(lambda: cli_args.number(name)(repr(x))) == want, (name, x, "argparse")
        # the step, with the value as a number and as a [B] tensor
        kw = dict(ratio=1.0, temperature=1.0, top_p=1.0)
        if name in ("kl_budget", "max_ratio"):
            kw = dict(kl_budget=0.1, max_ratio=1.0, temperature=1.0, top_p=1.0)
        if name.endswith("_penalty"):  # the penalties act on the answer so far
            kw["history"] = torch.tensor([[3, -1], [4, 4]])
        for value in (x, t):
            step = lambda: linalign.step(zp, z0, **dict(kw, **{name: value}))  # noqa: E731
            assert accepts(step) == want, (name, x, type(value).__name__)
        # the decoder's check of one value per prompt
        options = {name: x} if name != "kl_budget" else {name: x, "ratio": None}
        assert accepts(lambda: SamplingParams(**options).rows(2)) == want, (name, x, "rows")


def test_rules_judge_at_fp32():
    """A value is judged as the step computes with it: 1e39 is inf in fp32 (not a finite
    ratio), 1e-50 is 0 (not a top_p above 0), 1.0000000001 is 1 (a valid top_p)."""
    assert as_fp32(1e39) == math.inf and as_fp32(1e-50) == 0.0 and as_fp32(1.0000000001) == 1.0
    with pytest.raises(ValueError, match=r"ratio must be a finite number; got 1e\+39 \(inf in fp32"):
        check_number("ratio", 1e39)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got 1e-50 \(0 in fp32"):
        check_number("top_p", 1e-50)
    assert check_number("top_p", 1.0000000001) == 1.0000000001


@pytest.mark.parametrize("name", list(INT_RULES))
def test_integer_rules_agree(name):
    lo, hi = INT_RULES[name]
    for x in (lo - 1, lo, lo + 1, 2**62, 2**63 - 1, 2**63):
        want = x >= lo and (hi is None or x < hi)
        assert accepts(lambda: check_int(name, x)) == want, (name, x)
        assert accepts(lambda: cli_args.integer(name=name)(str(x))) == want, (name, x)
    assert not accepts(lambda: check_int(name, 2.0)) and not accepts(lambda: check_int(name, True))


def test_one_set_of_defaults():
    """The commands' parsers and the decoder take SamplingParams's defaults; the commands
    differ in one, their repetition penalty (docs/decoder.md, "Defaults")."""
    d = SamplingParams()
    assert d.repetition_penalty == 1.0  # the library: Hugging Face's neutral default
    commands = dataclasses.replace(
        d, repetition_penalty=linalign.options.COMMAND_REPETITION_PENALTY)
    args = cli.build_parser().parse_args(["generate", "Q", "--principle", "P"])
    assert cli_args.sampling_params(args) == commands
    run = cli.build_parser().parse_args(["run", "--input", "i", "--output", "o"])
    assert cli_args.sampling_params(run) == commands
    assert d.ratio is None  # resolved to DEFAULT_RATIO by rows() unless kl_budget is given
    rows = d.rows(3)
    assert rows.ratios == [[linalign.options.DEFAULT_RATIO] * 3]
    assert rows.temperature == [d.temperature] * 3 and rows.top_p == [d.top_p] * 3


def test_build_refuses_unknown_options():
    with pytest.raises(TypeError, match=r"unexpected arguments \['temprature'\]"):
        SamplingParams.build(temprature=0.5)
    assert SamplingParams.build(SamplingParams(top_p=0.5), ratio=2.0) == \
        SamplingParams(ratio=2.0, top_p=0.5)
