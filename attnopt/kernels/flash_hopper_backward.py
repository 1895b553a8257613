"""The exact backward on Hopper GPUs (sm_90): dq, dk, dv in one warp-specialized Gluon kernel.

`flash_backward.py`'s Triton kernel runs two kinds of program, key blocks (dk, dv) and query
blocks (dq), which both recompute the scores and dO·Vᵀ: seven matmuls per pair of tiles. This
kernel does five, as FlashAttention-3 and cuDNN do: each program owns a key block, and adds its
share of dq (dS·K) to a float32 accumulator with atomics.

Before it, `_prepare_kernel` computes delta = rowsum(dO ∘ O), copies the forward's base-2
log-sum-exp, and zeroes the accumulator, all padded to whole 64-row tiles (lse +inf and delta 0
on the padding rows, which then contribute nothing, and the atomics need no masks).

Each program owns 64·CONSUMERS keys of one (batch, kv head), in four partitions:
- the producer (one warp) TMA-loads the program's K and V once, then, for every query head of
  the kv head's group and every 64-row query tile that sees the keys, Q with its lse and dO
  with its delta into a ring of STAGES buffers (`q_ready`, `do_ready`; `qdo_empty` takes one
  arrive per consumer);
- consumer C (one warpgroup) owns keys [n0 + 64·C, + 64) and keeps their dK and dV in
  registers. Per query tile it computes, key-major so that Pᵀ and dSᵀ are the left operands of
  the dV and dK products (computed tiles are never transposed):
      Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2 e − lse), dV += Pᵀ·dO,
      dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta)·scale, dK += dSᵀ·Q;
  dSᵀ goes through shared memory (dK reads it from there). The consumers take turns computing
  a tile's dQ = dS·K over all the program's keys (tile i: consumer i mod CONSUMERS, one tile
  later, so that the consumers need not move in step); `ds_ready` (one arrive per consumer)
  says a tile's dSᵀ is whole, `ds_free` that its reader is done with the buffer;
- the reading consumer stages dQ, DQ_COLS columns at a time, in a ring of DQ_STAGES float32
  buffers (`dq_full`, `dq_empty`), and the writer partition (WRITER_WARPS warps) adds them to
  the accumulator with `red.global.add.v4.f32`, so that the consumers go back to their
  matmuls while the atomics drain;
- dq is the accumulator cast to the input dtype afterwards.

Query tiles are walked from the last down, as `flash_backward.py`'s dk/dv programs do: under a
causal mask the programs running side by side then read the same Q and dO tiles from L2.

ALiBi slopes add −slope·|row + offset − key| to each score. Under a causal mask, where every
visible key has key <= row + offset, that is slope·(key − m0 − offset) − slope·(row − m0) for
the tile's first row m0: a vector over the keys, and one over the rows that joins the
log-sum-exp, as the forward computes it (`flash_hopper._softmax_tile`). A causal window
narrows the query tiles a key block sees to [n0 − offset, n0 + keys − 1 − offset +
window_left] and masks the tiles its edges cut.

`hopper_backward_reason` says when a call runs here: the forward kernel's specs (fp16/bf16,
head dim 64 or 128, no mask or a causal one at offset >= 0, GQA, ALiBi slopes, causal windows,
(B, H, S, D) or (B, S, H, D) views, any lengths) from `MIN_LENGTH`, except ALiBi under a causal
mask (`CAUSAL_ALIBI`: measured no faster than the Triton backward). Biases, soft-caps, key
lengths and block layouts run `flash_backward.py`'s kernel. `ATTNOPT_HOPPER_BACKWARD=0` turns
this kernel off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnopt.kernels.flash_hopper import ROWS, _descriptor, _device_reason, _tma_load, \
    _tma_store, descriptor, register_split, scope_reason, shorter_than, tma_operand
from attnopt.kernels.params import AttentionParams, cdiv, interpreting
from attnopt.kernels.tuning import launch_fixed

ENV = "ATTNOPT_HOPPER_BACKWARD"
DQ_COLS = gl.constexpr(64)  # dQ columns per product (registers)
DQ_STAGES = gl.constexpr(2)  # dQ parts staged for the writer partition
WRITER_WARPS = gl.constexpr(2)  # the writer partition's warps
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class BackwardConfig:
    stages: int       # Q/dO tiles in flight
    consumers: int    # consumer warpgroups (64 keys each)

    def registers(self) -> tuple[int, int]:
        """(maxnreg, registers per consumer): the producer and writer warps share the last
        warpgroup and its PRODUCER_REGS."""
        return register_split(self.consumers)


CONFIGS = {128: BackwardConfig(stages=2, consumers=2),
           64: BackwardConfig(stages=2, consumers=2)}
#: the shortest query and key lengths that run here, per (head dim, causal): below them the
#: autotuned flash_backward.py kernel was as fast or faster on the H100 (docs/BENCHMARKS.md,
#: "The warp-specialized Hopper backward")
MIN_LENGTH = {(128, False): 1024, (64, False): 1024, (128, True): 2048, (64, True): 2048}
#: whether ALiBi under a causal mask runs here: off, this kernel was 0.97x (2K) and 1.00x (4K)
#: the speed of the autotuned flash_backward.py kernel (docs/BENCHMARKS.md, "The
#: warp-specialized Hopper backward")
CAUSAL_ALIBI = False


# --------------------------------------------------------------------------- kernels

@triton.jit
def _prepare_kernel(out_ptr, do_ptr, lse_ptr, lse_pad_ptr, delta_ptr, dq_ptr,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    heads, seq_q, padded_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """For BLOCK_M rows of one (batch, head), padded to whole tiles: delta = rowsum(dO ∘ O)
    (0 past the end), the log-sum-exp (+inf past the end), and dQ's accumulator zeroed."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    inside = rows < seq_q
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
                + cols[None, :], mask=inside[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + cols[None, :], mask=inside[:, None], other=0.0)
    tl.store(delta_ptr + bh * padded_q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))
    tl.store(lse_pad_ptr + bh * padded_q + rows,
             tl.load(lse_ptr + bh * seq_q + rows, mask=inside, other=float("inf")))
    tl.store(dq_ptr + (bh * padded_q + rows)[:, None] * HEAD_DIM + cols[None, :],
             tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32))


