"""Cost of attention variants: analytic FLOPs, and latency calibrated on the running device.

`flop_ratio` estimates a rewritten site's arithmetic against exact attention from its shape
and the variant's parameters (reported per site). FLOPs do not predict time across variants
(memory traffic, kernel quality and launch overheads differ), so the length thresholds the
presets choose by come from `calibrate`, which times the variants on the device.
"""

from __future__ import annotations

from attnopt.site import AttentionSite


def _exact_flops(q_len: int, kv_len: int, dim: int, v_dim: int, causal: bool) -> float:
    flops = 2.0 * q_len * kv_len * (dim + v_dim)
    return flops / 2 if causal else flops


def _kernelized_flops(q_len, kv_len, dim, v_dim, features, causal, chunk, feature_dim_cost):
    flops = feature_dim_cost * (q_len + kv_len) * features * dim
    flops += 2.0 * kv_len * features * (v_dim + 1) + 2.0 * q_len * features * (v_dim + 1)
    if causal:  # the masked products inside each chunk
        flops += q_len * chunk * (features + v_dim + 1)
    return flops


def variant_flops(variant: str, params: dict, site: AttentionSite) -> float:
    """FLOPs of one (batch, head) of the site under `variant` (exact for anything else)."""
    q_len, kv_len = site.q_len, site.kv_len
    dim, v_dim, causal = site.head_dim, site.v_head_dim, site.causal
    if variant == "performer":
        return _kernelized_flops(q_len, kv_len, dim, v_dim, params["features"], causal,
                                 params["chunk"], 2.0)
    if variant == "linear":
        return _kernelized_flops(q_len, kv_len, dim, v_dim, dim, causal, params["chunk"], 0.0)
    if variant == "sparse":
        from attnopt.ops.sparsity import SparsePattern, pattern_layout
        from attnopt.passes.approximate import sparse_pattern_args
        pattern = SparsePattern(*sparse_pattern_args(params, site))
        layout = pattern_layout(pattern, q_len, kv_len, causal=causal)
        kept = float(layout.float().mean()) * kv_len
        flops = 2.0 * q_len * kept * (dim + v_dim)
        return flops / 2 if causal and pattern.has_blocks else flops
    if variant == "hybrid":
        block = params["block"]
        local = -(-params["window"] // block)
        width = min(kv_len, (local * (1 if causal else 2) + 1) * block)
        return _kernelized_flops(q_len, kv_len, dim, v_dim, params["features"], False, 0,
                                 2.0) + 2.0 * q_len * width * (dim + v_dim)
    if variant == "topk":
        blocks = params["top_k"] + 1 + 2 * params["local"]
        kept = min(kv_len, blocks * params["block"])
        selection = 2.0 * (q_len / params["block"]) * (kv_len / params["block"]) * dim
        return 2.0 * q_len * kept * (dim + v_dim) + selection
    return _exact_flops(q_len, kv_len, dim, v_dim, causal)


def flop_ratio(variant: str, params: dict, site: AttentionSite) -> float:
    exact = _exact_flops(site.q_len, site.kv_len, site.head_dim, site.v_head_dim, site.causal)
    return variant_flops(variant, params, site) / max(exact, 1.0)
