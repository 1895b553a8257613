"""onnxruntime CPU latency: the original model's ONNX vs attnopt's, one process, medians.

Model: a BERT-style encoder, 4 layers, hidden 256, 4 heads (head dim 64), eager attention,
random weights, batch 1, sequences 512 and 4096 (positions sized to fit). Files compared:

- original: `torch.onnx.export` of the unmodified model (its hand-written attention as
  MatMul/Softmax/MatMul with the mask arithmetic);
- attnopt exact, decomposed: `export_onnx(opset=18)` of `optimize(model, "exact")`;
- attnopt exact, `Attention` op: `export_onnx(opset=23)`;
- attnopt exact, onnxruntime's fused `com.microsoft.MultiHeadAttention`: `export_onnx(target="ort")`;
- attnopt `long` (guarded approximations by sequence length, thresholds calibrated on this
  machine) and `compact` (guarded head pruning, GQA, int8 projections), opset 23.

Each file's outputs are checked against PyTorch first (export_onnx does it for attnopt's; the
original's is compared here). Latency: median of `--runs` onnxruntime runs after 2 warm-ups,
default session options (all cores), inputs identical across files.

    python benchmarks/bench_onnx.py [--seqs 512 4096] [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import onnxruntime  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402
from attnopt.timing import median_ms  # noqa: E402


def build(seq_len: int):
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=max(512, seq_len),
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len))
    mask = torch.ones_like(ids)
    mask[0, -seq_len // 8:] = 0  # some padding, so the mask matters
    return model, dict(input_ids=ids, attention_mask=mask)


def latency_ms(path: str, inputs: dict, runs: int) -> float:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    return median_ms(lambda: session.run(None, feed), runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}; onnxruntime {onnxruntime.__version__}; "
          f"{time.strftime('%Y-%m-%d')}")
    print("| seq | original ms | attnopt decomposed (opset 18) ms | attnopt Attention (opset 23) "
          "ms | attnopt MultiHeadAttention (ort) ms | original / decomposed | original / "
          "Attention | original / MultiHeadAttention | max abs err vs PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    policy_rows = []
    with tempfile.TemporaryDirectory() as directory:
        for seq_len in args.seqs:
            model, inputs = build(seq_len)
            with torch.no_grad():
                expected = model(**inputs).last_hidden_state
            original = os.path.join(directory, f"original-{seq_len}.onnx")
            torch.onnx.export(model, (), original, kwargs=inputs, dynamo=True, verbose=False)
            session = onnxruntime.InferenceSession(original)
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            errors = [float((torch.from_numpy(got) - expected).abs().max())]
            optimized = attnopt.optimize(model, example_kwargs=inputs)
            files = {}
            for label, opset, target in (("decomposed", 18, "onnx"), ("attention", 23, "onnx"),
                                         ("ort", 23, "ort")):
                files[label] = os.path.join(directory, f"attnopt-{seq_len}-{label}.onnx")
                result = attnopt.export_onnx(optimized, files[label], example_kwargs=inputs,
                                             opset=opset, target=target)
                errors.append(max(stats.max_abs_err for _, stats in result.errors))
            times = [latency_ms(original, inputs, args.runs)]
            times += [latency_ms(files[label], inputs, args.runs)
                      for label in ("decomposed", "attention", "ort")]
            print(f"| {seq_len} | {times[0]:.1f} | {times[1]:.1f} | {times[2]:.1f} | "
                  f"{times[3]:.1f} | {times[0] / times[1]:.2f} | {times[0] / times[2]:.2f} | "
                  f"{times[0] / times[3]:.2f} | {max(errors):.1e} |", flush=True)
            for policy in ("long", "compact"):
                guarded = attnopt.optimize(model, policy, example_kwargs=inputs)
                path = os.path.join(directory, f"attnopt-{seq_len}-{policy}.onnx")
                result = attnopt.export_onnx(guarded, path, example_kwargs=inputs)
                kept = sorted({r.rewrite if not (r.approximation or {}).get("weights") else
                               "+".join(r.approximation["weights"]) for r in guarded.report.sites
                               if r.site is not None})
                with torch.no_grad():
                    out = guarded(**inputs).last_hidden_state
                ms = latency_ms(path, inputs, args.runs)
                policy_rows.append(
                    f"| {seq_len} | {policy} | {', '.join(kept)} | "
                    f"{result.file_bytes / 1e6:.1f} | {ms:.1f} | {times[0] / ms:.2f} | "
                    f"{float((out - expected).norm() / expected.norm()):.3f} |")
    print()
    print("| seq | policy | rewrites kept (guarded) | ONNX MB | ms | original / this | output "
          "rel err vs original |")
    print("|---|---|---|---|---|---|---|")
    for row in policy_rows:
        print(row)


if __name__ == "__main__":
    main()
