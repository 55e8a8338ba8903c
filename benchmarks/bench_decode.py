"""Decoding throughput: Linear Alignment against plain decoding, in one run, side by side.

    python benchmarks/bench_decode.py                 # CPU: embedded SmolLM2, B = 1 and 8
    python benchmarks/bench_decode.py --quick         # B = 1, 16 tokens, one repeat
    python benchmarks/bench_decode.py --device cuda   # GPU: random-weight Llama 1B and 8B, bf16
    python benchmarks/bench_decode.py --report benchmarks/results/decode_cpu.csv  # README tables
    python benchmarks/bench_decode.py --forward-cost  # the model's own cost of more rows
    python benchmarks/bench_decode.py --linear-cost   # its linear layers by kind of product
    python benchmarks/bench_decode.py --providers plain,stacked,plain-fp32,stacked-fp32 \
        --batch 1,8 --repeats 5                       # packed against fp32, plain and LA

Providers, all in linalign's loop (``LinearAligner``), greedy, with the authors' HH setting
given explicitly (ratio 3, T 0.5, top-p 0.8; the library's default ratio is 1.0,
linalign.options.DEFAULT_RATIO):
  plain       plain decoding of the principle prompt: one forward of B rows per step, the
              step with both branches equal and ratio 0 (what the loop costs without
              Linear Alignment);
  stacked     Linear Alignment, both branches in one forward of 2B rows per step;
  two-caches  Linear Alignment, two caches and two forwards per step;
  authors     the authors' structure: two caches, two forwards per step, and their
              sort-based step: a second ``LinearAligner(model, tokenizer,
              step=linalign.baselines.authors_as_step)``.
  plain-fast, stacked-fast
              plain and stacked with fast=True: a static KV cache and, on CUDA, one decode
              step replayed as a CUDA graph. Default with --device cuda (--providers to
              choose; on the CPU there is no graph, only the static cache). Their warm-up
              runs the measured shape once, so graph capture is not timed.
  plain-fp32, stacked-fp32
              (CPU, embedded model; in the default CPU set) plain and stacked on the exact
              fp32 model (``load_default_model(packed=False)``), while the providers above
              run the default, whose linear layers are packed (``linalign.packed_linear``:
              fp16 weights, fp32 activations, FBGEMM). Their ratios: stacked-fp32 against
              plain-fp32, and plain against plain-fp32 (the packed model's speed-up).
  kl, K2, K3  (--variants; and kl-fast, K2-fast, K3-fast with fast=True) the stacked loop in
              kl mode (budget 1 nat) and with 2 and 3 principles (one forward of 3B and 4B
              rows per step); their ratios are against stacked (stacked-fast).
Every row generates exactly --new-tokens tokens (end-of-sequence ignored), so all providers
do the same work. tokens/s = B * new tokens / decode seconds (the prefill forward excluded;
it is recorded as "prefill" rows); median and interquartile spread over --repeats runs
(common.median_spread), the providers interleaved so that drift hits all alike. The ratios
printed are against "plain" (the fast one against "plain-fast"); the goal is
stacked / plain >= 0.9. The packed and the fp32 model's greedy tokens are compared too
(printed, not a check: the weights' fp16 rounding may move a near-tie).

The tokens are checked after timing (``token_checks``): every run of a provider gives the
same tokens; plain and plain-fast give the same tokens, and so do stacked, two-caches and
stacked-fast, and each variant and its -fast form. The authors' step is checked on the same
logits as linalign's (``AuthorsCheck``: one more, untimed run in which every step also calls
linalign.step): they must pick the same token wherever the row has no tie (aligned scores
equal within fp32 rounding, tied principle logits, or a token at the top-p edge: there the
authors' sort keeps one of the tied tokens and linalign keeps all); and its decoded tokens
must equal two-caches' unless such a tie came up. A failed check is printed with its rows
and positions, and the command then exits with status 1 (the rows are written anyway).

CPU: the embedded SmolLM2-135M-Instruct (its default: fp32 with packed linear layers; and
the exact fp32 model for the -fp32 providers), torch threads fixed (default 1), the chat
prompts below. GPU (or --model random): Llama-shaped models with random bf16 weights
(linalign.testing.random_llama; the 1B and 8B shapes, logits scaled to be peaked) and random
prompt ids of 64 to 128 tokens, the with-branch 24 tokens longer.
"""
import argparse
import os
import statistics
import sys
import time
import timeit

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linalign  # noqa: E402
from linalign.baselines import authors_as_step  # noqa: E402
from linalign.packed_linear import Fp16Linear, pack_linears, packed_layers  # noqa: E402
import common  # noqa: E402

