"""Weight rewrites (GQA conversion, head pruning): bytes, latency, error, task accuracy.

Two tables:

1. A 4-layer, 256-wide, 8-head encoder (`nn.TransformerEncoder`, packed in-projection) at
   batch × n tokens: parameter bytes of the rewritten graph, median latency in this process
   against the same model under policy "exact" (measured in the same run, alternating), and
   the output's normwise relative error against the original. The weights are random, so the
   rewrites are run unguarded (`verify=False`): this table is about size and speed.
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
from pathlib import Path

import torch

import attnopt
from attnopt import Policy
from attnopt.policy import Rule
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
}


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
    return rows


def trained_table() -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import trained
    rows = []
    for task in trained.TASKS:
        model = trained.train(task)
        tokens, _ = trained.draw(task, 8, torch.Generator().manual_seed(5))
        before = trained.accuracy(model, task)
        for name, rules in (("gqa 2→1 (MQA)", [Rule("gqa", params={"kv_heads": 1})]),
                            ("prune 1 of 2 heads",
                             [Rule("prune_heads", params={"fraction": 0.5})])):
            policy = _policy(name, rules)
            unguarded = attnopt.optimize(model, policy, example_inputs=(tokens,),
                                         verify=False)
            guarded = attnopt.optimize(model, policy, example_inputs=(tokens,))
            (record,) = [r for r in guarded.report.sites if r.site is not None]
            with torch.no_grad():
                error = _relative(unguarded(tokens), model(tokens))
            rows.append({"task": task, "rewrite": name, "accuracy_before": round(before, 3),
                         "accuracy_after": round(trained.accuracy(unguarded, task), 3),
                         "output_rel_err": round(error, 3),
                         "guard": "rolled back" if record.rolled_back else "kept",
                         "guard_reason": record.rolled_back["reason"] if record.rolled_back
                         else ""})
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
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
    print(json.dumps(header))
    print(_markdown(encoder))
    print()
    print(_markdown(fixtures))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "encoder": encoder,
                                               "trained": fixtures}, indent=2))


if __name__ == "__main__":
    main()
