"""Pass: int8 projections — the q/k/v/out matmuls of selected sites become `attnopt.int8_linear`.

For each canonical site an `int8` weights rule selects, the projections feeding it (a packed
q/k/v matmul counts once) and the out-projection reading it are candidates. Each candidate's
sensitivity is measured on the examples: the normwise relative error of its output when its
weights (and, in dynamic mode, its input) are quantized. The `keep_fraction` most sensitive
candidates of the region stay in full precision (mixed precision); the others get symmetric
per-channel int8 weights and run `int8_linear` (weight-only, or with dynamically quantized
activations — ops/int8.py says why per tensor). A site whose out-projection is quantized is
measured after it, so the budget sees that projection's error too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from attnopt.ops import INT8_LINEAR_OP
from attnopt.ops.int8 import int8_linear_reference, quantize_weight
from attnopt.passes.evaluate import NodeValues
from attnopt.passes.heads import (
    Core, Emitter, SurgeryRefused, find_core, replace_out_projection, trace_output,
    weight_rule_sites,
)
from attnopt.passes.manager import PassContext, PassResult


class QuantizeProjections:
    name = "quantize_projections"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        values = NodeValues(graph_module, context.args, context.kwargs)
        candidates: dict[Node, tuple[Core, str, str, dict]] = {}  # → (core, site, role, params)
        out_paths = {}
        for node, site, params, _ in weight_rule_sites(graph_module, context, "int8"):
            for role, operand in zip("qkv", node.args[:3]):
                core = find_core(operand)
                if core is None:
                    continue
                if core.node in candidates:  # a packed projection: one matmul, named "qkv"
                    known = candidates[core.node]
                    candidates[core.node] = (known[0], known[1], known[2] + role, known[3])
                else:
                    candidates[core.node] = (core, site.name, role, params)
            try:
                out_path = trace_output(node)
                candidates.setdefault(out_path.core.node,
                                      (out_path.core, site.name, "out", params))
                out_paths[out_path.core.node] = out_path
            except SurgeryRefused:
                pass
        if not candidates:
            return PassResult(graph_module, False, [])
        sensitivity = {n: self._sensitivity(graph_module, core, values, params["mode"])
                       for n, (core, _, _, params) in candidates.items()}
        keep_fraction = max(params["keep_fraction"] for _, _, _, params in candidates.values())
        kept = set(sorted(sensitivity, key=sensitivity.get, reverse=True)
                   [:math.floor(keep_fraction * len(sensitivity))])
        changes = []
        for core_node, (core, site_name, role, params) in candidates.items():
            entry = context.approximations.setdefault(
                site_name, {"variant": "exact", "params": {}})
            info = entry.setdefault("weights", {}).setdefault(
                "int8", {"mode": params["mode"], "quantized": [], "full_precision": [],
                         "sensitivity": {}})
            info["sensitivity"][role] = round(sensitivity[core_node], 6)
            if core_node in kept:
                info["full_precision"].append(role)
                continue
            new = self._replace(graph_module, core, params["mode"] == "dynamic",
                                f"{site_name}_{role}")
            if core_node in out_paths:
                replace_out_projection(out_paths[core_node], new, site_name, context)
            else:
                core_node.replace_all_uses_with(new)
                context.site_members.setdefault(site_name, set()).add(new.name)
            context.replaced_parameters.add(core.weight.target)
            info["quantized"].append(role)
            changes.append(f"{site_name}: {role} projection → int8 ({params['mode']})")
        return PassResult(graph_module, bool(changes), changes)

    @staticmethod
    def _sensitivity(graph_module: GraphModule, core: Core, values: NodeValues,
                     mode: str) -> float:
        (x,) = values.of([core.input])
        weight, bias = core.rows(graph_module)
        weight_int8, scale = quantize_weight(weight, mode == "dynamic")
        with torch.no_grad():
            exact = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            quantized = int8_linear_reference(x.float(), weight_int8, scale, bias,
                                              mode == "dynamic")
        return float((quantized - exact).norm() / exact.norm().clamp_min(1e-30))

    @staticmethod
    def _replace(graph_module: GraphModule, core: Core, dynamic: bool, name: str) -> Node:
        weight, _ = core.rows(graph_module)
        weight_int8, scale = quantize_weight(weight, dynamic)
        emitter = Emitter(graph_module, core.node)
        with graph_module.graph.inserting_before(core.node):
            weight_node = emitter.buffer(weight_int8, f"attnopt_{name}_weight_int8")
            scale_node = emitter.buffer(scale, f"attnopt_{name}_scale")
            return emitter.emit(INT8_LINEAR_OP, core.input, weight_node, scale_node,
                                core.bias_value, dynamic)
