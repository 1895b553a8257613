"""`torch.ops.attnopt.sparse_attention`: exact attention restricted to a sparse pattern.

Keys visible to query i: those the pattern keeps (`attnopt.ops.sparsity`: local / dilated /
strided / global / random blocks, a token window, an optional user block layout), intersected
with `is_causal` and the site's own mask. Scores, scale and GQA as the canonical op.

- Reference (CPU, and CUDA without Triton): `blocked.blocked_attention`, which gathers the kept
  key blocks per query block — work O(n·w) for windowed patterns, never an n×n mask.
- CUDA: the generated flash kernel's block-sparse path (empty blocks skipped, full blocks skip
  mask evaluation), the token window as its band.
- A pure token window at least as wide as the sequences, without a mask, is dense attention:
  both run SDPA (`covers_every_key`).
- ONNX: the pattern's block layout evaluated with integer ops on the dynamic lengths, then each
  query block attends its gathered key blocks (`blocked_onnx`, standard opset-18 ops): the
  O(n·w) structure survives in any runtime.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.attention import attention_reference
from attnopt.ops.blocked import blocked_attention
from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, register_recompute_autograd,
)
from attnopt.ops.sparsity import SparsePattern, pattern_layout


def _pattern(block, local_left, local_right, dilation, stride, global_blocks, random_blocks,
             seed, window_left, window_right) -> SparsePattern:
    return SparsePattern(block, local_left, local_right, dilation, stride, global_blocks,
                         random_blocks, seed, window_left, window_right)


def covers_every_key(pattern: SparsePattern, q_len: int, kv_len: int, causal: bool,
                     layout: Optional[Tensor] = None) -> bool:
    """Whether the pattern is a token window at least as wide as the sequences (a sliding-window
    model run on inputs no longer than its window): then it is dense attention, which SDPA's
    fused kernels run faster than any block-sparse path."""
    if layout is not None or pattern.has_blocks:
        return False
    left, right = pattern.window or (-1, -1)
    return (left < 0 or left >= q_len - 1) and (causal or right < 0 or right >= kv_len - 1)


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
    if attn_mask is None and covers_every_key(pattern, q.shape[-2], k.shape[-2], is_causal,
                                              layout):
        return attention_reference(q, k, v, None, is_causal, scale,
                                   bool(enable_gqa) or q.shape[1] != k.shape[1])
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
    if attn_mask is None and covers_every_key(pattern, q_len, kv_len, is_causal, layout):
        return attention_reference(q, k, v, None, is_causal, scale,
                                   bool(enable_gqa) or q.shape[1] != k.shape[1])
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


def onnx_sparse_attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                          enable_gqa=False, block=64, local_left=-1, local_right=-1,
                          dilation=1, stride=0, global_blocks=0, random_blocks=0, seed=0,
                          window_left=-1, window_right=-1, layout=None):
    """The pattern's block layout from integer ops on the dynamic lengths, then attention over
    each query block's gathered key blocks (`blocked_onnx`): O(n·w) in the runtime too."""
    from onnxscript import opset18 as op

    from attnopt.ops import blocked_onnx
    pattern = _pattern(block, local_left, local_right, dilation, stride, global_blocks,
                       random_blocks, seed, window_left, window_right)
    blocks = blocked_onnx.pattern_layout(op, pattern, blocked_onnx.length(op, q),
                                         blocked_onnx.length(op, k), bool(is_causal), layout)
    slots = blocked_onnx.layout_slots(op, blocks, light_from=pattern.global_blocks)
    return blocked_onnx.blocked_attention(
        op, q, k, v, slots, pattern.block, scale if scale is not None else q.shape[3] ** -0.5,
        causal=bool(is_causal), window=pattern.window, attn_mask=attn_mask,
        dense_blocks=pattern.global_blocks)
