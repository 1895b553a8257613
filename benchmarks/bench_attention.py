"""attnopt's generated Triton flash kernels against PyTorch's attention backends, on CUDA.

Anchors, all in the same run: `F.scaled_dot_product_attention` pinned to each backend (flash,
cuDNN, efficient) and FlexAttention compiled with `torch.compile` (a causal BlockMask where
causal). Shapes follow the issue: bf16, hidden 2048 (heads = 2048 / head dim), 16K total tokens
(batch = 16K / n), n in {1K, 4K, 16K}, causal and not; decode shapes (one query over a 32K–128K
KV cache, GQA 32/8 heads, head dim 128); forward and forward+backward.

"attnopt" is `flash_attention`: on a Hopper GPU its plain and causal calls at head dim 64/128
run the warp-specialized Gluon kernels (`kernels/flash_hopper.py`, and for the backward
`kernels/flash_hopper_backward.py`) from their `MIN_LENGTH`, and "attnopt-triton" is the same
call with those kernels off (`flash.py`'s and `flash_backward.py`'s Triton kernels).

Correctness first: every implementation's output against a float32 reference on fresh random
inputs (max abs error printed in the table). Times are medians of `triton.testing.do_bench`;
TFLOP/s counts 4·B·H·Sq·Sk·D for the forward (half where causal) and 2.5× that for the backward.

Part `int8`: the int8 Q·Kᵀ op (`ops/quantized.py`, quantization included), the same kernel
on operands quantized beforehand, and the exact kernel, against the same anchors (bf16, or
--int8-dtypes); its error column is the quantization's, against the float32 reference of exact attention.

Part `lengths`: the kernels with the sequence lengths compiled in (what the first lengths
under a key get, `kernels/tuning.py`) against the same kernels reading them at run time
(`ATTNOPT_STATIC_LENGTHS=0`, what later lengths get), FlexAttention alongside; forward and
forward+backward, the three alternated over three rounds (median of the rounds' medians). The
first call autotunes on the compiled-in lengths, as in use.

`--kernel-time`: each fwd and fwd+bwd row also reports every implementation's GPU time alone
(`kernel_ms`: the profiler's device time of its kernels per call), since at 1K a training
step spends as long in the host's launch path as on the GPU (docs/BENCHMARKS.md).

    PYTHONPATH=. python benchmarks/bench_attention.py [--parts fwd bwd decode int8 lengths]
        [--dims 64 128] [--seqs 1024 4096 16384] [--kernel-time] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import flash_attention, tuning
from attnopt.kernels.flash import flash_hopper
from attnopt.kernels.flash_backward import flash_hopper_backward

HIDDEN = 2048
TOTAL_TOKENS = 16384
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_median_ms(fn) -> float:
    """GPU time alone: the call captured in a CUDA graph and replayed (no Python launch cost)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def kernel_ms(fn, steps: int = 20) -> float:
    """GPU time alone: the device time of every kernel and copy `fn` runs, from the profiler,
    per call (mean over `steps` calls; host gaps between them do not count). Unlike a CUDA
    graph it needs no capture, which a backward seeded from the legacy stream refuses."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(event, "self_device_time_total", None)
                   or getattr(event, "self_cuda_time_total", 0)
                   for event in prof.key_averages())
    return total_us / steps / 1e3


def flops(batch, heads, q_len, kv_len, head_dim, causal) -> float:
    total = 4 * batch * heads * q_len * kv_len * head_dim
    return total / 2 if causal and q_len == kv_len else total


def int8_implementations(causal: bool):
    """The int8 Q·Kᵀ op (quantization included) as "attnopt", the kernel alone on operands
    quantized beforehand, and the exact kernel."""
    from attnopt.kernels.flash import flash_forward
    from attnopt.kernels.params import AttentionParams
    from attnopt.ops.quantized import K_QUANT_BLOCK, Q_QUANT_BLOCK, int8_qk_kernel, quantize_qk
    quantized = {}

    def kernel_only(q, k, v):
        key = (q.data_ptr(), k.data_ptr())
        if key not in quantized:
            (q8, qs), (k8, ks) = quantize_qk(q, k)
            params = AttentionParams.build(q, k, v, causal=causal, scale=None, attn_bias=None,
                                           kv_lengths=None, window=None, block_mask=None,
                                           softcap=None, alibi_slopes=None,
                                           causal_alignment="top_left")
            quantized[key] = (q8, k8, params, (qs, Q_QUANT_BLOCK, ks, K_QUANT_BLOCK))
        q8, k8, params, quant = quantized[key]
        return flash_forward(q8, k8, v, params, quant=quant)[0]
    return {"attnopt": lambda q, k, v: int8_qk_kernel(q, k, v, None, causal),
            "int8-kernel-only": kernel_only,
            "attnopt-exact": lambda q, k, v: flash_attention(q, k, v, causal=causal)}


def implementations(causal: bool, q_len: int, kv_len: int, enable_gqa: bool,
                    int8: bool = False):
    """name -> fn(q, k, v) for the kernel and every anchor that runs this shape (with `int8`,
    the int8 Q·Kᵀ op as "attnopt" and the exact kernel as an anchor)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        offset = kv_len - q_len  # bottom-right: the query block sits at the end of the keys
        block_mask = create_block_mask(lambda b, h, qi, kj: kj <= qi + offset, None, None,
                                       q_len, kv_len, device="cuda")
    alignment = "bottom_right" if q_len != kv_len else "top_left"
    impls = int8_implementations(causal) if int8 else {
        "attnopt": lambda q, k, v: flash_attention(q, k, v, causal=causal,
                                                   causal_alignment=alignment)}
    if not int8 and flash_hopper is not None:  # flash.py's kernel where the Hopper one runs
        impls["attnopt-triton"] = without_hopper_kernel(
            lambda q, k, v: flash_attention(q, k, v, causal=causal, causal_alignment=alignment))
    for name, backend in SDPA_BACKENDS.items():
        if causal and q_len != kv_len:
            continue  # SDPA's is_causal is top-left aligned: a different computation
        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                      enable_gqa=enable_gqa)
        impls[name] = run
    impls["flex"] = lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask,
                                                  enable_gqa=enable_gqa)
    return impls


