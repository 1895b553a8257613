"""Fused linear attention, φ(x) = elu(x) + 1 (`ops/linear.py` semantics), causal or not.

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)        (j <= i when causal)

Two kernels, each reading its inputs once, φ computed in registers (never stored):

1. `_linear_key_states_kernel` — per (batch·kv head, run of keys): S = Σ_j φ(k_j) v_jᵀ
   (D × Dv) and z = Σ_j φ(k_j) (D), masked keys contributing nothing.
2. `_linear_queries_kernel` — per (batch·head, query block): φ(q) S / φ(q)·z. Non-causal, S
   and z are the sums over all keys (torch adds the runs). Causal, the runs are the query
   blocks themselves: S and z are the exclusive prefix sums over the blocks before (torch's
   cumsum after a zero state), and the kernel adds its own block's keys j <= i as a masked
   (block × block) product — the chunked form of the reference, its chunk states fused away.

GQA: query heads of a group read their kv head's states. States are float32 (D × Dv per run),
so memory is O(n/block · D · Dv) causal and O(splits · D · Dv) otherwise. Scope: head dims up
to 128 (the (D × Dv) state lives in registers), key masks as (B, Sk) visibility; the op runs
its torch reference otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.kernels.favor import TARGET_PROGRAMS, kernelized_skip_reason, key_visibility
from attnopt.kernels.params import cdiv, padded_head_dim

#: Keys per state of the causal form (= queries per program), and per tile of the non-causal
#: keys pass.
BLOCK = 64
MAX_HEAD_DIM = 128


@triton.jit
def _elu_plus_one(x):
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _linear_key_states_kernel(K, V, KEEP, STATES, Z,
                              stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                              stride_keepb, kv_heads, kv_len, tiles_per_run,
                              HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              BLOCK_N: tl.constexpr, HAS_KEEP: tl.constexpr,
                              IEEE: tl.constexpr):
    pid_bh, pid_r = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // kv_heads, pid_bh % kv_heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    first = pid_r * tiles_per_run * BLOCK_N
    for start in range(first, first + tiles_per_run * BLOCK_N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = offs_n < kv_len
        if HAS_KEEP:
            keep = tl.load(KEEP + batch * stride_keepb + offs_n, mask=visible, other=0.0)
            visible = visible & (keep > 0)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=visible[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        phi = tl.where(visible[:, None] & (offs_d[None, :] < HEAD_DIM),
                       _elu_plus_one(k.to(tl.float32)), 0.0)                 # (N, D)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=visible[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(phi), v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(phi), v.to(tl.float32))
        z += tl.sum(phi, axis=0)
    run = pid_bh * tl.num_programs(1) + pid_r
    tl.store(STATES + (run * BLOCK_D + offs_d[:, None]) * BLOCK_DV + offs_dv[None, :], acc)
    tl.store(Z + run * BLOCK_D + offs_d, z)


@triton.jit
def _linear_queries_kernel(Q, K, V, KEEP, STATES, Z, OUT,
                           stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_keepb,
                           stride_ob, stride_oh, stride_on,
                           heads, group, q_len, states_per_kv_head, min_denominator,
                           HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                           HAS_KEEP: tl.constexpr, IEEE: tl.constexpr):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    kv_head = head // group
    kv = batch * (heads // group) + kv_head
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_n < q_len
    dims = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_n[:, None] * stride_qn +
                offs_d[None, :], mask=rows[:, None] & dims, other=0.0)
    phi_q = tl.where(rows[:, None] & dims, _elu_plus_one(q.to(tl.float32)), 0.0)
    index = kv * states_per_kv_head + (pid_n if CAUSAL else 0)
    state = tl.load(STATES + (index * BLOCK_D + offs_d[:, None]) * BLOCK_DV + offs_dv[None, :])
    z = tl.load(Z + index * BLOCK_D + offs_d)
    if IEEE:
        acc = tl.dot(phi_q, state, input_precision="ieee")
    else:
        acc = tl.dot(phi_q, state)
    den = tl.sum(phi_q * z[None, :], axis=1)
    if CAUSAL:  # the own block's keys j <= i (query and key blocks coincide)
        visible = rows
        if HAS_KEEP:
            keep = tl.load(KEEP + batch * stride_keepb + offs_n, mask=rows, other=0.0)
            visible = visible & (keep > 0)
        k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn +
                    offs_d[None, :], mask=visible[:, None] & dims, other=0.0)
        phi_k = tl.where(visible[:, None] & dims, _elu_plus_one(k.to(tl.float32)), 0.0)
        v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn +
                    offs_dv[None, :], mask=visible[:, None] & (offs_dv[None, :] < V_DIM),
                    other=0.0).to(tl.float32)
        if IEEE:
            kappa = tl.dot(phi_q, tl.trans(phi_k), input_precision="ieee")
        else:
            kappa = tl.dot(phi_q, tl.trans(phi_k))
        kappa = tl.where(offs_n[None, :] <= offs_n[:, None], kappa, 0.0)
        if IEEE:
            acc += tl.dot(kappa, v, input_precision="ieee")
        else:
            acc += tl.dot(kappa, v)
        den += tl.sum(kappa, axis=1)
    out = acc / tl.maximum(den, min_denominator)[:, None]
    tl.store(OUT + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on +
             offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] & (offs_dv[None, :] < V_DIM))


def linear_skip_reason(q: Tensor, k: Tensor, v: Tensor, keep_BHS1: Optional[Tensor],
                       is_causal: bool) -> Optional[str]:
    """Why a linear-attention call runs the torch reference rather than these kernels."""
    return kernelized_skip_reason(q, k, v, keep_BHS1, is_causal, MAX_HEAD_DIM)


def linear_attention_fused(q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
                           keep_BHS1: Optional[Tensor] = None,
                           min_denominator: float = 1e-30) -> Tensor:
    """Linear attention (elu + 1) on the kernels above; `keep_BHS1` (B|1, 1, Sk, 1) key
    visibility; denominators clamped below at `min_denominator` as the reference does."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    if is_causal and q_len != kv_len:
        raise ValueError("causal linear attention needs as many keys as queries")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_d, block_dv = padded_head_dim(head_dim), padded_head_dim(v_dim)
    num_warps = 4 if max(block_d, block_dv) <= 64 else 8
    keep = key_visibility(keep_BHS1, batch, kv_len, q.device)
    key_tiles = cdiv(kv_len, BLOCK)
    if is_causal:  # one run per query block
        runs, tiles_per_run = key_tiles, 1
    else:  # enough runs to fill the GPU
        runs = max(1, min(key_tiles, TARGET_PROGRAMS // max(1, batch * kv_heads)))
        tiles_per_run = cdiv(key_tiles, runs)
        runs = cdiv(key_tiles, tiles_per_run)
    programs = batch * kv_heads
    states = torch.empty(programs, runs, block_d, block_dv, device=q.device,
                         dtype=torch.float32)
    z = torch.empty(programs, runs, block_d, device=q.device, dtype=torch.float32)
    ieee = q.dtype == torch.float32
    _linear_key_states_kernel[(programs, runs)](
        k, v, keep if keep is not None else k, states, z,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keep.stride(0) if keep is not None else 0, kv_heads, kv_len, tiles_per_run,
        HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=BLOCK,
        HAS_KEEP=keep is not None, IEEE=ieee, num_warps=num_warps)
    if is_causal:  # exclusive prefix over blocks: block b reads the sum of blocks < b
        prefix = torch.zeros(programs, runs + 1, block_d, block_dv, device=q.device,
                             dtype=torch.float32)
        torch.cumsum(states, dim=1, out=prefix[:, 1:])
        states = prefix
        z = torch.nn.functional.pad(z.cumsum(dim=1), (0, 0, 1, 0))
    else:
        states, z = states.sum(1, keepdim=True), z.sum(1, keepdim=True)
    out = torch.empty(batch, heads, q_len, v_dim, device=q.device, dtype=q.dtype)
    _linear_queries_kernel[(batch * heads, cdiv(q_len, BLOCK))](
        q, k, v, keep if keep is not None else k, states.contiguous(), z.contiguous(), out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), keep.stride(0) if keep is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, q_len, states.shape[1], min_denominator,
        HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=BLOCK,
        CAUSAL=is_causal, HAS_KEEP=keep is not None, IEEE=ieee, num_warps=num_warps)
    return out
