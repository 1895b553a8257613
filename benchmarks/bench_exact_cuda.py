"""Forward latency on CUDA of a Hugging Face decoder with hand-written (eager) attention, before
and after `attnopt.optimize(policy="exact")`, against the same model on PyTorch's SDPA path.

Model: Llama config, hidden 2048, 16 heads (head dim 128), 8 kv heads, 4 layers, random
weights, bf16, batch 1, `use_cache=False`. Anchors in the same run: the eager model (what
attnopt rewrites) and `attn_implementation="sdpa"` (what a user would switch to by hand).
Correctness first: each model's logits against a float32 eager reference on fresh inputs.
Medians of CUDA-event timings (25 runs after 5 warm-ups).

`--encoder`: BERT-base instead (12 layers × 768, 12 heads, random weights, bf16, batch 8) on an
unpadded batch (all-ones attention_mask), with one more column: the rewritten model with the
op's check for a redundant mask switched off (`mask kept`: SDPA reads the (B, 1, 1, S) zeros, as
before the check), the columns alternated over three rounds (median of the three medians).

    PYTHONPATH=. python benchmarks/bench_exact_cuda.py [--seq 1024 2048 4096] [--encoder]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402


def build(implementation: str, dtype: torch.dtype):
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=8192,
        attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda", dtype).eval()


@contextlib.contextmanager
def canonical_calls():
    """Yields a list that collects the arguments of every canonical attention call made inside
    (`attnopt.ops.ATTENTION_OP`), as the graph passed them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attnopt.ops import ATTENTION_OP
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == ATTENTION_OP:
                calls.append(args)
            return func(*args, **(kwargs or {}))

    with Spy():
        yield calls


@torch.no_grad()
def median_ms(fn, warmup: int = 5, runs: int = 25) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_do_bench(fn, repeats: int = 3) -> float:
    """Median over `repeats` runs of `triton.testing.do_bench`'s median (L2 flushed)."""
    import triton
    return statistics.median(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                     return_mode="median")
                             for _ in range(repeats))


def run_parts(parts: dict) -> None:
    """A benchmark made of named parts (name -> function): `--parts` picks them (default all),
    run in order after a line naming the device and the torch and triton versions."""
    import triton
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=list(parts), choices=list(parts))
    chosen = parser.parse_args().parts
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"triton {triton.__version__}")
    for name, part in parts.items():
        if name in chosen:
            part()


def checked_and_timed(fns: dict, truth: torch.Tensor, grad: torch.Tensor, backward: bool
                      ) -> tuple[dict, dict]:
    """(median `do_bench` ms, max abs error against `truth`) of each named call in `fns`:
    the forward, or with `backward` the forward + backward against `grad`."""
    errors = {name: (fn().detach().float() - truth).abs().max().item()
              for name, fn in fns.items()}
    if backward:  # (a call with a kernel switch keeps it on for its backward: `around`)
        fns = {name: getattr(fn, "around", lambda step: step)(lambda fn=fn: fn().backward(grad))
               for name, fn in fns.items()}
    with torch.no_grad() if not backward else torch.enable_grad():
        times = {name: median_do_bench(fn) for name, fn in fns.items()}
    return times, errors


def MaskBuilt():  # noqa: N802 - a context-manager class to callers (`alternated`)
    """Every call runs the rewritten graph with its masks (`ATTNOPT_UNPADDED=0`): an unpadded
    batch's mask is built, then dropped by the op (`redundant_mask`)."""
    from attnopt.unpadded import UNPADDED_ENV
    return mock.patch.dict(os.environ, {UNPADDED_ENV: "0"})


class MaskKept:
    """The canonical op as before it dropped redundant masks (an unpadded batch's):
    `ops/attention.redundant_mask` switched off, so SDPA reads the mask, and no unpadded copy
    of the graph (`MaskBuilt`)."""

    def __enter__(self):
        import sys
        self.built = MaskBuilt()
        self.built.__enter__()
        self.ops = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)
        self.saved, self.ops.redundant_mask = self.ops.redundant_mask, lambda *args: None

    def __exit__(self, *exc):
        self.ops.redundant_mask = self.saved
        self.built.__exit__(*exc)


