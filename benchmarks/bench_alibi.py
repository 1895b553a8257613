"""ALiBi on CUDA: the canonical call's slopes against the materialized bias that runs without them.

BLOOM, MPT and Falcon add `slope[h] * j` to the scores under a causal mask. Without attnopt that
bias is an (H, S, S) tensor (or an (B·H, 1, S) one broadcast by an eager baddbmm) and every
score is computed; attnopt fits the slopes (`passes/masks.fit_alibi`), drops the mask, and the
generated kernel computes `-slope[h] * |i - j|` in registers while skipping the blocks above the
diagonal.

Two parts, anchors in the same run, correctness (against float32) before timing:
- `ops`: bf16, 16 heads, D128, 16K tokens per batch (B = 16K / n), causal. The canonical op
  with slopes (`torch.ops.attnopt.attention(..., is_causal=True, alibi_slopes=s)`: the call a
  rewritten model makes; the kernel in the default mode, on a Hopper GPU the warp-specialized
  one from 1K), the same call on the Triton kernel (`ATTNOPT_HOPPER_FORWARD=0`), the kernel
  given the dense bias and the causal mark, SDPA's default dispatch on the dense (1, H, n, n)
  bias with the causal fill folded in (what the op ran on the additive mask before, and what
  Falcon's SDPA path runs), and compiled FlexAttention with an ALiBi score_mod and a causal
  BlockMask. Forward for every n, forward+backward for a few. Medians of
  `triton.testing.do_bench`.
- `e2e`: an MPT config (hidden 2048, 16 heads, 4 layers, random weights, bf16, eager: MPT has no
  SDPA path), batch 2, no attention_mask, before and after `attnopt.optimize(policy="exact")`.
  MPT adds a float32 ALiBi to its scores, which fits slopes exactly; BLOOM rounds its ALiBi to
  the model's dtype (bfloat16: off the line beyond 256 keys), so in half precision its bias
  stays additive. Logits against a float32 copy; medians of 25 CUDA-event timings after 5
  warm-ups.
- `mask`: the same MPT called with an attention_mask (all ones, and padded), whose ALiBi
  the graph then keeps as a dense bias: the unpadded copy (`attnopt/unpadded.py`) against
  the masks built (`ATTNOPT_UNPADDED=0`) and HF eager, three alternated rounds.
- `train`: the same MPT, one fine-tuning step (forward, cross-entropy on shifted tokens,
  backward) before and after `optimize`, which trains through the canonical op's autograd;
  the loss and the gradient of the first layer's attention projection compared.

    PYTHONPATH=.:benchmarks python benchmarks/bench_alibi.py [--parts ops e2e mask train]
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnopt  # noqa: E402,F401  (registers torch.ops.attnopt)
from attnopt.kernels import flash_attention  # noqa: E402
from bench_attention import without_hopper_kernel  # noqa: E402
from bench_exact_cuda import (  # noqa: E402
    MaskBuilt, alternated, canonical_calls, checked_and_timed, median_ms, run_parts,
)

HEADS, HEAD_DIM, TOKENS = 16, 128, 16384
FORWARD_SEQS = (1024, 2048, 4096, 8192, 16384)
BACKWARD_SEQS = (1024, 4096, 16384)
E2E_SEQS, E2E_BATCH = (1024, 2048, 4096), 2


def bloom_slopes(heads: int) -> torch.Tensor:
    """BLOOM's slopes for a power-of-two head count: 2^(-8 h / H), h = 1 .. H."""
    return torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], device="cuda")


