"""Sliding-window attention on CUDA: the canonical call's window band against what runs without it.

Mistral and Gemma 2/3 let query i see only the W keys i-W+1 .. i. Hugging Face's SDPA path hands
SDPA that window as a dense boolean (B, 1, S, S) mask: SDPA reads all of it and computes every
score. attnopt turns a constant window mask into `attention(q, k, v, None, is_causal=True,
window_left=W-1)`, and a padded one into the mask plus both marks; the generated kernel then
visits only the key blocks inside the band.

Two parts, anchors in the same run, correctness (against float32) before timing:
- `ops`: bf16, GQA 16/8 heads, D128, 16K tokens per batch (B = 16K / n). The kernel with the band
  (`flash_attention(causal=True, window=(W-1, 0))`; on a Hopper GPU the warp-specialized one
  from 1K), the same on the Triton kernel (`ATTNOPT_HOPPER_FORWARD=0`), the kernel with the
  dense mask and the
  causal mark (what attnopt ran before the band), SDPA's default dispatch on the dense mask with
  k/v repeated (what Hugging Face runs), and compiled FlexAttention with a sliding-window
  BlockMask. Forward for every (n, W), forward+backward for a few. Medians of
  `triton.testing.do_bench`.
- `e2e`: a Mistral config (hidden 2048, 16 heads, 8 kv heads, 4 layers, sliding window W, random
  weights, bf16, `attn_implementation="sdpa"`, `use_cache=False`), batch 2, before and after
  `attnopt.optimize(policy="exact")`: without an attention_mask (a constant window mask: the
  call gets the band alone) and with the second row right-padded by a quarter (the mask stays,
  with both marks). Logits on real tokens against a float32 copy; medians of 25 CUDA-event
  timings after 5 warm-ups.

    PYTHONPATH=. python benchmarks/bench_sliding_window.py [--parts ops e2e]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnopt.kernels import flash_attention  # noqa: E402
from bench_attention import without_hopper_kernel  # noqa: E402
from bench_exact_cuda import (  # noqa: E402
    canonical_calls, checked_and_timed, median_ms, run_parts,
)

HEADS, KV_HEADS, HEAD_DIM, TOKENS = 16, 8, 128, 16384
FORWARD_SHAPES = [(1024, 256), (2048, 256), (2048, 1024), (4096, 256), (4096, 1024),
                  (8192, 1024), (8192, 4096), (16384, 1024), (16384, 4096)]
BACKWARD_SHAPES = [(2048, 1024), (4096, 1024), (8192, 1024), (16384, 4096)]
E2E_SEQS, E2E_WINDOW, E2E_BATCH, PADDED_FRACTION = (2048, 4096, 8192), 1024, 2, 0.25


def window_keep(seq: int, window: int) -> torch.Tensor:
    """(seq, seq) bool: query i sees keys i-window+1 .. i."""
    i = torch.arange(seq, device="cuda")[:, None]
    j = torch.arange(seq, device="cuda")[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    return mask_mod


def ops() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    group = HEADS // KV_HEADS
    rows = []
    for backward in (False, True):
        for seq, window in (BACKWARD_SHAPES if backward else FORWARD_SHAPES):
            torch._dynamo.reset()  # one compiled FlexAttention per mask_mod
            flex = torch.compile(flex_attention, dynamic=False)
            batch = max(1, TOKENS // seq)
            torch.manual_seed(seq + window)
            q = torch.randn(batch, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, KV_HEADS, seq, HEAD_DIM, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2))
            grad = torch.randn_like(q)
            keep = window_keep(seq, window)
            block_mask = create_block_mask(sliding_window_mod(window), None, None, seq, seq,
                                           device="cuda")
            if backward:
                q, k, v = (t.requires_grad_() for t in (q, k, v))
            # Hugging Face repeats k/v to q's head count before SDPA whenever there is a mask
            k_rep, v_rep = (t.repeat_interleave(group, 1) for t in (k, v))
            fns = {
                "band": lambda: flash_attention(q, k, v, causal=True, window=(window - 1, 0)),
                "band, Triton kernel": without_hopper_kernel(
                    lambda: flash_attention(q, k, v, causal=True, window=(window - 1, 0))),
                "mask + causal": lambda: flash_attention(q, k, v, causal=True, attn_bias=keep),
                "SDPA mask": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep,
                                                                    attn_mask=keep),
                "Flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
            }
            if backward:
                del fns["mask + causal"]
            truth = F.scaled_dot_product_attention(
                q.detach().float(), k_rep.detach().float(), v_rep.detach().float(),
                attn_mask=keep)
            times, errors = checked_and_timed(fns, truth, grad, backward)
            rows.append((backward, seq, batch, window, times, errors))
            print("ROW", backward, seq, window, {n: round(t, 4) for n, t in times.items()},
                  {n: f"{e:.1e}" for n, e in errors.items()}, flush=True)
    for backward in (False, True):
        print(f"\n**{'Forward + backward' if backward else 'Forward'}**, ms (anchor / band):\n")
        names = [n for n in rows[-1 if backward else 0][4]]
        print("| n | B | W | " + " | ".join(names) + " | max abs err vs fp32 |")
        print("|---|---|---|" + "---|" * len(names) + "---|")
        for is_backward, seq, batch, window, times, errors in rows:
            if is_backward != backward:
                continue
            band = times["band"]
            cells = [f"**{band:.3f}**"] + [f"{times[n]:.3f} ({times[n] / band:.2f})"
                                           for n in names[1:]]
            error = max(errors.values())
            print(f"| {seq} | {batch} | {window} | " + " | ".join(cells) + f" | {error:.1e} |")


def build_mistral(dtype: torch.dtype, window: int):
    import transformers
    config = transformers.MistralConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=16384,
        sliding_window=window, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).to("cuda", dtype).eval()


def e2e() -> None:
    import attnopt
    model = build_mistral(torch.bfloat16, E2E_WINDOW)
    reference = build_mistral(torch.float32, E2E_WINDOW)
    print(f"\n**Mistral, sliding window {E2E_WINDOW}, batch {E2E_BATCH}**, ms:\n")
    print("| seq | padded | HF sdpa ms | attnopt exact ms | sdpa / attnopt | calls with the band "
          "| max abs err on real tokens vs fp32 (sdpa, attnopt) |")
    print("|---|---|---|---|---|---|---|")
    for seq, padded in ((seq, padded) for seq in E2E_SEQS for padded in (False, True)):
        mask = torch.ones(E2E_BATCH, seq, dtype=torch.long, device="cuda")
        mask[1, seq - int(seq * PADDED_FRACTION):] = int(not padded)
        kwargs = {"input_ids": torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda"),
                  "use_cache": False}
        if padded:
            kwargs["attention_mask"] = mask
        optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == 4, str(optimized.report)
        fresh = dict(kwargs, input_ids=torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda"))
        real = mask.bool()
        with torch.no_grad():
            truth = reference(**fresh).logits
            with canonical_calls() as calls:
                got = optimized(**fresh).logits
            errors = [(out.float() - truth)[real].abs().max().item()
                      for out in (model(**fresh).logits, got)]
        times = [median_ms(lambda m=m: m(**fresh)) for m in (model, optimized)]
        windows = [args[8] if len(args) > 8 else None for args in calls]
        banded = sum(w == E2E_WINDOW - 1 for w in windows)
        print(f"| {seq} | {'yes' if padded else 'no'} | {times[0]:.2f} | {times[1]:.2f} | "
              f"{times[0] / times[1]:.2f} | "
              f"{banded}/{len(windows)} | {errors[0]:.3f}, {errors[1]:.3f} |", flush=True)


if __name__ == "__main__":
    run_parts({"ops": ops, "e2e": e2e})
