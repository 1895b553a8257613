"""onnxruntime CPU latency of one attention site: exact attention's ONNX forms against the
ONNX forms of attnopt's approximate ops. A script, not a test; results go to
docs/BENCHMARKS.md.

Each variant of `bench_long.variants` (the same patterns and parameters as the PyTorch
benchmark) is exported once with a dynamic sequence length, through attnopt's translation
table, and run in onnxruntime at every length in --seqs; exact attention is exported three
ways (decomposed opset-18 ops, the standard `Attention` op of opset 23, and target "ort":
onnxruntime's `MultiHeadAttention`, or `GroupQueryAttention` for the causal and grouped
calls). Before timing, each file's output is compared with the
PyTorch op on the same inputs (max abs error). Latency: median of --runs calls after 2
warm-ups, default session options (all cores), batch 1, float32. The PyTorch time of the same
call is measured in the same process for reference.

    PYTHONPATH=. python benchmarks/bench_onnx_ops.py [--seqs 1024 4096 16384] [--heads 8]
        [--dim 64] [--runs 5] [--exact-max 16384] [--only WORD ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import onnxruntime  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_long import variants  # noqa: E402

from attnopt.onnx_export import translation_table  # noqa: E402
from attnopt.timing import median_ms  # noqa: E402


class Site(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


def exact_forms():
    """The canonical op exported three ways each, for plain, causal and grouped (8 query heads
    over 2 kv heads, causal) calls: (label, fn, causal, opset, target)."""
    attention = torch.ops.attnopt.attention
    calls = {"exact": lambda q, k, v: attention(q, k, v),
             "exact causal": lambda q, k, v: attention(q, k, v, None, True),
             "exact causal GQA 4:1": lambda q, k, v: attention(
                 q, k[:, ::4], v[:, ::4], None, True, None, True)}
    forms = (("decomposed (opset 18)", 18, "onnx"), ("Attention (opset 23)", 23, "onnx"),
             ("target ort", 23, "ort"))
    return [(f"{name}, {form}", fn, "causal" in name, opset, target)
            for name, fn in calls.items() for form, opset, target in forms]


def export(fn, path: str, heads: int, dim: int, opset: int, target: str) -> None:
    length = torch.export.Dim("length", min=2, max=1 << 17)
    example = tuple(torch.randn(1, heads, 256, dim) for _ in range(3))
    dims = {name: {2: length} for name in "qkv"}
    torch.onnx.export(Site(fn), example, path, dynamo=True, opset_version=opset,
                      custom_translation_table=translation_table(opset, target),
                      dynamic_shapes=dims, input_names=list("qkv"), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--exact-max", type=int, default=16384,
                        help="skip exact attention above this length")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}; onnxruntime {onnxruntime.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; batch 1, {args.heads} heads, head dim {args.dim}, "
          f"float32", flush=True)
    table = [(label, fn, causal, 18, "onnx") for label, (fn, causal)
             in variants("cpu", args.heads, args.dim, args.window).items()
             if not label.startswith(("exact", "plain"))]  # plain FAVOR+: a PyTorch anchor
    table = exact_forms() + table
    if args.only:
        table = [row for row in table if any(word in row[0] for word in args.only)]
    print("| variant | " + " | ".join(f"n={n}: ORT ms (PyTorch ms)" for n in args.seqs) +
          " | max abs err vs PyTorch |")
    print("|---|" + "---|" * (len(args.seqs) + 1))
    with tempfile.TemporaryDirectory() as directory:
        for index, (label, fn, _causal, opset, target) in enumerate(table):
            path = os.path.join(directory, f"{index}.onnx")
            export(fn, path, args.heads, args.dim, opset, target)
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            cells, error = [], 0.0
            for n in args.seqs:
                if label.startswith("exact") and n > args.exact_max:
                    cells.append("—")
                    continue
                generator = torch.Generator().manual_seed(n)
                q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=generator)
                           for _ in range(3))
                feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
                with torch.no_grad():
                    expected = fn(q, k, v)
                got = torch.from_numpy(session.run(None, feed)[0])
                error = max(error, float((got - expected).abs().max()))
                ort_ms = median_ms(lambda: session.run(None, feed), args.runs)
                with torch.no_grad():
                    torch_ms = median_ms(lambda: fn(q, k, v), args.runs, warmup=1)
                cells.append(f"{ort_ms:.1f} ({torch_ms:.1f})")
            print(f"| {label} | " + " | ".join(cells) + f" | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
