"""Long sequences: exact attention against every approximate variant, and `policy="long"` end
to end. A script, not a test; results go to docs/BENCHMARKS.md.

Part 1 (`ops`): time (median) and peak memory of one attention call at n in --seqs for
- anchors: exact SDPA (PyTorch's default backend), a plain-torch FAVOR+ (the textbook
  implementation: features by einsum, non-causal), and on CUDA FlexAttention with a causal
  sliding-window BlockMask (compiled);
- attnopt's ops: sparse Longformer (local + global blocks), sparse causal window (the window
  anchor's pattern, on the flash kernel's block-sparse path on CUDA), performer, hybrid,
  top-k.
Each variant's output is first compared with exact attention on the same inputs (normwise
relative error on random inputs: how far the approximation is from exact when attention is
nearly uniform — the guard measures it on the user's model).

Part 2 (`e2e`): a 4-layer, 256-wide encoder (4 heads) at n=4096: the original against
`attnopt.optimize(model, policy="long")`, with the guard on; how many sites were rewritten,
the output error, the same graph under `policy="exact"` (the captured graph with every site
exact: what the approximations are measured against, apart from leaving PyTorch's eager
encoder path), and the time that graph spends outside attention (the ceiling on any speedup
from attention rewrites). Two models: `random` (random weights, post-norm) and `trained`
(`local_encoder.py`: trained on a local task, pre-norm); for the trained one also `long` with
the guard's budget lifted (every site rewritten), `long` guarded by the task's accuracy on a
held-out sequence (`metric=`, allowed drop 0.01) instead of the budget, and each model's
task accuracy.

Peak memory: CUDA's allocator peak above what was allocated before the call; on CPU the peak
resident set (VmHWM) of a fresh process running the one call, above its resident set before
it (in one long-lived process freed memory stays cached and hides new peaks).

    PYTHONPATH=. python benchmarks/bench_long.py [--parts ops e2e] [--seqs 1024 4096 16384]
        [--heads 8] [--dim 64] [--exact-max 16384] [--only WORD ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

import attnopt
import local_encoder  # benchmarks/local_encoder.py, next to this script
from attnopt.ops.features import FEATURE_EPS, draw_projection
from attnopt.ops.sparsity import SparsePattern
from attnopt.timing import median_ms


def _timed(fn, device: str, runs: int) -> float:
    if device == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
    return median_ms(fn, runs, warmup=1)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _cpu_peak_child(name: str, n: int, heads: int, dim: int, window: int) -> float:
    """Runs in a fresh process: peak RSS (MiB) one call of `name` adds."""
    torch.set_num_threads(2)
    fn, _ = variants("cpu", heads, dim, window)[name]
    with torch.no_grad():  # load the code paths on a small input first
        fn(*(torch.randn(1, heads, 256, dim) for _ in range(3)))
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, dim, generator=generator) for _ in range(3))
    base = _rss_kib("VmRSS")
    with torch.no_grad():
        fn(q, k, v)
    return (_rss_kib("VmHWM") - base) / 1024


def peak_mib(fn, device: str, spec: tuple) -> float:
    """Peak memory one call adds on top of what is allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_child, spec)


def plain_favor(q, k, v, projection):
    """The textbook FAVOR+ in plain torch (non-causal, max-stabilized, the same ε as attnopt's
    features): the anchor the Performer op is measured against."""
    scale = q.shape[-1] ** -0.25
    q, k = q * scale, k * scale
    omega = projection.to(q.dtype)
    q_dash = torch.einsum("bhnd,md->bhnm", q, omega)
    k_dash = torch.einsum("bhnd,md->bhnm", k, omega)
    q_diag = (q * q).sum(-1, keepdim=True) / 2
    k_diag = (k * k).sum(-1, keepdim=True) / 2
    ratio = omega.shape[0] ** -0.5
    q_prime = ratio * (torch.exp(q_dash - q_diag - q_dash.amax(-1, keepdim=True)) + FEATURE_EPS)
    k_prime = ratio * (torch.exp(k_dash - k_diag - k_dash.amax()) + FEATURE_EPS)
    kv = torch.einsum("bhnm,bhnd->bhmd", k_prime, v)
    normalizer = torch.einsum("bhnm,bhm->bhn", q_prime, k_prime.sum(2))
    return torch.einsum("bhnm,bhmd->bhnd", q_prime, kv) / normalizer[..., None]


