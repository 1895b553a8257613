"""The warp-specialized Hopper forward against the autotuned Triton kernel and cuDNN, forward alone.

`flash_forward` on the same inputs, once with `kernels/flash_hopper.py` (its `MIN_LENGTH`
lifted, so that every row runs it, with each head dim's shipped config) and once with
`ATTNOPT_HOPPER_FORWARD=0` (`flash.py`'s Triton kernel, autotuned on a first call), next to
SDPA pinned to cuDNN in the same process. bf16, hidden 2048 (heads = 2048 / head dim), 16K
tokens per batch (B = 16K / n). Both outputs are compared with a float32 SDPA reference first;
times are the best of two `triton.testing.do_bench` medians. This is what chose the forward's
`MIN_LENGTH` (docs/BENCHMARKS.md, "The persistent Hopper forward"); `bench_attention.py` has
the full table against every anchor.

    PYTHONPATH=.:benchmarks python benchmarks/bench_hopper_forward.py [--dims 128 64]
        [--seqs 512 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import flash_hopper
from attnopt.kernels.flash import flash_forward
from bench_hopper_backward import best_median_ms, problem


def measure(head_dim: int, n: int, causal: bool) -> None:
    q, k, v, params = problem(head_dim, n, causal)
    batch, heads = q.shape[:2]
    reason = flash_hopper.hopper_reason(q, k, v, params)
    if reason is not None:
        print(f"| {head_dim} | {n} | skipped: {reason} |")
        return
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               is_causal=causal)

    def forward():
        return flash_forward(q, k, v, params)[0]

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    hopper_error = (forward().float() - reference).abs().max().item()
    hopper_ms = best_median_ms(forward)
    os.environ[flash_hopper.ENV] = "0"
    try:
        triton_error = (forward().float() - reference).abs().max().item()  # (autotunes)
        triton_ms = best_median_ms(forward)
    finally:
        del os.environ[flash_hopper.ENV]
    cudnn_ms = best_median_ms(cudnn)
    flops = 4 * batch * heads * n * n * head_dim / (2 if causal else 1)
    print(f"| {head_dim} | {n} | {'causal' if causal else 'no mask'} | "
          f"{flops / hopper_ms / 1e9:.0f} | {flops / triton_ms / 1e9:.0f} | "
          f"{flops / cudnn_ms / 1e9:.0f} | {triton_ms / hopper_ms:.2f} | "
          f"{cudnn_ms / hopper_ms:.2f} | {cudnn_ms / triton_ms:.2f} | "
          f"{max(hopper_error, triton_error):.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
          f"{triton.__version__}; {time.strftime('%Y-%m-%d')}")
    # every row on the Hopper kernel: the thresholds are what this measures
    flash_hopper.MIN_LENGTH = dict.fromkeys(flash_hopper.MIN_LENGTH, 1)
    print("| D | n | mask | Hopper TF/s | Triton TF/s | cuDNN TF/s | Triton / Hopper time "
          "| × cuDNN (Hopper) | × cuDNN (Triton) | max abs error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for head_dim in args.dims:
        for n in args.seqs:
            for causal in (False, True):
                measure(head_dim, n, causal)


if __name__ == "__main__":
    main()
