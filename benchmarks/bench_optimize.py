"""Wall time of `attnopt.optimize(policy="exact")` against a bare `torch.export.export`.

Model: a 12-layer, 768-wide, 12-head BERT config (random weights, built from config), batch 1,
sequence 128, CPU. `optimize` includes capture, passes, verification on the examples and two
fresh draws, and the first call of the optimized model. Anchors: a bare static export, and a
bare export with batch and sequence dims `Dim.AUTO` (what capturing for varying shapes costs).
Medians of --repeats runs each, in one process, alternating. Target: ratio <= 2.

    .venv/bin/python benchmarks/bench_optimize.py [--repeats 3] [--layers 12] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402


def build(layers: int):
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=layers,
                                     num_attention_heads=12, intermediate_size=3072)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    model = build(args.layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    attention_mask = torch.ones_like(input_ids)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}

    export_times, dynamic_times, optimize_times, unverified_times = [], [], [], []
    auto = torch.export.Dim.AUTO
    dynamic_shapes = {name: {0: auto, 1: auto} for name in kwargs}
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch.export.export(model, (), kwargs, strict=False)
        export_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        torch.export.export(model, (), kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        dynamic_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
        with torch.no_grad():
            optimized(**kwargs)
        optimize_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        unverified = attnopt.optimize(model, "exact", example_kwargs=kwargs, verify=False)
        with torch.no_grad():
            unverified(**kwargs)
        unverified_times.append(time.perf_counter() - start)

    export_median = statistics.median(export_times)
    dynamic_median = statistics.median(dynamic_times)
    optimize_median = statistics.median(optimize_times)
    unverified_median = statistics.median(unverified_times)
    sites = len(optimized.report.rewritten)
    print(f"device: CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads); torch {torch.__version__}; "
          f"transformers {transformers.__version__}")
    print(f"BERT {args.layers}x768x12, seq {args.seq}: {sites} sites rewritten")
    print(f"torch.export.export (non-strict, static): median {export_median:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in export_times)})")
    print(f"torch.export.export (non-strict, batch/sequence Dim.AUTO): median "
          f"{dynamic_median:.2f} s ({', '.join(f'{t:.2f}' for t in dynamic_times)})")
    print(f"attnopt.optimize(policy='exact') + first call: median {optimize_median:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in optimize_times)})")
    print(f"attnopt.optimize(policy='exact', verify=False) + first call: median "
          f"{unverified_median:.2f} s ({', '.join(f'{t:.2f}' for t in unverified_times)})")
    print(f"ratio optimize / static export: {optimize_median / export_median:.2f} "
          "(target <= 2)")
    print(f"ratio optimize / dynamic export: {optimize_median / dynamic_median:.2f}")
    print(f"ratio optimize(verify=False) / static export: "
          f"{unverified_median / export_median:.2f}")
    print("pass timings (last run):", ", ".join(
        f"{p['name']} {p['seconds'] * 1e3:.0f} ms" for p in optimized.report.passes))


if __name__ == "__main__":
    main()