def dense_bias(slopes: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, n, n): `-slope * |i - j|` below the diagonal, -inf above."""
    i = torch.arange(seq, device="cuda")[:, None]
    j = torch.arange(seq, device="cuda")[None, :]
    bias = -slopes[:, None, None] * (i - j).abs().float()
    return bias.masked_fill(j > i, float("-inf"))[None].to(dtype)


def ops() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    slopes = bloom_slopes(HEADS)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def causal_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    rows = []
    for backward in (False, True):
        for seq in (BACKWARD_SEQS if backward else FORWARD_SEQS):
            torch._dynamo.reset()  # one compiled FlexAttention per shape (no recompile limit)
            flex = torch.compile(flex_attention, dynamic=False)
            batch = max(1, TOKENS // seq)
            torch.manual_seed(seq)
            q, k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, device="cuda",
                                   dtype=torch.bfloat16) for _ in range(3))
            grad = torch.randn_like(q)
            bias = dense_bias(slopes, seq, torch.bfloat16)
            block_mask = create_block_mask(causal_mod, None, None, seq, seq, device="cuda")
            if backward:
                q, k, v = (t.requires_grad_() for t in (q, k, v))
            fns = {
                "slopes": lambda: torch.ops.attnopt.attention(q, k, v, None, True, None, False,
                                                              None, None, slopes),
                "slopes, Triton kernel": without_hopper_kernel(
                    lambda: torch.ops.attnopt.attention(q, k, v, None, True, None, False, None,
                                                        None, slopes)),
                "kernel bias": lambda: flash_attention(q, k, v, causal=True, attn_bias=bias),
                "SDPA bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                "Flex": lambda: flex(q, k, v, score_mod=alibi_mod, block_mask=block_mask),
            }
            if backward:
                del fns["kernel bias"]
            truth = F.scaled_dot_product_attention(
                q.detach().float(), k.detach().float(), v.detach().float(),
                attn_mask=dense_bias(slopes, seq, torch.float32))
            times, errors = checked_and_timed(fns, truth, grad, backward)
            flops = 4 * batch * HEADS * seq * seq * HEAD_DIM / 2 * (3.5 if backward else 1)
            rows.append((backward, seq, batch, times, errors, flops))
            print("ROW", backward, seq, {n: round(t, 4) for n, t in times.items()},
                  {n: f"{e:.1e}" for n, e in errors.items()}, flush=True)
            fns = truth = bias = None  # the n² bias of 16K goes before the next is made
            torch.cuda.empty_cache()
    for backward in (False, True):
        print(f"\n**{'Forward + backward' if backward else 'Forward'}**, ms "
              "(anchor / slopes; slopes TFLOP/s counts the causal half):\n")
        names = [n for n in next(r for r in rows if r[0] == backward)[3]]
        print("| n | B | " + " | ".join(names) + " | slopes TFLOP/s | max abs err vs fp32 |")
        print("|---|---|" + "---|" * len(names) + "---|---|")
        for is_backward, seq, batch, times, errors, flops in rows:
            if is_backward != backward:
                continue
            ours = times["slopes"]
            cells = [f"**{ours:.3f}**"] + [f"{times[n]:.3f} ({times[n] / ours:.2f})"
                                           for n in names[1:]]
            error = max(errors.values())
            print(f"| {seq} | {batch} | " + " | ".join(cells) +
                  f" | {flops / ours / 1e9:.0f} | {error:.1e} |")


def build_mpt(dtype: torch.dtype):
    import transformers
    config = transformers.MptConfig(vocab_size=32000, d_model=2048, n_layers=4, n_heads=16,
                                    max_seq_len=max(E2E_SEQS), expansion_ratio=4,
                                    attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.MptForCausalLM(config).to("cuda", dtype).eval()


def e2e() -> None:
    model = build_mpt(torch.bfloat16)
    reference = build_mpt(torch.float32)
    print(f"\n**MPT (4 layers, hidden 2048, 16 heads), batch {E2E_BATCH}, no "
          "attention_mask**, ms:\n")
    print("| seq | HF eager ms | attnopt exact ms | eager / attnopt | calls with slopes "
          "| max abs err vs fp32 (eager, attnopt) |")
    print("|---|---|---|---|---|---|")
    for seq in E2E_SEQS:
        kwargs = {"input_ids": torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda"),
                  "use_cache": False}
        optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == 4, str(optimized.report)
        fresh = dict(kwargs, input_ids=torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda"))
        with torch.no_grad():
            truth = reference(**fresh).logits
            with canonical_calls() as calls:
                got = optimized(**fresh).logits
            errors = [(out.float() - truth).abs().max().item()
                      for out in (model(**fresh).logits, got)]
        times = [median_ms(lambda m=m: m(**fresh)) for m in (model, optimized)]
        with_slopes = sum(len(args) > 9 and args[9] is not None for args in calls)
        print(f"| {seq} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f} | "
              f"{with_slopes}/{len(calls)} | {errors[0]:.3f}, {errors[1]:.3f} |", flush=True)
        if seq == E2E_SEQS[0]:
            print(optimized.report, flush=True)


def mask() -> None:
    """The same MPT called with an attention_mask, as a tokenizer's batch is: all ones, and
    padded (the first row's first 100 tokens). The mask then depends on the input, so the
    rewritten graph keeps it as a dense additive bias; an all-ones call runs the unpadded copy
    (`attnopt/unpadded.py`), which finds the ALiBi slopes in it. `masks built`:
    `ATTNOPT_UNPADDED=0`. Three alternated rounds (median of the rounds' medians)."""
    model = build_mpt(torch.bfloat16)
    reference = build_mpt(torch.float32)
    print(f"\n**MPT (4 layers, hidden 2048, 16 heads), batch {E2E_BATCH}, with an "
          "attention_mask**, ms:\n")
    print("| seq | attention_mask | HF eager ms | attnopt, masks built ms | attnopt ms "
          "| eager / attnopt | masks built / attnopt | calls with slopes "
          "| max abs err vs fp32 (eager, attnopt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    nothing = contextlib.nullcontext
    for seq in E2E_SEQS:
        for label in ("all ones", "padded"):
            ids = torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda")
            attention_mask = torch.ones_like(ids)
            if label == "padded":
                attention_mask[0, :100] = 0
            kwargs = {"input_ids": ids, "attention_mask": attention_mask, "use_cache": False}
            optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
            fresh = dict(kwargs, input_ids=torch.randint(0, 32000, (E2E_BATCH, seq),
                                                         device="cuda"))
            with torch.no_grad():
                shown = attention_mask.bool()  # (padded rows' logits are not compared)
                truth = reference(**fresh).logits[shown]
                with canonical_calls() as calls:
                    got = optimized(**fresh).logits[shown]
                errors = [(out.float() - truth).abs().max().item()
                          for out in (model(**fresh).logits[shown], got)]
            times = alternated({"eager": (model, nothing), "built": (optimized, MaskBuilt),
                                "attnopt": (optimized, nothing)},
                               lambda m: lambda: m(**fresh), 3)
            with_slopes = sum(len(args) > 9 and args[9] is not None for args in calls)
            print(f"| {seq} | {label} | {times['eager']:.2f} | {times['built']:.2f} | "
                  f"{times['attnopt']:.2f} | {times['eager'] / times['attnopt']:.2f} | "
                  f"{times['built'] / times['attnopt']:.2f} | {with_slopes}/{len(calls)} | "
                  f"{errors[0]:.3f}, {errors[1]:.3f} |", flush=True)


def train() -> None:
    model = build_mpt(torch.bfloat16)
    print(f"\n**MPT fine-tuning step (forward + loss + backward), batch {E2E_BATCH}**, ms:\n")
    print("| seq | HF eager ms | attnopt exact ms | eager / attnopt | loss (eager, attnopt) "
          "| max abs diff of Wqkv grad / max abs |")
    print("|---|---|---|---|---|---|")
    for seq in E2E_SEQS:
        ids = torch.randint(0, 32000, (E2E_BATCH, seq), device="cuda")
        optimized = attnopt.optimize(model, "exact",
                                     example_kwargs={"input_ids": ids, "use_cache": False})
        assert len(optimized.report.rewritten) == 4, str(optimized.report)

        @torch.enable_grad()  # (median_ms times under no_grad)
        def step(m):
            model.zero_grad(set_to_none=True)
            logits = m(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     ids[:, 1:].flatten())
            loss.backward()
            return loss
        weight = model.transformer.blocks[0].attn.Wqkv.weight
        losses, grads = [], []
        for m in (model, optimized):
            losses.append(step(m).item())
            grads.append(weight.grad.float().clone())
        times = [median_ms(lambda m=m: step(m)) for m in (model, optimized)]
        diff = (grads[0] - grads[1]).abs().max().item() / grads[0].abs().max().item()
        print(f"| {seq} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f} | "
              f"{losses[0]:.4f}, {losses[1]:.4f} | {diff:.3f} |", flush=True)


if __name__ == "__main__":
    run_parts({"ops": ops, "e2e": e2e, "mask": mask, "train": train})
