"""What every attnopt op module shares: autograd by recomputation, and ONNX helpers.

An approximate op's reference implementation is plain differentiable torch. Its autograd
saves the inputs and, in backward, recomputes the reference under autograd — the gradient of
exactly the function the forward computed, at the cost of a second forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def register_recompute_autograd(op, reference: Callable) -> None:
    """Autograd for `op`: backward recomputes `reference(*inputs)` and differentiates it
    with respect to every floating-point tensor input that needs a gradient."""

    def setup_context(ctx, inputs, output):
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        ctx.save_for_backward(*tensors)
        ctx.constants = [None if isinstance(x, Tensor) else x for x in inputs]

    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs, wrt = [], []
        with torch.enable_grad():
            for index, (tensor, constant) in enumerate(zip(saved, ctx.constants)):
                if tensor is None:
                    inputs.append(constant)
                    continue
                if ctx.needs_input_grad[index] and tensor.is_floating_point():
                    tensor = tensor.detach().requires_grad_(True)
                    wrt.append(index)
                inputs.append(tensor)
            if not wrt:
                return tuple(None for _ in saved)
            out = reference(*inputs)
            grads = torch.autograd.grad(out, [inputs[i] for i in wrt], grad_out,
                                        allow_unused=True)
        result = [None] * len(saved)
        for index, grad in zip(wrt, grads):
            result[index] = grad
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


# ------------------------------------------------------------------------------ ONNX helpers
# Small onnxscript building blocks used inside translation functions (traced, not compiled).

def onnx_scalar(op, value: float, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def onnx_dim(op, tensor, index: int):
    """The 1-element int64 shape slice tensor.shape[index:index+1]."""
    return op.Shape(tensor, start=index, end=index + 1)


def onnx_repeat_heads(op, x_BHkvSD, heads):
    """GQA expansion (repeat_interleave order) of a (B, Hkv, S, D) tensor to `heads` heads
    (`heads` a 1-element int64 tensor)."""
    kv_heads = onnx_dim(op, x_BHkvSD, 1)
    group = op.Div(heads, kv_heads)
    x_BHkv1SD = op.Unsqueeze(x_BHkvSD, op.Constant(value_ints=[2]))
    expanded = op.Expand(x_BHkv1SD, op.Concat(onnx_dim(op, x_BHkvSD, 0), kv_heads, group,
                                              onnx_dim(op, x_BHkvSD, 2),
                                              onnx_dim(op, x_BHkvSD, 3), axis=0))
    return op.Reshape(expanded, op.Concat(onnx_dim(op, x_BHkvSD, 0), heads,
                                          onnx_dim(op, x_BHkvSD, 2), onnx_dim(op, x_BHkvSD, 3),
                                          axis=0))
