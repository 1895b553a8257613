"""The score chain: from a softmax's input back to the score product q·kᵀ.

Between the product and the softmax, real models scale, cast, add biases and masks, fill with
masked_fill or where, subtract the row max, floor masked scores at finfo.min (XGLM), soft-cap
with tanh, and sometimes reshape (B·H, S, S) ↔ (B, H, S, S) around a mask add. `trace_scores`
walks back through those and returns the product node with the steps in order (product first);
`NoMatch` says why a chain is not one canonical attention can express.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

from torch.fx import Node

from attnopt.passes.fx_utils import (
    CAST_TARGETS, IDENTITY_TARGETS, VIEW_TARGETS, aten, constant_fill_value, is_call,
    real_users, same_dim, scalar_arg, shape_of,
)
from attnopt.passes.masks import MASKED_THRESHOLD
from attnopt.passes.patterns import MaskTerm

PRODUCT_TARGETS = frozenset({aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
                             aten.einsum.default})
#: scores floored from below (`_masked_floor_input`)
FLOOR_TARGETS = frozenset({aten.maximum.default, aten.max.other, aten.clamp_min.default,
                           aten.clamp.default})
MAX_CHAIN = 32


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not (supported) attention."""


# --------------------------------------------------------------------------------------------
# score chain: product -> ... -> softmax input


@dataclass(frozen=True)
class Scale:
    factor: float


@dataclass(frozen=True)
class Term:
    term: MaskTerm


@dataclass(frozen=True)
class Softcap:
    cap: float


@dataclass(frozen=True)
class View:
    """A reshape of the scores that keeps the (query, key) axes: (B·H, Sq, Sk) ↔ (B, H, …)."""

    node: Node


ChainStep = Union[Scale, Term, Softcap, View, str]  # str: a step that does not change values ("cast")


def trace_scores(node: Node, depth: int = 0) -> tuple[Node, list[ChainStep]]:
    """Walk from the softmax input back to the score product; steps listed product-first."""
    if depth > MAX_CHAIN:
        raise NoMatch("no score product (matmul/bmm/einsum of q and kᵀ) found before softmax")
    if not isinstance(node, Node):
        raise NoMatch("softmax input is not a tensor computed in the graph")
    if node.op == "call_function" and node.target in PRODUCT_TARGETS:
        return node, []
    if node.op != "call_function":
        raise NoMatch(f"softmax input comes from {node.op} `{node.name}`, not a score product")
    target, args = node.target, node.args

    def chain(inner: Node, step: Optional[ChainStep] = None):
        product, steps = trace_scores(inner, depth + 1)
        return product, steps + ([step] if step is not None else [])

    if target in CAST_TARGETS or target in IDENTITY_TARGETS:
        return chain(args[0], "cast")
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        capped = _softcap_input(node)
        if capped is not None:  # cap * tanh(x / cap)
            return chain(capped[0], Softcap(capped[1]))
        for this, other in ((args[0], args[1]), (args[1], args[0])):
            factor = scalar_arg(other)
            if factor is not None and isinstance(this, Node):
                if factor <= 0:
                    raise NoMatch(f"scores multiplied by non-positive {factor}")
                return chain(this, Scale(factor))
        raise NoMatch(f"scores multiplied by a tensor (`{node.format_node()}`)")
    if target in (aten.div.Tensor, aten.div.Scalar):
        divisor = scalar_arg(args[1])
        if divisor is None or divisor <= 0:
            raise NoMatch(f"scores divided by a tensor or non-positive value (`{node.name}`)")
        return chain(args[0], Scale(1.0 / divisor))
    if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        return _trace_add(node, depth)
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        value = constant_fill_value(args[2])
        if value is None:
            raise NoMatch(f"masked_fill with a non-constant value (`{node.name}`)")
        return chain(args[0], Term(MaskTerm("fill", args[1], value=value)))
    if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        condition, when_true, when_false = args[0], args[1], args[2]
        for scores, other, inverted in ((when_true, when_false, True),
                                        (when_false, when_true, False)):
            value = constant_fill_value(other)
            if value is not None and isinstance(scores, Node):
                term = MaskTerm("fill", condition, value=value, inverted=inverted)
                return chain(scores, Term(term))
        raise NoMatch(f"where() between two computed tensors (`{node.name}`)")
    if target in FLOOR_TARGETS:
        floored = _masked_floor_input(node)
        if floored is not None:
            return chain(floored, "cast")
        raise NoMatch(f"scores clamped from below at a value a score can take (`{node.name}`)")
    if target is aten.tanh.default:
        raise NoMatch("tanh of scores that is not a soft-cap (cap * tanh(x / cap))")
    if target in VIEW_TARGETS:
        before, after = shape_of(args[0]), shape_of(node)
        if before is None or after is None or len(before) < 2 or len(after) < 2 or \
                not (same_dim(before[-1], after[-1]) and same_dim(before[-2], after[-2])):
            raise NoMatch("scores are reshaped across the (query, key) axes before softmax")
        return chain(args[0], View(node))
    raise NoMatch(f"`{target}` between the score product and softmax is not supported")


