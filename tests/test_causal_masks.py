"""Masks that are causal by construction: the canonical call keeps the mask and is marked causal.

A decoder's mask is causal and carries the padding of an attention_mask input. Classification
proves the causality by re-evaluating the mask's producer with random attention masks; then
canonicalization emits `attention(q, k, v, mask, is_causal=True)`: the same result (both apply),
and on CUDA the kernel skips the key blocks above the diagonal. A mask that only looks causal
on the example (a prefix-LM mask whose prefix comes from an input) must not be marked.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.ops import ATTENTION_OP
from canonical_calls import decoder_inputs, run_recorded

B, S, E, H = 2, 8, 32, 4
TOL = 1e-5  # max |optimized - original| on the positions real tokens occupy


class MaskedDecoder(nn.Module):
    """One attention layer whose mask is built from an integer input, as HF decoders do:
    causal & key padding, or (prefix_lm) with a bidirectional prefix marked by `token_types`.
    `fill`: None passes the boolean mask to SDPA (HF's sdpa path), a number fills the masked
    scores with it (HF's eager path uses the dtype's minimum)."""

    def __init__(self, prefix_lm: bool = False, fill=None):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.prefix_lm = prefix_lm
        self.fill = fill

    def forward(self, x, attention_mask, token_types):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, E // H).permute(2, 0, 3, 1, 4)
        positions = torch.arange(x.shape[1], device=x.device)
        allowed = positions[None, :] <= positions[:, None]                      # (S, S)
        allowed = allowed[None] & attention_mask.bool()[:, None, :]             # (B, S, S)
        if self.prefix_lm:
            prefix = token_types.bool()
            allowed = allowed | (prefix[:, :, None] & prefix[:, None, :])
        if self.fill is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
            scores = scores.masked_fill(~allowed[:, None], self.fill)
            out = torch.softmax(scores, -1) @ v
        return out.transpose(1, 2).reshape(x.shape)


def _inputs(batch: int, length: int, padded_rows: dict, prefix: int = 0, seed: int = 0):
    return decoder_inputs(batch, length, E, padded_rows, marked=range(prefix), seed=seed)


def _optimize(model, example):
    return attnopt.optimize(model, policy="exact", example_inputs=example, capture="whole")


def _run(module, inputs):
    """The output and the (is_causal, has a mask) of each canonical call of one call."""
    out, calls = run_recorded(module, inputs)
    return out, [call[:2] for call in calls]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_decoder_mask_is_kept_and_the_call_marked_causal(padding):
    torch.manual_seed(0)
    model = MaskedDecoder().eval()
    optimized = _optimize(model, _inputs(B, S, {1: (6, 8)}))
    assert [r.site.mask_kind for r in optimized.report.sites] == ["causal+padding"]
    # fresh inputs, another padding side: the mask's tensor still decides
    rows = {0: (9, 12), 2: (5, 12)} if padding == "right" else {0: (0, 3), 2: (0, 1)}
    inputs = _inputs(3, 12, rows, seed=1)
    out, calls = _run(optimized, inputs)
    assert calls == [(True, True)]
    expected = model(*inputs)
    assert (out - expected).abs().max() <= TOL


def test_float_mask_with_a_finite_fill_is_not_marked_causal():
    # a padding query row that sees no key averages over every key, those above the diagonal
    # included: marking the call causal would change that row
    torch.manual_seed(0)
    model = MaskedDecoder(fill=torch.finfo(torch.float32).min).eval()
    optimized = _optimize(model, _inputs(B, S, {1: (6, 8)}))
    inputs = _inputs(3, 12, {0: (0, 3), 2: (0, 1)}, seed=1)  # left padding: such rows
    out, calls = _run(optimized, inputs)
    assert calls == [(False, True)]
    assert (out - model(*inputs)).abs().max() <= TOL


def test_canonical_op_applies_mask_and_causality_together():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64) for _ in range(2))
    keys = torch.rand(2, 1, 1, 6) < 0.7
    keys[..., 0] = True  # every query sees key 0
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keys & causal, enable_gqa=True)
    got = ATTENTION_OP(q, k, v, keys, True, None, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    additive = torch.where(keys, 0.0, float("-inf")).to(torch.float64) \
        + torch.randn(2, 1, 6, 6, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=additive.masked_fill(~causal, float("-inf")), enable_gqa=True)
    got = ATTENTION_OP(q, k, v, additive, True, None, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_prefix_lm_mask_that_looks_causal_on_the_example_is_not_marked_causal():
    torch.manual_seed(0)
    model = MaskedDecoder(prefix_lm=True).eval()
    # the example has no prefix: its mask is causal & padding, like a decoder's
    optimized = _optimize(model, _inputs(B, S, {1: (6, 8)}))
    assert [r.site.mask_kind for r in optimized.report.sites] == ["causal+padding"]
    inputs = _inputs(B, S, {1: (6, 8)}, prefix=3, seed=2)  # now the prefix sees ahead
    out, calls = _run(optimized, inputs)
    assert calls == [(False, True)]
    assert (out - model(*inputs)).abs().max() <= TOL
