"""Head surgery: rebuild the projections around a canonical attention site with other heads.

The weight rewrites (GQA conversion, head pruning) change how many heads q, k, v and the
attention output carry. In a captured graph a head count is spread over a projection's weight
rows and over every view between the projection and the attention: `linear → view(B, S, H, D)
→ transpose → RoPE → attention`, packed projections (`c_attn(x).split(E)`, `in_proj` with
`unflatten/select`), GPT-2's `addmm` Conv1D, and back out through `transpose → reshape →
out-projection`. This module finds that path for one operand (`trace_input`) or for the output
(`trace_output`), follows the head factor — and a packed projection's part factor — through it
(`HeadAxis`, one row-major factor of one dim; `_trace_steps`), and re-emits it
(`InputPath.rebuild`, `OutputPath.rebuild`) for a *head map*: new head i is the mean of old
heads `head_map[i]` (pooling for GQA, a single head to keep or permute).

Only the projection weights change: every op between projection and attention must act on
each head alike (views, transposes, RoPE, per-head-dim norms), which `_follow` checks op by
op; a path it cannot follow is refused with the op that stopped it (`SurgeryRefused`).
docs/COMPRESSION.md explains why the graph is rewritten rather than the user's modules.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from attnopt.passes.fx_utils import ancestors, aten, concrete, is_call, real_users, unique_attr

#: Ops a head path may contain that act on every head alike and keep each element's dims.
ELEMENTWISE_TARGETS = frozenset({
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.rsqrt.default,
    aten.pow.Tensor_Scalar, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.silu.default, aten.sigmoid.default, aten.tanh.default,
})
RESHAPE_TARGETS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


class SurgeryRefused(Exception):
    """The path around a site cannot be rebuilt with other heads; the message says why."""


@dataclass(frozen=True)
class HeadAxis:
    """Where the head factor sits in a tensor: dim `dim` has size outer·heads·inner."""

    dim: int
    inner: int


@dataclass
class Core:
    """The matmul of a projection: `linear(x, W, b)` (W is (out, in)) or GPT-2's Conv1D
    `addmm(b, x, W)` (W is (in, out)). W and b are parameters, or row ranges of parameters
    (`nn.MultiheadAttention`'s cross-attention splits `in_proj_weight` into q and kv rows)."""

    node: Node
    weight: Node                   # the parameter's get_attr node
    bias: Optional[Node]           # the bias parameter's get_attr node
    transposed: bool
    weight_rows: Optional[tuple[int, int]] = None  # a row range of the parameter
    bias_rows: Optional[tuple[int, int]] = None

    @property
    def input(self) -> Node:
        return self.node.args[1] if self.transposed else self.node.args[0]

    @property
    def bias_value(self) -> Optional[Node]:
        """The node the matmul reads its bias from (the parameter or its row range)."""
        return self.node.args[0] if self.transposed else \
            (self.node.args[2] if len(self.node.args) > 2 else None)

    @staticmethod
    def of(node: Any) -> Optional["Core"]:
        if is_call(node, aten.linear.default):
            weight = node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            transposed = False
        elif is_call(node, aten.addmm.default) and not node.kwargs:
            bias, weight, transposed = node.args[0], node.args[2], True
        else:
            return None
        weight_source = _parameter_rows(weight)
        if weight_source is None or (transposed and weight_source[1] is not None):
            return None
        bias_source = _parameter_rows(bias) if bias is not None else (None, None)
        if bias_source is None:
            return None
        return Core(node, weight_source[0], bias_source[0], transposed, weight_source[1],
                    bias_source[1])

    def parameter_names(self) -> list[str]:
        return [n.target for n in (self.weight, self.bias) if n is not None]

    def rows(self, graph_module: GraphModule) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight as (out, in), bias)."""
        weight = _attr(graph_module, self.weight.target)
        if self.weight_rows is not None:
            weight = weight[self.weight_rows[0]:self.weight_rows[1]]
        bias = _attr(graph_module, self.bias.target) if self.bias is not None else None
        if bias is not None and self.bias_rows is not None:
            bias = bias[self.bias_rows[0]:self.bias_rows[1]]
        return (weight.t() if self.transposed else weight), bias


def _parameter_rows(node: Any) -> Optional[tuple[Node, Optional[tuple[int, int]]]]:
    """(parameter get_attr, row range or None) when `node` is a parameter or a dim-0 slice of
    one (`getitem(split_with_sizes(p, sizes), i)`, `getitem(split(p, size), i)`,
    `slice(p, 0, a, b)`); None otherwise."""
    if isinstance(node, Node) and node.op == "get_attr":
        return node, None
    if is_call(node, operator.getitem) and is_call(node.args[0], aten.split_with_sizes.default,
                                                   aten.split.Tensor):
        split = node.args[0]
        source, index = split.args[0], node.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if not (isinstance(source, Node) and source.op == "get_attr") or dim != 0:
            return None
        if split.target is aten.split_with_sizes.default:
            sizes = list(split.args[1])
        else:
            total = _shape(source)[0]
            sizes = [min(split.args[1], total - low) for low in range(0, total, split.args[1])]
        low = sum(sizes[:index])
        return source, (low, low + sizes[index])
    if is_call(node, aten.slice.Tensor) and isinstance(node.args[0], Node) and \
            node.args[0].op == "get_attr" and node.args[1] == 0:
        total = _shape(node.args[0])[0]
        low = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        high = min(node.args[3] if len(node.args) > 3 else total, total)
        return node.args[0], (low, high)
    return None


# --------------------------------------------------------------------------------------------
# following the head factor (and a packed projection's part factor) through one op

HEADS, PART = "heads", "part"


@dataclass
class _Step:
    """How one path node carries the factors, and how to re-emit it with other sizes."""

    node: Node
    axes: dict[str, HeadAxis]                 # factor → where it sits in the output
    reshape_indices: dict[str, int] = field(default_factory=dict)  # reshape: factor → dim
    extract: Optional[int] = None             # the packed part this node takes out


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(concrete(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _axis_after_reshape(in_shape, out_shape, axis: HeadAxis, size: int) -> tuple[HeadAxis, int]:
    stride = axis.inner * math.prod(in_shape[axis.dim + 1:])
    suffix = 1
    for j in range(len(out_shape) - 1, -1, -1):
        if suffix <= stride < suffix * out_shape[j]:
            inner = stride // suffix
            if stride % suffix or out_shape[j] % (inner * size):
                break
            return HeadAxis(j, inner), j
        suffix *= out_shape[j]
    raise SurgeryRefused(f"a reshape {tuple(in_shape)} → {tuple(out_shape)} splits the heads")


def _follow(node: Node, source: Node, axis: HeadAxis, size: int,
            path: set[Node]) -> tuple[HeadAxis, Optional[int]]:
    """Where one factor of `size` sits after `node`, given its place in `source` (the node's
    path input; `path`: the nodes carrying the factor so far); and, for reshapes, the output
    dim that holds it. SurgeryRefused if the op does not act on each slice of the factor
    alike."""
    in_shape, out_shape = _shape(source), _shape(node)
    if in_shape is None:
        raise SurgeryRefused(f"`{source.name}` has no recorded shape")
    target = node.target
    rank = len(in_shape)

    def dim_arg(value) -> int:
        return value % rank if isinstance(value, int) else value

    if target in RESHAPE_TARGETS or target in (aten.flatten.using_ints, aten.unflatten.int):
        return _axis_after_reshape(in_shape, out_shape, axis, size)
    if target is aten.transpose.int:
        a, b = dim_arg(node.args[1]), dim_arg(node.args[2])
        return HeadAxis({a: b, b: a}.get(axis.dim, axis.dim), axis.inner), None
    if target is aten.permute.default:
        order = [dim_arg(d) for d in node.args[1]]
        return HeadAxis(order.index(axis.dim), axis.inner), None
    if target is aten.unsqueeze.default:
        where = node.args[1] % (rank + 1)
        return HeadAxis(axis.dim + (where <= axis.dim), axis.inner), None
    if target in (aten.squeeze.dim, aten.select.int, aten.unbind.int):
        where = dim_arg(node.args[1] if len(node.args) > 1 else 0)
        if where == axis.dim:
            raise SurgeryRefused(f"`{node.name}` removes the heads dim")
        return HeadAxis(axis.dim - (where < axis.dim), axis.inner), None
    if target in (aten.slice.Tensor, aten.cat.default, aten.split.Tensor, aten.chunk.default,
                  aten.split_with_sizes.default):
        if target in (aten.slice.Tensor, aten.cat.default):
            where = node.args[1] if len(node.args) > 1 else 0
        else:
            where = node.args[2] if len(node.args) > 2 else 0
        if dim_arg(where) == axis.dim:
            raise SurgeryRefused(f"`{node.name}` slices or concatenates along the heads dim")
        return axis, None
    if target in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        dims = [dim_arg(d) for d in (node.args[1] or range(rank))]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if axis.dim in dims or not keepdim:
            raise SurgeryRefused(f"`{node.name}` reduces over the heads or drops dims")
        return axis, None
    if target in ELEMENTWISE_TARGETS:
        if out_shape is None or len(out_shape) != rank:
            raise SurgeryRefused(f"`{node.name}` broadcasts the head path to another rank")
        for arg in node.all_input_nodes:
            side = _shape(arg)  # a side input (RoPE's cos/sin, a norm weight) must be shared
            if arg in path or side is None:
                continue
            offset = len(side) - rank + axis.dim
            if 0 <= offset < len(side) and side[offset] != 1:
                raise SurgeryRefused(f"`{node.name}` reads `{arg.name}` with a size-"
                                     f"{side[offset]} heads dim (a per-head tensor)")
        return axis, None
    raise SurgeryRefused(f"`{node.format_node()[:120]}` is not known to act on each head "
                         "alike")


TUPLE_TARGETS = frozenset({aten.unbind.int, aten.split.Tensor, aten.chunk.default,
                           aten.split_with_sizes.default})
#: Marks a tuple (split/unbind) over a packed projection's parts: its getitem takes one.
PART_PENDING = "part pending"


def _splits_parts(node: Node, shape: tuple, part: HeadAxis, parts: int) -> bool:
    """Whether a split/unbind/chunk cuts a packed tensor into exactly its parts. Parts are the
    outer factor of their dim (q, k, v as consecutive row blocks)."""
    dim = (node.args[2] if node.target is not aten.unbind.int else node.args[1]) \
        if len(node.args) > (1 if node.target is aten.unbind.int else 2) else 0
    if dim % len(shape) != part.dim or shape[part.dim] != parts * part.inner:
        return False
    if node.target is aten.unbind.int:
        return part.inner == 1
    if node.target is aten.split.Tensor:
        return node.args[1] == part.inner
    if node.target is aten.chunk.default:
        return node.args[1] == parts
    return set(node.args[1]) == {part.inner}


def _selected_part(node: Node, shape: tuple, part: HeadAxis, parts: int) -> Optional[int]:
    """The packed part a select/slice takes (None: it takes none)."""
    if shape[part.dim] != parts * part.inner or node.args[1] % len(shape) != part.dim:
        return None
    if node.target is aten.select.int and part.inner == 1:
        return node.args[2] % parts
    if node.target is aten.slice.Tensor:
        low, high = node.args[2], min(node.args[3], shape[part.dim])
        if high - low == part.inner and low % part.inner == 0:
            return low // part.inner
    return None


def _trace_steps(start: Node, nodes: list[Node],
                 factors: dict[str, tuple[HeadAxis, int]]) -> list[_Step]:
    """Follow each factor (name → (axis in `start`, size)) through `nodes` (graph order);
    the part factor ends where a node takes one part out."""
    axes: dict[Node, dict[str, HeadAxis]] = {start: {f: a for f, (a, _) in factors.items()}}
    sizes = {f: n for f, (_, n) in factors.items()}
    steps = []
    for node in nodes:
        if node.target is operator.getitem:
            producer_axes = axes[node.args[0]]
            step = _Step(node, {f: a for f, a in producer_axes.items() if f != PART_PENDING})
            if PART_PENDING in producer_axes:
                step.extract = node.args[1]
            axes[node] = step.axes
            steps.append(step)
            continue
        sources = [a for a in node.all_input_nodes if a in axes]
        source = sources[0]
        if any(axes[a] != axes[source] for a in sources[1:]):
            raise SurgeryRefused(f"`{node.name}` combines tensors with heads on different "
                                 "dims")
        step = _Step(node, {})
        shape = _shape(source)
        part = axes[source].get(PART)
        if part is not None and node.target in TUPLE_TARGETS and \
                _splits_parts(node, shape, part, sizes[PART]):
            step.axes[PART_PENDING] = part
        elif part is not None and node.target in (aten.select.int, aten.slice.Tensor):
            step.extract = _selected_part(node, shape, part, sizes[PART])
        takes_part = PART_PENDING in step.axes or step.extract is not None
        for factor, axis in axes[source].items():
            if factor == PART and takes_part:
                continue
            if takes_part and axis.dim == part.dim and node.target is not aten.select.int:
                step.axes[factor] = axis  # parts are cut whole: the heads inside stay put
                continue
            new_axis, index = _follow(node, source, axis, sizes[factor], set(axes))
            step.axes[factor] = new_axis
            if index is not None:
                step.reshape_indices[factor] = index
        axes[node] = step.axes
        steps.append(step)
    return steps


# --------------------------------------------------------------------------------------------
# paths


def _descendants_within(source: Node, allowed: set[Node]) -> list[Node]:
    """Nodes of `allowed` reachable from `source`, in graph order (source excluded)."""
    reached = {source}
    for node in source.graph.nodes:
        if node in allowed and node is not source and \
                any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return [n for n in source.graph.nodes if n in reached and n is not source]


def find_core(operand: Node) -> Optional[Core]:
    """The projection an operand was computed from: its first value input walked back."""
    node = operand
    for _ in range(32):
        core = Core.of(node)
        if core is not None:
            return core
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        node = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
    return None


def _resized(value, old: int, new: int, sizes: list) -> Any:
    """One size of a reshape's size list with a factor resized from `old` to `new`."""
    if isinstance(value, int):
        return value if value == -1 else value // old * new
    if -1 not in sizes:
        return -1
    raise SurgeryRefused("a reshape gives the heads dim as a symbolic size beside an inferred "
                         "one")


