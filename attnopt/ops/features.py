"""Feature maps for kernelized attention: FAVOR+ (positive orthogonal random features), its
ReLU variant, and elu+1 — plus the key-visibility reduction the kernelized ops share.

Softmax attention weights are exp(s·q·k) normalized over keys (s the scale). FAVOR+ writes
exp(x·y) = E_ω[exp(ω·x − |x|²/2) · exp(ω·y − |y|²/2)] for ω ~ N(0, I), with x = √s·q and
y = √s·k, and estimates the expectation with m orthogonal random ω:

    φ(x) = exp(Ωx − |x|²/2 − h) / √m          (Ω: m × D, rows orthogonal in blocks of D)

`h` is the max-subtraction stabilizer: the largest exponent of each query row, and of all
visible keys of a (batch, head) for keys. It cancels in the normalized output of pure
Performer attention; `favor_features` returns it so the hybrid op can put exact and
random-feature terms on one scale (φ(q)·φ(k) ≈ exp(s·q·k − h_q − h_k)).

Masks: kernelized attention can honour only which keys are visible at all (key padding), not
per-query structure (that is `is_causal`'s job). `visible_keys_mask` reduces an SDPA-style mask
to (B|1, H|1, Sk, 1) keep-weights: a key is kept when any query may attend it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

#: Additive mask values at or below this count as "masked out" (finfo.min-style fills).
MASKED_THRESHOLD = -1.0e4
#: Added to every random feature (relative to 1/√m): keeps normalizers positive when every
#: exponent underflows; small against the features of any visible key.
FEATURE_EPS = 1.0e-6
KERNELS = ("softmax", "relu")


def draw_projection(num_features: int, head_dim: int, seed: int) -> Tensor:
    """Ω (m, D), float32: blocks of D orthogonal rows (QR of Gaussian blocks), each row scaled
    to the norm of an independent Gaussian vector so rows are marginally N(0, I)."""
    if num_features < 1 or head_dim < 1:
        raise ValueError(f"need num_features >= 1 and head_dim >= 1, got {num_features}, "
                         f"{head_dim}")
    generator = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        orthogonal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthogonal.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator,
                        dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32; float32/float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def visible_keys_mask(attn_mask: Optional[Tensor], kv_len: int) -> Optional[Tensor]:
    """(B|1, H|1, Sk, 1) float 0/1 weights of the keys some query may attend (None: all)."""
    if attn_mask is None:
        return None
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > MASKED_THRESHOLD
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    keep = allowed.any(dim=-2) if allowed.shape[-2] > 1 else allowed[..., 0, :]
    return keep.expand(*keep.shape[:-1], kv_len).unsqueeze(-1).to(torch.float32)


def favor_features(x_BHSD: Tensor, projection_MD: Tensor, scale: float, *, is_query: bool,
                   keep_BHS1: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(φ(x) (B, H, S, m), h) for softmax-kernel FAVOR+ (module docstring).

    h is (B, H, S, 1) for queries and (B, H, 1, 1) for keys — the max over visible keys only,
    so a masked key with a large exponent cannot push the visible ones to zero. Masked keys
    get φ = 0.
    """
    dtype = compute_dtype(x_BHSD.dtype)
    x = x_BHSD.to(dtype) * math.sqrt(scale)
    omega = projection_MD.to(device=x.device, dtype=dtype)
    # exponent = Ωx − |x|²/2 − h; |x|²/2 is constant along a row, so the row maxima come from
    # Ωx alone and every row-constant term (with log 1/√m) is subtracted in one pass
    projected_BHSM = x @ omega.T
    half_norm = (x * x).sum(-1, keepdim=True) / 2
    row_max = projected_BHSM.amax(dim=-1, keepdim=True) - half_norm
    if is_query:
        h = row_max.detach()
    else:
        if keep_BHS1 is not None:
            row_max = row_max.masked_fill(keep_BHS1 == 0, float("-inf"))
        h = row_max.amax(dim=-2, keepdim=True).detach()
        h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))  # no visible key at all
    ratio = 1.0 / math.sqrt(omega.shape[0])
    row_terms = half_norm + h - math.log(ratio)
    if projected_BHSM.requires_grad:
        phi = torch.exp(projected_BHSM - row_terms) + ratio * FEATURE_EPS
    else:  # no autograd graph: three in-place passes over the (S × m) features, not six
        phi = projected_BHSM.sub_(row_terms).exp_().add_(ratio * FEATURE_EPS)
    if keep_BHS1 is not None and not is_query:
        phi = phi * keep_BHS1.to(dtype)
    return phi, h


