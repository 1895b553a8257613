"""`torch.ops.attnopt.topk_attention`: training-free top-k block-sparse attention.

In the spirit of Quest and NSA's selection branch: each block of `block` keys is summarized by
its mean key, each block of queries by its mean query; a query block scores every key block
by the product of the two (times the scale) and attends exactly — token by token — to its
`top_k` best key blocks plus its `local_blocks` nearest ones (the diagonal block always).
The layout depends on the data, per batch and head; causal attention only ever selects blocks
at or before the query block.

Reference: `blocked.blocked_attention` over the selected layout (work O(n·k·block)); CUDA: the
flash kernel's block-sparse path with that layout; ONNX: the same selection with TopK, whose
indices are the key-block slots each query block gathers (`blocked_onnx`). Scoring all block
pairs costs O((n/block)²·D), small next to attention itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.blocked import blocked_attention
from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, register_recompute_autograd,
)
from attnopt.ops.features import compute_dtype, repeat_kv_heads


def _block_means(x_BHSD: Tensor, block: int) -> Tensor:
    length = x_BHSD.shape[2]
    blocks = -(-length // block)
    padded = torch.nn.functional.pad(x_BHSD, (0, 0, 0, blocks * block - length))
    sums = padded.unflatten(2, (blocks, block)).sum(3)
    counts = (length - torch.arange(blocks, device=x_BHSD.device) * block).clamp(max=block)
    return sums / counts[:, None].to(sums.dtype)


def select_blocks(q: Tensor, k: Tensor, *, block: int, top_k: int, local_blocks: int,
                  causal: bool, scale: Optional[float] = None) -> Tensor:
    """(B, H, M, N) bool layout: each query block's top-k key blocks plus its local ones."""
    dtype = compute_dtype(q.dtype)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    with torch.no_grad():
        q_means = _block_means(q.detach().to(dtype), block)                        # (B,H,M,D)
        k_means = repeat_kv_heads(_block_means(k.detach().to(dtype), block), q.shape[1])
        scores = (q_means @ k_means.transpose(-1, -2)) * scale                     # (B,H,M,N)
        m, n = scores.shape[-2:]
        qb = torch.arange(m, device=q.device)[:, None]
        kb = torch.arange(n, device=q.device)[None, :]
        local = (qb - kb <= local_blocks) & (kb - qb <= (0 if causal else local_blocks))
        scores = scores.masked_fill(local, float("inf"))
        if causal:
            visible = kb * block <= torch.clamp(qb * block + block - 1, max=q.shape[2] - 1)
            scores = scores.masked_fill(~visible, float("-inf"))
        count = min(n, top_k + 1 + 2 * local_blocks)
        picked = scores.topk(count, dim=-1)
        layout = torch.zeros_like(scores, dtype=torch.bool).scatter_(
            -1, picked.indices, picked.values > float("-inf"))
    return layout


def topk_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                             attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                             scale: Optional[float] = None, enable_gqa: bool = False,
                             block: int = 64, top_k: int = 8, local_blocks: int = 1) -> Tensor:
    layout = select_blocks(q, k, block=block, top_k=top_k, local_blocks=local_blocks,
                           causal=is_causal, scale=scale)
    return blocked_attention(q, k, v, layout, block, scale=scale, causal=is_causal,
                             attn_mask=attn_mask)


@torch.library.custom_op("attnopt::topk_attention", mutates_args=())
def topk_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                   is_causal: bool = False, scale: Optional[float] = None,
                   enable_gqa: bool = False, block: int = 64, top_k: int = 8,
                   local_blocks: int = 1) -> Tensor:
    return like_query_layout(topk_attention_reference(
        q, k, v, attn_mask, is_causal, scale, enable_gqa, block, top_k, local_blocks), q)


def topk_attention_kernel(q, k, v, attn_mask=None, is_causal=False, scale=None,
                          enable_gqa=False, block=64, top_k=8, local_blocks=1) -> Tensor:
    from attnopt.kernels import BlockSparseLayout, flash_attention
    layout = select_blocks(q, k, block=block, top_k=top_k, local_blocks=local_blocks,
                           causal=is_causal, scale=scale)
    return flash_attention(q, k, v, causal=is_causal, scale=scale, attn_bias=attn_mask,
                           block_mask=BlockSparseLayout(layout, block))


