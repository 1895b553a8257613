"""Presets: the length-based `long`, `fast`, `memory`, `accurate`, and the compressing
`compact` and `edge`.

Each builds a `Policy` for a device from a latency calibration of the variants on that device
(`costmodel.calibrate`: measured once, cached, overridable), so the thresholds are measured
facts of the machine rather than guesses:

- `long`: exact below T1; sparse Longformer (local window + global blocks) from T1, where it
  starts beating exact; the window + FAVOR+ hybrid from T2, where the hybrid runs at least
  2× faster than exact, so its long-range estimate is affordable.
- `fast`: per length range, the variant the calibration predicts fastest.
- `memory`: from T1 on, the variants with the smallest working set: Longformer up to T2, then
  FAVOR+ with 64 features (an (m × D) state per head instead of the keys and values).
- `accurate`: `long` with wider windows, more features and a tight error budget.

Thresholds can be given explicitly (`long_policy(t1=…, t2=…)`) or through the environment,
`ATTNOPT_THRESHOLDS="T1,T2"`, which skips calibration. Every preset is guarded by its budget.

The compressing presets change weights (passes/prune.py, gqa.py, quantize.py):
- `compact`: exact attention; head pruning (a quarter of the heads, by output norm — so that
  8 heads leave 6, which pool in pairs), GQA (kv heads pooled in pairs, the better of
  contiguous and clustered grouping), and dynamic int8 projections keeping the most sensitive
  tenth in full precision.
- `edge`: the resource-constrained combination — linear attention (O(n), no softmax) and
  dynamic int8 projections.
What the budget refuses is rolled back site by site, as for the approximate rewrites.
"""

from __future__ import annotations

import os
from typing import Optional

from attnopt.errors import PolicyError
from attnopt.policy import ErrorBudget, Policy, Rule, SiteSelector

THRESHOLDS_ENV = "ATTNOPT_THRESHOLDS"
PRESET_NAMES = ("long", "fast", "memory", "accurate", "compact", "edge")
#: The hybrid takes over where it runs at least this much faster than exact.
HYBRID_MIN_SPEEDUP = 2.0


def thresholds(device: str = "cpu", dtype=None, head_dim: int = 64) -> tuple[int, int, str]:
    """(T1, T2, where they came from) for a device."""
    override = os.environ.get(THRESHOLDS_ENV)
    if override:
        try:
            t1, t2 = (int(part) for part in override.split(","))
        except ValueError:
            raise PolicyError(f"{THRESHOLDS_ENV}={override!r}: expected two integers 'T1,T2'")
        return t1, max(t1, t2), f"${THRESHOLDS_ENV}"
    from attnopt.costmodel import calibrate
    calibration = calibrate(device, dtype, head_dim=head_dim)
    t1, t2 = calibration.thresholds(HYBRID_MIN_SPEEDUP)
    return t1, t2, f"calibrated on {calibration.device} ({calibration.dtype})"


def _ranges(t1: int, t2: int, below: str, between: str, above: str, params: dict,
            source: str) -> list[Rule]:
    rules = []
    if t1 > 0:
        rules.append(Rule(below, SiteSelector(q_len=(0, t1 - 1)), params.get(below, {}),
                          note=f"q_len < T1={t1} ({source})"))
    if t2 > t1:
        rules.append(Rule(between, SiteSelector(q_len=(t1, t2 - 1)), params.get(between, {}),
                          note=f"T1={t1} <= q_len < T2={t2} ({source})"))
    rules.append(Rule(above, SiteSelector(q_len=(t2, None)), params.get(above, {}),
                      note=f"q_len >= T2={t2} ({source})"))
    return rules


def long_policy(t1: Optional[int] = None, t2: Optional[int] = None, *, device: str = "cpu",
                dtype=None, budget: Optional[ErrorBudget] = None) -> Policy:
    source = "given"
    if t1 is None or t2 is None:
        t1, t2, source = thresholds(device, dtype)
    return Policy("long", _ranges(t1, t2, "exact", "sparse", "hybrid",
                                  {"sparse": {"pattern": "longformer"}}, source),
                  default="exact", budget=budget or ErrorBudget(),
                  description="exact < T1 <= sparse Longformer < T2 <= window + FAVOR+ hybrid")


def accurate_policy(t1: Optional[int] = None, t2: Optional[int] = None, *,
                    device: str = "cpu", dtype=None) -> Policy:
    source = "given"
    if t1 is None or t2 is None:
        t1, t2, source = thresholds(device, dtype)
    params = {"sparse": {"pattern": "longformer", "local": 2, "global_blocks": 2},
              "hybrid": {"window": 256, "features": 256}}
    return Policy("accurate", _ranges(t1, t2, "exact", "sparse", "hybrid", params, source),
                  default="exact",
                  budget=ErrorBudget(site_rel_err=0.1, site_min_cosine=0.99,
                                     output_rel_err=0.02),
                  description="as long, wider windows and more features, tight budget")


def memory_policy(t1: Optional[int] = None, t2: Optional[int] = None, *, device: str = "cpu",
                  dtype=None) -> Policy:
    source = "given"
    if t1 is None or t2 is None:
        t1, t2, source = thresholds(device, dtype)
    params = {"sparse": {"pattern": "longformer"}, "performer": {"features": 64}}
    return Policy("memory", _ranges(t1, t2, "exact", "sparse", "performer", params, source),
                  default="exact",
                  description="smallest working set from T1: Longformer, then 64-feature FAVOR+")


def fast_policy(*, device: str = "cpu", dtype=None, calibration=None) -> Policy:
    """The calibration's fastest variant per length range (exact where nothing beats it)."""
    from attnopt.costmodel import calibrate
    calibration = calibration or calibrate(device, dtype)
    rules, start, current = [], 0, None
    length = 16
    while length <= 1 << 21:
        best = calibration.fastest(length)
        if best != current:
            if current is not None:
                rules.append((current, start, length - 1))
            current, start = best, length
        length = int(length * 1.125) // 16 * 16 + 16
    rules.append((current, start, None))
    where = f"fastest measured on {calibration.device} ({calibration.dtype})"
    return Policy("fast", [Rule(variant, SiteSelector(q_len=(low, high)),
                                note=f"{where} for q_len {low}..{high or '∞'}")
                           for variant, low, high in rules],
                  default="exact", description="the fastest calibrated variant per length")


def compact_policy(*, device: str = "cpu", dtype=None) -> Policy:
    return Policy("compact", default="exact", weights=[
        Rule("prune_heads", params={"fraction": 0.25}),
        Rule("gqa", params={"group_size": 2, "grouping": "best"}),
        Rule("int8", params={"mode": "dynamic", "keep_fraction": 0.1})],
        description="exact attention; 1/4 of the heads pruned, kv heads pooled in pairs, "
                    "int8 projections (most sensitive tenth kept)")


def edge_policy(*, device: str = "cpu", dtype=None) -> Policy:
    return Policy("edge", default="linear", weights=[Rule("int8", params={"mode": "dynamic"})],
                  description="linear attention and int8 projections")


BUILDERS = {"long": long_policy, "fast": fast_policy, "memory": memory_policy,
            "accurate": accurate_policy, "compact": compact_policy, "edge": edge_policy}


def build(name: str, device: str = "cpu", dtype=None) -> Policy:
    return BUILDERS[name](device=device, dtype=dtype)
