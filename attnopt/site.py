"""`AttentionSite`: the one description of an attention found in a graph.

Detection fills it in once; policy rules, rewrites, kernels and reports read it and never
re-derive shapes from raw nodes. Dims are the example's concrete values; `dynamic_dims` names
the ones captured as symbolic (they may differ at run time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

#: Every mask kind a site can carry. `additive` is a float bias (ALiBi, relative position bias,
#: or an arbitrary float mask); `bool` is a boolean pattern that is none of the named ones.
MASK_KINDS = ("none", "causal", "padding", "causal+padding", "window", "additive", "bool")


@dataclass(frozen=True)
class Projection:
    """A plain linear feeding q/k/v or reading the attention output.

    `weight`/`bias` are qualified parameter names relative to the captured module; `packed`
    marks a fused projection (one linear for q, k and v, e.g. `in_proj_weight`), with `index`
    the part this tensor takes when known.
    """

    weight: str
    bias: Optional[str] = None
    packed: bool = False
    index: Optional[int] = None


@dataclass
class AttentionSite:
    """An attention site found in a captured graph, in canonical (B, H, S, D) terms."""

    name: str
    module_path: str
    module_type: str
    form: str  # how it was written: fused_sdpa, matmul, bmm, baddbmm or einsum
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    scale: float
    mask_kind: str = "none"
    window: Optional[int] = None
    dropout_p: float = 0.0
    layout: str = "BHSD"
    gqa_group: int = 1
    dtype: str = "float32"
    device: str = "cpu"  # device type of the traced operands
    causal: bool = False
    #: the canonical call carries the sliding window as `window_left` (the kernel reads the
    #: band alone); set by canonicalization
    window_band: bool = False
    #: the mask's bias is ALiBi (`passes/masks.fit_alibi`): the canonical call carries the
    #: per-head slopes and no mask, and the kernel computes the bias
    alibi: bool = False
    softcap: Optional[float] = None
    dynamic_dims: tuple[str, ...] = ()
    projections: dict[str, Projection] = field(default_factory=dict)
    node: str = ""
    notes: tuple[str, ...] = ()

    @property
    def layer_index(self) -> Optional[int]:
        """The first integer component of the module path (`encoder.layer.3.attention` → 3)."""
        for part in self.module_path.split("."):
            if part.isdigit():
                return int(part)
        return None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["projections"] = {role: dataclasses.asdict(p) for role, p in self.projections.items()}
        data["dynamic_dims"] = list(self.dynamic_dims)
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class Rejection:
    """A softmax (or fused op) that looked like attention but was left alone, and why."""

    name: str
    module_path: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
