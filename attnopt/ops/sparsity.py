"""Sparse attention patterns and the block layouts they stand for.

A `SparsePattern` says which keys each query may attend, in two layers (as DeepSpeed's sparse
attention and BigBird define them):

- a **block layout** over (query block, key block) pairs of `block` positions: the union of
  local blocks (`local_left`/`local_right` blocks around the diagonal, every `dilation`-th),
  strided summary blocks (the last block of every `stride` blocks, as the Sparse Transformer's
  fixed pattern), `global_blocks` leading blocks that attend and are attended everywhere
  (Longformer's global tokens), `random_blocks` per query block (BigBird), and an optional
  user layout. A pattern with no block component keeps every block;
- a **token window** (`window_left`/`window_right` positions, -1 unbounded), intersected with
  the layout — a sliding-window mask, exact at token granularity.

Causal attention intersects both with j <= i. Random blocks come from an integer hash of
(query block, draw, seed) — the same function in torch and in ONNX — so a layout depends only
on the sequence length and the pattern: reproducible, and identical in the exported model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

#: Park–Miller modulus and multiplier of the random-block hash.
HASH_MODULUS = 2147483647
HASH_MULTIPLIER = 48271


@dataclass(frozen=True)
class SparsePattern:
    block: int = 64
    local_left: int = -1      # local blocks before the diagonal block (-1: no local part)
    local_right: int = -1     # local blocks after it
    dilation: int = 1         # local blocks at distances 0, d, 2d, … (dilated sliding window)
    stride: int = 0           # summary blocks: key block kb with (kb + 1) % stride == 0
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0
    window_left: int = -1     # token window, intersected with the layout (-1: unbounded)
    window_right: int = -1

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"sparse block must be a power of two >= 16, got {self.block}")
        if self.dilation < 1 or self.stride < 0 or self.global_blocks < 0 or \
                self.random_blocks < 0:
            raise ValueError(f"invalid sparse pattern {self}")

    @property
    def has_blocks(self) -> bool:
        return (self.local_left >= 0 or self.local_right >= 0 or self.stride > 0
                or self.global_blocks > 0 or self.random_blocks > 0)

    @property
    def window(self) -> Optional[tuple[int, int]]:
        if self.window_left < 0 and self.window_right < 0:
            return None
        return self.window_left, self.window_right

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # named patterns -------------------------------------------------------------------------

    @classmethod
    def sliding_window(cls, left: int, right: int, block: int = 64) -> "SparsePattern":
        return cls(block=block, window_left=left, window_right=right)

    @classmethod
    def dilated(cls, local: int, dilation: int, block: int = 64) -> "SparsePattern":
        return cls(block=block, local_left=local, local_right=local, dilation=dilation)

    @classmethod
    def strided(cls, stride: int, block: int = 64) -> "SparsePattern":
        return cls(block=block, local_left=stride - 1, local_right=stride - 1, stride=stride)

    @classmethod
    def longformer(cls, local: int, global_blocks: int, block: int = 64) -> "SparsePattern":
        return cls(block=block, local_left=local, local_right=local,
                   global_blocks=global_blocks)

    @classmethod
    def bigbird(cls, local: int, global_blocks: int, random_blocks: int, seed: int = 0,
                block: int = 64) -> "SparsePattern":
        return cls(block=block, local_left=local, local_right=local,
                   global_blocks=global_blocks, random_blocks=random_blocks, seed=seed)


def random_block_indices(q_blocks: int, k_blocks: int, draws: int, seed: int, causal: bool,
                         device=None) -> Tensor:
    """(M, draws) int64 key blocks drawn for each query block (module docstring)."""
    qb = torch.arange(q_blocks, device=device, dtype=torch.int64)[:, None]
    t = torch.arange(draws, device=device, dtype=torch.int64)[None, :]
    x = (qb * 1000003 + t * 7919 + int(seed) * 104729 + 1) % HASH_MODULUS
    x = (x * HASH_MULTIPLIER) % HASH_MODULUS
    x = (x * HASH_MULTIPLIER) % HASH_MODULUS
    limit = torch.clamp(qb + 1, max=k_blocks) if causal else torch.full_like(qb, k_blocks)
    return x % limit


def pattern_layout(pattern: SparsePattern, q_len: int, kv_len: int, *, causal: bool,
                   user_layout: Optional[Tensor] = None, device=None) -> Tensor:
    """(M, N) bool: the blocks the pattern touches (causal and the token window included, so
    blocks those exclude are skipped)."""
    b = pattern.block
    q_blocks, k_blocks = -(-q_len // b), -(-kv_len // b)
    qb = torch.arange(q_blocks, device=device)[:, None]
    kb = torch.arange(k_blocks, device=device)[None, :]
    if pattern.has_blocks or user_layout is not None:
        keep = torch.zeros(q_blocks, k_blocks, dtype=torch.bool, device=device)
        if pattern.local_left >= 0 or pattern.local_right >= 0:
            distance = qb - kb  # > 0: the key block lies before the query block
            keep |= (distance <= max(pattern.local_left, 0) * pattern.dilation) & \
                (-distance <= max(pattern.local_right, 0) * pattern.dilation) & \
                (distance % pattern.dilation == 0)
        if pattern.stride > 0:
            keep |= ((kb + 1) % pattern.stride == 0).expand(q_blocks, k_blocks)
        if pattern.global_blocks > 0:
            keep |= (qb < pattern.global_blocks) | (kb < pattern.global_blocks)
        if pattern.random_blocks > 0:
            drawn = random_block_indices(q_blocks, k_blocks, pattern.random_blocks,
                                         pattern.seed, causal, device)
            keep |= torch.zeros_like(keep).scatter_(1, drawn, True)
        if user_layout is not None:
            keep |= user_layout.to(device=keep.device, dtype=torch.bool)
    else:
        keep = torch.ones(q_blocks, k_blocks, dtype=torch.bool, device=device)
    first_q, last_q = qb * b, torch.clamp(qb * b + b - 1, max=q_len - 1)
    first_k = kb * b
    last_k = torch.clamp(kb * b + b - 1, max=kv_len - 1)
    if pattern.window_left >= 0:
        keep &= last_k >= first_q - pattern.window_left
    if pattern.window_right >= 0:
        keep &= first_k <= last_q + pattern.window_right
    if causal:
        keep &= first_k <= last_q
    return keep


def position_keep(query_pos: Tensor, key_pos: Tensor, *, causal: bool,
                  window: Optional[tuple[int, int]]) -> Optional[Tensor]:
    """Which (query, key) position pairs causality and a token window (left, right; -1 for an
    unbounded side) allow, broadcast over the two position tensors (None: no constraint)."""
    keep = None

    def both(condition):
        return condition if keep is None else keep & condition
    if causal:
        keep = both(key_pos <= query_pos)
    if window is not None:
        left, right = window
        if left >= 0:
            keep = both(key_pos >= query_pos - left)
        if right >= 0:
            keep = both(key_pos <= query_pos + right)
    return keep


def token_keep(pattern: SparsePattern, q_len: int, kv_len: int, *, causal: bool,
               user_layout: Optional[Tensor] = None, device=None) -> Tensor:
    """(Sq, Sk) bool: the dense element mask of a pattern (tests and small inputs only)."""
    layout = pattern_layout(pattern, q_len, kv_len, causal=causal, user_layout=user_layout,
                            device=device)
    b = pattern.block
    dense = layout.repeat_interleave(b, 0).repeat_interleave(b, 1)[:q_len, :kv_len]
    allowed = position_keep(torch.arange(q_len, device=device)[:, None],
                            torch.arange(kv_len, device=device)[None, :], causal=causal,
                            window=pattern.window)
    return dense if allowed is None else dense & allowed
