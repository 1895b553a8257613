"""Prefill with padding on CUDA: a causal mask that carries an attention_mask's padding.

A Hugging Face decoder run on a padded batch passes SDPA a boolean (B, 1, S, S) mask: causal
and padded keys off. SDPA cannot tell that the mask is causal, so it reads all of it and
computes every score. attnopt proves the mask causal by construction (classification re-runs
its producer on random attention masks) and emits `attention(q, k, v, mask, is_causal=True)`:
the generated kernel skips the key blocks above the diagonal and reads the mask only below it.

Two parts, anchors in the same run, correctness before timing:
- `ops`: the kernel (`flash_attention(causal=True, attn_bias=mask)`, GQA 16/8 heads) against
  SDPA's default dispatch and its efficient backend on the same boolean mask, k/v repeated to
  16 heads as Hugging Face passes them with a mask; bf16, B2 D128, one row right-padded by a
  quarter. Medians of `triton.testing.do_bench`.
- `e2e`: a Llama config (hidden 2048, 16 heads, 8 kv heads, 4 layers, random weights, bf16,
  `attn_implementation="sdpa"`, `use_cache=False`), batch 2 with the same padding, before and
  after `attnopt.optimize(policy="exact")`. Logits on real tokens against a float32 copy;
  medians of 25 CUDA-event timings after 5 warm-ups.

    PYTHONPATH=. python benchmarks/bench_padded_prefill.py [--parts ops e2e] [--seqs 2048 4096]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from attnopt.kernels import flash_attention  # noqa: E402

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 16, 8, 128
PADDED_FRACTION = 0.25  # of the second row's tokens, at its end


def padding_mask(seq: int) -> torch.Tensor:
    """(BATCH, seq) int64 attention_mask: row 1 right-padded by PADDED_FRACTION."""
    mask = torch.ones(BATCH, seq, dtype=torch.long, device="cuda")
    mask[1, seq - int(seq * PADDED_FRACTION):] = 0
    return mask


def ops(seqs: list[int]) -> None:
    print("| n | attnopt kernel ms | SDPA default ms | SDPA efficient ms | default / attnopt "
          "| max abs err vs fp32 (attnopt, default) |")
    print("|---|---|---|---|---|---|")
    for seq in seqs:
        torch.manual_seed(seq)
        q = torch.randn(BATCH, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(BATCH, KV_HEADS, seq, HEAD_DIM, device="cuda",
                            dtype=torch.bfloat16) for _ in range(2))
        causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
        mask = causal & padding_mask(seq).bool()[:, None, None, :]      # (B, 1, S, S)
        truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               enable_gqa=True)

        def ours():
            return flash_attention(q, k, v, causal=True, attn_bias=mask)

        # SDPA's fused kernels take a mask only with k/v at q's head count, which is how
        # Hugging Face passes them when there is a mask (repeated beforehand)
        k_rep, v_rep = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))

        def default():
            return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)

        def efficient():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return default()

        errors = [(fn().float() - truth).abs().max().item() for fn in (ours, default)]
        times = [triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                 for fn in (ours, default, efficient)]
        print(f"| {seq} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | "
              f"{times[1] / times[0]:.2f} | {errors[0]:.1e}, {errors[1]:.1e} |", flush=True)


def e2e(seqs: list[int]) -> None:
    import attnopt
    # the same Llama config, CUDA-event medians and call spy as the eager-decoder benchmark
    from bench_exact_cuda import build, canonical_calls, median_ms

    model, reference = build("sdpa", torch.bfloat16), build("sdpa", torch.float32)
    print("| seq | HF sdpa ms | attnopt exact ms | sdpa / attnopt | canonical calls causal "
          "| max abs err on real tokens vs fp32 (sdpa, attnopt) |")
    print("|---|---|---|---|---|---|")
    for seq in seqs:
        kwargs = {"input_ids": torch.randint(0, 32000, (BATCH, seq), device="cuda"),
                  "attention_mask": padding_mask(seq), "use_cache": False}
        optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == 4, str(optimized.report)
        fresh = dict(kwargs, input_ids=torch.randint(0, 32000, (BATCH, seq), device="cuda"))
        real = fresh["attention_mask"].bool()
        with torch.no_grad():
            truth = reference(**fresh).logits
            with canonical_calls() as calls:
                got = optimized(**fresh).logits
            errors = [(out.float() - truth)[real].abs().max().item()
                      for out in (model(**fresh).logits, got)]
        times = [median_ms(lambda m=m: m(**fresh)) for m in (model, optimized)]
        print(f"| {seq} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f} | "
              f"{sum(bool(args[4]) for args in calls)}/{len(calls)} | "
              f"{errors[0]:.3f}, {errors[1]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["ops", "e2e"], choices=["ops", "e2e"])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"triton {triton.__version__}")
    if "ops" in args.parts:
        ops(args.seqs)
    if "e2e" in args.parts:
        e2e(args.seqs)


if __name__ == "__main__":
    main()
