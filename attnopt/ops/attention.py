"""`torch.ops.attnopt.attention`: the canonical exact attention op.

Every attention site found in a graph is canonicalized into one call of this op; every later
rewrite (kernels, approximations) is a pass from it to another attnopt op.

Semantics are those of `F.scaled_dot_product_attention` without dropout:

    out_BHSD = softmax(q_BHSD @ k_BHSD^T * scale + mask) @ v_BHSD

- `q` (B, H, Sq, D); `k` (B, Hkv, Sk, D); `v` (B, Hkv, Sk, Dv). With `enable_gqa`, H is a
  multiple of Hkv and query head h reads kv head h // (H // Hkv) (`repeat_interleave` order).
- `attn_mask` broadcastable to (B, H, Sq, Sk): bool (True = attend) or float (added to scores).
- `is_causal`: query i attends keys j <= i (top-left aligned, as SDPA). Unlike SDPA, the op takes
  a mask and `is_causal` together: both apply. Canonicalization emits the pair for masks that
  are causal by construction and carry padding (Hugging Face decoders' attention_mask), so that
  the kernel skips the key blocks above the diagonal instead of reading the mask there.
- `scale`: defaults to 1/sqrt(D).
- `softcap`: when given, scores are soft-capped before the mask: `softcap * tanh(s / softcap)`
  (Gemma 2 style).
- `window_left`: when given, query i attends only keys j >= i - window_left (aligned as
  `is_causal`, top-left): a sliding window of `window_left + 1` keys with `is_causal`.
  Canonicalization emits it for masks that are sliding windows by construction (Mistral,
  Gemma 2/3), dropping a constant window mask altogether, so the kernel reads only the band
  instead of every key block up to the diagonal.
- `alibi_slopes`: when given, a float (H,) or (B, H) tensor, and `-alibi_slopes[h] * |i - j|`
  is added to the scores of head h (ALiBi, aligned as `is_causal`). With `is_causal` it equals
  BLOOM's, MPT's and Falcon's key-position bias `slope * j` up to a constant per row, which
  softmax ignores; canonicalization emits it for such a bias fitted on a constant causal mask
  (`passes/masks.fit_alibi`), dropping the mask, so the kernel computes the bias from the
  slopes instead of reading an (H, Sq, Sk) tensor.

The op owns its reference implementation (SDPA, runs on every device), its CUDA implementation
(the generated Triton flash kernel from `attnopt.kernels` where `kernel_skip_reason` finds
nothing against it, else SDPA), its fake implementation for tracing, and its autograd (gradients
of q, k, v and of a float mask; through the Triton backward kernels where the forward ran them).
A forward that autograd will differentiate leaves its backward what it needs
(`common.keep_for_backward`): a kernel forward its output and log-sum-exp for the backward
kernels; an SDPA forward is recorded under autograd (`common.record_forward`), so that the
backward runs SDPA's own backward on what its backend saved (the log-sum-exp of the fused
kernels). Only where nothing was kept (a traced graph whose forward did not run here, a second
backward through a retained graph, a mask that needs a gradient on the kernel path) does the
backward run the forward again and differentiate that.

Both implementations first drop a mask that hides no key, or only the keys after each query
(`redundant_mask`: an unpadded batch's, which a model builds from a tokenizer's all-ones
attention_mask), so that the call runs as plain or causal attention.

Which backend runs a call on CUDA (`ATTNOPT_KERNELS`):
- "auto" (default): the Triton kernel where PyTorch has no fused kernel for the call — soft-capped
  scores, which SDPA can only run on its math path (the full score matrix in memory), and a mask
  together with `is_causal` from `MIN_CAUSAL_MASK_KERNEL_QUERIES` queries on, where SDPA would
  read the whole mask and the kernel skips the blocks above the diagonal (1.5–2× at 2K–8K);
  and every call whose `window_left` band is shorter than the call, which SDPA can only run
  as a dense mask (the kernel reads the band alone: 2.6–22× SDPA with the mask at 1K–16K);
  and every call with `alibi_slopes`, which SDPA can only run with the bias materialized —
  and SDPA everywhere else (a band as long as the call is plain causal attention).
  Measured on an H100 (docs/BENCHMARKS.md): for plain and causal attention the kernels'
  forward now matches or beats SDPA's default backend (cuDNN) in GPU time at most shapes
  (0.91–1.16×), and forward + backward comes within 0.89–1.05×. But a forward call costs
  ~0.1 ms more host time, and a training step 0.4–0.9 ms more. That dominates short
  sequences, decode steps, and the batch-1 models measured end to end, so "auto" keeps these
  calls on SDPA until a model-level measurement says otherwise.
- "always": the Triton kernel wherever it can run (comparisons, and features SDPA lacks).
- "never" (or "0"): SDPA everywhere.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.ops.common import (
    RecordedForward, empty_like_query_layout, keep_for_backward, like_query_layout,
    needs_gradient, record_forward, take_kept,
)

#: "auto" | "always" | "never": which calls run the Triton kernel on CUDA (module docstring).
KERNELS_ENV = "ATTNOPT_KERNELS"
KERNEL_MODES = ("auto", "always", "never", "0")
KERNEL_BACKEND, FALLBACK_BACKEND = "triton", "sdpa"
#: "auto" runs a mask + is_causal call on the kernel from this many queries on: measured end
#: to end on an H100 (docs/BENCHMARKS.md, padded prefill), parity at 2K and 1.09x at 4K; below,
#: the kernel's launch costs more than the blocks it skips save
MIN_CAUSAL_MASK_KERNEL_QUERIES = 2048


def kernel_mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not one of {', '.join(KERNEL_MODES)}")
    return "never" if mode == "0" else mode


def kernel_skip_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                       softcap: Optional[float] = None, *, is_causal: bool = False,
                       window_left: Optional[int] = None, alibi: bool = False,
                       sdpa_alternative: bool = True) -> Optional[str]:
    """Why a call runs SDPA (or a reference) rather than the Triton flash kernel (None: the
    kernel runs it). `sdpa_alternative=False` for calls PyTorch has no fused kernel for (sparse
    layouts), which "auto" then sends to the kernel too. A sliding window is one (SDPA would
    read a dense mask where the kernel reads the band), and so is ALiBi (`alibi`: the call has
    slopes; SDPA would read the bias materialized); a mask with `is_causal` is one from
    MIN_CAUSAL_MASK_KERNEL_QUERIES queries on: SDPA would need the two merged into a dense
    mask, and reads all of it, where the kernel skips the blocks above the diagonal. So is a
    float bias wider than q (`wider_bias`: MPT's float32 ALiBi with a padded batch), which
    SDPA takes only rounded to q's type and the reference then computes unfused.

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
    if effective_window(q.shape[-2], window_left) is None and reason is None \
            and mode == "auto" and softcap is None and not alibi and sdpa_alternative \
            and not wider_bias(q, attn_mask):
        queries = q.shape[-2]
        if not (is_causal and attn_mask is not None):
            return ("PyTorch's fused SDPA runs this call and measured faster than the generated "
                    f"kernel (docs/BENCHMARKS.md); {KERNELS_ENV}=always forces the kernel")
        if isinstance(queries, int) and queries < MIN_CAUSAL_MASK_KERNEL_QUERIES:
            return (f"a causal mask over {queries} queries: below "
                    f"{MIN_CAUSAL_MASK_KERNEL_QUERIES} the kernel's launch costs more than the "
                    f"blocks it skips (docs/BENCHMARKS.md); {KERNELS_ENV}=always forces it")
    return reason


def wider_bias(q: Tensor, attn_mask: Optional[Tensor]) -> bool:
    """Whether `attn_mask` is a float bias of another type than q's (a model's float32 bias on
    half-precision scores, which canonicalization keeps): SDPA has no fused kernel for it, and
    the kernels add it in float32 as they load it."""
    return attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None,
                        enable_gqa: bool = False, softcap: Optional[float] = None,
                        window_left: Optional[int] = None,
                        alibi_slopes: Optional[Tensor] = None) -> Tensor:
    """Plain-torch semantics of the canonical op (used by every backend without a kernel)."""
    window_left = effective_window(q.shape[-2], window_left)
    if window_left is not None or (is_causal and (attn_mask is not None
                                                  or alibi_slopes is not None)):
        # SDPA takes a mask or is_causal, and knows no window: fold them into one mask
        keep = band_keep(q.shape[-2], k.shape[-2], is_causal, window_left, q.device)
        attn_mask, is_causal = with_keep_mask(attn_mask, keep), False
    if wider_bias(q, attn_mask) and alibi_slopes is None:
        # a float32 bias on half-precision q (canonicalization keeps a model's wider bias):
        # SDPA wants them alike, and rounding the bias would move large scores by units
        return _manual_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)
    if alibi_slopes is not None:
        bias_BHSS = alibi_bias(alibi_slopes, q.shape[-3], q.shape[-2], k.shape[-2])
        attn_mask = with_bias(attn_mask, bias_BHSS)
        if q.dtype != torch.float32 and q.dtype != torch.float64:
            # SDPA would round the bias to q's half type (a slope times 2K keys in bfloat16 is
            # off by 8): add it in float32, as the kernel does
            return _manual_attention(q, k, v, attn_mask, False, scale, enable_gqa, softcap)
        attn_mask = attn_mask.to(q.dtype)
    if softcap is None:
        if attn_mask is not None and attn_mask.is_cuda and attn_mask.is_floating_point():
            attn_mask = finite_floor(attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _manual_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


#: finite mask values below this are raised to it before SDPA on CUDA (the kernels' floor,
#: `kernels/tiles.py`): times log2 e it stays finite in float32
MIN_FINITE_BIAS = -2.0e38


def finite_floor(attn_mask: Tensor) -> Tensor:
    """`attn_mask` with its finite values below MIN_FINITE_BIAS raised to it (-inf kept).

    SDPA's fused CUDA kernels scale the masked scores by log2 e, which overflows a float32 (or
    bfloat16) mask's lowest value to -inf. A query row that such a mask hides entirely (a
    left-padded position in a causal batch) then gives zeros there, where eager softmax,
    SDPA's math path and the kernels average it uniformly. Float16 masks cannot hold such
    values and pass as they are. The floored mask is kept per mask and version, so the
    layers sharing a mask floor it once."""
    if torch.finfo(attn_mask.dtype).min >= MIN_FINITE_BIAS:
        return attn_mask
    capturing = attn_mask.is_cuda and torch.cuda.is_current_stream_capturing()
    answers = None if capturing else _mask_answers(attn_mask)
    floored = answers.get("finite_floor") if answers is not None else None
    if floored is None:
        floored = torch.where(attn_mask.isneginf(), attn_mask,
                              attn_mask.clamp_min(MIN_FINITE_BIAS))
        if answers is not None:
            answers["finite_floor"] = floored
    return floored


def effective_window(q_len, window_left: Optional[int]) -> Optional[int]:
    """`window_left`, or None where the band lets every query see every key up to it (at most
    `window_left + 1` queries: a dynamic-length capture's band at a short call), so that such
    calls run as plain causal attention (SDPA's is_causal, no dense band mask)."""
    if window_left is not None and isinstance(q_len, int) and window_left >= q_len - 1:
        return None
    return window_left


def band_keep(q_len: int, kv_len: int, is_causal: bool, window_left: Optional[int],
              device) -> Tensor:
    """(Sq, Sk) bool, True where the op's causal edge and window let query i see key j: j <= i
    when causal, j >= i - window_left when windowed (top-left aligned, as SDPA's causal)."""
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if is_causal:
        keep.tril_()  # j - i <= 0
    if window_left is not None:
        keep.triu_(-window_left)  # j - i >= -window_left
    return keep


def with_keep_mask(attn_mask: Optional[Tensor], keep: Tensor) -> Tensor:
    """`attn_mask` (bool, float or None) restricted to the positions `keep` allows."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def alibi_bias(slopes: Tensor, heads: int, q_len: int, kv_len: int) -> Tensor:
    """(B|1, H, Sq, Sk) float32 `-slopes[h] * |i - j|` (the op's ALiBi, top-left aligned)."""
    rows = torch.arange(q_len, device=slopes.device).unsqueeze(-1)
    cols = torch.arange(kv_len, device=slopes.device)
    distance_SS = (rows - cols).abs().to(torch.float32)
    return -slopes.to(torch.float32).reshape(-1, heads, 1, 1) * distance_SS


def with_bias(attn_mask: Optional[Tensor], bias: Tensor) -> Tensor:
    """`attn_mask` (bool, float or None) with the float `bias` added where it attends."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(bias.dtype) + bias


def _manual_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask, is_causal, scale, enable_gqa,
                      softcap):
    """Attention with the scores in float32 (half types upcast), soft-capped when asked."""
    if enable_gqa and k_BHSD.shape[-3] != q_BHSD.shape[-3]:
        group = q_BHSD.shape[-3] // k_BHSD.shape[-3]
        k_BHSD = k_BHSD.repeat_interleave(group, dim=-3)
        v_BHSD = v_BHSD.repeat_interleave(group, dim=-3)
    scale = scale if scale is not None else q_BHSD.shape[-1] ** -0.5
    compute_dtype = torch.promote_types(q_BHSD.dtype, torch.float32)  # half types upcast
    scores_BHSS = (q_BHSD @ k_BHSD.transpose(-2, -1)).to(compute_dtype) * scale
    if softcap is not None:
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


#: The op's schema: SDPA's arguments, then attnopt's (module docstring).
SCHEMA = ("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, "
          "bool is_causal=False, float? scale=None, bool enable_gqa=False, float? softcap=None, "
          "SymInt? window_left=None, Tensor? alibi_slopes=None) -> Tensor")
#: defaults of the arguments after v, in order (the dispatcher may leave trailing ones out)
_DEFAULTS = (None, False, None, False, None, None, None)

# A `torch.library` op rather than a `custom_op`: the same registrations (implementations per
# device, fake, autograd), without the Python layers `custom_op` wraps each call in, about half
# of an eager call's cost (docs/DESIGN-NOTES.md, "The canonical op's dispatch")
_LIBRARY = torch.library.Library("attnopt", "FRAGMENT")
_LIBRARY.define(SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_OP = torch.ops.attnopt.attention.default


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, softcap: Optional[float] = None,
              window_left: Optional[int] = None,
              alibi_slopes: Optional[Tensor] = None) -> Tensor:
    """The canonical op (`torch.ops.attnopt.attention`) called from Python."""
    return _OP(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap, window_left,
               alibi_slopes)


def _attention_default(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False, scale: Optional[float] = None,
                       enable_gqa: bool = False, softcap: Optional[float] = None,
                       window_left: Optional[int] = None,
                       alibi_slopes: Optional[Tensor] = None) -> Tensor:
    """The implementation on every device but CUDA: the reference."""
    causal = redundant_mask(q, k, attn_mask, is_causal, window_left)
    if causal is not None:  # an unpadded batch's mask: plain (or causal) attention
        attn_mask, is_causal = None, causal
    return _reference_call(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap,
                           window_left, alibi_slopes)


def _reference_call(*args) -> Tensor:
    """`attention_reference(*args)` as the op's implementation returns it, recorded for the
    backward when the op's autograd will differentiate it (q, k, v or a float mask need a
    gradient)."""
    q, wrt = args[0], needs_gradient(*args[:4])
    if not wrt:  # (inference: nothing to record)
        return like_query_layout(attention_reference(*args), q)
    out, recorded = record_forward(attention_reference, args, wrt)
    result = like_query_layout(out, q)
    if recorded is not None:
        keep_for_backward(result, recorded)
    return result


def kernel_window(k: Tensor, window_left: Optional[int]) -> Optional[tuple[int, int]]:
    """The flash kernels' (left, right) window for the op's `window_left` (no right bound)."""
    return None if window_left is None else (window_left, k.shape[-2])


class _KernelForward(NamedTuple):
    """What a kernel forward leaves its backward: the kernel's output (None where it is the op's
    result, which the entry must not keep alive), its log-sum-exp and its params."""
    out: Optional[Tensor]
    lse: Tensor
    params: object


#: id of a mask -> (its version, {(is_causal, Sq, Sk): the answer of `redundant_mask`,
#: "finite_floor": `finite_floor`'s mask}): the layers of a model share one mask, so it is read
#: once per forward (a finalizer drops the entry with the mask, before its id can be reused)
_MASK_ANSWERS: dict = {}


def _mask_answers(attn_mask: Tensor) -> Optional[dict]:
    """The answers kept for this mask at its current version (an empty dict to fill where
    none are), or None for an inference tensor, which has no version to key them by."""
    if attn_mask.is_inference():
        return None
    entry = _MASK_ANSWERS.get(id(attn_mask))
    if entry is None:  # (one finalizer per mask, however often it is written in place)
        weakref.finalize(attn_mask, _MASK_ANSWERS.pop, id(attn_mask), None)
    if entry is None or entry[0] != attn_mask._version:
        entry = _MASK_ANSWERS[id(attn_mask)] = (attn_mask._version, {})
    return entry[1]


def redundant_mask(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                   window_left: Optional[int] = None) -> Optional[bool]:
    """The `is_causal` that gives the call's result without `attn_mask`, or None where the
    mask is needed: a mask that hides no key (False: the call's own `is_causal`), or one that
    hides exactly the keys after each query at equal lengths (True).

    Models build such masks from the attention_mask of an unpadded batch (a tokenizer's
    all-ones mask): an encoder's (B, 1, 1, S) zeros, a decoder's (B, 1, S, S) causal mask.
    Hugging Face's SDPA path checks its 2-D mask for that and passes no mask (or `is_causal`
    alone), but a captured graph only has the mask, which SDPA reads whole (cuDNN with a bias
    instead of its plain or causal kernel) and which keeps calls off the kernels' causal
    paths. A float mask counts as showing a key with 0 and hiding it with -inf or its dtype's
    lowest value (what models fill with: the key's weight is exactly 0 either way, every row
    seeing its own key).

    Reads the mask (one synchronization); the answer is kept per mask tensor and version, so
    layers sharing a mask read it once. Never under CUDA graph capture, where reading it
    cannot synchronize, nor for masks that need a gradient or calls with a window."""
    if attn_mask is None or window_left is not None or attn_mask.requires_grad \
            or attn_mask.dim() > 4:
        return None
    q_len, kv_len = q.shape[-2], k.shape[-2]
    key = (is_causal, q_len, kv_len)
    answers = _mask_answers(attn_mask)
    if answers is not None and key in answers:
        return answers[key]
    if attn_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    answer = mask_redundancy(attn_mask, is_causal, q_len, kv_len)
    if answers is not None:
        answers[key] = answer
    return answer


def mask_redundancy(attn_mask: Tensor, is_causal: bool, q_len: Optional[int] = None,
                    kv_len: Optional[int] = None) -> Optional[bool]:
    """`redundant_mask`'s answer for `attn_mask` in a call of `q_len` queries over `kv_len`
    keys (by default the mask's own last two sizes), read from the mask: one synchronization,
    nothing kept."""
    q_len = attn_mask.shape[-2] if q_len is None else q_len
    kv_len = attn_mask.shape[-1] if kv_len is None else kv_len
    boolean = attn_mask.dtype == torch.bool
    shown = attn_mask if boolean else attn_mask == 0
    checks = [shown.all()]
    if q_len == kv_len and q_len > 1 and attn_mask.shape[-2] > 1 and attn_mask.stride(-2):
        # (a mask the same for every query, such as an encoder's padding mask broadcast over
        # them, hides the later keys exactly only if it hides none: the first check says so)
        later = True if is_causal else (  # (with is_causal the keys after do not matter)
            ~attn_mask if boolean else attn_mask <= torch.finfo(attn_mask.dtype).min)
        earlier_SS = band_keep(q_len, kv_len, True, None, attn_mask.device)
        checks.append(torch.where(earlier_SS, shown, later).all())
    hides_none, *hides_later = torch.stack(checks).tolist()  # (one synchronization)
    return is_causal if hides_none else (True if any(hides_later) else None)


def _attention_cuda(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    softcap=None, window_left=None, alibi_slopes=None):
    causal = redundant_mask(q, k, attn_mask, is_causal, window_left)
    if causal is not None:  # an unpadded batch's mask: plain (or causal) attention
        attn_mask, is_causal = None, causal
    if kernel_skip_reason(q, k, v, attn_mask, softcap, is_causal=is_causal,
                          window_left=window_left, alibi=alibi_slopes is not None) is not None:
        return _reference_call(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap,
                               window_left, alibi_slopes)
    options = dict(causal=is_causal, scale=scale, attn_bias=attn_mask, softcap=softcap,
                   window=kernel_window(k, window_left), alibi_slopes=alibi_slopes)
    if needs_gradient(q, k, v) and not (attn_mask is not None and attn_mask.requires_grad):
        # under the op's autograd: keep what the backward kernels need
        from attnopt.kernels.flash import flash_attention_for_backward
        out, lse, params = flash_attention_for_backward(q, k, v, **options)
        result = like_query_layout(out, q)
        keep_for_backward(result, _KernelForward(None if out is result else out, lse, params))
        return result
    from attnopt.kernels import flash_attention
    return like_query_layout(flash_attention(q, k, v, **options), q)


def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    softcap=None, window_left=None, alibi_slopes=None):
    # SDPA's convention, which graphs captured around it rely on: output laid out like q
    return empty_like_query_layout(q, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap, window_left, alibi_slopes = inputs
    kept = take_kept(output)
    # the forward recorded under autograd: differentiated once (a second backward through a
    # retained graph runs the forward again)
    ctx.recorded = kept if isinstance(kept, RecordedForward) else None
    kernel_out = lse = ctx.kernel_params = None
    if isinstance(kept, _KernelForward):
        kernel_out = output if kept.out is None else kept.out
        lse, ctx.kernel_params = kept.lse, kept.params
    ctx.save_for_backward(q, k, v, attn_mask, alibi_slopes, kernel_out, lse)
    ctx.has_mask = attn_mask is not None
    ctx.is_causal, ctx.scale, ctx.enable_gqa, ctx.softcap = is_causal, scale, enable_gqa, softcap
    ctx.window_left = window_left


def _backward(ctx, grad_out):
    if ctx.recorded is not None:
        recorded, ctx.recorded = ctx.recorded, None
        grads = recorded.gradients(grad_out)
        return tuple(grads.get(index) for index in range(4)) + (None,) * 6
    q, k, v, attn_mask, alibi_slopes, kernel_out, lse = ctx.saved_tensors
    if ctx.kernel_params is not None:  # (never with a mask that needs a gradient)
        # the forward ran the kernel and kept its log-sum-exp: the backward kernels alone
        from attnopt.kernels.flash_backward import flash_backward
        dq, dk, dv = flash_backward(grad_out, q, k, v, kernel_out, lse, ctx.kernel_params)
        return dq, dk, dv, None, None, None, None, None, None, None
    mask_needs_grad = (ctx.has_mask and attn_mask.is_floating_point()
                       and ctx.needs_input_grad[3])
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        mask_ = attn_mask
        if mask_needs_grad:
            mask_ = attn_mask.detach().requires_grad_(True)
        if not mask_needs_grad and kernel_skip_reason(
                q, k, v, attn_mask, ctx.softcap, is_causal=ctx.is_causal,
                window_left=ctx.window_left, alibi=alibi_slopes is not None) is None:
            from attnopt.kernels import flash_attention
            out = flash_attention(q_, k_, v_, causal=ctx.is_causal, scale=ctx.scale,
                                  attn_bias=attn_mask, softcap=ctx.softcap,
                                  window=kernel_window(k, ctx.window_left),
                                  alibi_slopes=alibi_slopes)
        else:
            out = attention_reference(q_, k_, v_, mask_, ctx.is_causal, ctx.scale,
                                      ctx.enable_gqa, ctx.softcap, ctx.window_left,
                                      alibi_slopes)
        wrt = [q_, k_, v_] + ([mask_] if mask_needs_grad else [])
        grads = torch.autograd.grad(out, wrt, grad_out)
    grad_mask = grads[3] if mask_needs_grad else None
    return grads[0], grads[1], grads[2], grad_mask, None, None, None, None, None, None


class _Differentiable(torch.autograd.Function):
    """The op under autograd: its forward runs the implementation below autograd (which keeps
    what the backward needs, see `_setup_context`), its backward `_backward`. The dispatch
    keyset comes last, so that `needs_input_grad` indexes the op's arguments."""

    @staticmethod
    def forward(ctx, *args):
        *args, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            output = _OP.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out) + (None,)


