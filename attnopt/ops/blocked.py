"""Block-gathered attention in plain torch: work and memory proportional to the blocks a layout
keeps, never to n×n. The reference (and CPU) implementation of the sparse, top-k and hybrid ops.

Given a layout (B|1, H|1, M, N) over blocks of `block` positions, each query block gathers the
key blocks it keeps into K slots (K = the most any light row keeps) and attends over those
K·block keys, with the token-level constraints (causal, token window, key length, the site's
mask) applied inside. Query blocks that keep more than half of all key blocks — the global
rows of Longformer/BigBird — would make K = N for everyone; they are computed densely, over
all keys, instead. Light rows are processed in chunks of query blocks so that the gathered keys
and values held at once stay under `GATHER_BUDGET` elements whatever the length and width.

`BlockGather` exposes the pieces (gathered keys, per-slot visibility) so the hybrid op can
evaluate random features over exactly the keys the exact part sees. Rows that see no key
produce zeros, as the flash kernels do.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.ops.features import compute_dtype, repeat_kv_heads
from attnopt.ops.sparsity import position_keep

#: Query blocks keeping more than this fraction of all key blocks are computed densely.
DENSE_ROW_FRACTION = 0.5
#: Gathered key and value elements held at once; query blocks are processed in chunks below it.
GATHER_BUDGET = 1 << 24


def _pad_to(x: Tensor, dim: int, length: int, value=0.0) -> Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, missing]
    return F.pad(x, pad, value=value)


class BlockGather:
    """The gather plan of one layout for (B, H, Sq, ·) queries over (B, Hkv, Sk, ·) keys."""

    def __init__(self, layout_BHMN: Tensor, block: int, q_len: int, kv_len: int, *,
                 causal: bool = False, window: Optional[tuple[int, int]] = None,
                 dense_rows: bool = True):
        while layout_BHMN.dim() < 4:
            layout_BHMN = layout_BHMN.unsqueeze(0)
        self.layout, self.block = layout_BHMN, block
        self.q_len, self.kv_len = q_len, kv_len
        self.causal, self.window = causal, window
        m, n = layout_BHMN.shape[-2:]
        self.q_blocks, self.k_blocks = m, n
        self.first, self.all_q_blocks = 0, m  # a chunk covers query blocks first … first+M
        counts = layout_BHMN.sum(-1)  # (Bl, Hl, M)
        heavy = torch.zeros(m, dtype=torch.bool, device=layout_BHMN.device)
        if dense_rows and n > 4:
            heavy = (counts > DENSE_ROW_FRACTION * n).flatten(0, -2).any(0)
        self.heavy_blocks = heavy.nonzero().flatten()
        slots = int(counts.masked_fill(heavy, 0).max()) if m else 0
        self.slots = max(slots, 1)
        order = torch.sort((~layout_BHMN).to(torch.int8), dim=-1, stable=True).indices
        self.indices = order[..., :self.slots]                        # (Bl, Hl, M, K)
        self.slot_ok = torch.arange(self.slots, device=counts.device) < counts[..., None]

    def chunk(self, start: int, stop: int) -> "BlockGather":
        """The plan of query blocks start … stop - 1 alone (bounds what one gather holds)."""
        part = copy.copy(self)
        part.first, part.q_blocks = self.first + start, stop - start
        part.indices = self.indices[..., start:stop, :]
        part.slot_ok = self.slot_ok[..., start:stop, :]
        return part

    # -- gathering -----------------------------------------------------------------------------

    def query_blocks(self, x_BHSX: Tensor) -> Tensor:
        """(B, H, M, block, X), padded with zeros past the sequence."""
        x = _pad_to(x_BHSX, 2, self.all_q_blocks * self.block)
        x = x.unflatten(2, (self.all_q_blocks, self.block))
        return x[:, :, self.first:self.first + self.q_blocks]

    def gather_keys(self, x_BHkvSX: Tensor, heads: int) -> Tensor:
        """(B, Hg, M, K·block, X): each query block's kept key blocks, where Hg is the kv head
        count for a layout shared by all heads and `heads` for a per-head layout."""
        if self.layout.shape[1] > 1:
            x_BHkvSX = repeat_kv_heads(x_BHkvSX, heads)
        batch, x_heads, _, width = x_BHkvSX.shape
        x = _pad_to(x_BHkvSX, 2, self.k_blocks * self.block)
        x = x.unflatten(2, (self.k_blocks, self.block))               # (B, Hg, N, b, X)
        m, k, b = self.q_blocks, self.slots, self.block
        if self.indices.shape[0] == 1 and self.indices.shape[1] == 1:  # one layout for all:
            gathered = x.index_select(2, self.indices.flatten())     # contiguous block copies
            return gathered.view(batch, x_heads, m, k * b, width)
        index = self.indices.expand(batch, x_heads, m, k).reshape(batch, x_heads, m * k, 1, 1)
        gathered = torch.gather(x, 2, index.expand(batch, x_heads, m * k, b, width))
        return gathered.view(batch, x_heads, m, k * b, width)

    def scores(self, q_BHSD: Tensor, k_gathered: Tensor) -> Tensor:
        """(B, H, M, block, K·block) products of query blocks with their gathered keys."""
        q_blocks = self.query_blocks(q_BHSD)
        batch, heads = q_blocks.shape[:2]
        kv_heads = k_gathered.shape[1]
        if kv_heads == heads:
            return q_blocks @ k_gathered.transpose(-1, -2)
        grouped = q_blocks.view(batch, kv_heads, heads // kv_heads, *q_blocks.shape[2:])
        out = grouped @ k_gathered.unsqueeze(2).transpose(-1, -2)
        return out.flatten(1, 2)

    def weigh(self, weights_BHMQK: Tensor, x_gathered: Tensor) -> Tensor:
        """Σ over gathered keys of weights × x: (B, H, M·block, X)."""
        batch, heads = weights_BHMQK.shape[:2]
        kv_heads = x_gathered.shape[1]
        if kv_heads == heads:
            out = weights_BHMQK @ x_gathered
        else:
            grouped = weights_BHMQK.view(batch, kv_heads, heads // kv_heads,
                                         *weights_BHMQK.shape[2:])
            out = (grouped @ x_gathered.unsqueeze(2)).flatten(1, 2)
        return out.flatten(2, 3)

    def keep(self, attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """(keep (B|1, H|1, M, block, K·block) bool, bias or None) for the gathered keys."""
        b, m = self.block, self.q_blocks
        device = self.indices.device
        key_pos = (self.indices[..., None] * b + torch.arange(b, device=device))  # (.., M, K, b)
        keep = (self.slot_ok[..., None] & (key_pos < self.kv_len)).flatten(-2)[..., None, :]
        q_pos = ((self.first + torch.arange(m, device=device))[:, None] * b +
                 torch.arange(b, device=device))[..., None]                  # (M, b, 1)
        key_pos = key_pos.flatten(-2)[..., None, :]                         # (.., M, 1, Kb)
        allowed = position_keep(q_pos, key_pos, causal=self.causal, window=self.window)
        if allowed is not None:
            keep = keep & allowed
        bias = None
        if attn_mask is not None:
            bias = self._gather_mask(attn_mask)
        return keep, bias

    def _gather_mask(self, attn_mask: Tensor) -> Tensor:
        """The site's mask at the gathered keys, as (.., M, block|1, K·block) float bias."""
        b, m, k, n = self.block, self.q_blocks, self.slots, self.k_blocks
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        fill = False if mask.dtype == torch.bool else float("-inf")
        mask = _pad_to(mask, 3, n * b, fill)
        if mask.shape[2] > 1:
            total = self.all_q_blocks
            mask = _pad_to(mask, 2, total * b, fill).unflatten(2, (total, b))
            mask = mask[:, :, self.first:self.first + m]                     # (Bm, Hm, M, b, Sk)
        else:
            mask = mask.unsqueeze(2)                                       # (Bm, Hm, 1, 1, Sk)
        mask = mask.unflatten(-1, (n, b))                                  # (.., N, b)
        lead = torch.broadcast_shapes(mask.shape[:2], self.indices.shape[:2])
        rows, width = mask.shape[3], b
        mask = mask.expand(*lead, m, rows, n, width)
        index = self.indices.expand(*lead, m, k)[:, :, :, None, :, None]
        gathered = torch.gather(mask, 4, index.expand(*lead, m, rows, k, width))
        return gathered.flatten(-2)

    # -- dense rows ---------------------------------------------------------------------------

    def heavy_rows(self) -> Tensor:
        b = self.block
        rows = (self.heavy_blocks[:, None] * b + torch.arange(b, device=self.layout.device))
        rows = rows.flatten()
        return rows[rows < self.q_len]

    def heavy_keep(self, rows: Tensor) -> Tensor:
        """(Bl, Hl, R, Sk) bool: the layout's element mask at the dense rows."""
        b = self.block
        layout_rows = self.layout[..., rows // b, :]                        # (Bl, Hl, R, N)
        keep = layout_rows.repeat_interleave(b, -1)[..., :self.kv_len]
        allowed = position_keep(rows[:, None], torch.arange(self.kv_len, device=rows.device),
                                causal=self.causal, window=self.window)
        return keep if allowed is None else keep & allowed


def softmax_parts(scores: Tensor, keep: Tensor, bias: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(exp(scores - row_max) masked, Σ of it, row_max) — an unnormalized softmax over the
    visible entries; rows with none visible get row_max = -inf and zero weights."""
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - safe_max)
    return weights, weights.sum(-1, keepdim=True), row_max


def attend_gathered(plan: BlockGather, qc: Tensor, kc: Tensor, vc: Tensor,
                    mask: Optional[Tensor], heads: int, scale: float, *,
                    with_lse: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Fused SDPA over one chunk's gathered key blocks: (out (B, H, M·block, Dv), and with
    `with_lse` each row's natural log-sum-exp (B, H, M·block, 1), −inf for a row that sees no
    key). Rows that see no key give zeros."""
    keep, bias = plan.keep(mask)
    if bias is not None and bias.dtype == torch.bool:
        keep, bias = keep & bias, None
    allowed = keep if bias is None else torch.where(keep, bias, float("-inf"))
    k_gathered, v_gathered = plan.gather_keys(kc, heads), plan.gather_keys(vc, heads)
    if k_gathered.shape[1] != heads:  # a layout shared by all heads gathers per kv head
        k_gathered = k_gathered.repeat_interleave(heads // k_gathered.shape[1], dim=1)
        v_gathered = v_gathered.repeat_interleave(heads // v_gathered.shape[1], dim=1)
    # 4-d operands and a float mask: SDPA's fused CPU kernel takes them, while 5-d operands
    # (or a bool mask) fall to its math path, about 3× slower here
    q_blocks = plan.query_blocks(qc)
    batch, _, blocks, rows, _ = q_blocks.shape
    if allowed.dtype == torch.bool:
        allowed = torch.zeros_like(allowed, dtype=qc.dtype).masked_fill_(~allowed,
                                                                         float("-inf"))
    full = (batch, heads, blocks, rows)
    # rows that see a key, from the mask before it is broadcast over batch and heads
    seen = (allowed > float("-inf")).any(-1).expand(full).flatten(1, 2) if with_lse else None
    allowed = allowed.expand(*full, allowed.shape[-1]).flatten(1, 2)
    q4, k4, v4 = q_blocks.flatten(1, 2), k_gathered.flatten(1, 2), v_gathered.flatten(1, 2)
    if not with_lse:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed, scale=scale)
        out = out.unflatten(1, (heads, blocks))
        return torch.nan_to_num(out.flatten(2, 3), nan=0.0), None  # no key seen: zeros
    out, lse = _attention_with_lse(q4, k4, v4, allowed, scale)
    lse = torch.where(seen, lse, float("-inf"))
    out = torch.nan_to_num(out.unflatten(1, (heads, blocks)).flatten(2, 3), nan=0.0)
    return out, lse.unflatten(1, (heads, blocks)).flatten(2, 3).unsqueeze(-1)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float
                        ) -> tuple[Tensor, Tensor]:
    """(softmax(q·kᵀ·scale + bias)·v, logsumexp of the scores) for 4-d operands: PyTorch's
    fused CPU flash kernel when no gradient is needed (it returns both; rows it finds fully
    masked come back as out 0 and lse 0, which the caller masks), else plain autograd ops."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type == "cpu" and not needs_grad and fused is not None and \
            q.dtype in (torch.float32, torch.float64):
        out, lse = fused(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse
    scores = (q @ k.transpose(-1, -2)) * scale + bias
    row_max = scores.amax(dim=-1, keepdim=True)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - safe_max)
    total = weights.sum(-1, keepdim=True)
    tiny = torch.finfo(scores.dtype).tiny
    # a row without keys: out 0 and lse −inf, with zero (not NaN) gradients through both
    lse = torch.where(total > 0, safe_max + torch.log(total.clamp_min(tiny)),
                      torch.full_like(total, float("-inf")))
    return (weights @ v) / total.clamp_min(tiny), lse.squeeze(-1)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, layout_BHMN: Tensor, block: int, *,
                      scale: Optional[float] = None, causal: bool = False,
                      window: Optional[tuple[int, int]] = None,
                      attn_mask: Optional[Tensor] = None) -> Tensor:
    """Exact attention restricted to a block layout (and causal / window / mask): the gathered
    light rows plus densely computed heavy rows. q (B, H, Sq, D); k, v (B, Hkv, Sk, ·)."""
    dtype = compute_dtype(q.dtype)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    plan = BlockGather(layout_BHMN, block, q_len, kv_len, causal=causal, window=window)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool \
        else attn_mask.to(dtype)
    per_block = batch * heads * plan.slots * block * (k.shape[-1] + v.shape[-1])
    group = max(1, GATHER_BUDGET // per_block)
    outs = [attend_gathered(plan.chunk(start, min(start + group, plan.q_blocks)), qc, kc, vc,
                            mask, heads, scale)[0]
            for start in range(0, plan.q_blocks, group)]
    out = torch.cat(outs, dim=2)[:, :, :q_len]
    rows = plan.heavy_rows()
    if rows.numel():
        out = out.clone()
        row_keep = plan.heavy_keep(rows)
        row_bias = None
        if mask is not None:
            full = mask
            while full.dim() < 4:
                full = full.unsqueeze(0)
            full = full[..., rows, :] if full.shape[2] > 1 else full
            if full.dtype == torch.bool:
                row_keep = row_keep & full
            else:
                row_bias = full
        k_all = repeat_kv_heads(kc, heads)
        row_scores = (qc[:, :, rows] * scale) @ k_all.transpose(-1, -2)
        row_weights, row_total, _ = softmax_parts(row_scores, row_keep, row_bias)
        row_weights = row_weights / row_total.clamp_min(torch.finfo(dtype).tiny)
        out[:, :, rows] = row_weights @ repeat_kv_heads(vc, heads)
    return out.to(q.dtype)

