"""Describe a match as an `AttentionSite`: shapes, scale, mask kind, projections."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from attnopt.passes.fx_utils import (
    IDENTITY_TARGETS, TRANSPOSE_TARGETS, VIEW_TARGETS, aten, concrete, dtype_of, is_call,
    is_symbolic, only_user,
)
from attnopt.passes.patterns import SiteMatch
from attnopt.site import AttentionSite, Projection


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
                  mask_kind: str, window: Optional[int], causal: bool,
                  alibi: bool = False) -> AttentionSite:
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
    value = match.q.node.meta.get("val")
    device = value.device.type if isinstance(value, torch.Tensor) else "cpu"
    return AttentionSite(
        name=name, module_path=module, module_type=module_type, form=match.form,
        batch=concrete(q_shape[0]), heads=concrete(q_shape[1]), kv_heads=concrete(k_shape[1]),
        q_len=concrete(q_shape[2]), kv_len=concrete(k_shape[2]), head_dim=concrete(q_shape[3]),
        v_head_dim=concrete(v_shape[3]), scale=float(match.scale), mask_kind=mask_kind,
        window=window, dropout_p=match.dropout_p, layout=match.layout,
        gqa_group=match.gqa_group, dtype=str(dtype).replace("torch.", ""), device=device,
        causal=causal, alibi=alibi,
        softcap=match.softcap,
        dynamic_dims=tuple(dynamic), projections=projections, node=match.output.name,
        notes=match.notes)
