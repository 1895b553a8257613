"""Block-gathered attention in standard ONNX ops (opset 18): how the sparse, top-k and hybrid
ops, and the causal kernelized ones, keep their O(n) structure in an exported model.

The onnxscript counterpart of `blocked.BlockGather`, built from ops every runtime has:

1. queries, keys and values are zero-padded to whole blocks and viewed as (…, N, block, X);
2. a block layout (M, N) — or (B, H, M, N) when it depends on the data — is turned into K key
   block *slots* per query block with `TopK` over the layout row (K = the most any row keeps,
   computed at run time, so one exported graph serves every length);
3. `Gather` (`GatherND` for per-head layouts) copies each query block's kept key blocks next to
   it, and one batched `MatMul` scores the query block against its K·block keys; causality,
   the token window, the key length and the site's own mask apply inside the gathered keys.

Work and memory are O(n·K·block), never (Sq, Sk). GQA query heads are grouped as
(B, Hkv, G, …) against the per-kv-head gathered keys, so k and v are never repeated. Rows of
query blocks that keep every key block (Longformer's global rows) are computed densely and
put in front. Rows that see no key give zeros, as the torch reference does.

Also here: the chunked causal form of kernelized attention (per-block states and their prefix
sums, plus each block's own lower triangle), used by the causal Performer, linear and hybrid
ops instead of per-key outer products.
"""

from __future__ import annotations

from typing import Optional

from attnopt.ops.common import onnx_repeat_heads, onnx_scalar
from attnopt.ops.sparsity import HASH_MODULUS, HASH_MULTIPLIER, SparsePattern

FLOAT, INT64, BOOL = 1, 7, 9  # onnx.TensorProto element types
INT64_MAX = 2 ** 62


def ints(op, *values):
    return op.Constant(value_ints=[int(v) for v in values])


def const(op, value):
    return op.Constant(value_int=int(value))


