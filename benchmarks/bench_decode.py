"""Decoding throughput: Linear Alignment against plain decoding, in one run, side by side.

    python benchmarks/bench_decode.py                 # CPU: embedded SmolLM2, B = 1 and 8
    python benchmarks/bench_decode.py --quick         # B = 1, 16 tokens, one repeat
    python benchmarks/bench_decode.py --device cuda   # GPU: random-weight Llama 1B and 8B, bf16
    python benchmarks/bench_decode.py --report benchmarks/results/decode_cpu.csv
    python benchmarks/bench_decode.py --forward-cost  # the model's own cost of more rows

Providers, all in linalign's loop (``LinearAligner``), greedy, ratio 3, T 0.5, top-p 0.8:
  plain       plain decoding of the principle prompt: one forward of B rows per step, the
              step with both branches equal and ratio 0 (what the loop costs without
              Linear Alignment);
  stacked     Linear Alignment, both branches in one forward of 2B rows per step;
  two-caches  Linear Alignment, two caches and two forwards per step;
  authors     the authors' structure: two caches, two forwards per step, and their
              sort-based step (linalign.authors) instead of linalign.step.
  plain-fast, stacked-fast
              plain and stacked with fast=True: a static KV cache and, on CUDA, one decode
              step replayed as a CUDA graph. Default with --device cuda (--providers to
              choose; on the CPU there is no graph, only the static cache). Their warm-up
              runs the measured shape once, so graph capture is not timed.
  kl, K2, K3  (--variants; and kl-fast, K2-fast, K3-fast with fast=True) the stacked loop in
              kl mode (budget 1 nat) and with 2 and 3 principles (one forward of 3B and 4B
              rows per step); their ratios are against stacked (stacked-fast).
Every row generates exactly --new-tokens tokens (end-of-sequence ignored), so all providers
do the same work. tokens/s = B * new tokens / decode seconds (the prefill forward excluded);
median over --repeats runs, the providers interleaved so that drift hits all alike. The
ratios printed are against "plain" (the fast one against "plain-fast"); the goal is
stacked / plain >= 0.9.

CPU: the embedded SmolLM2-135M-Instruct (fp32), torch threads fixed (default 1), the chat
prompts below. GPU (or --model random): Llama-shaped models with random bf16 weights
(linalign.testing.random_llama; the 1B and 8B shapes, logits scaled to be peaked) and random
prompt ids of 64 to 128 tokens, the with-branch 24 tokens longer.
"""
import argparse
import csv
import datetime
import os
import statistics
import sys
import time
import timeit

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linalign  # noqa: E402
from linalign.api import StepOutput  # noqa: E402
from linalign.authors import authors_step  # noqa: E402
from bench_step import RESULTS, device_name, versions  # noqa: E402

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
SETTING = dict(ratio=3.0, temperature=0.5, top_p=0.8, greedy=True)
PROVIDERS = ("plain", "stacked", "two-caches", "authors", "plain-fast", "stacked-fast")
SLOW = PROVIDERS[:4]  # the CPU default
VARIANTS = ("kl", "K2", "K3", "kl-fast", "K2-fast", "K3-fast")  # --variants (issue 6)
SHORT = {"stacked/plain": "st/pl", "two-caches/plain": "2c/pl", "authors/plain": "au/pl",
         "stacked-fast/plain-fast": "sf/pf", "kl/stacked": "kl/st", "K2/stacked": "K2/st",
         "K3/stacked": "K3/st", "kl-fast/stacked-fast": "klf/sf",
         "K2-fast/stacked-fast": "K2f/sf", "K3-fast/stacked-fast": "K3f/sf"}
FIELDS = ["op", "model", "B", "new_tokens", "provider", "tokens_per_s", "spread", "prefill_s",
          "device", "threads", "versions", "date"]