@dataclass
class InputPath:
    """A projection and the ops from its output to one attention operand. A packed projection
    (q, k, v in one matmul) has `parts` > 1 and this operand's rows are part `part`."""

    core: Core
    steps: list[_Step]       # core → operand, in graph order
    heads: int
    head_inner: int          # features per head in the core's output (the head dim)
    parts: int
    part: int

    def rebuild(self, graph_module: GraphModule, head_map: Sequence[Sequence[int]],
                name: str) -> Node:
        """Emit this path for `head_map` (new head i = mean of old heads head_map[i]) from a
        new projection holding only this operand's rows; return the new operand node. The
        old path is left for dead-code elimination."""
        weight, bias = self.core.rows(graph_module)
        width = weight.shape[0] // self.parts
        rows = slice(self.part * width, (self.part + 1) * width)
        axis = HeadAxis(0, self.head_inner)
        new_weight = map_heads(weight[rows], axis, self.heads, head_map)
        new_bias = map_heads(bias[rows], axis, self.heads, head_map) if bias is not None \
            else None
        sizes = {HEADS: (self.heads, len(head_map)), PART: (self.parts, 1)}
        emitter = Emitter(graph_module, self.core.node)
        site = next(iter(real_users(self.steps[-1].node if self.steps else self.core.node)))
        with graph_module.graph.inserting_before(site):  # after every side input of the path
            mapping = {self.core.node: emitter.core(self.core, new_weight, new_bias, name)}
            for step in self.steps:
                mapping[step.node] = emitter.replay(step, mapping, sizes)
        return mapping[self.steps[-1].node] if self.steps else mapping[self.core.node]


