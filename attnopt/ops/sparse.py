"""`torch.ops.attnopt.sparse_attention`: exact attention restricted to a sparse pattern.

Keys visible to query i: those the pattern keeps (`attnopt.ops.sparsity`: local / dilated /
strided / global / random blocks, a token window, an optional user block layout), intersected
with `is_causal` and the site's own mask. Scores, scale and GQA as the canonical op.

- Reference (CPU, and CUDA without Triton): `blocked.blocked_attention`, which gathers the kept
  key blocks per query block — work O(n·w) for windowed patterns, never an n×n mask.
- CUDA: the generated flash kernel's block-sparse path (empty blocks skipped, full blocks skip
  mask evaluation), the token window as its band.
- ONNX: the pattern evaluated with integer ops into a (Sq, Sk) mask over decomposed attention
  (standard opset-18 ops; correct in any runtime, not sparse there).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.blocked import blocked_attention
from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, register_recompute_autograd,
)
from attnopt.ops.sparsity import HASH_MODULUS, HASH_MULTIPLIER, SparsePattern, pattern_layout


def _pattern(block, local_left, local_right, dilation, stride, global_blocks, random_blocks,
             seed, window_left, window_right) -> SparsePattern:
    return SparsePattern(block, local_left, local_right, dilation, stride, global_blocks,
                         random_blocks, seed, window_left, window_right)


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                               attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                               scale: Optional[float] = None, enable_gqa: bool = False,
                               block: int = 64, local_left: int = -1, local_right: int = -1,
                               dilation: int = 1, stride: int = 0, global_blocks: int = 0,
                               random_blocks: int = 0, seed: int = 0, window_left: int = -1,
                               window_right: int = -1,
                               layout: Optional[Tensor] = None) -> Tensor:
    pattern = _pattern(block, local_left, local_right, dilation, stride, global_blocks,
                       random_blocks, seed, window_left, window_right)
    blocks = pattern_layout(pattern, q.shape[-2], k.shape[-2], causal=is_causal,
                            user_layout=layout, device=q.device)
    return blocked_attention(q, k, v, blocks, block, scale=scale, causal=is_causal,
                             window=pattern.window, attn_mask=attn_mask)


@torch.library.custom_op("attnopt::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False, scale: Optional[float] = None,
                     enable_gqa: bool = False, block: int = 64, local_left: int = -1,
                     local_right: int = -1, dilation: int = 1, stride: int = 0,
                     global_blocks: int = 0, random_blocks: int = 0, seed: int = 0,
                     window_left: int = -1, window_right: int = -1,
                     layout: Optional[Tensor] = None) -> Tensor:
    return like_query_layout(sparse_attention_reference(
        q, k, v, attn_mask, is_causal, scale, enable_gqa, block, local_left, local_right,
        dilation, stride, global_blocks, random_blocks, seed, window_left, window_right,
        layout), q)


def sparse_attention_kernel(q, k, v, attn_mask=None, is_causal=False, scale=None,
                            enable_gqa=False, block=64, local_left=-1, local_right=-1,
                            dilation=1, stride=0, global_blocks=0, random_blocks=0, seed=0,
                            window_left=-1, window_right=-1, layout=None) -> Tensor:
    """The pattern on the generated flash kernel's block-sparse path (CUDA, or CPU tensors
    under the Triton interpreter)."""
    from attnopt.kernels import BlockSparseLayout, flash_attention
    pattern = _pattern(block, local_left, local_right, dilation, stride, global_blocks,
                       random_blocks, seed, window_left, window_right)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if layout is None and not pattern.has_blocks:  # a pure window: the kernel's own band
        block_mask = None                              # skips the blocks outside it
    elif layout is None:  # a pure function of the pattern and lengths: built once, reused
        block_mask = _kernel_layout(pattern, q_len, kv_len, bool(is_causal), str(q.device))
    else:
        block_mask = BlockSparseLayout(pattern_layout(
            pattern, q_len, kv_len, causal=is_causal, user_layout=layout,
            device=q.device)[None, None], block)
    window = None
    if pattern.window is not None:  # the kernel's band takes both sides; -1 = unbounded
        window = (window_left if window_left >= 0 else q_len + kv_len,
                  window_right if window_right >= 0 else q_len + kv_len)
    return flash_attention(q, k, v, causal=is_causal, scale=scale, attn_bias=attn_mask,
                           window=window, block_mask=block_mask)


@functools.lru_cache(maxsize=64)
def _kernel_layout(pattern: SparsePattern, q_len: int, kv_len: int, causal: bool, device: str):
    """The kernel's layout object (its compressed index lists are cached inside it)."""
    from attnopt.kernels import BlockSparseLayout
    blocks = pattern_layout(pattern, q_len, kv_len, causal=causal, device=device)
    return BlockSparseLayout(blocks[None, None], pattern.block)


@sparse_attention.register_kernel("cuda")
def _sparse_attention_cuda(q, k, v, attn_mask=None, is_causal=False, scale=None,
                           enable_gqa=False, *pattern_args, **pattern_kwargs):
    from attnopt.ops.attention import kernel_skip_reason
    run = sparse_attention_kernel if kernel_skip_reason(
        q, k, v, attn_mask, sdpa_alternative=False) is None else sparse_attention_reference
    return like_query_layout(run(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                 *pattern_args, **pattern_kwargs), q)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, *args, **kwargs):
    return empty_like_query_layout(q, v.shape[-1])


register_recompute_autograd(sparse_attention, sparse_attention_reference)


# ----------------------------------------------------------------------------- ONNX


