"""Helpers for tests of what canonicalization emits: a spy on the canonical op's calls, and
decoder-style inputs (hidden states, an attention_mask with padded spans, token types)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt.ops import ATTENTION_OP


class CanonicalCalls(TorchDispatchMode):
    """Records (is_causal, has a mask, window_left) of every canonical attention call, and in
    `alibi` whether it carried ALiBi slopes."""

    def __init__(self):
        super().__init__()
        self.calls, self.alibi = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == ATTENTION_OP:
            window = args[8] if len(args) > 8 else (kwargs or {}).get("window_left")
            self.calls.append((bool(args[4]), args[3] is not None, window))
            slopes = args[9] if len(args) > 9 else (kwargs or {}).get("alibi_slopes")
            self.alibi.append(slopes is not None)
        return func(*args, **(kwargs or {}))


def run_recorded(module, inputs):
    """The output and the canonical calls of one call (a new input signature is captured and
    verified on its first call, which runs the op too: that call is not counted)."""
    with torch.no_grad():
        module(*inputs)
        with CanonicalCalls() as spy:
            out = module(*inputs)
    return out, spy.calls


def decoder_inputs(batch: int, length: int, width: int, padded_rows: dict, marked=(),
                   seed: int = 0):
    """(x, attention_mask, token_types): `padded_rows` {row: (start, stop)} switched off in the
    attention_mask, token type 1 at the `marked` positions."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row, (start, stop) in padded_rows.items():
        attention_mask[row, start:stop] = 0
    token_types = torch.zeros(batch, length, dtype=torch.long)
    token_types[:, list(marked)] = 1
    return x, attention_mask, token_types
