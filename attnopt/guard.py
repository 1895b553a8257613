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

until the region passes or nothing approximate is left.

With a task metric (`TaskMetric`: the user's measure of the model's quality, higher is better,
and the drop they accept — accuracy-aware tuning, as compression toolkits call it) the
metric replaces both budgets as the gate: the rewritten model is measured by the user's own
function, and while it falls short of the original's value by more than the allowed drop, the
half of the approximate sites with the largest measured errors lose a rewrite per round. Sites
must still produce finite values. The budgets measure fidelity to the original model; a
metric measures the task, which an approximation can keep (or even improve) while its
outputs move (docs/APPROXIMATION.md).

Each round rebuilds the region from the captured program with the rollbacks pinned, so what
is installed is exactly what was last verified. The original graph's side of the
verification is the same every round and is recorded once (`OriginalRecordings`, within a
memory budget); so are the sites' attention entropies while the weight rewrites stay the same.
If the rounds run out, every remaining approximation goes back to exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from attnopt.capture import CapturedProgram
from attnopt.errors import AttnoptError
from attnopt.policy import ErrorBudget, Policy
from attnopt.region import (
    OriginalRecordings, Region, build_region, call_graph, verify_region,
)
from attnopt.report import approximation_label
from attnopt.verify import ErrorStats

#: Rebuild-and-verify rounds at most before everything approximate is rolled back at once.
MAX_ROUNDS = 12


@dataclass(frozen=True)
class TaskMetric:
    """`fn(model) -> number`, higher is better (e.g. accuracy on a held-out batch), and the
    largest drop from the original model's value that a rewrite may cost."""

    fn: Callable[[Any], float]
    max_drop: float = 0.0

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"metric must be a function of the model returning a number, not "
                            f"{type(self.fn).__name__}")
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise ValueError(f"metric_drop must be a number >= 0, got {self.max_drop!r}")

    def measure(self, model) -> float:
        value = self.fn(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise TypeError(f"metric must return a finite number (higher is better); it "
                            f"returned {value!r}")
        return float(value)


class CandidateModel:
    """A region's rewritten graph, called as the model is: what a `TaskMetric` measures."""

    def __init__(self, region: Region):
        self.region = region

    def __call__(self, *args, **kwargs):
        if not self.region.signature.accepts(args, kwargs):
            raise AttnoptError(
                "the metric called the model with inputs its captured graph does not accept "
                "(other structure, dtypes or static sizes than the example inputs); measure it "
                "on inputs shaped like the examples, or optimize with dynamic=True")
        return call_graph(self.region, args, kwargs)


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
                   exact_sites: Optional[dict] = None, loss=None,
                   metric: Optional[TaskMetric] = None) -> Region:
    """A verified region whose approximate sites are all within `policy.budget` (with a
    `metric`: whose rewritten model keeps the metric within its allowed drop).

    The returned region's `rolled_back` maps each site sent back to exact to what was measured
    (variant, params, errors, entropy) and why; rewrites rolled back while others of their
    site stayed are recorded in the pinned reasons (reported as the site's notes).
    """
    if metric is not None and captured.path:
        raise AttnoptError(
            f"a task metric measures the whole model, but this model was captured in parts "
            f"({captured.path!r} among them: {captured.note or 'the whole-model export failed'}"
            "); optimize without a metric (the error budget guards each part)")
    baseline = metric.measure(captured.module) if metric is not None else None
    pinned = dict(exact_sites or {})
    rolled_back: dict[str, dict] = {}
    recordings = OriginalRecordings()  # the original side of every round is the same
    entropies: dict = {}  # and so are the sites' attention entropies, for the same weights
    region = build_region(captured, policy, verify_each, pinned, loss, entropies)
    verify_region(region, draws, recordings)
    for _ in range(MAX_ROUNDS):
        if not region.approximations:
            break
        if metric is None:
            if region.passed:
                break
            over = _over_budget(region, policy.budget)
        else:
            over = _metric_rollbacks(region, metric, baseline)
            if not over:
                break
        for name, why in over.items():
            _roll_back_one(region, name, why, pinned, rolled_back)
        region = build_region(captured, policy, verify_each, pinned, loss, entropies)
        verify_region(region, draws, recordings)
    else:
        if region.approximations and (
                _metric_rollbacks(region, metric, baseline) if metric is not None
                else not region.passed):
            for name in list(region.approximations):
                _roll_back_one(region, name, "still over budget after "
                               f"{MAX_ROUNDS} rounds of rollbacks", pinned, rolled_back,
                               whole_site=True)
            region = build_region(captured, policy, verify_each, pinned, loss, entropies)
            verify_region(region, draws, recordings)
    region.rolled_back = {**region.rolled_back, **rolled_back}
    return region


def _over_budget(region: Region, budget: ErrorBudget) -> dict[str, str]:
    """{site: why} to roll back under the error budget."""
    over = {}
    for name in region.approximations:
        why = site_over_budget(region.errors[name], budget)
        if why is not None:
            over[name] = why
    if not over:  # every site within budget, the region's output is not
        output = region.output_error
        for name in _largest_errors(region):
            over[name] = (f"output relative error {output.rel_err:.3g} over the end-to-end "
                          f"budget {budget.output_rel_err:g}; this site's error was among the "
                          "largest")
    return over


def _metric_rollbacks(region: Region, metric: TaskMetric, baseline: float) -> dict[str, str]:
    """{site: why} to roll back under a task metric (empty: the region keeps the metric);
    records the measurement on the region."""
    over = {name: "produced NaN or Inf where exact attention did not"
            for name in region.approximations if not region.errors[name].finite_ok}
    if over:
        return over
    value = metric.measure(CandidateModel(region))
    region.metric = {"original": baseline, "optimized": value, "max_drop": metric.max_drop,
                     "passed": value >= baseline - metric.max_drop}
    if region.metric["passed"]:
        return {}
    return {name: (f"task metric {value:.4g} against the original's {baseline:.4g}, more than "
                   f"the allowed drop {metric.max_drop:g}; this site's error was among the "
                   "largest") for name in _largest_errors(region)}


def _largest_errors(region: Region) -> list[str]:
    """The half (at least one) of the approximate sites with the largest relative errors."""
    ranked = sorted(region.approximations, key=lambda n: region.errors[n].rel_err,
                    reverse=True)
    return ranked[:max(1, len(ranked) // 2)]


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