def length(op, x, axis=2):
    """0-d int64: x.shape[axis]."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1))


def block_count(op, size, block: int):
    return op.Div(op.Add(size, const(op, block - 1)), const(op, block))


def to_blocks(op, x, block: int, axis: int = 2, rank: int = 4):
    """x (of rank `rank`: the tracer does not type intermediate values) with its `axis`
    zero-padded to whole blocks and split as (…, N, block, …)."""
    size = length(op, x, axis)
    pad = op.Sub(op.Mul(block_count(op, size, block), const(op, block)), size)
    pads = op.Concat(ints(op, *[0] * (rank + axis)), op.Unsqueeze(pad, ints(op, 0)),
                     ints(op, *[0] * (rank - axis - 1)), axis=0)
    padded = op.Pad(x, pads)
    return op.Reshape(padded, op.Concat(op.Shape(x, start=0, end=axis), ints(op, -1, block),
                                        op.Shape(x, start=axis + 1), axis=0))


def group_heads(op, x, kv_heads):
    """(B, H, …) → (B, Hkv, G, …): query head h belongs to kv head h // G (GQA's order).
    `kv_heads` a 1-element int64 tensor."""
    return op.Reshape(x, op.Concat(op.Shape(x, start=0, end=1), kv_heads, ints(op, -1),
                                   op.Shape(x, start=2), axis=0))


def ungroup_rows(op, x6, q):
    """(B, Hkv, G, M, block, X) → (B, H, Sq, X): the block rows back in sequence order."""
    flat = op.Reshape(x6, op.Concat(op.Shape(q, start=0, end=2), ints(op, -1),
                                    op.Shape(x6, start=5), axis=0))
    return op.Slice(flat, ints(op, 0), op.Shape(q, start=2, end=3), ints(op, 2))


# ----------------------------------------------------------------------------- layouts

def pattern_layout(op, pattern: SparsePattern, q_len, kv_len, causal: bool, user_layout=None):
    """(M, N) bool: `sparsity.pattern_layout` on the (dynamic, 0-d int64) lengths."""
    b = pattern.block
    zero, one = const(op, 0), const(op, 1)
    q_blocks, k_blocks = block_count(op, q_len, b), block_count(op, kv_len, b)
    qb = op.Unsqueeze(op.Range(zero, q_blocks, one), ints(op, 1))       # (M, 1)
    kb = op.Unsqueeze(op.Range(zero, k_blocks, one), ints(op, 0))       # (1, N)
    false = op.Cast(op.Mul(qb, kb), to=BOOL)
    false = op.And(false, op.Not(false))                                 # (M, N) all False
    if pattern.has_blocks or user_layout is not None:
        keep = false
        if pattern.local_left >= 0 or pattern.local_right >= 0:
            distance = op.Sub(qb, kb)
            near = op.And(
                op.LessOrEqual(distance, const(op, max(pattern.local_left, 0) * pattern.dilation)),
                op.LessOrEqual(op.Neg(distance),
                               const(op, max(pattern.local_right, 0) * pattern.dilation)))
            on_step = op.Equal(op.Mod(distance, const(op, pattern.dilation)), zero)
            keep = op.Or(keep, op.And(near, on_step))
        if pattern.stride > 0:
            keep = op.Or(keep, op.Equal(op.Mod(op.Add(kb, one), const(op, pattern.stride)), zero))
        if pattern.global_blocks > 0:
            g = const(op, pattern.global_blocks)
            keep = op.Or(keep, op.Or(op.Less(qb, g), op.Less(kb, g)))
        if pattern.random_blocks > 0:
            draws = op.Unsqueeze(op.Range(zero, const(op, pattern.random_blocks), one),
                                 ints(op, 0))                               # (1, r)
            x = op.Mod(op.Add(op.Add(op.Mul(qb, const(op, 1000003)),
                                     op.Mul(draws, const(op, 7919))),
                              const(op, pattern.seed * 104729 + 1)), const(op, HASH_MODULUS))
            x = op.Mod(op.Mul(x, const(op, HASH_MULTIPLIER)), const(op, HASH_MODULUS))
            x = op.Mod(op.Mul(x, const(op, HASH_MULTIPLIER)), const(op, HASH_MODULUS))
            limit = op.Min(op.Add(qb, one), k_blocks) if causal else k_blocks
            drawn = op.Mod(x, limit)                                         # (M, r)
            hit = op.Equal(op.Unsqueeze(drawn, ints(op, -1)), op.Unsqueeze(kb, ints(op, 0)))
            keep = op.Or(keep, op.Cast(op.ReduceMax(op.Cast(hit, to=INT64), ints(op, 1),
                                                    keepdims=0), to=BOOL))
        if user_layout is not None:
            keep = op.Or(keep, op.Cast(user_layout, to=BOOL))
    else:
        keep = op.Not(false)
    first_q = op.Mul(qb, const(op, b))
    last_q = op.Min(op.Add(first_q, const(op, b - 1)), op.Sub(q_len, one))
    first_k = op.Mul(kb, const(op, b))
    last_k = op.Min(op.Add(first_k, const(op, b - 1)), op.Sub(kv_len, one))
    if pattern.window_left >= 0:
        keep = op.And(keep, op.GreaterOrEqual(last_k, op.Sub(first_q,
                                                             const(op, pattern.window_left))))
    if pattern.window_right >= 0:
        keep = op.And(keep, op.LessOrEqual(first_k, op.Add(last_q,
                                                           const(op, pattern.window_right))))
    if causal:
        keep = op.And(keep, op.LessOrEqual(first_k, last_q))
    return keep


def layout_slots(op, layout, light_from: int = 0):
    """(indices (…, M, K) int64, valid (…, M, K) bool): the key blocks each query block keeps,
    K the most any row from `light_from` on keeps (rows before it are computed densely)."""
    counts = op.ReduceSum(op.Cast(layout, to=INT64), ints(op, -1), keepdims=0)   # (…, M)
    if light_from:
        counts = op.Slice(counts, ints(op, light_from), ints(op, INT64_MAX), ints(op, -1))
    counts = op.Concat(op.Reshape(counts, ints(op, -1)), ints(op, 1), axis=0)  # never empty
    slots = op.Reshape(op.ReduceMax(counts, ints(op, 0), keepdims=1), ints(op, 1))
    values, indices = op.TopK(op.Cast(layout, to=FLOAT), slots, axis=-1)
    return indices, op.Greater(values, onnx_scalar(op, 0.0, values))


# ------------------------------------------------------------------------------ gathering

def gather_blocks(op, x_blocks, indices, per_head: bool):
    """Each query block's kept key blocks, side by side: x_blocks (B, Hx, N, block, X) and
    indices (M, K) → (B, Hx, M, K·block, X); per-head indices (B, Hx, M, K) → the same with
    `GatherND` (x_blocks must then carry the layout's heads)."""
    if not per_head:
        gathered = op.Gather(x_blocks, indices, axis=2)                 # (B, Hx, M, K, b, X)
    else:
        gathered = op.GatherND(x_blocks, op.Unsqueeze(indices, ints(op, -1)), batch_dims=2)
    return op.Reshape(gathered, op.Concat(op.Shape(gathered, start=0, end=3), ints(op, -1),
                                          op.Shape(gathered, start=5), axis=0))


def gather_mask(op, attn_mask, indices, per_head: bool, block: int, like, kv_heads):
    """The site's mask at the gathered keys as an additive float bias broadcastable to the
    grouped scores (B, Hkv, G, M, block, K·block). Masks that do not depend on the query
    (key padding) gather their key blocks; full (…, Sq, Sk) masks gather per query block.
    `kv_heads`: the gathered keys' head count (the query heads for a per-head layout)."""
    rank = len(attn_mask.shape)
    mask = attn_mask
    if rank < 4:
        mask = op.Unsqueeze(mask, ints(op, *range(4 - rank)))
    if attn_mask.dtype == BOOL:  # True = attend
        mask = op.Where(mask, onnx_scalar(op, 0.0, like), onnx_scalar(op, float("-inf"), like))
    else:
        mask = op.CastLike(mask, like)
    mask_heads = attn_mask.shape[-3] if rank >= 3 else 1
    per_query = not (rank >= 2 and attn_mask.shape[-2] == 1)
    if per_head:  # indices (B, H, M, K): the mask must carry the same batch and heads
        mask = op.Expand(mask, op.Concat(op.Shape(indices, start=0, end=2),
                                         op.Shape(mask, start=2), axis=0))
    mask = to_blocks(op, mask, block, axis=3)                         # (Bm, Hm, Sqm, N, b)
    if not per_query:
        mask = op.Squeeze(mask, ints(op, 2))                          # (Bm, Hm, N, b)
        if per_head:
            gathered = op.GatherND(mask, op.Unsqueeze(indices, ints(op, -1)), batch_dims=2)
        else:
            gathered = op.Gather(mask, indices, axis=2)               # (Bm, Hm, M, K, b)
        bias = op.Reshape(gathered, op.Concat(op.Shape(gathered, start=0, end=3),
                                              ints(op, 1, -1), axis=0))  # (Bm, Hm, M, 1, Kb)
    else:
        mask = to_blocks(op, mask, block, axis=2, rank=5)             # (Bm, Hm, M, b, N, b)
        mask = op.Transpose(mask, perm=[0, 1, 2, 4, 3, 5])            # (Bm, Hm, M, N, b, b)
        index = indices if per_head else op.Expand(indices, op.Concat(
            op.Shape(mask, start=0, end=2), op.Shape(indices), axis=0))
        gathered = op.GatherND(mask, op.Unsqueeze(index, ints(op, -1)), batch_dims=3)
        gathered = op.Transpose(gathered, perm=[0, 1, 2, 4, 3, 5])    # (Bm, Hm, M, b, K, b)
        bias = op.Reshape(gathered, op.Concat(op.Shape(gathered, start=0, end=4),
                                              ints(op, -1), axis=0))  # (Bm, Hm, M, b, Kb)
    if mask_heads == 1 and not per_head:
        return op.Unsqueeze(bias, ints(op, 2))                        # (Bm, 1, 1, M, ·, Kb)
    return group_heads(op, bias, kv_heads)                            # (Bm, Hkv, G, M, ·, Kb)


def position_keep(op, keep, query_pos, key_pos, causal: bool,
                  window: Optional[tuple[int, int]]):
    """`keep` and what causality and the token window allow (`sparsity.position_keep`)."""
    if causal:
        keep = op.And(keep, op.LessOrEqual(key_pos, query_pos))
    if window is not None:
        left, right = window
        if left >= 0:
            keep = op.And(keep, op.GreaterOrEqual(key_pos, op.Sub(query_pos, const(op, left))))
        if right >= 0:
            keep = op.And(keep, op.LessOrEqual(key_pos, op.Add(query_pos, const(op, right))))
    return keep


def slot_keep(op, indices, valid, per_head: bool, block: int, kv_len, causal: bool,
              window: Optional[tuple[int, int]]):
    """(…, M, block, K·block) bool: which gathered keys each query row may attend — a kept slot,
    inside the sequence, and allowed by causality and the token window."""
    b = block
    offsets = op.Range(const(op, 0), const(op, b), const(op, 1))                    # (b,)
    key_pos = op.Add(op.Mul(op.Unsqueeze(indices, ints(op, -1)), const(op, b)), offsets)
    ok = op.And(op.Expand(op.Unsqueeze(valid, ints(op, -1)), op.Shape(key_pos)),
                op.Less(key_pos, kv_len))                                     # (…, M, K, b)
    flat = op.Concat(op.Shape(key_pos, start=0, end=-3), op.Shape(key_pos, start=-3, end=-2),
                     ints(op, 1, -1), axis=0)
    key_pos, keep = op.Reshape(key_pos, flat), op.Reshape(ok, flat)           # (…, M, 1, Kb)
    q_blocks = op.Shape(indices, start=-2, end=-1)
    q_pos = op.Add(op.Mul(op.Unsqueeze(op.Range(const(op, 0), op.Squeeze(q_blocks),
                                                const(op, 1)), ints(op, 1, 2)), const(op, b)),
                   op.Unsqueeze(offsets, ints(op, 1)))                         # (M, b, 1)
    keep = position_keep(op, keep, q_pos, key_pos, causal, window)
    if per_head:
        return op.Unsqueeze(keep, ints(op, 2))                        # (B, H, 1, M, b, Kb)
    return keep                                                       # (M, b, Kb)


def gathered_scores(op, q, k, slots, block: int, scale: float, *, causal: bool,
                    window=None, attn_mask=None, per_head: bool = False):
    """Everything before the softmax, for the key-block `slots` (indices, valid) of
    `layout_slots` — (M, K), or (B, H, M, K) with `per_head`: (scores (B, Hkv, G, M, block,
    K·block) with -inf where a key is not visible, kv_heads) in float32."""
    qf, kf = op.Cast(q, to=FLOAT), op.Cast(k, to=FLOAT)
    heads = op.Shape(q, start=1, end=2)
    indices, valid = slots
    if per_head:  # a (B, H, M, N) layout gathers per query head
        kf = onnx_repeat_heads(op, kf, heads)
    kv_heads = op.Shape(kf, start=1, end=2)
    k_gathered = gather_blocks(op, to_blocks(op, kf, block), indices, per_head)  # (B, Hx, M, Kb, D)
    q_grouped = group_heads(op, to_blocks(op, op.Mul(qf, onnx_scalar(op, scale, qf)), block),
                            kv_heads)                                   # (B, Hx, G, M, b, D)
    scores = op.MatMul(q_grouped, op.Transpose(op.Unsqueeze(k_gathered, ints(op, 2)),
                                               perm=[0, 1, 2, 3, 5, 4]))
    keep = slot_keep(op, indices, valid, per_head, block, length(op, k), causal, window)
    if attn_mask is not None:
        scores = op.Add(scores, gather_mask(op, attn_mask, indices, per_head, block, scores,
                                            kv_heads))
    scores = op.Where(keep, scores, onnx_scalar(op, float("-inf"), scores))
    return scores, kv_heads


def blocked_attention(op, q, k, v, slots, block: int, scale: float, *, causal: bool,
                      window=None, attn_mask=None, dense_blocks: int = 0,
                      per_head: bool = False):
    """Exact attention restricted to the key-block `slots` (`gathered_scores`), as
    `blocked.blocked_attention`: (B, H, Sq, Dv) in q's type. The first `dense_blocks` query
    blocks keep every key block and are computed over all keys."""
    indices = slots[0]
    scores, _ = gathered_scores(op, q, k, slots, block, scale, causal=causal, window=window,
                                attn_mask=attn_mask, per_head=per_head)
    vf = op.Cast(v, to=FLOAT)
    if per_head:
        vf = onnx_repeat_heads(op, vf, op.Shape(q, start=1, end=2))
    v_gathered = gather_blocks(op, to_blocks(op, vf, block), indices, per_head)
    out = op.MatMul(op.Softmax(scores, axis=-1), op.Unsqueeze(v_gathered, ints(op, 2)))
    out = ungroup_rows(op, out, q)
    if dense_blocks:
        out = op.Concat(_dense_rows(op, q, k, v, dense_blocks * block, scale, causal, window,
                                    attn_mask),
                        op.Slice(out, ints(op, dense_blocks * block), ints(op, INT64_MAX),
                                 ints(op, 2)), axis=2)
    out = op.Where(op.IsNaN(out), onnx_scalar(op, 0.0, out), out)  # rows that see no key
    return op.CastLike(out, q)


def _dense_rows(op, q, k, v, rows: int, scale: float, causal: bool, window, attn_mask):
    """Attention of the first `rows` queries over every key (causal, window and mask applied)."""
    from attnopt.ops.attention import onnx_attention_decomposed
    q_rows = op.Slice(q, ints(op, 0), ints(op, rows), ints(op, 2))
    zero, one = const(op, 0), const(op, 1)
    row_pos = op.Unsqueeze(op.Range(zero, length(op, q_rows), one), ints(op, 1))
    col_pos = op.Unsqueeze(op.Range(zero, length(op, k), one), ints(op, 0))
    keep = position_keep(op, op.GreaterOrEqual(col_pos, const(op, -1)),  # (R, Sk) all True
                         row_pos, col_pos, causal, window)
    bias = op.Where(keep, onnx_scalar(op, 0.0, q), onnx_scalar(op, float("-inf"), q))
    if attn_mask is not None:
        mask = attn_mask
        if len(attn_mask.shape) >= 2 and attn_mask.shape[-2] != 1:
            mask = op.Slice(mask, ints(op, 0), ints(op, rows), ints(op, -2))
        if mask.dtype == BOOL:
            mask = op.Where(mask, onnx_scalar(op, 0.0, q), onnx_scalar(op, float("-inf"), q))
        bias = op.Add(bias, op.CastLike(mask, q))
    return op.Cast(onnx_attention_decomposed(q_rows, k, v, bias, False, scale, True), to=FLOAT)


# ------------------------------------------------------------------ chunked causal kernels

def block_states(op, phi_k, v_ext, block: int):
    """Per key block S_c = Σ_{j∈c} φ(k_j) [v_j, 1]ᵀ: (B, Hkv, N, m, Dv+1)."""
    phi_blocks = to_blocks(op, phi_k, block)                           # (B, Hkv, N, b, m)
    return op.MatMul(op.Transpose(phi_blocks, perm=[0, 1, 2, 4, 3]), to_blocks(op, v_ext, block))


def exclusive_prefix(op, states):
    """(B, Hkv, N+1, m, Dv+1): P_c = Σ_{c' < c} S_c' for c = 0 … N."""
    summed = op.CumSum(states, const(op, 2))
    return op.Pad(summed, ints(op, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0))


def causal_kernelized(op, q, phi_q, phi_k, v_ext, block: int):
    """Σ_{j<=i} φ(q_i)·φ(k_j) [v_j, 1] in chunks: the states of earlier blocks through their
    prefix sums plus each block's own lower triangle — O(n·(block + m)·Dv) work and memory.
    Returns (B, H, Sq, Dv+1); equal query and key lengths."""
    kv_heads = op.Shape(phi_k, start=1, end=2)
    prefix = exclusive_prefix(op, block_states(op, phi_k, v_ext, block))
    q_blocks = group_heads(op, to_blocks(op, phi_q, block), kv_heads)     # (B, Hkv, G, M, b, m)
    before = op.Slice(prefix, ints(op, 0), ints(op, -1), ints(op, 2))      # P_0 … P_{N-1}
    out = op.MatMul(q_blocks, op.Unsqueeze(before, ints(op, 2)))
    k_blocks = op.Unsqueeze(to_blocks(op, phi_k, block), ints(op, 2))     # (B, Hkv, 1, N, b, m)
    kappa = op.MatMul(q_blocks, op.Transpose(k_blocks, perm=[0, 1, 2, 3, 5, 4]))
    positions = op.Range(const(op, 0), const(op, block), const(op, 1))
    lower = op.LessOrEqual(op.Unsqueeze(positions, ints(op, 0)),
                           op.Unsqueeze(positions, ints(op, 1)))           # (b, b): j <= i
    kappa = op.Where(lower, kappa, onnx_scalar(op, 0.0, kappa))
    out = op.Add(out, op.MatMul(kappa, op.Unsqueeze(to_blocks(op, v_ext, block), ints(op, 2))))
    return ungroup_rows(op, out, q)
