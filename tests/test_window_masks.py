"""Sliding-window masks become a band on the canonical call: `window_left`.

A constant window mask of W keys (Gemma 2/3, Mistral without padding) is dropped and the call
becomes `attention(q, k, v, None, is_causal=True, window_left=W-1)`; a boolean window mask that
carries padding (Hugging Face's sdpa path with an attention_mask) is kept, and the call marked
causal with the band as well, once classification has seen the producer stay within its window
under random attention masks. On CUDA the kernel then reads only the key blocks in the band.
A mask that only looks like a window on the example (global tokens picked by an input) keeps
its causal mark but gets no band; a float mask with a finite fill gets neither.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.kernels.reference import flash_attention_reference
from attnopt.ops import ATTENTION_OP
from attnopt.ops.attention import kernel_window
from attnopt.ops.quantized import int8_qk_reference
from attnopt.policy import Policy
from canonical_calls import decoder_inputs, run_recorded

B, S, E, H, W = 2, 12, 32, 4, 4
TOL = 1e-5  # max |optimized - original|, fp32
EXACT = 1e-12  # float64 against a dense-mask reference


class WindowedDecoder(nn.Module):
    """One attention layer with a causal sliding window of W keys built the way Hugging Face
    builds it: from positions and (`padded`) an attention_mask input. `global_marker` (0 or 1):
    keys whose `token_types` equal it stay visible beyond the window (Longformer-style global
    keys; with 0, an example of zeros makes every key global).
    `fill`: None hands SDPA the boolean mask, a number fills masked scores with it."""

    def __init__(self, padded: bool = True, global_marker=None, fill=None):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.padded, self.global_marker, self.fill = padded, global_marker, fill

    def forward(self, x, attention_mask, token_types):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, E // H).permute(2, 0, 3, 1, 4)
        i = torch.arange(x.shape[1], device=x.device)[:, None]
        j = torch.arange(x.shape[1], device=x.device)[None, :]
        in_window = j > i - W
        if self.global_marker is not None:
            in_window = in_window | (token_types == self.global_marker)[:, None, :]  # (B, S, S)
        allowed = (j <= i) & in_window
        if self.padded:
            allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed.expand(x.shape[0], -1, -1)
        if self.fill is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
            out = torch.softmax(scores.masked_fill(~allowed[:, None], self.fill), -1) @ v
        return out.transpose(1, 2).reshape(x.shape)


def _inputs(batch: int, length: int, padded_rows: dict, global_keys=(), seed: int = 0):
    return decoder_inputs(batch, length, E, padded_rows, marked=global_keys, seed=seed)


def _optimize(model, example, policy="exact"):
    return attnopt.optimize(model, policy=policy, example_inputs=example, capture="whole")


_run = run_recorded


def _band(q_len, kv_len, causal, window_left):
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    keep = j >= i - window_left
    return keep & (j <= i) if causal else keep


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [True, False])
def test_op_window_is_a_band_of_keys(mask_kind, causal):
    """window_left w: query i sees keys i-w .. (i, or every later key without is_causal), on
    top of the mask; the kernels' (left, right) window means the same; so does the int8 op."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 10, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 10, 8, generator=generator, dtype=torch.float64)
            for _ in range(2))
    mask = {None: None,
            "bool": torch.rand(2, 1, 10, 10, generator=generator) > 0.3,
            "float": torch.randn(2, 1, 10, 10, generator=generator, dtype=torch.float64)}[mask_kind]
    if mask_kind == "bool":
        mask[..., torch.arange(10), torch.arange(10)] = True  # every row sees its own key
    band = _band(10, 10, causal, 3)
    dense = band if mask is None else (mask & band if mask.dtype == torch.bool
                                       else mask.masked_fill(~band, float("-inf")))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    got = ATTENTION_OP(q, k, v, mask, causal, None, True, None, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=EXACT)
    kernel_semantics = flash_attention_reference(q, k, v, causal=causal, attn_bias=mask,
                                                 window=kernel_window(k, 3))
    torch.testing.assert_close(kernel_semantics, expected, rtol=0, atol=EXACT)
    int8 = int8_qk_reference(q.float(), k.float(), v.float(), None if mask is None else
                             mask if mask.dtype == torch.bool else mask.float(), causal, None,
                             True, None, 3)
    int8_dense = int8_qk_reference(q.float(), k.float(), v.float(), dense if dense.dtype ==
                                   torch.bool else dense.float(), False, None, True)
    torch.testing.assert_close(int8, int8_dense, rtol=0, atol=TOL)


