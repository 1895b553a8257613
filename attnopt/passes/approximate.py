"""Pass: rewrite canonical attention sites into the approximate op the policy chose.

Runs after canonicalization. For each `attnopt.attention` node whose site the policy sent to an
approximate rewrite (and that the guard has not rolled back), it checks the site can take the
variant (`skip_reason`), fills in the variant's parameters (`variant_params`: the rule's params
over the variant's defaults; random seeds derived from the site name, so a rewrite is
reproducible), and replaces the node with the variant's op. Performer features Ω are drawn
here and stored on the graph module as a buffer, so every run — and the exported ONNX — uses the
same matrix. It also measures the exact attention's row entropy on the examples (peaked rows
are where random features fail), for the report.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from attnopt.ops import APPROXIMATE_OPS, ATTENTION_OP
from attnopt.ops.features import draw_projection
from attnopt.passes.canonicalize import SITE_META_KEY
from attnopt.passes.evaluate import evaluate_subgraph, placeholder_values
from attnopt.passes.fx_utils import unique_attr
from attnopt.passes.heads import site_args
from attnopt.passes.manager import PassContext, PassResult
from attnopt.policy import VARIANT_DEFAULTS
from attnopt.site import AttentionSite

#: Mask kinds kernelized variants can honour (key visibility; causal via is_causal).
KEY_MASK_KINDS = ("none", "causal", "padding", "causal+padding")
#: Query rows sampled per site for the entropy measurement.
ENTROPY_ROWS = 256


def variant_params(rewrite: str, params: dict, site: AttentionSite) -> dict:
    """The rule's params over the variant's defaults; a seed derived from the site name."""
    resolved = {**VARIANT_DEFAULTS[rewrite], **params}
    if "seed" in resolved and resolved["seed"] is None:
        resolved["seed"] = zlib.crc32(site.name.encode()) & 0x7FFFFFFF
    return resolved


def skip_reason(rewrite: str, site: AttentionSite, params: dict) -> Optional[str]:
    """Why a site cannot take this variant (None: it can)."""
    if rewrite == "int8_qk":
        return None  # every exact site: the scores are only rounded
    if site.window_band:
        return (f"its sliding window of {site.window} keys already runs as a band: the exact "
                "kernel reads only the keys inside it")
    if site.softcap is not None:
        return "soft-capped scores have no approximate variant"
    if site.alibi:
        return "ALiBi's distance bias has no approximate variant (the exact kernel computes it)"
    if rewrite in ("performer", "linear", "hybrid"):
        if site.mask_kind not in KEY_MASK_KINDS:
            return (f"{rewrite} honours key padding and causality only; this site's mask is "
                    f"{site.mask_kind}")
        if site.causal and site.q_len != site.kv_len:
            return f"causal {rewrite} needs as many keys as queries (a KV cache is not)"
    if rewrite == "hybrid" and params.get("features", 1) < 1:
        return "hybrid needs at least one random feature"
    if rewrite in ("sparse", "topk", "hybrid"):
        block = params.get("block", 64)
        if block < 16 or block & (block - 1):
            return f"block {block} is not a power of two >= 16"
    return None


def sparse_pattern_args(params: dict, site: AttentionSite) -> list:
    """The sparse op's pattern arguments (block .. window_right) for a named pattern."""
    from attnopt.ops.sparsity import SparsePattern
    block, local = params["block"], params["local"]
    name = params["pattern"]
    if name == "window":
        width = params["window"] if params["window"] is not None else block
        pattern = SparsePattern.sliding_window(width, 0 if site.causal else width, block)
    elif name == "longformer":
        pattern = SparsePattern.longformer(local, params["global_blocks"], block)
    elif name == "bigbird":
        pattern = SparsePattern.bigbird(local, params["global_blocks"],
                                        params["random_blocks"] or 1, params["seed"], block)
    elif name == "dilated":
        pattern = SparsePattern.dilated(local, max(params["dilation"], 2), block)
    elif name == "strided":
        pattern = SparsePattern.strided(params["stride"] or 4, block)
    elif name == "random":
        pattern = SparsePattern(block=block, local_left=0, local_right=0,
                                random_blocks=params["random_blocks"] or 2,
                                seed=params["seed"])
    else:
        from attnopt.errors import PolicyError
        raise PolicyError(f"unknown sparse pattern {name!r}; valid: window, longformer, "
                          "bigbird, dilated, strided, random")
    return list(pattern.to_dict().values())


