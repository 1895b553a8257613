"""Verification: does the rewritten model compute what the original does?

Both run on the examples and on fresh random draws of the same shapes and dtypes (floats drawn
with the example's mean and spread; integers within the example's range; bool tensors, float
masks — values beyond ±1e4 — and position-like integers (consecutive along the last axis) kept
as given). Outputs are compared leaf by leaf, and each
attention site's output is compared between the original and the rewritten graph.

Exact rewrites must agree within the per-dtype `TOLERANCES` (elementwise in fp32/fp64,
normwise in fp16/bf16); NaN or Inf never passes unless the
original produced the same non-finite value at the same place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Tolerance:
    """|candidate - reference| <= atol + rtol * |reference|, elementwise — or, when
    `normwise`, max |candidate - reference| <= atol + rtol * max |reference|.

    Half-precision outputs are judged normwise: a rewrite that sums in another order moves an
    output by a few units in the last place of the largest values around it, which an
    elementwise test reads as a huge relative error wherever the true value is near zero.
    """

    atol: float
    rtol: float
    normwise: bool = False

    def holds(self, diff: torch.Tensor, scale: torch.Tensor) -> bool:
        if self.normwise:
            return float(diff.max()) <= self.atol + self.rtol * float(scale.max())
        return bool((diff <= self.atol + self.rtol * scale).all())


TOLERANCES = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-4),
    torch.float16: Tolerance(atol=2e-3, rtol=1e-2, normwise=True),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=3e-2, normwise=True),
}
#: Float example values beyond this magnitude mark a mask, kept as given in random draws.
MASK_MAGNITUDE = 1.0e4
#: Random draws besides the examples themselves.
DEFAULT_DRAWS = 2


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


@dataclass
class ErrorStats:
    """Errors of a candidate against a reference. `max_rel_err` is max|Δ| / max|ref|;
    `rel_err` is normwise, ‖Δ‖₂ / ‖ref‖₂ (what approximate budgets are held to)."""

    max_abs_err: float
    max_rel_err: float
    cosine: float
    within_tolerance: bool
    finite_ok: bool
    rel_err: float = 0.0

    @property
    def passed(self) -> bool:
        return self.within_tolerance and self.finite_ok

    def worst(self, other: Optional["ErrorStats"]) -> "ErrorStats":
        if other is None:
            return self
        return ErrorStats(max(self.max_abs_err, other.max_abs_err),
                          max(self.max_rel_err, other.max_rel_err),
                          min(self.cosine, other.cosine),
                          self.within_tolerance and other.within_tolerance,
                          self.finite_ok and other.finite_ok,
                          max(self.rel_err, other.rel_err))

    def to_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err,
                "rel_err": self.rel_err, "cosine": self.cosine, "passed": self.passed}


@torch.no_grad()
def compare_tensors(candidate: torch.Tensor, reference: torch.Tensor,
                    tolerance: Optional[Tolerance] = None) -> ErrorStats:
    if candidate.shape != reference.shape:
        return ErrorStats(math.inf, math.inf, -1.0, False, False, math.inf)
    tolerance = tolerance or tolerance_for(reference.dtype)
    cand = candidate.detach().to(torch.float64).cpu()
    ref = reference.detach().to(torch.float64).cpu()
    ref_finite, cand_finite = torch.isfinite(ref), torch.isfinite(cand)
    if bool(ref_finite.all()) and bool(cand_finite.all()):
        return _finite_stats(cand, ref, tolerance)
    same_nonfinite = (~ref_finite) & (~cand_finite) & ((cand == ref) | (cand.isnan() & ref.isnan()))
    both = ref_finite & cand_finite
    stats = _finite_stats(cand[both], ref[both], tolerance)
    stats.finite_ok = bool((both | same_nonfinite).all())
    return stats


def _finite_stats(cand: torch.Tensor, ref: torch.Tensor, tolerance: Tolerance) -> ErrorStats:
    if cand.numel() == 0:
        return ErrorStats(0.0, 0.0, 1.0, True, True)
    diff = (cand - ref).abs()
    scale = ref.abs()
    max_abs = float(diff.max())
    max_rel = max_abs / max(float(scale.max()), 1e-30)
    within = tolerance.holds(diff, scale)
    denominator = float(cand.norm() * ref.norm())
    cosine = float((cand * ref).sum()) / denominator if denominator > 0 else \
        (1.0 if float(cand.norm()) == float(ref.norm()) else 0.0)
    rel_err = float(diff.norm()) / max(float(ref.norm()), 1e-30)
    return ErrorStats(max_abs, max_rel, cosine, within, True, rel_err)


def compare_outputs(candidate: Any, reference: Any) -> ErrorStats:
    """Worst error over the tensor leaves of two outputs of the same structure."""
    cand_leaves = pytree.tree_leaves(candidate)
    ref_leaves = pytree.tree_leaves(reference)
    if len(cand_leaves) != len(ref_leaves):
        return ErrorStats(math.inf, math.inf, -1.0, False, False, math.inf)
    worst: Optional[ErrorStats] = None
    for cand, ref in zip(cand_leaves, ref_leaves):
        if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor):
            if ref.is_floating_point() or ref.is_complex():
                stats = compare_tensors(cand, ref)
            else:
                equal = bool(torch.equal(cand.cpu(), ref.cpu()))
                stats = ErrorStats(0.0 if equal else math.inf, 0.0 if equal else math.inf,
                                   1.0, equal, True, 0.0 if equal else math.inf)
        else:
            equal = type(cand) is type(ref) and (cand == ref if not isinstance(ref, float)
                                                  else math.isclose(cand, ref))
            stats = ErrorStats(0.0, 0.0, 1.0, bool(equal), True, 0.0 if equal else math.inf)
        worst = stats.worst(worst)
    return worst or ErrorStats(0.0, 0.0, 1.0, True, True)


def fresh_draw(args: tuple, kwargs: dict, generator: torch.Generator) -> tuple[tuple, dict]:
    """Random inputs of the examples' shapes and dtypes (see module docstring)."""

    def draw(leaf):
        if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
            return leaf
        if leaf.dtype == torch.bool:
            return leaf.clone()
        if leaf.is_floating_point():
            values = leaf.detach().float()
            if bool((values.abs() > MASK_MAGNITUDE).any()) or not bool(values.isfinite().all()):
                return leaf.clone()
            mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 1.0
            std = std if std > 0 else 1.0
            noise = torch.randn(leaf.shape, generator=generator, dtype=torch.float32)
            return (noise * std + mean).to(dtype=leaf.dtype, device=leaf.device)
        if leaf.dtype.is_complex:
            return leaf.clone()
        if leaf.dim() >= 1 and leaf.shape[-1] > 1 and bool((leaf.diff(dim=-1) == 1).all()):
            return leaf.clone()  # positions (arange-like): their order is their meaning
        low, high = int(leaf.min()), int(leaf.max())
        values = torch.randint(low, high + 1, leaf.shape, generator=generator)
        return values.to(dtype=leaf.dtype, device=leaf.device)

    return pytree.tree_map(draw, args), pytree.tree_map(draw, kwargs)


def input_draws(args: tuple, kwargs: dict, draws: int = DEFAULT_DRAWS, seed: int = 0
                ) -> list[tuple[tuple, dict]]:
    """The examples followed by `draws` fresh random draws."""
    generator = torch.Generator().manual_seed(seed)
    return [(args, kwargs)] + [fresh_draw(args, kwargs, generator) for _ in range(draws)]


def format_table(rows: list[tuple[str, ErrorStats]]) -> str:
    lines = [f"{'where':<48} {'max_abs_err':>12} {'max_rel_err':>12} {'cosine':>10}  ok"]
    for name, stats in rows:
        lines.append(f"{name[:48]:<48} {stats.max_abs_err:>12.3e} {stats.max_rel_err:>12.3e} "
                     f"{stats.cosine:>10.6f}  {'yes' if stats.passed else 'NO'}")
    return "\n".join(lines)

