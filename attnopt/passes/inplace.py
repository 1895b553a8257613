"""Pass: in-place arithmetic on a fresh intermediate becomes the out-of-place op.

`torch.export` keeps a model's in-place ops (`scores *= scale` is `aten.mul_`). Falcon's eager
ALiBi path scales its scores that way, between the score product and softmax, where detection
reads values, not mutations. `x.mul_(s)` equals `x.mul(s)` whenever nothing else can observe
`x`: `x` is computed in the graph by an op that returns a new tensor (not an input, parameter,
buffer or view of one) and the in-place op is its only user. Those are rewritten; any other
in-place op is left as it is. Mutating ops are impure to dead-code elimination, so without
this a replaced site's score chain would also keep running.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from attnopt.passes.fx_utils import aten, real_users
from attnopt.passes.manager import PassContext, PassResult

#: in-place op → its out-of-place twin (same arguments)
OUT_OF_PLACE = {
    aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
    aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar,
    aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar,
    aten.sub_.Tensor: aten.sub.Tensor, aten.sub_.Scalar: aten.sub.Scalar,
}


def _fresh(node) -> bool:
    """`node` is a tensor the graph computed into new storage: an op with a schema whose
    result aliases none of its inputs."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or len(schema.returns) != 1:
        return False
    return schema.returns[0].alias_info is None


def functionalize_arithmetic(graph_module: GraphModule) -> list[str]:
    """Rewrite the in-place arithmetic nothing else observes; one line per rewritten op."""
    changes = []
    graph = graph_module.graph
    for node in list(graph.nodes):
        twin = OUT_OF_PLACE.get(node.target) if node.op == "call_function" else None
        if twin is None:
            continue
        target = node.args[0]
        if not _fresh(target) or real_users(target) != [node]:
            continue
        with graph.inserting_before(node):
            functional = graph.call_function(twin, node.args, node.kwargs)
        functional.meta = dict(node.meta)
        node.replace_all_uses_with(functional)
        graph.erase_node(node)
        changes.append(f"{node.name}: {node.target} → {twin}")
    if changes:
        graph_module.recompile()
    return changes


class FunctionalizeArithmetic:
    name = "functionalize_arithmetic"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = functionalize_arithmetic(graph_module)
        return PassResult(graph_module, bool(changes), changes)