def relu_features(x_BHSD: Tensor, projection_MD: Tensor, scale: float,
                  keep_BHS1: Optional[Tensor] = None) -> Tensor:
    """φ(x) = relu(Ωx)/√m + ε (Performer's ReLU kernel; not an estimator of softmax)."""
    dtype = compute_dtype(x_BHSD.dtype)
    x = x_BHSD.to(dtype) * math.sqrt(scale)
    omega = projection_MD.to(device=x.device, dtype=dtype)
    phi = torch.relu(x @ omega.T) / math.sqrt(omega.shape[0]) + FEATURE_EPS
    return phi * keep_BHS1.to(dtype) if keep_BHS1 is not None else phi


def elu_features(x_BHSD: Tensor, keep_BHS1: Optional[Tensor] = None) -> Tensor:
    """φ(x) = elu(x) + 1 (Katharopoulos et al., linear attention)."""
    phi = torch.nn.functional.elu(x_BHSD.to(compute_dtype(x_BHSD.dtype))) + 1.0
    return phi * keep_BHS1.to(phi.dtype) if keep_BHS1 is not None else phi


def repeat_kv_heads(x_BHkv__: Tensor, heads: int) -> Tensor:
    """Expand a per-kv-head tensor to `heads` query heads (repeat_interleave order, as GQA)."""
    kv_heads = x_BHkv__.shape[1]
    if kv_heads == heads:
        return x_BHkv__
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    return x_BHkv__.repeat_interleave(heads // kv_heads, dim=1)


def kernelized_attention(phi_q_BHSM: Tensor, phi_k_BHkvSM: Tensor, v_BHkvSD: Tensor, *,
                         causal: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """(numerator (B, H, Sq, Dv), denominator (B, H, Sq, 1)) of Σ_j φ(q_i)·φ(k_j) [v_j, 1].

    Non-causal: two matmuls over (m × Dv) states. Causal (j <= i, equal lengths): chunked
    prefix sums — per chunk of `chunk` positions, the state summed over earlier chunks plus a
    masked product inside the chunk — so memory is O(n·m + (n/chunk)·m·Dv), never n×n.
    """
    heads = phi_q_BHSM.shape[1]
    v = v_BHkvSD.to(phi_q_BHSM.dtype)
    ones = torch.ones_like(v[..., :1])
    v_ext = torch.cat([v, ones], dim=-1)  # the last column sums the denominator
    if not causal:
        state_BHMD = repeat_kv_heads(phi_k_BHkvSM.transpose(-2, -1) @ v_ext, heads)
        out = phi_q_BHSM @ state_BHMD
        return out[..., :-1], out[..., -1:]
    phi_k = repeat_kv_heads(phi_k_BHkvSM, heads)
    v_ext = repeat_kv_heads(v_ext, heads)
    length = phi_q_BHSM.shape[-2]
    if phi_k.shape[-2] != length:
        raise ValueError("causal kernelized attention needs as many keys as queries")
    pad = -length % chunk
    if pad:
        phi_q_BHSM = torch.nn.functional.pad(phi_q_BHSM, (0, 0, 0, pad))
        phi_k = torch.nn.functional.pad(phi_k, (0, 0, 0, pad))
        v_ext = torch.nn.functional.pad(v_ext, (0, 0, 0, pad))
    q_c = phi_q_BHSM.unflatten(-2, (-1, chunk))   # (B, H, C, chunk, m)
    k_c = phi_k.unflatten(-2, (-1, chunk))
    v_c = v_ext.unflatten(-2, (-1, chunk))        # (B, H, C, chunk, Dv + 1)
    chunk_states = k_c.transpose(-2, -1) @ v_c    # (B, H, C, m, Dv + 1)
    before = chunk_states.cumsum(dim=2) - chunk_states  # exclusive prefix over chunks
    inside = torch.ones(chunk, chunk, dtype=torch.bool, device=q_c.device).tril()
    local = (q_c @ k_c.transpose(-2, -1)).masked_fill(~inside, 0.0) @ v_c
    out = (q_c @ before + local).flatten(2, 3)[..., :length, :]
    return out[..., :-1], out[..., -1:]


def keep_for_kv_heads(keep_BHS1: Optional[Tensor], kv_heads: int) -> Optional[Tensor]:
    """Key keep-weights per kv head: a key is kept when any query head of its group keeps it."""
    if keep_BHS1 is None or keep_BHS1.shape[1] in (1, kv_heads):
        return keep_BHS1
    batch, heads, length, _ = keep_BHS1.shape
    return keep_BHS1.view(batch, kv_heads, heads // kv_heads, length, 1).amax(dim=2)


# ---------------------------------------------------------------------------- ONNX forms
# The same math as onnxscript building blocks (standard opset-18 ops), for the translations.

def onnx_visible_keys(op, attn_mask, kv_heads: int):
    """(B|1, H|1, Sk, 1) float keep-weights from an SDPA-style mask (as visible_keys_mask)."""
    if attn_mask.dtype == 9:  # onnx BOOL
        allowed = attn_mask
    else:
        allowed = op.Greater(attn_mask, op.CastLike(op.Constant(value_float=MASKED_THRESHOLD),
                                                    attn_mask))
    rank = len(attn_mask.shape)
    if rank < 4:
        allowed = op.Unsqueeze(allowed, op.Constant(value_ints=list(range(4 - rank))))
    keep = op.ReduceMax(op.Cast(allowed, to=1), op.Constant(value_ints=[-2]), keepdims=1)
    keep = op.Transpose(keep, perm=[0, 1, 3, 2])  # (B|1, H|1, Sk, 1)
    mask_heads = attn_mask.shape[-3] if rank >= 3 else 1
    if isinstance(mask_heads, int) and mask_heads not in (1, kv_heads):
        keep = op.ReduceMax(op.Reshape(keep, op.Constant(
            value_ints=[0, kv_heads, mask_heads // kv_heads, -1, 1])),
            op.Constant(value_ints=[2]), keepdims=0)
    return keep


def onnx_favor_features(op, x, projection, scale, *, is_query: bool, keep=None):
    """(φ, h) as `favor_features`, x already cast to float32."""
    from attnopt.ops.common import onnx_scalar
    x = op.Mul(x, onnx_scalar(op, math.sqrt(scale), x))
    omega = op.CastLike(projection, x)
    half = onnx_scalar(op, 0.5, x)
    exponent = op.Sub(op.MatMul(x, op.Transpose(omega, perm=[1, 0])),
                      op.Mul(op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[-1]),
                                          keepdims=1), half))
    row_max = op.ReduceMax(exponent, op.Constant(value_ints=[-1]), keepdims=1)
    if is_query:
        h = row_max
    else:
        if keep is not None:
            row_max = op.Where(op.Greater(keep, onnx_scalar(op, 0.0, keep)), row_max,
                               onnx_scalar(op, float("-inf"), row_max))
        h = op.ReduceMax(row_max, op.Constant(value_ints=[-2]), keepdims=1)
        h = op.Where(op.IsInf(h), onnx_scalar(op, 0.0, h), h)
    m = projection.shape[0]
    phi = op.Mul(op.Add(op.Exp(op.Sub(exponent, h)), onnx_scalar(op, FEATURE_EPS, x)),
                 onnx_scalar(op, 1.0 / math.sqrt(m), x))
    if keep is not None and not is_query:
        phi = op.Mul(phi, op.CastLike(keep, phi))
    return phi, h


def onnx_kernelized(op, phi_q, phi_k, v, heads, *, causal: bool, chunk: int = 64):
    """(numerator, denominator) as `kernelized_attention`. Causal: the chunked prefix-sum form
    of `blocked_onnx.causal_kernelized` (per-chunk states, never per-key outer products)."""
    from attnopt.ops.blocked_onnx import causal_kernelized
    from attnopt.ops.common import onnx_repeat_heads
    v = op.CastLike(v, phi_q)
    ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), v),
                     op.Concat(op.Shape(v, start=0, end=3), op.Constant(value_ints=[1]),
                               axis=0))
    v_ext = op.Concat(v, ones, axis=-1)
    if not causal:
        state = onnx_repeat_heads(op, op.MatMul(op.Transpose(phi_k, perm=[0, 1, 3, 2]), v_ext),
                                  heads)
        out = op.MatMul(phi_q, state)
    else:
        out = causal_kernelized(op, phi_q, phi_q, phi_k, v_ext, chunk)
    dv = op.Sub(op.Shape(out, start=-1), op.Constant(value_ints=[1]))
    numerator = op.Slice(out, op.Constant(value_ints=[0]), dv, op.Constant(value_ints=[-1]))
    denominator = op.Slice(out, dv, op.Shape(out, start=-1), op.Constant(value_ints=[-1]))
    return numerator, denominator