def authors_as_step(logits_p, logits_0, *, ratio, temperature, top_p, greedy, **_):
    """The authors' step behind linalign.step's interface (tokens only)."""
    B = logits_p.shape[0]
    r = ratio if not isinstance(ratio, torch.Tensor) else ratio[:, None]
    T = float(temperature[0]) if isinstance(temperature, torch.Tensor) else temperature
    p = float(top_p[0]) if isinstance(top_p, torch.Tensor) else top_p
    tokens = authors_step(logits_p, logits_0, ratio=r, temperature=T, top_p=p, greedy=greedy)
    zeros = torch.zeros(B, dtype=torch.int32, device=logits_p.device)
    return StepOutput(tokens, zeros.float(), zeros, zeros)


def run_provider(aligner, name, ids_with, ids_without, new_tokens):
    """``ids_with``: the principle branches' rows, one list per principle (3 for the K
    variants; the first is the one-principle branch)."""
    aligner._step = authors_as_step if name == "authors" else linalign.step
    fast = name.endswith("-fast")
    kind = name.removesuffix("-fast")
    if kind in ("kl", "K2", "K3"):
        how = dict(kl_budget=1.0) if kind == "kl" else dict(ratio=SETTING["ratio"])
        withs = ids_with[0] if kind == "kl" else ids_with[:int(kind[1])]
        result = aligner.generate_ids(withs, ids_without, max_new_tokens=new_tokens,
                                      fast=fast, temperature=SETTING["temperature"],
                                      top_p=SETTING["top_p"], greedy=True, **how)
        assert all(len(r) == new_tokens for r in result.token_ids)
        return result
    ids_with = ids_with[0]
    if name.startswith("plain"):
        result = aligner.generate_plain_ids(ids_with, max_new_tokens=new_tokens,
                                            temperature=SETTING["temperature"],
                                            top_p=SETTING["top_p"], greedy=True, fast=fast)
    else:
        mode = "two-caches" if name in ("two-caches", "authors") else "stacked"
        result = aligner.generate_ids(ids_with, ids_without, max_new_tokens=new_tokens,
                                      mode=mode, fast=fast, **SETTING)
    aligner._step = linalign.step
    assert all(len(r) == new_tokens for r in result.token_ids)
    return result


def ratios(med, providers):
    """(label, value) of each provider against its baseline: plain, or plain-fast."""
    out = []
    for p in providers:
        base = "plain-fast" if p == "stacked-fast" else "plain"
        if p in VARIANTS:
            base = "stacked-fast" if p.endswith("-fast") else "stacked"
        if p not in ("plain", "plain-fast") and base in med:
            out.append((f"{p}/{base}", med[p] / med[base]))
    return out


def measure(label, aligner, ids_with, ids_without, new_tokens, repeats, info,
            providers=PROVIDERS):
    B = len(ids_without)
    for name in providers:  # warm-up: allocator, kernels, compiled paths
        run_provider(aligner, name, [w[:1] for w in ids_with], ids_without[:1], 2)
        if name.endswith("-fast"):  # the measured shape: its static cache and CUDA graph
            run_provider(aligner, name, ids_with, ids_without, new_tokens)
    tps = {p: [] for p in providers}
    prefill = {p: [] for p in providers}
    for _ in range(repeats):
        for name in providers:
            res = run_provider(aligner, name, ids_with, ids_without, new_tokens)
            tps[name].append(B * new_tokens / res.decode_seconds)
            prefill[name].append(res.prefill_seconds)
    rows = []
    med = {p: statistics.median(v) for p, v in tps.items()}
    for name in providers:
        spread = max(tps[name]) - min(tps[name])
        rows.append(dict(op="decode", model=label, B=B, new_tokens=new_tokens, provider=name,
                         tokens_per_s=f"{med[name]:.2f}", spread=f"{spread:.2f}",
                         prefill_s=f"{statistics.median(prefill[name]):.4f}", **info))
    print(f"{label:>10} {B:>3} " + " ".join(f"{med[p]:>12.1f}" for p in providers) + "   " +
          " ".join(f"{r:>6.2f}" for _, r in ratios(med, providers)))
    sys.stdout.flush()
    return rows


def smollm2_cases(args):
    model, tokenizer = linalign.load_default_model()
    aligner = linalign.LinearAligner(model, tokenizer)
    aligner.eos_ids = []  # fixed length: every provider does the same work
    for B in args.batch:
        prompts = (PROMPTS * B)[:B]
        withs, ids_without = aligner.branches(prompts, [[PRINCIPLE, *MORE_PRINCIPLES]] * B)
        yield "smollm2", aligner, withs, ids_without


