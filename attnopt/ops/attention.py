"""`torch.ops.attnopt.attention`: the canonical exact attention op.

Every attention site found in a graph is canonicalized into one call of this op; every later
rewrite (kernels, approximations) is a pass from it to another attnopt op.

Semantics are those of `F.scaled_dot_product_attention` without dropout:

    out_BHSD = softmax(q_BHSD @ k_BHSD^T * scale + mask) @ v_BHSD

- `q` (B, H, Sq, D); `k` (B, Hkv, Sk, D); `v` (B, Hkv, Sk, Dv). With `enable_gqa`, H is a
  multiple of Hkv and query head h reads kv head h // (H // Hkv) (`repeat_interleave` order).
- `attn_mask` broadcastable to (B, H, Sq, Sk): bool (True = attend) or float (added to scores).
- `is_causal`: query i attends keys j <= i (top-left aligned, as SDPA).
- `scale`: defaults to 1/sqrt(D).
- `softcap`: when given, scores are soft-capped before the mask: `softcap * tanh(s / softcap)`
  (Gemma 2 style).

The op owns its reference implementation (SDPA, runs on every device), its CUDA implementation
(the generated Triton flash kernel from `attnopt.kernels` where `kernel_skip_reason` finds
nothing against it, else SDPA), its fake implementation for tracing, and its autograd (gradients
of q, k, v and of a float mask; through the Triton backward kernels where the forward ran them).

Which backend runs a call on CUDA (`ATTNOPT_KERNELS`):
- "auto" (default): the Triton kernel where PyTorch has no fused kernel for the call — soft-capped
  scores, which SDPA can only run on its math path (the full score matrix in memory) — and SDPA
  everywhere else. Measured on an H100 (docs/BENCHMARKS.md): for plain, causal and masked
  attention SDPA's default backend (cuDNN) is 0–25% faster than the generated kernel in GPU time
  and its launch is ~0.1 ms cheaper, which dominates short sequences and decode steps.
- "always": the Triton kernel wherever it can run (comparisons, and features SDPA lacks).
- "never" (or "0"): SDPA everywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.ops.common import empty_like_query_layout, like_query_layout

#: "auto" | "always" | "never": which calls run the Triton kernel on CUDA (module docstring).
KERNELS_ENV = "ATTNOPT_KERNELS"
KERNEL_MODES = ("auto", "always", "never", "0")
KERNEL_BACKEND, FALLBACK_BACKEND = "triton", "sdpa"


def kernel_mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not one of {', '.join(KERNEL_MODES)}")
    return "never" if mode == "0" else mode


def kernel_skip_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                       softcap: Optional[float] = None, *,
                       sdpa_alternative: bool = True) -> Optional[str]:
    """Why a call runs SDPA (or a reference) rather than the Triton flash kernel (None: the
    kernel runs it). `sdpa_alternative=False` for calls PyTorch has no fused kernel for (sparse
    layouts), which "auto" then sends to the kernel too.

    Reads only metadata, so it answers for fake tensors at optimize time exactly as it does for
    real ones at run time.
    """
    mode = kernel_mode()
    if mode == "never":
        return f"kernels disabled by {KERNELS_ENV}"
    if q.device.type != "cuda":
        return f"{q.device.type} tensors run SDPA; the Triton kernels are for CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{q.dim()}-d operands (the kernel takes (B, H, S, D))"
    if q.shape[0] != k.shape[0]:
        return "k/v batch is broadcast over q's"
    if attn_mask is not None and attn_mask.dim() > 4:
        return f"{attn_mask.dim()}-d mask"
    if attn_mask is not None and attn_mask.requires_grad:
        return "the mask needs a gradient (the kernels do not produce one)"
    from attnopt.kernels.params import unsupported_reason
    reason = unsupported_reason(q, k, v)
    if reason is None and mode == "auto" and softcap is None and sdpa_alternative:
        return ("PyTorch's fused SDPA runs this call and measured faster than the generated "
                f"kernel (docs/BENCHMARKS.md); {KERNELS_ENV}=always forces the kernel")
    return reason


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None,
                        enable_gqa: bool = False, softcap: Optional[float] = None) -> Tensor:
    """Plain-torch semantics of the canonical op (used by every backend without a kernel)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _softcapped_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