def onnx_pattern_keep(op, q_len, kv_len, pattern: SparsePattern, causal: bool, layout=None):
    """(Sq, Sk) bool: the pattern's element mask from integer ops on the (dynamic) lengths
    `q_len`, `kv_len` (0-d int64 tensors) — `sparsity.token_keep` in onnxscript."""
    def const(value):
        return op.Constant(value_int=int(value))

    zero, one, b = const(0), const(1), const(pattern.block)
    rows = op.Unsqueeze(op.Range(zero, q_len, one), op.Constant(value_ints=[1]))  # (Sq, 1)
    cols = op.Unsqueeze(op.Range(zero, kv_len, one), op.Constant(value_ints=[0]))  # (1, Sk)
    qb, kb = op.Div(rows, b), op.Div(cols, b)
    false = op.Cast(op.Mul(rows, cols), to=9)
    false = op.And(false, op.Not(false))  # (Sq, Sk) all False
    if pattern.has_blocks or layout is not None:
        keep = false
        if pattern.local_left >= 0 or pattern.local_right >= 0:
            distance = op.Sub(qb, kb)
            near = op.And(
                op.LessOrEqual(distance, const(max(pattern.local_left, 0) * pattern.dilation)),
                op.LessOrEqual(op.Neg(distance),
                               const(max(pattern.local_right, 0) * pattern.dilation)))
            on_step = op.Equal(op.Mod(distance, const(pattern.dilation)), zero)
            keep = op.Or(keep, op.And(near, on_step))
        if pattern.stride > 0:
            keep = op.Or(keep, op.Equal(op.Mod(op.Add(kb, one), const(pattern.stride)), zero))
        if pattern.global_blocks > 0:
            g = const(pattern.global_blocks)
            keep = op.Or(keep, op.Or(op.Less(qb, g), op.Less(kb, g)))
        if pattern.random_blocks > 0:
            k_blocks = op.Div(op.Add(kv_len, const(pattern.block - 1)), b)
            draws = op.Unsqueeze(op.Range(zero, const(pattern.random_blocks), one),
                                 op.Constant(value_ints=[0]))              # (1, r)
            x = op.Mod(op.Add(op.Add(op.Mul(qb, const(1000003)), op.Mul(draws, const(7919))),
                              const(pattern.seed * 104729 + 1)), const(HASH_MODULUS))
            x = op.Mod(op.Mul(x, const(HASH_MULTIPLIER)), const(HASH_MODULUS))
            x = op.Mod(op.Mul(x, const(HASH_MULTIPLIER)), const(HASH_MODULUS))
            limit = op.Min(op.Add(qb, one), k_blocks) if causal else k_blocks
            drawn = op.Mod(x, limit)                                        # (Sq, r)
            hit = op.Equal(op.Unsqueeze(drawn, op.Constant(value_ints=[-1])),
                           op.Unsqueeze(kb, op.Constant(value_ints=[0])))  # (Sq, r, Sk)
            keep = op.Or(keep, op.Cast(op.ReduceMax(op.Cast(hit, to=6),
                                                    op.Constant(value_ints=[1]), keepdims=0),
                                       to=9))
        if layout is not None:
            picked = op.Gather(op.Gather(op.Cast(layout, to=6), op.Squeeze(qb, op.Constant(
                value_ints=[1])), axis=0), op.Squeeze(kb, op.Constant(value_ints=[0])), axis=1)
            keep = op.Or(keep, op.Cast(picked, to=9))
    else:
        keep = op.Not(false)
    if pattern.window_left >= 0:
        keep = op.And(keep, op.GreaterOrEqual(cols, op.Sub(rows, const(pattern.window_left))))
    if pattern.window_right >= 0:
        keep = op.And(keep, op.LessOrEqual(cols, op.Add(rows, const(pattern.window_right))))
    if causal:
        keep = op.And(keep, op.LessOrEqual(cols, rows))
    return keep


def combine_keep_with_mask(op, keep, attn_mask, like):
    """The pattern's bool keep and the site's own mask as one additive float mask (like
    `like`'s type; -inf where either masks). Always float: the tracer does not type the
    intermediate bool values the decomposed translation would have to branch on."""
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), like)
    if attn_mask is None:
        return op.Where(keep, op.CastLike(op.Constant(value_float=0.0), like), neg_inf)
    if attn_mask.dtype == 9:
        return op.Where(op.And(keep, attn_mask), op.CastLike(op.Constant(value_float=0.0), like),
                        neg_inf)
    return op.Where(keep, op.CastLike(attn_mask, like), neg_inf)


def onnx_sparse_attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                          enable_gqa=False, block=64, local_left=-1, local_right=-1,
                          dilation=1, stride=0, global_blocks=0, random_blocks=0, seed=0,
                          window_left=-1, window_right=-1, layout=None):
    from onnxscript import opset18 as op

    from attnopt.ops.attention import onnx_attention_decomposed
    pattern = _pattern(block, local_left, local_right, dilation, stride, global_blocks,
                       random_blocks, seed, window_left, window_right)
    q_len = op.Squeeze(op.Shape(q, start=2, end=3))
    kv_len = op.Squeeze(op.Shape(k, start=2, end=3))
    keep = onnx_pattern_keep(op, q_len, kv_len, pattern, bool(is_causal), layout)
    mask = combine_keep_with_mask(op, keep, attn_mask, q)
    out = onnx_attention_decomposed(q, k, v, mask, False, scale, enable_gqa)
    return op.Where(op.IsNaN(out), op.CastLike(op.Constant(value_float=0.0), out), out)