def test_op_window_aligns_top_left_when_lengths_differ():
    """As SDPA's is_causal: query i's band ends at key i and starts at i - window_left, whatever
    the key count; the kernels' window reads the same keys."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 6, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 10, 8, generator=generator, dtype=torch.float64)
            for _ in range(2))
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_band(6, 10, causal, 2))
        got = ATTENTION_OP(q, k, v, None, causal, None, False, None, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=EXACT)
        kernel_semantics = flash_attention_reference(q, k, v, causal=causal,
                                                     window=kernel_window(k, 2))
        torch.testing.assert_close(kernel_semantics, expected, rtol=0, atol=EXACT)


def test_op_window_with_softcap():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=generator, dtype=torch.float64)
               for _ in range(3))
    scores = 2.0 * torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(8) / 2.0)
    expected = torch.softmax(scores.masked_fill(~_band(9, 9, True, 2), float("-inf")), -1) @ v
    got = ATTENTION_OP(q, k, v, None, True, None, False, 2.0, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=EXACT)


def test_constant_window_mask_becomes_a_band_without_its_tensor():
    torch.manual_seed(0)
    model = WindowedDecoder(padded=False).eval()
    optimized = _optimize(model, _inputs(B, S, {}))
    (record,) = optimized.report.sites
    assert (record.site.mask_kind, record.site.window, record.site.window_band) == \
        ("window", W, True)
    inputs = _inputs(B, S, {}, seed=1)
    out, calls = _run(optimized, inputs)
    assert calls == [(True, False, W - 1)]
    assert (out - model(*inputs)).abs().max() <= TOL


@pytest.mark.parametrize("example_padding", [{}, {1: (0, 3)}])
def test_padded_window_mask_is_kept_and_the_call_gets_causal_and_band(example_padding):
    torch.manual_seed(0)
    model = WindowedDecoder().eval()
    optimized = _optimize(model, _inputs(B, S, example_padding))
    (record,) = optimized.report.sites
    assert record.site.mask_kind == ("window+padding" if example_padding else "window")
    assert record.site.window_band
    # fresh inputs, other padding on both sides: the mask's tensor still decides
    inputs = _inputs(B, S, {0: (0, 2), 1: (9, 12)}, seed=1)
    out, calls = _run(optimized, inputs)
    assert calls == [(True, True, W - 1)]
    assert (out - model(*inputs)).abs().max() <= TOL


def test_window_with_global_keys_from_an_input_gets_no_band():
    # no global key on the example, so the mask looks like a window there; random token_types
    # let keys outside the window through: causal by construction, a window not
    torch.manual_seed(0)
    model = WindowedDecoder(global_marker=1).eval()
    optimized = _optimize(model, _inputs(B, S, {1: (0, 3)}))
    (record,) = optimized.report.sites
    assert not record.site.window_band
    inputs = _inputs(B, S, {1: (0, 3)}, global_keys=(3, 4), seed=2)
    out, calls = _run(optimized, inputs)
    assert calls == [(True, True, None)]
    assert (out - model(*inputs)).abs().max() <= TOL


def test_float_window_mask_with_a_finite_fill_gets_neither_mark():
    # a left-padded row sees no key and averages over every key: a band would change which
    torch.manual_seed(0)
    model = WindowedDecoder(fill=torch.finfo(torch.float32).min).eval()
    optimized = _optimize(model, _inputs(B, S, {1: (0, 3)}))
    inputs = _inputs(B, S, {0: (0, 5)}, seed=1)
    out, calls = _run(optimized, inputs)
    assert calls == [(False, True, None)]
    assert (out - model(*inputs)).abs().max() <= TOL


def test_sparse_rewrites_leave_a_window_band_exact():
    torch.manual_seed(0)
    model = WindowedDecoder(padded=False).eval()
    policy = Policy("sparse-everything", default="sparse", default_params={"block": 16})
    optimized = _optimize(model, _inputs(B, S, {}), policy=policy)
    (record,) = optimized.report.sites
    assert record.rewrite == "exact" and "already runs as a band" in record.reason
    out, calls = _run(optimized, _inputs(B, S, {}, seed=3))
    assert calls == [(True, False, W - 1)]


@pytest.mark.parametrize("global_marker", [None, 1, 0])
def test_window_wider_than_a_dynamic_example_is_found_at_length(global_marker):
    # at the example's 3 tokens a window of 4 looks causal; the producer re-run at a long
    # length shows the window. Global keys escape it: with marker 1 as soon as token_types are
    # all on, with marker 0 only when they are drawn at random
    torch.manual_seed(0)
    model = WindowedDecoder(global_marker=global_marker).eval()
    global_tokens = global_marker is not None
    optimized = attnopt.optimize(model, policy="exact", example_inputs=_inputs(B, 3, {1: (0, 1)}),
                                 capture="whole", dynamic=True)
    (record,) = optimized.report.sites
    if global_tokens:
        assert (record.site.mask_kind, record.site.window_band) == ("causal+padding", False)
    else:
        assert (record.site.mask_kind, record.site.window) == ("window+padding", W)
        assert record.site.window_band
    inputs = _inputs(B, S, {1: (0, 3)}, global_keys=(2,) if global_tokens else (), seed=4)
    if global_marker == 0:
        inputs[2][:] = 1 - inputs[2]  # key 2 global, the rest local
    out, calls = _run(optimized, inputs)
    assert calls == [(True, True, None if global_tokens else W - 1)]
    assert (out - model(*inputs)).abs().max() <= TOL


def test_hf_mistral_window_wider_than_a_dynamic_example_gets_its_band():
    """Hugging Face's sdpa path, an example of 8 tokens under a window of 16, captured with
    dynamic lengths: the band is found at length and a 40-token padded batch matches."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        sliding_window=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    example = dict(input_ids=torch.randint(3, 100, (2, 8)), attention_mask=mask, use_cache=False)
    optimized = attnopt.optimize(model, policy="exact", example_kwargs=example, dynamic=True)
    assert [(r.site.mask_kind, r.site.window, r.site.window_band)
            for r in optimized.report.sites] == [("window+padding", 16, True)] * 2
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    fresh = dict(input_ids=torch.randint(3, 100, (2, 40)), attention_mask=mask, use_cache=False)
    with torch.no_grad():
        got, expected = optimized(**fresh).logits, model(**fresh).logits
    assert (got - expected)[mask.bool()].abs().max() <= TOL
