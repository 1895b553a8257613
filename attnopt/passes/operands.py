"""Operands of a score product: q, kᵀ → k, v, and einsum equations.

Peels what canonical attention absorbs — a transpose of k, scalar scales on q and k, GQA head
repetition of k and v (expand + reshape, or repeat_interleave) — and turns einsum subscripts
into permutations of the operands.
"""

from __future__ import annotations

import string
from typing import Optional

import torch
from torch.fx import Node

from attnopt.passes.fx_utils import (
    VIEW_TARGETS, aten, concrete, fake_value, is_call, normalize_dim, real_users, scalar_arg,
    shape_of,
)
from attnopt.passes.patterns import TensorRecipe
from attnopt.passes.scores import NoMatch


def peel_scalar_scale(node: Node) -> tuple[Node, float]:
    """`x * c` or `x / c` with a single user → (x, c)."""
    factor = 1.0
    while isinstance(node, Node) and len(real_users(node)) == 1:
        if is_call(node, aten.mul.Tensor, aten.mul.Scalar):
            c = scalar_arg(node.args[1])
            if c is None or c <= 0:
                break
            factor *= c
            node = node.args[0]
        elif is_call(node, aten.div.Tensor, aten.div.Scalar):
            c = scalar_arg(node.args[1])
            if c is None or c <= 0:
                break
            factor /= c
            node = node.args[0]
        else:
            break
    return node, factor


def key_from_transposed(k_t: Node) -> tuple[TensorRecipe, float]:
    """From kᵀ (…, D, Sk) find k (…, Sk, D) and any scalar scale applied to it."""
    k_t, factor = peel_scalar_scale(k_t)
    ndim = len(shape_of(k_t))
    if is_call(k_t, aten.transpose.int) and len(real_users(k_t)) == 1:
        dims = {normalize_dim(d, ndim) for d in k_t.args[1:3]}
        if dims == {ndim - 2, ndim - 1}:
            k, inner = peel_scalar_scale(k_t.args[0])
            return TensorRecipe(k), factor * inner
    if is_call(k_t, aten.permute.default) and len(real_users(k_t)) == 1:
        perm = [normalize_dim(d, ndim) for d in k_t.args[1]]
        swapped = perm[:-2] + [perm[-1], perm[-2]]
        if swapped == list(range(ndim)):
            return TensorRecipe(k_t.args[0]), factor
        return TensorRecipe(k_t.args[0], (("permute", tuple(swapped)),)), factor
    return TensorRecipe(k_t, (("transpose", -2, -1),)), factor


def peel_head_repeat(recipe: TensorRecipe) -> tuple[TensorRecipe, int]:
    """k/v repeated over heads for GQA (expand+reshape, or repeat_interleave) → (source, group).

    Only applies to a plain (B, H, S, D) node; returns (recipe, 1) when nothing is repeated.
    """
    node = recipe.node
    if recipe.steps or len(shape_of(node) or ()) != 4:
        return recipe, 1
    if is_call(node, aten.repeat_interleave.self_int):
        repeats = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(repeats, Node) and isinstance(fake_value(repeats), torch.SymInt):
            repeats = concrete(fake_value(repeats))  # group from shapes: q heads // kv heads
        if isinstance(repeats, int) and dim is not None and normalize_dim(dim, 4) == 1:
            return TensorRecipe(node.args[0]), repeats
        return recipe, 1
    if not is_call(node, *VIEW_TARGETS):
        return recipe, 1
    expanded = node.args[0]
    while is_call(expanded, aten.clone.default, aten.contiguous.default):
        expanded = expanded.args[0]
    if not is_call(expanded, aten.expand.default):
        return recipe, 1
    unsqueezed = expanded.args[0]
    while is_call(unsqueezed, aten.slice.Tensor) and _is_full_slice(unsqueezed):
        unsqueezed = unsqueezed.args[0]
    if not (is_call(unsqueezed, aten.unsqueeze.default) and
            normalize_dim(unsqueezed.args[1], 5) == 2):
        return recipe, 1
    source = unsqueezed.args[0]
    while is_call(source, aten.slice.Tensor) and _is_full_slice(source):
        source = source.args[0]
    expanded_shape = shape_of(expanded)
    if expanded_shape is None or len(expanded_shape) != 5:
        return recipe, 1
    group = concrete(expanded_shape[2])
    return TensorRecipe(source), group


def _is_full_slice(node: Node) -> bool:
    args = list(node.args) + [None] * (4 - len(node.args))
    start, end = args[2], args[3]
    step = node.args[4] if len(node.args) > 4 else 1
    return (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= 2**62)) \
        and step == 1


# --------------------------------------------------------------------------------------------
# einsum equations


def _expand_ellipsis(subscripts: str, ndim: int, fill: str) -> str:
    if "..." not in subscripts:
        return subscripts
    explicit = len(subscripts) - 3
    return subscripts.replace("...", fill[: ndim - explicit])


def parse_einsum(node: Node) -> tuple[list[str], str, list[Node]]:
    equation = node.args[0].replace(" ", "")
    operands = list(node.args[1])
    if "->" not in equation:
        raise NoMatch("einsum without an explicit output (`->`)")
    inputs, output = equation.split("->")
    inputs = inputs.split(",")
    if len(inputs) != 2:
        raise NoMatch("einsum with more than two operands")
    fill = "".join(c for c in string.ascii_uppercase if c not in equation)
    ndims = [len(shape_of(op)) for op in operands]
    inputs = [_expand_ellipsis(s, n, fill) for s, n in zip(inputs, ndims)]
    output = _expand_ellipsis(output, max(ndims), fill)
    return inputs, output, operands


def permutation(source: str, target: str) -> Optional[tuple[int, ...]]:
    perm = tuple(source.index(c) for c in target)
    return None if perm == tuple(range(len(source))) else perm


def permuted_recipe(node: Node, perm: Optional[tuple[int, ...]]) -> TensorRecipe:
    return TensorRecipe(node, (("permute", perm),) if perm else ())