def _trace_add(node: Node, depth: int) -> tuple[Node, list[ChainStep]]:
    target, (a, b) = node.target, node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    sign = -1.0 if target in (aten.sub.Tensor, aten.sub.Scalar) else 1.0
    if scalar_arg(b) is not None:  # a constant shift: softmax ignores it
        product, steps = trace_scores(a, depth + 1)
        return product, steps + ["cast"]
    if sign < 0 and _is_row_max_of(b, a):  # x - x.amax(-1, keepdim=True): softmax ignores it
        product, steps = trace_scores(a, depth + 1)
        return product, steps + ["cast"]
    failures = []
    for scores, bias, multiplier in ((a, b, sign * alpha), (b, a, sign)):
        if scores is b and (sign < 0 or alpha != 1):
            continue  # bias - scores flips the sign of the scores: not attention
        try:
            product, steps = trace_scores(scores, depth + 1)
        except NoMatch as failure:
            failures.append(str(failure))
            continue
        return product, steps + [Term(MaskTerm("bias", bias, multiplier=float(multiplier)))]
    raise NoMatch(failures[0] if failures else f"unsupported add `{node.name}`")


def _masked_floor_input(node: Node) -> Optional[Node]:
    """The scores of `max(scores, c)` / `clamp_min(scores, c)` with a constant `c` at or below
    MASKED_THRESHOLD, else None. XGLM (and older fairseq-style code) floors masked scores at
    finfo.min so that a mask added twice cannot reach -inf: the floor changes only scores that
    are masked already, whose softmax weight is 0 either way — except in a row whose every
    score is -inf, which the floor turns into an average of its keys and canonical attention
    into zeros (finite fills, as XGLM's, never make such a row)."""
    args = node.args
    if node.target in (aten.clamp_min.default, aten.clamp.default):
        floor = args[1] if len(args) > 1 else node.kwargs.get("min")
        if node.target is aten.clamp.default and \
                (args[2] if len(args) > 2 else node.kwargs.get("max")) is not None:
            return None
        scores = args[0]
    else:
        scores, floor = args[0], args[1]
        if constant_fill_value(scores) is not None:
            scores, floor = floor, scores
    value = constant_fill_value(floor)
    if value is None or value > MASKED_THRESHOLD or not isinstance(scores, Node):
        return None
    return scores


def _softcap_input(node: Node) -> Optional[tuple[Node, float]]:
    """`cap * tanh(x / cap)` (or `x * (1 / cap)` inside) → (x, cap); None otherwise."""
    a, b = node.args[:2]
    tanh, cap = (a, scalar_arg(b)) if scalar_arg(b) is not None else (b, scalar_arg(a))
    if cap is None or cap <= 0 or not is_call(tanh, aten.tanh.default) or \
            len(real_users(tanh)) != 1:
        return None
    inner = tanh.args[0]
    if is_call(inner, aten.div.Tensor, aten.div.Scalar) and \
            scalar_arg(inner.args[1]) is not None and \
            math.isclose(scalar_arg(inner.args[1]), cap, rel_tol=1e-6):
        return inner.args[0], cap
    if is_call(inner, aten.mul.Tensor, aten.mul.Scalar) and \
            scalar_arg(inner.args[1]) is not None and \
            math.isclose(scalar_arg(inner.args[1]) * cap, 1.0, rel_tol=1e-6):
        return inner.args[0], cap
    return None


def _is_row_max_of(candidate, scores) -> bool:
    if is_call(candidate, aten.amax.default) and candidate.args[0] is scores:
        return True
    if is_call(candidate, aten.detach.default):
        return _is_row_max_of(candidate.args[0], scores)
    if is_call(candidate, operator.getitem):
        source = candidate.args[0]
        return is_call(source, aten.max.dim) and source.args[0] is scores
    return False
