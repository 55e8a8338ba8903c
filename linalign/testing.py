"""Synthetic two-branch logits that look like real next-token distributions, for tests and
benchmarks (never time or test a sampler on uniform noise: real rows are peaked).

Model of a row: the vocabulary in a random order, logit of the token of rank k
``T * (-s * log(k) + 0.3 * N(0, 1))`` (Zipf's law, as language-model rows roughly follow),
with a steepness ``s`` drawn per row and ``T`` the temperature the rows are meant for. At
that temperature, with V = 49152, a steepness of 1.2 gives a 0.8 nucleus of 250 to 450
tokens, 1.5 about a dozen, 2.0 three to five; 1.0 is a flat row (thousands). The
without-branch is the same row moved by ``0.5 * N(0, 1)`` per token plus a principle-like
shift of +-2 on 20 tokens among the 200 most likely.
"""
import torch


def zipf_logits(B, V, *, steepness=(1.2, 2.0), temperature=1.0, generator=None, device="cpu",
                dtype=torch.float32):
    """[B, V] principle-branch logits; ``steepness`` is a number or a (low, high) range."""
    g = generator
    lo, hi = (steepness, steepness) if isinstance(steepness, (int, float)) else steepness
    s = lo + (hi - lo) * torch.rand(B, 1, generator=g)
    ranks = torch.argsort(torch.rand(B, V, generator=g), dim=-1).float() + 1.0
    z = temperature * (-s * torch.log(ranks) + 0.3 * torch.randn(B, V, generator=g)) + 5.0
    return z.to(device=device, dtype=dtype)


def without_branch(logits_p, *, generator=None):
    """Logits of the same conversation without the principle (see the module docstring)."""
    g = generator
    zp = logits_p.float().cpu()
    B, V = zp.shape
    z0 = zp + 0.5 * torch.randn(B, V, generator=g)
    k = min(V, 200)
    top = zp.topk(k, dim=-1).indices
    pick = torch.argsort(torch.rand(B, k, generator=g), dim=-1)[:, : min(20, k)]
    cols = top.gather(-1, pick)
    shift = 2.0 * (torch.randint(0, 2, cols.shape, generator=g).float() * 2 - 1)
    z0.scatter_add_(-1, cols, shift)
    return z0.to(device=logits_p.device, dtype=logits_p.dtype)


def two_branch(B, V, *, seed=0, device="cpu", dtype=torch.float32, **kw):
    """(logits_p, logits_0) drawn with a fixed seed; keyword arguments go to zipf_logits."""
    g = torch.Generator().manual_seed(seed)
    zp = zipf_logits(B, V, generator=g, device=device, dtype=dtype, **kw)
    return zp, without_branch(zp, generator=g)


# ---------------------------------------------------------------------------- models
#: Llama shapes for decode benchmarks with random weights (Llama 3.2 1B and Llama 3 8B).
LLAMA_SHAPES = {
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=8192),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=8192),
}


def random_llama(shape="tiny", *, seed=0, device="cpu", dtype=torch.float32, logit_std=4.0,
                 eos_token_id=257, pad_token_id=258):
    """A Llama of one of ``LLAMA_SHAPES`` with random weights, built in code (no download).

    Random weights give nearly flat next-token rows (logits of standard deviation about
    0.02 * sqrt(hidden)); the output head is scaled so that the logits' standard deviation
    is about ``logit_std`` and rows are peaked like a trained model's, since the step's cost
    depends on the nucleus. (At temperature 0.5 a 0.8 nucleus holds a handful of tokens with
    4.0 at V = 128256, and about ten with 1.5 at V = 320.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_std / (config.initializer_range
                                              * config.hidden_size ** 0.5))
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


class ByteTokenizer:
    """A byte-level tokenizer without a chat template, for models built in code: ids 0-255
    are bytes, 256 BOS, 257 EOS, 258 PAD; ids above 258 decode to nothing."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special_tokens and i <= 258:
                out += ("<bos>", "<eos>", "<pad>")[i - 256].encode()
        return out.decode("utf-8", errors="replace")
