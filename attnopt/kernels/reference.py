"""The semantics of `flash_attention`, written densely in plain torch.

This is the definition the Triton kernels are tested against (in float64) and what
`flash_attention` runs on devices without a kernel. It materializes the (Sq, Sk) score matrix;
the kernels never do.

Positions: query i sits at key position `i + offset`, where offset is 0 for top-left alignment
(SDPA's `is_causal`) and Sk - Sq for bottom-right alignment (a query block at the end of a KV
cache). Key j is visible to query i when all of these hold:

- causal: j <= i + offset;
- window (left, right): i + offset - left <= j <= i + offset + right;
- kv_lengths[b]: j < kv_lengths[b];
- block layout: the block containing (i, j) is on;
- a boolean `attn_bias`: attn_bias[b, h, i, j] is True.

Scores are `s = q·k * scale`, soft-capped (`softcap * tanh(s / softcap)`) when asked, then a float
`attn_bias` and ALiBi (`-slope[h] * |i + offset - j|`) are added. Rows that see no key at all
produce zeros (as FlashAttention and SDPA's math path do).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels.layout import BlockSparseLayout


def causal_offset(q_len: int, kv_len: int, alignment: str) -> int:
    if alignment == "top_left":
        return 0
    if alignment == "bottom_right":
        return kv_len - q_len
    raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got {alignment!r}")


def visible_keys(batch: int, q_len: int, kv_len: int, *, device, causal: bool, offset: int,
                 window: Optional[tuple[int, int]], kv_lengths: Optional[Tensor],
                 block_mask: Optional[BlockSparseLayout]) -> Tensor:
    """Boolean (B|1, H|1, Sq, Sk) mask of the structural constraints (not the bias)."""
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(kv_len, device=device)[None, :]
    keep_SS = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        keep_SS &= cols <= rows
    if window is not None:
        left, right = window
        keep_SS &= (cols >= rows - left) & (cols <= rows + right)
    keep = keep_SS[None, None]
    if kv_lengths is not None:
        keep = keep & (cols[None, None] < kv_lengths.to(device).view(batch, 1, 1, 1))
    if block_mask is not None:
        keep = keep & block_mask.dense_mask(q_len, kv_len).to(device)
    return keep


def flash_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                              scale: Optional[float] = None, attn_bias: Optional[Tensor] = None,
                              kv_lengths: Optional[Tensor] = None,
                              window: Optional[tuple[int, int]] = None,
                              block_mask: Optional[BlockSparseLayout] = None,
                              softcap: Optional[float] = None,
                              alibi_slopes: Optional[Tensor] = None,
                              causal_alignment: str = "top_left",
                              compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dense attention with `flash_attention`'s semantics, computed in `compute_dtype`
    (default: float32, or float64 for float64 inputs); returns q's dtype."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[-2]
    compute_dtype = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    q_, k_, v_ = (t.to(compute_dtype) for t in (q, k, v))
    if k.shape[1] != heads:
        group = heads // k.shape[1]
        k_, v_ = k_.repeat_interleave(group, dim=1), v_.repeat_interleave(group, dim=1)
    scale = head_dim ** -0.5 if scale is None else scale
    offset = causal_offset(q_len, kv_len, causal_alignment)
    scores_BHSS = (q_ @ k_.transpose(-1, -2)) * scale
    if softcap is not None:
        scores_BHSS = softcap * torch.tanh(scores_BHSS / softcap)
    keep = visible_keys(batch, q_len, kv_len, device=q.device, causal=causal, offset=offset,
                        window=window, kv_lengths=kv_lengths, block_mask=block_mask)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            scores_BHSS = scores_BHSS + attn_bias.to(compute_dtype)
    if alibi_slopes is not None:
        rows = torch.arange(q_len, device=q.device)[:, None] + offset
        cols = torch.arange(kv_len, device=q.device)[None, :]
        distance_SS = (rows - cols).abs().to(compute_dtype)
        slopes_BH11 = alibi_slopes.to(compute_dtype).reshape(-1, heads, 1, 1)
        scores_BHSS = scores_BHSS - slopes_BH11 * distance_SS
    scores_BHSS = scores_BHSS.masked_fill(~keep, float("-inf"))
    row_max = scores_BHSS.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights_BHSS = torch.exp(scores_BHSS - row_max)
    total = weights_BHSS.sum(dim=-1, keepdim=True)
    probs_BHSS = weights_BHSS / torch.where(total == 0, torch.ones_like(total), total)
    return (probs_BHSS @ v_).to(q.dtype)
