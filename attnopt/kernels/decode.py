"""Split-KV (Flash-Decoding) attention for decode shapes: a few query rows over a long KV cache.

`flash_attention` routes here when `use_decode_kernel` says so (q_len <= 16, no block layout, no
gradient). The regular forward kernel gives each (batch, query head) one program with a BLOCK_M
tile of which at most 16 rows are real, and re-reads a kv head's K/V for every query head of its
group; with a handful of heads that grid leaves most SMs idle while one program walks 100K keys.
Here the work is laid out the other way:

1. `_decode_split_kernel`, grid (num_splits, B * Hkv, packed blocks): a program takes all query
   rows that share one kv head — `group * q_len` rows packed into one M dimension, row
   r = (head in group) * q_len + (query index) — so K/V are read once per split for the whole
   group. It runs the online softmax over its share of the visible keys and writes per row a
   normalized partial output, its running max (base 2) and its sum of exponentials (max -inf,
   sum 0 where the share held no visible key). Max and sum are kept apart rather than folded into
   a log-sum-exp: at the magnitude of a finite mask value (-2e38) log2 of the sum would be lost
   and splits would be weighted alike whatever their key counts.
   The visible band [lo, hi) (windows, causal edge, kv_lengths) is found first and divided
   evenly into `num_splits` runs of whole tiles, so keys nobody sees cost nothing and a short
   batch row still spreads over every split.
2. `_decode_reduce_kernel`, one program per (b, h, query, 32-wide slice of the head dim):
   weighs split s by sum_s * 2^(max_s - max), combines, and writes q's dtype. Rows that see no
   key produce zeros. It loads every split's partial in one step (up to MAX_SPLIT_BLOCK): its
   time is the latency of its rounds of loads, not their bytes, so many small one-warp programs
   beat a few whole rows.
   On Hopper it is a programmatic dependent launch of the split kernel (`_dependent_launch`).

With one split the first kernel writes the final output itself and the reduction is skipped.

Key tiles go through the forward kernel's `attend_range` (and so `tiles.score_tile`): the
masking semantics are those of `reference.py`. A split runs all its tiles in one masked loop,
unlike the forward kernel's three ranges (masked edge, unmasked middle, masked edge): decode
reads memory, so the mask's arithmetic is free, while every extra loop costs its own pipeline
fill and drain: 56.8 against 58.2 µs at batch 1 / 32K on an H100 (docs/BENCHMARKS.md).

Rows of one program belong to different heads: the bias base pointer and the ALiBi slope are
passed as (BLOCK_M, 1) blocks, one per row, which broadcast against the tile exactly as the
per-head scalars do in the forward kernel.

Shape letters: B batch, H query heads, Hkv key/value heads, S query sequence, P key splits,
D head dim.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.flash import DECODE_MAX_QUERIES, INTERPRETER_BLOCK, attend_range, \
    input_precision, last_dim_contiguous, tensor_args
from attnopt.kernels.params import AttentionParams, cdiv, interpreting, next_power_of_2, \
    padded_head_dim, unsupported_reason
from attnopt.kernels.tiles import NEG_INF, key_band
from attnopt.kernels.tuning import launch, launch_fixed

# --------------------------------------------------------------------------- configs

MIN_DECODE_KV_LEN = 512      # fewer keys: the forward kernel wins (see use_decode_kernel)
MIN_PACKED_ROWS = 16         # tl.dot needs M >= 16
MAX_PACKED_ROWS = 64         # packed rows per program; larger groups take more programs
MIN_KEYS_PER_SPLIT = 256     # a split should amortize its query load and partial write
MAX_SPLITS = 128
WAVES_PER_SM = 2             # programs per SM the split count aims for (two resident per SM)
#: splits the reduction combines per step: all of them up to 64 (one round of loads; 3.6 vs
#: 5.4 us for 16 per step at 33 splits on an H100, docs/BENCHMARKS.md), 64 at a time beyond
MAX_SPLIT_BLOCK = 64
#: the reduction's programs each combine one 32-wide slice of the head dim, on one warp: 2.4 us
#: at batch 1 / 32K (33 splits), where whole rows on 4 warps took 4.7 (docs/BENCHMARKS.md)
REDUCE_HEAD_DIM_BLOCK = 32
REDUCE_WARPS = 1
SHARED_MEMORY_BYTES = 227 * 1024  # per block on an H100; prunes configs whose K/V buffers overflow
INTERPRETER_SPLITS = 3       # a fixed split count under the interpreter (no SMs to fill)


def _split_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_N": INTERPRETER_BLOCK}, num_warps=4, num_stages=1)]
    shapes = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 3),
              (128, 4, 2), (64, 4, 2), (32, 4, 2)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


def _prune_split_configs(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM_PADDED", named_args.get("HEAD_DIM_PADDED"))
    element_bytes = named_args["k_ptr"].element_size()

    def kv_buffer_bytes(config):  # a K and a V tile per pipeline stage
        return config.num_stages * 2 * config.kwargs["BLOCK_N"] * head_dim * element_bytes

    kept = [config for config in configs if kv_buffer_bytes(config) <= SHARED_MEMORY_BYTES]
    return kept or [min(configs, key=kv_buffer_bytes)]


# --------------------------------------------------------------------------- kernels

@triton.autotune(configs=_split_configs(),
                 key=["seq_k_bucket", "num_splits", "BLOCK_M", "HEAD_DIM_PADDED", "HAS_LEFT",
                      "HAS_RIGHT", "HAS_SOFTCAP", "BIAS_KIND", "HAS_ALIBI", "HAS_KV_LENS",
                      "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_split_configs})
@triton.jit
def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr, bias_ptr,
        slopes_ptr, kv_lens_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pb, stride_ph, stride_pm, stride_ps, stride_pd,
        stride_lb, stride_lh, stride_lm, stride_ls,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_sb, stride_sh,
        kv_heads, group, seq_q, seq_k, offset, window_left, window_right, scale, softcap,
        num_splits, seq_k_bucket,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, QUERY_SPAN: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PADDED)
    tl.static_assert(BLOCK_M >= 16)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // kv_heads).to(tl.int64)  # b * stride_kb passes 2**31 for large KV caches
    h_kv = pid_bh % kv_heads

    # packed row r: query head h_kv * group + r // seq_q, query index r % seq_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * seq_q
    h = h_kv * group + tl.where(row_ok, rows // seq_q, 0)
    offs_m = tl.where(row_ok, rows % seq_q, seq_q)  # padding rows sit past the last query
    offs_d = tl.arange(0, HEAD_DIM_PADDED)

    q_ptrs = (q_ptr + b * stride_qb + h[:, None] * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptr += b * stride_kb + h_kv * stride_kh
    v_ptr += b * stride_vb + h_kv * stride_vh
    bias_rows_ptr = bias_ptr + b * stride_bb + h[:, None] * stride_bh
    slope_rows = 0.0
    if HAS_ALIBI:
        slope_rows = tl.load(slopes_ptr + b * stride_sb + h * stride_sh)[:, None]
    kv_end = seq_k
    if HAS_KV_LENS:
        kv_end = tl.minimum(tl.load(kv_lens_ptr + b), seq_k)
    # the band of queries [seq_q - QUERY_SPAN, seq_q) covers every query index 0..seq_q-1
    lo, _, _, hi = key_band(seq_q - QUERY_SPAN, kv_end, offset, window_left, window_right,
                            QUERY_SPAN, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    # this split's run of whole tiles inside [lo, hi), in one masked loop (module docstring)
    band_tiles = (hi - lo + BLOCK_N - 1) // BLOCK_N
    split_keys = ((band_tiles + num_splits - 1) // num_splits) * BLOCK_N
    start = lo + pid_s * split_keys
    end = tl.maximum(tl.minimum(start + split_keys, hi), start)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    acc, l_i, m_i = attend_range(
        acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        start, end, offs_m, offs_d, seq_q, seq_k, kv_end, offset, window_left, window_right,
        scale, softcap, bias_rows_ptr, stride_bm, stride_bn, slope_rows, 1.0, k_ptr, BLOCK_N,
        HEAD_DIM, HEAD_DIM_PADDED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
        HAS_ALIBI, INPUT_PRECISION, False, 1)

    # a row whose share held no visible key: output 0, max -inf, sum 0 (weight 0 when reduced)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = (partial_out_ptr + b * stride_pb + h[:, None] * stride_ph
                + offs_m[:, None] * stride_pm + pid_s * stride_ps + offs_d[None, :] * stride_pd)
    tl.store(out_ptrs, out.to(partial_out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    stats_offsets = b * stride_lb + h * stride_lh + offs_m * stride_lm + pid_s * stride_ls
    tl.store(partial_max_ptr + stats_offsets, m_i, mask=row_ok)
    tl.store(partial_sum_ptr + stats_offsets, l_i, mask=row_ok)
    if LAUNCH_DEPENDENTS:  # the reduction may be scheduled now; it waits for this grid's writes
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _decode_reduce_kernel(
        partial_out_ptr, partial_max_ptr, partial_sum_ptr, out_ptr,
        stride_pb, stride_ph, stride_pm, stride_ps, stride_pd,
        stride_lb, stride_lh, stride_lm, stride_ls,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, seq_q, num_splits,
        HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, SPLITS_PADDED: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr, WAIT_FOR_SPLITS: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid // (num_heads * seq_q)
    h = (pid // seq_q) % num_heads
    m = pid % seq_q
    if WAIT_FOR_SPLITS:  # launched early (programmatic dependent launch): wait for the partials
        tl.extra.cuda.gdc_wait()
    partial_out_ptr += b * stride_pb + h * stride_ph + m * stride_pm
    stats_offset = b * stride_lb + h * stride_lh + m * stride_lm
    partial_max_ptr += stats_offset
    partial_sum_ptr += stats_offset
    offs_d = pid_d * HEAD_DIM_BLOCK + tl.arange(0, HEAD_DIM_BLOCK)

    # split s weighs sum_s * 2^(max_s - max): its share of the row's softmax denominator
    offs_all = tl.arange(0, SPLITS_PADDED)
    all_max = tl.load(partial_max_ptr + offs_all * stride_ls, mask=offs_all < num_splits,
                      other=NEG_INF)
    row_max = tl.max(all_max, 0)
    row_max = tl.where(row_max == NEG_INF, 0.0, row_max)  # no split saw a key

    acc = tl.zeros([HEAD_DIM_BLOCK], dtype=tl.float32)
    weight_sums = tl.zeros([SPLIT_BLOCK], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        offs_s = s0 + tl.arange(0, SPLIT_BLOCK)
        split_ok = offs_s < num_splits
        split_max = tl.load(partial_max_ptr + offs_s * stride_ls, mask=split_ok, other=NEG_INF)
        split_sum = tl.load(partial_sum_ptr + offs_s * stride_ls, mask=split_ok, other=0.0)
        weight = split_sum * tl.exp2(split_max - row_max)
        part = tl.load(partial_out_ptr + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd,
                       mask=split_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc += tl.sum(part * weight[:, None], 0)
        weight_sums += weight
    total = tl.sum(weight_sums, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + m * stride_om + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# --------------------------------------------------------------------------- launcher

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _dependent_launch(device: torch.device) -> bool:
    """Whether the reduction is launched as a programmatic dependent of the split kernel
    (Hopper and later): it is scheduled while the last splits finish and waits for their
    writes, so the gap between the two launches is hidden."""
    if interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _packed_rows(params: AttentionParams) -> int:
    """BLOCK_M of the split kernel: the group's rows, padded to a power of two, capped."""
    return min(max(next_power_of_2(params.group * params.q_len), MIN_PACKED_ROWS),
               MAX_PACKED_ROWS)