def trace_input(site_node: Node, index: int) -> InputPath:
    """The path from operand `index` (0 q, 1 k, 2 v) of a canonical site back to the
    projection that computes it."""
    operand = site_node.args[index]
    if not isinstance(operand, Node):
        raise SurgeryRefused("the operand is not computed in the graph")
    core = find_core(operand)
    if core is None:
        raise SurgeryRefused("no plain projection (linear or addmm with a weight parameter) "
                             "computes it")
    if len(real_users(operand)) != 1:
        raise SurgeryRefused(f"`{operand.name}` is also used outside this site")
    between = ancestors([operand])
    nodes = _descendants_within(core.node, between)
    heads, head_dim = _shape(operand)[1], _shape(operand)[-1]
    features = _shape(core.node)[-1]
    if features % (heads * head_dim):
        raise SurgeryRefused(f"`{core.node.name}` has {features} features, not a multiple of "
                             f"{heads} heads × {head_dim}")
    parts = features // (heads * head_dim)
    factors = {HEADS: (HeadAxis(len(_shape(core.node)) - 1, head_dim), heads)}
    if parts > 1:
        factors[PART] = (HeadAxis(len(_shape(core.node)) - 1, heads * head_dim), parts)
    steps = _trace_steps(core.node, nodes, factors)
    extracted = [s.extract for s in steps if s.extract is not None]
    if parts > 1 and len(extracted) != 1:
        raise SurgeryRefused(f"the part of the packed projection `{core.weight.target}` this "
                             "operand reads was not found")
    final = steps[-1].axes if steps else factors
    if final.get(HEADS) != HeadAxis(1, 1):
        raise SurgeryRefused(f"the heads of `{core.node.name}` do not reach the attention's "
                             "head dim (features not laid out head-major)")
    taken = [s.node for s in steps if s.extract is not None]
    shared = ancestors(taken[:1])  # up to the part taken, the other operands read it too
    for step in steps:  # after the part is taken, nothing on the path may have other readers
        if step.node is operand or step.node in shared:
            continue
        outside = [u for u in real_users(step.node) if u not in between]
        if outside:
            raise SurgeryRefused(f"`{step.node.name}` on the path is also read by "
                                 f"`{outside[0].name}`")
    if parts == 1 and len(real_users(core.node)) != 1:
        raise SurgeryRefused(f"the projection `{core.node.name}` has other readers")
    return InputPath(core, steps, heads, head_dim, parts, extracted[0] if extracted else 0)


