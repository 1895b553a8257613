"""The guard: an approximate rewrite stays only where its measured error is within budget.

`guarded_region` builds a region, verifies it (each site's output in isolation and the region's
output, on the examples and fresh draws), and rolls back what breaks the policy's budget:

- a site over the per-site budget (max relative error, min cosine) loses one rewrite per round:
  a site carries up to four (its attention variant, GQA, head pruning, int8 projections), and
  the one with the largest estimated error goes first (`component_estimates`), so a lossy GQA
  conversion does not take a harmless int8 quantization down with it; a site with one rewrite
  left goes back to exact;
- if every site is within budget but the output is not, the sites with the largest errors
  lose a rewrite the same way, half of the remaining sites per round,

until the region passes or nothing approximate is left. Each round rebuilds the region from
the captured program with the rollbacks pinned, so what is installed is exactly what was last
verified; the original graph's side of the verification is the same every round and is
recorded once (`OriginalRecordings`, within a memory budget). If the rounds run out, every remaining approximation goes back to exact.
"""

from __future__ import annotations

import math
from typing import Optional

from attnopt.capture import CapturedProgram
from attnopt.policy import ErrorBudget, Policy
from attnopt.region import OriginalRecordings, Region, build_region, verify_region
from attnopt.report import approximation_label
from attnopt.verify import ErrorStats

#: Rebuild-and-verify rounds at most before everything approximate is rolled back at once.
MAX_ROUNDS = 12


def site_over_budget(stats: ErrorStats, budget: ErrorBudget) -> Optional[str]:
    """Why a site's measured error breaks the budget (None: within it)."""
    if not stats.finite_ok:
        return "produced NaN or Inf where exact attention did not"
    if stats.rel_err > budget.site_rel_err:
        return f"relative error {stats.rel_err:.3g} over the site budget {budget.site_rel_err:g}"
    if stats.cosine < budget.site_min_cosine:
        return f"cosine {stats.cosine:.4f} under the site budget {budget.site_min_cosine:g}"
    return None


def component_estimates(info: dict) -> dict[str, float]:
    """Each rewrite of a site with an estimate of the error it adds, measured on the examples
    when it was chosen: GQA's pooled attention error, the output share of the pruned heads,
    the largest int8 projection error. An attention variant has no estimate of its own and
    counts as the largest (its error is what the site measurement mostly is)."""
    estimates = {}
    if info.get("variant", "exact") != "exact":
        estimates["attention"] = math.inf
    for kind, weights in info.get("weights", {}).items():
        if kind == "gqa":
            estimates[kind] = weights["errors"][weights["grouping"]]
        elif kind == "prune_heads":
            importance = weights["head_importance"]
            removed = [x for h, x in enumerate(importance) if h not in weights["kept"]]
            total = math.sqrt(sum(x * x for x in importance)) or 1.0
            estimates[kind] = math.sqrt(sum(x * x for x in removed)) / total
        elif kind == "int8":
            estimates[kind] = max(weights["sensitivity"].values(), default=0.0) \
                if weights["quantized"] else 0.0
    return estimates


def guarded_region(captured: CapturedProgram, policy: Policy, verify_each: bool, draws: int,
                   exact_sites: Optional[dict] = None, loss=None) -> Region:
    """A verified region whose approximate sites are all within `policy.budget`.

    The returned region's `rolled_back` maps each site sent back to exact to what was measured
    (variant, params, errors, entropy) and why; rewrites rolled back while others of their
    site stayed are recorded in the pinned reasons (reported as the site's notes).
    """
    pinned = dict(exact_sites or {})
    rolled_back: dict[str, dict] = {}
    recordings = OriginalRecordings()  # the original side of every round is the same
    region = build_region(captured, policy, verify_each, pinned, loss)
    verify_region(region, draws, recordings)
    for _ in range(MAX_ROUNDS):
        if not region.approximations or region.passed:
            break
        over = {}
        for name in region.approximations:
            why = site_over_budget(region.errors[name], policy.budget)
            if why is not None:
                over[name] = why
        if not over:  # every site within budget, the region's output is not
            output = region.output_error
            ranked = sorted(region.approximations,
                            key=lambda n: region.errors[n].rel_err, reverse=True)
            for name in ranked[:max(1, len(ranked) // 2)]:
                over[name] = (f"output relative error {output.rel_err:.3g} over the "
                              f"end-to-end budget {policy.budget.output_rel_err:g}; this "
                              "site's error was among the largest")
        for name, why in over.items():
            _roll_back_one(region, name, why, pinned, rolled_back)
        region = build_region(captured, policy, verify_each, pinned, loss)
        verify_region(region, draws, recordings)
    else:
        if region.approximations and not region.passed:
            for name in list(region.approximations):
                _roll_back_one(region, name, "still over budget after "
                               f"{MAX_ROUNDS} rounds of rollbacks", pinned, rolled_back,
                               whole_site=True)
            region = build_region(captured, policy, verify_each, pinned, loss)
            verify_region(region, draws, recordings)
    region.rolled_back = {**region.rolled_back, **rolled_back}
    return region


def _roll_back_one(region: Region, name: str, why: str, pinned: dict, rolled_back: dict,
                   whole_site: bool = False) -> None:
    """Pin the riskiest rewrite of site `name` to exact (the whole site when it has one)."""
    info = region.approximations[name]
    stats = region.errors[name]
    estimates = component_estimates(info)
    if whole_site or len(estimates) <= 1:
        rolled_back[name] = {**info, **stats.to_dict(), "reason": why}
        pinned[name] = f"rolled back to exact: {approximation_label(info)} {why}"
        return
    component = max(estimates, key=estimates.get)
    pinned[(name, component)] = (f"{component} rolled back: the site's {why} (it had the "
                                 f"largest estimated error of {approximation_label(info)})")
