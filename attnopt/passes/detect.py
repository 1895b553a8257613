"""Detection: find every scaled-dot-product attention in an exported aten graph.

Two anchors start a match:
  * a fused `aten.scaled_dot_product_attention` call;
  * a softmax over the last axis, from which the detector walks back to the score product
    (scores.py: through scales, casts, additive biases, masked_fill, where, soft-caps and
    (B·H) ↔ (B, H) views) and forward to the value product (through casts, dropout, clones).

Operands are peeled of what canonical attention absorbs (operands.py): a transpose of k,
scalar scales on q and k, GQA head repetition of k and v, einsum layouts. A softmax that is not
attention — probabilities used elsewhere, a softmax over the query axis, an unsupported op
between product and softmax — yields a `Rejection` naming the reason.

The result is a list of `SiteMatch` (see patterns.py); the graph is not modified here.
"""

from __future__ import annotations

import math

from torch.fx import GraphModule, Node

from attnopt.passes.fx_utils import (
    CAST_TARGETS, IDENTITY_TARGETS, TRANSPOSE_TARGETS, VIEW_TARGETS, aten, concrete,
    module_path, normalize_dim, real_users, same_dim, shape_of,
)
from attnopt.passes.operands import (
    key_from_transposed, parse_einsum, peel_head_repeat, peel_scalar_scale, permutation,
    permuted_recipe,
)
from attnopt.passes.patterns import MaskTerm, SiteMatch, TensorRecipe
from attnopt.passes.scores import (
    PRODUCT_TARGETS, NoMatch, Scale, Softcap, Term, View, trace_scores,
)
from attnopt.site import Rejection

SOFTMAX_TARGETS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
SDPA_TARGET = aten.scaled_dot_product_attention.default
DROPOUT_TARGETS = frozenset({aten.dropout.default, aten.native_dropout.default,
                             aten.feature_dropout.default})


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

    product, steps = trace_scores(scores_in)
    scale, terms = 1.0, []
    layout_notes: list[str] = []

    # score product → q, k recipes with batch dims first, then (S, D)
    if product.target is aten.einsum.default:
        (q_letters, k_letters), out_letters, (q_node, k_node) = parse_einsum(product)
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
        q_node, q_factor = peel_scalar_scale(q_node)
        k_node, k_factor = peel_scalar_scale(k_node)
        scale *= q_factor * k_factor
        q = permuted_recipe(q_node, permutation(q_letters, batch + query_letter + d))
        k = permuted_recipe(k_node, permutation(k_letters, batch + key_letter + d))
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
        q_node, q_factor = peel_scalar_scale(q_node)
        k, k_factor = key_from_transposed(k_t)
        q = TensorRecipe(q_node)
        scale *= q_factor * k_factor
        if q_node.target in TRANSPOSE_TARGETS:
            layout_notes.append("BSHD")

    softcap, views = None, []
    term_spaces = [0] * len(terms)  # how many reshapes of the scores precede each term
    for step in steps:
        if isinstance(step, View):
            if not _keeps_shape(step.node):
                views.append(step.node)
            continue
        if isinstance(step, Scale):
            if softcap is not None:
                raise NoMatch("scores scaled after soft-capping")
            scale *= step.factor
            terms = [t.scaled(step.factor) for t in terms]
        elif isinstance(step, Term):
            terms.append(step.term)
        elif isinstance(step, Softcap):
            if terms or softcap is not None:
                raise NoMatch("mask or bias applied before soft-capping")
            softcap = step.cap
        term_spaces += [len(views)] * (len(terms) - len(term_spaces))

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
        elif user.target in VIEW_TARGETS and _keeps_key_axes(user):
            if not _keeps_shape(user):  # (B, H, Sq, Sk) viewed back as (B·H, Sq, Sk)
                views.append(user)
            probs = user
        else:
            raise NoMatch(f"attention probabilities feed `{user.target}` before the value "
                          "product")
        internal.append(probs)
    value_product = user
    output_steps: tuple = ()

    if value_product.target is aten.einsum.default:
        (p_letters, v_letters), out_letters, (p_node, v_node) = parse_einsum(value_product)
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
        v = permuted_recipe(v_node, permutation(v_letters, batch + key_letter + dv))
        canonical_out = batch + query_letter + dv
        if sorted(canonical_out) != sorted(out_letters):
            raise NoMatch("value einsum output is not (batch…, query, value-dim)")
        perm = permutation(canonical_out, out_letters)
        output_steps = (("permute", perm),) if perm else ()
    else:
        if value_product.target is aten.baddbmm.default or value_product.args[0] is not probs:
            raise NoMatch("probabilities are not the left operand of the value product")
        v = TensorRecipe(value_product.args[1])

    batch_dims = len(q.shape) - 2
    if views:
        # fairseq / older transformers: (B·H, Sq, Sk) viewed as (B, H, Sq, Sk) to add a mask,
        # then viewed back (before softmax, or BLOOM: the probabilities). Canonical attention
        # runs in the 4-d space, with the view's (B, H); terms added in the 3-d space follow.
        split = _merged_heads_split(views, batch_dims)
        q, k, v = (r.then(("unflatten", 0, split)) for r in (q, k, v))
        terms = [term if space % 2 else _lift_merged(term, split)  # odd spaces are 4-d
                 for term, space in zip(terms, term_spaces)]
        output_steps = (("flatten", 0, 1),) + output_steps
        layout_notes.append("merged batch·heads")
        batch_dims = 2
    if batch_dims == 3:  # grouped heads without repetition: (B, Hkv, G, S, D) · (B, Hkv, 1, …)
        q, k, v, output_steps = _grouped_heads(q, k, v, terms, output_steps)
        layout_notes.append("grouped heads (B, Hkv, G, S, D)")
        batch_dims = 2
    if batch_dims > 2:
        raise NoMatch(f"attention with {batch_dims} batch axes (at most 3 supported)")
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


