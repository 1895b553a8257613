"""ALiBi: a key-position bias fitted to per-head slopes, carried by the canonical call.

BLOOM, MPT and Falcon add `slope[h] * j` (key position j) to the scores of head h under a causal
mask; up to a constant per row that is the canonical op's `-slope[h] * |i - j|`, which the
kernel computes from the slopes instead of reading an (H, Sq, Sk) bias. These tests pin the
op's semantics against a float64 reference, the fit (`masks.fit_alibi`) on the forms models
write and its refusals, the rewrite of a constant causal ALiBi mask into slopes (exact on
fresh inputs), masks that must stay additive (padding, no causality, a bias that is ALiBi only
at the example length), the slopes following pruned and grouped heads, the approximate
rewrites leaving such sites exact, and the ONNX translations.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import attnopt  # noqa: E402
from attnopt import Policy, Rule  # noqa: E402
from attnopt.ops import ATTENTION_OP  # noqa: E402
from attnopt.passes.masks import allowed_positions, fit_alibi  # noqa: E402

from canonical_calls import CanonicalCalls  # noqa: E402

B, H, S, D = 2, 4, 16, 8
E = H * D
#: fp32 rewritten outputs against the original module's
FP32_TOL = 1e-5
#: fp16 op outputs against the float64 reference on the same (rounded) inputs
FP16_TOL = 2e-3
SLOPES = tuple(2.0 ** (-8 * (h + 1) / H) for h in range(H))


def _dense_alibi_reference(q, k, v, slopes, *, causal, mask=None):
    """float64 attention with `-slopes[h] * |i - j|` spelled out."""
    q, k, v = (t.double() for t in (q, k, v))
    rows, cols = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores - slopes.double().reshape(-1, q.shape[1], 1, 1) * (rows - cols).abs()
    if causal:
        scores = scores.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask.double()
    return torch.softmax(scores, -1) @ v


# --------------------------------------------------------------------------------------------
# the op


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_op_adds_minus_slope_times_distance(dtype, tol, causal, mask_kind):
    seed = sum(map(ord, f"{dtype}{causal}{mask_kind}"))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=generator).to(dtype) for _ in range(3))
    slopes = torch.rand(H, generator=generator)
    mask = {None: None, "bool": torch.rand(B, 1, S, S, generator=generator) > 0.3,
            "float": torch.randn(B, 1, S, S, generator=generator)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # every row sees a key
    expected = _dense_alibi_reference(q, k, v, slopes, causal=causal, mask=mask)
    actual = torch.ops.attnopt.attention(q, k, v, mask, causal, None, False, None, None, slopes)
    assert actual.dtype == dtype
    assert (actual.double() - expected).abs().max().item() <= tol


def test_op_takes_slopes_per_batch_and_head():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, generator=generator) for _ in range(3))
    slopes = torch.rand(B, H, generator=generator)
    expected = torch.cat([_dense_alibi_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], slopes[b],
                                                 causal=True) for b in range(B)])
    actual = torch.ops.attnopt.attention(q, k, v, None, True, None, False, None, None, slopes)
    assert (actual.double() - expected).abs().max().item() <= FP32_TOL


def test_causal_distance_bias_equals_the_key_position_bias_models_write():
    """Under a causal mask, -s|i - j| and BLOOM's s·j differ by s·i per row: same output."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, S, D, generator=generator) for _ in range(3))
    slopes = torch.tensor(SLOPES)
    key_bias = slopes[:, None, None] * torch.arange(S)  # (H, 1, S)
    causal = torch.full((S, S), float("-inf")).triu(1)
    written = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias + causal)
    canonical = torch.ops.attnopt.attention(q, k, v, None, True, None, False, None, None, slopes)
    assert (written - canonical).abs().max().item() <= FP32_TOL


# --------------------------------------------------------------------------------------------
# the fit


def _fit(mask):
    return fit_alibi(mask, allowed_positions(mask)[0])


def _causal_key_bias(slopes=SLOPES, dtype=torch.float32, fill=None):
    fill = torch.finfo(dtype).min if fill is None else fill
    bias = torch.tensor(slopes)[:, None, None] * torch.arange(S)
    return (bias + torch.full((S, S), fill).triu(1))[None].to(dtype)


def test_fit_finds_the_slopes_of_a_causal_key_bias():
    assert _fit(_causal_key_bias()) == pytest.approx(SLOPES, rel=1e-6)
    # MPT's form: positions counted from the last key (1 - S .. 0), -inf above the diagonal
    mpt = torch.tensor(SLOPES)[:, None, None] * torch.arange(1 - S, 1) + \
        torch.full((S, S), float("-inf")).triu(1)
    assert _fit(mpt[None]) == pytest.approx(SLOPES, rel=1e-6)
    # a row constant on top (Falcon scales the bias with the scores) does not matter
    shifted = _causal_key_bias() + torch.randn(1, H, S, 1)
    assert _fit(shifted) == pytest.approx(SLOPES, rel=1e-5)


