"""Forward latency on CPU of BERT-base with hand-written (eager) attention, before and after
`attnopt.optimize(policy="exact")`, against the same model on transformers' SDPA path.

BERT config 12 layers × 768 × 12 heads, random weights, fp32, batch 1, a padding mask with the
last eighth of the keys masked. Correctness first (max abs error of the last hidden state against
the eager model on fresh inputs), then medians of --runs timed forwards after 2 warm-ups, all
models in one process.

`--unpadded`: the same BERT on an unpadded batch (the all-ones attention_mask a tokenizer
returns), with one more column: the rewritten model with the op's check for a redundant mask
switched off (`mask kept`, as before that check), alternated with the others over two rounds.
`--decoder`: the same table for a Llama decoder (4 layers × 512, 8 heads, 4 kv heads, vocab
32000).

    .venv/bin/python benchmarks/bench_exact_cpu.py [--seq 128 512] [--runs 10]
        [--unpadded | --decoder]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402
from attnopt.timing import median_ms  # noqa: E402


def build(implementation: str):
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072,
                                     max_position_embeddings=1024,
                                     attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def inputs(seq: int) -> dict:
    input_ids = torch.randint(0, 30000, (1, seq))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, -seq // 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_decoder(implementation: str):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=4, attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def unpadded(args, encoder: bool) -> None:
    """The table of `--decoder` / `--unpadded` (module docstring)."""
    op_module = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)
    builder, layers = (build, 12) if encoder else (build_decoder, 4)
    eager, sdpa = builder("eager"), builder("sdpa")
    print("| seq | eager ms | attnopt, mask kept ms | attnopt exact ms | sdpa ms "
          "| mask kept / attnopt | sdpa / attnopt | max abs err vs eager (attnopt, sdpa) |")
    print("|---|---|---|---|---|---|---|---|")

    def output(model, kwargs):
        out = model(**kwargs)
        return out.last_hidden_state if encoder else out.logits
    for seq in args.seq:
        ids = torch.randint(0, 30000, (1, seq))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not encoder:
            kwargs["use_cache"] = False
        optimized = attnopt.optimize(eager, "exact", example_kwargs=kwargs)
        assert len(optimized.report.rewritten) == layers, str(optimized.report)
        with torch.no_grad():
            truth = output(eager, kwargs)
            errors = [(output(model, kwargs) - truth).abs().max().item()
                      for model in (optimized, sdpa)]
        check = op_module.redundant_mask
        times = {name: [] for name in ("eager", "kept", "attnopt", "sdpa")}
        for _ in range(2):
            for name, model in (("eager", eager), ("kept", optimized), ("attnopt", optimized),
                                ("sdpa", sdpa)):
                if name == "kept":
                    op_module.redundant_mask = lambda *a: None
                with torch.no_grad():
                    times[name].append(median_ms(lambda m=model: m(**kwargs), args.runs))
                op_module.redundant_mask = check
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(f"| {seq} | {ms['eager']:.1f} | {ms['kept']:.1f} | {ms['attnopt']:.1f} | "
              f"{ms['sdpa']:.1f} | {ms['kept'] / ms['attnopt']:.2f} | "
              f"{ms['sdpa'] / ms['attnopt']:.2f} | {errors[0]:.1e}, {errors[1]:.1e} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--decoder", action="store_true")
    parser.add_argument("--unpadded", action="store_true")
    args = parser.parse_args()
    print(f"device: CPU ({platform.machine()}, {torch.get_num_threads()} threads); "
          f"torch {torch.__version__}; transformers {transformers.__version__}")
    if args.decoder or args.unpadded:
        unpadded(args, encoder=not args.decoder)
        return
    eager, sdpa = build("eager"), build("sdpa")
    print("| seq | eager ms | attnopt exact ms | sdpa ms | eager / attnopt | sdpa / attnopt "
          "| max abs err vs eager (attnopt, sdpa) |")
    print("|---|---|---|---|---|---|---|")
    for seq in args.seq:
        optimized = attnopt.optimize(eager, "exact", example_kwargs=inputs(seq))
        assert len(optimized.report.rewritten) == 12, str(optimized.report)
        fresh = inputs(seq)
        with torch.no_grad():
            truth = eager(**fresh).last_hidden_state
            errors = [(model(**fresh).last_hidden_state - truth).abs().max().item()
                      for model in (optimized, sdpa)]
        with torch.no_grad():
            times = [median_ms(lambda m=model: m(**fresh), args.runs)
                     for model in (eager, optimized, sdpa)]
        print(f"| {seq} | {times[0]:.1f} | {times[1]:.1f} | {times[2]:.1f} | "
              f"{times[0] / times[1]:.2f} | {times[2] / times[1]:.2f} | "
              f"{errors[0]:.1e}, {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
