"""How rewritten graphs are called eagerly (`attnopt/runner.py`): every aten op the eager copy
calls through a Python binding runs the same op on the same arguments as the overload."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt.runner import python_bindings

aten = torch.ops.aten


def _samples() -> dict:
    """Arguments (positional, keyword) for each overload `python_bindings` maps."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    x, y = randn(2, 3, 4, 8), randn(2, 3, 4, 8)
    return {
        aten.linear.default: ((x, randn(5, 8), randn(5)), {}),
        aten.gelu.default: ((x,), {"approximate": "tanh"}),
        aten.silu.default: ((x,), {}),
        aten.add.Tensor: ((x, y), {"alpha": 2}),
        aten.sub.Tensor: ((x, 1.5), {}),
        aten.mul.Tensor: ((x, y), {}),
        aten.div.Tensor: ((x, y.abs() + 1), {}),
        aten.neg.default: ((x,), {}),
        aten.pow.Tensor_Scalar: ((x, 2), {}),
        aten.rsqrt.default: ((x.abs() + 1,), {}),
        aten.mean.dim: ((x, [-1], True), {}),
        aten.cos.default: ((x,), {}),
        aten.sin.default: ((x,), {}),
        aten.tanh.default: ((x,), {}),
        aten.softmax.int: ((x, -1), {}),
        aten.matmul.default: ((x, y.transpose(-1, -2)), {}),
        aten.cat.default: (([x, y], 1), {}),
        aten.layer_norm.default: ((x, [8], randn(8), randn(8), 1e-5), {}),
        aten.dropout.default: ((x, 0.1, False), {}),
        aten.embedding.default: ((randn(10, 4), torch.tensor([[1, 2], [3, 9]])), {}),
        aten.view.default: ((x, [2, 12, 8]), {}),
        aten.reshape.default: ((x.transpose(1, 2), [2, 12, 8]), {}),
        aten.transpose.int: ((x, 1, 2), {}),
        aten.permute.default: ((x, [0, 2, 1, 3]), {}),
        aten.unsqueeze.default: ((x, 1), {}),
        aten.expand.default: ((randn(2, 1, 4, 8), [2, 3, 4, 8]), {}),
        aten.contiguous.default: ((x.transpose(1, 2),), {}),
        aten.addmm.default: ((randn(5), randn(3, 8), randn(8, 5)), {"beta": 0.5}),
        aten.to.dtype: ((x, torch.float16), {}),
    }


class _Dispatched(TorchDispatchMode):
    """The ops a call dispatches below autograd, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_every_binding_has_a_sample():
    assert set(_samples()) == set(python_bindings())


@pytest.mark.parametrize("op", list(python_bindings()), ids=str)
def test_binding_runs_the_overloads_op_on_the_same_arguments(op):
    args, kwargs = _samples()[op]
    binding = python_bindings()[op]
    with _Dispatched() as by_overload:
        expected = op(*args, **kwargs)
    with _Dispatched() as by_binding:
        actual = binding(*args, **kwargs)
    assert by_binding.ops == by_overload.ops
    inputs = [t for t in args if isinstance(t, torch.Tensor)]
    assert by_overload.ops or any(expected is t for t in inputs)  # (eval dropout: the input)
    assert actual.dtype == expected.dtype and actual.stride() == expected.stride()
    assert torch.equal(actual, expected)
    for t in inputs:  # views of an input: of the same one, at the same place
        storage = t.untyped_storage().data_ptr()
        assert (actual.untyped_storage().data_ptr() == storage) == \
            (expected.untyped_storage().data_ptr() == storage)
    assert actual.storage_offset() == expected.storage_offset()
