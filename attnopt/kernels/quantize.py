"""Per-block int8 quantization of q and k in one pass each: the front half of the int8 Q·Kᵀ
op (`ops/quantized.py`), whose rounding rule this kernel shares bit for bit.

One program per (block of rows, batch × head): load the block (rows × D), subtract the mean
key when smoothing, take max|x|, scale = max|x| / 127, x_int8 = ⌊x / scale + ½⌋, store the
int8 rows and the scale. Divisions are IEEE round-to-nearest (`div_rn`) so the integers match
the torch reference's exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.params import cdiv, padded_head_dim

INT8_MAX = tl.constexpr(127.0)
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: scale of a zero block


@triton.jit
def _quantize_blocks_kernel(x_ptr, mean_ptr, out_ptr, scales_ptr,
                            stride_xb, stride_xh, stride_xs, stride_xd,
                            stride_ob, stride_oh, stride_os, stride_od,
                            num_heads, seq, num_blocks,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                            BLOCK: tl.constexpr, SUBTRACT_MEAN: tl.constexpr):
    pid_block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_PADDED)
    inside = (rows[:, None] < seq) & (cols[None, :] < HEAD_DIM)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs
                + cols[None, :] * stride_xd, mask=inside, other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + cols, mask=cols < HEAD_DIM, other=0.0)
        x = tl.where(inside, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.maximum(tl.math.div_rn(amax, INT8_MAX), TINY)
    rounded = tl.floor(tl.math.div_rn(x, tl.zeros_like(x) + scale) + 0.5)
    rounded = tl.minimum(tl.maximum(rounded, -INT8_MAX), INT8_MAX)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os
             + cols[None, :] * stride_od, rounded.to(tl.int8), mask=inside)
    tl.store(scales_ptr + pid_bh * num_blocks + pid_block, scale)


def quantize_blocks_kernel(x: Tensor, block: int, mean: Optional[Tensor] = None
                           ) -> tuple[Tensor, Tensor]:
    """(x_int8 (B, H, S, D), scales (B, H, ⌈S/block⌉) float32) of x (B, H, S, D) minus `mean`
    (B, H, 1, D) float32 when given — `ops.quantized.quantize_blocks`' numbers."""
    batch, heads, length, dim = x.shape
    blocks = cdiv(length, block)
    out = torch.empty(x.shape, device=x.device, dtype=torch.int8)
    scales = torch.empty(batch, heads, blocks, device=x.device, dtype=torch.float32)
    mean_arg = mean.contiguous() if mean is not None else scales
    _quantize_blocks_kernel[(blocks, batch * heads)](
        x, mean_arg, out, scales, *x.stride(), *out.stride(), heads, length, blocks,
        HEAD_DIM=dim, HEAD_DIM_PADDED=padded_head_dim(dim), BLOCK=block,
        SUBTRACT_MEAN=mean is not None, num_warps=4)
    return out, scales