def _grouped_heads(q, k, v, terms, output_steps):
    """(B, Hkv, G, S, D) queries against (B, Hkv, 1, S, D) keys and values — GQA written as a
    broadcast — become (B, Hkv·G, S, D) against (B, Hkv, S, D): query head h reads kv head
    h // G, exactly `enable_gqa`'s order."""
    kv_heads, group = q.shape[1], q.shape[2]
    if not (isinstance(kv_heads, int) and isinstance(group, int)):
        raise NoMatch("grouped-head attention with symbolic head counts")
    if concrete(k.shape[2]) != 1 or concrete(v.shape[2]) != 1:
        raise NoMatch("5-d attention whose keys are not broadcast over a head group")
    if any(len(shape_of(t.node) or ()) >= 4 for t in terms):
        raise NoMatch("5-d grouped-head attention with a per-head mask")
    return (q.then(("flatten", 1, 2)), k.then(("squeeze", 2)), v.then(("squeeze", 2)),
            (("unflatten", 1, (kv_heads, group)),) + output_steps)


def _merged_heads_split(views: list[Node], batch_dims: int) -> tuple:
    """(B, H) sizes of 3-d → 4-d → 3-d view round trips of the scores (XGLM makes two: one
    around the mask add, one after softmax); NoMatch otherwise."""
    if batch_dims != 1 or not views or len(views) % 2:
        raise NoMatch("scores are reshaped between the products in a way other than a "
                      "(B·H) → (B, H) round trip")
    to_4d = views[0::2]
    if any(len(shape_of(v)) != 4 for v in to_4d) or \
            any(len(shape_of(v)) != 3 for v in views[1::2]):
        raise NoMatch("scores reshaped to other than (B, H, Sq, Sk) and back")
    first = shape_of(to_4d[0])[:2]
    if any(not all(same_dim(a, b) for a, b in zip(first, shape_of(v)[:2])) for v in to_4d):
        raise NoMatch("scores viewed with two different (B, H) splits")
    return tuple(to_4d[0].args[1][:2])


def _lift_merged(term: MaskTerm, split: tuple) -> MaskTerm:
    """A term added to (B·H, Sq, Sk) scores, viewed into (B, H, Sq, Sk)."""
    shape = shape_of(term.node)
    if shape is None or len(shape) < 3:
        return term  # broadcast over the batch·heads axis: the same in 4-d
    if len(shape) > 3:
        raise NoMatch("a mask of more than 3 dims added to (B·H, Sq, Sk) scores")
    if concrete(shape[0]) == 1:
        return term.then(("unsqueeze", 0))
    return term.then(("unflatten", 0, split))


def _keeps_shape(view: Node) -> bool:
    """A reshape to the shape it already had (Falcon views its 4-d probabilities as 4-d)."""
    before, after = shape_of(view.args[0]), shape_of(view)
    return before is not None and after is not None and len(before) == len(after) and \
        all(same_dim(a, b) for a, b in zip(before, after))


def _keeps_key_axes(view: Node) -> bool:
    before, after = shape_of(view.args[0]), shape_of(view)
    return before is not None and after is not None and len(before) >= 3 and \
        len(after) >= 3 and same_dim(before[-1], after[-1]) and same_dim(before[-2], after[-2])


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
    k_src, k_group = peel_head_repeat(k)
    v_src, v_group = peel_head_repeat(v)
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