def test_fit_takes_a_half_precision_bias_only_where_it_holds_the_line_exactly():
    """In bfloat16, slope·j is exact for these slopes up to 256 keys; BLOOM's 0.707·j rounded
    to bfloat16 beyond that is off the line by up to a unit of 4: exact slopes would move the
    scores that much, so that bias stays additive."""
    assert _fit(_causal_key_bias(dtype=torch.bfloat16)) == pytest.approx(SLOPES, rel=1e-6)
    seq, slope = 1024, 2 ** -0.5
    rounded = (slope * torch.arange(seq)).to(torch.bfloat16) + \
        torch.full((seq, seq), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16).triu(1)
    assert _fit(rounded[None, None]) is None
    assert _fit(rounded[None, None, :200, :200]) is None  # 0.707 is no bfloat16: off already
    exact = (slope * torch.arange(seq)) + torch.full((seq, seq), -1e30).triu(1)
    assert _fit(exact[None, None]) == pytest.approx((slope,), rel=1e-6)


def test_fit_refuses_what_is_not_alibi():
    perturbed = _causal_key_bias()
    perturbed[0, 1, 9, 4] += 0.05
    assert _fit(perturbed) is None
    # a learned per-head bias (T5) with a causal mask
    learned = torch.randn(1, H, S, S) + torch.full((S, S), -1e9).triu(1)
    assert _fit(learned) is None
    assert _fit(_causal_key_bias(slopes=(0.0,) * H)) is None  # no slope: not a position bias
    assert _fit(torch.randn(S, S)) is None                    # no heads axis


# --------------------------------------------------------------------------------------------
# classification and canonicalization


class CausalKeyBias(nn.Module):
    """BLOOM's bias without padding: slope·j built from shapes and constants, a causal fill."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        slopes = 2.0 ** (-8 * torch.arange(1, H + 1, dtype=q.dtype) / H)
        bias = slopes[:, None, None] * torch.arange(s, dtype=q.dtype)
        causal = torch.full((s, s), torch.finfo(q.dtype).min).triu(1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias + causal
        return torch.softmax(scores, -1) @ v


class PaddedKeyBias(nn.Module):
    """With an attention_mask: the bias and the fill depend on an input (left padding)."""

    def forward(self, q, k, v, attention_mask):
        s = q.shape[-2]
        slopes = 2.0 ** (-8 * torch.arange(1, H + 1, dtype=q.dtype) / H)
        positions = (attention_mask.cumsum(-1) - 1) * attention_mask
        bias = slopes[None, :, None, None] * positions[:, None, None, :].to(q.dtype)
        keep = torch.ones(s, s, dtype=torch.bool).tril() & attention_mask[:, None, None, :].bool()
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
        scores = scores.masked_fill(~keep, torch.finfo(q.dtype).min)
        return torch.softmax(scores, -1) @ v


class BidirectionalKeyBias(nn.Module):
    """slope·j without a causal mask: not ALiBi's distance (later keys would be favoured)."""

    def forward(self, q, k, v):
        slopes = 2.0 ** (-torch.arange(1, H + 1, dtype=q.dtype))
        bias = slopes[:, None, None] * torch.arange(q.shape[-2], dtype=q.dtype)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, -1) @ v