PROMPTS = [
    "How do I cook rice?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain why the sky is blue.",
    "Give me three tips for learning a new language.",
    "Write a short note thanking my neighbour for watering my plants.",
    "What is the difference between a virus and a bacterium?",
    "How can I make my small apartment feel bigger?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
]
PRINCIPLE = "Answer like a pirate."
MORE_PRINCIPLES = ["Be brief.", "Use simple words."]  # the K = 2 and 3 variants
SETTING = dict(ratio=3.0, temperature=0.5, top_p=0.8, greedy=True)  # explicit, not defaults
PROVIDERS = ("plain", "stacked", "two-caches", "authors", "plain-fast", "stacked-fast")
SLOW = PROVIDERS[:4]  # the CPU default, with EXACT on the embedded model
EXACT = ("plain-fp32", "stacked-fp32")  # the exact fp32 model (the default is packed)
VARIANTS = ("kl", "K2", "K3", "kl-fast", "K2-fast", "K3-fast")  # --variants
SAME_TOKENS = (("plain", "plain-fast"), ("stacked", "two-caches", "stacked-fast"),
               ("kl", "kl-fast"), ("K2", "K2-fast"), ("K3", "K3-fast"))
SHORT = {"stacked/plain": "st/pl", "two-caches/plain": "2c/pl", "authors/plain": "au/pl",
         "stacked-fast/plain-fast": "sf/pf", "kl/stacked": "kl/st", "K2/stacked": "K2/st",
         "K3/stacked": "K3/st", "kl-fast/stacked-fast": "klf/sf",
         "K2-fast/stacked-fast": "K2f/sf", "K3-fast/stacked-fast": "K3f/sf",
         "stacked-fp32/plain-fp32": "sx/px", "plain/plain-fp32": "pl/px"}


def aligners(model, tokenizer, exact=None):
    """The loops the providers run: linalign's step, and the authors' step (two aligners
    over the same model), and linalign's on ``exact`` (the -fp32 providers' model) when
    given; end of sequence ignored, so every row does the same work."""
    out = {"linalign": linalign.LinearAligner(model, tokenizer),
           "authors": linalign.LinearAligner(model, tokenizer, step=authors_as_step)}
    if exact is not None:
        out["fp32"] = linalign.LinearAligner(exact, tokenizer)
    for aligner in out.values():
        aligner.eos_ids = []
    return out


def run_provider(loops, name, ids_with, ids_without, new_tokens, aligner=None):
    """One decoding run of provider ``name``. ``ids_with``: the principle branches' rows,
    one list per principle (3 for the K variants; the first is the one-principle branch).
    ``aligner``: run on this one instead of the provider's own (the authors' check)."""
    aligner = aligner or loops["authors" if name == "authors" else
                               "fp32" if name in EXACT else "linalign"]
    fast, kind = name.endswith("-fast"), name.removesuffix("-fast").removesuffix("-fp32")
    common_kw = dict(max_new_tokens=new_tokens, fast=fast, temperature=SETTING["temperature"],
                     top_p=SETTING["top_p"], greedy=SETTING["greedy"])
    if kind in ("kl", "K2", "K3"):
        how = dict(kl_budget=1.0) if kind == "kl" else dict(ratio=SETTING["ratio"])
        withs = ids_with[0] if kind == "kl" else ids_with[:int(kind[1])]
        result = aligner.generate_ids(withs, ids_without, **common_kw, **how)
    elif kind == "plain":
        result = aligner.generate_plain_ids(ids_with[0], **common_kw)
    else:
        mode = "two-caches" if name in ("two-caches", "authors") else "stacked"
        result = aligner.generate_ids(ids_with[0], ids_without, mode=mode,
                                      ratio=SETTING["ratio"], **common_kw)
    assert all(len(r) == new_tokens for r in result.token_ids)
    return result


def ratios(med, providers):
    """(label, value) of each provider against its baseline: plain, or plain-fast; the
    variants against stacked, or stacked-fast; stacked-fp32 against plain-fp32; and plain
    against plain-fp32 (the packed model's speed-up)."""
    out = []
    for p in providers:
        base = {"stacked-fast": "plain-fast", "plain": "plain-fp32",
                "stacked-fp32": "plain-fp32"}.get(p, "plain")
        if p in VARIANTS:
            base = "stacked-fast" if p.endswith("-fast") else "stacked"
        if p not in ("plain-fast", "plain-fp32") and p != base and base in med:
            out.append((f"{p}/{base}", med[p] / med[base]))
    return out


