"""The CPU fast path: linear layers with fp16 weights packed by FBGEMM (linalign.packed_linear)
and the one place that chooses it (linalign.models.use_packing). The embedded model's
tokens under it are checked in test_golden.py."""
import pytest
import torch
from torch import nn

import linalign
from linalign import models
from linalign.packed_linear import (Fp16Linear, cpu_can_pack, fits_fp16, pack_linears,
                                    packable, packed_layers)
from linalign.testing import ByteTokenizer, random_llama

needs_fbgemm = pytest.mark.skipif(not cpu_can_pack(), reason="torch without FBGEMM here")


def fp16_reference(layer, x):
    """The product in float64 with the weights rounded to fp16, as the packed layer's."""
    w = layer.weight.detach().half().double()
    b = 0 if layer.bias is None else layer.bias.detach().double()
    return x.double() @ w.t() + b


@needs_fbgemm
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_linear_is_the_fp16_rounded_product(bias):
    torch.manual_seed(0)
    layer = nn.Linear(576, 1536, bias=bias)
    packed = Fp16Linear(layer)
    for shape in [(1, 576), (2, 576), (3, 1, 576), (2, 5, 576)]:
        x = torch.randn(shape)
        y = packed(x)
        assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 1536)
        ref = fp16_reference(layer, x)
        # fp32 accumulation over 576 products: far below the fp16 rounding of the weights
        assert (y.double() - ref).abs().max() < 1e-4
        assert (layer(x).double() - ref).abs().max() > 1e-5  # fp16 rounding is visible
    # the weight's shape is readable; its values live only in the packed form
    assert packed.weight.shape == (1536, 576) and packed.weight.device.type == "meta"
    assert not list(packed.parameters())


@needs_fbgemm
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (49152, 576)])
def test_a_row_alone_equals_the_row_in_a_batch(shape):
    """Bit for bit, so that stacked, two-caches and a row alone decode the same tokens."""
    torch.manual_seed(1)
    layer = Fp16Linear(nn.Linear(shape[1], shape[0], bias=False))
    x = torch.randn(16, shape[1])
    full = layer(x)
    for rows in (1, 2, 3, 8):
        part = layer(x[:rows])
        assert torch.equal(part, full[:rows]), rows
    assert torch.equal(layer(x[5:6]), full[5:6])


def test_fits_fp16():
    layer = nn.Linear(4, 3)
    assert fits_fp16(layer)
    for bad in (float("inf"), float("nan"), 70000.0):
        with torch.no_grad():
            layer.weight[1, 2] = bad
        assert not fits_fp16(layer)


@needs_fbgemm
def test_pack_linears_replaces_every_linear_and_keeps_the_model_close():
    model = random_llama("tiny", logit_std=1.5)
    exact = random_llama("tiny", logit_std=1.5)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert packable(model) and packed_layers(model) == 0
    assert pack_linears(model) == linears == packed_layers(model) == 15  # 2 x 7 + the head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not packable(model)  # packed already
    with torch.inference_mode():
        got, want = model(ids).logits, exact(ids).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
    assert not torch.equal(got, want)


@needs_fbgemm
def test_a_packed_model_refuses_to_move():
    model = random_llama("tiny", logit_std=1.5)
    pack_linears(model)
    model.to("cpu").float().eval()  # where it is: fine
    for move in (lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                 lambda m: m.to("meta")):
        with pytest.raises(ValueError, match="cannot move to .* load it with packed=False"):
            move(model)


@needs_fbgemm
def test_a_layer_outside_fp16_stays_fp32():
    model = random_llama("tiny", logit_std=1.5)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    assert pack_linears(model) == 14
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


@needs_fbgemm
def test_a_packed_model_decodes_stacked_and_two_caches_alike():
    model = random_llama("tiny", logit_std=1.5)
    pack_linears(model)
    aligner = linalign.LinearAligner(model, ByteTokenizer())
    kw = dict(max_new_tokens=6, ratio=3.0)
    prompts, principles = ["hi there", "a longer prompt here"], ["be brief", "x"]
    stacked = aligner.generate(prompts, principles, **kw).token_ids
    assert aligner.generate(prompts, principles, mode="two-caches", **kw).token_ids == stacked
    alone = [aligner.generate([p], [q], **kw).token_ids[0] for p, q in zip(prompts, principles)]
    assert alone == stacked


def test_use_packing_is_the_one_choice():
    model = random_llama("tiny", logit_std=1.5)
    assert models.use_packing(model, False) is False
    assert models.use_packing(model, None) is cpu_can_pack()
    with pytest.raises(TypeError, match="packed must be True, False or None"):
        models.use_packing(model, "yes")
    half = random_llama("tiny", logit_std=1.5, dtype=torch.bfloat16)
    assert models.use_packing(half, None) is False  # only fp32 models are packed
    with pytest.raises(models.ModelLoadError, match="packed=True needs an fp32 model"):
        models.use_packing(half, True)


@pytest.mark.embedded_model
@needs_fbgemm
def test_the_embedded_model_is_packed_by_default():
    model, _ = models.load_default_model()
    assert packed_layers(model) == 211  # 30 blocks x 7 layers and the output layer
    assert type(model.lm_head) is Fp16Linear
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the input table stays
    exact, _ = models.load_default_model(packed=False)
    assert packed_layers(exact) == 0 and type(exact.lm_head) is nn.Linear


@pytest.mark.embedded_model
@needs_fbgemm
def test_a_model_folder_is_packed_only_when_asked():
    models.load_default_model(packed=False)  # makes sure the converted folder exists
    folder = next(models.cache_root().glob("*/linalign.json")).parent
    assert packed_layers(models.load_model(folder)[0]) == 0
    assert packed_layers(models.load_model(folder, packed=True)[0]) == 211