class ClampedKeyBias(CausalKeyBias):
    """A key bias that stops growing after 20 keys: ALiBi at an example of 16, not beyond."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        slopes = 2.0 ** (-8 * torch.arange(1, H + 1, dtype=q.dtype) / H)
        bias = slopes[:, None, None] * torch.arange(s, dtype=q.dtype).clamp(max=20)
        causal = torch.full((s, s), torch.finfo(q.dtype).min).triu(1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias + causal
        return torch.softmax(scores, -1) @ v


def _qkv(seq=S, generator=None):
    return tuple(torch.randn(B, H, seq, D, generator=generator) for _ in range(3))


def _canonical_calls(optimized):
    graphs = [r.rewritten for r in optimized._attnopt_state.whole_regions]
    return [n for g in graphs for n in g.graph.nodes if n.target is ATTENTION_OP]


def test_constant_causal_alibi_becomes_slopes_and_no_mask():
    model = CausalKeyBias().eval()
    optimized = attnopt.optimize(model, "exact", example_inputs=_qkv())
    (record,) = optimized.report.sites
    assert (record.site.mask_kind, record.site.alibi, record.rewrite) == ("causal", True, "exact")
    assert "causal+alibi" in str(optimized.report)
    (call,) = _canonical_calls(optimized)
    assert call.args[3] is None and call.args[4] is True
    slopes = getattr(call.graph.owning_module, call.args[9].target)
    assert slopes.tolist() == pytest.approx([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    fresh = _qkv(generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), CanonicalCalls() as calls:
        actual = optimized(*fresh)
    assert calls.alibi == [True]
    assert (actual - model(*fresh)).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("module", [PaddedKeyBias, BidirectionalKeyBias])
def test_biases_that_are_not_constant_causal_alibi_stay_additive(module):
    model = module().eval()
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :5] = 0
    examples = _qkv() + ((padding,) if module is PaddedKeyBias else ())
    optimized = attnopt.optimize(model, "exact", example_inputs=examples)
    (record,) = optimized.report.sites
    assert (record.site.mask_kind, record.site.alibi) == ("additive", False)
    (call,) = _canonical_calls(optimized)
    assert call.args[3] is not None and len(call.args) < 10
    with torch.no_grad():
        assert (optimized(*examples) - model(*examples)).abs().max().item() <= FP32_TOL


def test_a_bias_that_is_alibi_only_at_the_example_length_stays_additive():
    """Captured with dynamic lengths, the mask is re-fitted at length: the clamp shows there."""
    model = ClampedKeyBias().eval()
    optimized = attnopt.optimize(model, "exact", example_inputs=_qkv(), dynamic=True)
    (record,) = optimized.report.sites
    assert (record.site.mask_kind, record.site.alibi) == ("additive", False)
    longer = _qkv(seq=32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (optimized(*longer) - model(*longer)).abs().max().item() <= FP32_TOL


def test_dynamic_capture_keeps_slopes_that_hold_at_length():
    model = CausalKeyBias().eval()
    optimized = attnopt.optimize(model, "exact", example_inputs=_qkv(), dynamic=True)
    assert [r.site.alibi for r in optimized.report.sites] == [True]
    longer = _qkv(seq=40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (optimized(*longer) - model(*longer)).abs().max().item() <= FP32_TOL


def test_approximate_policies_leave_alibi_sites_exact():
    model = CausalKeyBias().eval()
    optimized = attnopt.optimize(model, Policy("sparse-all", rules=[
        Rule("sparse", params={"pattern": "window", "block": 16})]), example_inputs=_qkv())
    (record,) = optimized.report.sites
    assert record.rewrite == "exact" and "ALiBi" in record.reason


# --------------------------------------------------------------------------------------------
# heads surgery and ONNX


class CausalALiBiBlock(nn.Module):
    """Projections around a causal ALiBi attention (for head pruning and GQA pooling)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        slopes = 2.0 ** (-torch.arange(1, H + 1, dtype=x.dtype))
        bias = slopes[:, None, None] * torch.arange(s, dtype=x.dtype)
        causal = torch.full((s, s), float("-inf")).triu(1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + causal)
        return self.o(y.transpose(1, 2).reshape(b, s, E))


def _x(generator=None):
    return torch.randn(B, S, E, generator=generator)


