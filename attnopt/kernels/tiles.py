"""Tile-level pieces shared by the forward, backward and decode kernels.

Every kernel computes scores for a (BLOCK_M queries) x (BLOCK_N keys) tile the same way, so the
semantics of `reference.py` live here once, as `@triton.jit` helpers that Triton inlines:

- `key_band`: the key range a query block can see at all (loop bounds), and the inner range in
  which every tile is fully visible (no mask evaluation there);
- `score_tile`: raw q·k products → base-2 scores with scale, soft-cap, bias, ALiBi and the masks
  applied. Scores are kept in base 2 (multiplied by log2 e) so the softmax uses `exp2`.

Specializations are constexpr flags: a kernel compiled without a feature carries no code for it.
Names: `offs_m` query rows, `offs_n` key columns (`query_index` / `key_index`: the same as
broadcastable 2-d blocks, in whichever orientation the tile is), `offset` the causal alignment
(query i sits at key position i + offset), `kv_end` the number of keys this batch row has.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnopt.kernels import params

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
NEG_INF = tl.constexpr(float("-inf"))
# Finite bias values are clamped here before the base-2 scaling, so that masks written with
# torch.finfo(float32).min stay finite (rows masked that way average uniformly, as in PyTorch)
MIN_FINITE_BIAS = tl.constexpr(-2.0e38)

BIAS_NONE = tl.constexpr(params.BIAS_NONE)
BIAS_ADDITIVE = tl.constexpr(params.BIAS_ADDITIVE)
BIAS_BOOLEAN = tl.constexpr(params.BIAS_BOOLEAN)


@triton.jit
def key_band(m0, kv_end, offset, window_left, window_right,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For queries [m0, m0 + BLOCK_M): (lo, full_lo, full_hi, hi).

    Keys outside [lo, hi) are invisible to every row; tiles starting in [full_lo, full_hi) are
    visible to every row (no mask needed); lo, full_lo and full_hi are multiples of BLOCK_N.
    """
    lo = 0
    hi = kv_end
    full_lo = 0
    full_hi = (kv_end // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:  # key j <= i + offset + right
        hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + offset + window_right, 0))
        full_hi = tl.minimum(full_hi,
                             (tl.maximum(m0 + offset + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_LEFT:  # key j >= i + offset - left
        lo = (tl.maximum(m0 + offset - window_left, 0) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m0 + BLOCK_M - 1 + offset - window_left, 0)
        full_lo = ((first_full + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def stable_tanh(x):
    """tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}), stable for every x (soft-cap; the
    backward recomputes it for the cap's derivative 1 - tanh^2)."""
    decay = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    tanh = (1.0 - decay) / (1.0 + decay)
    return tl.where(x < 0, -tanh, tanh)


@triton.jit
def score_tile(qk, query_index, key_index, seq_q, seq_k, kv_end, offset, window_left,
               window_right, scale, softcap, bias_ptr, stride_bm, stride_bn, slope,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 scores of one tile: `qk` float32 raw products in, -inf where a key is invisible.

    `query_index` and `key_index` broadcast to qk's shape: (BLOCK_M, 1) and (1, BLOCK_N) for a
    queries-by-keys tile, (1, BLOCK_M) and (BLOCK_N, 1) for the transposed tile of the dk/dv
    kernel. `slope` is the head's ALiBi slope (ignored without HAS_ALIBI)."""
    if HAS_SOFTCAP:
        s = stable_tanh(qk * (scale / softcap)) * (softcap * LOG2E)
    else:
        s = qk * (scale * LOG2E)
    if BIAS_KIND != BIAS_NONE:
        bias_ptrs = bias_ptr + query_index * stride_bm + key_index * stride_bn
        in_bounds = (query_index < seq_q) & (key_index < seq_k)
        if BIAS_KIND == BIAS_ADDITIVE:
            bias = tl.load(bias_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            bias = tl.where(bias == NEG_INF, NEG_INF, tl.maximum(bias, MIN_FINITE_BIAS))
            s = s + bias * LOG2E
        else:
            allowed = tl.load(bias_ptrs, mask=in_bounds, other=0)
            s = tl.where(allowed != 0, s, NEG_INF)
    if HAS_ALIBI:
        distance = tl.abs(query_index + offset - key_index).to(tl.float32)
        s = s - distance * (slope * LOG2E)
    if MASKED:
        keep = key_index < kv_end
        if HAS_RIGHT:
            keep = keep & (key_index <= query_index + offset + window_right)
        if HAS_LEFT:
            keep = keep & (key_index >= query_index + offset - window_left)
        s = tl.where(keep, s, NEG_INF)
    return s
