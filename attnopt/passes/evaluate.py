"""Run a captured graph on concrete inputs and keep the values of chosen nodes.

Used by mask classification (the value of a mask's producer subgraph) and by verification
(each site's output in the original graph, and its replacement replayed on those values).
`record_values` runs a whole graph; an `EvaluationPlan` runs only what some nodes need, from
given values of the nodes they read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree


def placeholder_values(graph_module: GraphModule, args: tuple, kwargs: dict
                       ) -> dict[str, Any]:
    """{placeholder name: value} for (args, kwargs)."""
    placeholders = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, flat_inputs(graph_module, args, kwargs)))


def flat_inputs(graph_module: GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The placeholder values for (args, kwargs), in the graph's own order."""
    in_spec = getattr(graph_module, "_in_spec", None)
    if in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec
        return list(tree_flatten_spec((args, kwargs), in_spec))
    return pytree.tree_leaves((args, kwargs))


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph_module: GraphModule, watch: set[str]):
        super().__init__(graph_module)
        self.watch = watch
        self.values: dict[str, Any] = {}

    def run_node(self, node):
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


@dataclass(frozen=True)
class EvaluationPlan:
    """The nodes to run, in graph order, to compute `targets` from the values of `inputs`."""

    graph_module: GraphModule
    inputs: tuple[Node, ...]
    order: tuple[Node, ...]
    targets: tuple[Node, ...]

    @property
    def input_names(self) -> list[str]:
        return [node.name for node in self.inputs]


def plan_evaluation(graph_module: GraphModule, targets: list[Node],
                    is_input: Callable[[Node], bool]) -> EvaluationPlan:
    """What computing `targets` takes, when nodes for which `is_input` holds are given."""
    inputs, needed, stack = {}, set(), list(targets)
    while stack:
        node = stack.pop()
        if node in needed or node in inputs:
            continue
        if is_input(node):
            inputs[node] = None
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    order = tuple(n for n in graph_module.graph.nodes if n in needed)
    return EvaluationPlan(graph_module, tuple(inputs), order, tuple(targets))


@torch.no_grad()
def run_plan(plan: EvaluationPlan, values: dict[str, Any]) -> list[Any]:
    """The targets' values, from `values` of the plan's inputs (by node name)."""
    missing = [name for name in plan.input_names if name not in values]
    if missing:
        raise ValueError(f"no value for {missing}")
    interpreter = torch.fx.Interpreter(plan.graph_module)
    interpreter.env = {node: values[node.name] for node in plan.inputs}
    for node in plan.order:
        interpreter.env[node] = interpreter.run_node(node)
    return [interpreter.env[target] for target in plan.targets]


@torch.no_grad()
def evaluate_subgraph(graph_module: GraphModule, outputs: list[Node],
                      placeholder_values: dict[str, Any]) -> list[Any]:
    """Evaluate only what `outputs` depend on, with the given placeholder values.

    Placeholders outside that dependency cone need no value. Used to probe mask producers at
    other sequence lengths without running the model.
    """
    plan = plan_evaluation(graph_module, outputs, lambda node: node.op == "placeholder")
    return run_plan(plan, placeholder_values)


class NodeValues:
    """Example values of a graph's nodes, computed on demand (only what each node needs) and
    kept: the calibration data of the weight rewrites."""

    def __init__(self, graph_module: GraphModule, args: tuple, kwargs: dict):
        self.graph_module = graph_module
        self.inputs = placeholder_values(graph_module, args, kwargs)
        self.values: dict[str, Any] = {}

    def of(self, nodes: list[Node]) -> list[Any]:
        missing = [n for n in nodes if n.name not in self.values]
        if missing:
            for node, value in zip(missing, evaluate_subgraph(self.graph_module, missing,
                                                              self.inputs)):
                self.values[node.name] = value
        return [self.values[n.name] for n in nodes]

    def names(self, nodes: list[Node]) -> dict[str, Any]:
        """{name: value} for `nodes` (Nones and non-nodes skipped)."""
        wanted = [n for n in nodes if isinstance(n, Node)]
        return dict(zip([n.name for n in wanted], self.of(wanted)))