# ---------------------------------------------------------------------------- token checks
def tie_reason(zp, z0, ours, theirs, r, T, top_p):
    """Why linalign's step (token ``ours``) and the authors' (``theirs``) may pick different
    tokens on one row of logits, or None when the row has no tie that explains it."""
    zp, z0 = zp.double(), z0.double()
    s = zp + r * (zp - z0)
    tol = 4 * torch.finfo(torch.float32).eps * float(
        ((1 + abs(r)) * zp[[ours, theirs]].abs() + abs(r) * z0[[ours, theirs]].abs()).max())
    gap = float((s[ours] - s[theirs]).abs())
    if gap <= tol:
        return f"aligned scores equal within fp32 rounding ({gap:.2g})"
    pi = torch.softmax(zp / T, -1)
    pi32 = torch.softmax(zp.float() / T, -1)
    for t in (ours, theirs):
        above = float(pi[zp > zp[t]].sum())
        if int((zp == zp[t]).sum()) > 1 and above < top_p:
            return f"token {t}'s principle logit is tied with another token's"
        if abs(above - top_p) <= 1e-4:
            return f"token {t} is at the top-p edge (mass above it {above:.6f})"
        if float(pi32[t]) == 0.0:
            return f"token {t}'s fp32 principle probability underflows to 0"
    return None


def _row_value(x, row):
    return float(x[row]) if isinstance(x, torch.Tensor) and x.dim() else float(x)


class AuthorsCheck:
    """A step for ``LinearAligner(..., step=)``: the authors' step, with linalign.step run on
    the same logits at every call; rows where they pick different tokens are kept in
    ``ties`` (explained by ``tie_reason``) or ``unexplained``."""

    def __init__(self):
        self.calls, self.rows, self.ties, self.unexplained = 0, 0, [], []

    def __call__(self, logits_p, logits_0, **kw):
        theirs = authors_as_step(logits_p, logits_0, **kw)
        ours = linalign.step(logits_p, logits_0, **kw)
        self.calls += 1
        self.rows += logits_p.shape[0]
        for row in (theirs.tokens != ours.tokens).nonzero().flatten().tolist():
            a, b = int(ours.tokens[row]), int(theirs.tokens[row])
            why = tie_reason(logits_p[row], logits_0[row], a, b, _row_value(kw["ratio"], row),
                             _row_value(kw["temperature"], row), _row_value(kw["top_p"], row))
            (self.ties if why else self.unexplained).append(
                (self.calls, row, f"step {self.calls}, row {row}: linalign {a}, authors {b}"
                 + (f" ({why})" if why else "")))
        return theirs


def packed_against_fp32(tokens):
    """Lines saying how many rows the packed model (plain, stacked) decodes to the same
    greedy tokens as the exact fp32 model (plain-fp32, stacked-fp32), and where the others
    first differ: a comparison, not a check (fp16 weights may move a near-tie)."""
    out = []
    for p in ("plain", "stacked"):
        if p in tokens and f"{p}-fp32" in tokens:
            a, b = tokens[p][0], tokens[f"{p}-fp32"][0]
            bad = first_difference(a, b)
            out.append(f"packed {p} against {p}-fp32: {len(a) - len(bad)} of {len(a)} rows the "
                       "same greedy tokens" + (f"; the others differ from (row, position) "
                                               f"{bad[:4]}" if bad else ""))
    return out


def model_dtype(model) -> str:
    """The results' dtype field: the weights' dtype, or "packed" for a packed model."""
    if packed_layers(model):
        return "packed"
    return str(next(model.parameters()).dtype).replace("torch.", "")


def first_difference(a, b):
    """[(row, first position where the rows differ)] of two lists of token rows."""
    out = [(i, next((t for t, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))))
           for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return out + [(i, 0) for i in range(min(len(a), len(b)), max(len(a), len(b)))]


def token_checks(tokens, check=None):
    """[(ok, text)]: each provider's runs agree, the providers that compute the same tokens
    do, and the authors' step (``check``, an AuthorsCheck run) differs from linalign's only
    at ties. ``tokens``: provider -> the token rows of each of its runs."""
    out = []
    for name, runs in tokens.items():
        bad = [d for run in runs[1:] for d in first_difference(runs[0], run)]
        if bad:
            out.append((False, f"{name}: its runs differ (row, position) {bad[:4]}"))
    for group in SAME_TOKENS:
        present = [p for p in group if p in tokens]
        for p in present[1:]:
            bad = first_difference(tokens[present[0]][0], tokens[p][0])
            out.append((not bad, f"{p} = {present[0]}: " + (
                f"all {len(tokens[p][0])} rows" if not bad else
                f"rows differ (row, first position) {bad[:4]}")))
    if "authors" in tokens:
        out += _authors_checks(tokens, check)
    return out


