"""`torch.ops.attnopt.int8_qk_attention`: attention whose Q·Kᵀ runs on int8 operands, the
recipe of SageAttention (Zhang et al., 2024):

1. **K smoothing.** The mean key over the sequence (per batch, kv head and channel) is
   subtracted. Every score of a query row shifts by the same q·μ, which softmax cancels
   exactly, and the offset keys share no longer spends the 8-bit range. (Not with soft-capped
   scores: tanh does not commute with the shift, so those keys are quantized as they are.)
2. **Per-block int8.** Q in blocks of `Q_QUANT_BLOCK` rows and K in blocks of `K_QUANT_BLOCK`
   keys, each with one scale max|x| / 127; x_int8 = ⌊x / scale + ½⌋ (IEEE divisions, so the
   torch reference and the Triton quantizer of `kernels/quantize.py` agree bit for bit).
3. **Scores** = (Q_int8 · K_int8ᵀ) · s_q · s_k, summed in int32 — exact integers; the softmax,
   masks, causality, GQA and P·V are the exact op's, in the input precision.

The one error is the rounding of q and k to 8 bits: an approximation, guarded by the error
budget like the others (`policy`: rewrite "int8_qk").

- Reference (any device): exact attention over the dequantized q and smoothed k — the very
  numbers the kernel multiplies (int8 products summed in int32 are exact in float32 for any
  head dim up to 1040), so reference and kernel differ by float rounding only.
- CUDA: one Triton pass quantizes q and one k (`kernels/quantize.py`), then the generated
  flash kernel runs with int8 Q·Kᵀ tiles (`kernels/flash.py`, `QUANT_QK`): tiles are sized to
  lie inside one quantization block, so each tile's dequantization is one scalar folded into
  the softmax scale.
- Autograd: straight-through — the gradients of exact attention at the unquantized inputs.
- ONNX: the same smoothing and block quantization with standard ops (ReduceMean, Abs,
  ReduceMax, Div, Floor, Clip), then decomposed attention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.ops.attention import attention_reference, kernel_skip_reason, kernel_window
from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, onnx_scalar, register_recompute_autograd,
)
from attnopt.ops.features import compute_dtype

INT8_MAX = 127
#: Rows per quantization scale: queries, keys. The kernel's tiles (at most 128 × 64) each lie
#: inside one block, so a tile's dequantization is one scalar.
Q_QUANT_BLOCK, K_QUANT_BLOCK = 128, 64


def smooth_keys(k: Tensor) -> Tensor:
    """k minus its mean over the sequence (float32 or wider)."""
    dtype = compute_dtype(k.dtype)
    return k.to(dtype) - key_mean(k)


def key_mean(k: Tensor) -> Tensor:
    """The mean key (B, Hkv, 1, D), accumulated in float32 or wider without a widened copy of
    k — the expression the CUDA path uses too, so both smooth to the same bits."""
    return k.mean(dim=-2, keepdim=True, dtype=compute_dtype(k.dtype))


def quantize_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(x_int8 (B, H, S, D), scales (B, H, ⌈S/block⌉) float32): per block of `block` rows,
    scale = max|x| / 127 and x_int8 = ⌊x / scale + ½⌋."""
    xf = x.to(compute_dtype(x.dtype))
    length = xf.shape[-2]
    blocks = -(-length // block)
    padded = F.pad(xf, (0, 0, 0, blocks * block - length)).unflatten(-2, (blocks, block))
    amax = padded.abs().amax(dim=(-2, -1))                              # (B, H, blocks)
    # a tensor divisor: PyTorch's CUDA division by a Python number multiplies by its
    # reciprocal, one rounding away from the IEEE quotient the Triton quantizer computes
    scales = (amax / torch.full_like(amax, INT8_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = torch.floor(padded / scales[..., None, None] + 0.5).clamp(-INT8_MAX, INT8_MAX)
    quantized = quantized.flatten(-3, -2)[..., :length, :].to(torch.int8)
    return quantized, scales.to(torch.float32)


def dequantize_blocks(x_int8: Tensor, scales: Tensor, block: int) -> Tensor:
    rows = scales.repeat_interleave(block, dim=-1)[..., :x_int8.shape[-2], None]
    return x_int8.to(torch.float32) * rows


def quantize_qk(q: Tensor, k: Tensor, softcap: Optional[float] = None, *,
                use_kernel: bool = False):
    """((q_int8, q_scales), (k_int8, k_scales)) as the attention kernel consumes them; with
    `use_kernel`, by the Triton quantizer (one pass per operand, the same numbers)."""
    if use_kernel and q.dtype != torch.float64:
        from attnopt.kernels.quantize import quantize_blocks_kernel
        mean = key_mean(k) if softcap is None else None
        return (quantize_blocks_kernel(q, Q_QUANT_BLOCK),
                quantize_blocks_kernel(k, K_QUANT_BLOCK, mean))
    keys = smooth_keys(k) if softcap is None else k
    return quantize_blocks(q, Q_QUANT_BLOCK), quantize_blocks(keys, K_QUANT_BLOCK)


def int8_qk_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False, softcap: Optional[float] = None,
                      window_left: Optional[int] = None,
                      alibi_slopes: Optional[Tensor] = None) -> Tensor:
    (q8, q_scales), (k8, k_scales) = quantize_qk(q, k, softcap)
    dtype = compute_dtype(q.dtype)
    q_deq = dequantize_blocks(q8, q_scales, Q_QUANT_BLOCK).to(dtype)
    k_deq = dequantize_blocks(k8, k_scales, K_QUANT_BLOCK).to(dtype)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool \
        else attn_mask.to(dtype)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = attention_reference(q_deq, k_deq, v.to(dtype), mask, is_causal, scale, enable_gqa,
                              softcap, window_left, alibi_slopes)
    return out.to(q.dtype)


@torch.library.custom_op("attnopt::int8_qk_attention", mutates_args=())
def int8_qk_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False, softcap: Optional[float] = None,
                      window_left: Optional[int] = None,
                      alibi_slopes: Optional[Tensor] = None) -> Tensor:
    return like_query_layout(int8_qk_reference(q, k, v, attn_mask, is_causal, scale,
                                               enable_gqa, softcap, window_left,
                                               alibi_slopes), q)


def int8_qk_kernel(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                   softcap=None, window_left=None, alibi_slopes=None) -> Tensor:
    """The generated flash kernel with int8 Q·Kᵀ (CUDA, or CPU tensors under the Triton
    interpreter)."""
    from attnopt.kernels.flash import flash_forward
    from attnopt.kernels.params import AttentionParams
    params = AttentionParams.build(q, k, v, causal=is_causal, scale=scale, attn_bias=attn_mask,
                                   kv_lengths=None, window=kernel_window(k, window_left),
                                   block_mask=None, softcap=softcap, alibi_slopes=alibi_slopes,
                                   causal_alignment="top_left")
    (q8, q_scales), (k8, k_scales) = quantize_qk(q, k, softcap, use_kernel=True)
    out, _ = flash_forward(q8, k8, v, params,
                           quant=(q_scales, Q_QUANT_BLOCK, k_scales, K_QUANT_BLOCK))
    return out


@int8_qk_attention.register_kernel("cuda")
def _int8_qk_attention_cuda(q, k, v, attn_mask=None, is_causal=False, scale=None,
                            enable_gqa=False, softcap=None, window_left=None, alibi_slopes=None):
    run = int8_qk_kernel if kernel_skip_reason(q, k, v, attn_mask, softcap,
                                               sdpa_alternative=False) is None \
        else int8_qk_reference
    return like_query_layout(run(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap,
                                 window_left, alibi_slopes), q)


@int8_qk_attention.register_fake
def _int8_qk_attention_fake(q, k, v, *args, **kwargs):
    return empty_like_query_layout(q, v.shape[-1])


# straight-through: quantization's rounding has no useful gradient, so backward differentiates
# exact attention (the canonical op's reference has the same signature)
register_recompute_autograd(int8_qk_attention, attention_reference)


# ----------------------------------------------------------------------------- ONNX

def onnx_int8_qk_attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                           enable_gqa=False, softcap=None, window_left=None, alibi_slopes=None):
    """The smoothing and block quantization in standard opset-18 ops, then decomposed
    attention over the dequantized q and k (the numbers the kernel multiplies)."""
    from onnxscript import opset18 as op

    from attnopt.ops import blocked_onnx as bo
    from attnopt.ops.attention import onnx_attention_decomposed

    def fake_quantize(x, block):
        blocks = bo.to_blocks(op, x, block)                             # (B, H, N, b, D)
        amax = op.ReduceMax(op.Abs(blocks), bo.ints(op, -2, -1), keepdims=1)
        scales = op.Max(op.Div(amax, onnx_scalar(op, INT8_MAX, amax)),
                        onnx_scalar(op, torch.finfo(torch.float32).tiny, amax))
        rounded = op.Clip(op.Floor(op.Add(op.Div(blocks, scales), onnx_scalar(op, 0.5, amax))),
                          onnx_scalar(op, -INT8_MAX, amax), onnx_scalar(op, INT8_MAX, amax))
        flat = op.Reshape(op.Mul(rounded, scales),
                          op.Concat(op.Shape(x, start=0, end=2), bo.ints(op, -1),
                                    op.Shape(x, start=3), axis=0))
        return op.Slice(flat, bo.ints(op, 0), op.Shape(x, start=2, end=3), bo.ints(op, 2))

    qf, kf = op.Cast(q, to=bo.FLOAT), op.Cast(k, to=bo.FLOAT)
    if softcap is None:
        kf = op.Sub(kf, op.ReduceMean(kf, bo.ints(op, 2), keepdims=1))
    q_deq, k_deq = fake_quantize(qf, Q_QUANT_BLOCK), fake_quantize(kf, K_QUANT_BLOCK)
    scale = scale if scale is not None else q.shape[3] ** -0.5
    out = onnx_attention_decomposed(q_deq, k_deq, op.Cast(v, to=bo.FLOAT), attn_mask,
                                    is_causal, scale, enable_gqa, softcap, window_left,
                                    alibi_slopes)
    return op.CastLike(out, q)
