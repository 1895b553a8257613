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


def encoder(seqs) -> None:
    import sys
    op_module = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)

    def build_bert(implementation: str):
        config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=3072,
                                         max_position_embeddings=max(seqs),
                                         attn_implementation=implementation)
        torch.manual_seed(0)
        return transformers.BertModel(config).to("cuda", torch.bfloat16).eval()
    eager, sdpa = build_bert("eager"), build_bert("sdpa")
    print("| seq | eager ms | attnopt, mask kept ms | attnopt exact ms | sdpa ms "
          "| mask kept / attnopt | sdpa / attnopt | max abs err vs eager (attnopt, sdpa) |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in seqs:
        ids = torch.randint(0, 30000, (8, seq), device="cuda")
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        optimized = attnopt.optimize(eager, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == 12, str(optimized.report)
        with torch.no_grad():
            truth = eager(**kwargs).last_hidden_state.float()
            errors = [(model(**kwargs).last_hidden_state.float() - truth).abs().max().item()
                      for model in (optimized, sdpa)]
        check = op_module.redundant_mask
        times = {name: [] for name in ("eager", "kept", "attnopt", "sdpa")}
        for _ in range(3):
            for name, model in (("eager", eager), ("kept", optimized), ("attnopt", optimized),
                                ("sdpa", sdpa)):
                if name == "kept":
                    op_module.redundant_mask = lambda *a: None
                times[name].append(median_ms(lambda m=model: m(**kwargs)))
                op_module.redundant_mask = check
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(f"| {seq} | {ms['eager']:.2f} | {ms['kept']:.2f} | {ms['attnopt']:.2f} | "
              f"{ms['sdpa']:.2f} | {ms['kept'] / ms['attnopt']:.2f} | "
              f"{ms['sdpa'] / ms['attnopt']:.2f} | {errors[0]:.3f}, {errors[1]:.3f} |",
              flush=True)


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