def _authors_checks(tokens, check):
    base = "two-caches" if "two-caches" in tokens else "stacked"
    out = []
    if check is not None:
        ties = f"; {len(check.ties)} at ties: " + "; ".join(t for *_, t in check.ties[:3]) \
            if check.ties else ""
        out.append((not check.unexplained, f"authors' step on linalign's logits: "
                    f"{check.rows - len(check.ties) - len(check.unexplained)} of {check.rows} "
                    f"row-steps pick the same token{ties}" + "".join(
                        f"; NOT A TIE: {t}" for *_, t in check.unexplained[:3])))
    if base in tokens:
        bad = first_difference(tokens[base][0], tokens["authors"][0])
        explained = check is not None and bool(check.ties)
        out.append((not bad or explained, f"authors = {base}: " + (
            f"all {len(tokens[base][0])} rows" if not bad else
            f"rows differ (row, first position) {bad[:4]}" +
            (" after a tie" if explained else ""))))
    return out


# ---------------------------------------------------------------------------- measuring
def _time_providers(loops, ids_with, ids_without, new_tokens, repeats, providers):
    """Warm up, then ``repeats`` interleaved runs of every provider: (tokens/s, prefill
    seconds, token rows), each a dict provider -> one entry per run."""
    for name in providers:  # warm-up: allocator, kernels, compiled paths
        run_provider(loops, name, [w[:1] for w in ids_with], ids_without[:1], 2)
        if name.endswith("-fast"):  # the measured shape: its static cache and CUDA graph
            run_provider(loops, name, ids_with, ids_without, new_tokens)
    tps, prefill, tokens = ({p: [] for p in providers} for _ in range(3))
    for _ in range(repeats):
        for name in providers:
            res = run_provider(loops, name, ids_with, ids_without, new_tokens)
            tps[name].append(len(ids_without) * new_tokens / res.decode_seconds)
            prefill[name].append(res.prefill_seconds)
            tokens[name].append(res.token_ids)
    return tps, prefill, tokens


def measure(label, loops, ids_with, ids_without, new_tokens, repeats, info,
            providers=PROVIDERS):
    """Time every provider on one batch, then check their tokens: (Results, checks)."""
    tps, prefill, tokens = _time_providers(loops, ids_with, ids_without, new_tokens, repeats,
                                           providers)
    check = None
    if "authors" in providers:  # untimed: the authors' step against linalign's, same logits
        check = AuthorsCheck()
        model, tokenizer = loops["authors"].model, loops["authors"].tokenizer
        checked = linalign.LinearAligner(model, tokenizer, step=check)
        checked.eos_ids = []
        run_provider(loops, "authors", ids_with, ids_without, new_tokens, aligner=checked)
    dtype = model_dtype(loops["linalign"].model)
    case = dict(model=label, B=len(ids_without), new_tokens=new_tokens, dtype=dtype,
                repeats=repeats)
    results, med = [], {}
    for name in providers:
        m, s = common.median_spread(tps[name])
        med[name] = m
        results.append(common.make_result("decode", case, name, m, s, info))
        results.append(common.make_result("prefill", case, name,
                                          *common.median_spread(prefill[name]), info))
    print(f"{label:>10} {len(ids_without):>3} " + " ".join(f"{med[p]:>12.1f}" for p in providers)
          + "   " + " ".join(f"{r:>6.2f}" for _, r in ratios(med, providers)))
    checks = token_checks(tokens, check)
    for ok, text in checks:
        print(f"#   tokens {'ok' if ok else 'FAILED'}: {text}")
    for text in packed_against_fp32(tokens):
        print(f"#   {text}")
    sys.stdout.flush()
    return results, checks


def smollm2_cases(args, providers):
    model, tokenizer = linalign.load_default_model()
    exact = linalign.load_default_model(packed=False)[0] if set(EXACT) & set(providers) \
        else None
    loops = aligners(model, tokenizer, exact)
    for B in args.batch:
        prompts = (PROMPTS * B)[:B]
        withs, ids_without = loops["linalign"].branches(prompts,
                                                        [[PRINCIPLE, *MORE_PRINCIPLES]] * B)
        yield "smollm2", loops, withs, ids_without