#: the implementations a call on plain tensors reaches below autograd, by backend key
_BACKENDS = {torch._C.DispatchKey.CPU: _attention_default,
             torch._C.DispatchKey.CUDA: _attention_cuda}
#: the same by device type, for `eager_attention`
_EAGER_BACKENDS = {"cpu": _attention_default, "cuda": _attention_cuda}


def _attention_autograd(keyset, *args):
    """The op's Autograd kernel. With a gradient to compute, `_Differentiable`; without one,
    the implementation itself where nothing stands between autograd and the backend (plain
    tensors: no fake or functional tensors, dispatch modes or transforms, which the
    redispatch serves)."""
    args = args + _DEFAULTS[len(args) - 3:]
    if _gradient_to_record(args):
        return _Differentiable.apply(*args, keyset)
    below = keyset & torch._C._after_autograd_keyset
    backend = _BACKENDS.get(below.highestPriorityTypeId())
    if backend is not None:
        return backend(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(below, *args)


def eager_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    softcap=None, window_left=None, alibi_slopes=None):
    """The op as a rewritten graph calls it eagerly (`runner.eager_graph`): its device's
    implementation straight away when the dispatcher would reach it with nothing in between,
    the op itself otherwise. Skips the dispatcher's round trip into Python (15–29 µs a call
    on the H100's host in two runs, docs/BENCHMARKS.md).

    Nothing in between means: plain tensors (no subclass, fake or functional tensor), no
    dispatch or torch-function mode, no functorch transform or functionalization, not
    compiling, and no gradient to record (the op's autograd needs the dispatcher)."""
    args = (q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap, window_left,
            alibi_slopes)
    backend = _EAGER_BACKENDS.get(q.device.type)
    if backend is None or not _plain(q, k, v, attn_mask, alibi_slopes) \
            or _gradient_to_record(args):
        return _OP(*args)
    return backend(*args)


