"""Pass: choose the backend each canonical attention site runs on, and say why (approximate
sites too: the flash kernel's block-sparse path, the fused FAVOR+ kernels, or torch).

The canonical op dispatches by device: on CUDA it runs the generated Triton flash kernel when
`kernel_skip_reason` finds nothing against the call (what the kernel cannot run: dtype, head
dims, operand ranks, a mask that needs a gradient, Triton missing; and, in the default "auto"
mode, calls PyTorch's fused SDPA runs faster), else SDPA; on other devices SDPA. This pass asks
the same question of each site's traced (fake) operands, so the report states what will run and
the reason for every fallback, before anything runs. It does not change the graph.
"""

from __future__ import annotations

from torch.fx import GraphModule

from attnopt.ops import APPROXIMATE_OPS, ATTENTION_OP
from attnopt.ops.attention import FALLBACK_BACKEND, KERNEL_BACKEND, kernel_skip_reason
from attnopt.passes.canonicalize import SITE_META_KEY
from attnopt.passes.heads import site_args
from attnopt.passes.manager import PassContext, PassResult


class SelectBackends:
    name = "select_backends"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        variants = {op: name for name, op in APPROXIMATE_OPS.items()}
        for node in graph_module.graph.nodes:
            site = node.meta.get(SITE_META_KEY)
            if site is None or (node.target is not ATTENTION_OP and node.target not in variants):
                continue
            if node.target in variants:
                context.backends[site.name] = approximate_backend(variants[node.target], node)
                changes.append(f"{site.name}: {context.backends[site.name][0]}")
                continue
            args = site_args(node)
            q, k, v, mask = (arg.meta.get("val") if arg is not None else None
                             for arg in args[:4])
            softcap, is_causal, window_left = args[7], bool(args[4]), args[8]
            alibi = args[9] is not None
            if q is None or k is None or v is None:
                reason = "operands carry no traced values"
            else:
                reason = kernel_skip_reason(q, k, v, mask, softcap, is_causal=is_causal,
                                            window_left=window_left, alibi=alibi)
            if reason is None:
                band = f", sliding-window band of {window_left + 1} keys" \
                    if window_left is not None else ""
                band += ", ALiBi from slopes" if alibi else ""
                context.backends[site.name] = (KERNEL_BACKEND,
                                               f"generated Triton flash kernel{band}")
            else:
                context.backends[site.name] = (FALLBACK_BACKEND, reason)
            changes.append(f"{site.name}: {context.backends[site.name][0]}")
        return PassResult(graph_module, False, changes)


def approximate_backend(variant: str, node) -> tuple[str, str]:
    """(backend, why) of an approximate op node, from its traced operands."""
    args = [a.meta.get("val") if hasattr(a, "meta") else a for a in node.args]
    q, k, v = args[:3]
    if q is None or getattr(q, "device", None) is None or q.device.type != "cuda":
        return "torch", "the op's torch reference (CPU)"
    if variant in ("sparse", "topk"):
        reason = kernel_skip_reason(q, k, v, args[3], sdpa_alternative=False)
        return (KERNEL_BACKEND, "flash kernel, block-sparse path") if reason is None \
            else ("torch", reason)
    if variant == "hybrid":
        reason = kernel_skip_reason(q, k, v, args[4], sdpa_alternative=False)
        return (KERNEL_BACKEND, "flash kernel for the window (with its log-sum-exp), torch "
                                "for the FAVOR+ complement") if reason is None \
            else ("torch", reason)
    if variant == "int8_qk":
        reason = kernel_skip_reason(q, k, v, args[3], args[7] if len(args) > 7 else None,
                                    window_left=args[8] if len(args) > 8 else None,
                                    alibi=len(args) > 9 and args[9] is not None,
                                    sdpa_alternative=False)
        return (KERNEL_BACKEND, "flash kernel, int8 Q·Kᵀ") if reason is None \
            else ("torch", reason)
    if variant == "performer":
        try:
            from attnopt.kernels.favor import favor_skip_reason
        except ImportError:
            return "torch", "Triton is not installed"
        mask = args[4]
        keep = None if mask is None else mask.new_empty((mask.shape[0], 1, k.shape[-2], 1))
        reason = favor_skip_reason(q, k, v, keep, bool(args[5]), args[8])
        return (KERNEL_BACKEND, "fused FAVOR+ kernels") if reason is None else ("torch", reason)
    return "torch", f"{variant} has no fused kernel yet; its torch form runs on CUDA"
