"""Weight rewrites (GQA conversion, head pruning): bytes, latency, error, task accuracy.

Two tables:

1. A 4-layer, 256-wide, 8-head encoder (`nn.TransformerEncoder`, packed in-projection) at
   batch × n tokens: parameter bytes of the rewritten graph, median latency in this process
   against the same model under policy "exact" (measured in the same run, alternating), and
   the output's normwise relative error against the original; then some rows exported to
   ONNX and timed in onnxruntime (CPU provider). The weights are random, so the rewrites are
   run unguarded (`verify=False`): this table is about size and speed.
2. The trained fixtures of the test suite (tests/trained.py: 1 layer, 2 heads, trained on
   retrieval / local / diffuse tasks): task accuracy before and after each rewrite unguarded,
   the output error, and what the guard decides under the default budget.

Run: `PYTHONPATH=. python benchmarks/bench_compress.py [--n 512] [--batch 4] [--runs 10]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import attnopt
from attnopt import Policy
from attnopt.policy import Rule
from attnopt.presets import compact_policy
from attnopt.region import parameter_bytes
from attnopt.timing import median_ms

REWRITES = {
    "exact": [],
    "gqa 8→4 kv heads": [Rule("gqa", params={"group_size": 2, "grouping": "contiguous"})],
    "gqa 8→2 kv heads": [Rule("gqa", params={"kv_heads": 2, "grouping": "contiguous"})],
    "gqa 8→1 (MQA)": [Rule("gqa", params={"kv_heads": 1, "grouping": "contiguous"})],
    "prune 25% heads": [Rule("prune_heads", params={"fraction": 0.25})],
    "prune 50% heads": [Rule("prune_heads", params={"fraction": 0.5})],
    "prune 50% + gqa 4→2": [Rule("prune_heads", params={"fraction": 0.5}),
                            Rule("gqa", params={"group_size": 2, "grouping": "contiguous"})],
    "int8 weight-only": [Rule("int8", params={"mode": "weight_only"})],
    "int8 dynamic": [Rule("int8", params={"mode": "dynamic"})],
    "compact preset": compact_policy().weights,
}
#: The rows also exported to ONNX and timed in onnxruntime.
ONNX_ROWS = ("exact", "prune 50% + gqa 4→2", "int8 weight-only", "int8 dynamic",
             "compact preset")


def _policy(name: str, rules: list) -> Policy:
    return Policy(name, weights=rules) if rules else Policy(name, default="exact")


def _relative(out, ref) -> float:
    return float((out - ref).norm() / ref.norm())


def encoder_table(n: int, batch: int, runs: int) -> list[dict]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    x = torch.randn(batch, n, 256)
    rows = []
    with torch.no_grad():
        reference = model(x)
        optimized = {name: attnopt.optimize(model, _policy(name, rules), example_inputs=(x,),
                                            verify=False)
                     for name, rules in REWRITES.items()}
        for module in optimized.values():
            module(x)  # warm
        times = {name: [] for name in optimized}
        for _ in range(3):  # alternate so drift affects every row alike
            for name, module in optimized.items():
                times[name].append(median_ms(lambda m=module: m(x), runs))
        exact_ms = min(times["exact"])
        for name, module in optimized.items():
            parameters = module.report.parameters or {
                "before_bytes": parameter_bytes(model), "after_bytes": parameter_bytes(model)}
            sites = [r for r in module.report.sites if r.site is not None]
            applied = sum(1 for r in sites if r.approximation)
            ms = min(times[name])
            rows.append({"rewrite": name, "sites_rewritten": f"{applied}/{len(sites)}",
                         "param_MB": round(parameters["after_bytes"] / 1e6, 3),
                         "param_ratio": round(parameters["after_bytes"] /
                                              parameters["before_bytes"], 3),
                         "ms": round(ms, 2), "speedup_vs_exact": round(exact_ms / ms, 3),
                         "output_rel_err": round(_relative(module(x), reference), 4)})
    with tempfile.TemporaryDirectory() as directory:
        exact_ort = None
        for row in rows:
            if row["rewrite"] not in ONNX_ROWS:
                continue
            result = attnopt.export_onnx(optimized[row["rewrite"]],
                                         str(Path(directory) / "model.onnx"),
                                         example_inputs=(x,), latency_runs=runs)
            row["onnx_MB"] = round(result.file_bytes / 1e6, 3)
            row["ort_ms"] = round(result.ort_latency_ms, 2)
            exact_ort = exact_ort or result.ort_latency_ms
            row["ort_speedup_vs_exact"] = round(exact_ort / result.ort_latency_ms, 3)
    return rows


def trained_table() -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import trained
    rows = []
    for task in trained.TASKS:
        model = trained.train(task)
        tokens, _ = trained.draw(task, 8, torch.Generator().manual_seed(5))
        before = trained.accuracy(model, task)
        for name, policy in (
                ("gqa 2→1 (MQA)", _policy("gqa", [Rule("gqa", params={"kv_heads": 1})])),
                ("prune 1 of 2 heads",
                 _policy("prune", [Rule("prune_heads", params={"fraction": 0.5})])),
                ("int8 dynamic", _policy("int8", [Rule("int8", params={"mode": "dynamic"})])),
                ("compact preset", "compact"), ("edge preset", "edge")):
            unguarded = attnopt.optimize(model, policy, example_inputs=(tokens,),
                                         verify=False)
            guarded = attnopt.optimize(model, policy, example_inputs=(tokens,))
            (record,) = [r for r in guarded.report.sites if r.site is not None]
            kept = record.approximation or {}
            kept = [k for k in kept.get("weights", {})] + \
                ([kept["variant"]] if kept.get("variant", "exact") != "exact" else [])
            with torch.no_grad():
                error = _relative(unguarded(tokens), model(tokens))
            rows.append({"task": task, "rewrite": name, "accuracy_before": round(before, 3),
                         "accuracy_after": round(trained.accuracy(unguarded, task), 3),
                         "output_rel_err": round(error, 3),
                         "guard_kept": "+".join(kept) or "nothing (exact)",
                         "accuracy_guarded": round(trained.accuracy(guarded, task), 3)})
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    header = {"device": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "n": args.n, "batch": args.batch}
    encoder = encoder_table(args.n, args.batch, args.runs)
    fixtures = trained_table()
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "encoder": encoder,
                                               "trained": fixtures}, indent=2))
    print(json.dumps(header))
    print(_markdown(encoder))
    print()
    print(_markdown(fixtures))


if __name__ == "__main__":
    main()