def _gradient_to_record(args: tuple) -> bool:
    """Whether autograd records this call of the op: grad mode on, and a tensor argument
    requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                           for a in args)


def _plain(*tensors) -> bool:
    """Whether a call on these tensors reaches the op's backend kernel untouched (see
    `eager_attention`)."""
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return not (torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._C._dispatch_tls_is_dispatch_key_included(
                    torch._C.DispatchKey.Functionalize)
                or torch.compiler.is_compiling())


_LIBRARY.impl("attention", _attention_default, "CompositeExplicitAutograd")
_LIBRARY.impl("attention", _attention_cuda, "CUDA")
_LIBRARY.impl("attention", _attention_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("attnopt::attention", _attention_fake, lib=_LIBRARY)


# --------------------------------------------------------------------------- ONNX translations
# onnxscript functions, traced by torch.onnx's exporter for every call of the op. Shape letters
# as above; scores_BHSS is (B, H, Sq, Sk).

def onnx_attention_decomposed(q, k, v, attn_mask=None, is_causal=False, scale=None,
                              enable_gqa=False, softcap=None, window_left=None,
                              alibi_slopes=None):
    """Standard ops only (opset 18+): MatMul, Softmax, Where; runs in every ONNX runtime."""
    from onnxscript import opset18 as op
    attn_mask = _onnx_with_alibi(op, q, k, attn_mask, alibi_slopes)

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
    keep_SS = _onnx_band_keep(op, q, k, is_causal, window_left)
    if keep_SS is not None:
        scores_BHSS = op.Where(keep_SS, scores_BHSS, neg_inf)
    if attn_mask is not None:
        if attn_mask.dtype == 9:  # onnx BOOL: True = attend
            scores_BHSS = op.Where(attn_mask, scores_BHSS, neg_inf)
        else:
            scores_BHSS = op.Add(scores_BHSS, op.CastLike(attn_mask, scores_BHSS))
        # a row that sees no key: Softmax gives NaN, SDPA's definition 0 (left padding)
        probs_BHSS = op.Softmax(scores_BHSS, axis=-1)
        probs_BHSS = op.Where(op.IsNaN(probs_BHSS), scalar(0.0, probs_BHSS), probs_BHSS)
    else:
        probs_BHSS = op.Softmax(scores_BHSS, axis=-1)
    return op.MatMul(probs_BHSS, v)


def _onnx_with_alibi(op, q, k, attn_mask, alibi_slopes):
    """`attn_mask` with the op's ALiBi bias `-slopes[h] * |i - j|` folded in (`with_bias`)."""
    if alibi_slopes is None:
        return attn_mask
    rows_S1, cols_S = _onnx_positions(op, q, k)
    distance_SS = op.CastLike(op.Abs(op.Sub(rows_S1, cols_S)), alibi_slopes)
    slopes_shape = op.Concat(op.Constant(value_ints=[-1]), op.Shape(q, start=1, end=2),
                             op.Constant(value_ints=[1, 1]), axis=0)
    bias_BHSS = op.Neg(op.Mul(op.Reshape(alibi_slopes, slopes_shape), distance_SS))
    if attn_mask is None:
        return bias_BHSS
    if attn_mask.dtype == 9:  # onnx BOOL: True = attend
        return op.Where(attn_mask, bias_BHSS,
                        op.CastLike(op.Constant(value_float=float("-inf")), bias_BHSS))
    return op.Add(op.CastLike(attn_mask, bias_BHSS), bias_BHSS)


