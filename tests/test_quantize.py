"""int8 projections: the `attnopt.int8_linear` op and the pass that installs it.

The op is checked against a float64 evaluation of its definition (weights and activations
dequantized, then a float matmul): the CPU fbgemm kernel of dynamic mode must agree with it to
float round-off, which is what makes PyTorch and onnxruntime agree too. The pass is checked on
every projection form of test_weights.py in both modes: which projections were quantized, the
bytes saved, the error against the float model, and the ONNX export running in onnxruntime.
"""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt import Policy
from attnopt.ops.int8 import (
    DYNAMIC_WEIGHT_MAX, INT8_MAX, dynamic_activation_qparams, quantize_weight,
)
from attnopt.policy import Rule

from test_weights import E, FORMS, _model, _weights, _x

#: float32 round-off of a K=256 matmul against float64.
ROUNDOFF = 1e-5
#: Normwise error int8 projections may add to these unit-scale models (measured ~0.5% for
#: weight-only, ~1.5% for dynamic; see docs/COMPRESSION.md).
QUANTIZATION_REL_ERR = 0.04


def int8_policy(**params) -> Policy:
    return Policy("int8-test", weights=[Rule("int8", params=params)])


def _definition(x, weight_int8, scale, bias, dynamic):
    """The op's definition in float64."""
    weight = weight_int8.double() * scale.double()[:, None]
    x = x.double()
    if dynamic:
        x_scale, zero = (t.double() for t in dynamic_activation_qparams(x.float()))
        x = (torch.round(x / x_scale + zero).clamp(0, 255) - zero) * x_scale
    return torch.nn.functional.linear(x, weight, bias.double())


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_linear_matches_its_definition(dynamic):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 50, 256), torch.randn(96, 256) * 0.05, torch.randn(96)
    weight_int8, scale = quantize_weight(weight, dynamic)
    largest = DYNAMIC_WEIGHT_MAX if dynamic else INT8_MAX
    assert weight_int8.dtype == torch.int8 and int(weight_int8.abs().max()) == largest
    out = torch.ops.attnopt.int8_linear(x, weight_int8, scale, bias, dynamic)
    expected = _definition(x, weight_int8, scale, bias, dynamic)
    assert out.shape == (3, 50, 96) and out.dtype == torch.float32
    error = float((out.double() - expected).norm() / expected.norm())
    assert error < ROUNDOFF
    exact = torch.nn.functional.linear(x, weight, bias)
    assert float((out - exact).norm() / exact.norm()) < QUANTIZATION_REL_ERR


def test_int8_linear_gradients_are_straight_through():
    torch.manual_seed(0)
    x = torch.randn(4, 32, requires_grad=True)
    weight_int8, scale = quantize_weight(torch.randn(16, 32))
    bias = torch.randn(16, requires_grad=True)
    grad_out = torch.randn(4, 16)
    (torch.ops.attnopt.int8_linear(x, weight_int8, scale, bias, True) * grad_out).sum() \
        .backward()
    # as if the activations were not rounded: the gradient of the dequantized linear
    dequantized = weight_int8.float() * scale[:, None]
    torch.testing.assert_close(x.grad, grad_out @ dequantized, atol=ROUNDOFF, rtol=0)
    torch.testing.assert_close(bias.grad, grad_out.sum(0), atol=ROUNDOFF, rtol=0)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_projections_quantized_in_every_form(form, mode, tmp_path):
    model = _model(form)
    x = _x()
    optimized = attnopt.optimize(model, int8_policy(mode=mode), example_inputs=(x,))
    record = _weights(optimized)
    assert record.rolled_back is None
    info = record.approximation["weights"]["int8"]
    packed = form != "separate"
    assert info["quantized"] == (["qkv", "out"] if packed else ["q", "k", "v", "out"])
    fresh = _x()
    with torch.no_grad():
        expected = model(fresh)
        error = float((optimized(fresh) - expected).norm() / expected.norm())
    assert 0 < error < QUANTIZATION_REL_ERR
    # 4·E·E float32 weights became int8 (+ one float32 scale per output channel)
    parameters = optimized.report.parameters
    saved = 4 * E * E * 3 - 4 * E * 4
    assert parameters["before_bytes"] - parameters["after_bytes"] == saved
    result = attnopt.export_onnx(optimized, str(tmp_path / "m.onnx"), example_inputs=(x,))
    assert result.passed and result.quantized
    quantized_op = "MatMulInteger" if mode == "dynamic" else "DequantizeLinear"
    assert result.op_histogram.get(quantized_op) == (2 if packed else 4)


def test_mixed_precision_keeps_the_most_sensitive_projection():
    model = _model("separate")
    with torch.no_grad():  # an outlier column: every row's scale is set by it
        model.v.weight[:, 0] = 40.0
    x = _x()
    optimized = attnopt.optimize(model, int8_policy(mode="weight_only", keep_fraction=0.25),
                                 example_inputs=(x,), verify=False)
    info = _weights(optimized).approximation["weights"]["int8"]
    assert info["full_precision"] == ["v"]
    assert sorted(info["quantized"]) == ["k", "out", "q"]
    assert info["sensitivity"]["v"] > 3 * max(info["sensitivity"][r] for r in ("q", "k", "out"))


def test_site_error_includes_its_quantized_input_projections():
    """With the out-projection kept in float the site is measured at the attention output;
    the int8 q/k/v upstream of it (behind views that keep their names) must count there."""
    model = _model("separate")
    with torch.no_grad():  # the out-projection is the most sensitive: kept in float
        model.o.weight[:, 0] = 40.0
    x = _x()
    optimized = attnopt.optimize(model, int8_policy(mode="weight_only", keep_fraction=0.25),
                                 example_inputs=(x,))
    record = _weights(optimized)
    assert record.approximation["weights"]["int8"]["full_precision"] == ["out"]
    assert record.rel_err > 1e-3  # q, k, v at int8: ~0.5%, not float round-off


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_quantized_model_saves_as_pt2_and_loads_back(mode, tmp_path):
    from attnopt.convert import save_pt2
    model = _model("separate")
    x = _x()
    optimized = attnopt.optimize(model, int8_policy(mode=mode), example_inputs=(x,))
    save_pt2(optimized, tmp_path / "int8.pt2", (x,), {})
    save_pt2(attnopt.optimize(model, "exact", example_inputs=(x,)), tmp_path / "exact.pt2",
             (x,), {})
    assert (tmp_path / "int8.pt2").stat().st_size < (tmp_path / "exact.pt2").stat().st_size
    loaded = torch.export.load(str(tmp_path / "int8.pt2")).module()
    targets = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert "attnopt.int8_linear.default" in targets
    fresh = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(fresh), optimized(fresh), atol=ROUNDOFF, rtol=0)
