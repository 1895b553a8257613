"""The exact forward on Hopper GPUs (sm_90): a warp-specialized kernel written in Gluon.

Triton's compiler schedules `flash.py`'s kernel in the same warps for everything: address
arithmetic, loads, both matmuls and the softmax. Hopper's fastest attention kernels split
that work between warps instead, and Triton 3.6 does not build that schedule for Hopper
(docs/BENCHMARKS.md, "TMA descriptor loads and warp specialization"). Gluon, Triton's
tile-level language with explicit layouts, shared memory, mbarriers and warp partitions, does.

The kernel is persistent: one program per SM, each taking work units in turn. A unit is a
pair of query tiles of 64·CONSUMERS rows of one (batch, head), block n − 1 − j with block j,
so that under a causal mask every unit has the same work (`_query_tile`). In each program:
- the producer partition (one warp) TMA-loads each tile's Q (one 64-row slice per consumer)
  into a ring of Q_BUFFERS, and the K/V tiles into a ring of STAGES buffers that runs on from
  one query tile to the next, so the next tile's keys load while this one finishes.
  Barriers `q_ready` / `k_ready` / `v_ready` say a buffer is full; `q_empty` and `kv_empty`
  (one arrive from each consumer) say it may be refilled;
- each consumer partition (one warpgroup) owns 64 rows: Q·Kᵀ on wgmma from shared memory,
  the online softmax in registers, P·V with P from registers. With OVERLAP, tile j's Q·Kᵀ is
  issued together with tile j−1's P·V, so tile j's softmax runs while the tensor cores work
  (FlashAttention-3's intra-warpgroup overlap). The other consumers' softmax fills the
  tensor cores' gaps too. Key tiles its rows do not see (past their causal diagonal, before
  their window, or all of them for rows past the end) it releases unread (`_pass_tiles`);
- each consumer writes its output rows through its Q buffer (TMA store), and its base-2
  log-sum-exp as `flash.py`'s kernel does, so `flash_backward` runs on it unchanged.

`hopper_reason` says when a call runs here (None) and why not otherwise. It needs fp16/bf16,
head dim 64 or 128, no bias tensor, key lengths, layout or soft-cap, and a causal offset >= 0
(every row sees a key). GQA, ALiBi slopes and causal sliding windows are supported (a window
starts each query tile at its first visible key tile). Shorter sequences than `MIN_LENGTH`
stay on `flash.py`'s kernel, which was as fast there. Each head dim has a config measured
best across lengths (`CONFIGS`); shorter calls take another (`SHORT_CONFIGS`: at head dim 64
below 8K, four consumers over 64-key tiles; at 128 below 1K, or 1.5K causal, 64-key tiles in
five stages), picked by `config_for`. Lengths may be
anything: 4-D TMA descriptors over the (B, H, S, D) strides zero-fill the tails, keys past
the end are masked, and the store clips rows past the end. Everything else runs `flash.py`'s
kernel.
`ATTNOPT_HOPPER_FORWARD=0` turns this kernel off.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnopt.kernels.params import BIAS_NONE, AttentionParams, cdiv, interpreting
from attnopt.kernels.tuning import launch_fixed

ENV = "ATTNOPT_HOPPER_FORWARD"
LOG2E = 1.4426950408889634
ROWS = 64  # query rows per consumer warpgroup: one wgmma M
PRODUCER_REGS = 24  # the fewest registers a warpgroup can be given
CONSUMER_COUNTS = (2, 3, 4)  # the kernel's warp_specialize branches
REGISTER_FILE = 65536  # 32-bit registers per SM

# The TMA copies were renamed in Triton 3.7 (async_copy_* -> async_load / async_store).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@dataclass(frozen=True)
class HopperConfig:
    block_n: int      # keys per tile
    stages: int       # K/V tiles in flight
    overlap: bool     # tile j's Q·Kᵀ issued with tile j−1's P·V
    consumers: int    # consumer warpgroups (64 query rows each)
    q_buffers: int    # query tiles in flight: 2 loads the next tile's Q during this one

    def __post_init__(self):
        if self.consumers not in CONSUMER_COUNTS:
            raise ValueError(f"consumers={self.consumers}: the kernel has partitions for "
                             f"{', '.join(map(str, CONSUMER_COUNTS))} consumer warpgroups")

    def registers(self) -> tuple[int, int]:
        return register_split(self.consumers)


def register_split(consumers: int) -> tuple[int, int]:
    """(maxnreg for the kernel, registers per consumer worker) for `consumers` consumer
    warpgroups and one more warpgroup of producer warps: that one keeps PRODUCER_REGS and the
    consumers share the rest of the register file."""
    threads = 128 * (consumers + 1)
    maxnreg = REGISTER_FILE // threads // 8 * 8
    consumer = (REGISTER_FILE - 128 * PRODUCER_REGS) // (128 * consumers) // 8 * 8
    return maxnreg, min(consumer, 240)


#: per head dim, the config that did best across lengths in sweeps on the H100
#: (docs/BENCHMARKS.md, "The warp-specialized Hopper forward" and "The persistent Hopper
#: forward")
CONFIGS = {128: HopperConfig(block_n=128, stages=3, overlap=True, consumers=2, q_buffers=1),
           64: HopperConfig(block_n=128, stages=3, overlap=False, consumers=3, q_buffers=2)}
_FOUR_CONSUMERS = HopperConfig(block_n=64, stages=6, overlap=False, consumers=4, q_buffers=2)
_SMALL_TILES = HopperConfig(block_n=64, stages=5, overlap=True, consumers=2, q_buffers=2)
#: per (head dim, causal), (length, config): calls shorter than length (`measured_length`)
#: take config instead, which was faster there (docs/BENCHMARKS.md, "Four consumers at head
#: dim 64" and "Head dim 128 at short lengths: 64-key tiles")
SHORT_CONFIGS = {(64, False): (8192, _FOUR_CONSUMERS), (64, True): (8192, _FOUR_CONSUMERS),
                 (128, False): (1024, _SMALL_TILES), (128, True): (1536, _SMALL_TILES)}
#: the shortest query and key lengths that run here, per (head dim, causal): below them
#: flash.py's kernel was as fast or faster (docs/BENCHMARKS.md, "The persistent Hopper forward"
#: and "Four consumers at head dim 64"), or they were not measured
MIN_LENGTH = {(128, False): 512, (128, True): 512, (64, False): 512, (64, True): 256}


def shipped_configs() -> list[tuple[int, HopperConfig]]:
    """Every (head dim, config) the kernel runs with by default, once each."""
    shipped = sorted(CONFIGS.items())
    for (head_dim, _), (_, config) in sorted(SHORT_CONFIGS.items()):
        if (head_dim, config) not in shipped:
            shipped.append((head_dim, config))
    return shipped


def config_for(params: AttentionParams) -> HopperConfig:
    """The config a call runs with: its head dim's, or the short one below its length."""
    short = SHORT_CONFIGS.get((params.head_dim, params.has_right))
    if short is not None and measured_length(params) < short[0]:
        return short[1]
    return CONFIGS[params.head_dim]