def random_cases(args):
    from linalign.testing import ByteTokenizer, random_llama

    for shape in args.shapes:
        model = random_llama(shape, device=args.device, dtype=getattr(torch, args.dtype))
        loops = aligners(model, ByteTokenizer())
        V = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for B in args.batch:
            lengths = torch.randint(64, 129, (B,), generator=g).tolist()
            ids_without = [torch.randint(300, V, (n,), generator=g).tolist() for n in lengths]
            principles = [torch.randint(300, V, (24,), generator=g).tolist() for _ in range(3)]
            withs = [[pr + r for r in ids_without] for pr in principles]
            yield f"llama-{shape}", loops, withs, ids_without
        del model, loops
        if args.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- forward cost
def _forward_ms(model, cache_kw, R, pad, L=60, steps=30):
    """Median ms of one cached decode forward of R rows (rows 1.. left-padded by ``pad``)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(R)
    ids = torch.randint(100, 40000, (R, L), generator=g)
    mask = torch.ones(R, L + steps, dtype=torch.long)
    mask[1:, :pad] = 0
    pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
    kw = {cache_kw: DynamicCache()}
    times = []
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask[:, :L], position_ids=pos, logits_to_keep=1,
              **kw)
        nxt = pos[:, -1:] + 1
        for t in range(steps):
            t0 = time.perf_counter()
            model(input_ids=ids[:, -1:], attention_mask=mask[:, :L + t + 1], position_ids=nxt,
                  logits_to_keep=1, **kw)
            times.append(time.perf_counter() - t0)
            nxt = nxt + 1
    return statistics.median(times) * 1e3


def forward_cost(args):
    """Why stacking costs on a CPU: one decode forward of the embedded model for R rows,
    without and with left padding (rows 1.. padded by 10 of 60 prompt positions), median
    step time over 30 cached steps, median of 3 interleaved runs, for the exact fp32 model
    and the default packed one; and one 576 x 1536 linear layer for 1 and 2 rows (BLAS
    matrix-vector against matrix-matrix). Printed only."""
    from linalign.decoding import ModelCall

    models = {"fp32": linalign.load_default_model(packed=False)[0],
              "packed": linalign.load_default_model()[0]}
    cache_kw = ModelCall.of(models["fp32"]).cache_kw  # "cache" or "past_key_values"
    cases = [(w, R, pad) for R, pad in [(1, 0), (2, 0), (2, 10), (8, 0), (8, 10), (16, 0),
                                        (16, 10)] for w in models]
    runs = {c: [] for c in cases}
    for _ in range(3):
        for c in cases:
            runs[c].append(_forward_ms(models[c[0]], cache_kw, *c[1:]))
    print(f"# decode forward of SmolLM2-135M, {args.threads} thread(s), median ms "
          f"(packed: {packed_layers(models['packed'])} linear layers with fp16 weights)")
    for (w, R, pad), v in runs.items():
        print(f"{w:>6}  rows {R:>2}  {'padded' if pad else 'no pad':>7}  "
              f"{statistics.median(v):7.1f} ms")
    lin = torch.nn.Linear(576, 1536)
    with torch.inference_mode():
        for R in (1, 2):
            x = torch.randn(R, 576)
            best = min(timeit.repeat(lambda: lin(x), number=200, repeat=3)) / 200
            print(f"linear 576x1536, {R} row(s): {best * 1e6:.0f} us")


#: (out, in) features of a SmolLM2-135M block's linear layers: q, k, v, o, gate, up, down.
BLOCK_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                 (576, 1536)]


def _q4_1_like(out_f, in_f, g):
    """Random (codes, scale, minimum, fp32 weight) on a Q4_1 grid: 4-bit codes and an fp16
    scale and minimum per 32 inputs, as the embedded model's layers are stored."""
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    scale = (torch.rand(out_f, in_f // 32, generator=g) * 0.01 + 0.001).half().float()
    minimum = (-torch.rand(out_f, in_f // 32, generator=g) * 0.05).half().float()
    w = (q.view(out_f, -1, 32).float() * scale[..., None] + minimum[..., None])
    return q, scale, minimum, w.view(out_f, in_f)


def product_kinds(w, codes=None):
    """name -> function x [R, in] fp32 -> [R, out] fp32, for one weight ``w`` [out, in]:
    the ways of running a linear layer on the CPU that were measured (``codes``: the Q4_1
    (codes, scale, minimum) of ``w``, for the int4 kernel)."""
    mk = torch.ops.mkldnn
    p32, pbf = mk._reorder_linear_weight(w, None), mk._reorder_linear_weight(w.bfloat16(), None)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fp16 = Fp16Linear(lin)
    out = {"fp32 MKL": lambda x: torch.nn.functional.linear(x, w),
           "fp32 oneDNN packed": lambda x: mk._linear_pointwise(x, p32, None, "none", [], ""),
           "bf16 oneDNN packed": lambda x: mk._linear_pointwise(
               x.bfloat16(), pbf, None, "none", [], "").float(),
           "fp16 FBGEMM (default)": fp16}
    if codes is not None:
        q, scale, minimum = codes
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scale.t(), (minimum + 8 * scale).t()], -1).bfloat16().contiguous()
        out["int4 Q4_1 codes, bf16"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), packed, 32, sz).float()
    return out


def linear_cost(args, rounds=9):
    """The embedded model's linear layers by kind of product, for 1 and 2 rows: the 210
    layers of its 30 blocks (distinct random weights on a Q4_1 grid, so they come from
    memory as in a forward) and its 49152 x 576 output layer; median thread CPU time
    (``time.thread_time``, steadier than wall time on a shared machine) of ``rounds``
    interleaved rounds. Printed only."""
    g = torch.Generator().manual_seed(0)
    blocks = [_q4_1_like(o, i, g) for _ in range(30) for o, i in BLOCK_LINEARS]
    layers = [(w.shape[1], product_kinds(w, (q, sc, mn))) for q, sc, mn, w in blocks]
    head = [(576, product_kinds(torch.randn(49152, 576, generator=g) * 0.05))]
    del blocks
    times = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for R in (1, 2):
                xs = {i: torch.randn(R, i, generator=g) for i in (576, 1536)}
                for part, kinds in (("blocks", layers), ("head", head)):
                    for name in kinds[0][1]:
                        t0 = time.thread_time()
                        for in_f, layer in kinds:
                            layer[name](xs[in_f])
                        times.setdefault((part, name, R), []).append(time.thread_time() - t0)
    print(f"# linear layers of SmolLM2-135M, {args.threads} thread(s), median thread CPU ms "
          f"of {rounds} rounds")
    print(f"{'product':>22} {'blocks 1':>9} {'blocks 2':>9} {'2 / 1':>6} {'head 1':>8} "
          f"{'head 2':>8} {'2 / 1':>6}")
    for name in layers[0][1]:
        cells = []
        for part in ("blocks", "head"):
            one, two = (statistics.median(times[(part, name, R)]) * 1e3
                        if (part, name, R) in times else None for R in (1, 2))
            cells.append("        -        -      -" if one is None else
                         f"{one:>9.2f} {two:>9.2f} {two / one:>6.2f}")
        print(f"{name:>22} " + " ".join(cells))


# ---------------------------------------------------------------------------- report
def report(path):
    return "\n\n".join(report_blocks(path))


def report_blocks(path):
    """The Markdown table of a results CSV's latest decoding run, as the README shows it
    (a list of one string): a caption naming the file, the date and the commit, then per
    (model, B) each provider's median tokens/s and its ratio to its baseline."""
    results = common.read_results(path, bench="decode")
    if not results:
        raise SystemExit(f"{path}: no decode rows")
    (run,) = common.latest_runs(results)
    cells = {}
    for r in run:
        model = r.case["model"] + (f" ({r.case['dtype']})" if "dtype" in r.case else "")
        cells.setdefault((model, int(r.case["B"])), {})[r.provider] = r.median
    providers = [p for p in PROVIDERS + EXACT + VARIANTS
                 if any(p in med for med in cells.values())]
    labels = [lab for lab, _ in ratios({p: 1.0 for p in providers}, providers)]
    header = ["model", "B", *providers, *(lab.replace("/", " / ") for lab in labels)]
    lines = [[model, B, *(f"{med[p]:.1f}" if p in med else "-" for p in providers),
              *(f"{v:.2f}" for _, v in ratios(med, providers))]
             for (model, B), med in cells.items()]
    c = run[0].case
    runs = {"": "median of the runs", "1": "one run"}.get(c.get("repeats", ""),
                                                        f"median of {c.get('repeats')} runs")
    what = (f"Tokens/s ({runs}) of one decoding loop, greedy, ratio {SETTING['ratio']:g}, "
            f"T {SETTING['temperature']}, top-p {SETTING['top_p']}, {c['new_tokens']} new "
            "tokens per row.")
    return [common.caption(path, run, what) + "\n\n" + common.markdown_table(header, lines)]


# ---------------------------------------------------------------------------- command
def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (CPU), 5 (GPU)")
    ap.add_argument("--model", choices=["smollm2", "random"], default=None,
                    help="the embedded SmolLM2 (default on CPU) or random-weight Llamas "
                    "(default on GPU)")
    ap.add_argument("--shapes", default="1b,8b", help="random model shapes (default 1b,8b; "
                    "'tiny' for a dry run)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="random models' dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--providers", default=None, help="comma-separated, from "
                    f"{','.join(PROVIDERS + EXACT)} (default: the first six with --device "
                    "cuda; on the CPU the first four, with plain-fp32 and stacked-fp32 for the "
                    "embedded model)")
    ap.add_argument("--quick", action="store_true", help="B = 1, 16 tokens, one repeat")
    ap.add_argument("--variants", action="store_true", help="add kl mode and 2 and 3 "
                    "principles (kl, K2, K3; with -fast versions where stacked-fast runs) "
                    "to the providers, with their cost against stacked")
    ap.add_argument("--out", default=None, help="CSV to append to (default: "
                    "benchmarks/results/decode_<device>.csv)")
    ap.add_argument("--report", metavar="CSV", help="print the Markdown table of the latest "
                    "run in CSV (as the README shows it) and exit")
    ap.add_argument("--forward-cost", action="store_true", help="time the embedded model's "
                    "decode forward for 1 to 16 rows, with and without padding, fp32 and "
                    "packed, and exit")
    ap.add_argument("--linear-cost", action="store_true", help="time the embedded model's "
                    "linear layers for 1 and 2 rows by kind of product (fp32, oneDNN fp32 "
                    "and bf16, int4, FBGEMM fp16) and exit")
    return ap


def chosen_providers(ap, args, device):
    embedded = (args.model or ("smollm2" if device.type == "cpu" else "random")) == "smollm2"
    providers = tuple(args.providers.split(",")) if args.providers else \
        (PROVIDERS if device.type == "cuda" else SLOW + (EXACT if embedded else ()))
    if args.variants:
        providers += tuple(v for v in VARIANTS if not v.endswith("-fast") or
                           "stacked-fast" in providers)
    unknown = set(providers) - set(PROVIDERS + VARIANTS + EXACT)
    if unknown or "plain" not in providers:
        ap.error(f"--providers: unknown {sorted(unknown)}" if unknown else
                 "--providers must include plain (the baseline)")
    if set(EXACT) & set(providers) and not embedded:
        ap.error("--providers: plain-fp32 and stacked-fp32 are for the embedded model (the "
                 "default on the CPU, --model smollm2)")
    if "stacked-fp32" in providers and "plain-fp32" not in providers:
        ap.error("--providers: stacked-fp32 needs plain-fp32 (its baseline)")
    if "stacked-fast" in providers and "plain-fast" not in providers:
        ap.error("--providers: stacked-fast needs plain-fast (its baseline)")
    if any(v in providers for v in VARIANTS) and "stacked" not in providers:
        ap.error("--providers: kl, K2, K3 need stacked (their baseline)")
    return providers


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.report:
        return print(report(args.report))
    torch.set_num_threads(args.threads)
    if args.forward_cost:
        return forward_cost(args)
    if args.linear_cost:
        return linear_cost(args)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.shapes = args.shapes.split(",")
    repeats = args.repeats or (3 if args.device == "cpu" else 5)
    if args.quick:
        args.batch, args.new_tokens, repeats = [1], 16, 1
    device = torch.device(args.device)
    providers = chosen_providers(ap, args, device)
    info = common.run_info(device, args.threads)
    print(f"# {info['device']}, {args.threads} torch thread(s), {info['versions']}, "
          f"commit {info['commit']}")
    print(f"# tokens/s, median of {repeats}, {args.new_tokens} new tokens per row")
    print(f"{'model':>10} {'B':>3} " + " ".join(f"{p:>12}" for p in providers) + "   " +
          " ".join(f"{SHORT[lab]:>6}" for lab, _ in
                   ratios({p: 1.0 for p in providers}, providers)))
    args.model = args.model or ("smollm2" if device.type == "cpu" else "random")
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    cases = smollm2_cases(args, providers) if args.model == "smollm2" else random_cases(args)
    out = args.out or os.path.join(common.RESULTS, f"decode_{device.type}.csv")
    n, failed = 0, 0
    for label, loops, ids_with, ids_without in cases:
        results, checks = measure(label, loops, ids_with, ids_without, args.new_tokens,
                                  repeats, info, providers)
        common.write_results(out, results)  # as measured: a cut run keeps its rows
        n += len(results)
        failed += sum(not ok for ok, _ in checks)
    print(f"# {n} rows appended to {out}" + (f"; {failed} token check(s) FAILED" if failed
                                             else "; every token check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


# ---- pytest entry points: the harness on a tiny random model (CPU, a few tokens) ----
def _tiny_run(providers, repeats=2, new_tokens=4):
    from linalign.testing import ByteTokenizer, random_llama

    torch.set_num_threads(1)
    exact = None
    model = random_llama("tiny", logit_std=1.5)
    if set(EXACT) & set(providers):  # as on the embedded model: the default packed
        exact = random_llama("tiny", logit_std=1.5)
        pack_linears(model)
    loops = aligners(model, ByteTokenizer(), exact)
    withs, ids_without = loops["linalign"].branches(PROMPTS[:2],
                                                    [[PRINCIPLE, *MORE_PRINCIPLES]] * 2)
    info = common.run_info(torch.device("cpu"), 1)
    return measure("tiny", loops, withs, ids_without, new_tokens, repeats, info, providers)


def test_decode_benchmark_harness(tmp_path):
    """Every provider and variant on a tiny model: the token checks pass (each ratio's two
    sides did the same work, and the providers that compute the same tokens gave the same
    tokens), and the rows read back equal through the one reader and show in the report."""
    providers = PROVIDERS + VARIANTS
    results, checks = _tiny_run(providers)
    assert all(ok for ok, _ in checks), checks
    texts = " | ".join(text for _, text in checks)
    for p in ("plain-fast = plain", "two-caches = stacked", "stacked-fast = stacked",
              "kl-fast = kl", "K2-fast = K2", "K3-fast = K3", "authors = two-caches: all 2 rows",
              "authors' step on linalign's logits: 8 of 8 row-steps"):
        assert p in texts
    decode = [r for r in results if r.bench == "decode"]
    assert [r.provider for r in decode] == list(providers)
    assert all(r.median > 0 and r.spread >= 0 and r.unit == "tokens/s" and
               r.case == dict(model="tiny", B="2", new_tokens="4", dtype="float32",
                              repeats="2") for r in decode)
    out = tmp_path / "decode.csv"
    common.write_results(out, results)
    assert common.read_results(out) == results
    text = report(out)
    for r in decode:
        assert f" {r.median:.1f} " in text


def test_token_checks_name_the_difference():
    same = [[1, 2, 3], [4, 5, 6]]
    checks = token_checks({"stacked": [same], "two-caches": [[[1, 2, 3], [4, 9, 6]]],
                           "plain": [same, [[1, 2, 3], [4, 5, 7]]]})
    assert (False, "plain: its runs differ (row, position) [(1, 2)]") in checks
    assert (False, "two-caches = stacked: rows differ (row, first position) [(1, 1)]") in checks


def test_authors_check_explains_a_tie_at_the_top_p_edge():
    """Tokens 1 and 2 tie in the principle branch at the nucleus edge: linalign keeps both,
    the authors' sort keeps one. Whichever it keeps, one of the two rows makes the steps
    pick different tokens, and the check calls it a tie, not a failure."""
    zp = torch.tensor([[2.0, 1.0, 1.0, -5.0]] * 2)
    z0 = torch.tensor([[2.0, 1.0, -3.0, 0.0], [2.0, -3.0, 1.0, 0.0]])
    check = AuthorsCheck()
    check(zp, z0, ratio=torch.tensor([3.0, 3.0]), temperature=torch.tensor([1.0, 1.0]),
          top_p=torch.tensor([0.7, 0.7]), greedy=True)
    assert len(check.ties) == 1 and not check.unexplained
    assert "tied" in check.ties[0][2]


def test_packed_and_fp32_providers_side_by_side():
    """plain and stacked on a packed tiny model beside plain-fp32 and stacked-fp32 on the
    exact one: their ratios (stacked / plain, stacked-fp32 / plain-fp32, and the packed
    speed-up plain / plain-fp32), the token comparison lines, and the report's columns."""
    if not linalign.packed_linear.cpu_can_pack():
        import pytest
        pytest.skip("torch without FBGEMM here")
    providers = ("plain", "stacked", "plain-fp32", "stacked-fp32")
    results, checks = _tiny_run(providers)
    assert all(ok for ok, _ in checks), checks
    decode = [r for r in results if r.bench == "decode"]
    assert [r.provider for r in decode] == list(providers)
    assert {r.case["dtype"] for r in decode} == {"packed"}
    med = {r.provider: r.median for r in decode}
    assert [lab for lab, _ in ratios(med, providers)] == [
        "plain/plain-fp32", "stacked/plain", "stacked-fp32/plain-fp32"]
    lines = packed_against_fp32({p: [[[1, 2], [3, 4]]] for p in providers})
    assert lines == [f"packed {p} against {p}-fp32: 2 of 2 rows the same greedy tokens"
                     for p in ("plain", "stacked")]