def _softcapped_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask, is_causal, scale, enable_gqa,
                          softcap):
    if enable_gqa and k_BHSD.shape[-3] != q_BHSD.shape[-3]:
        group = q_BHSD.shape[-3] // k_BHSD.shape[-3]
        k_BHSD = k_BHSD.repeat_interleave(group, dim=-3)
        v_BHSD = v_BHSD.repeat_interleave(group, dim=-3)
    scale = scale if scale is not None else q_BHSD.shape[-1] ** -0.5
    compute_dtype = torch.promote_types(q_BHSD.dtype, torch.float32)  # half types upcast
    scores_BHSS = (q_BHSD @ k_BHSD.transpose(-2, -1)).to(compute_dtype) * scale
    scores_BHSS = softcap * torch.tanh(scores_BHSS / softcap)
    if is_causal:
        q_len, kv_len = scores_BHSS.shape[-2:]
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=q_BHSD.device).tril()
        scores_BHSS = scores_BHSS.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores_BHSS = scores_BHSS.masked_fill(~attn_mask, float("-inf"))
        else:
            scores_BHSS = scores_BHSS + attn_mask.to(compute_dtype)
    probs_BHSS = torch.softmax(scores_BHSS, dim=-1).to(v_BHSD.dtype)
    return probs_BHSS @ v_BHSD


@torch.library.custom_op("attnopt::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, softcap: Optional[float] = None) -> Tensor:
    return like_query_layout(
        attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap), q)


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    softcap=None):
    if kernel_skip_reason(q, k, v, attn_mask, softcap) is not None:
        return like_query_layout(
            attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap), q)
    from attnopt.kernels import flash_attention
    return like_query_layout(flash_attention(q, k, v, causal=is_causal, scale=scale,
                                             attn_bias=attn_mask, softcap=softcap), q)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    softcap=None):
    # SDPA's convention, which graphs captured around it rely on: output laid out like q
    return empty_like_query_layout(q, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.has_mask = attn_mask is not None
    ctx.is_causal, ctx.scale, ctx.enable_gqa, ctx.softcap = is_causal, scale, enable_gqa, softcap


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    mask_needs_grad = (ctx.has_mask and attn_mask.is_floating_point()
                       and ctx.needs_input_grad[3])
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        mask_ = attn_mask
        if mask_needs_grad:
            mask_ = attn_mask.detach().requires_grad_(True)
        if not mask_needs_grad and kernel_skip_reason(q, k, v, attn_mask, ctx.softcap) is None:
            from attnopt.kernels import flash_attention
            out = flash_attention(q_, k_, v_, causal=ctx.is_causal, scale=ctx.scale,
                                  attn_bias=attn_mask, softcap=ctx.softcap)
        else:
            out = attention_reference(q_, k_, v_, mask_, ctx.is_causal, ctx.scale,
                                      ctx.enable_gqa, ctx.softcap)
        wrt = [q_, k_, v_] + ([mask_] if mask_needs_grad else [])
        grads = torch.autograd.grad(out, wrt, grad_out)
    grad_mask = grads[3] if mask_needs_grad else None
    return grads[0], grads[1], grads[2], grad_mask, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- ONNX translations
# onnxscript functions, traced by torch.onnx's exporter for every call of the op. Shape letters
# as above; scores_BHSS is (B, H, Sq, Sk).

def onnx_attention_decomposed(q, k, v, attn_mask=None, is_causal=False, scale=None,
                              enable_gqa=False, softcap=None):
    """Standard ops only (opset 18+): MatMul, Softmax, Where; runs in every ONNX runtime."""
    from onnxscript import opset18 as op

    from attnopt.ops.common import onnx_dim, onnx_repeat_heads, onnx_scalar
    scalar, dim = functools.partial(onnx_scalar, op), functools.partial(onnx_dim, op)

    if scale is None:
        scale = op.Div(scalar(1.0, q), op.Sqrt(op.CastLike(dim(q, 3), q)))
    else:
        scale = scalar(scale, q)
    # GQA: query head h reads kv head h // group (repeat_interleave order), k/v expanded
    heads = dim(q, 1)
    k, v = onnx_repeat_heads(op, k, heads), onnx_repeat_heads(op, v, heads)
    scores_BHSS = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale)
    if softcap is not None:
        cap = scalar(softcap, scores_BHSS)
        scores_BHSS = op.Mul(op.Tanh(op.Div(scores_BHSS, cap)), cap)
    neg_inf = scalar(float("-inf"), scores_BHSS)
    if is_causal:
        rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(dim(q, 2)),
                                     op.Constant(value_int=1)), op.Constant(value_ints=[1]))
        cols = op.Range(op.Constant(value_int=0), op.Squeeze(dim(k, 2)),
                        op.Constant(value_int=1))
        scores_BHSS = op.Where(op.LessOrEqual(cols, rows), scores_BHSS, neg_inf)
    if attn_mask is not None:
        if attn_mask.dtype == 9:  # onnx BOOL: True = attend
            scores_BHSS = op.Where(attn_mask, scores_BHSS, neg_inf)
        else:
            scores_BHSS = op.Add(scores_BHSS, op.CastLike(attn_mask, scores_BHSS))
    return op.MatMul(op.Softmax(scores_BHSS, axis=-1), v)


