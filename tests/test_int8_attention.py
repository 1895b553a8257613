"""int8 Q·Kᵀ attention (`attnopt::int8_qk_attention`, SageAttention's recipe): the quantization
is what it claims, the kernel (Triton interpreter without a GPU) computes what the reference
does, gradients are exact attention's, the ONNX form matches, and the rewrite is guarded."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.ops.attention import attention_reference
from attnopt.ops.quantized import (
    INT8_MAX, K_QUANT_BLOCK, Q_QUANT_BLOCK, dequantize_blocks, int8_qk_kernel,
    int8_qk_reference, quantize_blocks, smooth_keys,
)
from attnopt.policy import Policy

#: kernel vs reference on the same (identically quantized) inputs
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
#: normwise error of int8 Q·Kᵀ against exact attention on random inputs (SageAttention
#: reports well under this on real models; random inputs at this length measure about 1%)
QUANTIZATION_REL_ERR = 0.03


def _qkv(seed, batch=2, heads=4, kv_heads=2, length=100, dim=40, dtype=torch.float32,
         key_offset=1.5):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k = torch.randn(batch, kv_heads, length, dim, generator=generator) + key_offset
    v = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _relative(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def test_block_quantization_rounds_each_block_to_its_own_scale():
    x = torch.randn(2, 3, 150, 16, dtype=torch.float64) * torch.linspace(0.1, 10, 150)[:, None]
    x8, scales = quantize_blocks(x, 64)
    assert x8.dtype == torch.int8 and x8.shape == x.shape and scales.shape == (2, 3, 3)
    assert int(x8.abs().max()) == INT8_MAX
    blocks = torch.nn.functional.pad(x, (0, 0, 0, 42)).unflatten(2, (3, 64))
    assert torch.allclose(scales.double(), blocks.abs().amax(dim=(-2, -1)) / INT8_MAX)
    error = (dequantize_blocks(x8, scales, 64).double() - x).abs()
    assert (error <= scales.repeat_interleave(64, -1)[..., :150, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quantizer_gives_the_references_integers(dtype):
    """kernels/quantize.py (interpreter without a GPU) against quantize_blocks, bit for bit,
    with and without the key smoothing, on a length and head dim that are not block sizes."""
    from attnopt.kernels.quantize import quantize_blocks_kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = _qkv(6, dtype=dtype)[1].to(device) * 3
    mean = x.float().mean(dim=-2, keepdim=True)
    for kernel_mean, reference_input in ((None, x), (mean, x.float() - mean)):
        got, got_scales = quantize_blocks_kernel(x, 64, kernel_mean)
        expected, scales = quantize_blocks(reference_input, 64)
        assert torch.equal(got, expected) and torch.equal(got_scales, scales)


def test_smoothing_keys_leaves_exact_attention_unchanged():
    """Subtracting the mean key shifts every score of a row by one constant: softmax cancels
    it, with causality and a padding mask too."""
    q, k, v = _qkv(1, dtype=torch.float64)
    mask = torch.zeros(2, 1, 1, 100, dtype=torch.float64)
    mask[0, ..., -9:] = float("-inf")
    for causal in (False, True):
        plain = attention_reference(q, k, v, mask, causal, None, True)
        smoothed = attention_reference(q, smooth_keys(k), v, mask, causal, None, True)
        assert (plain - smoothed).abs().max() < 1e-12


def test_reference_is_exact_attention_over_the_rounded_operands():
    q, k, v = _qkv(2, dtype=torch.float64)
    exact = attention_reference(q, k, v, None, True, None, True)
    out = int8_qk_reference(q, k, v, None, True, None, True)
    assert 1e-4 < _relative(out, exact) < QUANTIZATION_REL_ERR
    # without smoothing the keys' shared offset would take the 8-bit range: larger error
    unsmoothed = attention_reference(
        dequantize_blocks(*quantize_blocks(q, Q_QUANT_BLOCK), Q_QUANT_BLOCK).double(),
        dequantize_blocks(*quantize_blocks(k + 20, K_QUANT_BLOCK), K_QUANT_BLOCK).double() - 20,
        v, None, True, None, True)
    assert _relative(unsmoothed, exact) > 2 * _relative(out, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["causal_gqa", "padding_mask", "softcap_causal", "bool_mask"])
def test_kernel_matches_the_reference(case, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in _qkv(3, dtype=dtype))
    mask, causal, softcap = None, False, None
    if case == "causal_gqa":
        causal = True
    elif case == "padding_mask":
        mask = torch.zeros(2, 1, 1, 100, dtype=dtype, device=device)
        mask[0, ..., -9:] = float("-inf")
    elif case == "bool_mask":
        generator = torch.Generator().manual_seed(4)
        mask = (torch.rand(100, 100, generator=generator) > 0.3).to(device)
    else:
        causal, softcap = True, 5.0
    expected = int8_qk_reference(q, k, v, mask, causal, None, True, softcap)
    out = int8_qk_kernel(q, k, v, mask, causal, None, True, softcap)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - expected.double()).abs().max() < KERNEL_TOL[dtype]


def test_gradients_are_exact_attentions():
    """Straight-through: backward differentiates exact attention at the unquantized inputs."""
    q, k, v = (t.requires_grad_() for t in _qkv(5, dtype=torch.float64))
    grad = torch.randn(2, 4, 100, 40, dtype=torch.float64)
    torch.ops.attnopt.int8_qk_attention(q, k, v, None, True, None, True).backward(grad)
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention_reference(q, k, v, None, True, None, True).backward(grad)
    for actual, t in zip(got, (q, k, v)):
        assert (actual - t.grad).abs().max() < 1e-10


def test_onnx_form_matches_in_onnxruntime_at_other_lengths(tmp_path):
    import onnxruntime

    from attnopt.onnx_export import translation_table

    class Site(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.ops.attnopt.int8_qk_attention(q, k, v, mask, False, 0.2, True)

    def inputs(seed, length):
        q, k, v = _qkv(seed, length=length)
        mask = torch.zeros(2, 1, 1, length)
        mask[1, ..., -5:] = float("-inf")
        return q, k, v, mask

    length = torch.export.Dim("length", min=2, max=4096)
    dims = {"q": {2: length}, "k": {2: length}, "v": {2: length}, "mask": {3: length}}
    path = str(tmp_path / "int8_qk.onnx")
    torch.onnx.export(Site(), inputs(0, 96), path, dynamo=True, opset_version=18,
                      custom_translation_table=translation_table(18), dynamic_shapes=dims,
                      input_names=["q", "k", "v", "mask"], verbose=False)
    session = onnxruntime.InferenceSession(path)
    for seed, n in ((1, 96), (2, 200)):
        feed = inputs(seed, n)
        (got,) = session.run(None, {key: t.numpy() for key, t in zip("q k v mask".split(),
                                                                      feed)})
        assert abs(got - Site()(*feed).numpy()).max() < 2e-5


def test_int8_qk_rewrite_is_guarded_and_reported():
    """Every site takes the rewrite, the report names it, the output stays within budget; a
    budget tighter than the rounding error rolls every site back."""
    from zoo import ZOO
    case = ZOO["fused_causal"]
    torch.manual_seed(0)
    model, args = case.make().eval(), case.inputs()
    optimized = attnopt.optimize(model, Policy("int8", default="int8_qk"), example_inputs=args)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert records and all(r.rewrite == "int8_qk" for r in records)
    with torch.no_grad():
        assert _relative(optimized(*args), model(*args)) < QUANTIZATION_REL_ERR
    from attnopt.policy import ErrorBudget
    strict = Policy("int8-strict", default="int8_qk",
                    budget=ErrorBudget(site_rel_err=1e-6, output_rel_err=1e-6))
    rolled_back = attnopt.optimize(model, strict, example_inputs=args)
    assert all(r.rewrite == "exact" for r in rolled_back.report.sites if r.site is not None)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_int8_qk_on_hugging_face_models_is_guarded_and_exports(name, tmp_path):
    """BERT (padding), GPT-2 (causal, Conv1D) and Llama (GQA, RoPE): every site takes the
    rewrite under the default budget, and the exported ONNX agrees with PyTorch."""
    from test_weights import _hf
    model, inputs = _hf(name)
    optimized = attnopt.optimize(model, Policy("int8", default="int8_qk"),
                                 example_kwargs=inputs)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert len(records) == 2 and all(r.rewrite == "int8_qk" for r in records)
    assert optimized.report.verification["passed"]
    result = attnopt.export_onnx(optimized, str(tmp_path / f"{name}.onnx"),
                                 example_kwargs=inputs)
    assert result.passed
