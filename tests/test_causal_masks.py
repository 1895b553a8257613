"""Masks that are causal by construction: the canonical call keeps the mask and is marked causal.

A decoder's mask is causal and carries the padding of an attention_mask input. Classification
proves the causality by re-evaluating the mask's producer with random attention masks; then
canonicalization emits `attention(q, k, v, mask, is_causal=True)`: the same result (both apply),
and on CUDA the kernel skips the key blocks above the diagonal. A mask that only looks causal
on the example (a prefix-LM mask whose prefix comes from an input) must not be marked.
"""

from __future__ import annotations

import math
import sys

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


def _later_keys_hidden(batch: int, length: int, fill, padded: dict = ()):
    """A decoder's (B, 1, S, S) mask as HF builds it: `fill` (False for a boolean mask) on the
    keys after each query and on the padded keys `padded` (row -> key range)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril().repeat(batch, 1, 1, 1)
    for row, (start, end) in dict(padded).items():
        allowed[row, ..., start:end] = False
    if fill is False:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, fill)


@pytest.mark.parametrize("fill, padded, is_causal, expected", [
    (torch.finfo(torch.float32).min, (), False, True),    # HF eager, unpadded batch
    (float("-inf"), (), False, True),
    (False, (), True, True),                              # HF sdpa's mask, marked causal
    (False, (), False, True),
    (torch.finfo(torch.float32).min, {1: (0, 3)}, False, None),    # left padding
    (False, {0: (10, 12)}, True, None),                   # right padding
    (-1e4, (), False, None),                              # a finite fill: not hidden
])
def test_mask_that_hides_only_later_keys_is_redundant(fill, padded, is_causal, expected):
    from attnopt.ops.attention import redundant_mask
    q = k = torch.randn(2, 4, 12, 8)
    mask = _later_keys_hidden(2, 12, fill, padded)
    assert redundant_mask(q, k, mask, is_causal) is expected
    if expected and not is_causal:  # showing a later key is not causal attention
        shown = mask.clone()
        shown[0, 0, 2, 7] = True if fill is False else 0.0
        assert redundant_mask(q, k, shown, is_causal) is None


@pytest.mark.parametrize("is_causal", [False, True])
def test_mask_that_hides_no_key_is_redundant(is_causal):
    """An encoder's (or cross-attention's) mask of an unpadded batch: the call keeps its own
    causality, at any lengths; one hidden key keeps the mask."""
    from attnopt.ops.attention import redundant_mask
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8)
    for shown, hidden in ((torch.ones(2, 1, 1, 10, dtype=torch.bool), False),
                          (torch.zeros(2, 1, 1, 10), torch.finfo(torch.float32).min)):
        assert redundant_mask(q, k, shown, is_causal) is is_causal
        assert redundant_mask(k, k, shown, is_causal) is is_causal
        padded = shown.clone()
        padded[1, ..., 9] = hidden
        assert redundant_mask(q, k, padded, is_causal) is None


def test_mask_broadcast_over_queries_skips_the_causal_check(monkeypatch):
    """An encoder's padding mask, as HF's eager models expand it ((B, 1, 1, S) viewed as
    (B, 1, S, S), stride 0 over queries), is the same for every query: it hides exactly the
    later keys only if it hides none, so the causal check (its extra kernels) is not built."""
    op_module = sys.modules["attnopt.ops.attention"]
    checks = []
    band_keep = op_module.band_keep
    monkeypatch.setattr(op_module, "band_keep", lambda *a: checks.append(1) or band_keep(*a))
    q = k = torch.randn(2, 4, 6, 8)
    for is_causal in (False, True):
        shown = torch.zeros(2, 1, 1, 6).expand(2, 1, 6, 6)
        assert op_module.redundant_mask(q, k, shown, is_causal) is is_causal
        padded = torch.zeros(2, 1, 1, 6)
        padded[1, ..., 5] = torch.finfo(torch.float32).min
        assert op_module.redundant_mask(q, k, padded.expand(2, 1, 6, 6), is_causal) is None
    assert checks == []
    assert op_module.redundant_mask(q, k, _later_keys_hidden(2, 6, False), False) is True
    assert checks == [1]  # a mask that varies over queries is checked


def test_redundant_mask_is_read_once_per_version(monkeypatch):
    op_module = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)
    checks = []
    band_keep = op_module.band_keep
    monkeypatch.setattr(op_module, "band_keep", lambda *a: checks.append(1) or band_keep(*a))
    q = k = torch.randn(1, 2, 8, 4)
    mask = _later_keys_hidden(1, 8, torch.finfo(torch.float32).min)
    assert op_module.redundant_mask(q, k, mask, False) is True
    assert op_module.redundant_mask(q, k, mask, False) is True and len(checks) == 1
    assert op_module.redundant_mask(q, k, mask, True) is True and len(checks) == 2  # (its own)
    mask[0, 0, 5, :3] = torch.finfo(torch.float32).min  # padding written in place: read again
    assert op_module.redundant_mask(q, k, mask, False) is None and len(checks) == 3
    del mask
    assert not op_module._MASK_ANSWERS  # gone with the mask
    # not for a mask that needs a gradient, or a call with a window
    grad_mask = _later_keys_hidden(1, 8, float("-inf")).requires_grad_()
    assert op_module.redundant_mask(q, k, grad_mask, False) is None
    assert op_module.redundant_mask(q, k, _later_keys_hidden(1, 8, False), True, 3) is None


def test_unpadded_decoder_mask_runs_as_plain_causal_attention_on_cpu(monkeypatch):
    """The op drops an unpadded batch's mask on the CPU too: SDPA runs causal attention alone,
    with the result of the masked call; a padded batch keeps its mask."""
    op_module = sys.modules["attnopt.ops.attention"]
    seen = []
    reference = op_module.attention_reference
    monkeypatch.setattr(op_module, "attention_reference",
                        lambda *a: seen.append((a[3] is None, a[4])) or reference(*a))
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    for padded, dropped in (((), True), ({1: (0, 5)}, False)):
        mask = _later_keys_hidden(2, 16, torch.finfo(torch.float32).min, padded)
        seen.clear()
        got = ATTENTION_OP(q, k, v, mask, False, None, False)
        assert seen == [(dropped, dropped)]
        expected = reference(q.double(), k.double(), v.double(), mask.double())
        assert (got.double() - expected)[..., 5:, :].abs().max() <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA implementation")
@pytest.mark.parametrize("kernels", ["auto", "always"])
def test_unpadded_decoder_mask_runs_as_plain_causal_attention(kernels, monkeypatch):
    """On CUDA an unpadded batch's mask is dropped: SDPA (or the kernel) runs causal attention
    alone, with the result of the masked call; a padded batch keeps its mask."""
    import attnopt.kernels.flash as flash
    op_module = sys.modules["attnopt.ops.attention"]
    monkeypatch.setenv("ATTNOPT_KERNELS", kernels)
    seen = []
    reference, forward = op_module.attention_reference, flash.flash_forward
    monkeypatch.setattr(op_module, "attention_reference",
                        lambda *a: seen.append((a[3] is None, a[4])) or reference(*a))
    monkeypatch.setattr(flash, "flash_forward",
                        lambda q, k, v, p: seen.append((p.bias_BHSS is None, p.has_right))
                        or forward(q, k, v, p))
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    for padded, dropped in (((), True), ({1: (0, 40)}, False)):
        mask = _later_keys_hidden(2, 256, torch.finfo(torch.float32).min, padded).to(
            "cuda", torch.bfloat16)
        seen.clear()
        got = ATTENTION_OP(q, k, v, mask, False, None, False)
        assert seen == [(dropped, dropped)]
        expected = reference(q.float(), k.float(), v.float(), mask.float())
        rows = slice(40, None)  # (left-padded rows that see no key differ between backends)
        assert (got.float() - expected)[..., rows, :].abs().max() <= 2e-2


def test_decoder_layers_share_one_mask_checked_once_per_forward(monkeypatch):
    """A rewritten eager decoder hands every layer the same mask tensor (no copy per site), so
    an unpadded batch's mask is checked once per forward and dropped in every layer. (The
    graph's unpadded copy, which drops the masks before they are built, is off here: this is
    the op's own check, which padded calls and compiled graphs still rely on.)"""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("ATTNOPT_UNPADDED", "0")
    from torch.utils._python_dispatch import TorchDispatchMode
    op_module = sys.modules["attnopt.ops.attention"]
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (2, 12)),
              "attention_mask": torch.ones(2, 12, dtype=torch.long), "use_cache": False}
    optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
    masks, checks, dropped = [], [], []

    class Masks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == ATTENTION_OP:
                masks.append(args[3])
            return func(*args, **(kwargs or {}))
    band_keep, reference = op_module.band_keep, op_module.attention_reference
    monkeypatch.setattr(op_module, "band_keep", lambda *a: checks.append(1) or band_keep(*a))
    monkeypatch.setattr(op_module, "attention_reference",
                        lambda *a: dropped.append(a[3] is None and a[4]) or reference(*a))
    with torch.no_grad(), Masks():
        out = optimized(**kwargs).logits
    assert len(masks) == 3 and all(mask is masks[0] for mask in masks)
    assert len(checks) == 1 and dropped == [True] * 3
    with torch.no_grad():
        assert (out - model(**kwargs).logits).abs().max() <= TOL


