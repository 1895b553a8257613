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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402
from attnopt.timing import median_ms  # noqa: E402


def build(implementation: str):
    from bench_exact_cuda import build_bert
    return build_bert(implementation, "cpu", 1024)


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
    from bench_exact_cuda import mask_kept_table

    def inputs(seq: int) -> dict:
        ids = torch.randint(0, 30000, (1, seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if encoder else \
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    def output(model, kwargs):
        out = model(**kwargs)
        return out.last_hidden_state if encoder else out.logits
    builder = build if encoder else build_decoder
    mask_kept_table(builder("eager"), builder("sdpa"), args.seq, inputs, output,
                    12 if encoder else 4, rounds=2,
                    median=lambda fn: median_ms(fn, args.runs), time_format=".1f",
                    error_format=".1e")


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