def onnx_attention_standard(q, k, v, attn_mask=None, is_causal=False, scale=None,
                            enable_gqa=False, softcap=None):
    """The standard `Attention` op (opset 23), one node. ONNX applies its soft-cap after the
    mask (a masked score would come back finite), so soft-capped sites are decomposed."""
    if softcap is not None:
        return onnx_attention_decomposed(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                         softcap)
    from onnxscript import opset23 as op
    attributes = {"is_causal": int(bool(is_causal))}
    if scale is not None:
        attributes["scale"] = float(scale)
    inputs = (q, k, v)
    if attn_mask is not None:  # onnxruntime wants the query axis spelled out, not broadcast
        full_BHSS = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3),
                              op.Shape(k, start=2, end=3), axis=0)
        inputs = (q, k, v, op.Expand(attn_mask, full_BHSS))
    outputs = op.Attention(*inputs, **attributes)  # (Y, present_key, present_value, qk)
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def onnx_attention_ort(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                       softcap=None):
    """onnxruntime's fused `com.microsoft.MultiHeadAttention` (q as (B, S, H·D), k and v as
    BHSD). Calls it cannot express — GQA, soft-cap, a dynamic head count, causal with a mask,
    causal over unequal lengths — take the decomposed translation."""
    heads, kv_heads = q.shape[1], k.shape[1]
    static = all(isinstance(d, int) for d in (heads, kv_heads, q.shape[3]))
    equal_lengths = isinstance(q.shape[2], int) and q.shape[2] == k.shape[2]
    if softcap is not None or not static or heads != kv_heads or \
            (is_causal and (attn_mask is not None or not equal_lengths)):
        return onnx_attention_decomposed(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                         softcap)
    import onnxscript
    from onnxscript import opset18 as op
    contrib = onnxscript.values.Opset("com.microsoft", 1)
    multi_head_attention = onnxscript.values.Op(contrib, "MultiHeadAttention",
                                                _multi_head_attention_schema())
    head_dim = q.shape[3]
    query_BSE = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]),
                           op.Constant(value_ints=[0, 0, heads * head_dim]))
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == 9:  # onnx BOOL: True = attend → 0 / -inf
            attn_mask = op.Where(attn_mask, op.CastLike(op.Constant(value_float=0.0), q),
                                 op.CastLike(op.Constant(value_float=float("-inf")), q))
        full = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3),
                         op.Shape(k, start=2, end=3), axis=0)
        bias = op.CastLike(op.Expand(attn_mask, full), q)
    attributes = {"num_heads": heads, "unidirectional": int(bool(is_causal))}
    if scale is not None:
        attributes["scale"] = float(scale)
    out_BSE = multi_head_attention(query_BSE, k, v, None, None, bias, **attributes)
    if isinstance(out_BSE, (tuple, list)):
        out_BSE = out_BSE[0]
    out_BSHD = op.Reshape(out_BSE, op.Constant(value_ints=[0, 0, heads, head_dim]))
    return op.Transpose(out_BSHD, perm=[0, 2, 1, 3])


def _multi_head_attention_schema():
    """The part of onnxruntime's `com.microsoft.MultiHeadAttention` signature attnopt uses,
    registered with onnx once (onnx ships no schemas for onnxruntime's contrib ops, and the
    exporter's tracer needs one to tell inputs from attributes)."""
    import onnx
    from onnx.defs import OpSchema
    name, domain = "MultiHeadAttention", "com.microsoft"
    if onnx.defs.has(name, domain):
        return onnx.defs.get_schema(name, 1, domain)
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter("query", "T")] + [
        OpSchema.FormalParameter(input_name, type_name, param_option=optional)
        for input_name, type_name in (("key", "T"), ("value", "T"), ("bias", "T"),
                                      ("key_padding_mask", "M"), ("attention_bias", "T"))]
    schema = OpSchema(
        name, domain, 1, doc="onnxruntime contrib multi-head attention (subset used by attnopt)",
        inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
                    OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "",
                                       required=False),
                    OpSchema.Attribute("mask_filter_value", OpSchema.AttrType.FLOAT, "",
                                       required=False)])
    onnx.defs.register_schema(schema)
    return schema