@dataclass
class OutputPath:
    """The ops from a site's output to the projection that reads it (the out-projection)."""

    core: Core
    steps: list[_Step]
    heads: int
    head_inner: int  # input features per head of the out-projection

    def rebuild(self, graph_module: GraphModule, new_site: Node,
                head_map: Sequence[Sequence[int]], name: str) -> Node:
        """Emit the path from `new_site` (the site rebuilt with len(head_map) heads; the path's
        first node reads it) to a new out-projection whose input columns follow `head_map`;
        return the new out-projection node."""
        weight, bias = self.core.rows(graph_module)
        columns = map_heads(weight.t(), HeadAxis(0, self.head_inner), self.heads, head_map,
                            pool=False).t()
        emitter = Emitter(graph_module, self.core.node)
        sizes = {HEADS: (self.heads, len(head_map))}
        mapping = {}
        with graph_module.graph.inserting_before(self.core.node):
            for step in self.steps:
                mapping[step.node] = emitter.replay(step, mapping, sizes)
            source = mapping[self.steps[-1].node] if self.steps else new_site
            return emitter.core(self.core, columns, bias, name, source)


def trace_output(site_node: Node) -> OutputPath:
    """The path from a canonical site's output to the projection that reads it."""
    heads = _shape(site_node)[1]
    node, nodes = site_node, []
    for _ in range(16):
        users = real_users(node)
        if len(users) != 1:
            raise SurgeryRefused(f"`{node.name}` is read by {len(users)} nodes, not one "
                                 "out-projection")
        (user,) = users
        if user.op != "call_function":
            raise SurgeryRefused("the site's output leaves the graph before any "
                                 "out-projection reads it")
        core = Core.of(user)
        if core is not None and core.input is node:
            steps = _trace_steps(site_node, nodes, {HEADS: (HeadAxis(1, 1), heads)})
            axis = steps[-1].axes[HEADS] if steps else HeadAxis(1, 1)
            shape = _shape(node)
            if axis.dim != len(shape) - 1 or axis.inner * heads != shape[-1]:
                raise SurgeryRefused(f"the out-projection `{user.name}` does not read the "
                                     "heads as its input features")
            return OutputPath(core, steps, heads, axis.inner)
        nodes.append(user)
        node = user
    raise SurgeryRefused("no out-projection reads the site's output")


