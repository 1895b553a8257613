"""Pass: replace each selected site's nodes with one call of `torch.ops.attnopt.attention`.

Inputs are the nodes detection found, viewed through their recipes (transpose of k, a lift of
(B·H, S, D) operands to 4-d, einsum permutations); the mask is built from its terms by the same
`build_mask` that classification evaluated. An input-independent mask that is empty is dropped
and one that is causal (equal q and kv lengths) becomes `is_causal=True`, one that is a sliding
window of W keys `is_causal=True, window_left=W-1`, and either of those carrying an ALiBi
bias (`masks.fit_alibi`) also `alibi_slopes`, a float32 (H,) buffer of the graph module
shared by the sites with the same slopes; a boolean mask that is causal (or a
window) by construction but depends on inputs (padding) is kept and the call marked
`is_causal=True` (and given `window_left`) as well: all apply (see `ops/attention.py`). The old
nodes are left without users and removed by the pass manager's dead-code elimination.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from attnopt.ops import ATTENTION_OP
from attnopt.passes.fx_utils import (
    aten, concrete, dtype_of, remove_assertions_on, same_dim, unique_attr,
)
from attnopt.passes.manager import PassContext, PassResult
from attnopt.passes.masks import build_mask
from attnopt.passes.patterns import SiteMatch, Step, TensorRecipe, step_call

#: node.meta key under which each canonical op node carries its AttentionSite.
SITE_META_KEY = "attnopt_site"


class CanonicalizeAttention:
    name = "canonicalize_attention"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        self._slopes: dict[tuple, Node] = {}  # one buffer per distinct slopes (layers share)
        for index, (match, site) in enumerate(zip(context.matches, context.sites)):
            rewrite, why, params = context.policy.choose(site)
            context.decisions[site.name] = (rewrite, why)
            context.rule_params[site.name] = params
            if rewrite == "none":
                continue
            emitter = _Emitter(graph_module.graph, match)
            with graph_module.graph.inserting_before(match.output):
                op_node = self._emit_canonical(graph_module, emitter, match,
                                               context.mask_infos[index], site)
                replacement = op_node
                for step in match.output_steps:
                    replacement = emitter.step(replacement, step)
                want = dtype_of(match.output)
                if want is not None and want != dtype_of(replacement):
                    replacement = emitter.emit(aten._to_copy.default, replacement, dtype=want)
            remove_assertions_on(graph_module.graph, match.internal)
            match.output.replace_all_uses_with(replacement)
            _erase_unused(graph_module.graph, match.internal)
            op_node.meta[SITE_META_KEY] = site
            context.site_nodes[site.name] = (match.output.name, replacement.name)
            changes.append(f"{site.name}: {match.form} → attnopt.attention")
        return PassResult(graph_module, bool(changes), changes)

    def _emit_canonical(self, graph_module: GraphModule, emitter: "_Emitter",
                        match: SiteMatch, info, site) -> Node:
        q, k, v = (emitter.recipe(r) for r in (match.q, match.k, match.v))
        is_causal, mask, window_left = match.is_causal, None, None
        equal_lengths = same_dim(match.q.shape[2], match.k.shape[2])
        if info.droppable:
            pass
        elif info.causal_only and (equal_lengths or match.is_causal):
            is_causal = True
        elif info.constant and info.kind == "window" and info.window_by_construction \
                and equal_lengths:  # every row sees its diagonal: a finite fill is exact too
            is_causal, window_left = True, info.window - 1
        else:
            dtype = dtype_of(match.q.node)
            mask = build_mask(match.mask_terms, [t.node for t in match.mask_terms], q, dtype,
                              emitter.emit)
            # a boolean mask causal by construction (a decoder's, with padding) keeps its
            # tensor and marks the call causal too: the kernel skips the blocks above the
            # diagonal rather than reading the mask there. Only boolean masks: a float mask
            # filled with a finite minimum averages a row with no allowed key over every key,
            # and the causal mark would change which keys those are
            marked = info.causal_by_construction and equal_lengths \
                and dtype_of(mask) == torch.bool
            is_causal = is_causal or marked
            if marked and info.window_by_construction:
                window_left = info.window - 1
        site.causal = site.causal or is_causal
        site.window_band = window_left is not None
        slopes = None
        if info.alibi_slopes is not None and mask is None:  # (the constant kinds above)
            slopes = self._slopes_node(graph_module, emitter, info.alibi_slopes,
                                       concrete(match.q.shape[1]), match.q.node)
        site.alibi = slopes is not None
        extra = (float(match.softcap) if match.softcap is not None else None, window_left,
                 slopes)
        while extra and extra[-1] is None:  # trailing defaults stay implicit
            extra = extra[:-1]
        return emitter.emit(ATTENTION_OP, q, k, v, mask, is_causal, float(match.scale),
                            bool(match.enable_gqa), *extra)

    def _slopes_node(self, graph_module: GraphModule, emitter: "_Emitter", slopes: tuple,
                     heads: int, like: Node) -> Node:
        """The get_attr node of a float32 (H,) buffer holding `slopes` (one slope for every
        head where the mask had no heads axis), on q's device; created once per graph."""
        if len(slopes) == 1:
            slopes = slopes * heads
        if slopes not in self._slopes:
            device = like.meta["val"].device
            tensor = torch.tensor(slopes, dtype=torch.float32, device=device)
            name = unique_attr(graph_module, "attnopt_alibi_slopes")
            graph_module.register_buffer(name, tensor)
            first = next(n for n in graph_module.graph.nodes if n.op != "placeholder")
            with graph_module.graph.inserting_before(first):
                node = graph_module.graph.get_attr(name)
            if emitter.fake_mode is not None:
                node.meta["val"] = emitter.fake_mode.from_tensor(tensor)
            self._slopes[slopes] = node
        return self._slopes[slopes]


def _erase_unused(graph: torch.fx.Graph, nodes: list[Node]) -> None:
    """Erase the site's old nodes now: dead-code elimination keeps nodes it deems impure, and
    SDPA and dropout carry the `nondeterministic_seeded` tag."""
    pending = set(nodes)
    while True:
        unused = [node for node in pending if not node.users]
        if not unused:
            return
        for node in unused:
            graph.erase_node(node)
        pending.difference_update(unused)


class _Emitter:
    """Creates nodes at the current insertion point, with fake values and module metadata."""

    def __init__(self, graph: torch.fx.Graph, match: SiteMatch):
        self.graph = graph
        self.stack = match.anchor.meta.get("nn_module_stack")
        self.fake_mode = detect_fake_mode(
            [n.meta.get("val") for n in (match.q.node, match.k.node, match.v.node)])

    def emit(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        if self.stack is not None:
            node.meta["nn_module_stack"] = dict(self.stack)
        if self.fake_mode is not None:
            fake = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
            with self.fake_mode:
                node.meta["val"] = target(*fake[0], **fake[1])
        return node

    def step(self, node: Node, step: Step) -> Node:
        target, args = step_call(step)
        return self.emit(target, node, *args)

    def recipe(self, recipe: TensorRecipe) -> Node:
        node = recipe.node
        for step in recipe.steps:
            node = self.step(node, step)
        return node
