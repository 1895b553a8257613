"""A fine-tuning step on CUDA through `optimize(policy="exact")`'s SDPA sites: the canonical op's
backward on SDPA's saved forward against the same backward running the forward again.

In the default mode (`ATTNOPT_KERNELS=auto`) plain, causal and padded sites run PyTorch's fused
SDPA. The op's implementation runs below autograd, so its backward used to run SDPA's forward a
second time and differentiate that. Now the forward is recorded under autograd
(`ops/common.record_forward`) and the backward runs SDPA's own backward on what its backend
saved. `recompute` re-measures the old path in the same process (the record switched off);
anchors: the Hugging Face model on its eager and SDPA attention.

Model: Llama config, hidden 2048, 16 heads (head dim 128), 8 kv heads, 4 layers, random
weights, bf16, batch 2; one step = forward, cross-entropy on shifted tokens, backward. Rows
without padding (causal sites: SDPA's flash or cuDNN backend) and with a left-padded batch (a
mask: SDPA's efficient or cuDNN backend). Losses and the first layer's q_proj gradient are
compared with the SDPA model's before timing; medians of 25 CUDA-event timings after 5
warm-ups, the four models alternated over three rounds (median of the three medians); peak
memory of one step.

    PYTHONPATH=.:benchmarks python benchmarks/bench_finetune.py [--seqs 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnopt  # noqa: E402
from attnopt.ops import common  # noqa: E402
from bench_exact_cuda import build, median_ms  # noqa: E402

BATCH, PADDING, ROUNDS = 2, 100, 3


def step(model, ids, mask):
    """One fine-tuning step's forward and backward (gradients accumulate into the weights);
    padded positions are left out of the loss, as fine-tuning does."""
    with torch.enable_grad():  # (median_ms times under no_grad)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten())
        loss.backward()
    return loss


class Recompute:
    """The op's backward as it was: the forward not recorded, so run again in the backward."""

    def __enter__(self):
        self.saved, common._INCLUDE_AUTOGRAD = common._INCLUDE_AUTOGRAD, None

    def __exit__(self, *exc):
        common._INCLUDE_AUTOGRAD = self.saved


def main() -> None:
    import contextlib
    import transformers
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}")
    eager, sdpa = build("eager", torch.bfloat16), build("sdpa", torch.bfloat16)
    print("| seq | padding | HF eager | HF sdpa | attnopt, recompute | attnopt | "
          "sdpa / attnopt | recompute / attnopt | peak GiB (sdpa, recompute, attnopt) "
          "| loss diff, q_proj grad diff / max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for padded in (False, True):
            ids = torch.randint(0, 32000, (BATCH, seq), device="cuda")
            mask = torch.ones(BATCH, seq, dtype=torch.long, device="cuda")
            if padded:
                mask[0, :PADDING] = 0
            optimized = attnopt.optimize(eager, "exact", example_kwargs={
                "input_ids": ids, "attention_mask": mask, "use_cache": False})
            assert len(optimized.report.rewritten) == 4, str(optimized.report)
            runs = {"eager": (eager, contextlib.nullcontext), "sdpa": (sdpa, contextlib.nullcontext),
                    "recompute": (optimized, Recompute), "attnopt": (optimized,
                                                                    contextlib.nullcontext)}
            losses, grads, peaks = {}, {}, {}
            for name, (model, context) in runs.items():
                weights = model if name in ("eager", "sdpa") else eager
                weights.zero_grad(set_to_none=True)
                torch.cuda.reset_peak_memory_stats()
                with context():
                    losses[name] = step(model, ids, mask).item()
                peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30
                grads[name] = weights.model.layers[0].self_attn.q_proj.weight.grad.float()
            scale = grads["sdpa"].abs().max().item()
            loss_diff = abs(losses["attnopt"] - losses["sdpa"])
            grad_diff = (grads["attnopt"] - grads["sdpa"]).abs().max().item() / scale
            assert torch.equal(grads["attnopt"], grads["recompute"]) or \
                (grads["attnopt"] - grads["recompute"]).abs().max().item() / scale < 1e-2
            times = {name: [] for name in runs}
            for _ in range(ROUNDS):
                for name, (model, context) in runs.items():
                    with context():
                        times[name].append(median_ms(lambda m=model: step(m, ids, mask)))
            ms = {name: statistics.median(values) for name, values in times.items()}
            print(f"| {seq} | {PADDING if padded else 0} | {ms['eager']:.2f} | "
                  f"{ms['sdpa']:.2f} | {ms['recompute']:.2f} | **{ms['attnopt']:.2f}** | "
                  f"{ms['sdpa'] / ms['attnopt']:.2f} | {ms['recompute'] / ms['attnopt']:.2f} | "
                  f"{peaks['sdpa']:.2f}, {peaks['recompute']:.2f}, {peaks['attnopt']:.2f} | "
                  f"{loss_diff:.1e}, {grad_diff:.3f} |", flush=True)
            for model in (eager, sdpa):
                model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