def random_cases(args):
    from linalign.testing import ByteTokenizer, random_llama

    for shape in args.shapes:
        model = random_llama(shape, device=args.device, dtype=getattr(torch, args.dtype))
        aligner = linalign.LinearAligner(model, ByteTokenizer())
        aligner.eos_ids = []
        V = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for B in args.batch:
            lengths = torch.randint(64, 129, (B,), generator=g).tolist()
            ids_without = [torch.randint(300, V, (n,), generator=g).tolist() for n in lengths]
            principles = [torch.randint(300, V, (24,), generator=g).tolist() for _ in range(3)]
            withs = [[pr + r for r in ids_without] for pr in principles]
            yield f"llama-{shape}", aligner, withs, ids_without
        del model, aligner
        if args.device == "cuda":
            torch.cuda.empty_cache()


def forward_cost(args):
    """Why stacking costs on a CPU: one decode forward of the embedded model for R rows,
    without and with left padding (rows 1.. padded by 10 of 60 prompt positions), median
    step time over 30 cached steps, median of 3 interleaved runs; and one 576 x 1536 linear
    layer for 1 and 2 rows (BLAS matrix-vector against matrix-matrix)."""
    from transformers import DynamicCache

    model, tokenizer = linalign.load_default_model()
    cache_name = linalign.LinearAligner(model, tokenizer)._cache_kw  # cache / past_key_values

    def one(R, pad, L=60, steps=30):
        g = torch.Generator().manual_seed(R)
        ids = torch.randint(100, 40000, (R, L), generator=g)
        mask = torch.ones(R, L + steps, dtype=torch.long)
        mask[1:, :pad] = 0
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        cache_kw = {cache_name: DynamicCache()}
        times = []
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask[:, :L], position_ids=pos,
                  logits_to_keep=1, **cache_kw)
            nxt = pos[:, -1:] + 1
            for t in range(steps):
                t0 = time.perf_counter()
                model(input_ids=ids[:, -1:], attention_mask=mask[:, :L + t + 1],
                      position_ids=nxt, logits_to_keep=1, **cache_kw)
                times.append(time.perf_counter() - t0)
                nxt = nxt + 1
        return statistics.median(times) * 1e3

    cases = [(1, 0), (2, 0), (2, 10), (8, 0), (8, 10), (16, 0), (16, 10)]
    runs = {c: [] for c in cases}
    for _ in range(3):
        for c in cases:
            runs[c].append(one(*c))
    print(f"# decode forward of SmolLM2-135M, {args.threads} thread(s), median ms")
    for (R, pad), v in runs.items():
        print(f"rows {R:>2}  {'padded' if pad else 'no pad':>7}  {statistics.median(v):7.1f} ms")
    lin = torch.nn.Linear(576, 1536)
    with torch.inference_mode():
        for R in (1, 2):
            x = torch.randn(R, 576)
            best = min(timeit.repeat(lambda: lin(x), number=200, repeat=3)) / 200
            print(f"linear 576x1536, {R} row(s): {best * 1e6:.0f} us")


def report(csv_path):
    with open(csv_path) as f:
        every = list(csv.DictReader(f))
    latest = max(r["date"] for r in every)
    rows = [r for r in every if r["date"] == latest]
    print(f"{rows[0]['device']}, {rows[0]['threads']} thread(s), {rows[0]['versions']}, "
          f"{latest}; tokens/s (median), {rows[0]['new_tokens']} new tokens per row\n")
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], int(r["B"])), {})[r["provider"]] = float(r["tokens_per_s"])
    providers = [p for p in PROVIDERS + VARIANTS if any(p in med for med in cells.values())]
    labels = [lab for lab, _ in ratios({p: 1.0 for p in providers}, providers)]
    print("| model | B | " + " | ".join(providers) + " | " +
          " | ".join(lab.replace("/", " / ") for lab in labels) + " |")
    print("|---" * (2 + len(providers) + len(labels)) + "|")
    for (model, B), med in cells.items():
        print(f"| {model} | {B} | " + " | ".join(f"{med[p]:.1f}" if p in med else "-"
                                                for p in providers) + " | " +
              " | ".join(f"{r:.2f}" for _, r in ratios(med, providers)) + " |")


