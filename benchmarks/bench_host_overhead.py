"""Host (Python) cost of one `flash_attention` call, kernel launches excluded; with `--op`, the
cost of the canonical op's dispatch.

Short attention calls are host-bound: at one query over a 32K cache, or a window of 1K keys,
the GPU finishes before Python has launched the next kernel (docs/BENCHMARKS.md). This measures
the part attnopt controls: argument checks, parameter normalization, config lookup and argument
marshalling, up to the Triton launch. Triton's own launcher (binding ~60 arguments) is not
included. It runs on any machine: Triton's interpreter stands in for the GPU, and its launch
entry point is replaced by a no-op that counts launches.

`--op`: `torch.ops.attnopt.attention` on a tiny CPU call (B1, 4/2 heads, S8, D16, fp32, so
that host time is all there is), against the op's body called directly, SDPA alone, and a twin
of the op registered as a `torch.library.custom_op` with the same implementations, fake and
autograd (how the op was registered before). Grad off, and grad on (q requires grad: forward
alone, and forward + backward). Minimum over 20 alternated runs of `--calls` calls.

`--step`: a training step's Python on the kernel path (head dim 64, 1K causal, launches
no-ops), against the two launchers called directly and the forward alone.

    python benchmarks/bench_host_overhead.py [--calls 500] [--op] [--step]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"        # CPU tensors take the kernel path
os.environ["ATTNOPT_AUTOTUNE"] = "0"        # (the interpreter cannot benchmark configs)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from attnopt.kernels import flash_attention  # noqa: E402

LAUNCHES = []
RUNS = 20  # runs of `calls` calls; the minimum is reported: on a shared machine noise only adds


def _no_launch(self, grid):
    return lambda *args, **kwargs: LAUNCHES.append(grid)


CASES = {
    # name: (q shape, kv shape, options); float16, head dim 128
    "prefill 1K causal (forward kernel)": ((1, 32, 1024, 128), (1, 8, 1024, 128),
                                           dict(causal=True)),
    "window 1024 at 4K (forward kernel)": ((1, 16, 4096, 128), (1, 16, 4096, 128),
                                           dict(window=(1024, 0))),
    "decode 1 query / 32K keys (split-KV + reduce)": ((1, 32, 1, 128), (1, 8, 32768, 128),
                                                      dict(causal=True,
                                                           causal_alignment="bottom_right")),
}


def measure(calls: int) -> dict:
    interpreter.InterpretedFunction.__getitem__ = _no_launch
    results = {}
    torch.set_grad_enabled(False)
    for name, (q_shape, kv_shape, options) in CASES.items():
        q = torch.randn(q_shape, dtype=torch.float16)
        k, v = (torch.randn(kv_shape, dtype=torch.float16) for _ in range(2))
        for _ in range(200):
            flash_attention(q, k, v, **options)
        LAUNCHES.clear()
        runs = []
        for _ in range(RUNS):
            start = time.perf_counter()
            for _ in range(calls):
                flash_attention(q, k, v, **options)
            runs.append((time.perf_counter() - start) / calls * 1e6)
        results[name] = {"us_per_call": min(runs), "median_us": statistics.median(runs),
                         "launches_per_call": len(LAUNCHES) / (RUNS * calls)}
        print(f"{name}: {results[name]['us_per_call']:.1f} µs per call (median of runs "
              f"{results[name]['median_us']:.1f}), "
              f"{results[name]['launches_per_call']:.0f} launches", flush=True)
    return results


def custom_op_twin():
    """The canonical op's implementations, fake and autograd under a `torch.library.custom_op`
    (`attnopt_bench::attention`), as the op was registered before."""
    import sys
    ops = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)

    @torch.library.custom_op("attnopt_bench::attention", mutates_args=(),
                             schema=ops.SCHEMA[len("attention"):])
    def twin(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
             softcap=None, window_left=None, alibi_slopes=None):
        return ops._attention_default(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                      softcap, window_left, alibi_slopes)

    twin.register_kernel("cuda")(ops._attention_cuda)
    twin.register_fake(ops._attention_fake)
    twin.register_autograd(ops._backward, setup_context=ops._setup_context)
    return torch.ops.attnopt_bench.attention.default


def measure_op(calls: int) -> dict:
    import sys
    ops = sys.modules["attnopt.ops.attention"]
    twin, op = custom_op_twin(), torch.ops.attnopt.attention.default
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    q_grad = q.clone().requires_grad_()
    args = (None, True, None, True)

    def backward(fn):
        return lambda: fn(q_grad, k, v, *args).sum().backward()
    cases = {
        "grad off: SDPA alone": (False, lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)),
        "grad off: the op's body called directly": (False, lambda: ops._attention_default(
            q, k, v, *args)),
        "grad off: custom_op twin": (False, lambda: twin(q, k, v, *args)),
        "grad off: torch.ops.attnopt.attention": (False, lambda: op(q, k, v, *args)),
        "grad on, forward: custom_op twin": (True, lambda: twin(q_grad, k, v, *args)),
        "grad on, forward: torch.ops.attnopt.attention": (True, lambda: op(q_grad, k, v, *args)),
        "grad on, forward + backward: custom_op twin": (True, backward(twin)),
        "grad on, forward + backward: torch.ops.attnopt.attention": (True, backward(op)),
    }
    return alternated_minimums(cases, calls, warmup=200)


def measure_step(calls: int) -> dict:
    """A training step's Python on the kernel path (launches are no-ops): the whole
    `flash_attention(...).backward(...)`, the two launchers called directly, and the forward
    alone. On the CPU, autograd runs the backward on the calling thread; on a GPU it hands it
    to its device thread, which costs more again (docs/DESIGN-NOTES.md)."""
    from attnopt.kernels.flash import flash_forward
    from attnopt.kernels.flash_backward import flash_backward
    from attnopt.kernels.params import AttentionParams
    interpreter.InterpretedFunction.__getitem__ = _no_launch
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, 1024, 64, dtype=torch.float16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    params = AttentionParams.build(q, k, v, causal=True, scale=None, attn_bias=None,
                                   kv_lengths=None, window=None, block_mask=None,
                                   softcap=None, alibi_slopes=None,
                                   causal_alignment="top_left")
    out, lse = flash_forward(q, k, v, params)

    def step():
        for leaf in leaves:
            leaf.grad = None
        flash_attention(*leaves, causal=True).backward(grad)

    def forward():
        with torch.no_grad():
            flash_attention(q, k, v, causal=True)
    cases = {"training step: flash_attention(...).backward(...)": (True, step),
             "launchers called directly: flash_forward + flash_backward":
                 (True, lambda: (flash_forward(q, k, v, params),
                                 flash_backward(grad, q, k, v, out, lse, params))),
             "forward alone (no grad)": (True, forward)}
    return alternated_minimums(cases, calls, warmup=100)


def alternated_minimums(cases: dict, calls: int, warmup: int) -> dict:
    """name -> µs per call: each case (grad mode, fn) warmed up `warmup` calls, then RUNS
    rounds of `calls` calls alternating between the cases; the minimum per case, printed with
    the median of its runs."""
    runs = {name: [] for name in cases}
    for name, (grad, fn) in cases.items():
        with torch.set_grad_enabled(grad):
            for _ in range(warmup):
                fn()
    for _ in range(RUNS):
        for name, (grad, fn) in cases.items():
            with torch.set_grad_enabled(grad):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                runs[name].append((time.perf_counter() - start) / calls * 1e6)
    results = {name: min(values) for name, values in runs.items()}
    for name, value in results.items():
        print(f"{name}: {value:.1f} µs per call (median of runs "
              f"{statistics.median(runs[name]):.1f})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--op", action="store_true")
    parser.add_argument("--step", action="store_true",
                        help="a training step's Python (head dim 64, 1K causal, fp16)")
    args = parser.parse_args()
    print(f"python {platform.python_version()} · torch {torch.__version__} · triton "
          f"{triton.__version__} · {platform.processor() or platform.machine()}")
    if args.op:
        importlib.import_module("attnopt")  # (registers torch.ops.attnopt)
        measure_op(args.calls)
        return
    if args.step:
        measure_step(args.calls)
        return
    measure(args.calls)


if __name__ == "__main__":
    main()
