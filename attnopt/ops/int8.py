"""`torch.ops.attnopt.int8_linear`: a linear layer with int8 weights, for quantized projections.

    weight_NK ≈ weight_int8_NK · scale_N        (symmetric, per output channel)

Two modes:
- weight-only (`dynamic=False`): y = x · (weight_int8 · scale)ᵀ + bias. The weights take a
  quarter of the bytes; the matmul runs in x's dtype.
- dynamic (`dynamic=True`): x is quantized on the fly to uint8, per tensor and asymmetric
  (scale = (max(x, 0) − min(x, 0)) / 255, zero point round(−min / scale)), and the product is
  an integer matmul rescaled to float. These are the semantics of the two fast int8 paths a
  deployed model has on a CPU: PyTorch's fbgemm `quantized::linear_dynamic` and onnxruntime's
  `DynamicQuantizeLinear` + `MatMulInteger` (which it fuses). Per-token activation scales
  would be more accurate but neither runs them, so the op would be slow in both places.

Implementations: the reference (any device) dequantizes both operands and runs a float matmul
— the same numbers as the integer product, whose partial sums float32 holds exactly for
in-features up to ~1000. On CPU the dynamic mode runs fbgemm (weights pre-packed once per
weight tensor).

Dynamic mode takes 7-bit weights (|w| ≤ 63, `DYNAMIC_WEIGHT_MAX`): fbgemm and onnxruntime both
multiply u8 activations by s8 weights with instructions that add pairs of products into int16,
which saturates for 255·127·2; with 7-bit weights the sums fit, and the reference, fbgemm and
onnxruntime agree to float round-off (measured: 2e-7 relative; with 8-bit weights both fast
paths were 1.5% off the reference and 20× the quantization error end to end).

Autograd is straight-through: gradients as for the dequantized weights, so a quantized model
can be fine-tuned. The ONNX translation uses standard ops: `DequantizeLinear`
+ `MatMul` (weight-only), `DynamicQuantizeLinear` + `MatMulInteger` (dynamic).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from attnopt.ops.common import register_recompute_autograd

#: Largest int8 magnitude used (symmetric weights: −127…127, so negation is exact).
INT8_MAX = 127
#: Largest weight magnitude in dynamic mode (module docstring: int16 pair sums).
DYNAMIC_WEIGHT_MAX = 63
#: uint8 range of dynamically quantized activations.
UINT8_MAX = 255


def quantize_weight(weight_NK: Tensor, dynamic: bool = False) -> tuple[Tensor, Tensor]:
    """(int8 weights, float32 per-output-channel scales): symmetric, round to nearest; 7-bit
    for dynamic mode."""
    largest = DYNAMIC_WEIGHT_MAX if dynamic else INT8_MAX
    scale_N = weight_NK.detach().float().abs().amax(dim=1) / largest
    scale_N = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    quantized = torch.round(weight_NK.detach().float() / scale_N[:, None])
    return quantized.clamp(-largest, largest).to(torch.int8), scale_N


def dynamic_activation_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, zero point) of x as onnxruntime's DynamicQuantizeLinear computes them."""
    x = x.detach().float()
    low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = (high - low) / UINT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-low / scale).clamp(0, UINT8_MAX)
    return scale, zero_point


def int8_linear_reference(x: Tensor, weight_int8: Tensor, scale: Tensor,
                          bias: Optional[Tensor] = None, dynamic: bool = False) -> Tensor:
    weight = weight_int8.to(torch.float32) * scale.to(torch.float32)[:, None]
    if dynamic:
        x_scale, zero_point = dynamic_activation_qparams(x)
        x_q = torch.round(x.float() / x_scale + zero_point).clamp(0, UINT8_MAX)
        return F.linear((x_q - zero_point) * x_scale, weight,
                        None if bias is None else bias.float())
    return F.linear(x, weight.to(x.dtype), bias)


def _straight_through(x, weight_int8, scale, bias=None, dynamic=False):
    """The function gradients are taken of: the dequantized weights, activations as given."""
    return F.linear(x, (weight_int8.to(scale.dtype) * scale[:, None]).to(x.dtype), bias)


@torch.library.custom_op("attnopt::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                dynamic: bool = False) -> Tensor:
    return int8_linear_reference(x, weight_int8, scale, bias, dynamic).to(x.dtype)


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and \
        hasattr(torch.ops.quantized, "linear_dynamic")


@int8_linear.register_kernel("cpu")
def _int8_linear_cpu(x, weight_int8, scale, bias=None, dynamic=False):
    if not dynamic or x.dtype != torch.float32 or not _fbgemm_available():
        return int8_linear_reference(x, weight_int8, scale, bias, dynamic).to(x.dtype)
    packed = _packed(weight_int8, scale, bias)
    return torch.ops.quantized.linear_dynamic(x, packed, False)  # reduce_range=False


#: fbgemm's packed weights per int8 weight tensor (weakly held: they go with the weight).
_PACKED = WeakIdKeyDictionary()


def _packed(weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor]):
    """fbgemm's pre-packed weights, packed again only when the weight, its scale or the bias
    changed (another tensor or an in-place update)."""
    version = tuple((id(t), t._version) if t is not None else None
                    for t in (weight_int8, scale, bias))
    cached = _PACKED.get(weight_int8)
    if cached is not None and cached[0] == version:
        return cached[1]
    with warnings.catch_warnings():  # (PyTorch deprecates quantized tensors: while the
        warnings.simplefilter("ignore", UserWarning)  # op exists, it is the fast path)
        quantized = torch._make_per_channel_quantized_tensor(
            weight_int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(
        quantized, None if bias is None else bias.float())
    _PACKED[weight_int8] = (version, packed)
    return packed


@int8_linear.register_fake
def _int8_linear_fake(x, weight_int8, scale, bias=None, dynamic=False):
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


register_recompute_autograd(int8_linear, _straight_through)


def onnx_int8_linear(x, weight_int8, scale, bias=None, dynamic=False):
    from onnxscript import opset18 as op
    if not dynamic:
        weight = op.DequantizeLinear(weight_int8, op.Cast(scale, to=1), axis=0)
        y = op.MatMul(op.Cast(x, to=1), op.Transpose(weight, perm=[1, 0]))
    else:
        x_q, x_scale, x_zero = op.DynamicQuantizeLinear(op.Cast(x, to=1))
        product = op.MatMulInteger(x_q, op.Transpose(weight_int8, perm=[1, 0]), x_zero)
        y = op.Mul(op.Cast(product, to=1), op.Mul(x_scale, op.Cast(scale, to=1)))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=1))
    return op.CastLike(y, x)