def variants(device: str, heads: int, dim: int, window: int):
    ops = torch.ops.attnopt
    features = 256
    projection = draw_projection(features, dim, 0).to(device)
    longformer = SparsePattern.longformer(1, 1, 64).to_dict().values()
    causal_window = SparsePattern.sliding_window(window, 0, 64).to_dict().values()
    table = {
        "exact (sdpa)": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), False),
        "exact causal (sdpa)": (lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True), True),
        f"plain FAVOR+ m={features}": (lambda q, k, v: plain_favor(q, k, v, projection), False),
        f"performer m={features}": (lambda q, k, v: ops.performer(
            q, k, v, projection, None, False, None, False, "softmax", 64), False),
        f"performer causal m={features}": (lambda q, k, v: ops.performer(
            q, k, v, projection, None, True, None, False, "softmax", 64), True),
        "linear (elu+1)": (lambda q, k, v: ops.linear_attention(q, k, v, None, False), False),
        "linear causal (elu+1)": (lambda q, k, v: ops.linear_attention(q, k, v, None, True),
                                  True),
        "sparse longformer (64, ±1 block, 1 global)": (lambda q, k, v: ops.sparse_attention(
            q, k, v, None, False, None, False, *longformer), False),
        f"sparse causal window {window}": (lambda q, k, v: ops.sparse_attention(
            q, k, v, None, True, None, False, *causal_window), True),
        "hybrid (window 64, m=128)": (lambda q, k, v: ops.performer_window(
            q, k, v, projection[:128], None, False, None, False, 64, 64), False),
        "top-k (block 64, k=8)": (lambda q, k, v: ops.topk_attention(
            q, k, v, None, False, None, False, 64, 8, 1), False),
    }
    if device == "cuda":  # the op runs fused kernels there; its torch form for comparison
        from attnopt.ops.linear import linear_attention_reference
        table["linear (elu+1), torch form"] = (
            lambda q, k, v: linear_attention_reference(q, k, v), False)
        table["linear causal (elu+1), torch form"] = (
            lambda q, k, v: linear_attention_reference(q, k, v, is_causal=True), True)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def flex_window(q, k, v):
            n = q.shape[2]
            if n not in masks:
                masks[n] = create_block_mask(
                    lambda b, h, i, j: (j <= i) & (i - j <= window), None, None, n, n,
                    device=device)
            return compiled(q, k, v, block_mask=masks[n])
        table[f"flex causal window {window}"] = (flex_window, True)
    return table


def run_ops(args, device: str, dtype) -> list[dict]:
    rows = []
    table = variants(device, args.heads, args.dim, args.window)
    if args.only:
        table = {name: entry for name, entry in table.items()
                 if any(word in name for word in args.only)}
    for n in args.seqs:
        generator = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=generator)
                   .to(device, dtype) for _ in range(3))
        references = {}
        with torch.no_grad():
            for causal in (False, True):
                if n <= args.exact_max:
                    references[causal] = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), is_causal=causal)
            for name, (fn, causal) in table.items():
                if name.startswith("exact") and n > args.exact_max:
                    rows.append({"n": n, "variant": name, "skipped": f"n > {args.exact_max}"})
                    continue
                out = fn(q, k, v)
                ref = references.get(causal)
                rel = float((out.float() - ref).norm() / ref.norm()) if ref is not None \
                    else math.nan
                ms = _timed(lambda: fn(q, k, v), device, args.runs)
                mib = peak_mib(lambda: fn(q, k, v), device,
                               (name, n, args.heads, args.dim, args.window))
                rows.append({"n": n, "variant": name, "ms": ms, "peak_mib": mib,
                             "rel_err_vs_exact": rel})
                print(f"n={n:>6} {name:<44} {ms:>10.2f} ms {mib:>9.1f} MiB  "
                      f"rel err {rel:.3f}", flush=True)
    return rows


def run_e2e(args, device: str, dtype) -> dict:
    """`long` end to end on each model in --e2e-models: the original, `long` with the guard,
    the same graph under `exact`; for the trained model also `long` with the guard's budget
    lifted (every site rewritten) and the task accuracy of each."""
    return {name: run_e2e_model(args, name, device, dtype) for name in args.e2e_models}


