"""Pass: convert multi-head (or grouped) attention to fewer kv heads by pooling projections.

For each canonical site a policy's `gqa` weights rule selects, the k and v projections' heads
are mean-pooled within groups (the conversion of Ainslie et al., "GQA", 2023): new kv head j
is the mean of the old kv heads in group j, weights and biases alike. The k/v paths are
rebuilt with the new head count (`heads.py`) and the site reads them with `enable_gqa`, so no
kernel ever repeats k/v in memory; the old projection parameters leave the graph.

Groups are contiguous heads, or clusters of heads whose keys and values are alike on the
examples (balanced greedy clustering). Query head h reads kv head h // (H / Hkv'), so a
clustered grouping also permutes the query heads (the q projection's rows) and the
out-projection's input columns to match — an exact permutation. `grouping="best"` measures
the site's attention error under both groupings on the examples and keeps the lower; the
report records both.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from attnopt.ops.attention import attention_reference
from attnopt.passes.evaluate import NodeValues
from attnopt.passes.heads import (
    SurgeryRefused, per_head_mask, replace_out_projection, replace_site, site_args,
    trace_input, trace_output, weight_rule_sites,
)
from attnopt.passes.manager import PassContext, PassResult


class ConvertToGroupedQuery:
    name = "convert_to_grouped_query"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        values = NodeValues(graph_module, context.args, context.kwargs)
        for node, site, params, why in weight_rule_sites(graph_module, context, "gqa"):
            try:
                info = self._convert(graph_module, node, site, params, values, context)
            except SurgeryRefused as refused:
                context.note_weights(site.name, f"gqa not applied ({why}): {refused}")
                continue
            context.record_weights(site.name, "gqa", info)
            changes.append(f"{site.name}: kv heads {info['from_kv_heads']} → "
                           f"{info['kv_heads']} ({info['grouping']})")
        return PassResult(graph_module, bool(changes), changes)

    def _convert(self, graph_module: GraphModule, node: Node, site, params: dict,
                 values: NodeValues, context: PassContext) -> dict:
        q, k, v, mask = site_args(node)[:4]
        slopes = site_args(node)[9]
        heads, kv_heads = _heads(q), _heads(k)
        if params["kv_heads"] is None and kv_heads % max(1, params["group_size"]):
            raise SurgeryRefused(f"{kv_heads} kv heads do not form groups of "
                                 f"{params['group_size']}")
        target = params["kv_heads"] if params["kv_heads"] is not None else \
            kv_heads // max(1, params["group_size"])
        if not 1 <= target < kv_heads or kv_heads % target:
            raise SurgeryRefused(f"cannot pool {kv_heads} kv heads into {target}")
        calibration = values.names([q, k, v] + [n for n in (mask, slopes)
                                                if isinstance(n, Node)])
        k_path = trace_input(node, 1)
        v_path = trace_input(node, 2)
        packed = k_path.parts > 1 or v_path.parts > 1  # q shares the matmul: rebuilt too
        q_path = trace_input(node, 0) if packed else None
        groups = {"contiguous": contiguous_groups(kv_heads, target)}
        errors, refused = {}, None
        if params["grouping"] in ("clustered", "best"):
            try:
                q_path = q_path or trace_input(node, 0)
                out_path = trace_output(node)
                groups["clustered"] = cluster_heads(calibration[k.name],
                                                    calibration[v.name], target)
            except SurgeryRefused as error:
                refused = str(error)
            if refused is not None and params["grouping"] == "clustered":
                raise SurgeryRefused(f"clustered grouping: {refused}")
        for grouping, members in groups.items():
            errors[grouping] = pooled_error(node, calibration, members, heads)
        grouping = min(errors, key=errors.get) if params["grouping"] == "best" else \
            params["grouping"]
        members = groups[grouping]
        query_order = query_permutation(members, heads, kv_heads)
        permuted = query_order != list(range(heads))
        rebuilt = [k_path, v_path]
        new_q = q
        if permuted or packed:
            new_q = q_path.rebuild(graph_module, [[h] for h in query_order], f"{site.name}_q")
            rebuilt.append(q_path)
        new_k = k_path.rebuild(graph_module, members, f"{site.name}_k")
        new_v = v_path.rebuild(graph_module, members, f"{site.name}_v")
        new = replace_site(graph_module, node, new_q, new_k, new_v, context,
                           query_heads=query_order if permuted else None)
        if permuted:  # the permuted heads are measured after the out-projection
            new_out = out_path.rebuild(graph_module, new,
                                       [[h] for h in query_order], f"{site.name}_out")
            replace_out_projection(out_path, new_out, site.name, context)
            rebuilt.append(out_path)
        for path in rebuilt:
            context.replaced_parameters.update(path.core.parameter_names())
        info = {"from_kv_heads": kv_heads, "kv_heads": target, "grouping": grouping,
                "groups": [list(g) for g in members],
                "errors": {name: round(float(e), 6) for name, e in errors.items()}}
        if refused is not None and params["grouping"] == "best":
            info["clustered_refused"] = refused
        return info


def _heads(node: Node) -> int:
    return int(node.meta["val"].shape[1])


def contiguous_groups(kv_heads: int, target: int) -> list[list[int]]:
    size = kv_heads // target
    return [list(range(g * size, (g + 1) * size)) for g in range(target)]


def cluster_heads(k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, target: int) -> list[list[int]]:
    """Balanced clusters of kv heads whose keys and values are alike on the examples: the
    head farthest from the rest seeds a group, its nearest unassigned heads fill it. Groups
    keep ascending head order; the groups are ordered by their first head."""
    kv_heads = k_BHSD.shape[1]
    size = kv_heads // target
    features = torch.cat([k_BHSD.transpose(0, 1).reshape(kv_heads, -1),
                          v_BHSD.transpose(0, 1).reshape(kv_heads, -1)], dim=1).double()
    distance = torch.cdist(features, features)
    remaining = list(range(kv_heads))
    groups = []
    while remaining:
        sub = distance[remaining][:, remaining]
        seed = remaining[int(sub.sum(1).argmax())]
        nearest = sorted(remaining, key=lambda h: (float(distance[seed, h]), h))[:size]
        groups.append(sorted(nearest))
        remaining = [h for h in remaining if h not in nearest]
    return sorted(groups)


def query_permutation(groups: list[list[int]], heads: int, kv_heads: int) -> list[int]:
    """Old query heads in their new order: those reading the kv heads of group 0 first."""
    ratio = heads // kv_heads
    return [kv * ratio + r for group in groups for kv in group for r in range(ratio)]


def pooled_error(node: Node, calibration: dict, groups: list[list[int]], heads: int) -> float:
    """Normwise relative error of the site's output with k/v pooled per `groups` (query heads,
    and a per-head mask and ALiBi slopes with them, permuted to match) against the original,
    on the examples."""
    q, k, v, mask, is_causal, scale, _, softcap, window_left, alibi_slopes = site_args(node)
    q_value, k_value, v_value = (calibration[n.name].double() for n in (q, k, v))
    mask_value = calibration.get(mask.name) if isinstance(mask, Node) else mask
    if isinstance(mask_value, torch.Tensor) and mask_value.is_floating_point():
        mask_value = mask_value.double()

    slopes_value = calibration[alibi_slopes.name] if isinstance(alibi_slopes, Node) else None

    def attend(q_, k_, v_, mask_, slopes_):  # the canonical op's own semantics, every argument
        return attention_reference(q_, k_, v_, mask_, bool(is_causal), scale, True, softcap,
                                   window_left, slopes_)

    order = query_permutation(groups, heads, k_value.shape[1])
    reference = attend(q_value, k_value, v_value, mask_value, slopes_value)[:, order]
    if per_head_mask(mask):
        mask_value = mask_value.index_select(mask_value.dim() - 3, torch.tensor(order))
    if slopes_value is not None:
        slopes_value = slopes_value.index_select(slopes_value.dim() - 1, torch.tensor(order))
    pooled_k = torch.stack([k_value[:, g].mean(1) for g in groups], 1)
    pooled_v = torch.stack([v_value[:, g].mean(1) for g in groups], 1)
    output = attend(q_value[:, order], pooled_k, pooled_v, mask_value, slopes_value)
    return float((output - reference).norm() / reference.norm().clamp_min(1e-30))