@topk_attention.register_kernel("cuda")
def _topk_attention_cuda(q, k, v, attn_mask=None, is_causal=False, scale=None,
                         enable_gqa=False, block=64, top_k=8, local_blocks=1):
    from attnopt.ops.attention import kernel_skip_reason
    args = (q, k, v, attn_mask, is_causal, scale, enable_gqa, block, top_k, local_blocks)
    run = topk_attention_kernel if kernel_skip_reason(
        q, k, v, attn_mask, sdpa_alternative=False) is None else topk_attention_reference
    return like_query_layout(run(*args), q)


@topk_attention.register_fake
def _topk_attention_fake(q, k, v, *args, **kwargs):
    return empty_like_query_layout(q, v.shape[-1])


register_recompute_autograd(topk_attention, topk_attention_reference)


def onnx_topk_attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                        enable_gqa=False, block=64, top_k=8, local_blocks=1):
    """The selection in standard ops (block means, then TopK, whose indices are the key-block
    slots), then attention over each query block's selected key blocks (`blocked_onnx`):
    O(n·k·block) in the runtime too."""
    from onnxscript import opset18 as op

    from attnopt.ops import blocked_onnx
    from attnopt.ops.common import onnx_repeat_heads

    def const(value):
        return op.Constant(value_int=int(value))

    def ints(*values):
        return op.Constant(value_ints=list(values))

    zero, one, b = const(0), const(1), const(block)
    scale_value = scale if scale is not None else q.shape[3] ** -0.5

    def block_means(x):
        x = op.Cast(x, to=1)
        length = op.Squeeze(op.Shape(x, start=2, end=3))
        blocks = op.Div(op.Add(length, const(block - 1)), b)
        pad = op.Sub(op.Mul(blocks, b), length)
        pads = op.Concat(ints(0, 0, 0, 0, 0, 0), op.Unsqueeze(pad, ints(0)), ints(0), axis=0)
        padded = op.Pad(x, pads)
        sums = op.ReduceSum(op.Reshape(padded, op.Concat(ints(0, 0, -1, block),
                                                         op.Shape(x, start=3, end=4), axis=0)),
                            ints(3), keepdims=0)
        counts = op.Min(op.Sub(length, op.Mul(op.Range(zero, blocks, one), b)), b)
        return op.Div(sums, op.Unsqueeze(op.Cast(counts, to=1), ints(1))), blocks

    q_means, q_blocks = block_means(q)
    k_means, k_blocks = block_means(k)
    k_means = onnx_repeat_heads(op, k_means, op.Shape(q, start=1, end=2))
    scores = op.Mul(op.MatMul(q_means, op.Transpose(k_means, perm=[0, 1, 3, 2])),
                    op.Constant(value_float=float(scale_value)))
    qb = op.Unsqueeze(op.Range(zero, q_blocks, one), ints(1))
    kb = op.Unsqueeze(op.Range(zero, k_blocks, one), ints(0))
    local = op.And(op.LessOrEqual(op.Sub(qb, kb), const(local_blocks)),
                   op.LessOrEqual(op.Sub(kb, qb), const(0 if is_causal else local_blocks)))
    inf = op.Constant(value_float=float("inf"))
    scores = op.Where(local, inf, scores)
    q_len = op.Squeeze(op.Shape(q, start=2, end=3))
    if is_causal:
        last_q = op.Min(op.Add(op.Mul(qb, b), const(block - 1)), op.Sub(q_len, one))
        scores = op.Where(op.LessOrEqual(op.Mul(kb, b), last_q), scores, op.Neg(inf))
    count = op.Min(op.Unsqueeze(k_blocks, ints(0)), ints(top_k + 1 + 2 * local_blocks))
    values, indices = op.TopK(scores, count, axis=-1)                  # the slots themselves
    slots = (indices, op.Greater(values, op.Neg(inf)))                  # (B, H, M, K)
    return blocked_onnx.blocked_attention(op, q, k, v, slots, block, scale_value,
                                          causal=bool(is_causal), attn_mask=attn_mask,
                                          per_head=True)
