"""Pass: dead-code elimination, so unused attention weights (e.g. the averaged weights of
`nn.MultiheadAttention(need_weights=True)` that the caller drops) do not count as uses."""

from __future__ import annotations

from torch.fx import GraphModule

from attnopt.passes.fx_utils import aten
from attnopt.passes.manager import PassContext, PassResult

METADATA_ASSERTION = aten._assert_tensor_metadata.default


def eliminate_dead_code(graph_module: GraphModule) -> int:
    """Remove unused pure nodes, and assertions whose subject is otherwise unused."""
    graph = graph_module.graph
    before = len(graph.nodes)
    changed = True
    while changed:
        changed = graph.eliminate_dead_code()
        for node in reversed(list(graph.nodes)):
            subject = node.args[0] if node.target is METADATA_ASSERTION and node.args else None
            if subject is not None and all(u.target is METADATA_ASSERTION
                                           for u in subject.users):
                graph.erase_node(node)
                changed = True
    return before - len(graph.nodes)


class EliminateDeadCode:
    name = "eliminate_dead_code"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        removed = eliminate_dead_code(graph_module)
        return PassResult(graph_module, removed > 0, [f"{removed} dead node(s) removed"]
                          if removed else [])