def _onnx_positions(op, q, k):
    """(query positions as an (Sq, 1) column, key positions (Sk,)) from the dynamic lengths."""
    from attnopt.ops.common import onnx_dim
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows_S1 = op.Unsqueeze(op.Range(zero, op.Squeeze(onnx_dim(op, q, 2)), one),
                           op.Constant(value_ints=[1]))
    return rows_S1, op.Range(zero, op.Squeeze(onnx_dim(op, k, 2)), one)


def _onnx_band_keep(op, q, k, is_causal: bool, window_left: Optional[int]):
    """`band_keep` in ONNX: (Sq, Sk) bool from the dynamic lengths, or None (no restriction)."""
    if not is_causal and window_left is None:
        return None
    rows_S1, cols_S = _onnx_positions(op, q, k)
    keep_SS = op.LessOrEqual(cols_S, rows_S1) if is_causal else None
    if window_left is not None:
        in_window = op.GreaterOrEqual(cols_S, op.Sub(rows_S1, op.Constant(value_int=window_left)))
        keep_SS = in_window if keep_SS is None else op.And(keep_SS, in_window)
    return keep_SS


def onnx_attention_standard(q, k, v, attn_mask=None, is_causal=False, scale=None,
                            enable_gqa=False, softcap=None, window_left=None,
                            alibi_slopes=None):
    """The standard `Attention` op (opset 23), one node. ONNX applies its soft-cap after the
    mask (a masked score would come back finite), so soft-capped sites are decomposed. The op
    has no window and no ALiBi: both are folded into its mask."""
    if softcap is not None:
        return onnx_attention_decomposed(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                         softcap, window_left, alibi_slopes)
    from onnxscript import opset23 as op
    float_mask = (attn_mask is not None and attn_mask.dtype != 9) or alibi_slopes is not None
    attn_mask = _onnx_with_alibi(op, q, k, attn_mask, alibi_slopes)
    if window_left is not None:
        keep_SS = _onnx_band_keep(op, q, k, False, window_left)
        attn_mask = keep_SS if attn_mask is None else (
            op.And(attn_mask, keep_SS) if attn_mask.dtype == 9 else
            op.Where(keep_SS, attn_mask, op.CastLike(op.Constant(value_float=float("-inf")),
                                                    attn_mask)))
    attributes = {"is_causal": int(bool(is_causal))}
    if scale is not None:
        attributes["scale"] = float(scale)
    inputs = (q, k, v)
    if attn_mask is not None:  # onnxruntime wants the query axis spelled out, not broadcast
        full_BHSS = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3),
                              op.Shape(k, start=2, end=3), axis=0)
        if float_mask:  # in q's type (it may be a wider bias)
            attn_mask = op.CastLike(attn_mask, q)
        inputs = (q, k, v, op.Expand(attn_mask, full_BHSS))
    outputs = op.Attention(*inputs, **attributes)  # (Y, present_key, present_value, qk)
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def onnx_attention_ort(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                       softcap=None, window_left=None, alibi_slopes=None):
    """onnxruntime's fused contrib ops where they express the call, the decomposed translation
    elsewhere (a dynamic head count or head dim, or neither op fits):

    - `com.microsoft.GroupQueryAttention` for self-attention (equal lengths) that is causal,
      grouped (fewer kv heads, never repeated) or soft-capped, with any mask as its
      `attention_bias` and a causal sliding window as its `local_window_size`;
    - `com.microsoft.MultiHeadAttention` for the rest without soft-cap or causality (equal
      head counts, cross-attention included). Its causal form is slower than
      GroupQueryAttention's on the CPU (docs/BENCHMARKS.md).

    ALiBi is folded into the mask (both ops take it as `attention_bias`)."""
    if alibi_slopes is not None:
        from onnxscript import opset18
        attn_mask = _onnx_with_alibi(opset18, q, k, attn_mask, alibi_slopes)
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    static = all(isinstance(d, int) for d in (heads, kv_heads, head_dim, v.shape[3]))
    windowed = window_left is not None
    if static and _equal_lengths(q, k) and v.shape[3] == head_dim and \
            (is_causal or not windowed) and \
            (is_causal or heads != kv_heads or softcap is not None):
        return _onnx_group_query_attention(q, k, v, attn_mask, is_causal, scale, softcap,
                                           window_left)
    if not static or softcap is not None or heads != kv_heads or is_causal or windowed:
        return onnx_attention_decomposed(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                         softcap, window_left)
    from onnxscript import opset18 as op
    multi_head_attention = _contrib_op("MultiHeadAttention", [
        ("query", "T"), ("key", "T"), ("value", "T"), ("bias", "T"),
        ("key_padding_mask", "M"), ("attention_bias", "T")], ["output"],
        {"num_heads": True, "scale": False, "unidirectional": False,
         "mask_filter_value": False})
    bias = _full_bias(op, attn_mask, q, k) if attn_mask is not None else None
    attributes = {"num_heads": heads}
    if scale is not None:
        attributes["scale"] = float(scale)
    out_BSE = multi_head_attention(_heads_last(op, q), k, v, None, None, bias, **attributes)
    return _heads_split(op, out_BSE[0] if isinstance(out_BSE, (tuple, list)) else out_BSE,
                        heads, head_dim)


