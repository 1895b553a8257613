"""The warp-specialized Hopper backward against the autotuned Triton backward, backward alone.

`flash_backward` on the same forward output and log-sum-exp, once with
`kernels/flash_hopper_backward.py` (its `MIN_LENGTH` and `CAUSAL_ALIBI` lifted, so that every
row runs it) and once with `ATTNOPT_HOPPER_BACKWARD=0` (`flash_backward.py`'s Triton kernel,
autotuned on a first call). bf16, hidden 2048 (heads = 2048 / head dim), 16K tokens per batch
(B = 16K / n). The two results are compared first (max error relative to the largest entry);
times are the best of two `triton.testing.do_bench` medians. This is what chose `MIN_LENGTH`
and `CAUSAL_ALIBI` (docs/BENCHMARKS.md, "The warp-specialized Hopper backward").

    PYTHONPATH=.:benchmarks python benchmarks/bench_hopper_backward.py [--dims 128 64]
        [--seqs 512 1024 2048 4096] [--extras]

`--extras` adds ALiBi (causal and not) and causal sliding-window rows.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import triton

from attnopt.kernels import flash_backward, flash_hopper_backward
from attnopt.kernels.flash import flash_forward
from attnopt.kernels.params import AttentionParams
from bench_attention import HIDDEN, TOTAL_TOKENS

#: (head dim, n, causal, window, ALiBi) rows of `--extras`
EXTRAS = [(128, 2048, True, None, True), (128, 4096, True, None, True),
          (64, 2048, False, None, True), (128, 4096, True, (2047, 0), False),
          (128, 8192, True, (2047, 0), False)]


def best_median_ms(fn) -> float:
    return min(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
               for _ in range(2))


def problem(head_dim: int, n: int, causal: bool, window=None, alibi: bool = False):
    """(q, k, v, params): fresh bf16 inputs of bench_attention's shapes (heads = HIDDEN / head
    dim, TOTAL_TOKENS per batch), ALiBi slopes per head if asked."""
    heads, batch = HIDDEN // head_dim, max(TOTAL_TOKENS // n, 1)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    slopes = torch.rand(heads, device="cuda") if alibi else None
    params = AttentionParams.build(q, k, v, causal=causal, scale=None, attn_bias=None,
                                   kv_lengths=None, window=window, block_mask=None,
                                   softcap=None, alibi_slopes=slopes,
                                   causal_alignment="top_left")
    return q, k, v, params


def measure(head_dim: int, n: int, causal: bool, window, alibi: bool) -> None:
    q, k, v, params = problem(head_dim, n, causal, window, alibi)
    grad = torch.randn_like(q)
    reason = flash_hopper_backward.hopper_backward_reason(params, q)
    if reason is not None:
        print(f"| {head_dim} | {n} | skipped: {reason} |")
        return
    out, lse = flash_forward(q, k, v, params)

    def backward():
        return flash_backward.flash_backward(grad, q, k, v, out, lse, params)
    hopper = backward()
    hopper_ms = best_median_ms(backward)
    os.environ[flash_hopper_backward.ENV] = "0"
    try:
        triton_grads = backward()  # (autotunes)
        triton_ms = best_median_ms(backward)
    finally:
        del os.environ[flash_hopper_backward.ENV]
    error = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                for a, b in zip(hopper, triton_grads))
    spec = ", ".join(["causal" if causal else "no mask"] + (["ALiBi"] if alibi else [])
                     + ([f"window {window[0]}"] if window else []))
    print(f"| {head_dim} | {n} | {spec} | {hopper_ms:.3f} | {triton_ms:.3f} | "
          f"{triton_ms / hopper_ms:.2f} | {error:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--extras", action="store_true")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
          f"{triton.__version__}; {time.strftime('%Y-%m-%d')}")
    # every row on the Hopper kernel: the thresholds are what this measures
    flash_hopper_backward.MIN_LENGTH = dict.fromkeys(flash_hopper_backward.MIN_LENGTH, 1)
    flash_hopper_backward.CAUSAL_ALIBI = True
    print("| D | n | spec | Hopper ms | Triton ms | Triton / Hopper | max rel. difference |")
    print("|---|---|---|---|---|---|---|")
    for head_dim in args.dims:
        for n in args.seqs:
            for causal in (False, True):
                measure(head_dim, n, causal, None, False)
    if args.extras:
        for row in EXTRAS:
            measure(*row)


if __name__ == "__main__":
    main()
