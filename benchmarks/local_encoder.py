"""A 4-layer, 256-wide encoder trained on a local task, for `bench_long.py`'s end-to-end part.

Random weights make attention nearly uniform; this model's attention is what training made
it. The task: every position outputs the token before it (attention must find the previous
position). The encoder is `nn.TransformerEncoder` (4 layers, 4 heads, pre-norm) over token
embeddings plus learned positions initialized from the sinusoidal table.

Training (CPU, ~4 minutes on 2 cores, seeded): 150 Adam steps at lr 3e-3 on 128-token
sequences at positions 0..127, which learns the task; then 350 steps at lr 1e-3 on 128-token
windows at random positions up to 4096, so every position's embedding is trained. At 4096
tokens it then gets about 90% of positions right. The weights are cached at `path`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

VOCAB = 16
WIDTH = 256
MAX_LENGTH = 4096
TRAIN_LENGTH = 128


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    angles = torch.arange(length)[:, None] / 10000 ** (torch.arange(0, width, 2) / width)
    table = torch.zeros(length, width)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    return table


class LocalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(2.0 * sinusoidal_positions(MAX_LENGTH, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, batch_first=True, dropout=0.0,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens) + self.position[offset:offset + tokens.shape[1]]
        return self.head(self.encoder(x))


def draw(batch: int, length: int, generator: torch.Generator):
    """(tokens, targets): the target at i is the token at i - 1 (position 0 is not scored)."""
    tokens = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return tokens, torch.roll(tokens, 1, dims=1)


@torch.no_grad()
def accuracy(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions right (one sequence per call, so an optimized model runs the
    graph captured for its single-sequence examples)."""
    right = [(model(t[None]).argmax(-1)[0] == y)[1:] for t, y in zip(tokens, targets)]
    return float(torch.cat(right).float().mean())


def train(steps: int = 500, learn_steps: int = 150, seed: int = 0) -> LocalEncoder:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LocalEncoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        offset = 0
        if step >= learn_steps:
            offset = int(torch.randint(0, MAX_LENGTH - TRAIN_LENGTH, (1,), generator=generator))
        if step == learn_steps:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
        tokens, targets = draw(16, TRAIN_LENGTH, generator)
        loss = nn.functional.cross_entropy(model(tokens, offset)[:, 1:].flatten(0, 1),
                                           targets[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def load_or_train(path: str) -> LocalEncoder:
    """The trained model, from `path` when it holds one (else trained and saved there)."""
    model = LocalEncoder()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)
    return model