def _equal_lengths(q, k) -> bool:
    """Whether q and k are known to have the same sequence length (static, or one named
    symbolic dimension)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if isinstance(q_len, int) or isinstance(kv_len, int):
        return q_len == kv_len
    return getattr(q_len, "value", None) is not None and q_len == kv_len


def _heads_last(op, x_BHSD):
    """(B, H, S, D) → (B, S, H·D), the contrib ops' layout."""
    return op.Reshape(op.Transpose(x_BHSD, perm=[0, 2, 1, 3]),
                      op.Constant(value_ints=[0, 0, x_BHSD.shape[1] * x_BHSD.shape[3]]))


def _heads_split(op, out_BSE, heads: int, head_dim: int):
    return op.Transpose(op.Reshape(out_BSE, op.Constant(value_ints=[0, 0, heads, head_dim])),
                        perm=[0, 2, 1, 3])


def _full_bias(op, attn_mask, q, k):
    """An SDPA mask as the contrib ops' additive (B|1, H|1, Sq, Sk) bias in q's type (they
    want the query axis spelled out, not broadcast)."""
    # (a mask with ALiBi folded in has no traced shape: it is (B|1, H, Sq, Sk))
    rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
    if attn_mask.dtype == 9:  # onnx BOOL: True = attend → 0 / -inf
        attn_mask = op.Where(attn_mask, op.CastLike(op.Constant(value_float=0.0), q),
                             op.CastLike(op.Constant(value_float=float("-inf")), q))
    if rank < 4:
        attn_mask = op.Unsqueeze(attn_mask, op.Constant(value_ints=list(range(4 - rank))))
    full = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3),
                     op.Shape(k, start=2, end=3), axis=0)
    return op.CastLike(op.Expand(attn_mask, full), q)


