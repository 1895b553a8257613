"""Host cost of launching the kernels on CUDA: finding the kept compiled kernel, building TMA
descriptors, and whole calls with both done the earlier way.

A repeat launch finds its compiled kernel by value (`tuning._ValueKey`); working out every
argument's properties (`tuning._properties`) is left to values not seen before, and was every
call's path earlier. A Hopper kernel's descriptors skip Triton's per-call checks after the
first of each (dtype, block, layout) (`flash_hopper.descriptor`); earlier, every descriptor
went through Triton's constructor. This measures, on a CUDA device:
- each kept kernel's lookup both ways, with the arguments of a real call (tight loop);
- a forward's four descriptors both ways;
- whole calls (a forward without grad; a training step, with autograd's device thread and
  with `set_multithreading_enabled(False)`) with the earlier ways switched in, alternated in
  one process round by round; cuDNN's call through SDPA as the anchor. A sleeping kernel
  holds the GPU while a round's calls are issued, so that they queue and the round times
  host work alone.

Batch 1, 2 heads, 1K, bf16: head dim 64 causal (Hopper forward, Triton backward) and head
dim 128 without a mask (Hopper forward and backward); and a decode call, one query over 32K
keys (the split-KV kernel and its reduction). µs per call: minimum and median over rounds.

    python benchmarks/bench_launch.py [--rounds 10] [--calls 50]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import flash_attention, flash_hopper, flash_hopper_backward, tuning

CASES = [(64, True), (128, False)]  # (head dim, causal) at B1 H2 1K


def tight_us(fn, calls: int = 2000, runs: int = 5) -> float:
    """Host µs per call, the best of `runs` loops of `calls` calls."""
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def queued_us(fn, calls: int) -> float:
    """Host µs per call of `calls` calls issued while the GPU sleeps (~0.2 s)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(300_000_000)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


class EarlierWays:
    """A context manager: kept kernels found by their properties, descriptors through
    Triton's constructor."""

    def __enter__(self):
        self.find, self.descriptor = tuning._DirectLaunch.find, flash_hopper.descriptor
        tuning._DirectLaunch.find = lambda direct, values: direct.compiled.get(
            direct.key(values))
        for module in (flash_hopper, flash_hopper_backward):
            module.descriptor = triton_descriptor
        return self

    def __exit__(self, *exc):
        tuning._DirectLaunch.find = self.find
        for module in (flash_hopper, flash_hopper_backward):
            module.descriptor = self.descriptor


def triton_descriptor(t, block, layout):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(t, t.shape, t.stride(), list(block), layout)


def launched_values(fn) -> dict:
    """name of each kernel fn launches -> (its _DirectLaunch, the values it launched with)."""
    seen = {}
    launch = tuning._DirectLaunch.launch

    def spy(direct, grid, args, kwargs):
        seen[direct.name] = (direct, direct.values(args, kwargs))
        return launch(direct, grid, args, kwargs)
    tuning._DirectLaunch.launch = spy
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        tuning._DirectLaunch.launch = launch
    return seen


def lookups(title: str, fn) -> None:
    """Each kernel fn launches: its kept kernel found by value and by properties."""
    print(f"\n{title}: finding the kept kernel, µs (tight loop)")
    for name, (direct, values) in launched_values(fn).items():
        by_value = tight_us(lambda: direct.find(values))
        by_properties = tight_us(lambda: direct.compiled.get(direct.key(values)))
        print(f"  {name:40s} by value {by_value:5.1f}  by properties {by_properties:5.1f}"
              f"  ({len(direct.runtime)} run-time arguments)")


def anchor(label: str, fn, threads: bool, args) -> None:
    torch.autograd.set_multithreading_enabled(threads)
    runs = [queued_us(fn, args.calls) for _ in range(args.rounds)]
    torch.autograd.set_multithreading_enabled(True)
    print(f"  {label:36s} {min(runs):6.1f} / {statistics.median(runs):6.1f}")


def alternated(label: str, fn, threads: bool, args) -> None:
    """fn's host time now and with `EarlierWays`, round by round."""
    torch.autograd.set_multithreading_enabled(threads)
    runs = {"now": [], "earlier": []}
    for round_ in range(args.rounds):
        for way in ("now", "earlier") if round_ % 2 == 0 else ("earlier", "now"):
            with EarlierWays() if way == "earlier" else contextlib.nullcontext():
                runs[way].append(queued_us(fn, args.calls))
    torch.autograd.set_multithreading_enabled(True)
    now, earlier = runs["now"], runs["earlier"]
    print(f"  {label:36s} now {min(now):6.1f} / {statistics.median(now):6.1f}   "
          f"earlier {min(earlier):6.1f} / {statistics.median(earlier):6.1f}")


def training(head_dim: int, causal: bool, args) -> None:
    title = f"head dim {head_dim}, {'causal' if causal else 'no mask'}"
    q, k, v, grad = (torch.randn(1, 2, 1024, head_dim, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        flash_attention(*leaves, causal=causal).backward(grad)

    def forward():
        with torch.no_grad():
            flash_attention(q, k, v, causal=causal)

    def cudnn_step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(grad)
    for _ in range(3):
        step()
        forward()
    lookups(title, step)
    block = (1, 1, 64, head_dim)
    layout = flash_hopper._shared_layout(q.dtype, block)
    ours = tight_us(lambda: [flash_hopper.descriptor(t, block, layout) for t in (q, k, v, q)])
    triton_s = tight_us(lambda: [triton_descriptor(t, block, layout) for t in (q, k, v, q)])
    print(f"  four descriptors: checked once {ours:5.1f}  Triton's constructor {triton_s:5.1f}")
    print(f"{title}: whole calls, host µs per call (min / median of {args.rounds} rounds "
          f"of {args.calls}, alternated)")
    anchor("cuDNN training step", cudnn_step, True, args)
    anchor("cuDNN training step, one autograd thread", cudnn_step, False, args)
    alternated("forward, no grad", forward, True, args)
    alternated("training step", step, True, args)
    alternated("training step, one autograd thread", step, False, args)


def decode(args) -> None:
    """One query over 32K cached keys, 32 query heads over 8 kv heads of 128 (the split-KV
    kernel and its reduction)."""
    title = "decode, 1 query over 32K keys, 32/8 heads of 128"
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))

    def call():
        with torch.no_grad():
            flash_attention(q, k, v)  # (one query sees every key: no mask needed)

    def cudnn():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for _ in range(3):
        call()
    lookups(title, call)
    print(f"{title}: host µs per call (min / median of {args.rounds} rounds of {args.calls})")
    anchor("cuDNN through SDPA", cudnn, True, args)
    alternated("decode call", call, True, args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton "
          f"{triton.__version__}")
    for head_dim, causal in CASES:
        training(head_dim, causal, args)
    decode(args)


if __name__ == "__main__":
    main()