def test_finite_floor_raises_the_lowest_values_and_keeps_minus_infinity():
    op_module = sys.modules["attnopt.ops.attention"]
    low = torch.finfo(torch.float32).min
    mask = torch.tensor([[0.0, -5.0, low], [float("-inf"), low, -1e30]])
    floored = op_module.finite_floor(mask)
    expected = torch.tensor([[0.0, -5.0, op_module.MIN_FINITE_BIAS],
                             [float("-inf"), op_module.MIN_FINITE_BIAS, -1e30]])
    assert torch.equal(floored, expected)
    assert op_module.finite_floor(mask) is floored  # kept for the layers sharing the mask
    mask[0, 0] = low  # written in place: floored again
    assert op_module.finite_floor(mask)[0, 0] == op_module.MIN_FINITE_BIAS
    half = torch.full((2, 3), torch.finfo(torch.float16).min, dtype=torch.float16)
    assert op_module.finite_floor(half) is half  # float16 cannot hold values that overflow
    bfloat = torch.full((2, 3), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
    assert (op_module.finite_floor(bfloat) == op_module.MIN_FINITE_BIAS).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's fused CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_hidden_by_the_lowest_float_average_uniformly_on_cuda(dtype):
    """A left-padded causal batch's first rows see only padding: with the mask written in the
    dtype's lowest value, eager softmax averages those rows uniformly. The op on CUDA (SDPA's
    fused kernels, which scale the mask by log2 e) gives the same, as on the CPU."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(2, 2, 64, 32, device="cuda", dtype=dtype, generator=gen)
               for _ in range(3))
    low = torch.finfo(dtype).min
    causal = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril()
    keep = causal & (torch.arange(64, device="cuda") >= 5)  # batch-wide left padding of 5
    mask = torch.zeros(2, 1, 64, 64, device="cuda", dtype=dtype).masked_fill(~keep, low)
    scores = (q.float() @ k.float().transpose(-1, -2)) * 32 ** -0.5 + mask.float()
    expected = torch.softmax(scores, -1) @ v.float()
    out = ATTENTION_OP(q, k, v, mask)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - expected).abs().max().item() <= tolerance
    hidden_rows = out[:, :, :5].float()
    assert (hidden_rows - v.float().mean(-2, keepdim=True)).abs().max().item() <= tolerance