# --------------------------------------------------------------------------------------------
# weights and emission


def map_heads(rows: torch.Tensor, axis: HeadAxis, heads: int,
              head_map: Sequence[Sequence[int]], pool: bool = True) -> torch.Tensor:
    """Rows (features on dim 0, laid out outer·heads·inner) for new heads: new head i is the
    mean (`pool`) or the sum of old heads head_map[i] — one head each to keep or permute."""
    features = rows.shape[0]
    inner = axis.inner
    outer = features // (heads * inner)
    grouped = rows.reshape(outer, heads, inner, *rows.shape[1:])
    parts = []
    for members in head_map:
        picked = grouped[:, list(members)]
        parts.append(picked.mean(1) if pool else picked.sum(1))
    return torch.stack(parts, 1).reshape(outer * len(head_map) * inner,
                                         *rows.shape[1:]).contiguous()


def _attr(graph_module: GraphModule, target: str) -> torch.Tensor:
    owner = graph_module
    *path, leaf = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, leaf)


@dataclass
class Emitter:
    """Creates nodes with fake values and the module stack of a reference node."""

    graph_module: GraphModule
    reference: Node
    fake_mode: Any = field(init=False)

    def __post_init__(self):
        self.fake_mode = detect_fake_mode([self.reference.meta.get("val")])

    def emit(self, target: Callable, *args, like: Optional[Node] = None, **kwargs) -> Node:
        """A call of `target`, with the module stack of `like` (default: the reference)."""
        node = self.graph_module.graph.call_function(target, args, kwargs)
        stack = (like or self.reference).meta.get("nn_module_stack")
        if stack is not None:
            node.meta["nn_module_stack"] = dict(stack)
        if self.fake_mode is not None:
            fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs),
                                                           lambda n: n.meta.get("val"))
            with self.fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def buffer(self, tensor: torch.Tensor, base: str) -> Node:
        """A new buffer of the graph module and the get_attr node reading it."""
        name = unique_attr(self.graph_module, base)
        self.graph_module.register_buffer(name, tensor)
        node = self.graph_module.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor)
        return node

    def parameter(self, tensor: torch.Tensor, base: str, like: Node) -> Node:
        name = unique_attr(self.graph_module, base)
        old = _attr(self.graph_module, like.target)
        self.graph_module.register_parameter(
            name, torch.nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad))
        node = self.graph_module.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(getattr(self.graph_module, name))
        return node

    def core(self, core: Core, weight: torch.Tensor, bias: Optional[torch.Tensor], name: str,
             new_input: Optional[Node] = None) -> Node:
        """A copy of `core` with new weights (given as (out, in))."""
        weight_node = self.parameter(weight.t() if core.transposed else weight,
                                     f"attnopt_{name}_weight", core.weight)
        bias_node = self.parameter(bias, f"attnopt_{name}_bias", core.bias) \
            if bias is not None else None
        source = new_input if new_input is not None else core.input
        if core.transposed:
            return self.emit(aten.addmm.default, bias_node, source, weight_node)
        return self.emit(aten.linear.default, source, weight_node, bias_node)

    def replay(self, step: _Step, mapping: dict, sizes: dict[str, tuple[int, int]]) -> Node:
        """Re-emit a path node on the rebuilt inputs, with each factor's old size replaced by
        its new one (sizes: factor → (old, new)). The rebuilt projection holds one part, so
        the nodes that took a packed part out become what taking the only part is: nothing for
        a split, chunk or slice (the tensor is the part), a squeeze for an unbind, select 0."""
        node = step.node
        args = list(torch.fx.node.map_arg(node.args, lambda n: mapping.get(n, n)))
        if PART_PENDING in step.axes:  # split / chunk / unbind over the parts
            if node.target is aten.unbind.int:
                return self.emit(aten.squeeze.dim, args[0], node.args[1]
                                 if len(node.args) > 1 else 0)
            return args[0]
        if step.extract is not None:
            if node.target is operator.getitem:
                return args[0]  # the tuple node above already became the part
            if node.target is aten.select.int:
                args[2] = 0
            else:  # slice
                return args[0]
        position = 1 if node.target in RESHAPE_TARGETS else \
            2 if node.target is aten.unflatten.int else None
        if position is not None and step.reshape_indices:
            shape = list(args[position])
            offset = node.args[1] % len(_shape(node.args[0])) \
                if node.target is aten.unflatten.int else 0
            for factor, index in step.reshape_indices.items():
                old, new = sizes[factor]
                shape[index - offset] = _resized(shape[index - offset], old, new, shape)
            args[position] = shape
        return self.emit(node.target, *args, like=node, **node.kwargs)


