"""`torch.ops.attnopt.attention`: the canonical exact attention op.

Every attention site found in a graph is canonicalized into one call of this op; every later
rewrite (kernels, approximations) is a pass from it to another attnopt op.

Semantics are those of `F.scaled_dot_product_attention` without dropout:

    out_BHSD = softmax(q_BHSD @ k_BHSD^T * scale + mask) @ v_BHSD

- `q` (B, H, Sq, D); `k` (B, Hkv, Sk, D); `v` (B, Hkv, Sk, Dv). With `enable_gqa`, H is a
  multiple of Hkv and query head h reads kv head h // (H // Hkv) (`repeat_interleave` order).
- `attn_mask` broadcastable to (B, H, Sq, Sk): bool (True = attend) or float (added to scores).
- `is_causal`: query i attends keys j <= i (top-left aligned, as SDPA).
- `scale`: defaults to 1/sqrt(D).

The op owns its reference implementation (SDPA, runs on every device), its fake implementation
for tracing, and its autograd (gradients of q, k, v and of a float mask, by recomputation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None,
                        enable_gqa: bool = False) -> Tensor:
    """Plain-torch semantics of the canonical op (used by every backend without a kernel)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@torch.library.custom_op("attnopt::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> Tensor:
    return attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.has_mask = attn_mask is not None
    ctx.is_causal, ctx.scale, ctx.enable_gqa = is_causal, scale, enable_gqa


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    mask_needs_grad = (ctx.has_mask and attn_mask.is_floating_point()
                       and ctx.needs_input_grad[3])
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        mask_ = attn_mask
        if mask_needs_grad:
            mask_ = attn_mask.detach().requires_grad_(True)
        out = attention_reference(q_, k_, v_, mask_, ctx.is_causal, ctx.scale, ctx.enable_gqa)
        wrt = [q_, k_, v_] + ([mask_] if mask_needs_grad else [])
        grads = torch.autograd.grad(out, wrt, grad_out)
    grad_mask = grads[3] if mask_needs_grad else None
    return grads[0], grads[1], grads[2], grad_mask, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
