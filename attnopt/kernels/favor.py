"""Fused FAVOR+ (softmax kernel): Performer attention without materializing the (n × m)
random-feature matrices — non-causal, causal, and the complement of the window + FAVOR+ hybrid.

Two kernels, each reading its inputs once:

1. `_favor_keys_kernel` — per (batch·kv head, feature tile, key split): streams key tiles,
   forms the exponents e = x·Ωᵀ − |x|²/2 (x = √scale·k) and accumulates
   A_f = Σ_j exp(e_jf − h_f) [v_j, 1] with a running max h_f per feature, rescaling the sum
   whenever h_f grows (the online-softmax trick, per feature), plus Σ_j v_j for the ε term.
2. `_favor_queries_kernel` — per (batch·head, query tile): streams feature tiles of the combined
   state S (m × Dv) and z (m), with a running max over the query's exponents, as a flash
   attention whose "keys" are the m random features.

Between them, torch combines the key splits and puts every feature on the reference's common
key stabilizer h_k = max_f h_f (features.favor_features: φ(k) = ratio·(exp(e − h_k) + ε)), so
the result is the reference's up to summation order and tf32 products. The query stabilizer is
the row max over features, as in the reference; it cancels in num/den. Scope: key masks as
(B, Sk) visibility, head dims up to 256; the op falls back to torch otherwise.

Causal (`favor_causal_attention`) and the hybrid's complement (`window_complement`) run the
keys kernel with splits of exactly one block, so it writes one state per key block; torch
takes their prefix sums, and a queries kernel reads, per block of queries, the prefix of the
blocks before it (causal: plus its own block's keys j <= i, φ(k) computed in the kernel) or
of the blocks outside its window (hybrid: combined with the window's exact output and
log-sum-exp).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.params import cdiv, interpreting, padded_head_dim
from attnopt.ops.features import FEATURE_EPS

#: Tiles and warps: swept on the H100 (bf16, 16 heads, head dim 64, m = 256, n = 1K–64K;
#: docs/BENCHMARKS.md) for head dims up to 64; wider heads keep 64-tiles and 4 warps.
BLOCK_KEYS, BLOCK_FEATURES, BLOCK_QUERIES, NUM_WARPS = 128, 64, 128, 8
WIDE_HEAD_CONFIG = (64, 64, 64, 4)
#: Key-split programs are added until the grid has this many programs (or one key tile each).
TARGET_PROGRAMS = 512


@triton.jit
def _favor_keys_kernel(K, V, OMEGA, KEEP, ACC, ZSUM, HMAX, VSUM,
                       stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                       stride_keepb, kv_heads, kv_len, features, root_scale, tiles_per_split,
                       HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                       HAS_KEEP: tl.constexpr, IEEE: tl.constexpr):
    pid_bh, pid_f, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = pid_bh // kv_heads, pid_bh % kv_heads
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    omega = tl.load(OMEGA + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(offs_f[:, None] < features) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    acc = tl.zeros((BLOCK_F, BLOCK_DV), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_F,), dtype=tl.float32)
    h_run = tl.full((BLOCK_F,), float("-inf"), dtype=tl.float32)
    vsum = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    count = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    first = pid_s * tiles_per_split * BLOCK_N
    for start in range(first, first + tiles_per_split * BLOCK_N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < kv_len
        visible = in_range
        if HAS_KEEP:
            keep = tl.load(KEEP + batch * stride_keepb + offs_n, mask=in_range, other=0.0)
            visible = visible & (keep > 0)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=in_range[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        x = k.to(tl.float32) * root_scale
        if IEEE:
            e = tl.dot(x, tl.trans(omega), input_precision="ieee")
        else:
            e = tl.dot(x, tl.trans(omega))
        e = e - 0.5 * tl.sum(x * x, axis=1)[:, None]
        e = tl.where(visible[:, None], e, float("-inf"))
        h_new = tl.maximum(h_run, tl.max(e, axis=0))
        h_safe = tl.where(h_new == float("-inf"), 0.0, h_new)
        alpha = tl.exp(h_run - h_safe)
        p = tl.exp(e - h_safe[None, :])                                       # (N, F)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=visible[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
        vf = v.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p), vf, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p), vf)
        zsum = zsum * alpha + tl.sum(p, axis=0)
        h_run = h_new
        vsum += tl.sum(vf, axis=0)
        count += visible.to(tl.float32)
    out = (pid_bh * tl.num_programs(2) + pid_s)
    tl.store(ACC + (out * features + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :], acc,
             mask=offs_f[:, None] < features)
    tl.store(ZSUM + out * features + offs_f, zsum, mask=offs_f < features)
    tl.store(HMAX + out * features + offs_f, h_run, mask=offs_f < features)
    if pid_f == 0:
        tl.store(VSUM + out * (BLOCK_DV + 1) + offs_dv, vsum)
        tl.store(VSUM + out * (BLOCK_DV + 1) + BLOCK_DV, tl.sum(count, axis=0))


@triton.jit
def _favor_queries_kernel(Q, OMEGA, STATE, Z, EPS_NUM, EPS_DEN, OUT,
                          stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
                          heads, group, q_len, features, root_scale, eps,
                          HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_F: tl.constexpr, IEEE: tl.constexpr):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    kv = batch * (heads // group) + head // group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn +
                offs_d[None, :], mask=(offs_n[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM),
                other=0.0)
    x = q.to(tl.float32) * root_scale
    half_norm = 0.5 * tl.sum(x * x, axis=1)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    h_run = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for f0 in range(0, features, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        omega = tl.load(OMEGA + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=(offs_f[:, None] < features) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
        if IEEE:
            e = tl.dot(x, tl.trans(omega), input_precision="ieee")
        else:
            e = tl.dot(x, tl.trans(omega))
        e = tl.where(offs_f[None, :] < features, e - half_norm[:, None], float("-inf"))
        h_new = tl.maximum(h_run, tl.max(e, axis=1))
        alpha = tl.exp(h_run - h_new)
        p = tl.exp(e - h_new[:, None])                                       # (N, F)
        state = tl.load(STATE + (kv * features + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :],
                        mask=offs_f[:, None] < features, other=0.0)
        z = tl.load(Z + kv * features + offs_f, mask=offs_f < features, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, state, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, state)
        den = den * alpha + tl.sum(p * z[None, :], axis=1)
        h_run = h_new
    eps_num = tl.load(EPS_NUM + kv * BLOCK_DV + offs_dv)
    eps_den = tl.load(EPS_DEN + kv)
    numerator = acc + eps * eps_num[None, :]
    denominator = den + eps * eps_den
    out = numerator / tl.maximum(denominator, 1.0e-30)[:, None]
    tl.store(OUT + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on +
             offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_n[:, None] < q_len) & (offs_dv[None, :] < V_DIM))


def favor_skip_reason(q: Tensor, k: Tensor, v: Tensor, keep_BHS1: Optional[Tensor],
                      is_causal: bool, kernel: str) -> Optional[str]:
    """Why a Performer call runs the torch reference rather than these kernels."""
    if kernel != "softmax":
        return f"{kernel} features run in torch"
    return kernelized_skip_reason(q, k, v, keep_BHS1, is_causal, max_head_dim=256)


def kernelized_skip_reason(q: Tensor, k: Tensor, v: Tensor, keep_BHS1: Optional[Tensor],
                           is_causal: bool, max_head_dim: int) -> Optional[str]:
    """What the fused kernelized-attention kernels (FAVOR+ here, elu + 1 in linear.py) need:
    CUDA (or the interpreter), equal lengths when causal, head dims up to `max_head_dim`,
    half or single precision, key masks shared by the heads. None when they apply."""
    if q.device.type != "cuda" and not interpreting():
        return "not on CUDA"
    if is_causal and q.shape[-2] != k.shape[-2]:
        return "causal over unequal lengths runs the torch form"
    if q.dim() != 4 or q.shape[-1] > max_head_dim or v.shape[-1] > max_head_dim:
        return f"head dims above {max_head_dim}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if keep_BHS1 is not None and keep_BHS1.shape[1] != 1:
        return "per-head key masks"
    return None


def _key_states(k: Tensor, v: Tensor, omega: Tensor, keep: Optional[Tensor], root_scale: float,
                batch: int, splits: int, tiles_per_split: int, block_keys: int,
                block_features: int, block_d: int, block_dv: int, num_warps: int):
    """Run the keys kernel over `splits` consecutive runs of keys per (batch, kv head) and put
    the runs on the common key stabilizer h_k (`features.favor_features`): (acc, zsum) of
    Σ_j e^{e_j − h_k} [v_j | 1] per run, shapes (B·Hkv, splits, m, BLOCK_DV) and
    (B·Hkv, splits, m); vsum (B·Hkv, splits, BLOCK_DV + 1) = Σ_j v_j and the visible key
    count per run (for the ε term); h_k (B·Hkv, 1, 1)."""
    kv_heads, kv_len, head_dim, v_dim = k.shape[1], k.shape[2], k.shape[3], v.shape[3]
    features = omega.shape[0]
    programs = batch * kv_heads * splits
    device = k.device
    acc = torch.empty(programs, features, block_dv, device=device, dtype=torch.float32)
    zsum = torch.empty(programs, features, device=device, dtype=torch.float32)
    hmax = torch.empty(programs, features, device=device, dtype=torch.float32)
    vsum = torch.empty(programs, block_dv + 1, device=device, dtype=torch.float32)
    _favor_keys_kernel[(batch * kv_heads, cdiv(features, block_features), splits)](
        k, v, omega, keep if keep is not None else k, acc, zsum, hmax, vsum,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keep.stride(0) if keep is not None else 0, kv_heads, kv_len, features, root_scale,
        tiles_per_split, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_N=block_keys, BLOCK_F=block_features, HAS_KEEP=keep is not None,
        IEEE=k.dtype == torch.float32, num_warps=num_warps)
    acc = acc.view(batch * kv_heads, splits, features, block_dv)
    zsum = zsum.view(batch * kv_heads, splits, features)
    hmax = hmax.view(batch * kv_heads, splits, features)
    h_k = hmax.amax(dim=(1, 2), keepdim=True)
    h_k = torch.where(torch.isfinite(h_k), h_k, torch.zeros_like(h_k))
    weight = torch.exp(hmax - h_k)                                      # 0 where no key
    acc.mul_(weight[..., None])
    zsum.mul_(weight)
    return acc, zsum, vsum.view(batch * kv_heads, splits, block_dv + 1), h_k


def key_visibility(keep_BHS1: Optional[Tensor], batch: int, kv_len: int,
                   device) -> Optional[Tensor]:
    """(B, Sk) float32 key visibility for the keys kernels (None: every key)."""
    if keep_BHS1 is None:
        return None
    keep = keep_BHS1.reshape(keep_BHS1.shape[0], kv_len).to(device, torch.float32)
    return keep.expand(batch, kv_len).contiguous()


def _operands(q: Tensor, k: Tensor, v: Tensor, projection: Tensor):
    """(q, k, v with unit last stride, Ω as float32, BLOCK_D, BLOCK_DV) for the kernels."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    omega = projection.to(device=q.device, dtype=torch.float32).contiguous()
    return q, k, v, omega, padded_head_dim(q.shape[-1]), padded_head_dim(v.shape[-1])