def without_hopper_kernel(fn):
    """`fn` with the Hopper kernels switched off during each call (`ATTNOPT_HOPPER_FORWARD=0`,
    `ATTNOPT_HOPPER_BACKWARD=0`, set and restored by hand: mock.patch.dict rewrites the whole
    environment, which cost more host time than a 1K call's GPU time). The backward of its
    output runs after the call returns: a timing step built on it (forward + backward) must run
    under the returned function's `around` too (`around(step)`)."""
    names = [flash_hopper.ENV] + ([flash_hopper_backward.ENV] if flash_hopper_backward else [])

    def around(inner):
        def call(*args, **kwargs):
            previous = {name: os.environ.get(name) for name in names}
            os.environ.update(dict.fromkeys(names, "0"))
            try:
                return inner(*args, **kwargs)
            finally:
                for name, value in previous.items():
                    if value is None:
                        del os.environ[name]
                    else:
                        os.environ[name] = value
        return call
    switched = around(fn)
    switched.around = around
    return switched


def reference(q, k, v, causal):
    q_len, kv_len = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, 1) for t in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v


def measure(shape, causal, backward, rows, int8=False, dtype=torch.bfloat16,
            kernel_time=False):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    torch.manual_seed(q_len + kv_len + head_dim)
    q = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    expected = reference(q[:1], k[:1], v[:1], causal) if q_len * kv_len <= 4096 * 16384 else None
    work = flops(batch, heads, q_len, kv_len, head_dim, causal) * (3.5 if backward else 1.0)
    results = {}
    for name, fn in implementations(causal, q_len, kv_len, kv_heads != heads, int8).items():
        try:
            if backward:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                grad = torch.randn_like(q)
                out = fn(qg, kg, vg)
                out.backward(grad)

                def step(fn=fn, qg=qg, kg=kg, vg=vg, grad=grad):
                    qg.grad = kg.grad = vg.grad = None
                    fn(qg, kg, vg).backward(grad)
            else:
                with torch.no_grad():
                    out = fn(q, k, v)

                def step(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)
            step = getattr(fn, "around", lambda inner: inner)(step)  # (kernel switches)
            error = (out[:1].float() - expected).abs().max().item() if expected is not None \
                else float("nan")
            ms = median_ms(step)
            results[name] = {"ms": ms, "tflops": work / ms / 1e9, "max_abs_err": error}
            if q_len == 1 and name != "flex":  # decode: launch cost vs GPU time
                results[name]["graph_ms"] = graph_median_ms(step)
            if kernel_time:
                results[name]["kernel_ms"] = kernel_ms(step)
        except Exception as exc:  # an anchor that does not run this shape is reported, not fatal
            if name == "attnopt":
                raise
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    rows.append({"shape": shape, "causal": causal, "backward": backward, "results": results,
                 "kind": f"int8 Q·Kᵀ {str(dtype)[6:]}" if int8 else None})
    _print_row(rows[-1])


