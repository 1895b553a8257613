"""Verification primitives: tolerances, non-finite values, random draws."""

from __future__ import annotations

import math

import torch

from attnopt.verify import Tolerance, compare_tensors, fresh_draw, tolerance_for


def test_fp32_tolerance_is_elementwise():
    reference = torch.tensor([100.0, 1e-3])
    assert compare_tensors(reference + torch.tensor([1e-3, 0.0]), reference).passed
    assert not compare_tensors(reference + torch.tensor([0.0, 1e-3]), reference).passed


def test_half_precision_tolerance_is_normwise():
    reference = torch.tensor([5.0, 1e-3], dtype=torch.bfloat16)
    shifted = reference + torch.tensor([0.0, 0.05], dtype=torch.bfloat16)  # ~ulp of 5.0
    assert tolerance_for(torch.bfloat16).normwise
    assert compare_tensors(shifted, reference).passed
    assert not compare_tensors(reference * 1.2, reference).passed
    assert not Tolerance(atol=0.0, rtol=1e-2).holds(torch.tensor([0.05]), torch.tensor([1e-3]))


def test_non_finite_values_pass_only_where_the_reference_has_them():
    reference = torch.tensor([1.0, float("-inf"), float("nan")])
    assert compare_tensors(reference.clone(), reference).passed
    assert not compare_tensors(torch.tensor([1.0, 0.0, float("nan")]), reference).passed
    assert not compare_tensors(torch.tensor([float("nan"), float("-inf"), float("nan")]),
                               reference).passed


def test_fresh_draws_keep_masks_positions_and_integer_ranges():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, 4) * 3 + 1
    mask = torch.zeros(2, 1, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1),
                                               torch.finfo(torch.float32).min)
    positions = torch.arange(8).expand(2, 8)
    tokens = torch.randint(5, 50, (2, 8))
    (h, m, p, t), _ = fresh_draw((hidden, mask, positions, tokens), {}, generator)
    assert h.shape == hidden.shape and not torch.equal(h, hidden)
    assert math.isclose(float(h.mean()), float(hidden.mean()), abs_tol=1.0)
    assert torch.equal(m, mask) and torch.equal(p, positions)
    assert int(t.min()) >= 5 and int(t.max()) <= 49 and not torch.equal(t, tokens)
