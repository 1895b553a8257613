"""How a rewritten graph module is called: a view of its module tree with cheap attribute
reads, kept pointing at the user's current parameters and buffers.

An exported graph reads each parameter through its module path, `getattr(self.encoder.layer,
"0").attention.self.query.weight`, and every step of that path is `nn.Module.__getattr__` (a
Python function) because children, parameters and buffers live in the module's tables, not in
its instance dictionary. For a 12-layer BERT that is about 1,300 calls per forward: on the CPU
VM a tiny BERT's forward spent 6.6 ms of host time that way, 4.4 through the view, where HF's
sdpa model spends 5.2 (`benchmarks/bench_graph_calls.py`, docs/BENCHMARKS.md).
`fast_view` copies the module tree (sharing the code, hooks, parameters and buffers) and also
stores each child, parameter and buffer as a plain instance attribute of its copy, so Python
finds it without calling `__getattr__`. The view is private to the call path: the rewritten
graph itself, which verification replays and reports read, keeps plain modules.

The view runs a copy of the rewritten graph made for eager calls (`eager_graph`). Its common
aten ops are called through their Python bindings (`python_bindings`: `torch.add`,
`Tensor.view`, ...), which parse arguments in C++ and call the op unboxed, where an
`OpOverload` call boxes them (a small linear: 9 against 17 µs on the CPU VM). Other aten ops
are called through their C++ handles (`OpOverload._op`, all that `OpOverload.__call__` does, a
Python frame less). The canonical op goes through `ops.attention.eager_attention`, which skips
the dispatcher's round trip into Python when nothing stands between the call and its
implementation. Under `torch.compile` the rewritten graph itself runs (`Region.runner`):
dynamo traces OpOverloads.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.fx import GraphModule

_PAIRS = "_attnopt_state_pairs"  # sync_state's resolved (table, table, name, attributes)


def fast_view(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree (same class, code, hooks, parameters and buffers; own tables)
    whose children, parameters and buffers are also instance attributes."""
    view = object.__new__(type(module))
    attributes = view.__dict__
    attributes.update(module.__dict__)
    attributes.pop(_PAIRS, None)  # resolved for the original's tables, not the view's
    attributes["_modules"] = {name: None if child is None else fast_view(child)
                              for name, child in module._modules.items()}
    attributes["_parameters"] = dict(module._parameters)
    attributes["_buffers"] = dict(module._buffers)
    for table in (attributes["_modules"], attributes["_parameters"], attributes["_buffers"]):
        for name, value in table.items():
            if value is not None:
                attributes[name] = value
    return view


def eager_graph(graph_module: GraphModule) -> GraphModule:
    """A copy of `graph_module` (sharing its parameters, buffers and submodules) for eager
    calls: aten ops called through their Python bindings (`python_bindings`) or else their C++
    handles, and canonical attention calls through `eager_attention` (module docstring)."""
    from attnopt.ops import ATTENTION_OP
    from attnopt.ops.attention import eager_attention
    graph = copy.deepcopy(graph_module.graph)  # (nodes copied, their meta shallow-copied)
    bindings = python_bindings()
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target == ATTENTION_OP:
                node.target = eager_attention
            else:
                node.target = bindings.get(node.target) or _Handle.of(node.target)
    return GraphModule(graph_module, graph, class_name=type(graph_module).__name__)


@functools.lru_cache(maxsize=None)
def python_bindings() -> dict:
    """aten overloads -> the Python binding that runs the same op on the same arguments (the
    same schema, so positional and keyword arguments carry over). A binding parses its
    arguments in C++ and calls the op unboxed; an overload's call boxes them, and a composite
    op such as `linear` is then unboxed again: 9 against 17 µs for a small linear on the CPU
    VM (docs/BENCHMARKS.md). tests/test_runner.py checks every pair: the same ops dispatched,
    the same result. The ops are the common ones of transformer graphs."""
    aten, functional, tensor = torch.ops.aten, torch._C._nn, torch.Tensor
    return {
        aten.linear.default: functional.linear, aten.gelu.default: functional.gelu,
        aten.silu.default: functional.silu,
        aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
        aten.div.Tensor: torch.div, aten.neg.default: torch.neg,
        aten.pow.Tensor_Scalar: torch.pow, aten.rsqrt.default: torch.rsqrt,
        aten.mean.dim: torch.mean, aten.cos.default: torch.cos, aten.sin.default: torch.sin,
        aten.tanh.default: torch.tanh, aten.softmax.int: torch.softmax,
        aten.matmul.default: torch.matmul, aten.addmm.default: torch.addmm,
        aten.cat.default: torch.cat,
        aten.layer_norm.default: torch.layer_norm, aten.dropout.default: torch.dropout,
        aten.embedding.default: torch.embedding,
        aten.view.default: tensor.view, aten.reshape.default: tensor.reshape,
        aten.transpose.int: tensor.transpose, aten.permute.default: tensor.permute,
        aten.unsqueeze.default: tensor.unsqueeze, aten.expand.default: tensor.expand,
        aten.contiguous.default: tensor.contiguous, aten.to.dtype: tensor.to,
    }


class _Handle(functools.partial):
    """An aten op's C++ handle as a call target fx can name: calling it is C all the way (a
    partial without bound arguments), where `OpOverload.__call__` is a Python frame."""

    @classmethod
    @functools.lru_cache(maxsize=None)
    def of(cls, op: torch._ops.OpOverload) -> "_Handle":
        """The handle of `op` (one per op, shared by every graph)."""
        handle = cls(op._op)
        handle.__name__ = str(op).replace(".", "_")  # the generated code's global: aten_mm_default
        handle.__module__ = __name__
        return handle


def sync_state(graph_module: GraphModule, module: nn.Module) -> None:
    """Point the graph at the module's current parameters and buffers (after `.to()` etc.).

    The graph shares the module's tensors; `.to()` replaces buffers (and, with
    `torch.__future__.set_overwrite_module_params_on_conversion`, parameters) by new objects.
    The (owner, name) pairs are resolved once; each call compares identities only. A
    `fast_view`'s instance attribute is repointed with its table entry.
    """
    pairs = graph_module.__dict__.get(_PAIRS)
    if pairs is None:
        pairs = []
        user_modules = dict(module.named_modules())
        for owner_path, owner in graph_module.named_modules():
            user_owner = user_modules.get(owner_path)
            if user_owner is None:
                continue
            for table in ("_parameters", "_buffers"):
                for attr in getattr(owner, table):
                    if attr in getattr(user_owner, table):
                        pairs.append((getattr(owner, table), getattr(user_owner, table), attr,
                                      owner.__dict__))
        graph_module.__dict__[_PAIRS] = pairs
    for ours, theirs, attr, attributes in pairs:
        if ours[attr] is not theirs[attr]:
            ours[attr] = theirs[attr]
            if attr in attributes:
                attributes[attr] = theirs[attr]
