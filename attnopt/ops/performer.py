"""`torch.ops.attnopt.performer`: FAVOR+ random-feature attention (Choromanski et al.).

    out = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)        (features: attnopt.ops.features)

- `projection` (m, D): the random matrix Ω, drawn by `features.draw_projection` from a seed the
  rewrite stores with the site; it lives in the graph as a constant, so PyTorch and ONNX compute
  with the same features.
- `kernel`: "softmax" (positive features estimating exp(s·q·k), with the max-subtraction
  stabilizer) or "relu" (Performer's ReLU kernel, a different attention — not an estimator).
- `is_causal`: key j counts for query i when j <= i (equal lengths), in chunked prefix-sum form:
  O(n) memory, never an n×n matrix. `chunk` sets the chunk length.
- `attn_mask` (SDPA-style): only which keys are visible to any query is honoured — masked
  (padding) keys contribute nothing.
- GQA: k and v may have fewer heads (`enable_gqa`); their (m × Dv) states are shared by the
  query heads of a group.

The op owns its reference (plain torch), its CUDA implementation (softmax-kernel calls,
causal or not, on the fused FAVOR+ kernels of `attnopt.kernels.favor`, which never materialize the
(n × m) feature matrices; the rest on the reference), fake, autograd (recomputation through
the reference) and ONNX translation (standard opset-18 ops).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, onnx_dim, register_recompute_autograd,
)
from attnopt.ops.features import (
    FEATURE_EPS, KERNELS, favor_features, kernelized_attention, keep_for_kv_heads,
    onnx_favor_features, onnx_kernelized, onnx_visible_keys, relu_features,
    visible_keys_mask,
)

#: Denominators below this (all features underflowed) are clamped: the row's output is ~0.
MIN_DENOMINATOR = 1.0e-30


def performer_reference(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                        attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                        scale: Optional[float] = None, enable_gqa: bool = False,
                        kernel: str = "softmax", chunk: int = 64) -> Tensor:
    if kernel not in KERNELS:
        raise ValueError(f"performer kernel must be one of {KERNELS}, got {kernel!r}")
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    keep = keep_for_kv_heads(visible_keys_mask(attn_mask, k.shape[-2]), k.shape[1])
    if kernel == "softmax":
        phi_q, _ = favor_features(q, projection, scale, is_query=True)
        phi_k, _ = favor_features(k, projection, scale, is_query=False, keep_BHS1=keep)
    else:
        phi_q = relu_features(q, projection, scale)
        phi_k = relu_features(k, projection, scale, keep_BHS1=keep)
    numerator, denominator = kernelized_attention(phi_q, phi_k, v, causal=is_causal,
                                                  chunk=chunk)
    return (numerator / denominator.clamp_min(MIN_DENOMINATOR)).to(q.dtype)


@torch.library.custom_op("attnopt::performer", mutates_args=())
def performer(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
              attn_mask: Optional[Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False,
              kernel: str = "softmax", chunk: int = 64) -> Tensor:
    return like_query_layout(performer_reference(q, k, v, projection, attn_mask, is_causal,
                                                 scale, enable_gqa, kernel, chunk), q)


@performer.register_kernel("cuda")
def _performer_cuda(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                    enable_gqa=False, kernel="softmax", chunk=64):
    """Softmax-kernel calls run the fused FAVOR+ kernels (attnopt.kernels.favor), causal or
    not; the rest, and machines without Triton, the torch reference."""
    try:
        from attnopt.kernels.favor import favor_attention, favor_causal_attention, \
            favor_skip_reason
    except ImportError:
        favor_attention = favor_skip_reason = None
    keep = keep_for_kv_heads(visible_keys_mask(attn_mask, k.shape[-2]), k.shape[1])
    if favor_attention is None or \
            favor_skip_reason(q, k, v, keep, is_causal, kernel) is not None:
        return like_query_layout(performer_reference(q, k, v, projection, attn_mask, is_causal,
                                                     scale, enable_gqa, kernel, chunk), q)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    fused = favor_causal_attention if is_causal else favor_attention
    return like_query_layout(fused(q, k, v, projection, scale, keep), q)


@performer.register_fake
def _performer_fake(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                    enable_gqa=False, kernel="softmax", chunk=64):
    return empty_like_query_layout(q, v.shape[-1])


register_recompute_autograd(performer, performer_reference)


def onnx_performer(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                   enable_gqa=False, kernel="softmax", chunk=64):
    """Standard opset-18 ops; the causal form in chunks (per-chunk states and their prefix
    sums, plus each chunk's own lower triangle)."""
    from onnxscript import opset18 as op
    if scale is None:
        scale = q.shape[3] ** -0.5
    kv_heads = k.shape[1]
    keep = onnx_visible_keys(op, attn_mask, kv_heads) if attn_mask is not None else None
    qf, kf = op.Cast(q, to=1), op.Cast(k, to=1)  # float32, as compute_dtype for half inputs
    if kernel == "softmax":
        phi_q, _ = onnx_favor_features(op, qf, projection, scale, is_query=True)
        phi_k, _ = onnx_favor_features(op, kf, projection, scale, is_query=False, keep=keep)
    else:
        from attnopt.ops.common import onnx_scalar
        import math

        def relu_phi(x):
            x = op.Mul(x, onnx_scalar(op, math.sqrt(scale), x))
            phi = op.Relu(op.MatMul(x, op.Transpose(op.CastLike(projection, x), perm=[1, 0])))
            return op.Add(op.Mul(phi, onnx_scalar(op, projection.shape[0] ** -0.5, x)),
                          onnx_scalar(op, FEATURE_EPS, x))
        phi_q, phi_k = relu_phi(qf), relu_phi(kf)
        if keep is not None:
            phi_k = op.Mul(phi_k, keep)
    numerator, denominator = onnx_kernelized(op, phi_q, phi_k, v, onnx_dim(op, q, 1),
                                             causal=bool(is_causal), chunk=chunk)
    floor = op.CastLike(op.Constant(value_float=MIN_DENOMINATOR), denominator)
    return op.CastLike(op.Div(numerator, op.Max(denominator, floor)), q)


