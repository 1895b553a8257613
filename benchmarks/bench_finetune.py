"""A Llama decoder fine-tuned and run on CUDA through `optimize(policy="exact")`, against the
same model on Hugging Face's SDPA path, with the canonical op's two changes switched off one
at a time in the same process.

In the default mode (`ATTNOPT_KERNELS=auto`) plain, causal and padded sites run PyTorch's fused
SDPA. Two things cost a rewritten model against HF's SDPA path:
- the op's implementation runs below autograd, so its backward ran SDPA's forward a second time
  and differentiated that. Now the forward is recorded under autograd
  (`ops/common.record_forward`) and the backward runs SDPA's own backward on what its backend
  saved. Column `recompute`: the record switched off;
- a tokenizer's all-ones attention_mask became a (B, 1, S, S) mask that SDPA reads whole, where
  HF's SDPA path checks its 2-D mask and passes `is_causal` alone. Now the op drops a mask that
  hides only later keys (`ops/attention.redundant_mask`). Column `mask kept`: the check
  switched off; `before`: both off. Since then a call whose attention_mask is all ones runs a
  copy of the graph that does not build the mask at all (`attnopt/unpadded.py`); column
  `mask built`: that copy switched off (the mask built, then dropped by the op).

Model: Llama config, hidden 2048, 16 heads (head dim 128), 8 kv heads, 4 layers, random
weights, bf16, batch 2 (`--batch`), rewritten from its eager attention. Rows without padding
and with the first sequence left-padded by 100 tokens. `train`: one step = forward,
cross-entropy on the shifted tokens of real positions, backward; the loss and the first
layer's q_proj gradient compared with the SDPA model's before timing, peak memory of one
step. `forward`: the forward alone under no_grad. Medians of 25 CUDA-event timings after 5 warm-ups, the columns alternated
over three rounds (median of the three medians).

    PYTHONPATH=.:benchmarks python benchmarks/bench_finetune.py [--seqs 1024 2048 4096]
        [--parts train forward] [--rounds 3] [--batch 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnopt  # noqa: E402
from attnopt.ops import common  # noqa: E402
from bench_exact_cuda import MaskBuilt, MaskKept, alternated, build  # noqa: E402

PADDING = 100
BATCH, ROUNDS = 2, 3  # (--batch, --rounds)


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


@contextlib.contextmanager
def before():
    """Both: the op as it was before this benchmark's changes."""
    with Recompute(), MaskKept():
        yield


def rows(eager, sdpa, seqs):
    """(seq, padding, ids, mask, optimized model, {column: (model, context)}) per table row."""
    for seq in seqs:
        for padded in (False, True):
            ids = torch.randint(0, 32000, (BATCH, seq), device="cuda")
            mask = torch.ones(BATCH, seq, dtype=torch.long, device="cuda")
            if padded:
                mask[0, :PADDING] = 0
            optimized = attnopt.optimize(eager, "exact", example_kwargs={
                "input_ids": ids, "attention_mask": mask, "use_cache": False})
            assert len(optimized.report.rewritten) == 4, str(optimized.report)
            yield seq, padded, ids, mask, optimized, {
                "eager": (eager, contextlib.nullcontext), "sdpa": (sdpa, contextlib.nullcontext),
                "before": (optimized, before), "recompute": (optimized, Recompute),
                "mask kept": (optimized, MaskKept), "mask built": (optimized, MaskBuilt),
                "attnopt": (optimized, contextlib.nullcontext)}


COLUMNS = ("eager", "sdpa", "before", "recompute", "mask kept", "mask built", "attnopt")


def train(eager, sdpa, seqs) -> None:
    print("\n**Fine-tuning step** (forward, loss, backward), ms; in brackets HF sdpa's time "
          "over the column's:\n")
    print("| seq | padding | " + " | ".join(COLUMNS) + " | peak GiB (sdpa, before, attnopt) "
          "| loss diff, q_proj grad diff / max (vs sdpa) |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|---|")
    for seq, padded, ids, mask, optimized, runs in rows(eager, sdpa, seqs):
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
        ms = alternated(runs, lambda m: lambda: step(m, ids, mask), ROUNDS)
        cells = [f"{ms[name]:.2f} ({ms['sdpa'] / ms[name]:.2f})" for name in COLUMNS]
        print(f"| {seq} | {PADDING if padded else 0} | " + " | ".join(cells) +
              f" | {peaks['sdpa']:.2f}, {peaks['before']:.2f}, {peaks['attnopt']:.2f} | "
              f"{loss_diff:.1e}, {grad_diff:.3f} |", flush=True)
        for model in (eager, sdpa):
            model.zero_grad(set_to_none=True)


def forward(eager, sdpa, seqs) -> None:
    print("\n**Forward** (no grad), ms; in brackets HF sdpa's time over the column's:\n")
    print("| seq | padding | " + " | ".join(COLUMNS[:3]) + " | mask built | attnopt |")
    print("|---|---|---|---|---|---|---|")
    for seq, padded, ids, mask, optimized, runs in rows(eager, sdpa, seqs):
        runs = {name: runs[name] for name in ("eager", "sdpa", "before", "mask built",
                                              "attnopt")}
        ms = alternated(runs, lambda m: lambda: m(input_ids=ids, attention_mask=mask,
                                                   use_cache=False), ROUNDS)
        cells = [f"{ms[name]:.2f} ({ms['sdpa'] / ms[name]:.2f})" for name in runs]
        print(f"| {seq} | {PADDING if padded else 0} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    global ROUNDS, BATCH
    import transformers
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--parts", nargs="+", default=["train", "forward"],
                        choices=["train", "forward"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    ROUNDS, BATCH = args.rounds, args.batch
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}")
    eager, sdpa = build("eager", torch.bfloat16), build("sdpa", torch.bfloat16)
    for part in args.parts:
        {"train": train, "forward": forward}[part](eager, sdpa, args.seqs)


if __name__ == "__main__":
    main()
