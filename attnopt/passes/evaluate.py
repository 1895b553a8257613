"""Run a captured graph on concrete inputs and keep the values of chosen nodes.

Used by mask classification (the value of a mask's producer subgraph) and by verification
(each site's output, in the original and in the rewritten graph).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.fx
from torch.fx import GraphModule
from torch.utils import _pytree as pytree


def flat_inputs(graph_module: GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The placeholder values for (args, kwargs), in the graph's own order."""
    in_spec = getattr(graph_module, "_in_spec", None)
    if in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec
        return list(tree_flatten_spec((args, kwargs), in_spec))
    return pytree.tree_leaves((args, kwargs))


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph_module: GraphModule, watch: set[str],
                 only: Optional[set[str]] = None):
        super().__init__(graph_module)
        self.watch = watch
        self.only = only
        self.values: dict[str, Any] = {}

    def run_node(self, node):
        if self.only is not None and node.name not in self.only and node.op != "placeholder":
            return None  # (placeholders always run: each consumes its positional input)
        result = super().run_node(node)
        if node.name in self.watch:
            self.values[node.name] = result
        return result


@torch.no_grad()
def record_values(graph_module: GraphModule, args: tuple, kwargs: dict,
                  node_names: Iterable[str]) -> tuple[dict[str, Any], list[Any]]:
    """Run `graph_module` on (args, kwargs): ({node name: value} for `node_names`, outputs).

    Outputs are the graph's flat output list (the leaves of what the module returns).
    """
    recorder = _Recorder(graph_module, set(node_names))
    outputs = recorder.run(*flat_inputs(graph_module, args, kwargs), enable_io_processing=False)
    return recorder.values, list(outputs)


@torch.no_grad()
def evaluate_nodes(graph_module: GraphModule, args: tuple, kwargs: dict,
                   nodes: list[torch.fx.Node]) -> dict[str, Any]:
    """Values of `nodes` on (args, kwargs), computing only what they depend on."""
    if not nodes:
        return {}
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    values = dict(zip((n.name for n in placeholders), flat_inputs(graph_module, args, kwargs)))
    results = evaluate_subgraph(graph_module, nodes, values)
    return {node.name: value for node, value in zip(nodes, results)}


@torch.no_grad()
def evaluate_subgraph(graph_module: GraphModule, outputs: list[torch.fx.Node],
                      placeholder_values: dict[str, Any]) -> list[Any]:
    """Evaluate only what `outputs` depend on, with the given placeholder values.

    Placeholders outside that dependency cone need no value. Used to probe mask producers at
    other sequence lengths without running the model.
    """
    from attnopt.passes.fx_utils import ancestors
    needed = {node.name for node in ancestors(outputs)}
    missing = [n.name for n in graph_module.graph.nodes
               if n.op == "placeholder" and n.name in needed and n.name not in placeholder_values]
    if missing:
        raise ValueError(f"no value for placeholders {missing}")
    recorder = _Recorder(graph_module, {node.name for node in outputs}, only=needed)
    placeholders = [placeholder_values.get(n.name) for n in graph_module.graph.nodes
                    if n.op == "placeholder"]
    recorder.run(*placeholders, enable_io_processing=False)
    return [recorder.values[node.name] for node in outputs]