# --------------------------------------------------------------------------- kernel

@gluon.jit
def _query_tile(u, half, units_per_head, n_m, heads,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                HAS_WINDOW: gl.constexpr, seq_k, offset, window_left):
    """Query tile `half` (0 or 1) of work unit u: (b, h, bh, q0, lo, n_tiles).

    A unit pairs query block n_m − 1 − j of one (batch, head) with block j, so that under a
    causal mask every unit has the same work (the last block sees the most keys, the first
    the fewest); the programs take units in turn and finish together. The middle block of an
    odd count is a unit alone. `lo` is the first key tile the block sees, n_tiles their
    count."""
    bh = u // units_per_head
    j = u % units_per_head
    pid_m = (1 - half) * (n_m - 1 - j) + half * j
    b = bh // heads
    h = bh % heads
    q0 = pid_m * BLOCK_M
    kv_end = seq_k
    lo = 0
    if CAUSAL:
        kv_end = gl.minimum(seq_k, q0 + BLOCK_M + offset)
        if HAS_WINDOW:
            lo = gl.maximum(q0 + offset - window_left, 0) // BLOCK_N
    n_tiles = gl.cdiv(kv_end, BLOCK_N) - lo
    return b, h, bh, q0, lo, n_tiles


@gluon.jit
def _halves(u, units_per_head, n_m):
    """How many query tiles unit u has: 2, or 1 for the middle block of an odd count."""
    j = u % units_per_head
    return 2 - (2 * j + 1 == n_m).to(gl.int32)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
              v_ready, kv_empty, n_units, units_per_head, n_m, heads, group, seq_k, offset,
              window_left, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CONSUMERS: gl.constexpr, Q_BUFFERS: gl.constexpr, CAUSAL: gl.constexpr,
              HAS_WINDOW: gl.constexpr):
    it = 0  # key tiles loaded so far: the position in the K/V ring
    tc = 0  # query tiles so far: the position in the Q ring
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        for half in range(_halves(u, units_per_head, n_m)):
            b, h, bh, q0, lo, n_tiles = _query_tile(
                u, half, units_per_head, n_m, heads, 64 * CONSUMERS, BLOCK_N, CAUSAL,
                HAS_WINDOW, seq_k, offset, window_left)
            slot = tc % Q_BUFFERS
            mbarrier.wait(q_empty.index(slot), ((tc // Q_BUFFERS) & 1) ^ 1)
            mbarrier.expect(q_ready.index(slot), CONSUMERS * q_desc.block_type.nbytes)
            for c in gl.static_range(CONSUMERS):
                _tma_load(q_desc, [b, h, q0 + c * 64, 0], q_ready.index(slot),
                          q_smem.index(slot * CONSUMERS + c))
            h_kv = h // group
            for i in range(n_tiles):
                s = (it + i) % STAGES
                mbarrier.wait(kv_empty.index(s), (((it + i) // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                _tma_load(k_desc, [b, h_kv, (lo + i) * BLOCK_N, 0], k_ready.index(s),
                          k_smem.index(s))
                mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                _tma_load(v_desc, [b, h_kv, (lo + i) * BLOCK_N, 0], v_ready.index(s),
                          v_smem.index(s))
            it += n_tiles
            tc += 1


@gluon.jit
def _softmax_tile(qk, m_i, l_i, row0, col0, seq_k, offset, window_left, qk_scale, slope2,
                  masked, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                  HAS_ALIBI: gl.constexpr, layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online-softmax step on one tile of raw scores: (p, m, l, alpha), in base 2.

    ALiBi (`slope2`: the head's slope times log2 e) adds -slope2·|row + offset - col|. Under the
    causal mask every visible key has col <= row + offset, so that is slope2·(col - row0 -
    offset) minus slope2·(row - row0): the second term is constant along each row, which the
    softmax ignores, and `_consume_tile` adds it to the row's log-sum-exp at the end.

    With a window, a row may see no key of its first tiles: its maximum is still -inf there,
    and the exponentials are taken against 0 instead (p and alpha 0, not NaN)."""
    if HAS_ALIBI:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        if CAUSAL:
            qk = qk * qk_scale + ((cols - row0 - offset).to(gl.float32) * slope2)[None, :]
        else:
            rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
            distance = gl.abs(rows[:, None] + offset - cols[None, :]).to(gl.float32)
            qk = qk * qk_scale - distance * slope2
    if masked:  # keys past the end, past the causal diagonal or before the window
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        visible = cols[None, :] < seq_k
        if CAUSAL:
            rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (cols[None, :] >= rows[:, None] + offset - window_left)
        qk = gl.where(visible, qk, float("-inf"))
    if HAS_ALIBI:  # (scores already scaled)
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        m_use = m_new
        if HAS_WINDOW:
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - m_use[:, None])
    else:  # the scale folded into one multiply-add per score
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        m_use = m_new
        if HAS_WINDOW:
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consume(o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
             v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q, seq_k, offset,
             window_left, qk_scale, stride_sb, stride_sh, C: gl.constexpr,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
             OVERLAP: gl.constexpr, CONSUMERS: gl.constexpr, Q_BUFFERS: gl.constexpr,
             CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr):
    """Consumer C: rows [q0 + 64·C, q0 + 64·C + 64) of each query tile the program takes."""
    it = 0
    tc = 0
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        for half in range(_halves(u, units_per_head, n_m)):
            b, h, bh, q0, lo, n_tiles = _query_tile(
                u, half, units_per_head, n_m, heads, 64 * CONSUMERS, BLOCK_N, CAUSAL,
                HAS_WINDOW, seq_k, offset, window_left)
            slot = tc % Q_BUFFERS
            mbarrier.wait(q_ready.index(slot), (tc // Q_BUFFERS) & 1)
            row0 = q0 + C * 64
            own_lo, own_n = _own_tiles(row0, lo, seq_q, seq_k, offset, window_left, BLOCK_N,
                                       CAUSAL, HAS_WINDOW)
            _pass_tiles(k_ready, kv_empty, it, own_lo - lo, STAGES)
            if own_n > 0:
                _consume_tile(o_desc, lse_ptr, slopes_ptr,
                              q_smem.index(slot * CONSUMERS + C), q_empty.index(slot), k_smem,
                              v_smem, k_ready, v_ready, kv_empty, b, h, bh, row0, own_lo, own_n,
                              it + own_lo - lo, seq_q, seq_k, offset, window_left, qk_scale,
                              stride_sb, stride_sh, BLOCK_N, HEAD_DIM, STAGES, OVERLAP,
                              CAUSAL, HAS_WINDOW, HAS_ALIBI)
            else:  # rows past the end
                mbarrier.arrive(q_empty.index(slot), count=1)
            _pass_tiles(k_ready, kv_empty, it + own_lo - lo + own_n,
                        lo + n_tiles - own_lo - own_n, STAGES)
            it += n_tiles
            tc += 1


@gluon.jit
def _own_tiles(row0, lo, seq_q, seq_k, offset, window_left, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr):
    """(first, count): the key tiles the 64 rows from row0 see, of the program's tiles from
    lo. Under a causal mask a consumer's rows may end a tile before the program's last rows
    do (three consumers of 64 rows over 128-key tiles), a window may start them later, and
    rows past the end see none."""
    end = seq_k
    first = lo
    if CAUSAL:
        end = gl.minimum(seq_k, row0 + 64 + offset)
        if HAS_WINDOW:
            first = gl.maximum(row0 + offset - window_left, 0) // BLOCK_N
    count = gl.cdiv(end, BLOCK_N) - first
    live = row0 < seq_q
    return gl.where(live, first, lo), gl.where(live, count, 0)


@gluon.jit
def _pass_tiles(k_ready, kv_empty, it, count, STAGES: gl.constexpr):
    """Release `count` K/V ring positions from it without reading them. Each is waited for
    first: the producer has loaded a position once the previous use of its stage was released
    by every consumer, so this arrival counts towards this position's release, not that one."""
    for i in range(count):
        s = (it + i) % STAGES
        mbarrier.wait(k_ready.index(s), ((it + i) // STAGES) & 1)
        mbarrier.arrive(kv_empty.index(s), count=1)


@gluon.jit
def _consume_tile(o_desc, lse_ptr, slopes_ptr, q_tile, q_release, k_smem, v_smem, k_ready,
                  v_ready, kv_empty, b, h, bh, row0, lo, n_tiles, it, seq_q, seq_k, offset,
                  window_left, qk_scale, stride_sb, stride_sh, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                  CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr):
    """64 query rows from row0 over key tiles lo, lo + 1, ... (n_tiles >= 1): the K/V ring from
    position it. The output leaves through the Q buffer (Q is read no more) by a TMA store that
    clips rows past the end; `q_release` is arrived on once the store has read the buffer.
    (Storing from registers instead, to release Q after the last Q·Kᵀ, measured slower.)"""
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = gl.load(slopes_ptr + b * stride_sb + h * stride_sh) * 1.4426950408889634
    # tiles from first_full to before n_full (absolute indices) are visible to all 64 rows:
    # no mask evaluation there
    n_full = seq_k // BLOCK_N
    first_full = 0
    if CAUSAL:
        n_full = gl.minimum(n_full, (row0 + offset + 1) // BLOCK_N)
        if HAS_WINDOW:
            first_full = gl.cdiv(gl.maximum(row0 + 63 + offset - window_left, 0), BLOCK_N)
    q = q_tile.reshape([64, HEAD_DIM])
    m_i = gl.full([64], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.full([64], 0.0, gl.float32, layout=s_rows)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    no_scores = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)

    if OVERLAP:
        s = it % STAGES
        mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
        qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                           no_scores, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk, ))
        p, m_i, l_i, alpha = _softmax_tile(
            qk, m_i, l_i, row0, lo * BLOCK_N, seq_k, offset, window_left, qk_scale, slope2,
            (lo >= n_full) | (lo < first_full), CAUSAL, HAS_WINDOW, HAS_ALIBI, s_layout,
            BLOCK_N)
        for i in range(1, n_tiles):
            s = (it + i) % STAGES
            prev = (it + i - 1) % STAGES
            mbarrier.wait(k_ready.index(s), ((it + i) // STAGES) & 1)
            qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               no_scores, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((it + i - 1) // STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                                v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                                is_async=True)
            qk = warpgroup_mma_wait(1, deps=(qk, ))
            p, m_i, l_i, alpha = _softmax_tile(
                qk, m_i, l_i, row0, (lo + i) * BLOCK_N, seq_k, offset, window_left, qk_scale,
                slope2, (lo + i >= n_full) | (lo + i < first_full), CAUSAL, HAS_WINDOW,
                HAS_ALIBI, s_layout, BLOCK_N)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        last = (it + n_tiles - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((it + n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                            v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(kv_empty.index(last), count=1)
    else:
        for i in range(n_tiles):
            s = (it + i) % STAGES
            phase = ((it + i) // STAGES) & 1
            mbarrier.wait(k_ready.index(s), phase)
            qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               no_scores, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk, ))
            p, m_i, l_i, alpha = _softmax_tile(
                qk, m_i, l_i, row0, (lo + i) * BLOCK_N, seq_k, offset, window_left, qk_scale,
                slope2, (lo + i >= n_full) | (lo + i < first_full), CAUSAL, HAS_WINDOW,
                HAS_ALIBI, s_layout, BLOCK_N)
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            mbarrier.wait(v_ready.index(s), phase)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                                v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(s), count=1)

    acc = acc / gl.convert_layout(l_i, o_rows)[:, None]
    rows = row0 + gl.arange(0, 64, layout=s_rows)
    lse = m_i + gl.log2(l_i)
    if HAS_ALIBI and CAUSAL:  # the row constant `_softmax_tile` left out
        lse = lse - (rows - row0).to(gl.float32) * slope2
    gl.store(lse_ptr + bh * seq_q + rows, lse, mask=rows < seq_q)
    q.store(acc.to(dtype))
    fence_async_shared()
    _tma_store(o_desc, [b, h, row0, 0], q_tile)
    tma.store_wait(0)
    mbarrier.arrive(q_release, count=1)


@gluon.jit
def _hopper_forward_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, slopes_ptr, heads, group,
                           seq_q, seq_k, offset, window_left, qk_scale, stride_sb, stride_sh,
                           n_units, units_per_head, n_m,
                           BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                           OVERLAP: gl.constexpr, CONSUMERS: gl.constexpr,
                           Q_BUFFERS: gl.constexpr, CAUSAL: gl.constexpr,
                           HAS_WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr,
                           CONSUMER_REGS: gl.constexpr):
    """A persistent program: it takes work units pid, pid + programs, ... (`_query_tile`)."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * CONSUMERS] + q_desc.block_type.shape,
                                       q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_BUFFERS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=CONSUMERS)

    # one partition per consumer, C a compile-time constant in each (the argument tuples are
    # written out in the call: a tuple built first would carry the constexprs as run-time
    # values)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 0, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 1, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                         k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, group,
                         seq_k, offset, window_left, BLOCK_N, STAGES, CONSUMERS, Q_BUFFERS,
                         CAUSAL, HAS_WINDOW)),
        ], [4, 1], [CONSUMER_REGS, 24])
    elif CONSUMERS == 3:
        gl.warp_specialize([
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 0, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 1, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 2, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                         k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, group,
                         seq_k, offset, window_left, BLOCK_N, STAGES, CONSUMERS, Q_BUFFERS,
                         CAUSAL, HAS_WINDOW)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
    else:  # four (HopperConfig takes CONSUMER_COUNTS only)
        gl.warp_specialize([
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 0, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 1, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 2, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_consume, (o_desc, lse_ptr, slopes_ptr, q_smem, k_smem, v_smem, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, seq_q,
                        seq_k, offset, window_left, qk_scale, stride_sb, stride_sh, 3, BLOCK_N,
                        HEAD_DIM, STAGES, OVERLAP, CONSUMERS, Q_BUFFERS, CAUSAL, HAS_WINDOW,
                        HAS_ALIBI)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                         k_ready, v_ready, kv_empty, n_units, units_per_head, n_m, heads, group,
                         seq_k, offset, window_left, BLOCK_N, STAGES, CONSUMERS, Q_BUFFERS,
                         CAUSAL, HAS_WINDOW)),
        ], [4, 4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, 24])


# --------------------------------------------------------------------------- selection

def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@functools.lru_cache(maxsize=None)
def _device_reason(device: torch.device) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability {major}.{minor}; this kernel is built for Hopper (9.x)"
    return None


def spec_reason(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Optional[str]:
    """Why a call's spec and tensors do not fit this kernel (None when they do), device aside."""
    reason = scope_reason(params, q.dtype)
    if reason is not None:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not tma_ready(t):
            return f"{name}'s strides or address are not 16-byte aligned for TMA"
    return None


def scope_reason(params: AttentionParams, dtype: torch.dtype) -> Optional[str]:
    """Why a call's spec is outside what the Hopper kernels compute (None when inside): the
    forward's and the backward's (`flash_hopper_backward`) scope."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (fp16 and bf16 run here)"
    if params.q_len < 1 or params.kv_len < 1:
        return "an empty sequence"  # (the consumers wait for a first key tile)
    if params.head_dim not in CONFIGS:
        return f"head dim {params.head_dim} (runs {sorted(CONFIGS)})"
    if params.bias_kind != BIAS_NONE or params.softcap is not None \
            or params.kv_lengths is not None or params.layout is not None:
        return "a bias, soft-cap, key lengths or block layout"
    if params.has_right and (params.window_right != 0 or params.offset < 0):
        return "a causal band other than the diagonal at offset >= 0"
    if params.has_left and not (params.has_right and params.q_len + params.offset
                                <= params.kv_len):
        return "a window without the causal edge, or with rows past the last key"
    return None


def tma_ready(t: Tensor) -> bool:
    """Whether a TMA descriptor can address t: last dim contiguous, address and other strides
    16-byte multiples, no broadcast (stride 0) dims."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        stride * t.element_size() % 16 == 0 and (stride or size == 1)
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def tma_operand(t: Tensor) -> Tensor:
    """t when a TMA descriptor can address it (`tma_ready`), else a copy one can: contiguous
    and newly allocated (`t.contiguous()` would return a contiguous t at an address that is
    not 16-byte aligned as it is)."""
    return t if tma_ready(t) else t.clone(memory_format=torch.contiguous_format)


def hopper_reason(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Optional[str]:
    """Why this call does not run on the warp-specialized kernel, or None when it does."""
    if not enabled():
        return f"{ENV}=0"
    if q.device.type != "cuda" or interpreting():
        return "runs on CUDA devices only (not the interpreter)"
    return _device_reason(q.device) or spec_reason(q, k, v, params) or length_reason(params)


def length_reason(params: AttentionParams) -> Optional[str]:
    """Why a call this kernel can run is still left to flash.py's (None when it is not)."""
    return shorter_than(MIN_LENGTH, params, "flash.py's kernel")


def shorter_than(min_length: dict, params: AttentionParams, fallback: str) -> Optional[str]:
    """Why a call stays on `fallback` for being shorter than `min_length[head dim, causal]`
    (None when it is not): both Hopper kernels' length rule, on `measured_length`."""
    shortest = min_length[params.head_dim, params.has_right]
    if measured_length(params) < shortest:
        return (f"sequences or window bands shorter than {shortest} at head dim "
                f"{params.head_dim}{' under a causal mask' if params.has_right else ''} stay "
                f"on {fallback} (as fast or faster there, or not measured)")
    return None


def measured_length(params: AttentionParams) -> int:
    """The length the Hopper kernels' length rules compare: the shorter of the query length
    and the keys a row sees (a window counts as its band)."""
    keys = min(params.kv_len, params.window_left + 1) if params.has_left else params.kv_len
    return min(params.q_len, keys)


# --------------------------------------------------------------------------- launcher

@functools.lru_cache(maxsize=None)
def _shared_layout(dtype: torch.dtype, block: tuple):
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """The device's SM count: one persistent program each (one fits an SM's shared memory)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


#: (dtype, block, layout) of the descriptors Triton's constructor has checked (`descriptor`)
_CHECKED: set = set()


def descriptor(t: Tensor, block: tuple, layout) -> TensorDescriptor:
    """`TensorDescriptor(t, t.shape, t.stride(), list(block), layout)` for a `tma_ready` t.

    Triton's constructor checks, in Python on every call, the block shape, the dtype against
    the layout, and t's alignment and strides (about 3 µs of host time a descriptor; a training
    step builds twelve). The first descriptor of each (dtype, block, layout) goes through it;
    later ones skip it, their tensor being `tma_ready` (every caller's inputs are, and the
    tensors made here are contiguous) and not empty."""
    key = (t.dtype, block, layout)
    if key in _CHECKED and t.numel():
        made = TensorDescriptor.__new__(TensorDescriptor)
        made.__dict__.update(base=t, shape=t.shape, strides=t.stride(), block_shape=list(block),
                             layout=layout)
        return made
    made = TensorDescriptor(t, t.shape, t.stride(), list(block), layout)
    _CHECKED.add(key)
    return made


def _descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    """A (B, H, S, D) tensor's descriptor, one (rows, D) tile of one (batch, head) a block."""
    block = (1, 1, rows, t.shape[-1])
    return descriptor(t, block, _shared_layout(t.dtype, block))


def hopper_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams,
                   config: Optional[HopperConfig] = None,
                   programs: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(out_BHSD, lse_BHS) as `flash.flash_forward` returns them; `hopper_reason` must be None.
    `programs`: how many persistent programs share the work (default: one per SM)."""
    config = config or config_for(params)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((params.batch, params.heads, params.q_len), device=q.device,
                      dtype=torch.float32)
    maxnreg, consumer_regs = config.registers()
    n_m = cdiv(params.q_len, ROWS * config.consumers)
    units_per_head = cdiv(n_m, 2)
    n_units = params.batch * params.heads * units_per_head
    grid = (min(n_units, programs or _processors(q.device)), )
    slopes = params.slopes_BH
    args = (_descriptor(q, ROWS), _descriptor(k, config.block_n), _descriptor(v, config.block_n),
            _descriptor(out, ROWS), lse, lse if slopes is None else slopes, params.heads,
            params.group, params.q_len, params.kv_len, params.offset, params.window_left,
            params.scale * LOG2E, *params.slopes_strides(), n_units, units_per_head, n_m)
    launch_fixed(_hopper_forward_kernel, grid, args,
                 dict(BLOCK_N=config.block_n, HEAD_DIM=params.head_dim, STAGES=config.stages,
                      OVERLAP=config.overlap, CONSUMERS=config.consumers,
                      Q_BUFFERS=config.q_buffers, CAUSAL=params.has_right,
                      HAS_WINDOW=params.has_left, HAS_ALIBI=slopes is not None,
                      CONSUMER_REGS=consumer_regs),
                 num_warps=4, maxnreg=maxnreg)
    return out, lse
