"""What an attention site looks like in an aten graph, as data the detector returns.

Shape letters used in names: B batch, H query heads, Hkv key/value heads, S sequence, Sq/Sk
query/key lengths, D head dim, Dv value head dim.

A `SiteMatch` says how to build the canonical call from nodes that already exist: each input
is a `TensorRecipe` (a node plus view steps such as a transpose), the mask is a list of
`MaskTerm`s combined in canonicalization, and `output_steps` turn the canonical
(B, H, Sq, Dv) result back into the layout the original product produced. The detector never
edits the graph (no hidden state between matching and rewriting).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch.fx import Node

from attnopt.passes.fx_utils import shape_of

# A view step: ("transpose", d0, d1) | ("permute", perm) | ("unsqueeze", d) | ("squeeze", d)
#   | ("unflatten", d, sizes) | ("flatten", d0, d1); sizes may hold nodes (symbolic sizes)
Step = tuple


def _size(value):
    return value.meta.get("val") if isinstance(value, Node) else value


def apply_steps(shape: tuple, steps: tuple[Step, ...]) -> tuple:
    shape = list(shape)
    for step in steps:
        kind = step[0]
        if kind == "transpose":
            d0, d1 = (d % len(shape) for d in step[1:])
            shape[d0], shape[d1] = shape[d1], shape[d0]
        elif kind == "permute":
            shape = [shape[i] for i in step[1]]
        elif kind == "unsqueeze":
            shape.insert(step[1] % (len(shape) + 1), 1)
        elif kind == "squeeze":
            del shape[step[1] % len(shape)]
        elif kind == "unflatten":
            dim = step[1] % len(shape)
            shape[dim:dim + 1] = [_size(size) for size in step[2]]
        elif kind == "flatten":
            d0, d1 = step[1] % len(shape), step[2] % len(shape)
            merged = 1
            for size in shape[d0:d1 + 1]:
                merged = merged * size
            shape[d0:d1 + 1] = [merged]
        else:
            raise ValueError(f"unknown view step {step!r}")
    return tuple(shape)


def step_call(step: Step) -> tuple:
    """(aten op, its arguments after the tensor) that perform one view step."""
    aten = torch.ops.aten
    kind = step[0]
    if kind == "transpose":
        return aten.transpose.int, (step[1], step[2])
    if kind == "permute":
        return aten.permute.default, (list(step[1]),)
    if kind == "unsqueeze":
        return aten.unsqueeze.default, (step[1],)
    if kind == "squeeze":
        return aten.squeeze.dim, (step[1],)
    if kind == "unflatten":
        return aten.unflatten.int, (step[1], list(step[2]))
    if kind == "flatten":
        return aten.flatten.using_ints, (step[1], step[2])
    raise ValueError(f"unknown view step {step!r}")


@dataclass(frozen=True)
class TensorRecipe:
    """`node` viewed through `steps` (all views, no copies)."""

    node: Node
    steps: tuple[Step, ...] = ()

    def then(self, *steps: Step) -> "TensorRecipe":
        return TensorRecipe(self.node, self.steps + tuple(steps))

    @property
    def shape(self) -> tuple:
        return apply_steps(shape_of(self.node), self.steps)


@dataclass(frozen=True)
class MaskTerm:
    """One contribution to the scores before softmax.

    kind:
      - "bias": float `node * multiplier` added to the scores.
      - "fill": positions where `node` is True (False when `inverted`) become `value`.
      - "sdpa": the `attn_mask` of a fused SDPA call, bool (True = attend) or float (added).

    `steps` view the node into the canonical (B, H, Sq, Sk) space first: a bias added to
    (B·H, Sq, Sk) scores that are then viewed as (B, H, Sq, Sk) is unflattened the same way.
    """

    kind: str
    node: Node
    multiplier: float = 1.0
    value: float = 0.0
    inverted: bool = False
    steps: tuple[Step, ...] = ()

    def scaled(self, factor: float) -> "MaskTerm":
        if self.kind == "bias":
            return replace(self, multiplier=self.multiplier * factor)
        if self.kind == "fill":
            return replace(self, value=self.value * factor)
        return self

    def then(self, *steps: Step) -> "MaskTerm":
        return replace(self, steps=self.steps + tuple(steps))


@dataclass
class SiteMatch:
    """Everything canonicalization needs to replace one site with `attnopt::attention`."""

    form: str
    anchor: Node
    output: Node
    q: TensorRecipe
    k: TensorRecipe
    v: TensorRecipe
    scale: float
    mask_terms: tuple[MaskTerm, ...] = ()
    is_causal: bool = False
    enable_gqa: bool = False
    gqa_group: int = 1
    output_steps: tuple[Step, ...] = ()
    dropout_p: float = 0.0
    layout: str = "BHSD"
    notes: tuple[str, ...] = ()
    internal: list[Node] = field(default_factory=list)
    softcap: Optional[float] = None

    @property
    def q_shape(self) -> tuple:
        return self.q.shape

    @property
    def k_shape(self) -> tuple:
        return self.k.shape

    @property
    def v_shape(self) -> tuple:
        return self.v.shape
