"""The demo: a small transformer built from code, optimized with each policy, reports printed.

The model mixes the forms attnopt finds in real code: a hand-written causal self-attention
(matmul / scale / masked_fill / fp32 softmax / dropout / matmul, GQA by repeat_interleave), an
`nn.MultiheadAttention` cross-attention, and an `nn.TransformerEncoderLayer` (fused SDPA).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from attnopt.api import optimize
from attnopt.policy import PRESETS
from attnopt.presets import long_policy


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * kv_heads * self.head_dim)
        self.out_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        B, S, E = x_BSE.shape
        q_BHSD = self.q_proj(x_BSE).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k_BSHD, v_BSHD = self.kv_proj(x_BSE).view(B, S, 2, self.kv_heads,
                                                  self.head_dim).unbind(2)
        group = self.heads // self.kv_heads
        k_BHSD = k_BSHD.transpose(1, 2).repeat_interleave(group, dim=1)
        v_BHSD = v_BSHD.transpose(1, 2).repeat_interleave(group, dim=1)
        scores_BHSS = q_BHSD @ k_BHSD.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSE.device).triu(1)
        scores_BHSS = scores_BHSS.masked_fill(causal_SS, float("-inf"))
        probs_BHSS = self.dropout(F.softmax(scores_BHSS.float(), dim=-1).to(q_BHSD.dtype))
        out_BSE = (probs_BHSS @ v_BHSD).transpose(1, 2).reshape(B, S, E)
        return self.out_proj(out_BSE)


class DemoBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = CausalSelfAttention(width, heads, kv_heads=heads // 2)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, x, memory):
        x = x + self.self_attn(self.norm(x))
        x = x + self.cross_attn(x, memory, memory, need_weights=False)[0]
        return self.encoder(x)


class DemoModel(nn.Module):
    def __init__(self, vocab: int = 512, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(DemoBlock(width, heads) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens, memory):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, memory)
        return self.head(x)


def run_demo(seq_len: int = 64, batch: int = 2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = DemoModel().eval()
    tokens = torch.randint(0, 512, (batch, seq_len))
    memory = torch.randn(batch, seq_len // 2, 64)
    print(f"DemoModel: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"tokens {tuple(tokens.shape)}, memory {tuple(memory.shape)}\n")
    for name in PRESETS:
        start = time.perf_counter()
        optimized = optimize(model, name, example_inputs=(tokens, memory))
        elapsed = time.perf_counter() - start
        print(f"== policy {name!r} ({PRESETS[name].description}) — {elapsed:.1f} s")
        print(optimized.report)
        with torch.no_grad():
            same = torch.allclose(optimized(tokens, memory), model(tokens, memory), atol=1e-5)
        print(f"outputs match the original: {same}\n")
    # the length-based presets choose by thresholds calibrated on the device (thousands of
    # tokens); here they are set low so the demo's short sequences take the approximations
    policy = long_policy(t1=16, t2=48)
    start = time.perf_counter()
    optimized = optimize(model, policy, example_inputs=(tokens, memory))
    elapsed = time.perf_counter() - start
    print(f"== policy 'long' with T1=16, T2=48 ({policy.description}) — {elapsed:.1f} s")
    print(optimized.report)
    with torch.no_grad():
        want = model(tokens, memory)
        error = float((optimized(tokens, memory) - want).norm() / want.norm())
    print(f"output relative error {error:.3g} (budget {policy.budget.output_rel_err:g})\n")
    # weight rewrites: fewer heads, pooled kv heads, int8 projections, each guarded
    start = time.perf_counter()
    optimized = optimize(model, "compact", example_inputs=(tokens, memory))
    elapsed = time.perf_counter() - start
    print(f"== policy 'compact' ({optimized.report.policy['description']}) — {elapsed:.1f} s")
    print(optimized.report)
    with torch.no_grad():
        error = float((optimized(tokens, memory) - want).norm() / want.norm())
    print(f"output relative error {error:.3g}\n")
