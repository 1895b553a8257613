"""Host (Python) cost of one `flash_attention` call, kernel launches excluded.

Short attention calls are host-bound: at one query over a 32K cache, or a window of 1K keys,
the GPU finishes before Python has launched the next kernel (docs/BENCHMARKS.md). This measures
the part attnopt controls: argument checks, parameter normalization, config lookup and argument
marshalling, up to the Triton launch. Triton's own launcher (binding ~60 arguments) is not
included. It runs on any machine: Triton's interpreter stands in for the GPU, and its launch
entry point is replaced by a no-op that counts launches.

    python benchmarks/bench_host_overhead.py [--calls 500]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    print(f"python {platform.python_version()} · torch {torch.__version__} · triton "
          f"{triton.__version__} · {platform.processor() or platform.machine()}")
    measure(args.calls)


if __name__ == "__main__":
    main()
