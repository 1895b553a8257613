"""Pass: dead-code elimination, so unused attention weights (e.g. the averaged weights of
`nn.MultiheadAttention(need_weights=True)` that the caller drops) do not count as uses.

fx's own `eliminate_dead_code` keeps `_assert_tensor_metadata` nodes (they are impure), and they
keep their subjects alive: after canonicalization a Hugging Face mask producer, no longer read
by anything, would still run (and allocate an Sq×Sk mask) on every call. Metadata assertions are
dropped here; what they assert (dtype, device of an intermediate) no rewrite changes.
"""

from __future__ import annotations

from torch.fx import GraphModule

from attnopt.passes.fx_utils import eliminate_dead_code
from attnopt.passes.manager import PassContext, PassResult


class EliminateDeadCode:
    name = "eliminate_dead_code"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        removed = eliminate_dead_code(graph_module)
        return PassResult(graph_module, removed > 0, [f"{removed} dead node(s) removed"]
                          if removed else [])


class DropReplacedParameters:
    """Remove the parameters the weight rewrites replaced once nothing in the graph reads them,
    so the rewritten module (and what is exported from it) holds only the new, smaller ones.
    The user's model keeps its own parameters."""

    name = "drop_replaced_parameters"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        read = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
        dropped = []
        for target in sorted(context.replaced_parameters - read):
            owner_path, _, leaf = target.rpartition(".")
            owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
            if leaf in owner._parameters or leaf in owner._buffers:
                delattr(owner, leaf)
                dropped.append(target)
        graph_module.__dict__.pop("_attnopt_state_pairs", None)
        return PassResult(graph_module, False, [f"dropped {', '.join(dropped)}"]
                          if dropped else [])