@gluon.jit
def _query_tile(it, n_m, m_hi, h_kv, group):
    """Iteration `it`'s (query head, first row): heads of the group in turn, each walking its
    query tiles from the last (m_hi − 1) down."""
    return h_kv * group + it // n_m, (m_hi - 1 - it % n_m) * 64


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem,
              v_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready, qdo_empty, b, h_kv,
              group, heads, n0, m_hi, n_m, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + CONSUMERS * v_desc.block_type.nbytes)
    _tma_load(k_desc, [b, h_kv, n0, 0], kv_bar, k_smem)
    for c in gl.static_range(CONSUMERS):
        _tma_load(v_desc, [b, h_kv, n0 + c * 64, 0], kv_bar, v_smem.index(c))
    for it in range(group * n_m):
        s = it % STAGES
        h, m0 = _query_tile(it, n_m, m_hi, h_kv, group)
        mbarrier.wait(qdo_empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + lse_desc.block_type.nbytes)
        _tma_load(q_desc, [b, h, m0, 0], q_ready.index(s), q_smem.index(s))
        _tma_load(lse_desc, [b * heads + h, m0], q_ready.index(s), lse_smem.index(s))
        mbarrier.expect(do_ready.index(s),
                        do_desc.block_type.nbytes + delta_desc.block_type.nbytes)
        _tma_load(do_desc, [b, h, m0, 0], do_ready.index(s), do_smem.index(s))
        _tma_load(delta_desc, [b * heads + h, m0], do_ready.index(s), delta_smem.index(s))


