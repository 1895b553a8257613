"""`torch.ops.attnopt.performer_window`: exact attention inside a local window of blocks,
FAVOR+ outside it, under one shared softmax normalizer.

The window is block-aligned: with queries and keys cut into blocks of `block` positions and
L = ceil(window / block), query i (in block b_i) attends exactly to the keys of blocks
b_i − L … b_i + L (b_i − L … b_i when causal, and j <= i inside). Aligning the window to blocks
is what makes the complement cheap: it is a union of whole blocks, whose random-feature sums
are per-block states.

Derivation (one query i; W(i) its window; s the scale). Softmax attention is
out_i = Σ_j e^{s·q_i·k_j} v_j / Σ_j e^{s·q_i·k_j}. Split the sums into j ∈ W(i), kept exact,
and j ∉ W(i), estimated with FAVOR+ features:

    e^{s·q_i·k_j} ≈ φ(q_i)·φ(k_j) · e^{h_i + h_k}     (features.favor_features; h_i, h_k the
                                                        query-row and key stabilizers)
Exact part, with M_i = max_{j∈W(i)} s·q_i·k_j:
    A_i = Σ_{j∈W(i)} e^{s·q_i·k_j − M_i} [v_j, 1]
Random-feature part over the complement, from per-block states S_c = Σ_{j∈c} φ(k_j)[v_j, 1]ᵀ:
    P_i = φ(q_i)·Σ_{blocks c outside the window (before it, when causal)} S_c
Both on one scale, with H_i = h_i + h_k and T_i = max(M_i, H_i):
    [num_i, den_i] = e^{M_i − T_i} A_i + e^{H_i − T_i} P_i,      out_i = num_i / den_i.

Every term is a ratio of non-negative sums, so no exponent overflows; as the window covers all
keys P_i = 0 and the result is exact attention, and with no window (window=0 still keeps the
query's own block) it approaches Performer.

Both implementations carry the exact part as the window's normalized output out_i and its
log-sum-exp lse_i = log Σ_{j∈W(i)} e^{s·q_i·k_j}: then e^{M_i}·A_i = e^{lse_i}·[out_i, 1], so
the combination above holds with M_i replaced by lse_i and A_i by [out_i, 1] (lse_i = −inf
where the window holds no visible key).

- Reference (CPU): the window by SDPA over gathered key blocks (`blocked.attend_gathered`,
  O(n·(2L+1)·block)), the complement O(n·m·Dv) plus (n/block)·m·Dv for the block states —
  linear in n, never an n×n matrix.
- CUDA: the window on the generated flash kernel's block-sparse path, which returns lse with
  its output (no score, weight or gathered key materialized), and the complement fused
  (`kernels/favor.window_complement`): one state per key block, their prefix sums, and φ(q)
  computed per feature tile next to them.

Masks: as the Performer op, only key visibility is honoured outside the window; inside it the
site's mask applies as given.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.ops.blocked import BlockGather, attend_gathered
from attnopt.ops.common import (
    empty_like_query_layout, like_query_layout, onnx_scalar, register_recompute_autograd,
)
from attnopt.ops.features import (
    compute_dtype, favor_features, keep_for_kv_heads, repeat_kv_heads,
    visible_keys_mask,
)
from attnopt.ops.performer import MIN_DENOMINATOR
from attnopt.ops.sparsity import SparsePattern, pattern_layout


def window_blocks(window: int, block: int) -> int:
    """L: the neighbouring blocks on each side the exact window spans."""
    return -(-max(window, 0) // block)


def performer_window_reference(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                               attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                               scale: Optional[float] = None, enable_gqa: bool = False,
                               window: int = 128, block: int = 64) -> Tensor:
    dtype = compute_dtype(q.dtype)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    heads, q_len = q.shape[1], q.shape[2]
    kv_len = k.shape[2]
    if is_causal and q_len != kv_len:
        raise ValueError("causal performer_window needs as many keys as queries")
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    local = window_blocks(window, block)
    layout = window_layout(local, block, q_len, kv_len, is_causal, q.device)
    plan = BlockGather(layout, block, q_len, kv_len, causal=is_causal, dense_rows=False)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool \
        else attn_mask.to(dtype)
    # the window's normalized output and log-sum-exp, as the kernel path's flash kernel
    out_exact, log_exact = attend_gathered(plan, qc, kc, vc, mask, heads, scale, with_lse=True)
    out_exact, log_exact = out_exact[:, :, :q_len], log_exact[:, :, :q_len]
    return _with_complement(qc, kc, vc, projection, attn_mask, is_causal, scale, local, block,
                            out_exact, log_exact).to(q.dtype)


def window_layout(local: int, block: int, q_len: int, kv_len: int, causal: bool, device):
    """(M, N) bool: each query block's own block and `local` blocks on each side (before it
    only, when causal)."""
    pattern = SparsePattern(block=block, local_left=local, local_right=0 if causal else local)
    return pattern_layout(pattern, q_len, kv_len, causal=causal, device=device)


def _with_complement(qc, kc, vc, projection, attn_mask, causal, scale, local, block,
                     out_exact, log_exact):
    """The exact window's normalized output and natural log-sum-exp (−inf for rows whose
    window holds no visible key) combined with FAVOR+ over the blocks outside the window."""
    heads, q_len = qc.shape[1], qc.shape[2]
    kv_len = kc.shape[2]
    keep_k = keep_for_kv_heads(visible_keys_mask(attn_mask, kv_len), kc.shape[1])
    phi_q, h_q = favor_features(qc, projection, scale, is_query=True)
    phi_k, h_k = favor_features(kc, projection, scale, is_query=False, keep_BHS1=keep_k)
    # per key block: S_c = Σ_{j∈c} φ(k_j) [v_j, 1]ᵀ; prefix sums over blocks give any range
    v_ext = torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1)
    k_blocks, q_blocks = -(-kv_len // block), -(-q_len // block)
    phi_k_blocks = _blocks(phi_k, k_blocks, block)                    # (B, Hkv, N, b, m)
    states = phi_k_blocks.transpose(-1, -2) @ _blocks(v_ext, k_blocks, block)  # (.., N, m, Dv+1)
    prefix = torch.nn.functional.pad(states.cumsum(dim=2), (0, 0, 0, 0, 1, 0))  # (.., N+1, ..)
    qb = torch.arange(q_blocks, device=qc.device)
    start = (qb - local).clamp(min=0, max=k_blocks)
    outside = prefix.index_select(2, start)                            # blocks before the band
    if not causal:
        end = (qb + local + 1).clamp(max=k_blocks)
        outside = outside + (prefix[:, :, -1:] - prefix.index_select(2, end))  # and after it
    outside = repeat_kv_heads(outside, heads)                          # (B, H, M, m, Dv+1)
    rest = (_blocks(phi_q, q_blocks, block) @ outside).flatten(2, 3)[:, :, :q_len]
    rest_num, rest_den = rest[..., :-1], rest[..., -1:]

    log_rest = h_q + repeat_kv_heads(h_k, heads)                      # (B, H, Sq, 1)
    top = torch.maximum(log_exact, log_rest)
    exact_weight = torch.exp(log_exact - top)                          # 0 where no key in W
    rest_weight = torch.exp(log_rest - top)
    numerator = exact_weight * out_exact + rest_weight * rest_num
    denominator = exact_weight + rest_weight * rest_den
    return numerator / denominator.clamp_min(MIN_DENOMINATOR)


def performer_window_kernel(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                            enable_gqa=False, window=128, block=64) -> Tensor:
    """The window on the generated flash kernel's block-sparse path, which returns each row's
    log-sum-exp (so no score, weight or gathered key is materialized), and the complement
    fused (`kernels/favor.window_complement`: per-block feature states, never the (n × m)
    features; torch for per-head key masks). CUDA, or CPU tensors under the interpreter."""
    import math

    from attnopt.kernels import BlockSparseLayout
    from attnopt.kernels.flash import flash_forward
    from attnopt.kernels.params import AttentionParams
    dtype = compute_dtype(q.dtype)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    q_len, kv_len = q.shape[2], k.shape[2]
    if is_causal and q_len != kv_len:
        raise ValueError("causal performer_window needs as many keys as queries")
    local = window_blocks(window, block)
    layout = BlockSparseLayout(window_layout(local, block, q_len, kv_len, is_causal,
                                             q.device)[None, None], block)
    params = AttentionParams.build(q, k, v, causal=is_causal, scale=scale, attn_bias=attn_mask,
                                   kv_lengths=None, window=None, block_mask=layout,
                                   softcap=None, alibi_slopes=None,
                                   causal_alignment="top_left")
    out_exact, lse2 = flash_forward(q, k, v, params)   # lse in base 2, +inf for empty rows
    lse = lse2 * math.log(2.0)
    log_exact = torch.where(torch.isinf(lse), torch.full_like(lse, float("-inf")), lse)
    keep_k = keep_for_kv_heads(visible_keys_mask(attn_mask, kv_len), k.shape[1])
    if max(q.shape[-1], v.shape[-1]) <= 256 and (keep_k is None or keep_k.shape[1] == 1):
        from attnopt.kernels.favor import window_complement
        return window_complement(q, k, v, projection, scale, keep_k, local, block,
                                 bool(is_causal), out_exact, log_exact)
    return _with_complement(q.to(dtype), k.to(dtype), v.to(dtype), projection, attn_mask,
                            is_causal, scale, local, block, out_exact.to(dtype),
                            log_exact.unsqueeze(-1)).to(q.dtype)


def _blocks(x_BHSX: Tensor, blocks: int, block: int) -> Tensor:
    """(B, H, blocks, block, X), zero-padded past the sequence."""
    missing = blocks * block - x_BHSX.shape[2]
    if missing:
        x_BHSX = torch.nn.functional.pad(x_BHSX, (0, 0, 0, missing))
    return x_BHSX.unflatten(2, (blocks, block))


@torch.library.custom_op("attnopt::performer_window", mutates_args=())
def performer_window(q: Tensor, k: Tensor, v: Tensor, projection: Tensor,
                     attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None, enable_gqa: bool = False,
                     window: int = 128, block: int = 64) -> Tensor:
    return like_query_layout(performer_window_reference(
        q, k, v, projection, attn_mask, is_causal, scale, enable_gqa, window, block), q)


@performer_window.register_kernel("cuda")
def _performer_window_cuda(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                           enable_gqa=False, window=128, block=64):
    from attnopt.ops.attention import kernel_skip_reason
    run = performer_window_kernel if kernel_skip_reason(
        q, k, v, attn_mask, sdpa_alternative=False) is None else performer_window_reference
    return like_query_layout(run(q, k, v, projection, attn_mask, is_causal, scale, enable_gqa,
                                 window, block), q)


@performer_window.register_fake
def _performer_window_fake(q, k, v, *args, **kwargs):
    return empty_like_query_layout(q, v.shape[-1])


register_recompute_autograd(performer_window, performer_window_reference)


def onnx_performer_window(q, k, v, projection, attn_mask=None, is_causal=False, scale=None,
                          enable_gqa=False, window=128, block=64):
    """The same combination in standard opset-18 ops, with the reference's structure: the
    window's key blocks gathered next to each query block (`blocked_onnx`), the complement
    from prefix sums of per-block feature states — linear in n in the runtime too."""
    from onnxscript import opset18 as op

    from attnopt.ops import blocked_onnx as bo
    from attnopt.ops.features import onnx_favor_features, onnx_visible_keys
    if scale is None:
        scale = q.shape[3] ** -0.5
    causal = bool(is_causal)
    qf, kf, vf = op.Cast(q, to=bo.FLOAT), op.Cast(k, to=bo.FLOAT), op.Cast(v, to=bo.FLOAT)
    keep = onnx_visible_keys(op, attn_mask, k.shape[1]) if attn_mask is not None else None
    phi_q, h_q = onnx_favor_features(op, qf, projection, scale, is_query=True)
    phi_k, h_k = onnx_favor_features(op, kf, projection, scale, is_query=False, keep=keep)

    # exact part: the window's blocks, unnormalized (numerator, denominator, row max)
    local = window_blocks(window, block)
    pattern = SparsePattern(block=block, local_left=local, local_right=0 if causal else local)
    q_len, kv_len = bo.length(op, q), bo.length(op, k)
    layout = bo.pattern_layout(op, pattern, q_len, kv_len, causal)
    indices, valid = bo.layout_slots(op, layout)
    scores, kv_heads = bo.gathered_scores(op, q, k, (indices, valid), block, scale,
                                          causal=causal, attn_mask=attn_mask)
    last = bo.ints(op, -1)
    row_max = op.ReduceMax(scores, last, keepdims=1)                     # (B, Hkv, G, M, b, 1)
    safe_max = op.Where(op.IsInf(row_max), onnx_scalar(op, 0.0, row_max), row_max)
    weights = op.Exp(op.Sub(scores, safe_max))
    exact_den = op.ReduceSum(weights, last, keepdims=1)
    v_gathered = bo.gather_blocks(op, bo.to_blocks(op, vf, block), indices, per_head=False)
    exact_num = op.MatMul(weights, op.Unsqueeze(v_gathered, bo.ints(op, 2)))

    # the complement: Σ of the block states outside the window, through prefix sums
    ones = op.Expand(onnx_scalar(op, 1.0, vf), op.Concat(op.Shape(vf, start=0, end=3),
                                                      bo.ints(op, 1), axis=0))
    v_ext = op.Concat(vf, ones, axis=-1)
    prefix = bo.exclusive_prefix(op, bo.block_states(op, phi_k, v_ext, block))  # (.., N+1, ..)
    zero, one = bo.const(op, 0), bo.const(op, 1)
    k_blocks = bo.block_count(op, kv_len, block)
    qb = op.Range(zero, bo.block_count(op, q_len, block), one)
    start = op.Min(op.Max(op.Sub(qb, bo.const(op, local)), zero), k_blocks)
    outside = op.Gather(prefix, start, axis=2)                           # (B, Hkv, M, m, Dv+1)
    if not causal:
        end = op.Min(op.Add(qb, bo.const(op, local + 1)), k_blocks)
        total = op.Gather(prefix, op.Unsqueeze(k_blocks, bo.ints(op, 0)), axis=2)
        outside = op.Add(outside, op.Sub(total, op.Gather(prefix, end, axis=2)))
    phi_q_blocks = bo.group_heads(op, bo.to_blocks(op, phi_q, block), kv_heads)
    rest = op.MatMul(phi_q_blocks, op.Unsqueeze(outside, bo.ints(op, 2)))  # (.., M, b, Dv+1)
    dv = op.Sub(op.Shape(rest, start=-1), bo.ints(op, 1))
    rest_num = op.Slice(rest, bo.ints(op, 0), dv, last)
    rest_den = op.Slice(rest, dv, op.Shape(rest, start=-1), last)

    log_rest = op.Add(bo.group_heads(op, bo.to_blocks(op, h_q, block), kv_heads),
                      op.Unsqueeze(h_k, bo.ints(op, 2, 3)))
    top = op.Max(row_max, log_rest)
    exact_weight = op.Exp(op.Sub(row_max, top))
    rest_weight = op.Exp(op.Sub(log_rest, top))
    numerator = op.Add(op.Mul(exact_weight, exact_num), op.Mul(rest_weight, rest_num))
    denominator = op.Add(op.Mul(exact_weight, exact_den), op.Mul(rest_weight, rest_den))
    out = op.Div(numerator, op.Max(denominator, onnx_scalar(op, MIN_DENOMINATOR, numerator)))
    return op.CastLike(bo.ungroup_rows(op, out, q), q)
