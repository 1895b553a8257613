"""The generated flash-attention forward kernel and `flash_attention`, its public entry.

One Triton kernel, specialized at compile time (constexpr flags, cached by Triton per
specialization) for: head dim (padded to a power of two inside the kernel), dtype, causal and
sliding-window bands with either alignment, key lengths per batch row, additive or boolean bias
tensors broadcast by strides, ALiBi from slopes, GQA (k/v heads shared, never repeated), block
layouts (empty blocks skipped), soft-capping and any scale. Semantics: `reference.py`.

Each program computes BLOCK_M query rows of one (batch, head) with the online softmax over the
visible key tiles. The band of visible keys is split into three ranges: tiles that cut through a
mask boundary (masked), tiles fully inside (no mask evaluation) and the far edge (masked).

Shape letters: B batch, H query heads, Hkv key/value heads, S sequence, D head dim.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.layout import BlockSparseLayout
from attnopt.kernels.params import AttentionParams, cdiv, interpreting, next_power_of_2, \
    padded_head_dim, unsupported_reason
from attnopt.kernels.reference import flash_attention_reference
from attnopt.kernels.tiles import BIAS_NONE, LOG2E, NEG_INF, key_band, score_tile
from attnopt.kernels.tuning import launch

try:  # Gluon (Triton >= 3.5) builds the warp-specialized Hopper forward
    from attnopt.kernels import flash_hopper
except (ImportError, AttributeError):  # (no Gluon, or an experimental API that moved again)
    flash_hopper = None

# --------------------------------------------------------------------------- configs

INTERPRETER_BLOCK = 32  # the interpreter runs one config; small tiles keep tests fast
LAYOUT_FALLBACK_TILE = 32  # tiles for layouts whose blocks are smaller than every config's


def _forward_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK},
                              num_warps=4, num_stages=1)]
    # best-first: an untuned launch takes the first config pruning keeps (tuning.py)
    shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 4),
              (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 128, 4, 3),
              (128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


def _prune_configs(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM_PADDED", named_args.get("HEAD_DIM_PADDED"))
    layout_block = kwargs.get("LAYOUT_BLOCK", named_args.get("LAYOUT_BLOCK", 0))
    exact_fp32 = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "ieee"
    quantized = kwargs.get("QUANT_QK", named_args.get("QUANT_QK", False))
    q_block, k_block = kwargs.get("Q_QBLOCK", 1), kwargs.get("K_QBLOCK", 1)
    kept = []
    for config in configs:
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if quantized and (q_block % m or k_block % n):
            continue  # each tile must lie inside one quantization block
        if layout_block and (layout_block % m or layout_block % n):
            continue
        if exact_fp32 and (m * n > 64 * 32 or config.num_stages > 2):
            continue  # fp32 products run on FMA units: small tiles, little pipelining
        if head_dim >= 256 and (m * n > 128 * 64 or config.num_stages > 2):
            continue
        if head_dim <= 64 and n == 32 and m == 128:
            continue
        kept.append(config)
    if kept:
        return kept
    # a layout block smaller than every tile: tiles of the layout block's size
    block = min(layout_block or LAYOUT_FALLBACK_TILE, LAYOUT_FALLBACK_TILE)
    return [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]


# --------------------------------------------------------------------------- kernel

@triton.jit
def attend_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                 n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
                 scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale, ks_ptr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, QUANT_QK: tl.constexpr,
                 K_QBLOCK: tl.constexpr):
    """One key tile of the online softmax: returns updated (acc, l_i, m_i). With QUANT_QK, q
    and the keys are int8 and the scores are their int32 product times the tile's two
    quantization scales (`q_scale`, and the key block's at `ks_ptr`)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt_ptrs = k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM),
                     other=0.0)
    elif HEAD_DIM != HEAD_DIM_PADDED:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
    if QUANT_QK:
        qk = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
        dequant = q_scale * tl.load(ks_ptr + n0 // K_QBLOCK)
    else:
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        dequant = 1.0
    if not MASKED and BIAS_KIND == BIAS_NONE and not HAS_SOFTCAP and not HAS_ALIBI:
        # the hot path: scale folded into one multiply-add per score, every score finite
        qk_scale = scale * LOG2E * dequant
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    else:
        if QUANT_QK:
            qk = qk * dequant
        s = score_tile(qk, offs_m[:, None], offs_n[None, :], seq_q, seq_k, kv_end, offset,
                       window_left,
                       window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
                       MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)  # a row may have seen only -inf so far
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
    elif HEAD_DIM != HEAD_DIM_PADDED:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_range(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
                  scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale, ks_ptr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, QUANT_QK: tl.constexpr,
                  K_QBLOCK: tl.constexpr):
    for n0 in tl.range(lo, hi, BLOCK_N):
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
            scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale, ks_ptr,
            BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            BIAS_KIND, HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)
    return acc, l_i, m_i


