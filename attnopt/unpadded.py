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
  answers choose the copy. A mask that is ALiBi on a causal mask (BLOOM, MPT and Falcon build
  theirs from the attention_mask) is replaced by its slopes (`causal_alibi`). A site whose
  mask is still needed (a window longer than the example, a mask that ignores the
  attention_mask) keeps it. Copies are kept per set of answers, so every shape of an encoder
  shares one.

Calls that are padded, that run under torch.compile or CUDA-graph capture, or that a graph
without such sites serves, run the rewritten graph as before.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from attnopt.passes.classify import is_mask_like, reads_trainable_parameter
from attnopt.passes.evaluate import evaluate_subgraph, flat_inputs
from attnopt.passes.fx_utils import (
    eliminate_dead_code, unique_attr, value_ancestors, value_sources,
)

#: the canonical op's argument positions (`passes.heads.site_args`)
MASK_ARG, IS_CAUSAL_ARG, WINDOW_ARG, ALIBI_ARG = 3, 4, 8, 9
#: the answer's tag for a mask that is ALiBi on a causal mask: (ALIBI, slopes)
ALIBI = "alibi"
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
        self.placeholders = [n.name for n in rewritten.graph.nodes if n.op == "placeholder"]
        self.inputs = inputs          # flat input positions of the mask inputs
        self.sites = sites            # canonical node name -> its mask node
        self._make_runner = make_runner
        self._answers: dict[tuple, tuple] = {}      # input shapes -> the sites' answers
        self._runners: dict[tuple, Optional[GraphModule]] = {}  # answers -> runner

    @classmethod
    def of(cls, rewritten: GraphModule, args: tuple, kwargs: dict,
           make_runner) -> Optional["UnpaddedGraphs"]:
        """The specialization of `rewritten` (examples `args`, `kwargs`), or None where no site's
        mask depends on mask inputs alone. `make_runner(graph_module)` turns a specialized
        copy into what calls run."""
        from attnopt.ops import ATTENTION_OP
        from attnopt.passes.heads import site_args
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
            sources = value_sources([mask])
            if sources and sources <= mask_inputs and \
                    not reads_trainable_parameter(rewritten, [mask]):
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
        shapes = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor)
                       else repr(v) for v in values)
        answers = self._answers.get(shapes)
        if answers is not None and all(answer is None for _, answer in answers):
            return None  # (no copy at this shape: the inputs need not be read)
        if not all_ones(masks):
            return None
        if answers is None:
            answers = self._answers[shapes] = self._guarded(self._evaluate, values) or ()
        if all(answer is None for _, answer in answers):
            return None
        if answers not in self._runners:  # (None kept where making it failed)
            self._runners[answers] = self._guarded(
                lambda: self._make_runner(self.specialized(dict(answers))))
        return self._runners[answers]

    @staticmethod
    def _guarded(function, *args):
        """`function(*args)`, or None with a warning where it fails: the call then runs the
        rewritten graph with its masks, as it would without this specialization."""
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001 - an optimization never fails a call
            warnings.warn(f"attnopt: the unpadded copy of a graph is off for these inputs "
                          f"({type(error).__name__}: {error}); the graph runs with its masks",
                          RuntimeWarning, stacklevel=3)
            return None

    def _evaluate(self, values: list) -> tuple:
        """((site, answer), ...) for these inputs, the mask producers run alone. An answer is
        the `is_causal` that stands for the site's mask, `(ALIBI, slopes)` where the mask is
        ALiBi on a causal mask, or None where the mask is needed."""
        from attnopt.ops.attention import mask_redundancy
        from attnopt.passes.heads import site_args
        names = list(self.sites)
        nodes = {n.name: n for n in self.rewritten.graph.nodes}
        with torch.no_grad():
            masks = evaluate_subgraph(self.rewritten, [self.sites[name] for name in names],
                                      dict(zip(self.placeholders, values)))
        answers = []
        for name, mask in zip(names, masks):
            answer = None
            if isinstance(mask, torch.Tensor):
                answer = mask_redundancy(mask, bool(site_args(nodes[name])[IS_CAUSAL_ARG]))
                if answer is None:
                    slopes = causal_alibi(mask)
                    answer = None if slopes is None else (ALIBI, slopes)
            answers.append((name, answer))
        return tuple(answers)

    def specialized(self, answers: dict) -> GraphModule:
        """A copy of the rewritten graph in which each site with an answer has no mask, and
        that answer as `is_causal` or, for `(ALIBI, slopes)`, causal attention with those
        ALiBi slopes; without the code only those masks needed."""
        from attnopt.passes.heads import site_args
        graph = copy.deepcopy(self.rewritten.graph)  # (nodes copied, meta shallow-copied)
        specialized = GraphModule(self.rewritten, graph,
                                  class_name=type(self.rewritten).__name__)
        first = next(n for n in graph.nodes if n.op != "placeholder")
        buffers: dict[tuple, Node] = {}
        for node in list(graph.nodes):
            answer = answers.get(node.name)
            if answer is None:
                continue
            call = site_args(node)
            call[MASK_ARG] = None
            if isinstance(answer, tuple):  # (ALIBI, slopes)
                heads = call[0].meta["val"].shape[1]
                slopes = answer[1] * heads if len(answer[1]) == 1 else answer[1]
                if slopes not in buffers:  # (one buffer per set of slopes: layers share it)
                    name = unique_attr(specialized, "attnopt_unpadded_alibi_slopes")
                    specialized.register_buffer(name, torch.tensor(
                        slopes, dtype=torch.float32, device=call[0].meta["val"].device))
                    with graph.inserting_before(first):
                        buffers[slopes] = graph.get_attr(name)
                call[ALIBI_ARG] = buffers[slopes]
                call[IS_CAUSAL_ARG] = True
            else:
                call[IS_CAUSAL_ARG] = answer
            while len(call) > len(node.args) and call[-1] is None:
                call.pop()  # (trailing defaults stay implicit)
            node.args, node.kwargs = tuple(call), {}
        eliminate_dead_code(specialized)
        specialized.recompile()
        return specialized

    def describe(self) -> str:
        names = ", ".join(self.placeholders[i] for i in self.inputs)
        verb = "is" if len(self.inputs) == 1 else "are"
        return (f"calls whose {names} {verb} all ones run a copy of the graph in which up to "
                f"{len(self.sites)} site(s) drop a mask that all ones make redundant (or ALiBi "
                f"on a causal mask: its slopes instead), and the code that builds it (checked "
                f"once per input shape)")


