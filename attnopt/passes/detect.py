"""Detection: find every scaled-dot-product attention in an exported aten graph.

Two anchors start a match:
  * a fused `aten.scaled_dot_product_attention` call;
  * a softmax over the last axis, from which the detector walks back to the score product
    (matmul, bmm, baddbmm or einsum of q and kᵀ, through scales, casts, additive biases,
    masked_fill and where) and forward to the value product (through casts, dropout, clones).

Along the way it peels what canonical attention absorbs: a transpose of k, scalar scales on
q and k, and GQA head repetition (expand + reshape, or repeat_interleave) of k and v.
A softmax that is not attention — probabilities used elsewhere, a softmax over the query axis,
an unsupported op between product and softmax — yields a `Rejection` naming the reason.

The result is a list of `SiteMatch` (see patterns.py); the graph is not modified here.
"""

from __future__ import annotations

import math
import operator
import string
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.fx import GraphModule, Node

from attnopt.passes.fx_utils import (
    CAST_TARGETS, IDENTITY_TARGETS, VIEW_TARGETS, aten, concrete, constant_fill_value,
    dtype_of, fake_value, is_call, is_symbolic, module_path, normalize_dim, only_user, real_users,
    same_dim, scalar_arg, shape_of,
)
from attnopt.passes.patterns import MaskTerm, SiteMatch, TensorRecipe
from attnopt.site import AttentionSite, Projection, Rejection

SOFTMAX_TARGETS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
SDPA_TARGET = aten.scaled_dot_product_attention.default
PRODUCT_TARGETS = frozenset({aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
                             aten.einsum.default})
DROPOUT_TARGETS = frozenset({aten.dropout.default, aten.native_dropout.default,
                             aten.feature_dropout.default})