@triton.jit
def attend_band(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                lo, full_lo, full_hi, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
                window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
                q_scale, ks_ptr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                QUANT_QK: tl.constexpr, K_QBLOCK: tl.constexpr):
    """Keys [lo, hi) as `key_band` splits them: tiles cut by a mask boundary in [lo, full_lo)
    and [full_hi, hi), fully visible tiles (no mask evaluation) in [full_lo, full_hi).

    Without a left window bound [lo, full_lo) is empty, and its loop is not compiled: a
    pipelined loop costs its fill and drain even when it runs no iteration (decode.py)."""
    if HAS_LEFT:
        acc, l_i, m_i = attend_range(
            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            lo, full_lo, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left,
            window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale,
            ks_ptr, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            BIAS_KIND, HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)
    acc, l_i, m_i = attend_range(
        acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        full_lo, full_hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left,
        window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale, ks_ptr,
        BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        BIAS_KIND, HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)
    return attend_range(
        acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        full_hi, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
        scale, softcap, bias_ptr, stride_bm, stride_bn, slope, q_scale, ks_ptr,
        BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        BIAS_KIND, HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)


@triton.autotune(configs=_forward_configs(),
                 key=["seq_q_bucket", "seq_k_bucket", "HEAD_DIM_PADDED", "HAS_LEFT", "HAS_RIGHT",
                      "HAS_SOFTCAP", "BIAS_KIND", "HAS_ALIBI", "HAS_KV_LENS", "HAS_LAYOUT",
                      "LAYOUT_BLOCK", "INPUT_PRECISION", "QUANT_QK"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _flash_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bias_ptr, slopes_ptr, kv_lens_ptr,
        kv_counts_ptr, kv_indices_ptr, q_scales_ptr, k_scales_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_sb, stride_sh,
        stride_cb, stride_ch, stride_cm,
        stride_ib, stride_ih, stride_im,
        stride_qsb, stride_qsh, stride_ksb, stride_ksh,
        num_heads, group, seq_q, seq_k, offset, window_left, window_right, scale, softcap,
        seq_q_bucket, seq_k_bucket,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        HAS_LAYOUT: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        QUANT_QK: tl.constexpr, Q_QBLOCK: tl.constexpr, K_QBLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        STATIC_SEQ_Q: tl.constexpr = 0, STATIC_SEQ_K: tl.constexpr = 0):
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PADDED)
    if STATIC_SEQ_Q:  # lengths compiled in (`tuning.launch`'s specialize): bounds fold
        seq_q = STATIC_SEQ_Q
    if STATIC_SEQ_K:
        seq_k = STATIC_SEQ_K
    tl.static_assert(not QUANT_QK or Q_QBLOCK % BLOCK_M == 0)  # a tile in one scale block
    tl.static_assert(not QUANT_QK or K_QBLOCK % BLOCK_N == 0)
    tl.static_assert(not HAS_LAYOUT or LAYOUT_BLOCK % BLOCK_M == 0)
    tl.static_assert(not HAS_LAYOUT or LAYOUT_BLOCK % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal-like: late query blocks see the most keys; schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    # 64-bit: h * stride_bh of a per-head (1, 16, 16K, 16K) bias passes 2**31
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    h_kv = h // group
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)

    q_ptrs = (q_ptr + b * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptr += b * stride_kb + h_kv * stride_kh
    v_ptr += b * stride_vb + h_kv * stride_vh
    bias_ptr += b * stride_bb + h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b * stride_sb + h * stride_sh)
    q_scale = 1.0
    ks_ptr = k_scales_ptr
    if QUANT_QK:
        q_scale = tl.load(q_scales_ptr + b * stride_qsb + h * stride_qsh + m0 // Q_QBLOCK)
        ks_ptr = k_scales_ptr + b * stride_ksb + h_kv * stride_ksh
    kv_end = seq_k
    if HAS_KV_LENS:
        kv_end = tl.minimum(tl.load(kv_lens_ptr + b), seq_k)
    lo, full_lo, full_hi, hi = key_band(m0, kv_end, offset, window_left, window_right,
                                        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    if HAS_LAYOUT:
        q_block = m0 // LAYOUT_BLOCK
        counts_ptr = kv_counts_ptr + b * stride_cb + h * stride_ch + q_block * stride_cm
        indices_ptr = kv_indices_ptr + b * stride_ib + h * stride_ih + q_block * stride_im
        for i in range(0, tl.load(counts_ptr)):
            start = tl.load(indices_ptr + i) * LAYOUT_BLOCK
            for n0 in range(start, start + LAYOUT_BLOCK, BLOCK_N):
                if (n0 >= lo) & (n0 < hi):
                    if (n0 >= full_lo) & (n0 + BLOCK_N <= full_hi):
                        acc, l_i, m_i = attend_tile(
                            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn,
                            stride_vd, n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
                            window_left, window_right, scale, softcap, bias_ptr, stride_bm,
                            stride_bn, slope, q_scale, ks_ptr, BLOCK_N, HEAD_DIM,
                            HEAD_DIM_PADDED, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                            HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)
                    else:
                        acc, l_i, m_i = attend_tile(
                            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn,
                            stride_vd, n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
                            window_left, window_right, scale, softcap, bias_ptr, stride_bm,
                            stride_bn, slope, q_scale, ks_ptr, BLOCK_N, HEAD_DIM,
                            HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                            HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)
    else:
        acc, l_i, m_i = attend_band(
            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            lo, full_lo, full_hi, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
            window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
            q_scale, ks_ptr, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, INPUT_PRECISION, QUANT_QK, K_QBLOCK)

    # rows that saw no key produce zeros; their log-sum-exp is +inf so backward weights are 0
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    row_ok = offs_m < seq_q
    tl.store(lse_ptr + pid_bh * seq_q + offs_m, lse, mask=row_ok)
    out_ptrs = (out_ptr + b * stride_ob + h * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------- launcher

def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would miss fp32 verification tolerances)
    return "ieee" if dtype == torch.float32 else "tf32"


def tensor_args(params: AttentionParams, device: torch.device) -> dict:
    """The optional tensors with their strides (placeholders where a feature is off)."""
    dummy = _placeholder(device)
    bias = params.bias_BHSS
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    if bias is not None and bias.dtype == torch.bool:
        bias = bias.view(torch.uint8)
    slopes = params.slopes_BH
    counts = indices = None
    if params.layout is not None:
        counts, indices = params.layout.by_query_block(device)
    counts_strides = broadcast_strides(counts, 3)
    indices_strides = broadcast_strides(indices, 4)[:3]
    return dict(bias=bias if bias is not None else dummy, bias_strides=bias_strides,
                slopes=slopes if slopes is not None else dummy,
                slopes_strides=params.slopes_strides(),
                kv_lens=params.kv_lengths if params.kv_lengths is not None else dummy,
                counts=counts if counts is not None else dummy, counts_strides=counts_strides,
                indices=indices if indices is not None else dummy,
                indices_strides=indices_strides)


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device) -> Tensor:
    """A one-element tensor passed where a feature is off (its pointer is never read)."""
    return torch.empty(1, device=device, dtype=torch.int32)


def broadcast_strides(t: Optional[Tensor], ndim: int) -> tuple:
    if t is None:
        return (0,) * ndim
    return tuple(0 if size == 1 and i < 2 else stride
                 for i, (size, stride) in enumerate(zip(t.shape, t.stride())))


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams,
                  quant: Optional[tuple[Tensor, int, Tensor, int]] = None
                  ) -> tuple[Tensor, Tensor]:
    """(out_BHSD, lse_BHS): the kernel's output and base-2 log-sum-exp per row.

    `quant=(q_scales, q_block, k_scales, k_block)`: q and k are int8, quantized per block of
    `q_block` queries and `k_block` keys with float32 scales (B, H, ⌈Sq/q_block⌉) and
    (B, Hkv, ⌈Sk/k_block⌉) (`ops/quantized.py` makes them), and every score is their int32
    product times the two blocks' scales; v and the output stay in v's dtype."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if quant is None and flash_hopper is not None \
            and flash_hopper.hopper_reason(q, k, v, params) is None:
        return flash_hopper.hopper_forward(q, k, v, params)
    out = torch.empty(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=v.dtype)
    lse = torch.empty((params.batch, params.heads, params.q_len), device=q.device,
                      dtype=torch.float32)
    extra = tensor_args(params, q.device)
    q_scales, q_block, k_scales, k_block = quant if quant is not None \
        else (extra["kv_lens"], 1, extra["kv_lens"], 1)
    scale_strides = (q_scales.stride(0), q_scales.stride(1), k_scales.stride(0),
                     k_scales.stride(1)) if quant is not None else (0, 0, 0, 0)

    def grid(meta):
        return (cdiv(params.q_len, meta["BLOCK_M"]), params.batch * params.heads)

    args = (q, k, v, out, lse, extra["bias"], extra["slopes"], extra["kv_lens"],
            extra["counts"], extra["indices"], q_scales, k_scales,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *extra["bias_strides"],
            *extra["slopes_strides"], *extra["counts_strides"], *extra["indices_strides"],
            *scale_strides, params.heads, params.group, params.q_len, params.kv_len, params.offset,
            params.window_left, params.window_right, params.scale, params.softcap or 1.0,
            next_power_of_2(params.q_len), next_power_of_2(params.kv_len))
    launch(_flash_forward_kernel, grid, args,
           dict(HEAD_DIM=params.head_dim, HEAD_DIM_PADDED=padded_head_dim(params.head_dim),
                INPUT_PRECISION=input_precision(v.dtype), QUANT_QK=quant is not None,
                Q_QBLOCK=q_block, K_QBLOCK=k_block, **params.kernel_flags()),
           key=(q.dtype, v.dtype, args[-2], args[-1]), tune=params.worth_tuning(v.dtype),
           prune=_prune_configs,
           # (int8 operands keep run-time lengths: constant lengths were not run on a GPU there)
           specialize=params.static_lengths() if quant is None else None)
    return out, lse


# --------------------------------------------------------------------------- public entry

class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, params):
        out, lse = flash_forward(q, k, v, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from attnopt.kernels.flash_backward import flash_backward
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(grad_out, q, k, v, out, lse, ctx.params)
        return dq, dk, dv, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, attn_bias: Optional[Tensor] = None,
                    kv_lengths: Optional[Tensor] = None,
                    window: Optional[tuple[int, int]] = None,
                    block_mask: Optional[BlockSparseLayout] = None,
                    softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                    causal_alignment: str = "top_left") -> Tensor:
    """Exact attention on generated Triton kernels; semantics in `attnopt.kernels.reference`.

    q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H a multiple of Hkv (GQA/MQA, never repeated).
    `causal`: key j visible to query i when j <= i + offset (offset 0 for
    `causal_alignment="top_left"` as SDPA, Sk - Sq for "bottom_right" as a KV cache).
    `attn_bias` broadcastable to (B, H, Sq, Sk): float (added) or bool (True = attend).
    `kv_lengths` int32 (B,): keys at positions >= length are masked. `window=(left, right)`:
    keys within `left` before and `right` after the query's aligned position. `block_mask`: a
    `BlockSparseLayout`. `softcap`: `softcap * tanh(s / softcap)` on scores. `alibi_slopes`
    (H,) or (B, H): adds `-slope * |i + offset - j|`. Differentiable in q, k, v.

    Off CUDA (and outside the Triton interpreter), and when `attn_bias` needs a gradient (the
    kernels produce none for it), it runs the dense reference.
    """
    params = AttentionParams.build(q, k, v, causal=causal, scale=scale, attn_bias=attn_bias,
                                   kv_lengths=kv_lengths, window=window, block_mask=block_mask,
                                   softcap=softcap, alibi_slopes=alibi_slopes,
                                   causal_alignment=causal_alignment)
    bias_needs_grad = attn_bias is not None and attn_bias.requires_grad \
        and torch.is_grad_enabled()
    if unsupported_reason(q, k, v) is not None or bias_needs_grad:
        return flash_attention_reference(q, k, v, causal=causal, scale=scale, attn_bias=attn_bias,
                                         kv_lengths=kv_lengths, window=window,
                                         block_mask=block_mask, softcap=softcap,
                                         alibi_slopes=alibi_slopes,
                                         causal_alignment=causal_alignment)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, params)
    # no autograd graph to record: skip the autograd.Function's per-call cost
    if params.q_len <= DECODE_MAX_QUERIES and params.layout is None:
        from attnopt.kernels.decode import decode_forward, use_decode_kernel
        if use_decode_kernel(params):
            return decode_forward(q, k, v, params)
    return flash_forward(q, k, v, params)[0]


def flash_attention_for_backward(q: Tensor, k: Tensor, v: Tensor, **options
                                 ) -> tuple[Tensor, Tensor, AttentionParams]:
    """`flash_attention`'s forward on the kernel for a caller that runs the backward itself
    (the canonical op's autograd): the output, its log-sum-exp and the params, which
    `flash_backward(grad_out, q, k, v, out, lse, params)` takes. Options as `flash_attention`'s;
    the tensors must be ones the kernels run (`unsupported_reason`)."""
    params = AttentionParams.build(q, k, v, kv_lengths=options.pop("kv_lengths", None),
                                   block_mask=options.pop("block_mask", None),
                                   causal_alignment=options.pop("causal_alignment", "top_left"),
                                   **options)
    out, lse = flash_forward(q, k, v, params)
    return out, lse, params


DECODE_MAX_QUERIES = 16
