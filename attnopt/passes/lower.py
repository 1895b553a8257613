"""Pass: choose the backend each canonical attention site runs on, and say why.

The canonical op dispatches by device: on CUDA it runs the generated Triton flash kernel when
`kernel_skip_reason` finds nothing against the call (what the kernel cannot run: dtype, head
dims, operand ranks, a mask that needs a gradient, Triton missing; and, in the default "auto"
mode, calls PyTorch's fused SDPA runs faster), else SDPA; on other devices SDPA. This pass asks
the same question of each site's traced (fake) operands, so the report states what will run and
the reason for every fallback, before anything runs. It does not change the graph.
"""

from __future__ import annotations

from torch.fx import GraphModule

from attnopt.ops import ATTENTION_OP
from attnopt.ops.attention import FALLBACK_BACKEND, KERNEL_BACKEND, kernel_skip_reason
from attnopt.passes.canonicalize import SITE_META_KEY
from attnopt.passes.manager import PassContext, PassResult


class SelectBackends:
    name = "select_backends"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        for node in graph_module.graph.nodes:
            site = node.meta.get(SITE_META_KEY)
            if node.target is not ATTENTION_OP or site is None:
                continue
            q, k, v, mask = (arg.meta.get("val") if arg is not None else None
                             for arg in (list(node.args) + [None] * 4)[:4])
            softcap = node.args[7] if len(node.args) > 7 else node.kwargs.get("softcap")
            if q is None or k is None or v is None:
                reason = "operands carry no traced values"
            else:
                reason = kernel_skip_reason(q, k, v, mask, softcap)
            if reason is None:
                context.backends[site.name] = (KERNEL_BACKEND, "generated Triton flash kernel")
            else:
                context.backends[site.name] = (FALLBACK_BACKEND, reason)
            changes.append(f"{site.name}: {context.backends[site.name][0]}")
        return PassResult(graph_module, False, changes)