TRANSPOSE_TARGETS = frozenset({aten.transpose.int, aten.permute.default, aten.t.default})
MAX_CHAIN = 32


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not (supported) attention."""


# --------------------------------------------------------------------------------------------
# score chain: product -> ... -> softmax input


@dataclass(frozen=True)
class _Scale:
    factor: float


@dataclass(frozen=True)
class _Term:
    term: MaskTerm


@dataclass(frozen=True)
class _Softcap:
    cap: float


@dataclass(frozen=True)
class _View:
    """A reshape of the scores that keeps the (query, key) axes: (B·H, Sq, Sk) ↔ (B, H, …)."""

    node: Node


_ChainStep = Union[_Scale, _Term, _Softcap, _View, str]  # str: a step that does not change values ("cast")


def _trace_scores(node: Node, depth: int = 0) -> tuple[Node, list[_ChainStep]]:
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

    def chain(inner: Node, step: Optional[_ChainStep] = None):
        product, steps = _trace_scores(inner, depth + 1)
        return product, steps + ([step] if step is not None else [])

    if target in CAST_TARGETS or target in IDENTITY_TARGETS:
        return chain(args[0], "cast")
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        capped = _softcap_input(node)
        if capped is not None:  # cap * tanh(x / cap)
            return chain(capped[0], _Softcap(capped[1]))
        for this, other in ((args[0], args[1]), (args[1], args[0])):
            factor = scalar_arg(other)
            if factor is not None and isinstance(this, Node):
                if factor <= 0:
                    raise NoMatch(f"scores multiplied by non-positive {factor}")
                return chain(this, _Scale(factor))
        raise NoMatch(f"scores multiplied by a tensor (`{node.format_node()}`)")
    if target in (aten.div.Tensor, aten.div.Scalar):
        divisor = scalar_arg(args[1])
        if divisor is None or divisor <= 0:
            raise NoMatch(f"scores divided by a tensor or non-positive value (`{node.name}`)")
        return chain(args[0], _Scale(1.0 / divisor))
    if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        return _trace_add(node, depth)
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        value = constant_fill_value(args[2])
        if value is None:
            raise NoMatch(f"masked_fill with a non-constant value (`{node.name}`)")
        return chain(args[0], _Term(MaskTerm("fill", args[1], value=value)))
    if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        condition, when_true, when_false = args[0], args[1], args[2]
        for scores, other, inverted in ((when_true, when_false, True),
                                        (when_false, when_true, False)):
            value = constant_fill_value(other)
            if value is not None and isinstance(scores, Node):
                term = MaskTerm("fill", condition, value=value, inverted=inverted)
                return chain(scores, _Term(term))
        raise NoMatch(f"where() between two computed tensors (`{node.name}`)")
    if target is aten.tanh.default:
        raise NoMatch("tanh of scores that is not a soft-cap (cap * tanh(x / cap))")
    if target in VIEW_TARGETS:
        before, after = shape_of(args[0]), shape_of(node)
        if before is None or after is None or len(before) < 2 or len(after) < 2 or \
                not (same_dim(before[-1], after[-1]) and same_dim(before[-2], after[-2])):
            raise NoMatch("scores are reshaped across the (query, key) axes before softmax")
        return chain(args[0], _View(node))
    raise NoMatch(f"`{target}` between the score product and softmax is not supported")


def _trace_add(node: Node, depth: int) -> tuple[Node, list[_ChainStep]]:
    target, (a, b) = node.target, node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    sign = -1.0 if target in (aten.sub.Tensor, aten.sub.Scalar) else 1.0
    if scalar_arg(b) is not None:  # a constant shift: softmax ignores it
        product, steps = _trace_scores(a, depth + 1)
        return product, steps + ["cast"]
    if sign < 0 and _is_row_max_of(b, a):  # x - x.amax(-1, keepdim=True): softmax ignores it
        product, steps = _trace_scores(a, depth + 1)
        return product, steps + ["cast"]
    failures = []
    for scores, bias, multiplier in ((a, b, sign * alpha), (b, a, sign)):
        if scores is b and (sign < 0 or alpha != 1):
            continue  # bias - scores flips the sign of the scores: not attention
        try:
            product, steps = _trace_scores(scores, depth + 1)
        except NoMatch as failure:
            failures.append(str(failure))
            continue
        return product, steps + [_Term(MaskTerm("bias", bias, multiplier=float(multiplier)))]
    raise NoMatch(failures[0] if failures else f"unsupported add `{node.name}`")


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


# --------------------------------------------------------------------------------------------
# operands: q, kᵀ → k, v; scalar scales and GQA repetition peeled


def _peel_scalar_scale(node: Node) -> tuple[Node, float]:
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


def _key_from_transposed(k_t: Node) -> tuple[TensorRecipe, float]:
    """From kᵀ (…, D, Sk) find k (…, Sk, D) and any scalar scale applied to it."""
    k_t, factor = _peel_scalar_scale(k_t)
    ndim = len(shape_of(k_t))
    if is_call(k_t, aten.transpose.int) and len(real_users(k_t)) == 1:
        dims = {normalize_dim(d, ndim) for d in k_t.args[1:3]}
        if dims == {ndim - 2, ndim - 1}:
            k, inner = _peel_scalar_scale(k_t.args[0])
            return TensorRecipe(k), factor * inner
    if is_call(k_t, aten.permute.default) and len(real_users(k_t)) == 1:
        perm = [normalize_dim(d, ndim) for d in k_t.args[1]]
        swapped = perm[:-2] + [perm[-1], perm[-2]]
        if swapped == list(range(ndim)):
            return TensorRecipe(k_t.args[0]), factor
        return TensorRecipe(k_t.args[0], (("permute", tuple(swapped)),)), factor
    return TensorRecipe(k_t, (("transpose", -2, -1),)), factor


def _peel_head_repeat(recipe: TensorRecipe) -> tuple[TensorRecipe, int]:
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


def _parse_einsum(node: Node) -> tuple[list[str], str, list[Node]]:
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


def _permutation(source: str, target: str) -> Optional[tuple[int, ...]]:
    perm = tuple(source.index(c) for c in target)
    return None if perm == tuple(range(len(source))) else perm


def _recipe(node: Node, perm: Optional[tuple[int, ...]]) -> TensorRecipe:
    return TensorRecipe(node, (("permute", perm),) if perm else ())


# --------------------------------------------------------------------------------------------
# the two anchors


def _match_softmax(softmax: Node) -> SiteMatch:
    scores_in = softmax.args[0]
    ndim = len(shape_of(softmax))
    dim = normalize_dim(softmax.args[1], ndim)
    if dim != ndim - 1:
        raise NoMatch(f"softmax over axis {dim}, not the key axis (last)")
    if ndim < 3:
        raise NoMatch("softmax over a tensor of fewer than 3 dims")

    product, steps = _trace_scores(scores_in)
    scale, terms = 1.0, []
    layout_notes: list[str] = []

    # score product → q, k recipes with batch dims first, then (S, D)
    if product.target is aten.einsum.default:
        (q_letters, k_letters), out_letters, (q_node, k_node) = _parse_einsum(product)
        contracted = [c for c in q_letters if c in k_letters and c not in out_letters]
        if len(contracted) != 1:
            raise NoMatch("score einsum does not contract exactly one (head-dim) axis")
        if out_letters[-1] not in k_letters or out_letters[-1] in q_letters:
            raise NoMatch("softmax over axis that is not the key axis of the score einsum")
        query_letter, key_letter = out_letters[-2], out_letters[-1]
        if query_letter not in q_letters or query_letter in k_letters:
            raise NoMatch("score einsum output does not end with (query, key) axes")
        batch = out_letters[:-2]
        d = contracted[0]
        if sorted(batch + query_letter + d) != sorted(q_letters) or \
                sorted(batch + key_letter + d) != sorted(k_letters):
            raise NoMatch("score einsum operands do not share their batch axes")
        q_node, q_factor = _peel_scalar_scale(q_node)
        k_node, k_factor = _peel_scalar_scale(k_node)
        scale *= q_factor * k_factor
        q = _recipe(q_node, _permutation(q_letters, batch + query_letter + d))
        k = _recipe(k_node, _permutation(k_letters, batch + key_letter + d))
        if q_node.target in TRANSPOSE_TARGETS:
            layout_notes.append("BSHD")
    else:
        if product.target is aten.baddbmm.default:
            bias, q_node, k_t = product.args[:3]
            beta = product.kwargs.get("beta", 1)
            scale *= product.kwargs.get("alpha", 1)
            if beta != 0:  # beta=0 ignores the input entirely (diffusers passes torch.empty)
                terms.append(MaskTerm("bias", bias, multiplier=float(beta)))
        else:
            q_node, k_t = product.args[:2]
        if len(shape_of(q_node)) < 3 or len(shape_of(k_t)) < 3:
            raise NoMatch("score product of tensors with fewer than 3 dims")
        q_node, q_factor = _peel_scalar_scale(q_node)
        k, k_factor = _key_from_transposed(k_t)
        q = TensorRecipe(q_node)
        scale *= q_factor * k_factor
        if q_node.target in TRANSPOSE_TARGETS:
            layout_notes.append("BSHD")

    softcap, views, terms_per_space = None, [], [0]
    for step in steps:
        if isinstance(step, _View):
            views.append(step.node)
            terms_per_space.append(0)
            continue
        if isinstance(step, _Term):
            terms_per_space[-1] += 1
        if isinstance(step, _Scale):
            if softcap is not None:
                raise NoMatch("scores scaled after soft-capping")
            scale *= step.factor
            terms = [t.scaled(step.factor) for t in terms]
        elif isinstance(step, _Term):
            terms.append(step.term)
        elif isinstance(step, _Softcap):
            if terms or softcap is not None:
                raise NoMatch("mask or bias applied before soft-capping")
            softcap = step.cap

    # forward: softmax → (cast, dropout, clone) → value product
    probs, dropout_p, internal = softmax, 0.0, [softmax]
    while True:
        users = real_users(probs)
        if len(users) != 1:
            raise NoMatch("attention probabilities are used outside the value product "
                          f"({len(users)} users of `{probs.name}`: returned, stored or reused)")
        user = users[0]
        if user.target in CAST_TARGETS or user.target in IDENTITY_TARGETS:
            probs = user
        elif user.target in DROPOUT_TARGETS:
            p = float(user.args[1])
            train = user.args[2] if len(user.args) > 2 else True
            if train and p > 0:
                raise NoMatch(f"dropout p={p} active between softmax and values (training "
                              "mode): call model.eval() before optimizing")
            dropout_p = p
            if user.target is aten.native_dropout.default:
                getters = [u for u in real_users(user) if u.args[1] == 0]
                others = [u for u in real_users(user) if u.args[1] != 0]
                if len(getters) != 1 or others:
                    raise NoMatch("dropout mask of the attention probabilities is used")
                user = getters[0]
            probs = user
        elif user.target in PRODUCT_TARGETS:
            break
        else:
            raise NoMatch(f"attention probabilities feed `{user.target}` before the value "
                          "product")
        internal.append(probs)
    value_product = user
    output_steps: tuple = ()

    if value_product.target is aten.einsum.default:
        (p_letters, v_letters), out_letters, (p_node, v_node) = _parse_einsum(value_product)
        if p_node is not probs:
            (v_letters, p_letters), (v_node, p_node) = (p_letters, v_letters), (p_node, v_node)
        if p_node is not probs:
            raise NoMatch("probabilities are not an operand of the value einsum")
        key_letter, query_letter = p_letters[-1], p_letters[-2]
        batch = p_letters[:-2]
        value_dims = [c for c in v_letters if c not in p_letters]
        if len(value_dims) != 1 or key_letter not in v_letters or key_letter in out_letters:
            raise NoMatch("value einsum does not contract the key axis of the probabilities")
        dv = value_dims[0]
        if sorted(v_letters) != sorted(batch + key_letter + dv):
            raise NoMatch("value einsum operands do not share their batch axes")
        v = _recipe(v_node, _permutation(v_letters, batch + key_letter + dv))
        canonical_out = batch + query_letter + dv
        if sorted(canonical_out) != sorted(out_letters):
            raise NoMatch("value einsum output is not (batch…, query, value-dim)")
        perm = _permutation(canonical_out, out_letters)
        output_steps = (("permute", perm),) if perm else ()
    else:
        if value_product.target is aten.baddbmm.default or value_product.args[0] is not probs:
            raise NoMatch("probabilities are not the left operand of the value product")
        v = TensorRecipe(value_product.args[1])

    batch_dims = len(q.shape) - 2
    if views:
        # fairseq / older transformers: (B·H, Sq, Sk) viewed as (B, H, Sq, Sk) to add a mask,
        # then viewed back. Canonical attention runs in the 4-d space, with the view's (B, H).
        split = _merged_heads_split(views, terms_per_space, batch_dims)
        q, k, v = (r.then(("unflatten", 0, split)) for r in (q, k, v))
        output_steps = (("flatten", 0, 1),) + output_steps
        layout_notes.append("merged batch·heads")
        batch_dims = 2
    if batch_dims > 2:
        raise NoMatch(f"attention with {batch_dims} batch axes (at most 2 supported)")
    if batch_dims < 2:  # (B·H, S, D) → (1, B·H, S, D)
        lift = tuple(("unsqueeze", 0) for _ in range(2 - batch_dims))
        q, k, v = q.then(*lift), k.then(*lift), v.then(*lift)
        output_steps = tuple(("squeeze", 0) for _ in range(2 - batch_dims)) + output_steps
        layout_notes.append("merged batch·heads")

    return _finish(form=_form(product), anchor=softmax, output=value_product, q=q, k=k, v=v,
                   scale=scale, terms=terms, is_causal=False, enable_gqa=False,
                   output_steps=output_steps, dropout_p=dropout_p,
                   layout=layout_notes[-1] if layout_notes else "BHSD",
                   internal=internal + [product, value_product], softcap=softcap)


def _match_sdpa(node: Node) -> SiteMatch:
    bound = _bind(node)
    dropout_p = float(bound.get("dropout_p", 0.0))
    if dropout_p > 0:
        raise NoMatch(f"fused attention with dropout_p={dropout_p} (training): call "
                      "model.eval() before optimizing")
    q, k, v = (TensorRecipe(bound[name]) for name in ("query", "key", "value"))
    mask = bound.get("attn_mask")
    terms = [MaskTerm("sdpa", mask)] if isinstance(mask, Node) else []
    head_dim = concrete(q.shape[-1])
    scale = bound.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    if len(q.shape) != 4:
        raise NoMatch(f"fused attention on {len(q.shape)}-d tensors (4-d supported)")
    layout = "BSHD" if bound["query"].target in TRANSPOSE_TARGETS else "BHSD"
    return _finish(form="fused_sdpa", anchor=node, output=node, q=q, k=k, v=v, scale=scale,
                   terms=terms, is_causal=bool(bound.get("is_causal", False)),
                   enable_gqa=bool(bound.get("enable_gqa", False)), output_steps=(),
                   dropout_p=dropout_p, layout=layout, internal=[node])


def _merged_heads_split(views: list[Node], terms_per_space: list[int], batch_dims: int
                        ) -> tuple:
    """(B, H) sizes of a 3-d → 4-d → 3-d view round trip of the scores; NoMatch otherwise."""
    if batch_dims != 1 or len(views) != 2:
        raise NoMatch("scores are reshaped before softmax in a way other than a (B·H) → (B, H) "
                      "round trip")
    to_4d, to_3d = views
    if len(shape_of(to_4d)) != 4 or len(shape_of(to_3d)) != 3:
        raise NoMatch("scores reshaped to other than (B, H, Sq, Sk) and back")
    if terms_per_space[0] or terms_per_space[2]:
        raise NoMatch("masks added to the scores on both sides of a reshape")
    return tuple(to_4d.args[1][:2])


def _bind(node: Node) -> dict:
    schema = node.target._schema
    bound = {}
    for argument, value in zip(schema.arguments, node.args):
        bound[argument.name] = value
    bound.update(node.kwargs)
    return bound


def _finish(*, form, anchor, output, q, k, v, scale, terms, is_causal, enable_gqa,
            output_steps, dropout_p, layout, internal, softcap=None) -> SiteMatch:
    group = 1
    k_src, k_group = _peel_head_repeat(k)
    v_src, v_group = _peel_head_repeat(v)
    if k_group > 1 and k_group == v_group:
        k, v, group, enable_gqa = k_src, v_src, k_group, True
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        raise NoMatch("q, k and v do not share a (B, H, S, D) layout")
    heads, kv_heads = concrete(q_shape[1]), concrete(k_shape[1])
    if concrete(k_shape[1]) != concrete(v_shape[1]):
        raise NoMatch("k and v have different head counts")
    if heads != kv_heads:
        if kv_heads == 0 or heads % kv_heads:
            raise NoMatch(f"{heads} query heads do not divide into {kv_heads} kv heads")
        enable_gqa, group = True, heads // kv_heads
    if concrete(q_shape[0]) != concrete(k_shape[0]) or concrete(k_shape[0]) != concrete(v_shape[0]):
        raise NoMatch("q, k and v have different batch sizes (broadcast batch not supported)")
    if concrete(q_shape[-1]) != concrete(k_shape[-1]):
        raise NoMatch("q and k have different head dims")
    if concrete(k_shape[2]) != concrete(v_shape[2]):
        raise NoMatch("k and v have different sequence lengths")
    return SiteMatch(form=form, anchor=anchor, output=output, q=q, k=k, v=v, scale=scale,
                     mask_terms=tuple(terms), is_causal=is_causal, enable_gqa=enable_gqa,
                     gqa_group=group, output_steps=output_steps, dropout_p=dropout_p,
                     layout=layout, internal=internal, softcap=softcap)


def _form(product: Node) -> str:
    return {aten.matmul.default: "matmul", aten.bmm.default: "bmm",
            aten.baddbmm.default: "baddbmm", aten.einsum.default: "einsum"}[product.target]


# --------------------------------------------------------------------------------------------


def find_attention(graph_module: GraphModule, name_prefix: str = ""
                   ) -> tuple[list[SiteMatch], list[Rejection]]:
    """Every attention site of `graph_module`, and every softmax/SDPA left alone with why."""
    matches: list[SiteMatch] = []
    rejections: list[Rejection] = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SDPA_TARGET:
            matcher = _match_sdpa
        elif node.target in SOFTMAX_TARGETS:
            matcher = _match_softmax
        else:
            continue
        try:
            matches.append(matcher(node))
        except NoMatch as failure:
            path, _ = module_path(node)
            rejections.append(Rejection(name=_qualify(name_prefix, path), module_path=
                                        _qualify(name_prefix, path), node=node.name,
                                        reason=str(failure)))
    return matches, rejections


def _qualify(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p) or "<root>"


def site_dtype(match: SiteMatch) -> Optional[torch.dtype]:
    return dtype_of(match.q.node)


def output_projection(match: SiteMatch) -> Optional[Node]:
    """The linear that reads the site's output through views, if any."""
    node = match.output
    for _ in range(8):
        user = only_user(node)
        if user is None:
            return None
        if is_call(user, aten.linear.default) and user.args[0] is node:
            return user
        if user.target in VIEW_TARGETS or user.target in TRANSPOSE_TARGETS or \
                user.target in IDENTITY_TARGETS:
            node = user
            continue
        return None
    return None


