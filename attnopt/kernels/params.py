"""Checked, normalized arguments of one flash-attention call, shared by every kernel launcher.

`AttentionParams.build` validates the public arguments once (shapes, dtypes, devices, ranges)
and turns them into what the kernels take: the causal alignment as an integer offset, a window as
(left, right) bounds with flags, the bias expanded to (B, H, Sq, Sk) by strides (never copied),
ALiBi slopes as (B, H) strides, and the block layout. `kernel_flags` are the constexpr
specializations; `unsupported_reason` says why a call cannot run on the Triton kernels (None when
it can).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels.layout import BlockSparseLayout
from attnopt.kernels.reference import causal_offset

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
#: the kinds of `attn_bias` (kernels see them as the BIAS_KIND constexpr; tiles.py wraps these)
BIAS_NONE, BIAS_ADDITIVE, BIAS_BOOLEAN = 0, 1, 2


def padded_head_dim(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclass
class AttentionParams:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float
    offset: int
    has_left: bool
    has_right: bool
    window_left: int
    window_right: int
    softcap: Optional[float]
    bias_BHSS: Optional[Tensor]     # expanded view, or None
    bias_kind: int
    slopes_BH: Optional[Tensor]     # float32 (B|1, H) view, or None
    kv_lengths: Optional[Tensor]    # int32 (B,), or None
    layout: Optional[BlockSparseLayout]

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def build(cls, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale, attn_bias, kv_lengths,
              window, block_mask, softcap, alibi_slopes, causal_alignment) -> "AttentionParams":
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("flash_attention takes (batch, heads, seq, head_dim) tensors; got "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        batch, heads, q_len, head_dim = q.shape
        _, kv_heads, kv_len, _ = k.shape
        if k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[-1] != head_dim:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q "
                             f"{tuple(q.shape)}: expected k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)")
        if heads % kv_heads:
            raise ValueError(f"q has {heads} heads, not a multiple of k/v's {kv_heads} (GQA)")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, "
                             f"{v.device}")
        offset = causal_offset(q_len, kv_len, causal_alignment)
        has_left = has_right = False
        left = right = 0
        if window is not None:
            left, right = _window_bounds(window)
            has_left = has_right = True
        if causal:
            right = 0 if not has_right else min(right, 0)
            has_right = True
        bias_BHSS, bias_kind = None, BIAS_NONE
        if attn_bias is not None:
            try:
                bias_BHSS = attn_bias.expand(batch, heads, q_len, kv_len)
            except RuntimeError:
                raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast "
                                 f"to (B, H, Sq, Sk) = {(batch, heads, q_len, kv_len)}") from None
            if attn_bias.device != q.device:
                raise ValueError(f"attn_bias is on {attn_bias.device}, q on {q.device}")
            bias_kind = BIAS_BOOLEAN if attn_bias.dtype == torch.bool else BIAS_ADDITIVE
        slopes_BH = None
        if alibi_slopes is not None:
            if alibi_slopes.shape not in ((heads,), (batch, heads)):
                raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}); "
                                 f"got {tuple(alibi_slopes.shape)}")
            slopes_BH = alibi_slopes.to(device=q.device, dtype=torch.float32).reshape(-1, heads)
        if kv_lengths is not None:
            if kv_lengths.shape != (batch,) or kv_lengths.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"kv_lengths must be an int32 tensor of shape ({batch},); got "
                                 f"{kv_lengths.dtype} {tuple(kv_lengths.shape)}")
            kv_lengths = kv_lengths.to(device=q.device, dtype=torch.int32)
        if block_mask is not None:
            if not isinstance(block_mask, BlockSparseLayout):
                raise TypeError("block_mask must be an attnopt.kernels.BlockSparseLayout; got "
                                f"{type(block_mask).__name__}")
            block_mask.check_shape(batch, heads, q_len, kv_len)
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
        scale = head_dim ** -0.5 if scale is None else float(scale)
        return cls(batch, heads, kv_heads, q_len, kv_len, head_dim, scale, offset, has_left,
                   has_right, left, right, softcap, bias_BHSS, bias_kind, slopes_BH, kv_lengths,
                   block_mask)

    def worth_tuning(self, dtype: torch.dtype) -> bool:
        """Whether this is a hot specialization that autotunes (see `tuning.py`): half
        precision without a bias tensor, soft-cap or layout. ALiBi tunes too (rewritten BLOOM,
        MPT and Falcon run it): 1.08–1.18× the untuned forward on an H100, 1.02× the backward
        (docs/BENCHMARKS.md, ALiBi)."""
        return (dtype != torch.float32 and self.bias_kind == BIAS_NONE and self.softcap is None
                and self.layout is None)

    def slopes_strides(self) -> tuple[int, int]:
        """(batch, head) strides of `slopes_BH` as the kernels index it: 0 over a batch of one
        (slopes shared by every row), (0, 0) without ALiBi."""
        slopes = self.slopes_BH
        if slopes is None:
            return 0, 0
        return (slopes.stride(0) if slopes.shape[0] > 1 else 0), slopes.stride(1)

    def kernel_flags(self) -> dict:
        return dict(HAS_LEFT=self.has_left, HAS_RIGHT=self.has_right,
                    HAS_SOFTCAP=self.softcap is not None, BIAS_KIND=self.bias_kind,
                    HAS_ALIBI=self.slopes_BH is not None,
                    HAS_KV_LENS=self.kv_lengths is not None,
                    HAS_LAYOUT=self.layout is not None,
                    LAYOUT_BLOCK=self.layout.block_size if self.layout is not None else 0)

    def static_lengths(self) -> dict:
        """The kernels' constexpr sequence lengths, for `tuning.launch` to compile in. None
        for calls with a bias tensor: with the lengths constant, triton 3.6 compiled the
        forward wrong on an H100 for a bias laid out heads-innermost (T5's), which the
        interpreter computes right (docs/DESIGN-NOTES.md)."""
        if self.bias_kind != BIAS_NONE:
            return {}
        return dict(STATIC_SEQ_Q=self.q_len, STATIC_SEQ_K=self.kv_len)


def _window_bounds(window) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (left, right) pair of key counts; got {window!r}") \
            from None
    if left < 0 or right < 0:
        raise ValueError(f"window bounds must be >= 0, got {window!r}")
    return left, right


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why these tensors cannot run on the Triton kernels, or None when they can."""
    if q.device.type != "cuda" and not interpreting():
        return f"tensors are on {q.device.type}; the kernels run on CUDA"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernels take float16, bfloat16, float32)"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from query head dim {q.shape[-1]}"
    if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    return None


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (read once: Triton itself reads
    TRITON_INTERPRET when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launchers run per call on the host, where these cost ~0.5 µs against ~3 µs for
# `triton.cdiv` / `triton.next_power_of_2` (a constexpr-function wrapper in recent Triton).

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0
