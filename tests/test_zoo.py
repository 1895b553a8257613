"""Every hand-written attention form in the zoo is found, canonicalized and exact."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.ops import ATTENTION_OP
from zoo import MASK_KINDS, NEGATIVES, ZOO, _qkv

#: fp32 outputs of rewritten zoo modules must match the originals this closely.
FP32_MAX_ABS_ERR = 1e-5


def _canonical_calls(optimized) -> int:
    graphs = [r.rewritten for r in optimized._attnopt_state.whole_regions]
    return sum(1 for g in graphs for n in g.graph.nodes if n.target is ATTENTION_OP)


@pytest.mark.parametrize("case", sorted(ZOO))
def test_zoo_case_is_found_rewritten_and_exact(case):
    torch.manual_seed(0)
    make, inputs, expected_sites = ZOO[case]
    model = make()
    examples = inputs()
    optimized = attnopt.optimize(model, "exact", example_inputs=examples)
    report = optimized.report
    rewritten = [s for s in report.sites if s.rewrite == "exact"]
    assert len(rewritten) == expected_sites, str(report)
    assert _canonical_calls(optimized) == expected_sites
    if case in MASK_KINDS:
        assert {s.site.mask_kind for s in rewritten} == {MASK_KINDS[case]}, str(report)
    fresh = inputs()  # fresh random draw, not the examples
    with torch.no_grad():
        expected, actual = model(*fresh), optimized(*fresh)
    for e, a in zip(torch.utils._pytree.tree_leaves(expected),
                    torch.utils._pytree.tree_leaves(actual)):
        assert (e - a).abs().max().item() <= FP32_MAX_ABS_ERR
    for record in rewritten:
        assert record.max_abs_err is not None and record.max_abs_err <= FP32_MAX_ABS_ERR


@pytest.mark.parametrize("case", sorted(NEGATIVES))
def test_negative_case_is_left_alone_with_reason(case):
    make, reason = NEGATIVES[case]
    model = make()
    optimized = attnopt.optimize(model, "exact", example_inputs=_qkv())
    assert not [s for s in optimized.report.sites if s.rewrite != "none"]
    assert _canonical_calls(optimized) == 0
    if reason:
        assert any(reason in s.reason for s in optimized.report.sites), str(optimized.report)
    else:
        assert "no attention sites found" in str(optimized.report)


def test_site_description_of_gqa_projected_block():
    model = ZOO["bshd_layout"].make()
    (site,) = attnopt.inspect(model, ZOO["bshd_layout"].inputs())
    assert (site.batch, site.heads, site.kv_heads, site.q_len, site.head_dim) == (2, 4, 4, 8, 8)
    assert site.layout == "BSHD"
    assert site.projections["q"].weight == "qkv.weight" and site.projections["q"].packed
    assert site.projections["out"].weight == "out.weight"
    assert site.scale == pytest.approx(8 ** -0.5)

    (gqa,) = attnopt.inspect(ZOO["gqa_expand_reshape"].make(), _qkv())
    assert (gqa.heads, gqa.kv_heads, gqa.gqa_group) == (4, 1, 4)


def test_sliding_window_is_classified_with_its_width():
    (site,) = attnopt.inspect(ZOO["sliding_window"].make(), _qkv())
    assert site.mask_kind == "window" and site.window == 3


def test_constant_causal_mask_becomes_is_causal():
    optimized = attnopt.optimize(ZOO["materialized_causal"].make(), example_inputs=_qkv())
    (region,) = optimized._attnopt_state.whole_regions
    (call,) = [n for n in region.rewritten.graph.nodes if n.target is ATTENTION_OP]
    q, k, v, mask, is_causal, scale, enable_gqa = call.args
    assert mask is None and is_causal is True


def test_mha_module_paths_name_the_layer():
    model = ZOO["transformer_encoder"].make()
    sites = attnopt.inspect(model, ZOO["transformer_encoder"].inputs())
    assert [s.module_path for s in sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [s.layer_index for s in sites] == [0, 1]


HALF_CASES = ["matmul_divide_padding", "upcast_softmax", "gqa_expand_reshape", "bmm_merged_heads",
              "where_finfo_min", "transformer_encoder"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_zoo_case_in_half_precision(case, dtype):
    """Rewritten half-precision attention agrees with the original within the dtype's named
    tolerance (attnopt.verify.TOLERANCES), relative to a float64 run of the same module."""
    from attnopt.verify import tolerance_for
    torch.manual_seed(0)
    make, inputs, expected_sites = ZOO[case]
    model = make().to(dtype)
    examples = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs())
    optimized = attnopt.optimize(model, example_inputs=examples)
    assert len(optimized.report.rewritten) == expected_sites
    fresh = inputs()
    with torch.no_grad():
        reference = model.double()(*fresh_as(fresh, torch.float64))
        model.to(dtype)
        actual = optimized(*fresh_as(fresh, dtype))
    tolerance = tolerance_for(dtype)
    torch.testing.assert_close(actual.double(), reference, atol=4 * tolerance.atol,
                               rtol=4 * tolerance.rtol)


def fresh_as(tensors, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


class ProbabilitiesStoredOnModule(torch.nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1)
        self.last_probs = probs  # stored: a captured graph would drop this
        return probs @ v


def test_probabilities_stored_on_the_module_are_left_alone():
    model = ProbabilitiesStoredOnModule()
    optimized = attnopt.optimize(model, example_inputs=_qkv())
    assert not optimized.report.rewritten
    assert "assigns tensor attribute(s) self.last_probs" in optimized.report.capture["reason"]
    q, k, v = _qkv()
    optimized(q, k, v)
    assert model.last_probs.shape == (2, 4, 8, 8)  # the side effect still happens


class WideSlidingWindow(torch.nn.Module):
    """A causal window of 16 keys: at the example length 8 it looks exactly causal."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        i = torch.arange(s, device=q.device)[:, None]
        j = torch.arange(s, device=q.device)[None, :]
        allowed = (j <= i) & (j > i - 16)
        scores = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v


def test_window_wider_than_the_example_is_not_mistaken_for_causal():
    model = WideSlidingWindow()
    optimized = attnopt.optimize(model, example_inputs=_qkv(), dynamic=True)
    (record,) = optimized.report.rewritten
    assert (record.site.mask_kind, record.site.window) == ("window", 16)
    (region,) = optimized._attnopt_state.whole_regions
    (call,) = [n for n in region.rewritten.graph.nodes if n.target is ATTENTION_OP]
    # the mask is gone: the call is causal with a window band of 16 keys
    assert call.args[3] is None and call.args[4] is True and call.args[8] == 15
    long_inputs = tuple(torch.randn(2, 4, 40, 8) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(optimized(*long_inputs), model(*long_inputs),
                                   atol=1e-5, rtol=1e-5)


def test_a_learned_bias_that_is_zero_still_trains_through_the_rewrite():
    """A zero-initialized bias table is kept as the canonical call's mask, so its gradient
    flows as in the original module (dropping it as an empty mask would freeze it)."""
    from zoo import ZeroLearnedBias
    torch.manual_seed(0)
    model = ZeroLearnedBias()
    optimized = attnopt.optimize(model, "exact", example_inputs=_qkv())
    q, k, v = (t.requires_grad_() for t in _qkv())
    optimized(q, k, v).pow(2).sum().backward()
    through_rewrite = model.table.grad.clone()
    model.table.grad = None
    model(q, k, v).pow(2).sum().backward()
    assert through_rewrite.abs().max().item() > 0
    assert (through_rewrite - model.table.grad).abs().max().item() <= FP32_MAX_ABS_ERR
