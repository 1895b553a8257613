"""Pass: structured head pruning — remove the least important heads from a site's projections.

For each canonical site a policy's `prune_heads` weights rule selects, every head's
importance is measured on the examples: by the gradient of a loss when `optimize(loss=...)`
gives one ("gradient", `gradient_importance`), else as the norm of its contribution to the
out-projection's output (‖o_h · W_oᵀ[h]‖, "output_norm"). The least important
`fraction` of the heads (whole kv groups on GQA sites, so every kept query head keeps its
kv head) leave the graph: their rows of the q/k/v projections and their columns of the
out-projection are dropped, and the paths in between are rebuilt with the new head count
(`heads.py`). The attention output then has fewer heads, so the site is measured after the
out-projection, whose output keeps the original shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from attnopt.passes.evaluate import NodeValues, flat_inputs
from attnopt.passes.heads import (
    SurgeryRefused, replace_out_projection, replace_site, site_args, trace_input,
    trace_output, weight_rule_sites,
)
from attnopt.passes.manager import PassContext, PassResult


class PruneHeads:
    name = "prune_heads"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        values = NodeValues(graph_module, context.args, context.kwargs)
        pending = weight_rule_sites(graph_module, context, "prune_heads")
        gradients = {}
        if any(_importance_kind(params, context) == "gradient" for *_, params, _ in pending):
            gradients = gradient_importance(graph_module, context, [p[0] for p in pending])
        for node, site, params, why in pending:
            try:
                info = self._prune(graph_module, node, site, params, values, context,
                                   gradients.get(node.name))
            except SurgeryRefused as refused:
                context.note_weights(site.name, f"prune_heads not applied ({why}): {refused}")
                continue
            context.record_weights(site.name, "prune_heads", info)
            changes.append(f"{site.name}: heads {info['from_heads']} → {len(info['kept'])}")
        return PassResult(graph_module, bool(changes), changes)

    def _prune(self, graph_module: GraphModule, node: Node, site, params: dict,
               values: NodeValues, context: PassContext,
               gradient: Optional[torch.Tensor]) -> dict:
        q, k, v, mask = site_args(node)[:4]
        heads, kv_heads = (int(n.meta["val"].shape[1]) for n in (q, k))
        ratio = heads // kv_heads
        removed = math.floor(kv_heads * params["fraction"])
        if removed < 1 or removed >= kv_heads:
            raise SurgeryRefused(f"fraction {params['fraction']} of {kv_heads} kv heads "
                                 f"removes {removed}")
        kind = _importance_kind(params, context)
        if kind == "gradient" and gradient is None:
            raise SurgeryRefused("gradient importance needs optimize(..., loss=...)")
        paths = [trace_input(node, i) for i in range(3)]
        out_path = trace_output(node)
        if kind == "gradient":
            importance = gradient
        else:
            (output,) = values.of([node])
            weight, _ = out_path.core.rows(graph_module)
            importance = output_norm_importance(output, weight, out_path.head_inner)
        group_importance = importance.reshape(kv_heads, ratio).sum(1)
        kept_kv = sorted(group_importance.argsort(descending=True)[:kv_heads - removed]
                         .tolist())
        kept = [kv * ratio + r for kv in kept_kv for r in range(ratio)]
        new_q = paths[0].rebuild(graph_module, [[h] for h in kept], f"{site.name}_q")
        new_k = paths[1].rebuild(graph_module, [[h] for h in kept_kv], f"{site.name}_k")
        new_v = paths[2].rebuild(graph_module, [[h] for h in kept_kv], f"{site.name}_v")
        new = replace_site(graph_module, node, new_q, new_k, new_v, context, query_heads=kept)
        new_out = out_path.rebuild(graph_module, new, [[h] for h in kept], f"{site.name}_out")
        replace_out_projection(out_path, new_out, site.name, context)
        for path in (*paths, out_path):
            context.replaced_parameters.update(path.core.parameter_names())
        return {"from_heads": heads, "from_kv_heads": kv_heads, "kept": kept,
                "importance": kind,
                "head_importance": [round(float(x), 6) for x in importance]}


def _importance_kind(params: dict, context: PassContext) -> str:
    """"auto": by gradient when a loss was given, else by output norm."""
    if params["importance"] == "auto":
        return "gradient" if context.loss is not None else "output_norm"
    return params["importance"]


def gradient_importance(graph_module: GraphModule, context: PassContext,
                        nodes: list[Node]) -> dict[str, torch.Tensor]:
    """Per site node, per head: Σ over examples |Σ_{s,d} o_h · ∂L/∂o_h|, the sensitivity
    of the loss to scaling the head's output (Michel et al., 2019, "Are sixteen heads really
    better than one?"). The site outputs are cut from what precedes them and differentiated
    alone, so no parameter of the user's model accumulates a gradient."""
    watched = {n.name for n in nodes}
    kept: dict[str, torch.Tensor] = {}

    class _Watch(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name in watched:
                result = result.detach().requires_grad_(True)
                kept[node.name] = result
            return result

    if context.loss is None:
        return {}
    with torch.enable_grad():
        flat = _Watch(graph_module).run(*flat_inputs(graph_module, context.args,
                                                     context.kwargs),
                                        enable_io_processing=False)
        out_spec = getattr(graph_module, "_out_spec", None)
        output = pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None \
            else flat
        loss = context.loss(output)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise SurgeryRefused("loss must return a scalar tensor")
        names = list(kept)
        grads = torch.autograd.grad(loss, [kept[n] for n in names], allow_unused=True)
    result = {}
    for name, grad in zip(names, grads):
        if grad is None:
            grad = torch.zeros_like(kept[name])
        per_example = (kept[name].detach().double() * grad.double()).sum(dim=(2, 3))
        result[name] = per_example.abs().sum(0)
    return result


def output_norm_importance(output_BHSD: torch.Tensor, out_weight: torch.Tensor,
                           head_dim: int) -> torch.Tensor:
    """Per head: the norm of its contribution to the out-projection's output on the examples,
    ‖o_h · W_o[:, h]ᵀ‖ (W_o as (out, heads·head_dim), heads outer)."""
    heads = output_BHSD.shape[1]
    weight = out_weight.detach().double().reshape(out_weight.shape[0], heads, head_dim)
    contribution = torch.einsum("bhsd,ohd->bhso", output_BHSD.detach().double(), weight)
    return contribution.pow(2).sum(dim=(0, 2, 3)).sqrt()