# --------------------------------------------------------------------------------------------
# the site itself


def weight_rule_sites(graph_module: GraphModule, context, kind: str) -> list[tuple]:
    """(node, site, params, why) of every canonical site a `kind` weights rule selects. Sites
    whose `kind` rewrite the guard rolled back are left out, the guard's reason noted."""
    from attnopt.ops import ATTENTION_OP
    from attnopt.passes.canonicalize import SITE_META_KEY
    selected = []
    for node in graph_module.graph.nodes:
        site = node.meta.get(SITE_META_KEY)
        if node.target is not ATTENTION_OP or site is None:
            continue
        chosen = context.policy.weight_rewrites(site).get(kind)
        if chosen is None:
            continue
        if context.rolled_back(site.name, kind):
            if (site.name, kind) in context.exact_sites:
                context.note_weights(site.name, context.exact_sites[(site.name, kind)])
            continue
        selected.append((node, site, *chosen))
    return selected


def site_args(node: Node) -> list:
    """A canonical site's arguments, padded: q, k, v, mask, is_causal, scale, enable_gqa,
    softcap, window_left, alibi_slopes."""
    names = ("q", "k", "v", "attn_mask", "is_causal", "scale", "enable_gqa", "softcap",
             "window_left", "alibi_slopes")
    defaults = [None, None, None, None, False, None, False, None, None, None]
    args = list(node.args) + defaults[len(node.args):]
    for index, name in enumerate(names):
        if name in node.kwargs:
            args[index] = node.kwargs[name]
    return args