def run_e2e_model(args, name: str, device: str, dtype) -> dict:
    torch.manual_seed(0)
    n = args.e2e_len
    if name == "random":
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
        model = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
        x = torch.randn(1, n, 256)
        task = None
    else:  # trained on a local task (benchmarks/local_encoder.py)
        model = local_encoder.load_or_train(args.trained_path)
        x, _ = local_encoder.draw(1, n, torch.Generator().manual_seed(1))
        task = local_encoder.draw(4, n, torch.Generator().manual_seed(2))
    model = model.to(device, dtype)
    x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
    started = time.perf_counter()
    optimized = attnopt.optimize(model, "long", example_inputs=(x,))
    seconds = time.perf_counter() - started
    sites = [r for r in optimized.report.sites if r.site is not None]
    exact = attnopt.optimize(model, "exact", example_inputs=(x,))
    models = {"original": model, "long": optimized, "exact_policy": exact}
    if task is not None:
        from attnopt.presets import long_policy
        lifted = long_policy(budget=attnopt.ErrorBudget(site_rel_err=math.inf,
                                                        site_min_cosine=-1.0,
                                                        output_rel_err=math.inf))
        models["long_unguarded"] = attnopt.optimize(model, lifted, example_inputs=(x,))
        held_out = [t.to(device) for t in local_encoder.draw(1, n, torch.Generator()
                                                             .manual_seed(3))]
        started = time.perf_counter()
        models["long_metric"] = attnopt.optimize(  # the guard gated by the task instead
            model, "long", example_inputs=(x,), metric_drop=0.01,
            metric=lambda m: local_encoder.accuracy(m, *held_out))
        metric_seconds = time.perf_counter() - started
    with torch.no_grad():
        times = {key: _timed(lambda m=m: m(x), device, args.runs) for key, m in models.items()}
        exact_ms = _timed(lambda: F.scaled_dot_product_attention(
            *(torch.randn(1, 4, n, 64, device=device, dtype=dtype) for _ in range(3))),
            device, args.runs)
    result = {"model": name, "n": n, **{f"{key}_ms": ms for key, ms in times.items()},
              "speedup": times["original"] / times["long"],
              "speedup_over_exact_policy": times["exact_policy"] / times["long"],
              "optimize_s": seconds, "sites": len(sites),
              "rewritten": sum(r.rewrite != "exact" for r in sites),
              "rolled_back": [r.reason for r in sites if r.rolled_back],
              "output_rel_err": optimized.report.verification.get("rel_err"),
              "attention_ms_per_layer": exact_ms,
              # the captured graph without its attention: the ceiling of any attention rewrite
              "non_attention_ms": times["exact_policy"] - 4 * exact_ms}
    if task is not None:
        tokens, targets = (t.to(device) for t in task)
        result["accuracy"] = {key: local_encoder.accuracy(m, tokens, targets)
                              for key, m in models.items()}
        unguarded = models["long_unguarded"]
        result["unguarded_speedup"] = times["original"] / times["long_unguarded"]
        result["unguarded_site_errors"] = [
            r.rel_err for r in unguarded.report.sites if r.site is not None]
        result["unguarded_output_rel_err"] = unguarded.report.verification.get("rel_err")
        gated = models["long_metric"]
        result["metric_guard"] = {
            "speedup": times["original"] / times["long_metric"], "optimize_s": metric_seconds,
            "rewritten": sum(r.rewrite != "exact" for r in gated.report.sites
                             if r.site is not None),
            "metric": gated.report.verification.get("metric")}
    print(optimized.report)
    print(json.dumps(result, indent=1))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["ops", "e2e"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--exact-max", type=int, default=16384,
                        help="skip exact attention above this length (CPU: ~70 s at 64K)")
    parser.add_argument("--only", nargs="+", help="variants whose name contains one of these")
    parser.add_argument("--e2e-len", type=int, default=4096)
    parser.add_argument("--e2e-models", nargs="+", default=["random", "trained"],
                        choices=["random", "trained"])
    parser.add_argument("--trained-path", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), ".cache", "local_encoder.pt"),
        help="weights of the trained encoder (trained, ~4 min on CPU, when missing)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
            or "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype), "heads": args.heads,
            "dim": args.dim}
    print(info)
    results = {"info": info}
    if "ops" in args.parts:
        results["ops"] = run_ops(args, device, dtype)
    if "e2e" in args.parts:
        results["e2e"] = run_e2e(args, device, dtype)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