def _block_prefixes(k: Tensor, v: Tensor, omega: Tensor, keep: Optional[Tensor],
                    root_scale: float, batch: int, block: int, tile: int, block_features: int,
                    block_d: int, block_dv: int, ratio: float):
    """Per block of `block` keys, S_c = ratio·Σ_{j∈c} φ'(k_j) [v_j | 1] with φ' = e^{e − h_k} + ε
    (zero for masked keys), and their exclusive prefix sums over blocks: (prefix (B·Hkv, N+1,
    m, BLOCK_DV), prefix_z (B·Hkv, N+1, m), h_k (B·Hkv,)). The states are rescaled in place
    and summed into a preallocated prefix: they are the largest tensors of these paths."""
    features, k_blocks = omega.shape[0], cdiv(k.shape[2], block)
    acc, zsum, vsum, h_k = _key_states(k, v, omega, keep, root_scale, batch, k_blocks,
                                       block // tile, tile, block_features, block_d, block_dv,
                                       num_warps=4)
    states = acc.add_(vsum[:, :, None, :block_dv], alpha=FEATURE_EPS)
    z = zsum + FEATURE_EPS * vsum[:, :, None, block_dv]
    if ratio != 1.0:
        states.mul_(ratio)
        z = z * ratio
    prefix = torch.zeros(acc.shape[0], k_blocks + 1, features, block_dv, device=k.device,
                         dtype=torch.float32)
    torch.cumsum(states, dim=1, out=prefix[:, 1:])
    prefix_z = torch.nn.functional.pad(z.cumsum(dim=1), (0, 0, 1, 0)).contiguous()
    return prefix, prefix_z, h_k.reshape(-1).contiguous()


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, scale: float,
                    keep_BHS1: Optional[Tensor] = None) -> Tensor:
    """Non-causal FAVOR+ attention (features.favor_features semantics), fused."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    features = projection.shape[0]
    device = q.device
    q, k, v, omega, block_d, block_dv = _operands(q, k, v, projection)
    block_keys, block_features, block_queries, num_warps = \
        (BLOCK_KEYS, BLOCK_FEATURES, BLOCK_QUERIES, NUM_WARPS) if max(block_d, block_dv) <= 64 \
        else WIDE_HEAD_CONFIG
    ieee = q.dtype == torch.float32
    keep = key_visibility(keep_BHS1, batch, kv_len, device)
    key_tiles = cdiv(kv_len, block_keys)
    feature_tiles = cdiv(features, block_features)
    splits = max(1, min(key_tiles, TARGET_PROGRAMS // max(1, batch * kv_heads * feature_tiles)))
    tiles_per_split = cdiv(key_tiles, splits)
    splits = cdiv(key_tiles, tiles_per_split)
    root_scale = math.sqrt(scale)
    acc, zsum, vsum, _ = _key_states(k, v, omega, keep, root_scale, batch, splits,
                                     tiles_per_split, block_keys, block_features, block_d,
                                     block_dv, num_warps)
    # combine the splits (already on the common key stabilizer)
    vsum = vsum.sum(1)
    eps = FEATURE_EPS
    state = acc.sum(1) + eps * vsum[:, None, :block_dv]                 # (BHkv, m, Dv)
    z = zsum.sum(1) + eps * vsum[:, None, block_dv]                      # (BHkv, m)
    # the ε of the query features multiplies Σ_f state_f and Σ_f z_f
    eps_num = state.sum(1).contiguous()
    eps_den = z.sum(1).contiguous()
    out = torch.empty(batch, heads, q_len, v_dim, device=device, dtype=q.dtype)
    _favor_queries_kernel[(batch * heads, cdiv(q_len, block_queries))](
        q, omega, state.contiguous(), z.contiguous(), eps_num, eps_den, out,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, q_len, features, root_scale, eps, HEAD_DIM=head_dim,
        V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_queries,
        BLOCK_F=block_features, IEEE=ieee, num_warps=num_warps)
    return out


# ------------------------------------------------------------------ the hybrid's complement

@triton.jit
def _window_complement_kernel(Q, OMEGA, PREFIX, PREFIX_Z, EXACT, LSE, HK, OUT,
                              stride_qb, stride_qh, stride_qn, stride_eb, stride_eh, stride_en,
                              stride_ob, stride_oh, stride_on,
                              heads, group, q_len, features, k_blocks, local, root_scale, eps,
                              ratio,
                              HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                              QUERY_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                              IEEE: tl.constexpr):
    """One tile of BLOCK_N queries (inside one query block of the window layout): FAVOR+ over
    the key blocks outside the window, from the prefix sums of the block states, combined
    with the window's exact output and log-sum-exp under one normalizer."""
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    kv = batch * (heads // group) + head // group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_n < q_len
    q_block = (pid_n * BLOCK_N) // QUERY_BLOCK
    start = tl.minimum(tl.maximum(q_block - local, 0), k_blocks)
    end = tl.minimum(q_block + local + 1, k_blocks)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn +
                offs_d[None, :], mask=rows[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    x = q.to(tl.float32) * root_scale
    half_norm = 0.5 * tl.sum(x * x, axis=1)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    eps_num = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    eps_den = 0.0
    h_run = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    prefix_base = PREFIX + kv * (k_blocks + 1) * features * BLOCK_DV
    z_base = PREFIX_Z + kv * (k_blocks + 1) * features
    for f0 in range(0, features, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < features
        omega = tl.load(OMEGA + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=f_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if IEEE:
            e = tl.dot(x, tl.trans(omega), input_precision="ieee")
        else:
            e = tl.dot(x, tl.trans(omega))
        e = tl.where(f_ok[None, :], e - half_norm[:, None], float("-inf"))
        h_new = tl.maximum(h_run, tl.max(e, axis=1))
        alpha = tl.exp(h_run - h_new)
        p = tl.exp(e - h_new[:, None])                                       # (N, F)
        state_ptrs = prefix_base + (offs_f[:, None] * BLOCK_DV + offs_dv[None, :])
        state = tl.load(state_ptrs + start * features * BLOCK_DV, mask=f_ok[:, None], other=0.0)
        z = tl.load(z_base + start * features + offs_f, mask=f_ok, other=0.0)
        if not CAUSAL:  # and the blocks after the window: P[N] − P[end]
            state += tl.load(state_ptrs + k_blocks * features * BLOCK_DV, mask=f_ok[:, None],
                             other=0.0)
            state -= tl.load(state_ptrs + end * features * BLOCK_DV, mask=f_ok[:, None],
                             other=0.0)
            z += tl.load(z_base + k_blocks * features + offs_f, mask=f_ok, other=0.0)
            z -= tl.load(z_base + end * features + offs_f, mask=f_ok, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, state, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, state)
        den = den * alpha + tl.sum(p * z[None, :], axis=1)
        eps_num += tl.sum(state, axis=0)
        eps_den += tl.sum(z, axis=0)
        h_run = h_new
    # φ(q)·S with φ(q) = ratio·(e^{e − h_q} + ε), S already holding the keys' ratio·(…)
    rest_num = ratio * (acc + eps * eps_num[None, :])
    rest_den = ratio * (den + eps * eps_den)
    log_rest = h_run + tl.load(HK + kv)
    lse = tl.load(LSE + pid_bh * q_len + offs_n, mask=rows, other=float("-inf"))
    exact = tl.load(EXACT + batch * stride_eb + head * stride_eh + offs_n[:, None] * stride_en +
                    offs_dv[None, :], mask=rows[:, None] & (offs_dv[None, :] < V_DIM),
                    other=0.0).to(tl.float32)
    top = tl.maximum(lse, log_rest)
    exact_weight = tl.exp(lse - top)                                   # 0 where no key in W
    rest_weight = tl.exp(log_rest - top)
    numerator = exact_weight[:, None] * exact + rest_weight[:, None] * rest_num
    denominator = exact_weight + rest_weight * rest_den
    out = numerator / tl.maximum(denominator, 1.0e-30)[:, None]
    tl.store(OUT + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on +
             offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] & (offs_dv[None, :] < V_DIM))


def window_complement(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, scale: float,
                      keep_BHS1: Optional[Tensor], local: int, block: int, causal: bool,
                      out_exact: Tensor, lse: Tensor) -> Tensor:
    """The hybrid op's output (`ops/hybrid.py`) from its window's exact output and natural
    log-sum-exp (B, H, Sq; −inf where the window holds no visible key), with FAVOR+ over the
    key blocks outside the window fused: the keys kernel above writes one state per key block
    (a split of exactly one block), torch puts them on the common key stabilizer and takes
    their prefix sums, and the complement kernel computes φ(q) per feature tile and combines —
    the (n × m) feature matrices are never materialized."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    features = projection.shape[0]
    device = q.device
    q, k, v, omega, block_d, block_dv = _operands(q, k, v, projection)
    tile = min(block, 64)        # key and query tiles: one tile never straddles two blocks
    block_features = 64 if max(block_d, block_dv) <= 64 else 32
    ieee = q.dtype == torch.float32
    keep = key_visibility(keep_BHS1, batch, kv_len, device)
    k_blocks = cdiv(kv_len, block)
    root_scale = math.sqrt(scale)
    ratio = features ** -0.5  # the keys' φ carries it here: the window's scale is absolute
    prefix, prefix_z, h_k = _block_prefixes(k, v, omega, keep, root_scale, batch, block, tile,
                                            block_features, block_d, block_dv, ratio)
    out = torch.empty(batch, heads, q_len, v_dim, device=device, dtype=q.dtype)
    out_exact = out_exact if out_exact.stride(-1) == 1 else out_exact.contiguous()
    _window_complement_kernel[(batch * heads, cdiv(q_len, tile))](
        q, omega, prefix, prefix_z, out_exact, lse.contiguous(), h_k,
        out, q.stride(0), q.stride(1), q.stride(2), out_exact.stride(0), out_exact.stride(1),
        out_exact.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, q_len, features, k_blocks, local, root_scale, FEATURE_EPS,
        ratio, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_N=tile, BLOCK_F=block_features, QUERY_BLOCK=block, CAUSAL=causal, IEEE=ieee,
        num_warps=4)
    return out


# ------------------------------------------------------------------------ causal FAVOR+

#: Keys per block of the causal form's states (any size gives the same result; 64 fits the
#: tiles).
CAUSAL_BLOCK = 64


@triton.jit
def _favor_causal_queries_kernel(Q, K, V, OMEGA, KEEP, PREFIX, PREFIX_Z, HK, OUT,
                                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                 stride_kn, stride_vb, stride_vh, stride_vn, stride_keepb,
                                 stride_ob, stride_oh, stride_on,
                                 heads, group, q_len, features, root_scale, eps,
                                 HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                                 HAS_KEEP: tl.constexpr, IEEE: tl.constexpr):
    """One block of BLOCK_N queries, causal: the states of the key blocks before it (their
    prefix sum) plus its own block's keys j <= i, with φ(q) and φ(k) per feature tile —
    Σ_{j<=i} φ(q_i)·φ(k_j) [v_j, 1], normalized. Query and key blocks coincide (equal
    lengths)."""
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    kv_head = head // group
    kv = batch * (heads // group) + kv_head
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_n < q_len
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn +
                offs_d[None, :], mask=rows[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    x = q.to(tl.float32) * root_scale
    q_half_norm = 0.5 * tl.sum(x * x, axis=1)
    kt = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn +
                 offs_d[None, :], mask=rows[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    y = kt.to(tl.float32) * root_scale
    k_half_norm = 0.5 * tl.sum(y * y, axis=1)
    visible = rows
    if HAS_KEEP:
        keep = tl.load(KEEP + batch * stride_keepb + offs_n, mask=rows, other=0.0)
        visible = visible & (keep > 0)
    h_k = tl.load(HK + kv)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kappa = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)    # Σ_f p_if φ'_jf, own block
    kappa_eps = tl.zeros((BLOCK_N,), dtype=tl.float32)        # Σ_f φ'_jf (query ε term)
    eps_num = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    eps_den = 0.0
    h_run = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    prefix_base = PREFIX + (kv * (tl.num_programs(1) + 1) + pid_n) * features * BLOCK_DV
    z_base = PREFIX_Z + (kv * (tl.num_programs(1) + 1) + pid_n) * features
    for f0 in range(0, features, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < features
        omega = tl.load(OMEGA + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=f_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if IEEE:
            e = tl.dot(x, tl.trans(omega), input_precision="ieee")
            ek = tl.dot(y, tl.trans(omega), input_precision="ieee")
        else:
            e = tl.dot(x, tl.trans(omega))
            ek = tl.dot(y, tl.trans(omega))
        e = tl.where(f_ok[None, :], e - q_half_norm[:, None], float("-inf"))
        h_new = tl.maximum(h_run, tl.max(e, axis=1))
        alpha = tl.exp(h_run - h_new)
        p = tl.exp(e - h_new[:, None])                                       # (N, F)
        # the keys' features sans ratio, φ' = e^{e − h_k} + ε, zero for masked keys
        phi_k = tl.where(f_ok[None, :] & visible[:, None],
                         tl.exp(ek - k_half_norm[:, None] - h_k) + eps, 0.0)  # (N, F)
        state = tl.load(prefix_base + offs_f[:, None] * BLOCK_DV + offs_dv[None, :],
                        mask=f_ok[:, None], other=0.0)
        z = tl.load(z_base + offs_f, mask=f_ok, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, state, input_precision="ieee")
            kappa = kappa * alpha[:, None] + tl.dot(p, tl.trans(phi_k), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, state)
            kappa = kappa * alpha[:, None] + tl.dot(p, tl.trans(phi_k))
        den = den * alpha + tl.sum(p * z[None, :], axis=1)
        kappa_eps += tl.sum(phi_k, axis=1)
        eps_num += tl.sum(state, axis=0)
        eps_den += tl.sum(z, axis=0)
        h_run = h_new
    # own block: keys j <= i, with the query ε term
    kappa = kappa + eps * kappa_eps[None, :]
    causal = offs_n[None, :] <= offs_n[:, None]
    kappa = tl.where(causal, kappa, 0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn +
                offs_dv[None, :], mask=visible[:, None] & (offs_dv[None, :] < V_DIM),
                other=0.0).to(tl.float32)
    if IEEE:
        own = tl.dot(kappa, v, input_precision="ieee")
    else:
        own = tl.dot(kappa, v)
    numerator = acc + eps * eps_num[None, :] + own
    denominator = den + eps * eps_den + tl.sum(kappa, axis=1)
    out = numerator / tl.maximum(denominator, 1.0e-30)[:, None]
    tl.store(OUT + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on +
             offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] & (offs_dv[None, :] < V_DIM))


def favor_causal_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, scale: float,
                           keep_BHS1: Optional[Tensor] = None) -> Tensor:
    """Causal FAVOR+ (`ops/performer.py` with is_causal, equal lengths), fused: one state per
    key block from the keys kernel, their exclusive prefix sums, and the queries kernel above
    — O(n) memory, never the (n × m) feature matrices."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    if q_len != kv_len:
        raise ValueError("causal FAVOR+ needs as many keys as queries")
    features = projection.shape[0]
    device = q.device
    q, k, v, omega, block_d, block_dv = _operands(q, k, v, projection)
    block = CAUSAL_BLOCK if max(block_d, block_dv) <= 64 else CAUSAL_BLOCK // 2
    block_features = 64 if max(block_d, block_dv) <= 64 else 32
    keep = key_visibility(keep_BHS1, batch, kv_len, device)
    k_blocks = cdiv(kv_len, block)
    root_scale = math.sqrt(scale)
    # the ratios cancel in the normalization
    prefix, prefix_z, h_k = _block_prefixes(k, v, omega, keep, root_scale, batch, block, block,
                                            block_features, block_d, block_dv, ratio=1.0)
    out = torch.empty(batch, heads, q_len, v_dim, device=device, dtype=q.dtype)
    _favor_causal_queries_kernel[(batch * heads, k_blocks)](
        q, k, v, omega, keep if keep is not None else k, prefix, prefix_z, h_k, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keep.stride(0) if keep is not None else 0, out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, q_len, features, root_scale, FEATURE_EPS, HEAD_DIM=head_dim,
        V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block,
        BLOCK_F=block_features, HAS_KEEP=keep is not None, IEEE=q.dtype == torch.float32,
        num_warps=4)
    return out