def replace_site(graph_module: GraphModule, node: Node, q: Node, k: Node, v: Node,
                 context, query_heads: Optional[Sequence[int]] = None) -> Node:
    """A new call of the canonical op on (q, k, v) in place of `node` (enable_gqa set from the
    head counts); the site's measurement point follows it. `query_heads`: the old query heads
    the new q holds, in order, when they changed — a per-head mask (ALiBi, a relative position
    bias) then keeps those heads' rows, and ALiBi those heads' slopes."""
    from attnopt.ops import ATTENTION_OP
    from attnopt.passes.canonicalize import SITE_META_KEY
    args = site_args(node)
    args[0:3] = q, k, v
    args[6] = concrete(k.meta["val"].shape[1]) != concrete(q.meta["val"].shape[1]) or \
        bool(args[6])
    while len(args) > 7 and args[-1] is None:  # trailing defaults (softcap …) stay implicit
        args = args[:-1]
    emitter = Emitter(graph_module, node)
    with graph_module.graph.inserting_before(node):
        mask, slopes = args[3], args[9] if len(args) > 9 else None
        per_head = [(3, mask, -3)] if per_head_mask(mask) else []
        per_head += [(9, slopes, -1)] if slopes is not None else []
        if query_heads is not None and per_head:
            index_node = emitter.buffer(torch.tensor(list(query_heads)),
                                        f"attnopt_{node.name}_heads")
            for position, tensor, heads_dim in per_head:  # the heads axis from the end
                args[position] = emitter.emit(aten.index_select.default, tensor,
                                              tensor.meta["val"].dim() + heads_dim, index_node)
        new = emitter.emit(ATTENTION_OP, *args)
    site = node.meta[SITE_META_KEY]
    new.meta[SITE_META_KEY] = site
    node.replace_all_uses_with(new)
    graph_module.graph.erase_node(node)
    old_name, new_name = context.site_nodes[site.name]
    if new_name == node.name:
        context.site_nodes[site.name] = (old_name, new.name)
    return new


def per_head_mask(mask: Any) -> bool:
    """Whether a site's mask has a heads dim of more than one (a per-head bias)."""
    val = mask.meta.get("val") if isinstance(mask, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() >= 3 and concrete(val.shape[-3]) > 1


def replace_out_projection(path: OutputPath, new_out: Node, site_name: str, context) -> None:
    """Swap in a rebuilt out-projection; from now on the site is measured at its output (the
    attention output itself has other heads than the original's)."""
    path.core.node.replace_all_uses_with(new_out)
    if site_name not in context.measured_after_projection:
        context.site_nodes[site_name] = (path.core.node.name, new_out.name)
        context.measured_after_projection.add(site_name)
    else:
        old_name, _ = context.site_nodes[site_name]
        context.site_nodes[site_name] = (old_name, new_out.name)