def main(argv=None):
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
                    f"{','.join(PROVIDERS)} (default: all with --device cuda, the first four "
                    "on the CPU)")
    ap.add_argument("--quick", action="store_true", help="B = 1, 16 tokens, one repeat")
    ap.add_argument("--variants", action="store_true", help="add kl mode and 2 and 3 "
                    "principles (kl, K2, K3; with -fast versions where stacked-fast runs) "
                    "to the providers, with their cost against stacked")
    ap.add_argument("--out", default=None, help="CSV to append to (default: "
                    "benchmarks/results/decode_<device>.csv)")
    ap.add_argument("--report", metavar="CSV", help="print the latest run as markdown")
    ap.add_argument("--forward-cost", action="store_true", help="time the embedded model's "
                    "decode forward for 1 to 16 rows, with and without padding, and exit")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.forward_cost:
        torch.set_num_threads(args.threads)
        return forward_cost(args)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.shapes = args.shapes.split(",")
    repeats = args.repeats or (3 if args.device == "cpu" else 5)
    if args.quick:
        args.batch, args.new_tokens, repeats = [1], 16, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    providers = tuple(args.providers.split(",")) if args.providers else \
        (PROVIDERS if device.type == "cuda" else SLOW)
    if args.variants:
        providers += tuple(v for v in VARIANTS if not v.endswith("-fast") or
                           "stacked-fast" in providers)
    unknown = set(providers) - set(PROVIDERS + VARIANTS)
    if unknown or "plain" not in providers:
        ap.error(f"--providers: unknown {sorted(unknown)}" if unknown else
                 "--providers must include plain (the baseline)")
    if "stacked-fast" in providers and "plain-fast" not in providers:
        ap.error("--providers: stacked-fast needs plain-fast (its baseline)")
    if any(v in providers for v in VARIANTS) and "stacked" not in providers:
        ap.error("--providers: kl, K2, K3 need stacked (their baseline)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = dict(device=device_name(device), threads=args.threads, versions=versions(),
                date=stamp)
    print(f"# {info['device']}, {args.threads} torch thread(s), {info['versions']}")
    print(f"# tokens/s, median of {repeats}, {args.new_tokens} new tokens per row")
    print(f"{'model':>10} {'B':>3} " + " ".join(f"{p:>12}" for p in providers) + "   " +
          " ".join(f"{SHORT[lab]:>6}" for lab, _ in
                   ratios({p: 1.0 for p in providers}, providers)))
    args.model = args.model or ("smollm2" if device.type == "cpu" else "random")
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    cases = smollm2_cases(args) if args.model == "smollm2" else random_cases(args)
    out = args.out or os.path.join(RESULTS, f"decode_{device.type}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    new = not os.path.exists(out)
    n = 0
    with open(out, "a", newline="") as f:  # rows written as measured: a cut run keeps them
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for label, aligner, ids_with, ids_without in cases:
            rows = measure(label, aligner, ids_with, ids_without, args.new_tokens, repeats,
                           info, providers)
            w.writerows(rows)
            f.flush()
            n += len(rows)
    print(f"# {n} rows appended to {out}")


if __name__ == "__main__":
    main()


# ---- pytest entry point: the harness runs (tiny random model, CPU, a few tokens) ----
def test_decode_benchmark_harness():
    from linalign.testing import ByteTokenizer, random_llama

    torch.set_num_threads(1)
    aligner = linalign.LinearAligner(random_llama("tiny", logit_std=1.5), ByteTokenizer())
    aligner.eos_ids = []
    withs, ids_without = aligner.branches(PROMPTS[:2], [[PRINCIPLE, *MORE_PRINCIPLES]] * 2)
    rows = measure("tiny", aligner, withs, ids_without, 4, 1, dict(
        device="cpu", threads=1, versions=versions(), date="test"), PROVIDERS + VARIANTS[:3])
    assert [r["provider"] for r in rows] == list(PROVIDERS + VARIANTS[:3])
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