def test_slopes_follow_pruned_and_grouped_heads(tmp_path):
    """Heads 1 and 3 silenced, then pruned: the kept heads keep their own slopes; heads tied
    in pairs (0, 2), (1, 3), then pooled: the permuted query heads take theirs along."""
    torch.manual_seed(0)
    model = CausalALiBiBlock().eval()
    with torch.no_grad():
        for head in (1, 3):
            model.o.weight[:, head * D:(head + 1) * D] = 0
    x = _x()
    pruned = attnopt.optimize(model, Policy("prune", weights=[
        Rule("prune_heads", params={"fraction": 0.5})]), example_inputs=(x,))
    weights = pruned.report.sites[0].approximation["weights"]
    assert weights["prune_heads"]["kept"] == [0, 2]
    torch.manual_seed(1)
    model_2 = CausalALiBiBlock().eval()
    with torch.no_grad():
        for a, b in ((0, 2), (1, 3)):
            for projection in (model_2.k, model_2.v):
                projection.weight[b * D:(b + 1) * D] = projection.weight[a * D:(a + 1) * D]
                projection.bias[b * D:(b + 1) * D] = projection.bias[a * D:(a + 1) * D]
    grouped = attnopt.optimize(model_2, Policy("gqa", weights=[
        Rule("gqa", params={"kv_heads": 2, "grouping": "best"})]), example_inputs=(x,))
    gqa = grouped.report.sites[0].approximation["weights"]["gqa"]
    assert gqa["grouping"] == "clustered" and gqa["errors"]["clustered"] < 1e-6
    fresh = _x(torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (pruned(fresh) - model(fresh)).abs().max().item() <= FP32_TOL
        assert (grouped(fresh) - model_2(fresh)).abs().max().item() <= FP32_TOL
    assert [r.site.alibi for r in pruned.report.sites + grouped.report.sites] == [True, True]


@pytest.mark.parametrize("opset,target", [(18, "onnx"), (23, "onnx"), (18, "ort")])
def test_alibi_sites_export_to_onnx(opset, target, tmp_path):
    torch.manual_seed(0)
    model = CausalALiBiBlock().eval()
    x = _x()
    optimized = attnopt.optimize(model, example_inputs=(x,))
    assert [r.site.alibi for r in optimized.report.sites] == [True]
    result = attnopt.export_onnx(optimized, tmp_path / "alibi.onnx", example_inputs=(x,),
                                 opset=opset, target=target)
    assert result.passed, result


# --------------------------------------------------------------------------------------------
# CUDA: the op on the kernel, forward and backward

#: bf16 kernel outputs and gradients against the float32 reference
BF16_TOL = 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_op_with_slopes_runs_the_kernel_forward_and_backward(monkeypatch):
    import attnopt.kernels.flash as flash
    from attnopt.ops.attention import attention_reference
    monkeypatch.delenv("ATTNOPT_KERNELS", raising=False)  # the default mode picks the kernel
    calls = []
    original = flash.flash_forward
    monkeypatch.setattr(flash, "flash_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    generator = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", generator=generator,
                           dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    slopes = torch.tensor(SLOPES, device="cuda")
    out = torch.ops.attnopt.attention(q, k, v, None, True, None, False, None, None, slopes)
    assert calls
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q32, k32, v32, None, True, None, False, None, None, slopes)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad.float())
    assert (out.float() - expected).abs().max().item() <= BF16_TOL
    for got, want in zip(grads, expected_grads):
        assert (got.float() - want).abs().max().item() <= BF16_TOL * max(1.0, want.abs().max())


# --------------------------------------------------------------------------------------------
# a float32 bias on half-precision scores


class WideBias(nn.Module):
    """A learned float32 bias added to bfloat16 scores: the sum is float32, as in MPT."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, S, S) * 100)  # scores of hundreds

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + self.bias
        return torch.softmax(scores.float(), -1).to(v.dtype) @ v


def test_a_float32_bias_on_half_precision_scores_stays_float32():
    """Rounded to bfloat16 the bias would be off by up to 0.5 at 100: the canonical mask keeps
    float32, and the rewrite agrees with the original."""
    model = WideBias().eval()
    examples = tuple(t.to(torch.bfloat16) for t in _qkv())
    optimized = attnopt.optimize(model, "exact", example_inputs=examples)
    (call,) = _canonical_calls(optimized)
    assert call.args[3].meta["val"].dtype == torch.float32
    assert optimized.report.verification["passed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on CUDA")
def test_a_float32_bias_on_half_precision_scores_runs_the_kernel_on_cuda():
    """SDPA has no fused kernel for a float32 bias on bfloat16 q (the reference runs it
    unfused): the default mode sends the call to the kernel, which adds it in float32."""
    from attnopt.ops.attention import KERNEL_BACKEND
    heads, seq, head_dim = 4, 64, 64  # (the kernel takes head dims from 16)

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.randn(heads, seq, seq, device="cuda") * 100)

        def forward(self, q, k, v):
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + self.bias
            return torch.softmax(scores.float(), -1).to(v.dtype) @ v
    generator = torch.Generator(device="cuda").manual_seed(0)
    examples = tuple(torch.randn(2, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16,
                                 generator=generator) for _ in range(3))
    optimized = attnopt.optimize(Biased().eval(), "exact", example_inputs=examples)
    assert [r.backend for r in optimized.report.sites] == [KERNEL_BACKEND]
    assert optimized.report.verification["passed"]


def test_mpt_in_bfloat16_carries_its_float32_alibi_as_slopes():
    """MPT adds a float32 ALiBi to bfloat16 scores; at 300 keys rounding it to bfloat16 moves
    scores by up to 1 (verification failed that way). Fitted from float32, it is exact."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                                    max_seq_len=512, expansion_ratio=2,
                                    attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(config).to(torch.bfloat16).eval()
    inputs = dict(input_ids=torch.randint(0, 100, (1, 300)), use_cache=False)
    optimized = attnopt.optimize(model, "exact", example_kwargs=inputs)
    assert [(r.site.mask_kind, r.site.alibi) for r in optimized.report.sites] == \
        [("causal", True)] * 2
    assert optimized.report.verification["passed"]