def alternated(columns: dict, fn, rounds: int, median=median_ms) -> dict:
    """Median over `rounds` alternated rounds of `median(fn(model))` for each column
    (name -> (model, a context manager class to time it under))."""
    times = {name: [] for name in columns}
    for _ in range(rounds):
        for name, (model, context) in columns.items():
            with context():
                times[name].append(median(fn(model)))
    return {name: statistics.median(values) for name, values in times.items()}


def mask_kept_table(eager, sdpa, seqs, inputs, output, sites: int, rounds: int,
                    median=median_ms, time_format=".2f", error_format=".3f") -> None:
    """Rows of HF eager, attnopt with the mask kept (`MaskKept`), attnopt and HF sdpa on the
    unpadded inputs `inputs(seq)`; `output(model, inputs)` is the tensor the errors compare
    with the eager model's."""
    print("| seq | eager ms | attnopt, mask kept ms | attnopt exact ms | sdpa ms "
          "| mask kept / attnopt | sdpa / attnopt | max abs err vs eager (attnopt, sdpa) |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in seqs:
        kwargs = inputs(seq)
        optimized = attnopt.optimize(eager, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == sites, str(optimized.report)
        with torch.no_grad():
            truth = output(eager, kwargs).float()
            errors = [(output(model, kwargs).float() - truth).abs().max().item()
                      for model in (optimized, sdpa)]
        nothing = contextlib.nullcontext
        ms = alternated({"eager": (eager, nothing), "kept": (optimized, MaskKept),
                         "attnopt": (optimized, nothing), "sdpa": (sdpa, nothing)},
                        lambda model: lambda: model(**kwargs), rounds, median)
        t, e = time_format, error_format
        print(f"| {seq} | {ms['eager']:{t}} | {ms['kept']:{t}} | {ms['attnopt']:{t}} | "
              f"{ms['sdpa']:{t}} | {ms['kept'] / ms['attnopt']:.2f} | "
              f"{ms['sdpa'] / ms['attnopt']:.2f} | {errors[0]:{e}}, {errors[1]:{e}} |",
              flush=True)


def build_bert(implementation: str, device: str, max_positions: int,
               width: int = 768) -> torch.nn.Module:
    """A 12-layer BERT with random weights (seed 0): BERT-base at width 768 (12 heads), 4
    heads below; bf16 on CUDA, float32 elsewhere."""
    config = transformers.BertConfig(hidden_size=width, num_hidden_layers=12,
                                     num_attention_heads=12 if width >= 768 else 4,
                                     intermediate_size=4 * width,
                                     max_position_embeddings=max_positions,
                                     attn_implementation=implementation)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return transformers.BertModel(config).to(device, dtype).eval()


def encoder(seqs) -> None:
    def inputs(seq: int) -> dict:
        ids = torch.randint(0, 30000, (8, seq), device="cuda")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask_kept_table(build_bert("eager", "cuda", max(seqs)), build_bert("sdpa", "cuda", max(seqs)),
                    seqs, inputs, lambda model, kwargs: model(**kwargs).last_hidden_state, 12,
                    rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--encoder", action="store_true")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}")
    if args.encoder:
        encoder(args.seq)
        return
    eager, sdpa = build("eager", torch.bfloat16), build("sdpa", torch.bfloat16)
    reference = build("eager", torch.float32)
    print("| seq | eager ms | attnopt exact ms | sdpa ms | eager / attnopt | sdpa / attnopt "
          "| max abs err vs fp32: eager, attnopt, sdpa |")
    print("|---|---|---|---|---|---|---|")
    for seq in args.seq:
        ids = torch.randint(0, 32000, (1, seq), device="cuda")
        kwargs = {"input_ids": ids, "use_cache": False}
        optimized = attnopt.optimize(eager, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == 4, str(optimized.report)
        fresh = {"input_ids": torch.randint(0, 32000, (1, seq), device="cuda"),
                 "use_cache": False}
        with torch.no_grad():
            truth = reference(**fresh).logits
            errors = [(model(**fresh).logits.float() - truth).abs().max().item()
                      for model in (eager, optimized, sdpa)]
        times = [median_ms(lambda m=model: m(**fresh)) for model in (eager, optimized, sdpa)]
        print(f"| {seq} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | "
              f"{times[0] / times[1]:.2f} | {times[2] / times[1]:.2f} | "
              f"{errors[0]:.3f}, {errors[1]:.3f}, {errors[2]:.3f} |")


if __name__ == "__main__":
    main()
