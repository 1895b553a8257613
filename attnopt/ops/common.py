"""What every attnopt op module shares: autograd by recomputation, forwards kept for the
backward, and ONNX helpers.

An approximate op's reference implementation is plain differentiable torch. Its autograd
saves the inputs and, in backward, recomputes the reference under autograd — the gradient of
exactly the function the forward computed, at the cost of a second forward.

The canonical op avoids that second forward: its implementation leaves what its backward needs
(`keep_for_backward`) for its `setup_context` to take (`take_kept`) — a kernel's log-sum-exp,
or the reference recorded under autograd (`record_forward`) with whatever SDPA's backend saves
for its own backward.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional, Sequence

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


# ----------------------------------------------------------------- forwards kept for backward
# An op's implementation runs below autograd: its `register_autograd` wraps it in an
# autograd.Function whose forward runs with grad mode off and autograd's dispatch keys
# excluded. What that forward leaves for the backward goes through this table, keyed by the
# id of the output (tensors compare elementwise, so they cannot key a WeakKeyDictionary),
# holding a weak reference to it so that an entry nobody takes goes with its output.

_KEPT: dict = {}


def keep_for_backward(result: Tensor, state) -> None:
    """Leave `state` for the `setup_context` that receives `result` (`take_kept`). `state`
    must not refer to `result` itself, or the entry would keep it alive."""
    _KEPT[id(result)] = (weakref.ref(result), state)
    weakref.finalize(result, _KEPT.pop, id(result), None)


def take_kept(output: Tensor):
    """What the implementation left for `output` (`keep_for_backward`), or None."""
    entry = _KEPT.pop(id(output), None)
    return entry[1] if entry is not None and entry[0]() is output else None


def needs_gradient(*tensors) -> list[int]:
    """Indices of the floating-point tensors among `tensors` (or None) that require grad:
    inside an op's implementation, the sign that its autograd.Function called it and will
    differentiate it (grad mode is off there, so the flags are what is left to read)."""
    return [index for index, tensor in enumerate(tensors)
            if tensor is not None and tensor.requires_grad and tensor.is_floating_point()]


#: re-admits autograd below an autograd.Function's forward (absent: nothing is recorded)
_INCLUDE_AUTOGRAD = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)


class RecordedForward:
    """A forward recorded under autograd from inside an op's implementation: its output with
    the graph behind it, and the detached leaves (by input index) it differentiates to.
    Differentiated once (`gradients`); its graph goes then."""

    def __init__(self, out: Tensor, leaves: dict):
        self.out, self.leaves = out, leaves

    def gradients(self, grad_out: Tensor) -> dict:
        out, self.out = self.out, None
        grads = torch.autograd.grad(out, list(self.leaves.values()), grad_out,
                                    allow_unused=True)
        return dict(zip(self.leaves, grads))


def record_forward(reference: Callable, inputs: Sequence, wrt: Sequence[int]
                   ) -> tuple[Tensor, Optional[RecordedForward]]:
    """`reference(*inputs)` run under autograd although the caller runs below it, its graph
    differentiable with respect to `inputs[i]` for i in `wrt`: the output (detached, as an op
    returns it) and the record (None where this torch cannot re-admit autograd; the output is
    then computed without a graph). Every tensor input is detached, so the graph ends at this
    call. SDPA saves what its backend's backward takes (the log-sum-exp of the fused kernels),
    so differentiating the record runs no forward again."""
    inputs = [x.detach() if isinstance(x, Tensor) else x for x in inputs]
    if _INCLUDE_AUTOGRAD is None or not wrt:
        return reference(*inputs), None
    leaves = {}
    for index in wrt:
        inputs[index] = leaves[index] = inputs[index].requires_grad_(True)
    with torch.enable_grad(), _INCLUDE_AUTOGRAD(torch._C.DispatchKey.AutogradFunctionality,
                                                False):
        out = reference(*inputs)
    if out.grad_fn is None:  # nothing recorded (not differentiable in what was asked)
        return out, None
    return out.detach(), RecordedForward(out, leaves)


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


def like_query_layout(out: Tensor, q: Tensor) -> Tensor:
    """`out` (B, H, Sq, Dv) laid out in memory as `q` is (SDPA's convention: a BSHD-strided
    query gives a BSHD-strided output). Graphs captured around SDPA view its output through
    transposes that are only contiguous in that layout, so a replacement op must keep it."""
    strides = q.stride()
    if all(type(s) is int for s in strides):
        order = _memory_order(strides)  # per call on every op: cached by stride tuple
    else:
        order = _memory_order.__wrapped__(strides)  # symbolic strides (tracing): not hashable
    if order is None:
        return out.contiguous()
    if out.permute(order).is_contiguous():
        return out  # already so (SDPA's own kernels do it)
    inverse = [order.index(d) for d in range(q.dim())]
    laid_out = out.new_empty([out.shape[d] for d in order]).permute(inverse)
    return laid_out.copy_(out)


@functools.lru_cache(maxsize=1024)
def _memory_order(strides: tuple) -> Optional[tuple]:
    """Dims from outermost to innermost in memory, the last dim kept innermost; None when
    that is the natural order (contiguous layout)."""
    ndim = len(strides)
    order = sorted(range(ndim), key=lambda d: (-strides[d], d))
    order.remove(ndim - 1)
    order.append(ndim - 1)  # the head dim stays innermost
    return None if order == list(range(ndim)) else tuple(order)


def empty_like_query_layout(q: Tensor, v_dim: int) -> Tensor:
    """An uninitialized (B, H, Sq, Dv) tensor in `q`'s layout (for fake implementations)."""
    shape = (*q.shape[:-1], v_dim)
    return like_query_layout(q.new_empty(shape), q) if q.dim() == 4 else q.new_empty(shape)