def all_ones(masks: list[torch.Tensor]) -> bool:
    """Whether every element of these integer or boolean tensors is 1 (one synchronization)."""
    checks = [(m if m.dtype == torch.bool else m == 1).all() for m in masks]
    if len(checks) == 1:
        return bool(checks[0])
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())


def causal_alibi(mask: torch.Tensor) -> Optional[tuple[float, ...]]:
    """Per-head slopes `s` where a float mask (B|1, H|1, S, S) shows exactly the keys up to
    each query, with `s[h] * j + c[.., h, i]` there: ALiBi on a causal mask as BLOOM, MPT and
    Falcon write it (the canonical op's `-s[h] * |i - j|` plus a constant per row, which
    softmax ignores; `masks.fit_alibi` accepts the same masks). Read on the mask's device,
    one synchronization; the slopes come from the last row (which sees every key) and must
    hold at every shown position to ALIBI_ULPS of the row's magnitude. None otherwise, or
    where every slope is 0."""
    from attnopt.passes.masks import ALIBI_ULPS, MASKED_THRESHOLD
    if mask.dtype == torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2] or \
            mask.shape[-1] < 2:
        return None
    length = mask.shape[-1]
    values = mask.float()
    first = values[:1]  # (the batch rows must all be the first's)
    shown = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    slopes = (first[0, :, -1, -1] - first[0, :, -1, 0]) / (length - 1)  # (H,)
    keys = torch.arange(length, device=mask.device, dtype=torch.float32)
    expected = first[..., :, :1] + slopes[:, None, None] * keys  # c[h, i] + s[h] * j
    magnitude = first.abs().masked_fill(~shown, 0.0).amax(-1, keepdim=True).clamp(min=1.0)
    tolerance = ALIBI_ULPS * torch.finfo(torch.float32).eps * magnitude
    fits = torch.where(shown, (first - expected).abs() <= tolerance, True).all()
    checks = torch.stack([fits, ((values > MASKED_THRESHOLD) == shown).all(),
                          (values == first).all()])
    result = torch.cat([checks.all().reshape(1).float(), slopes]).tolist()  # (one sync)
    if not result[0] or not any(result[1:]):
        return None
    return tuple(result[1:])


def _is_mask_input(value) -> bool:
    """A boolean or integer input that holds only 0 and 1 (an attention_mask)."""
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and \
        is_mask_like(value)
