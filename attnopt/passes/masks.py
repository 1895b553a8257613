"""Masks: build a site's canonical mask from its terms, and classify what the mask means.

`build_mask` is written once over an `emit(op, *args)` callback, so the same code both
evaluates a mask eagerly on example values (for classification) and emits graph nodes (for
canonicalization).

`classify_mask` looks at an evaluated mask and names its kind — none, causal, padding,
causal+padding, window, window+padding, additive or bool. Hugging Face models pass
materialized masks and never `is_causal`; kernels need to know which structure a mask has. A
mask that depends only on shapes and constants (no graph input) is a fact of the graph, and
`none`/`causal`/`window` masks of that kind are dropped in favour of `is_causal` (and a window
band) at canonicalization. A mask that depends on an integer input (an attention_mask) keeps
its tensor; its kind adds `padding`.

A constant causal (or window) mask whose bias grows linearly with the key position, at a
slope of its own per head, is ALiBi as BLOOM, MPT and Falcon add it (`fit_alibi`); the
canonical call then carries the slopes and drops the mask (see `ops/attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from attnopt.passes.fx_utils import aten
from attnopt.passes.patterns import MaskTerm, step_call

#: Additive mask values at or below this are treated as "masked out" (finfo.min-style fills).
MASKED_THRESHOLD = -1.0e4

Emit = Callable[..., object]


def build_mask(terms: Sequence[MaskTerm], values: Sequence, like, dtype: torch.dtype,
               emit: Emit):
    """Combine mask terms into one SDPA-style mask (bool: True = attend, or float: added).

    `values[i]` stands for `terms[i].node` (a tensor or a graph node); `like` stands for q (a
    tensor of the site's dtype and device). Returns None when there are no terms. A float mask
    comes out in `dtype` or its biases' wider one: a model that adds a float32 bias to
    half-precision scores (MPT's ALiBi) computes in float32 there, and a bias rounded to
    `dtype` would move scores of hundreds by units.
    """
    if not terms:
        return None
    values = [_viewed(value, term.steps, emit) for term, value in zip(terms, values)]
    if len(terms) == 1 and terms[0].kind == "sdpa":
        return values[0]
    biases, fills = [], []
    for term, value in zip(terms, values):
        if term.kind == "bias":
            biases.append(value if term.multiplier == 1.0
                          else emit(aten.mul.Tensor, value, term.multiplier))
        elif term.kind == "fill":
            masked = value if not term.inverted else emit(aten.logical_not.default, value)
            fills.append((masked, term.value))
        else:
            raise ValueError(f"mask term {term.kind!r} cannot be combined with others")
    if not biases and all(v == float("-inf") for _, v in fills):
        keep = emit(aten.logical_not.default, fills[0][0])
        for masked, _ in fills[1:]:
            keep = emit(aten.logical_and.default, keep, emit(aten.logical_not.default, masked))
        return keep
    total = biases[0] if biases else emit(aten.new_zeros.default, like, [])
    for bias in biases[1:]:
        total = emit(aten.add.Tensor, total, bias)
    for masked, fill_value in fills:
        total = emit(aten.where.ScalarSelf, _cast(masked, torch.bool, emit), fill_value, total)
    for bias in biases:
        bias_dtype = _dtype(bias)
        if bias_dtype is not None and bias_dtype.is_floating_point:
            dtype = torch.promote_types(dtype, bias_dtype)
    return _cast(total, dtype, emit)


def _cast(value, dtype: torch.dtype, emit):
    """`value` in `dtype`: itself where it already is (a copy per site of a mask the sites
    share would cost an (B, H, Sq, Sk) write each, and give each site its own tensor)."""
    return value if _dtype(value) == dtype else emit(aten._to_copy.default, value, dtype=dtype)


def _dtype(value) -> Optional[torch.dtype]:
    """The dtype of a tensor, or of a graph node's traced value."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    val = getattr(value, "meta", {}).get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _viewed(value, steps, emit):
    for step in steps:
        target, args = step_call(step)
        value = emit(target, value, *args)
    return value


def eager_emit(op, *args, **kwargs):
    return op(*args, **kwargs)


@dataclass(frozen=True)
class MaskInfo:
    """What a site's mask means."""

    kind: str
    window: Optional[int] = None
    constant: bool = False  # depends on no graph input: a fact of the graph
    #: every position the mask allows lies on or below the (bottom-right) causal diagonal, for
    #: every input: constant masks of a causal kind, and input-dependent ones whose producer
    #: stayed causal under randomized inputs (`classify.ClassifyMasks`)
    causal_by_construction: bool = False
    #: likewise, every allowed position lies within `window` keys up to the diagonal
    window_by_construction: bool = False
    #: per-head ALiBi slopes the mask's bias equals (`fit_alibi`; constant causal kinds only)
    alibi_slopes: Optional[tuple[float, ...]] = None

    @property
    def droppable(self) -> bool:
        """The mask can be replaced by no mask at all."""
        return self.constant and self.kind == "none"

    @property
    def causal_only(self) -> bool:
        return self.constant and self.kind == "causal"


#: kinds whose allowed positions all lie on or below the causal diagonal (at the example)
CAUSAL_KINDS = ("causal", "causal+padding", "window", "window+padding")


def outside_band(mask: torch.Tensor, q_len: int, kv_len: int,
                 window: Optional[int] = None) -> tuple[bool, bool]:
    """(whether `mask` allows a position above the bottom-right causal diagonal, whether it
    allows one more than `window` keys below it)."""
    allowed, _ = allowed_positions(mask)
    rows = torch.arange(q_len, device=allowed.device).unsqueeze(-1)
    cols = torch.arange(kv_len, device=allowed.device)
    above = cols > rows + (kv_len - q_len)
    past_window = cols <= rows + (kv_len - q_len) - window if window is not None else None
    return (bool((allowed & above).any()),
            past_window is not None and bool((allowed & past_window).any()))


def allowed_positions(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(bool tensor of attended positions, whether the mask carries a real additive bias)."""
    if mask.dtype == torch.bool:
        return mask, False
    finite_mask = mask.float()
    allowed = finite_mask > MASKED_THRESHOLD
    has_bias = bool((finite_mask[allowed] != 0).any()) if allowed.any() else False
    return allowed, has_bias


def classify_mask(mask: Optional[torch.Tensor], *, is_causal: bool, q_len: int, kv_len: int,
                  depends_on_input: bool, depends_on_data: bool) -> MaskInfo:
    """Name the kind of an evaluated mask (broadcastable to (B, H, Sq, Sk))."""
    constant = not (depends_on_input or depends_on_data)
    if mask is None:
        return MaskInfo("causal" if is_causal else "none", constant=True)
    mask_allowed, has_bias = allowed_positions(mask)
    # a bias stays additive unless it may be ALiBi: constant, at equal lengths (fitted below)
    if (has_bias and not (constant and q_len == kv_len)) or \
            (depends_on_data and mask.dtype != torch.bool):
        return MaskInfo("additive", constant=constant)
    if depends_on_data:
        return MaskInfo("bool", constant=False)
    allowed = mask_allowed
    allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len) if allowed.dim() >= 2 else \
        allowed.expand(q_len, kv_len)
    rows = torch.arange(q_len).unsqueeze(-1)
    cols = torch.arange(kv_len)
    offset = kv_len - q_len  # bottom-right alignment, as a KV cache implies
    causal = cols <= rows + offset
    if is_causal:
        allowed = allowed & (cols <= rows)
        causal = cols <= rows
    structure = _structure(allowed, causal, rows, cols, offset)
    alibi = None
    if has_bias:  # fitted on causal kinds only: -s|i - j| equals s·j only up to i
        alibi = fit_alibi(mask, mask_allowed) if structure[0] in ("causal", "window") else None
        if alibi is None:
            return MaskInfo("additive", constant=constant)
    if depends_on_input and structure[0] in ("none", "causal"):
        kind = "padding" if structure[0] == "none" else "causal+padding"
        return MaskInfo(kind, constant=False)
    return MaskInfo(structure[0], window=structure[1], constant=constant,
                    causal_by_construction=constant and structure[0] in CAUSAL_KINDS,
                    window_by_construction=constant and structure[1] is not None,
                    alibi_slopes=alibi)


#: a fitted ALiBi bias may deviate from `slope * j + c` by this many float32 units in the last
#: place of the row's largest value. float32 whatever the mask's dtype: the kernel then adds
#: what the mask held. A half-precision bias rounded off the line (BLOOM's in bfloat16 beyond
#: 256 keys) stays additive — exact slopes would move BLOOM's scores by up to 8 at 2K keys.
ALIBI_ULPS = 4


def fit_alibi(mask: torch.Tensor, allowed: torch.Tensor) -> Optional[tuple[float, ...]]:
    """Per-head slopes `s` with `mask[.., h, i, j] = s[h] * j + c[.., h, i]` at every position
    `allowed`: a key-position bias growing by its head's slope per key, up to a constant per
    row — how BLOOM, MPT and Falcon write ALiBi (on or below the causal diagonal it is the
    canonical op's `-s[h] * |i - j|` plus `s[h] * i`, which softmax ignores). None when the
    mask has no heads axis, a head's bias is not such a line, or every slope is 0."""
    if mask.dtype == torch.bool or mask.dim() < 3:
        return None
    tolerance = ALIBI_ULPS * torch.finfo(torch.float32).eps
    values = mask.float().expand(*mask.shape[:-2], *allowed.shape[-2:])
    allowed = allowed.expand_as(values)
    cols = torch.arange(values.shape[-1], dtype=torch.float32)
    slopes = []
    for head in range(values.shape[-3]):
        head_values, head_allowed = values.select(-3, head), allowed.select(-3, head)
        steps = head_values[..., 1:] - head_values[..., :-1]
        pairs = head_allowed[..., 1:] & head_allowed[..., :-1]
        if not bool(pairs.any()):
            return None
        slope = float(steps[pairs].mean())
        residual = head_values - slope * cols
        highest = residual.masked_fill(~head_allowed, float("-inf")).amax(-1)
        lowest = residual.masked_fill(~head_allowed, float("inf")).amin(-1)
        spread = (highest - lowest).masked_fill(~head_allowed.any(-1), 0.0)
        magnitude = head_values.abs().masked_fill(~head_allowed, 0.0).amax(-1).clamp(min=1.0)
        if bool((spread > tolerance * magnitude).any()):
            return None
        slopes.append(slope)
    if not any(slopes):
        return None
    return tuple(slopes)


def _structure(allowed: torch.Tensor, causal: torch.Tensor, rows, cols, offset
               ) -> tuple[str, Optional[int]]:
    if bool(allowed.all()):
        return "none", None
    if bool((allowed == causal).all()):
        return "causal", None
    per_row = allowed.sum(-1)
    window = int(per_row.max())
    if window == 0:  # nothing attended at all
        return "bool", None
    windowed = causal & (cols > rows + offset - window)
    if bool((allowed == windowed).all()):
        return "window", window
    keys = allowed.any(-2, keepdim=True)  # keys any query may attend
    if bool((allowed == keys.expand_as(allowed)).all()):
        return "padding", None
    if bool((allowed == (causal & keys)).all()):
        return "causal+padding", None
    if bool((allowed == (windowed & keys)).all()):
        return "window+padding", window
    return "bool", None
