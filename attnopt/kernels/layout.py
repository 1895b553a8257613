"""Block-sparse layouts: which (query block, key block) pairs of an attention matrix are computed.

A layout is a boolean tensor `blocks_BHMN` of shape (B or 1, H or 1, ceil(Sq / block),
ceil(Sk / block)): True where the block is computed, False where it is skipped entirely. The
kernels never read the dense layout; they read its compressed form, built once and cached:

- `kv_counts_BHM` / `kv_indices_BHMN` — for each query block, how many key blocks it visits and
  which (ascending, padded with 0 after the count): the forward and decode kernels and dq.
- `q_counts_BHN` / `q_indices_BHNM` — the transpose: for each key block, the query blocks that
  visit it (dk, dv).

Blocks inside a layout are "full" unless another mask (causal, window, key lengths, a bias) cuts
through them; the kernels decide that from block coordinates, so full blocks skip mask evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _compress(blocks_BHMN: Tensor) -> tuple[Tensor, Tensor]:
    """(counts_BHM int32, indices_BHMN int32): the True columns of each row, ascending."""
    counts_BHM = blocks_BHMN.sum(dim=-1, dtype=torch.int32)
    # a stable sort of "not selected" puts the selected columns first, in ascending order
    order_BHMN = torch.sort((~blocks_BHMN).to(torch.int8), dim=-1, stable=True).indices
    return counts_BHM.contiguous(), order_BHMN.to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """A block-sparse attention layout (see the module docstring).

    `block_size` must be a power of two >= 16; the kernels tile each layout block with their own
    (smaller or equal) tiles.
    """

    blocks_BHMN: Tensor
    block_size: int
    _compressed: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.blocks_BHMN.dtype != torch.bool or self.blocks_BHMN.dim() != 4:
            raise ValueError("BlockSparseLayout needs a bool tensor of shape "
                             "(B or 1, H or 1, query blocks, key blocks); got "
                             f"{self.blocks_BHMN.dtype} {tuple(self.blocks_BHMN.shape)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")

    @classmethod
    def from_mask(cls, mask_BHSS: Tensor, block_size: int) -> "BlockSparseLayout":
        """The coarsest layout covering a dense boolean mask: a block is kept if any entry is."""
        *lead, q_len, kv_len = mask_BHSS.shape
        pad_q, pad_k = -q_len % block_size, -kv_len % block_size
        padded = torch.nn.functional.pad(mask_BHSS.to(torch.uint8), (0, pad_k, 0, pad_q))
        blocks = padded.unflatten(-1, (-1, block_size)).unflatten(-3, (-1, block_size))
        blocks_BHMN = blocks.amax(dim=(-1, -3)).bool()
        while blocks_BHMN.dim() < 4:
            blocks_BHMN = blocks_BHMN.unsqueeze(0)
        return cls(blocks_BHMN, block_size)

    def check_shape(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        b, h, m, n = self.blocks_BHMN.shape
        want_m, want_n = -(-q_len // self.block_size), -(-kv_len // self.block_size)
        if b not in (1, batch) or h not in (1, heads) or (m, n) != (want_m, want_n):
            raise ValueError(
                f"block layout of shape {(b, h, m, n)} does not fit attention with batch "
                f"{batch}, {heads} heads, {q_len} queries and {kv_len} keys at block size "
                f"{self.block_size}: expected ({{1,{batch}}}, {{1,{heads}}}, {want_m}, {want_n})")

    def dense_mask(self, q_len: int, kv_len: int) -> Tensor:
        """The element-level boolean mask (B|1, H|1, Sq, Sk) this layout stands for."""
        size = self.block_size
        dense = self.blocks_BHMN.repeat_interleave(size, -2).repeat_interleave(size, -1)
        return dense[..., :q_len, :kv_len]

    def by_query_block(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return self._cached("kv", device, lambda blocks: _compress(blocks))

    def by_key_block(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return self._cached("q", device, lambda blocks: _compress(blocks.transpose(-1, -2)))

    def _cached(self, kind: str, device: torch.device, build) -> tuple[Tensor, Tensor]:
        key = (kind, str(device))
        if key not in self._compressed:
            self._compressed[key] = build(self.blocks_BHMN.to(device))
        return self._compressed[key]