# --------------------------------------------------------------------------------------------
# describing a match as an AttentionSite


def input_projection(node: Node) -> Optional[Projection]:
    """The plain linear a q/k/v tensor was projected by (through views, RoPE, packing)."""
    packed, index = False, None
    for _ in range(16):
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        if node.target is aten.linear.default:
            weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
            if not (isinstance(weight, Node) and weight.op == "get_attr"):
                return None
            bias_name = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
            return Projection(weight.target, bias_name, packed, index)
        if node.target is operator.getitem and isinstance(node.args[1], int):
            packed, index = True, node.args[1] if index is None else index
        elif node.target in (aten.unbind.int, aten.split.Tensor, aten.chunk.default,
                             aten.split_with_sizes.default):
            packed = True
        elif node.target in (aten.select.int, aten.slice.Tensor) and index is None:
            if node.target is aten.select.int:
                packed, index = True, node.args[2]
        node = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
    return None


def describe_site(match: SiteMatch, *, name: str, module: str, module_type: str,
                  mask_kind: str, window: Optional[int], causal: bool) -> AttentionSite:
    q_shape, k_shape, v_shape = match.q.shape, match.k.shape, match.v.shape
    labels = ("batch", "heads", "q_len", "head_dim")
    dynamic = [label for label, dim in zip(labels, q_shape) if is_symbolic(dim)]
    if is_symbolic(k_shape[2]):
        dynamic.append("kv_len")
    projections = {}
    for role, recipe in (("q", match.q), ("k", match.k), ("v", match.v)):
        projection = input_projection(recipe.node)
        if projection is not None:
            projections[role] = projection
    out_linear = output_projection(match)
    if out_linear is not None:
        weight, bias = out_linear.args[1], out_linear.args[2] if len(out_linear.args) > 2 \
            else None
        if isinstance(weight, Node) and weight.op == "get_attr":
            projections["out"] = Projection(
                weight.target, bias.target if isinstance(bias, Node) else None)
    dtype = dtype_of(match.q.node)
    return AttentionSite(
        name=name, module_path=module, module_type=module_type, form=match.form,
        batch=concrete(q_shape[0]), heads=concrete(q_shape[1]), kv_heads=concrete(k_shape[1]),
        q_len=concrete(q_shape[2]), kv_len=concrete(k_shape[2]), head_dim=concrete(q_shape[3]),
        v_head_dim=concrete(v_shape[3]), scale=float(match.scale), mask_kind=mask_kind,
        window=window, dropout_p=match.dropout_p, layout=match.layout,
        gqa_group=match.gqa_group, dtype=str(dtype).replace("torch.", ""), causal=causal,
        softcap=match.softcap,
        dynamic_dims=tuple(dynamic), projections=projections, node=match.output.name,
        notes=match.notes)


class DetectAttention:
    """Pass: find every site (no graph change); matches and rejections go to the context."""

    name = "detect_attention"

    def __call__(self, graph_module: GraphModule, context):
        from attnopt.passes.manager import PassResult  # (manager imports the site types)
        matches, rejections = find_attention(graph_module, context.name_prefix)
        context.matches.extend(matches)
        context.rejections.extend(rejections)
        changes = [f"{len(matches)} site(s) found"] + \
            [f"left alone: {r.name} ({r.reason})" for r in rejections]
        return PassResult(graph_module, False, changes)
