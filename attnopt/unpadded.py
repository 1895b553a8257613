"""Rewritten graphs specialized for unpadded batches: the masks that an all-ones attention_mask
makes redundant are dropped from the graph, and with them the code that builds them.

Hugging Face's SDPA path reads its 2-D attention_mask on the host and, for an unpadded batch,
passes no mask to attention (or `is_causal` alone). A captured graph only holds the mask the
model builds from that attention_mask: BERT's (B, 1, S, S) float mask is about 12 kernels,
and at batch 8 and 2K keys 134 MB written, then read again by the canonical op's own check
(`ops.attention.redundant_mask`), which drops it at run time. Here the check moves up to the
graph's inputs, where it is one small reduction:

- `UnpaddedGraphs.of(rewritten, args, kwargs)` finds the canonical sites whose mask depends on
  the inputs only through *mask inputs*: boolean or integer inputs that hold only 0 and 1 in
  the example (an attention_mask, not input ids), nothing trainable in between.
- A call whose mask inputs are all ones (one synchronization, as HF's check) runs a copy of the
  rewritten graph in which those sites have no mask and the `is_causal` that
  `redundant_mask` gives their masks; the mask build is dead code there and gone.
- What the masks amount to is evaluated, never assumed: on the first all-ones call of each
  input shape the mask producers run on that call's inputs (the producers alone), and their
  answers choose the copy. A site whose mask is still needed (a window longer than the
  example, a mask that ignores the attention_mask) keeps it. Copies are kept per set of
  answers, so every shape of an encoder shares one.

Calls that are padded, that run under torch.compile or CUDA-graph capture, or that a graph
without such sites serves, run the rewritten graph as before.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from attnopt.passes.evaluate import evaluate_subgraph, flat_inputs
from attnopt.passes.fx_utils import eliminate_dead_code, value_ancestors

#: the canonical op's argument positions (`passes.heads.site_args`)
MASK_ARG, IS_CAUSAL_ARG, WINDOW_ARG = 3, 4, 8
#: "0" turns the specialization off (every call runs the rewritten graph with its masks)
UNPADDED_ENV = "ATTNOPT_UNPADDED"


def unpadded_enabled() -> bool:
    return os.environ.get(UNPADDED_ENV, "1") != "0"


class UnpaddedGraphs:
    """The mask inputs of a rewritten graph, the sites they decide, and the graphs that calls
    with all-ones mask inputs run (made on demand by `make_runner`)."""

    def __init__(self, rewritten: GraphModule, inputs: list[int], sites: dict[str, Node],
                 make_runner):
        self.rewritten = rewritten
        self.inputs = inputs          # flat input positions of the mask inputs
        self.sites = sites            # canonical node name -> its mask node
        self._make_runner = make_runner
        self._answers: dict[tuple, tuple] = {}      # input shapes -> the sites' answers
        self._runners: dict[tuple, GraphModule] = {}  # answers -> runner

    @classmethod
    def of(cls, rewritten: GraphModule, args: tuple, kwargs: dict,
           make_runner) -> Optional["UnpaddedGraphs"]:
        """The specialization of `rewritten` (examples `args`, `kwargs`), or None where no site's
        mask depends on mask inputs alone. `make_runner(graph_module)` turns a specialized
        copy into what calls run."""
        from attnopt.passes.heads import site_args
        from attnopt.ops import ATTENTION_OP
        placeholders = [n for n in rewritten.graph.nodes if n.op == "placeholder"]
        examples = flat_inputs(rewritten, args, kwargs)
        mask_inputs = {node for node, value in zip(placeholders, examples)
                       if _is_mask_input(value)}
        sites = {}
        for node in rewritten.graph.nodes:
            if node.op != "call_function" or node.target is not ATTENTION_OP:
                continue
            call = site_args(node)
            mask = call[MASK_ARG]
            if not isinstance(mask, Node) or call[WINDOW_ARG] is not None:
                continue  # (a windowed call keeps its mask: `redundant_mask` does too)
            producers = value_ancestors([mask])
            sources = {n for n in producers if n.op == "placeholder"}
            if sources and sources <= mask_inputs and \
                    not _reads_trainable(rewritten, producers):
                sites[node.name] = mask
        if not sites:
            return None
        used = set().union(*(value_ancestors([m]) for m in sites.values()))
        inputs = [i for i, node in enumerate(placeholders) if node in mask_inputs and node in used]
        return cls(rewritten, inputs, sites, make_runner)

    def runner_for(self, args: tuple, kwargs: dict) -> Optional[GraphModule]:
        """The graph this call runs when its mask inputs are all ones, else None."""
        if torch.compiler.is_compiling():
            return None
        values = flat_inputs(self.rewritten, args, kwargs)
        masks = [values[i] for i in self.inputs]
        if not all(isinstance(m, torch.Tensor) and not m.is_floating_point() for m in masks):
            return None
        if any(m.is_cuda for m in masks) and torch.cuda.is_current_stream_capturing():
            return None  # (reading the inputs cannot synchronize there)
        if not all_ones(masks):
            return None
        shapes = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor)
                       else repr(v) for v in values)
        answers = self._answers.get(shapes)
        if answers is None:
            answers = self._answers[shapes] = self._evaluate(values)
        if all(answer is None for _, answer in answers):
            return None
        runner = self._runners.get(answers)
        if runner is None:
            runner = self._runners[answers] = self._make_runner(self.specialized(dict(answers)))
        return runner

    def _evaluate(self, values: list) -> tuple:
        """((site, the is_causal that stands for its mask, or None), ...) for these inputs:
        the mask producers run alone."""
        from attnopt.ops.attention import mask_redundancy
        from attnopt.passes.heads import site_args
        placeholders = [n.name for n in self.rewritten.graph.nodes if n.op == "placeholder"]
        names = list(self.sites)
        nodes = {n.name: n for n in self.rewritten.graph.nodes}
        with torch.no_grad():
            masks = evaluate_subgraph(self.rewritten, [self.sites[name] for name in names],
                                      dict(zip(placeholders, values)))
        answers = []
        for name, mask in zip(names, masks):
            is_causal = bool(site_args(nodes[name])[IS_CAUSAL_ARG])
            answers.append((name, mask_redundancy(mask, is_causal)
                            if isinstance(mask, torch.Tensor) else None))
        return tuple(answers)

    def specialized(self, answers: dict[str, Optional[bool]]) -> GraphModule:
        """A copy of the rewritten graph in which each site with an answer has no mask and that
        answer as `is_causal`, without the code only those masks needed."""
        graph = _copy_graph(self.rewritten)
        for node in graph.nodes:
            answer = answers.get(node.name)
            if answer is None:
                continue
            call = list(node.args)
            kwargs = dict(node.kwargs)
            for position, name, value in ((MASK_ARG, "attn_mask", None),
                                          (IS_CAUSAL_ARG, "is_causal", answer)):
                if position < len(call):
                    call[position] = value
                elif name in kwargs or value is not None:
                    kwargs[name] = value
            node.args, node.kwargs = tuple(call), kwargs
        specialized = GraphModule(self.rewritten, graph,
                                  class_name=type(self.rewritten).__name__)
        eliminate_dead_code(specialized)
        specialized.recompile()
        return specialized

    def describe(self) -> str:
        placeholders = [n.name for n in self.rewritten.graph.nodes if n.op == "placeholder"]
        names = ", ".join(placeholders[i] for i in self.inputs)
        verb = "is" if len(self.inputs) == 1 else "are"
        return (f"calls whose {names} {verb} all ones run a copy of the graph in which up to "
                f"{len(self.sites)} site(s) drop a mask that all ones make redundant, and the "
                f"code that builds it (checked once per input shape)")


def all_ones(masks: list[torch.Tensor]) -> bool:
    """Whether every element of these integer or boolean tensors is 1 (one synchronization)."""
    checks = [(m if m.dtype == torch.bool else m == 1).all() for m in masks]
    if len(checks) == 1:
        return bool(checks[0])
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())


def _is_mask_input(value) -> bool:
    """A boolean or integer input that holds only 0 and 1 (an attention_mask)."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or \
            value.is_complex() or value.numel() == 0:
        return False
    return value.dtype == torch.bool or bool(((value == 0) | (value == 1)).all())


def _reads_trainable(graph_module: GraphModule, nodes: set[Node]) -> bool:
    """Whether any of `nodes` reads a parameter that requires grad (a mask learned in
    training is no function of the inputs alone)."""
    for node in nodes:
        if node.op == "get_attr":
            value = graph_module
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return True
    return False


def _copy_graph(graph_module: GraphModule) -> torch.fx.Graph:
    return copy.deepcopy(graph_module.graph)  # (nodes copied, their meta shallow-copied)