def _onnx_group_query_attention(q, k, v, attn_mask, is_causal, scale, softcap, window_left):
    """`com.microsoft.GroupQueryAttention` as a prompt without a cache: every sequence full
    length (seqlens_k = S − 1), q/k/v as (B, S, heads·D), k and v at their own head count.
    Its `local_window_size` L lets query i see the L keys i - L + 1 .. i (measured on
    onnxruntime's CPU provider; the semantics ONNX's Attention adopts in opset 25): the op's
    `window_left + 1`."""
    from onnxscript import opset18 as op
    group_query_attention = _contrib_op("GroupQueryAttention", [
        ("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
        ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache", "T"),
        ("sin_cache", "T"), ("position_ids", "P"), ("attention_bias", "T")],
        ["output", "present_key", "present_value"],
        {"num_heads": True, "kv_num_heads": True, "scale": False, "softcap": False,
         "causal": False, "local_window_size": False})
    total = op.Cast(op.Shape(k, start=2, end=3), to=6)                 # int32 (1,)
    seqlens_k = op.Expand(op.Sub(total, op.Cast(op.Constant(value_ints=[1]), to=6)),
                          op.Shape(q, start=0, end=1))                   # (B,): S − 1
    bias = _full_bias(op, attn_mask, q, k) if attn_mask is not None else None
    attributes = {"num_heads": q.shape[1], "kv_num_heads": k.shape[1],
                  "causal": int(bool(is_causal))}
    if scale is not None:
        attributes["scale"] = float(scale)
    if softcap is not None:
        attributes["softcap"] = float(softcap)
    if window_left is not None:
        attributes["local_window_size"] = int(window_left) + 1
    outputs = group_query_attention(
        _heads_last(op, q), _heads_last(op, k), _heads_last(op, v), None, None, seqlens_k,
        op.Squeeze(total), None, None, None, bias, **attributes)
    return _heads_split(op, outputs[0], q.shape[1], q.shape[3])


def _contrib_op(name: str, inputs: list, outputs: list, attributes: dict):
    """An onnxscript op for onnxruntime's `com.microsoft` contrib op `name`, with the part of
    its signature attnopt uses registered with onnx once (onnx ships no schemas for
    onnxruntime's contrib ops, and the exporter's tracer needs one to tell inputs from
    attributes). `inputs`: (name, type) in order, all but the first optional; `attributes`:
    name → required."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema
    domain = "com.microsoft"
    if onnx.defs.has(name, domain):
        schema = onnx.defs.get_schema(name, 1, domain)
    else:
        kinds = OpSchema.FormalParameterOption
        formal_inputs = [OpSchema.FormalParameter(
            input_name, type_name, param_option=kinds.Optional if index else kinds.Single)
            for index, (input_name, type_name) in enumerate(inputs)]
        floats = ("scale", "softcap", "mask_filter_value")
        schema = OpSchema(
            name, domain, 1, doc=f"onnxruntime contrib {name} (subset used by attnopt)",
            inputs=formal_inputs,
            outputs=[OpSchema.FormalParameter(output, "T") for output in outputs],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
            attributes=[OpSchema.Attribute(
                attribute, OpSchema.AttrType.FLOAT if attribute in floats
                else OpSchema.AttrType.INT, "", required=required)
                for attribute, required in attributes.items()])
        onnx.defs.register_schema(schema)
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, schema)