class ApproximateAttention:
    name = "approximate_attention"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        changes = []
        pending = []
        for node in list(graph_module.graph.nodes):
            site = node.meta.get(SITE_META_KEY)
            if node.target is not ATTENTION_OP or site is None:
                continue
            rewrite, why = context.decisions.get(site.name, ("exact", ""))
            if rewrite not in APPROXIMATE_OPS:
                continue
            why_exact = context.rolled_back(site.name, "attention")
            if why_exact:
                context.decisions[site.name] = ("exact", why_exact)
                continue
            params = variant_params(rewrite, context.rule_params.get(site.name, {}), site)
            reason = skip_reason(rewrite, site, params)
            if reason is not None:
                context.decisions[site.name] = ("exact", f"{why}; {rewrite} not applicable: "
                                                         f"{reason}")
                continue
            pending.append((node, site, rewrite, params))
        entropies = self._entropies(graph_module, context, [p[0] for p in pending])
        for node, site, rewrite, params in pending:
            new = self._emit(graph_module, node, site, rewrite, params)
            new.meta[SITE_META_KEY] = site
            node.replace_all_uses_with(new)
            graph_module.graph.erase_node(node)
            if site.name not in context.measured_after_projection:
                old_name, _ = context.site_nodes[site.name]
                context.site_nodes[site.name] = (old_name, new.name)
            context.approximations.setdefault(site.name, {}).update(
                variant=rewrite, params={k: v for k, v in params.items()},
                entropy=entropies.get(node.name))
            changes.append(f"{site.name}: attnopt.attention → {rewrite}")
        return PassResult(graph_module, bool(changes), changes)

    def _emit(self, graph_module: GraphModule, node: Node, site: AttentionSite, rewrite: str,
              params: dict) -> Node:
        q, k, v, mask = (list(node.args) + [None] * 4)[:4]
        scale = node.args[5] if len(node.args) > 5 else node.kwargs.get("scale")
        enable_gqa = bool(node.args[6]) if len(node.args) > 6 else False
        causal = bool(site.causal)
        graph = graph_module.graph
        with graph.inserting_before(node):
            if rewrite in ("performer", "hybrid"):
                projection = draw_projection(params["features"], site.head_dim, params["seed"])
                buffer = unique_attr(graph_module, f"attnopt_projection_{site.name}")
                graph_module.register_buffer(buffer, projection)
                proj_node = graph.get_attr(buffer)
                proj_node.meta["val"] = _fake_like(node, projection)
            if rewrite == "performer":
                args = (q, k, v, proj_node, mask, causal, scale, enable_gqa, params["kernel"],
                        params["chunk"])
            elif rewrite == "linear":
                args = (q, k, v, mask, causal, enable_gqa, params["chunk"])
            elif rewrite == "sparse":
                args = (q, k, v, mask, causal, scale, enable_gqa,
                        *sparse_pattern_args(params, site))
            elif rewrite == "hybrid":
                args = (q, k, v, proj_node, mask, causal, scale, enable_gqa, params["window"],
                        params["block"])
            elif rewrite == "topk":
                args = (q, k, v, mask, causal, scale, enable_gqa, params["block"],
                        params["top_k"], params["local"])
            kwargs = {}
            if rewrite == "int8_qk":  # the same signature: the canonical call's own arguments
                args, kwargs = tuple(node.args), dict(node.kwargs)
            new = graph.call_function(APPROXIMATE_OPS[rewrite], args, kwargs)
        new.meta.update({key: node.meta[key] for key in ("val", "nn_module_stack")
                         if key in node.meta})
        return new

    def _entropies(self, graph_module: GraphModule, context: PassContext,
                   nodes: list[Node]) -> dict[str, float]:
        """Mean normalized entropy (0 peaked … 1 uniform) of the exact attention rows; from
        `context.entropy_cache` where an earlier guard round measured the same site under the
        same weight rewrites (the q and k it reads are then the same)."""
        if not nodes:
            return {}
        cache = context.entropy_cache
        weights = repr(sorted((site, sorted(entry.get("weights", {}).items()))
                              for site, entry in context.approximations.items()))
        keys = {n.name: (n.meta[SITE_META_KEY].name, weights) for n in nodes}
        if cache is not None and all(key in cache for key in keys.values()):
            return {name: cache[key] for name, key in keys.items() if cache[key] is not None}
        result = self._measure_entropies(graph_module, context, nodes)
        if cache is not None:
            cache.update({key: result.get(name) for name, key in keys.items()})
        return result

    def _measure_entropies(self, graph_module: GraphModule, context: PassContext,
                           nodes: list[Node]) -> dict[str, float]:
        wanted = [a for n in nodes for a in (n.args[0], n.args[1], n.args[3])
                  if isinstance(a, Node)]
        try:
            inputs = placeholder_values(graph_module, context.args, context.kwargs)
            values = dict(zip([a.name for a in wanted],
                              evaluate_subgraph(graph_module, wanted, inputs)))
        except Exception:  # noqa: BLE001 - entropy is a diagnostic; never fail the rewrite
            return {}
        result = {}
        for node in nodes:
            q, k = values.get(node.args[0].name), values.get(node.args[1].name)
            mask_node = node.args[3] if len(node.args) > 3 else None
            mask = values.get(mask_node.name) if isinstance(mask_node, Node) else None
            site = node.meta[SITE_META_KEY]
            if q is None or k is None:
                continue
            args = site_args(node)
            result[node.name] = attention_entropy(q, k, mask, site.causal, args[5], args[8])
        return result


def attention_entropy(q, k, mask, causal: bool, scale, window_left=None) -> float:
    """Mean over sampled query rows of H(row) / log(#visible keys)."""
    with torch.no_grad():
        q, k = q.detach().float(), k.detach().float()
        if k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        rows = torch.linspace(0, q.shape[-2] - 1, min(ENTROPY_ROWS, q.shape[-2])).long()
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        scores = (q[..., rows, :] @ k.transpose(-1, -2)) * scale
        keep = torch.ones_like(scores, dtype=torch.bool)
        if causal:
            keep &= torch.arange(k.shape[-2])[None, :] <= rows[:, None]
        if window_left is not None:
            keep &= torch.arange(k.shape[-2])[None, :] >= rows[:, None] - window_left
        if mask is not None:
            rows_mask = mask[..., rows, :] if mask.dim() >= 2 and mask.shape[-2] > 1 else mask
            keep &= rows_mask if rows_mask.dtype == torch.bool else rows_mask > -1.0e4
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        visible = keep.sum(-1).clamp_min(2).float()
        return float((entropy / visible.log()).mean())


def _fake_like(node: Node, tensor: torch.Tensor):
    val = node.meta.get("val")
    fake_mode = getattr(val, "fake_mode", None)
    if fake_mode is None:
        return tensor
    return fake_mode.from_tensor(tensor)
