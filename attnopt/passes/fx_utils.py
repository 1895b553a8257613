"""Small helpers over torch.fx graphs of exported (aten-level) programs, shared by the passes."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.fx import Node

aten = torch.ops.aten

#: Nodes that only assert metadata; they hold a use of a tensor but compute nothing.
ASSERTION_TARGETS = frozenset({
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
})

CAST_TARGETS = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
})
IDENTITY_TARGETS = frozenset({
    aten.clone.default, aten.contiguous.default, aten.alias.default,
})
VIEW_TARGETS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
TRANSPOSE_TARGETS = frozenset({aten.transpose.int, aten.permute.default, aten.t.default})


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def real_users(node: Node) -> list[Node]:
    """Users of `node` that compute something (assertion nodes are not counted)."""
    return [u for u in node.users if u.target not in ASSERTION_TARGETS]


def only_user(node: Node) -> Optional[Node]:
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def fake_value(node: Any):
    return node.meta.get("val") if isinstance(node, Node) else None


def shape_of(node: Node) -> Optional[tuple]:
    val = fake_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def dtype_of(node: Node) -> Optional[torch.dtype]:
    val = fake_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def concrete(dim) -> int:
    """An int for a static dim, the example's value (hint) for a symbolic one."""
    if isinstance(dim, int):
        return dim
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        if hint is not None:
            return int(hint)
    return int(dim)


def is_symbolic(dim) -> bool:
    return isinstance(dim, torch.SymInt) and not dim.node.is_nested_int() and \
        dim.node.maybe_as_int() is None


def same_dim(a, b) -> bool:
    """True when two dims are provably equal: equal ints or the same symbolic expression."""
    if is_symbolic(a) or is_symbolic(b):
        return is_symbolic(a) and is_symbolic(b) and str(a.node.expr) == str(b.node.expr)
    return concrete(a) == concrete(b)


def scalar_arg(value) -> Optional[float]:
    """A Python number (not a tensor or node), as float; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def constant_fill_value(node: Any) -> Optional[float]:
    """The value of a scalar fill given as a number or as a `full([], v)`-like node."""
    number = scalar_arg(node)
    if number is not None:
        return number
    if is_call(node, aten.full.default) and list(node.args[0]) == []:
        return scalar_arg(node.args[1])
    if is_call(node, aten.scalar_tensor.default):
        return scalar_arg(node.args[0])
    return None


def module_path(node: Node) -> tuple[str, str]:
    """(path, class name) of the innermost module that produced `node`; ("", "") at the root."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return _clean_path(path), cls_name.rsplit(".", 1)[-1]


def _clean_path(path: str) -> str:
    # strict export spells paths as L['self'].layers[0].attn; non-strict as layers.0.attn
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


#: Ops whose result depends on their tensor input's shape, dtype or device, never its values.
SHAPE_ONLY_TARGETS = frozenset({
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
    aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default,
    aten.empty_like.default,
})


def ancestors(nodes: Iterable[Node]) -> set[Node]:
    """Every node the given nodes depend on (inclusive)."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def value_ancestors(nodes: Iterable[Node]) -> set[Node]:
    """Every node whose *value* the given nodes depend on, inclusive (shape-only uses, as
    `zeros_like(x)` of x, are skipped)."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not (node.op == "call_function" and node.target in SHAPE_ONLY_TARGETS):
            stack.extend(node.all_input_nodes)
    return seen


def value_sources(nodes: Iterable[Node]) -> set[Node]:
    """Placeholders whose *values* the given nodes depend on (shape-only uses are skipped)."""
    return {node for node in value_ancestors(nodes) if node.op == "placeholder"}


def unique_attr(module, base: str) -> str:
    """An attribute name for `module` from `base` (non-alphanumerics → "_") that it does not
    have yet: `base`, else `base_2`, `base_3`, …"""
    name = "".join(c if c.isalnum() else "_" for c in base)
    candidate, index = name, 1
    while hasattr(module, candidate):
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def remove_assertions_on(graph: torch.fx.Graph, nodes: Iterable[Node]) -> None:
    """Drop metadata assertions whose subject is about to be removed."""
    for node in nodes:
        for user in list(node.users):
            if user.target in ASSERTION_TARGETS:
                graph.erase_node(user)


def eliminate_dead_code(graph_module) -> int:
    """Remove metadata assertions and every unused pure node; return how many went.

    fx's own `eliminate_dead_code` keeps `_assert_tensor_metadata` nodes (they are impure),
    and they keep their subjects alive; what they assert (dtype, device of an intermediate) no
    rewrite changes, so they go.
    """
    graph = graph_module.graph
    before = len(graph.nodes)
    for node in list(graph.nodes):
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return before - len(graph.nodes)
