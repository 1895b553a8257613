"""The flash-attention backward: dq, dk, dv from the forward's output and log-sum-exp.

FlashAttention-2's backward (as Triton's 06-fused-attention tutorial), specialized at compile
time on the same constexpr flags as the forward (`flash.py`), with the scores recomputed tile by
tile by the shared `tiles.score_tile` so both directions see one semantics (`reference.py`):

1. `_delta_kernel`: delta_BHS = rowsum(dO * O) in float32, the softmax's correction term;
2. `_backward_kernel`, one launch of two kinds of program per (batch, kv head):
   - `_dkdv_program`, one per key block, holds its k, v tile and dk, dv accumulators in
     registers and walks the query tiles that can see the key block (the transpose of the
     forward's key band, `_query_band`; with a block layout only the query blocks listed by
     `BlockSparseLayout.by_key_block`), for each of the `group` query heads that share the kv
     head (GQA: no atomics, k and v never repeated), last tiles first;
   - `_dq_program`, one per (query block, query head of the group), over the forward's key
     band.
   Both kinds share the GPU's waves: one launch, one tail (as FlexAttention's backward does).

Per tile, with base-2 scores s and the forward's base-2 lse_BHS: p = exp2(s - lse) is the
softmax probability, dv += pᵀ dO, dp = dO vᵀ, ds = p (dp - delta) (the gradient of the natural
score), times the soft-cap's derivative 1 - tanh² where there is one; then dk += dsᵀ q · scale
and dq += ds k · scale. Rows that saw no key have lse = +inf, hence p = 0 and zero gradients.
Tiles cut by a mask boundary run with MASKED (mask evaluation, bounds checks); tiles inside the
band take the unmasked path, as in the forward. No gradient flows to the bias.

On Hopper GPUs, `flash_backward` first asks `flash_hopper_backward.hopper_backward_reason`:
the calls it takes (plain, causal, windows, ALiBi without a causal mask, from its `MIN_LENGTH`)
run that warp-specialized kernel, which does five matmuls per tile pair and adds dq with
atomics.

Shape letters: B batch, H query heads, Hkv key/value heads, S sequence, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.flash import INTERPRETER_BLOCK, broadcast_strides, \
    input_precision, last_dim_contiguous, tensor_args
from attnopt.kernels.params import AttentionParams, cdiv, interpreting, next_power_of_2, \
    padded_head_dim
from attnopt.kernels.tiles import key_band, score_tile, stable_tanh
from attnopt.kernels.tuning import launch, launch_fixed

try:  # Gluon (Triton >= 3.5) builds the warp-specialized Hopper backward
    from attnopt.kernels import flash_hopper_backward
except (ImportError, AttributeError):  # (no Gluon, or an experimental API that moved again)
    flash_hopper_backward = None

# --------------------------------------------------------------------------- configs

DELTA_BLOCK = 64  # rows per program of the delta kernel on GPU (a memory-bound row reduction)
LARGE_HEAD_DIM = 256  # padded head dims from here on get the small, low-stage configs only
FALLBACK_TILE = 32  # the tile of the one config left when a layout block rules out the rest
POS_INF = tl.constexpr(float("inf"))  # lse of padding rows: p = exp2(s - lse) = 0 there


def _backward_configs() -> list[triton.Config]:
    """BLOCK_OWN: the rows a program owns (keys for dk/dv, queries for dq); BLOCK_STEP: the
    tile it walks the other side with."""
    if interpreting():
        return [triton.Config({"BLOCK_OWN": INTERPRETER_BLOCK, "BLOCK_STEP": INTERPRETER_BLOCK},
                              num_warps=4, num_stages=1)]
    shapes = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3),
              (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2), (64, 64, 8, 2),
              (64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 1)]
    return [triton.Config({"BLOCK_OWN": own, "BLOCK_STEP": step}, num_warps=w, num_stages=s)
            for own, step, w, s in shapes]


def _fits(tile: int, head_dim: int, exact_fp32: bool, warps: int, stages: int) -> bool:
    """Whether an (own x step) tile fits registers and shared memory (sm_90 ptxas, checked
    offline) in both kinds of program: dk, dv (or dq) fp32 accumulators of (own, head dim)
    stay in registers, and fp32 without tensor cores ("ieee") needs far smaller tiles than
    fp16/bf16."""
    if exact_fp32:  # FMA dots: only 32-row steps; at head dim 256 one 32 x 32 tile
        return (tile <= 32 * 32 and stages == 1) if head_dim >= LARGE_HEAD_DIM \
            else (tile <= 64 * 32 and warps == 8 and stages == 2)
    if head_dim >= LARGE_HEAD_DIM:  # 64-row blocks on 8 warps, little pipelining
        return tile <= 64 * 64 and warps == 8 and stages <= 2
    if head_dim >= 128:  # 4 warps only on small tiles (128 x 64 on 8 warps: fastest at 4K)
        return stages >= 2 and tile <= 128 * 64 and (warps == 8 or tile <= 64 * 32)
    return stages >= 2


def _prune_configs(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM_PADDED", named_args.get("HEAD_DIM_PADDED"))
    layout_block = kwargs.get("LAYOUT_BLOCK", named_args.get("LAYOUT_BLOCK", 0))
    exact_fp32 = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "ieee"
    kept = []
    for config in configs:
        own, step = config.kwargs["BLOCK_OWN"], config.kwargs["BLOCK_STEP"]
        if layout_block and (layout_block % own or layout_block % step):
            continue
        if _fits(own * step, head_dim, exact_fp32, config.num_warps, config.num_stages):
            kept.append(config)
    if kept:
        return kept
    # a layout block smaller than (or not divisible by) every kept tile
    block = min(layout_block or FALLBACK_TILE, FALLBACK_TILE)
    return [triton.Config({"BLOCK_OWN": block, "BLOCK_STEP": block}, num_warps=4, num_stages=2)]


_TUNING_KEY = ["seq_q_bucket", "seq_k_bucket", "HEAD_DIM_PADDED", "HAS_LEFT", "HAS_RIGHT",
               "HAS_SOFTCAP", "BIAS_KIND", "HAS_ALIBI", "HAS_KV_LENS", "HAS_LAYOUT",
               "LAYOUT_BLOCK", "INPUT_PRECISION"]


# --------------------------------------------------------------------------- kernels

@triton.jit
def _delta_kernel(out_ptr, do_ptr, delta_ptr,
                  stride_ob, stride_oh, stride_om, stride_od,
                  stride_dob, stride_doh, stride_dom, stride_dod,
                  num_heads, seq_q,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # 64-bit offsets, as the forward's
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    in_bounds = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    out = tl.load(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                  + offs_d[None, :] * stride_od, mask=in_bounds, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=in_bounds, other=0.0)
    delta = tl.sum(out.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _query_band(n0, seq_q, kv_end, offset, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For keys [n0, n0 + BLOCK_N): (lo, full_lo, full_hi, hi), the transpose of `key_band`.

    Queries outside [lo, hi) see none of these keys; query tiles starting in
    [full_lo, full_hi) see all of them and lie inside seq_q (no mask, no bounds checks);
    lo, full_lo and full_hi are multiples of BLOCK_M.
    """
    lo = 0
    hi = tl.where(n0 < kv_end, seq_q, 0)
    full_lo = 0
    full_hi = tl.where(n0 + BLOCK_N <= kv_end, (seq_q // BLOCK_M) * BLOCK_M, 0)
    if HAS_RIGHT:  # query i >= j - offset - right
        lo = (tl.maximum(n0 - offset - window_right, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(n0 + BLOCK_N - 1 - offset - window_right, 0)
        full_lo = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # query i <= j - offset + left
        hi = tl.minimum(hi, tl.maximum(n0 + BLOCK_N - offset + window_left, 0))
        full_hi = tl.minimum(full_hi,
                             (tl.maximum(n0 - offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_block_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    m0, offs_n, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
                    scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_PADDED: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """One query tile's contribution to a key block: returns updated (dk, dv); dk unscaled.

    Computed key-major (scores transposed, (BLOCK_N, BLOCK_M)) so that pᵀ and dsᵀ, the left
    operands of the dv and dk products, come out of the math in place: only loaded tiles are
    ever transposed, never computed ones (which would cost a shared-memory round trip)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qt_ptrs = q_ptr + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd
    do_ptrs = do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    if MASKED:
        row_ok = offs_m < seq_q
        qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=POS_INF)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    else:
        if HEAD_DIM != HEAD_DIM_PADDED:
            qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            do = tl.load(do_ptrs)
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    qkt = tl.dot(k, qt, input_precision=INPUT_PRECISION)
    st = score_tile(qkt, offs_m[None, :], offs_n[:, None], seq_q, seq_k, kv_end, offset,
                    window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn,
                    slope, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
    pt = tl.exp2(st - lse[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    if HAS_SOFTCAP:
        tanh = stable_tanh(qkt * (scale / softcap))
        dst = dst * (1.0 - tanh * tanh)
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _key_block_range(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr,
                     stride_qm, stride_qd, stride_dom, stride_dod,
                     lo, hi, offs_n, offs_d, seq_q, seq_k, kv_end, offset, window_left,
                     window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
                     BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_PADDED: tl.constexpr, MASKED: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """Query tiles starting at lo, lo + BLOCK_M, ... below hi, walked from the last down (see
    `_dkdv_program` for why)."""
    last = lo + ((hi - lo + BLOCK_M - 1) // BLOCK_M - 1) * BLOCK_M
    for step in tl.range(0, (hi - lo + BLOCK_M - 1) // BLOCK_M):
        m0 = last - step * BLOCK_M
        dk, dv = _key_block_tile(
            dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qm, stride_qd,
            stride_dom, stride_dod, m0, offs_n, offs_d, seq_q, seq_k, kv_end, offset,
            window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
            BLOCK_M, HEAD_DIM, HEAD_DIM_PADDED, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            BIAS_KIND, HAS_ALIBI, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_program(
        pid_n, b, h_kv,
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        bias_ptr, slopes_ptr, kv_lens_ptr, q_counts_ptr, q_indices_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_sb, stride_sh,
        stride_cb, stride_ch, stride_cn,
        stride_ib, stride_ih, stride_in,
        num_heads, group, seq_q, seq_k, offset, window_left, window_right, scale, softcap,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        HAS_LAYOUT: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of keys [pid_n * BLOCK_N, + BLOCK_N) of kv head h_kv, stepping BLOCK_M queries
    through each of the `group` query heads that read it.

    The query tiles are walked from the last down. Under a causal mask the key blocks of one
    head see different query ranges, [n0, seq_q): walked upwards, the programs running side by
    side would each read a different q/dO tile at any moment; walked downwards they read the
    same tile at about the same time, and it comes from L2 (as the dq and forward programs,
    which all start at key 0, do)."""
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)

    key_in_bounds = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=key_in_bounds, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=key_in_bounds, other=0.0)
    kv_end = seq_k
    if HAS_KV_LENS:
        kv_end = tl.minimum(tl.load(kv_lens_ptr + b), seq_k)
    lo, full_lo, full_hi, hi = _query_band(n0, seq_q, kv_end, offset, window_left, window_right,
                                           BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    for g in range(0, group):  # the query heads reading this kv head
        h = h_kv * group + g
        q_head_ptr = q_ptr + b * stride_qb + h * stride_qh
        do_head_ptr = do_ptr + b * stride_dob + h * stride_doh
        lse_head_ptr = lse_ptr + (b * num_heads + h) * seq_q
        delta_head_ptr = delta_ptr + (b * num_heads + h) * seq_q
        bias_head_ptr = bias_ptr + b * stride_bb + h * stride_bh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + b * stride_sb + h * stride_sh)
        if HAS_LAYOUT:
            key_block = n0 // LAYOUT_BLOCK
            count = tl.load(q_counts_ptr + b * stride_cb + h * stride_ch + key_block * stride_cn)
            indices_ptr = q_indices_ptr + b * stride_ib + h * stride_ih + key_block * stride_in
            for i in range(0, count):
                start = tl.load(indices_ptr + i) * LAYOUT_BLOCK
                for m0 in range(start, start + LAYOUT_BLOCK, BLOCK_M):
                    if (m0 >= lo) & (m0 < hi):
                        if (m0 >= full_lo) & (m0 + BLOCK_M <= full_hi):
                            dk, dv = _key_block_tile(
                                dk, dv, k, v, q_head_ptr, do_head_ptr, lse_head_ptr,
                                delta_head_ptr, stride_qm, stride_qd, stride_dom, stride_dod,
                                m0, offs_n, offs_d, seq_q, seq_k, kv_end, offset, window_left,
                                window_right, scale, softcap, bias_head_ptr, stride_bm,
                                stride_bn, slope, BLOCK_M, HEAD_DIM, HEAD_DIM_PADDED, False,
                                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI,
                                INPUT_PRECISION)
                        else:
                            dk, dv = _key_block_tile(
                                dk, dv, k, v, q_head_ptr, do_head_ptr, lse_head_ptr,
                                delta_head_ptr, stride_qm, stride_qd, stride_dom, stride_dod,
                                m0, offs_n, offs_d, seq_q, seq_k, kv_end, offset, window_left,
                                window_right, scale, softcap, bias_head_ptr, stride_bm,
                                stride_bn, slope, BLOCK_M, HEAD_DIM, HEAD_DIM_PADDED, True,
                                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI,
                                INPUT_PRECISION)
        else:
            # last query tiles first: see the docstring
            dk, dv = _key_block_range(
                dk, dv, k, v, q_head_ptr, do_head_ptr, lse_head_ptr, delta_head_ptr,
                stride_qm, stride_qd, stride_dom, stride_dod, full_hi, hi, offs_n, offs_d,
                seq_q, seq_k, kv_end, offset, window_left, window_right, scale, softcap,
                bias_head_ptr, stride_bm, stride_bn, slope, BLOCK_M, HEAD_DIM, HEAD_DIM_PADDED,
                True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, INPUT_PRECISION)
            dk, dv = _key_block_range(
                dk, dv, k, v, q_head_ptr, do_head_ptr, lse_head_ptr, delta_head_ptr,
                stride_qm, stride_qd, stride_dom, stride_dod, full_lo, full_hi, offs_n, offs_d,
                seq_q, seq_k, kv_end, offset, window_left, window_right, scale, softcap,
                bias_head_ptr, stride_bm, stride_bn, slope, BLOCK_M, HEAD_DIM, HEAD_DIM_PADDED,
                False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, INPUT_PRECISION)
            if HAS_RIGHT:  # (else [lo, full_lo) is empty: no loop compiled, see flash.py)
                dk, dv = _key_block_range(
                    dk, dv, k, v, q_head_ptr, do_head_ptr, lse_head_ptr, delta_head_ptr,
                    stride_qm, stride_qd, stride_dom, stride_dod, lo, full_lo, offs_n, offs_d,
                    seq_q, seq_k, kv_end, offset, window_left, window_right, scale, softcap,
                    bias_head_ptr, stride_bm, stride_bn, slope, BLOCK_M, HEAD_DIM,
                    HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                    HAS_ALIBI, INPUT_PRECISION)

    dk = dk * scale
    out_in_bounds = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    tl.store(dk_ptr + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), mask=out_in_bounds)
    tl.store(dv_ptr + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=out_in_bounds)


@triton.jit
def _query_block_tile(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn,
                      stride_vd, n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left,
                      window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PADDED: tl.constexpr, MASKED: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key tile's contribution to a query block: returns the updated dq (unscaled)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    vt_ptrs = v_ptr + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
        vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM),
                     other=0.0)
    elif HEAD_DIM != HEAD_DIM_PADDED:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    s = score_tile(qk, offs_m[:, None], offs_n[None, :], seq_q, seq_k, kv_end, offset,
                   window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn,
                   slope, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        tanh = stable_tanh(qk * (scale / softcap))
        ds = ds * (1.0 - tanh * tanh)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _query_block_range(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn,
                       stride_vd, lo, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
                       window_left, window_right, scale, softcap, bias_ptr, stride_bm,
                       stride_bn, slope, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_PADDED: tl.constexpr, MASKED: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    for n0 in tl.range(lo, hi, BLOCK_N):
        dq = _query_block_tile(
            dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            n0, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right, scale,
            softcap, bias_ptr, stride_bm, stride_bn, slope, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED,
            MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, INPUT_PRECISION)
    return dq


@triton.jit
def _dq_program(
        pid_m, b, h,
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        bias_ptr, slopes_ptr, kv_lens_ptr, kv_counts_ptr, kv_indices_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_sb, stride_sh,
        stride_cb, stride_ch, stride_cm,
        stride_ib, stride_ih, stride_im,
        num_heads, group, seq_q, seq_k, offset, window_left, window_right, scale, softcap,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        HAS_LAYOUT: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of queries [pid_m * BLOCK_M, + BLOCK_M) of query head h, stepping BLOCK_N keys
    through the forward's key band."""
    h_kv = h // group
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)

    row_ok = offs_m < seq_q
    in_bounds = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=in_bounds, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=in_bounds, other=0.0)
    row_base = (b * num_heads + h) * seq_q
    lse = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=POS_INF)
    delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
    k_ptr += b * stride_kb + h_kv * stride_kh
    v_ptr += b * stride_vb + h_kv * stride_vh
    bias_ptr += b * stride_bb + h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b * stride_sb + h * stride_sh)
    kv_end = seq_k
    if HAS_KV_LENS:
        kv_end = tl.minimum(tl.load(kv_lens_ptr + b), seq_k)
    lo, full_lo, full_hi, hi = key_band(m0, kv_end, offset, window_left, window_right,
                                        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    if HAS_LAYOUT:
        q_block = m0 // LAYOUT_BLOCK
        count = tl.load(kv_counts_ptr + b * stride_cb + h * stride_ch + q_block * stride_cm)
        indices_ptr = kv_indices_ptr + b * stride_ib + h * stride_ih + q_block * stride_im
        for i in range(0, count):
            start = tl.load(indices_ptr + i) * LAYOUT_BLOCK
            for n0 in range(start, start + LAYOUT_BLOCK, BLOCK_N):
                if (n0 >= lo) & (n0 < hi):
                    if (n0 >= full_lo) & (n0 + BLOCK_N <= full_hi):
                        dq = _query_block_tile(
                            dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd,
                            stride_vn, stride_vd, n0, offs_m, offs_d, seq_q, seq_k, kv_end,
                            offset, window_left, window_right, scale, softcap, bias_ptr,
                            stride_bm, stride_bn, slope, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED,
                            False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI,
                            INPUT_PRECISION)
                    else:
                        dq = _query_block_tile(
                            dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd,
                            stride_vn, stride_vd, n0, offs_m, offs_d, seq_q, seq_k, kv_end,
                            offset, window_left, window_right, scale, softcap, bias_ptr,
                            stride_bm, stride_bn, slope, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED,
                            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI,
                            INPUT_PRECISION)
    else:
        if HAS_LEFT:  # (else [lo, full_lo) is empty: no loop compiled, see flash.py)
            dq = _query_block_range(
                dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn,
                stride_vd, lo, full_lo, offs_m, offs_d, seq_q, seq_k, kv_end, offset,
                window_left, window_right, scale, softcap, bias_ptr, stride_bm, stride_bn,
                slope, BLOCK_N, HEAD_DIM, HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, INPUT_PRECISION)
        dq = _query_block_range(
            dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            full_lo, full_hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left,
            window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PADDED, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
            HAS_ALIBI, INPUT_PRECISION)
        dq = _query_block_range(
            dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            full_hi, hi, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left,
            window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
            HAS_ALIBI, INPUT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=in_bounds)


@triton.autotune(configs=_backward_configs(), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _backward_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
        bias_ptr, slopes_ptr, kv_lens_ptr, kv_counts_ptr, kv_indices_ptr, q_counts_ptr,
        q_indices_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_sb, stride_sh,
        stride_kvcb, stride_kvch, stride_kvcm,
        stride_kvib, stride_kvih, stride_kvim,
        stride_qcb, stride_qch, stride_qcn,
        stride_qib, stride_qih, stride_qin,
        num_heads, kv_heads, group, seq_q, seq_k, offset, window_left, window_right, scale,
        softcap, seq_q_bucket, seq_k_bucket,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        HAS_LAYOUT: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_OWN: tl.constexpr, BLOCK_STEP: tl.constexpr,
        STATIC_SEQ_Q: tl.constexpr = 0, STATIC_SEQ_K: tl.constexpr = 0):
    """Grid (key blocks + group * query blocks, B * Hkv): the first programs of each kv head
    compute dk, dv for BLOCK_OWN keys, the rest dq for BLOCK_OWN queries of one of its query
    heads, both stepping BLOCK_STEP rows of the other side. One launch instead of two: the
    two kinds of program share the GPU's waves (one tail instead of two)."""
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PADDED)
    if STATIC_SEQ_Q:  # lengths compiled in (`tuning.launch`'s specialize): bounds fold
        seq_q = STATIC_SEQ_Q
    if STATIC_SEQ_K:
        seq_k = STATIC_SEQ_K
    tl.static_assert(not HAS_LAYOUT or LAYOUT_BLOCK % BLOCK_OWN == 0)
    tl.static_assert(not HAS_LAYOUT or LAYOUT_BLOCK % BLOCK_STEP == 0)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)  # 64-bit offsets, as the forward's
    h_kv = (pid_bh % kv_heads).to(tl.int64)
    key_blocks = tl.cdiv(seq_k, BLOCK_OWN)
    if pid < key_blocks:
        _dkdv_program(
            pid, b, h_kv, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
            bias_ptr, slopes_ptr, kv_lens_ptr, q_counts_ptr, q_indices_ptr,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
            stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh,
            stride_dom, stride_dod, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
            stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_bb, stride_bh, stride_bm,
            stride_bn, stride_sb, stride_sh, stride_qcb, stride_qch, stride_qcn, stride_qib,
            stride_qih, stride_qin, num_heads, group, seq_q, seq_k, offset, window_left,
            window_right, scale, softcap, HEAD_DIM, HEAD_DIM_PADDED, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, HAS_KV_LENS, HAS_LAYOUT, LAYOUT_BLOCK,
            INPUT_PRECISION, BLOCK_STEP, BLOCK_OWN)
    else:
        query_blocks = tl.cdiv(seq_q, BLOCK_OWN)
        pid_q = pid - key_blocks
        pid_m = pid_q % query_blocks
        if HAS_RIGHT:  # causal-like: late query blocks see the most keys; schedule them first
            pid_m = query_blocks - 1 - pid_m
        _dq_program(
            pid_m, b, h_kv * group + pid_q // query_blocks, q_ptr, k_ptr, v_ptr, do_ptr,
            lse_ptr, delta_ptr, dq_ptr, bias_ptr, slopes_ptr, kv_lens_ptr, kv_counts_ptr,
            kv_indices_ptr, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
            stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_dob,
            stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
            stride_dqd, stride_bb, stride_bh, stride_bm, stride_bn, stride_sb, stride_sh,
            stride_kvcb, stride_kvch, stride_kvcm, stride_kvib, stride_kvih, stride_kvim,
            num_heads, group, seq_q, seq_k, offset, window_left, window_right, scale, softcap,
            HEAD_DIM, HEAD_DIM_PADDED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI,
            HAS_KV_LENS, HAS_LAYOUT, LAYOUT_BLOCK, INPUT_PRECISION, BLOCK_OWN, BLOCK_STEP)


# --------------------------------------------------------------------------- launcher

def flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   params: AttentionParams) -> tuple[Tensor, Tensor, Tensor]:
    """(dq_BHSD, dk_BHkvSD, dv_BHkvSD) with q's, k's and v's shapes and dtype, from the forward's
    out_BHSD and base-2 lse_BHS (float32, contiguous, +inf on rows that saw no key)."""
    if flash_hopper_backward is not None \
            and flash_hopper_backward.hopper_backward_reason(params, q) is None:
        return flash_hopper_backward.hopper_backward(grad_out, q, k, v, out, lse, params)
    q, k, v, out, grad_out = (last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    device = q.device
    batch, heads, kv_heads = params.batch, params.heads, params.kv_heads
    head_dim, head_dim_padded = params.head_dim, padded_head_dim(params.head_dim)
    dq = torch.empty(q.shape, device=device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=device, dtype=v.dtype)
    delta = torch.empty((batch, heads, params.q_len), device=device, dtype=torch.float32)

    delta_block = INTERPRETER_BLOCK if interpreting() else DELTA_BLOCK
    launch_fixed(_delta_kernel, (cdiv(params.q_len, delta_block), batch * heads), (
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, params.q_len),
        dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_M=delta_block))

    extra = tensor_args(params, device)
    q_counts = q_indices = extra["counts"]  # placeholders without a layout
    q_counts_strides, q_indices_strides = (0, 0, 0), (0, 0, 0)
    if params.layout is not None:
        q_counts, q_indices = params.layout.by_key_block(device)
        q_counts_strides = broadcast_strides(q_counts, 3)
        q_indices_strides = broadcast_strides(q_indices, 4)[:3]
    scalars = dict(seq_q=params.q_len, seq_k=params.kv_len, offset=params.offset,
                   window_left=params.window_left, window_right=params.window_right,
                   scale=params.scale, softcap=params.softcap or 1.0,
                   seq_q_bucket=next_power_of_2(params.q_len),
                   seq_k_bucket=next_power_of_2(params.kv_len),
                   HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
                   INPUT_PRECISION=input_precision(q.dtype), **params.kernel_flags())

    def grid(meta):
        own = meta["BLOCK_OWN"]
        return (cdiv(params.kv_len, own) + params.group * cdiv(params.q_len, own),
                batch * kv_heads)

    launch(_backward_kernel, grid, (
        q, k, v, grad_out, lse, delta, dq, dk, dv,
        extra["bias"], extra["slopes"], extra["kv_lens"], extra["counts"], extra["indices"],
        q_counts, q_indices,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(),
        *dv.stride(), *extra["bias_strides"], *extra["slopes_strides"], *extra["counts_strides"],
        *extra["indices_strides"], *q_counts_strides, *q_indices_strides,
        heads, kv_heads, params.group), scalars,
        key=(q.dtype, scalars["seq_q_bucket"], scalars["seq_k_bucket"]),
        tune=params.worth_tuning(q.dtype), prune=_prune_configs,
        specialize=params.static_lengths())
    return dq, dk, dv