@gluon.jit
def _red_add(ptrs, values):
    """*ptrs += values, four float32 at a time (`red.global.add.v4.f32`: one instruction per 16
    bytes where `gl.atomic_add` issues one per element; the result is not returned)."""
    gl.inline_asm_elementwise(
        "red.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\t"
        "mov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\tmov.b32 $2, 0;\n\tmov.b32 $3, 0;",
        "=r,=r,=r,=r,l,l,l,l,r,r,r,r", [ptrs.to(gl.int64), values.to(gl.int32, bitcast=True)],
        gl.int32, is_pure=False, pack=4)


@gluon.jit
def _tile_dq(j, ds_smem, k_all, dq_smem, ds_ready, ds_free, dq_full, dq_empty,
             C: gl.constexpr, HEAD_DIM: gl.constexpr, CONSUMERS: gl.constexpr):
    """If consumer C reads tile j's dS (j mod CONSUMERS == C): dQ = dS·K over the program's
    keys, DQ_COLS columns at a time into the staging ring the writer partition adds from."""
    buf = j % CONSUMERS
    if buf == C:
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ_COLS, 16])
        mbarrier.wait(ds_ready.index(buf), (j // CONSUMERS) & 1)
        ds = ds_smem.index(buf).permute((1, 0))
        for part in gl.static_range(HEAD_DIM // DQ_COLS):
            n = j * (HEAD_DIM // DQ_COLS) + part
            mbarrier.wait(dq_empty.index(n % DQ_STAGES), ((n // DQ_STAGES) & 1) ^ 1)
            dq = warpgroup_mma(ds, k_all.slice(part * DQ_COLS, DQ_COLS, dim=1),
                               gl.zeros([64, DQ_COLS], gl.float32, layout=dq_layout),
                               use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq, ))
            dq_smem.index(n % DQ_STAGES).store(dq)
            mbarrier.arrive(dq_full.index(n % DQ_STAGES), count=1)
        mbarrier.arrive(ds_free.index(buf), count=1)


@gluon.jit
def _write_dq(dq_ptr, dq_smem, dq_full, dq_empty, b, h_kv, group, heads, n_m, m_hi, q_tiles,
              HEAD_DIM: gl.constexpr, WARPS: gl.constexpr):
    """The writer partition: each staged dQ part, in order, added to the float32 accumulator
    (rows padded to a multiple of 64: no masks) a few rows at a time."""
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // DQ_COLS, DQ_COLS // 4],
                                            [WARPS, 1], [1, 0])
    rows_per_step: gl.constexpr = 8  # (the staging layout's swizzle period)
    chunk_rows = gl.arange(0, rows_per_step, layout=gl.SliceLayout(1, layout))
    chunk_cols = gl.arange(0, DQ_COLS, layout=gl.SliceLayout(0, layout))
    offsets = chunk_rows[:, None] * HEAD_DIM + chunk_cols[None, :]
    for j in range(group * n_m):
        h, m0 = _query_tile(j, n_m, m_hi, h_kv, group)
        tile_ptr = dq_ptr + ((b * heads + h).to(gl.int64) * q_tiles * 64 + m0) * HEAD_DIM
        for part in gl.static_range(HEAD_DIM // DQ_COLS):
            n = j * (HEAD_DIM // DQ_COLS) + part
            mbarrier.wait(dq_full.index(n % DQ_STAGES), (n // DQ_STAGES) & 1)
            staged = dq_smem.index(n % DQ_STAGES)
            for r in gl.static_range(0, 64, rows_per_step):
                _red_add(tile_ptr + r * HEAD_DIM + part * DQ_COLS + offsets,
                         staged.slice(r, rows_per_step).load(layout))
            mbarrier.arrive(dq_empty.index(n % DQ_STAGES), count=1)


@gluon.jit
def _consume(dk_desc, dv_desc, dq_ptr, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
             ds_smem, dq_smem, kv_bar, q_ready, do_ready, qdo_empty, ds_ready, ds_free, dq_full,
             dq_empty,
             slopes_ptr, stride_sb, stride_sh, b, h_kv, group, heads, n0, m_hi, n_m, offset,
             window_left, qk_scale, scale, C: gl.constexpr, HEAD_DIM: gl.constexpr,
             STAGES: gl.constexpr, CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
             HAS_WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr):
    """Consumer C: keys [n0 + 64·C, + 64), over every query tile of the program."""
    dtype: gl.constexpr = dk_desc.dtype
    # Sᵀ, dPᵀ: (64 keys, 64 queries); dK, dV, dQ: (64 rows, head dim)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    k_all = k_smem.reshape([CONSUMERS * 64, HEAD_DIM])
    k_c = k_all.slice(C * 64, 64)
    v_c = v_smem.index(C).reshape([64, HEAD_DIM])
    keys = n0 + C * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    tile_cols = gl.arange(0, 64, layout=gl.SliceLayout(0, s_layout))
    no_scores = gl.zeros([64, 64], gl.float32, layout=s_layout)
    dk = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    dv = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    mbarrier.wait(kv_bar, 0)

    for it in range(group * n_m):
        if it > 0:  # the last tile's dQ, one tile late: the consumers need not wait in step
            _tile_dq(it - 1, ds_smem, k_all, dq_smem, ds_ready, ds_free, dq_full, dq_empty, C,
                     HEAD_DIM, CONSUMERS)
        s = it % STAGES
        phase = (it // STAGES) & 1
        h, m0 = _query_tile(it, n_m, m_hi, h_kv, group)
        rows = m0 + tile_cols
        q_t = q_smem.index(s).reshape([64, HEAD_DIM])
        do_t = do_smem.index(s).reshape([64, HEAD_DIM])

        mbarrier.wait(q_ready.index(s), phase)
        st = warpgroup_mma(k_c, q_t.permute((1, 0)), no_scores, use_acc=False, is_async=True)
        lse = lse_smem.index(s).reshape([64]).load(gl.SliceLayout(0, s_layout))
        st = warpgroup_mma_wait(0, deps=(st, ))
        if HAS_ALIBI:  # -slope·|row + offset − key|, base 2
            slope2 = gl.load(slopes_ptr + b * stride_sb + h * stride_sh) * 1.4426950408889634
            if CAUSAL:  # visible keys have key <= row + offset: a term per key, one per row
                st = st * qk_scale + ((keys - m0 - offset).to(gl.float32) * slope2)[:, None]
                lse = lse + tile_cols.to(gl.float32) * slope2
            else:
                distance = gl.abs(rows[None, :] + offset - keys[:, None]).to(gl.float32)
                st = st * qk_scale - distance * slope2
        else:
            st = st * qk_scale
        if CAUSAL:
            first = n0 + C * 64
            masked = first + 63 > m0 + offset  # keys past some row's diagonal
            if HAS_WINDOW:  # or before some row's window
                masked = masked | (first < m0 + 63 + offset - window_left)
            if masked:
                visible = keys[:, None] <= rows[None, :] + offset
                if HAS_WINDOW:
                    visible = visible & (keys[:, None] >= rows[None, :] + offset - window_left)
                st = gl.where(visible, st, float("-inf"))
        pt = gl.exp2(st - lse[None, :])
        mbarrier.wait(do_ready.index(s), phase)
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do_t, dv, is_async=True)
        dpt = warpgroup_mma(v_c, do_t.permute((1, 0)), no_scores, use_acc=False, is_async=True)
        delta = delta_smem.index(s).reshape([64]).load(gl.SliceLayout(0, s_layout))
        dpt, dv = warpgroup_mma_wait(0, deps=(dpt, dv))
        dst = (pt * (dpt - delta[None, :]) * scale).to(dtype)

        # dSᵀ goes through shared memory: the A operand of dK here, and of the tile's dQ = dS·K
        # for consumer `it mod CONSUMERS`, which reads every consumer's rows (`_tile_dq`)
        buf = it % CONSUMERS
        if buf != C:  # the buffer's reader is done with its last use
            mbarrier.wait(ds_free.index(buf), ((it // CONSUMERS) & 1) ^ 1)
        ds_c = ds_smem.index(buf).slice(C * 64, 64)
        ds_c.store(dst)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(buf), count=1)
        dk = warpgroup_mma(ds_c, q_t, dk, is_async=True)
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
        mbarrier.arrive(qdo_empty.index(s), count=1)
    if group * n_m > 0:
        _tile_dq(group * n_m - 1, ds_smem, k_all, dq_smem, ds_ready, ds_free, dq_full, dq_empty,
                 C, HEAD_DIM, CONSUMERS)

    # V_C is read by this consumer only: its buffer carries dV, then dK, to the TMA store
    # (which clips keys past the end)
    out = v_c
    out.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dv_desc, [b, h_kv, n0 + C * 64, 0], v_smem.index(C))
    tma.store_wait(0)
    out.store(dk.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [b, h_kv, n0 + C * 64, 0], v_smem.index(C))
    tma.store_wait(0)


@gluon.jit
def _hopper_backward_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc,
                            delta_desc, dq_ptr, slopes_ptr, stride_sb, stride_sh, heads,
                            kv_heads, group, seq_q, offset, window_left, qk_scale, scale,
                            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                            CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
                            HAS_WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    n0 = gl.program_id(0) * (64 * CONSUMERS)
    b = gl.program_id(1) // kv_heads
    h_kv = gl.program_id(1) % kv_heads
    q_tiles = gl.cdiv(seq_q, 64)
    m_lo = 0  # the query tiles [m_lo, m_hi) see keys of the block
    m_hi = q_tiles
    if CAUSAL:  # query i sees key j from i = j - offset on ...
        m_lo = gl.maximum(n0 - offset, 0) // 64
        if HAS_WINDOW:  # ... to i = j - offset + window_left
            last_row = n0 + 64 * CONSUMERS - 1 - offset + window_left
            m_hi = gl.minimum(m_hi, gl.maximum(last_row, -1) // 64 + 1)
    n_m = gl.maximum(m_hi - m_lo, 0)

    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + v_desc.block_type.shape,
                                       v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CONSUMERS * 64, 64], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, CONSUMERS * 64, 64], ds_layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape,
                                         lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape,
                                           delta_desc.layout)
    # (16-byte units swizzled by row: the accumulator layout's stores conflict at most 2-way)
    dq_layout: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, order=[1, 0])
    dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_STAGES, 64, DQ_COLS], dq_layout)
    dq_full = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(DQ_STAGES):
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(ds_ready.index(i), count=CONSUMERS)
        mbarrier.init(ds_free.index(i), count=1)

    # one partition per consumer, C a compile-time constant in each (written out: see
    # flash_hopper's kernel)
    gl.warp_specialize([
        (_consume, (dk_desc, dv_desc, dq_ptr, q_smem, do_smem, k_smem, v_smem, lse_smem,
                    delta_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, qdo_empty,
                    ds_ready, ds_free, dq_full, dq_empty,
                    slopes_ptr, stride_sb, stride_sh, b, h_kv, group, heads, n0, m_hi, n_m,
                    offset, window_left, qk_scale, scale, 0, HEAD_DIM, STAGES, CONSUMERS,
                    CAUSAL, HAS_WINDOW, HAS_ALIBI)),
        (_consume, (dk_desc, dv_desc, dq_ptr, q_smem, do_smem, k_smem, v_smem, lse_smem,
                    delta_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, qdo_empty,
                    ds_ready, ds_free, dq_full, dq_empty,
                    slopes_ptr, stride_sb, stride_sh, b, h_kv, group, heads, n0, m_hi, n_m,
                    offset, window_left, qk_scale, scale, 1, HEAD_DIM, STAGES, CONSUMERS,
                    CAUSAL, HAS_WINDOW, HAS_ALIBI)),
        (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem,
                     k_smem, v_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready, qdo_empty,
                     b, h_kv, group, heads, n0, m_hi, n_m, STAGES, CONSUMERS)),
        (_write_dq, (dq_ptr, dq_smem, dq_full, dq_empty, b, h_kv, group, heads, n_m, m_hi,
                     q_tiles, HEAD_DIM, WRITER_WARPS)),
    ], [4, 1, WRITER_WARPS], [CONSUMER_REGS, 24, 24])  # (PRODUCER_REGS)


# --------------------------------------------------------------------------- selection

def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def hopper_backward_reason(params: AttentionParams, q: Tensor) -> Optional[str]:
    """Why this call's backward does not run on the warp-specialized kernel, or None."""
    if not enabled():
        return f"{ENV}=0"
    if q.device.type != "cuda" or interpreting():
        return "runs on CUDA devices only (not the interpreter)"
    return _device_reason(q.device) or scope_reason(params, q.dtype) or speed_reason(params)


def speed_reason(params: AttentionParams) -> Optional[str]:
    """Why a call this kernel can run is still left to flash_backward.py's, measured as fast or
    faster there (or not measured here); None when it is not."""
    if params.slopes_BH is not None and params.has_right and not CAUSAL_ALIBI:
        return ("ALiBi under a causal mask stays on flash_backward.py's kernel "
                "(0.97-1.00x its speed here)")
    return shorter_than(MIN_LENGTH, params, "flash_backward.py's kernel")


# --------------------------------------------------------------------------- launcher

_STATS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32)


def _stats_descriptor(t: Tensor) -> TensorDescriptor:
    """One query tile's row statistics, (1, 64) float32 of a (B·H, padded S) tensor."""
    return descriptor(t, (1, ROWS), _STATS_LAYOUT)


def hopper_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    params: AttentionParams,
                    config: Optional[BackwardConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) as `flash_backward.flash_backward` returns them, from the forward's out_BHSD
    and base-2 lse_BHS; `hopper_backward_reason` must be None."""
    config = config or CONFIGS[params.head_dim]
    q, k, v, out, grad_out = (tma_operand(t) for t in (q, k, v, out, grad_out))
    rows = params.batch * params.heads
    padded = cdiv(params.q_len, ROWS) * ROWS
    device = q.device
    # rows padded to whole tiles: lse +inf and delta 0 there (no contribution), and dQ's
    # atomics need no masks
    lse_pad = torch.empty((rows, padded), device=device, dtype=torch.float32)
    delta = torch.empty((rows, padded), device=device, dtype=torch.float32)
    dq_accum = torch.empty((params.batch, params.heads, padded, params.head_dim), device=device,
                           dtype=torch.float32)
    launch_fixed(_prepare_kernel, (padded // ROWS, rows), (
        out, grad_out, lse.contiguous(), lse_pad, delta, dq_accum, *out.stride()[:3],
        *grad_out.stride()[:3], params.heads, params.q_len, padded),
        dict(HEAD_DIM=params.head_dim, BLOCK_M=ROWS))

    dk = torch.empty(k.shape, device=device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=device, dtype=v.dtype)
    maxnreg, consumer_regs = config.registers()
    grid = (cdiv(params.kv_len, ROWS * config.consumers), params.batch * params.kv_heads)
    slopes = params.slopes_BH
    args = (_descriptor(q, ROWS), _descriptor(k, ROWS * config.consumers), _descriptor(v, ROWS),
            _descriptor(grad_out, ROWS), _descriptor(dk, ROWS), _descriptor(dv, ROWS),
            _stats_descriptor(lse_pad), _stats_descriptor(delta), dq_accum,
            delta if slopes is None else slopes, *params.slopes_strides(), params.heads,
            params.kv_heads, params.group, params.q_len, params.offset, params.window_left,
            params.scale * LOG2E, params.scale)
    launch_fixed(_hopper_backward_kernel, grid, args,
                 dict(HEAD_DIM=params.head_dim, STAGES=config.stages,
                      CONSUMERS=config.consumers, CAUSAL=params.has_right,
                      HAS_WINDOW=params.has_left, HAS_ALIBI=slopes is not None,
                      CONSUMER_REGS=consumer_regs),
                 num_warps=4, maxnreg=maxnreg)
    return dq_accum[:, :, :params.q_len].to(q.dtype), dk, dv