def _visible_span(params: AttentionParams) -> int:
    """An upper bound on the keys one batch row's queries see together (without kv_lengths)."""
    if params.has_left:  # a window: has_right is set too
        return min(params.kv_len, params.window_left + params.window_right + params.q_len)
    return params.kv_len


def split_count(params: AttentionParams, device: torch.device) -> int:
    """How many key splits: enough programs for WAVES_PER_SM per SM, at least
    MIN_KEYS_PER_SPLIT visible keys each, at most MAX_SPLITS; INTERPRETER_SPLITS off the GPU."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SPLITS
    by_len = max(1, min(_visible_span(params) // MIN_KEYS_PER_SPLIT, MAX_SPLITS))
    programs = params.batch * params.kv_heads * cdiv(params.group * params.q_len,
                                                            _packed_rows(params))
    index = device.index if device.index is not None else torch.cuda.current_device()
    wanted = cdiv(WAVES_PER_SM * _sm_count(index), programs)
    return max(1, min(wanted, by_len))


def decode_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Tensor:
    """out_BHSD in q's dtype: the split kernel, then the reduction when there are splits."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out_BHSD = torch.empty_like(q, memory_format=torch.contiguous_format)
    extra = tensor_args(params, q.device)
    splits = split_count(params, q.device)
    block_m = _packed_rows(params)
    head_dim_padded = padded_head_dim(params.head_dim)
    if splits == 1:  # the normalized single-split output is the result: write it in place
        partial_out = out_BHSD
        partial_out_strides = (*out_BHSD.stride()[:3], 0, out_BHSD.stride(3))
    else:
        partial_out = torch.empty((params.batch, params.heads, params.q_len, splits,
                                   params.head_dim), device=q.device, dtype=torch.float32)
        partial_out_strides = partial_out.stride()
    partial_max_BHSP, partial_sum_BHSP = (
        torch.empty((params.batch, params.heads, params.q_len, splits), device=q.device,
                    dtype=torch.float32) for _ in range(2))
    flags = params.kernel_flags()
    kv_bucket = next_power_of_2(params.kv_len)
    pdl = splits > 1 and _dependent_launch(q.device)
    grid = (splits, params.batch * params.kv_heads,
            cdiv(params.group * params.q_len, block_m))
    launch(_decode_split_kernel, grid, (
        q, k, v, partial_out, partial_max_BHSP, partial_sum_BHSP, extra["bias"], extra["slopes"],
        extra["kv_lens"],
        *q.stride(), *k.stride(), *v.stride(), *partial_out_strides, *partial_max_BHSP.stride(),
        *extra["bias_strides"], *extra["slopes_strides"],
        params.kv_heads, params.group, params.q_len, params.kv_len, params.offset,
        params.window_left, params.window_right, params.scale, params.softcap or 1.0,
        splits, kv_bucket), dict(
        HEAD_DIM=params.head_dim, HEAD_DIM_PADDED=head_dim_padded,
        QUERY_SPAN=next_power_of_2(params.q_len),
        HAS_LEFT=flags["HAS_LEFT"], HAS_RIGHT=flags["HAS_RIGHT"],
        HAS_SOFTCAP=flags["HAS_SOFTCAP"], BIAS_KIND=flags["BIAS_KIND"],
        HAS_ALIBI=flags["HAS_ALIBI"], HAS_KV_LENS=flags["HAS_KV_LENS"],
        INPUT_PRECISION=input_precision(q.dtype), LAUNCH_DEPENDENTS=pdl, BLOCK_M=block_m),
        key=(q.dtype, splits, kv_bucket),
        tune=params.worth_tuning(q.dtype), prune=_prune_split_configs)
    if splits > 1:
        d_block = min(REDUCE_HEAD_DIM_BLOCK, head_dim_padded)
        launch_fixed(_decode_reduce_kernel, (params.batch * params.heads * params.q_len,
                                             head_dim_padded // d_block), (
            partial_out, partial_max_BHSP, partial_sum_BHSP, out_BHSD,
            *partial_out.stride(), *partial_max_BHSP.stride(), *out_BHSD.stride(),
            params.heads, params.q_len, splits), dict(
            HEAD_DIM=params.head_dim, HEAD_DIM_BLOCK=d_block,
            SPLITS_PADDED=next_power_of_2(splits),
            SPLIT_BLOCK=min(next_power_of_2(splits), MAX_SPLIT_BLOCK),
            WAIT_FOR_SPLITS=pdl), num_warps=REDUCE_WARPS, **({"launch_pdl": True} if pdl else {}))
    return out_BHSD


