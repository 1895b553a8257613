"""Small transformers trained in the test setup, so their attention is what a task makes it.

Random weights make attention nearly uniform, which flatters every approximation. These
fixtures train (seconds on CPU, seeded) a one-layer transformer on a synthetic task whose
solution forces a known attention shape:

- `retrieval`: one position carries a marked token; every position must output that token's
  content. Attention is peaked (one key) and far-reaching (the mark is anywhere).
- `local`: position i outputs the token at i - 1. Attention is peaked and local.
- `diffuse`: every position outputs which of two tokens occurs more often in the sequence.
  Attention is spread over the whole sequence.

`train(task)` returns the trained model (eval mode) and a function drawing a batch of
inputs; `accuracy` measures the task on fresh draws. Trained models are cached per process.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

VOCAB = 16
LENGTH = 64
WIDTH = 32
HEADS = 2
TASKS = ("retrieval", "local", "diffuse")


class Attention(nn.Module):
    """Hand-written multi-head self-attention (matmul / softmax / matmul)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = scores.softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, width))


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The transformer's fixed encodings (a starting point that makes offsets easy to learn)."""
    angles = torch.arange(length)[:, None] / 10000 ** (torch.arange(0, width, 2) / width)
    table = torch.zeros(length, width)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    return table


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 2 * VOCAB, width: int = WIDTH, heads: int = HEADS,
                 length: int = LENGTH, classes: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(2.0 * sinusoidal_positions(length, width))
        self.attention = Attention(width, heads)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = x + self.attention(x)
        x = x + self.mlp(self.norm(x))
        return self.head(x)


def draw(task: str, batch: int, generator: torch.Generator, length: int = LENGTH):
    """(tokens (B, n), targets (B, n)) for a task."""
    tokens = torch.randint(0, VOCAB, (batch, length), generator=generator)
    if task == "retrieval":
        marked = torch.randint(0, length, (batch,), generator=generator)
        rows = torch.arange(batch)
        content = tokens[rows, marked]
        tokens[rows, marked] = content + VOCAB  # the marked version of the token
        targets = content[:, None].expand(batch, length)
    elif task == "local":
        targets = torch.roll(tokens, 1, dims=1)
        targets[:, 0] = 0
    elif task == "diffuse":
        tokens = torch.randint(0, 2, (batch, length), generator=generator)
        # a random bias per sequence so the majority is not always close to a tie
        bias = torch.rand(batch, 1, generator=generator) * 0.6 + 0.2
        tokens = (torch.rand(batch, length, generator=generator) < bias).long()
        targets = (tokens.float().mean(1, keepdim=True) > 0.5).long().expand(batch, length)
    else:
        raise ValueError(f"unknown task {task!r}; valid: {TASKS}")
    return tokens, targets


@functools.lru_cache(maxsize=None)
def train(task: str, steps: int = 500, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TinyTransformer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens, targets = draw(task, 16, generator)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, task: str, seed: int = 1, batch: int = 64) -> float:
    tokens, targets = draw(task, batch, torch.Generator().manual_seed(seed))
    return float((model(tokens).argmax(-1) == targets).float().mean())
