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