# --------------------------------------------------------------------------- public entry

def use_decode_kernel(params: AttentionParams) -> bool:
    """Whether the split-KV kernel should run this call instead of the forward kernel.

    Rule: no block layout, at most DECODE_MAX_QUERIES query rows, and at least
    MIN_DECODE_KV_LEN keys. With <= 16 queries the forward grid is B * H programs (one query
    block each), which underfills an H100's 132 SMs for the batch sizes of decoding, and every
    program walks all keys alone while re-reading its kv head's K/V once per query head. Past
    512 keys (several tiles per split) splitting the keys and sharing K/V across the group wins
    even where B * H fills the GPU (then one split runs and the reduction is skipped); below it
    the work per head is a few tiles and the forward kernel's single launch is cheaper.
    """
    return (params.layout is None and params.q_len <= DECODE_MAX_QUERIES
            and params.kv_len >= MIN_DECODE_KV_LEN)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Tensor:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D) by the split-KV kernels, with the
    semantics of `reference.py`; returns a contiguous (B, H, Sq, D) tensor in q's dtype. Forward
    only (no autograd graph): `flash_attention` routes here when no gradient is needed."""
    if params.layout is not None:
        raise ValueError("decode_attention does not take block layouts; run flash_attention")
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"decode_attention cannot run on these tensors: {reason}")
    return decode_forward(q, k, v, params)
