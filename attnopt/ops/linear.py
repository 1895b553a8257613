"""`torch.ops.attnopt.linear_attention`: linear attention with φ(x) = elu(x) + 1.

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)        (Katharopoulos et al., 2020)

A different attention than softmax (no scale, no estimator): the cheapest O(n) form, for the
"edge" preset and sites where the guard measures it close enough. Causal in chunked
prefix-sum (RNN) form; masks as for `attnopt.performer` (only key visibility is honoured);
GQA by sharing kv states. Reference, fake, autograd, ONNX in this module; on CUDA the fused
kernels of `attnopt.kernels.linear` (φ never materialized), the reference where they do not
apply.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, onnx_dim, onnx_scalar,
    register_recompute_autograd,
)
from attnopt.ops.features import (
    elu_features, kernelized_attention, keep_for_kv_heads, onnx_kernelized, onnx_visible_keys,
    visible_keys_mask,
)
from attnopt.ops.performer import MIN_DENOMINATOR


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                               attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                               enable_gqa: bool = False, chunk: int = 64) -> Tensor:
    keep = keep_for_kv_heads(visible_keys_mask(attn_mask, k.shape[-2]), k.shape[1])
    numerator, denominator = kernelized_attention(elu_features(q), elu_features(k, keep), v,
                                                  causal=is_causal, chunk=chunk)
    return (numerator / denominator.clamp_min(MIN_DENOMINATOR)).to(q.dtype)


@torch.library.custom_op("attnopt::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False, enable_gqa: bool = False,
                     chunk: int = 64) -> Tensor:
    return like_query_layout(linear_attention_reference(q, k, v, attn_mask, is_causal,
                                                        enable_gqa, chunk), q)


@linear_attention.register_kernel("cuda")
def _linear_attention_cuda(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False,
                           chunk=64):
    """The fused kernels (attnopt.kernels.linear) where they apply; else the reference."""
    try:
        from attnopt.kernels.linear import linear_attention_fused, linear_skip_reason
    except ImportError:  # no Triton
        return like_query_layout(linear_attention_reference(q, k, v, attn_mask, is_causal,
                                                            enable_gqa, chunk), q)
    keep = keep_for_kv_heads(visible_keys_mask(attn_mask, k.shape[-2]), k.shape[1])
    if linear_skip_reason(q, k, v, keep, is_causal) is not None:
        return like_query_layout(linear_attention_reference(q, k, v, attn_mask, is_causal,
                                                            enable_gqa, chunk), q)
    return like_query_layout(linear_attention_fused(q, k, v, is_causal, keep,
                                                    MIN_DENOMINATOR), q)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False,
                           chunk=64):
    return empty_like_query_layout(q, v.shape[-1])


register_recompute_autograd(linear_attention, linear_attention_reference)


def onnx_linear_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False,
                          chunk=64):
    from onnxscript import opset18 as op

    def phi(x):
        return op.Add(op.Elu(op.Cast(x, to=1)), onnx_scalar(op, 1.0, op.Cast(x, to=1)))
    phi_q, phi_k = phi(q), phi(k)
    if attn_mask is not None:
        phi_k = op.Mul(phi_k, onnx_visible_keys(op, attn_mask, k.shape[1]))
    numerator, denominator = onnx_kernelized(op, phi_q, phi_k, v, onnx_dim(op, q, 1),
                                             causal=bool(is_causal), chunk=chunk)
    floor = op.CastLike(op.Constant(value_float=MIN_DENOMINATOR), denominator)
    return op.CastLike(op.Div(numerator, op.Max(denominator, floor)), q)
