"""The guard: an approximate rewrite stays only where its measured error is within budget.

`guarded_region` builds a region, verifies it (each site's output in isolation and the region's
output, on the examples and fresh draws), and rolls back to exact every approximate site over
the policy's per-site budget (max relative error, min cosine). If every site is within budget
but the output is not, the sites with the largest errors go back to exact, half of the
remaining approximations per round, until the output is within budget or nothing approximate
is left. Each round rebuilds the region from the captured program with the rollbacks pinned,
so what is installed is exactly what was last verified.
"""

from __future__ import annotations

from typing import Optional

from attnopt.capture import CapturedProgram
from attnopt.policy import ErrorBudget, Policy
from attnopt.region import Region, build_region, verify_region
from attnopt.report import approximation_label
from attnopt.verify import ErrorStats

#: Rebuild-and-verify rounds at most (each halves the approximations left, so 2^ROUNDS sites).
MAX_ROUNDS = 8


def site_over_budget(stats: ErrorStats, budget: ErrorBudget) -> Optional[str]:
    """Why a site's measured error breaks the budget (None: within it)."""
    if not stats.finite_ok:
        return "produced NaN or Inf where exact attention did not"
    if stats.rel_err > budget.site_rel_err:
        return f"relative error {stats.rel_err:.3g} over the site budget {budget.site_rel_err:g}"
    if stats.cosine < budget.site_min_cosine:
        return f"cosine {stats.cosine:.4f} under the site budget {budget.site_min_cosine:g}"
    return None


def guarded_region(captured: CapturedProgram, policy: Policy, verify_each: bool, draws: int,
                   exact_sites: Optional[dict[str, str]] = None) -> Region:
    """A verified region whose approximate sites are all within `policy.budget`.

    The returned region's `rolled_back` maps each site sent back to exact to what was measured
    (variant, params, errors, entropy) and why.
    """
    pinned = dict(exact_sites or {})
    rolled_back: dict[str, dict] = {}
    region = build_region(captured, policy, verify_each, pinned)
    verify_region(region, draws)
    for _ in range(MAX_ROUNDS):
        if not region.approximations or region.passed:
            break
        over = {}
        for name, info in region.approximations.items():
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
            stats = region.errors[name]
            rolled_back[name] = {**region.approximations[name], **stats.to_dict(),
                                 "reason": why}
            pinned[name] = "rolled back to exact: " \
                           f"{approximation_label(region.approximations[name])} {why}"
        region = build_region(captured, policy, verify_each, pinned)
        verify_region(region, draws)
    region.rolled_back = {**region.rolled_back, **rolled_back}
    return region