def measure_lengths(head_dim: int, n: int, causal: bool) -> None:
    """One row per direction of part `lengths` (module docstring)."""
    batch, heads = TOTAL_TOKENS // n, HIDDEN // head_dim
    torch.manual_seed(n + head_dim)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    flex = implementations(causal, n, n, False)["flex"]

    def attnopt(static: bool):
        def run(q, k, v):
            os.environ[tuning.STATIC_LENGTHS_ENV] = "1" if static else "0"
            return flash_attention(q, k, v, causal=causal)
        return run
    fns = {"compiled in": attnopt(True), "run time": attnopt(False), "flex": flex}
    expected = reference(q[:1].detach(), k[:1].detach(), v[:1].detach(), causal)
    errors = {name: (fn(q, k, v)[:1].float() - expected).abs().max().item()
              for name, fn in fns.items()}
    for backward in (False, True):
        def step(fn):
            def forward():
                with torch.no_grad():
                    fn(q, k, v)

            def forward_backward():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(grad)
            return forward_backward if backward else forward
        times = {name: [] for name in fns}
        for _ in range(3):
            for name, fn in fns.items():
                times[name].append(median_ms(step(fn)))
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(f"| {head_dim} | {n} | {'causal' if causal else 'full'} | "
              f"{'fwd+bwd' if backward else 'fwd'} | {ms['compiled in']:.4f} | "
              f"{ms['run time']:.4f} | {ms['flex']:.4f} | "
              f"{ms['run time'] / ms['compiled in']:.3f} | {ms['flex'] / ms['compiled in']:.3f} "
              f"| {ms['flex'] / ms['run time']:.3f} | {max(errors.values()):.4f} |", flush=True)
    os.environ.pop(tuning.STATIC_LENGTHS_ENV, None)


def _print_row(row):
    batch, heads, kv_heads, q_len, kv_len, head_dim = row["shape"]
    mine = row["results"].get("attnopt", {})
    cells = []
    for name, r in row["results"].items():
        if "error" in r:
            cells.append(f"{name}: n/a")
        else:
            ratio = (r["ms"] / mine["ms"]) if "ms" in mine else float("nan")
            graph = ""
            if "graph_ms" in r and "graph_ms" in mine:
                graph = f", graph {r['graph_ms']:.3f} ms ×{r['graph_ms'] / mine['graph_ms']:.2f}"
            if "kernel_ms" in r and "kernel_ms" in mine:
                graph += (f", kernels {r['kernel_ms']:.3f} ms "
                          f"×{r['kernel_ms'] / mine['kernel_ms']:.2f}")
            cells.append(f"{name} {r['ms']:.3f} ms {r['tflops']:.0f} TF/s "
                         f"(×{ratio:.2f}, err {r['max_abs_err']:.1e}{graph})")
    kind = row.get("kind") or ("fwd+bwd" if row["backward"] else "fwd")
    print(f"| {kind} | B{batch} H{heads}/{kv_heads} Sq{q_len} Sk{kv_len} D{head_dim} | "
          f"{'causal' if row['causal'] else 'full'} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64  # FlexAttention compiles once per shape
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["fwd", "bwd", "decode"])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--decode-kv", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--int8-dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--kernel-time", action="store_true",
                        help="also report each call's GPU kernel time from the profiler (no "
                             "host gaps), for fwd and fwd+bwd rows")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
          f"{triton.__version__}; {time.strftime('%Y-%m-%d')}; ratio = anchor ms / attnopt ms "
          "(> 1: attnopt faster)")
    rows: list[dict] = []
    for part in args.parts:
        if part in ("fwd", "bwd"):
            for head_dim in args.dims:
                for n in args.seqs:
                    for causal in (False, True):
                        shape = (TOTAL_TOKENS // n, HIDDEN // head_dim, HIDDEN // head_dim, n, n,
                                 head_dim)
                        measure(shape, causal, part == "bwd", rows,
                                kernel_time=args.kernel_time)
        elif part == "int8":  # int8 Q·Kᵀ against the exact kernel and the anchors
            for dtype in (getattr(torch, name) for name in args.int8_dtypes):
                for head_dim in args.dims:
                    for n in args.seqs:
                        for causal in (False, True):
                            shape = (TOTAL_TOKENS // n, HIDDEN // head_dim,
                                     HIDDEN // head_dim, n, n, head_dim)
                            measure(shape, causal, False, rows, int8=True, dtype=dtype)
        elif part == "lengths":
            print("| D | n | mask | direction | compiled in ms | run time ms | FlexAttention ms "
                  "| run time / compiled in | Flex / compiled in | Flex / run time "
                  "| max abs err (forward, all three) |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for head_dim in args.dims:
                for n in args.seqs:
                    for causal in (False, True):
                        torch._dynamo.reset()  # FlexAttention compiles per shape
                        measure_lengths(head_dim, n, causal)
        elif part == "decode":
            for kv_len in args.decode_kv:
                for batch in (1, 8):
                    measure((batch, 32, 8, 1, kv_len, 128), False, False, rows)
    print("configs chosen (kernel, dtype and shape buckets, tuned?): config")
    chosen = []
    for (kernel_id, key, constexprs, _), (config, _, tuned) in tuning._chosen.items():
        flags = {k: v for k, v in constexprs if v not in (False, 0, "tf32")}
        chosen.append({"key": [str(x) for x in key], "flags": flags, "tuned": tuned,
                       "config": str(config)})
        print(f"  {key} {flags} tuned={tuned}: {config}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows,
                       "configs": chosen}, handle, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
