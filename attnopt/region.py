"""A captured region: its original and rewritten graphs, the passes that ran, and verification.

`build_region` runs the pass pipeline on one `CapturedProgram`; `verify_region` compares the
original and the rewritten graph on the examples and fresh draws (outputs and every site);
`InputSignature` says which calls a region's graph accepts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from attnopt.capture import CapturedProgram
from attnopt.errors import VerificationError
from attnopt.passes.approximate import ApproximateAttention
from attnopt.passes.canonicalize import CanonicalizeAttention
from attnopt.passes.classify import ClassifyMasks
from attnopt.passes.cleanup import DropReplacedParameters, EliminateDeadCode
from attnopt.passes.gqa import ConvertToGroupedQuery
from attnopt.passes.prune import PruneHeads
from attnopt.passes.quantize import QuantizeProjections
from attnopt.passes.fx_utils import eliminate_dead_code
from attnopt.passes.detect import DetectAttention
from attnopt.passes.inplace import FunctionalizeArithmetic
from attnopt.passes.lower import SelectBackends
from attnopt.passes.evaluate import (
    EvaluationPlan, flat_inputs, plan_evaluation, record_values, run_plan,
)
from attnopt.passes.manager import PassContext, PassManager
from attnopt.policy import Policy
from attnopt.runner import eager_graph, fast_view, sync_state
from attnopt.unpadded import UnpaddedGraphs, unpadded_enabled
from attnopt.verify import ErrorStats, compare_outputs, format_table, input_draws


# --------------------------------------------------------------------------------------------
# input signatures


@dataclass(frozen=True)
class InputSignature:
    """What a captured graph accepts: input structure, dtypes, static dims, constants."""

    spec: Any
    leaves: tuple

    @staticmethod
    def of(graph_module: GraphModule, args: tuple, kwargs: dict) -> "InputSignature":
        flat, spec = pytree.tree_flatten((args, kwargs))
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        shapes = {}  # placeholders pair with the graph's own flattening (None inputs included)
        for node, leaf in zip(placeholders, flat_inputs(graph_module, args, kwargs)):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shapes[id(leaf)] = tuple(d if isinstance(d, int) else None for d in val.shape)
        leaves = []
        for leaf in flat:
            if isinstance(leaf, torch.Tensor):
                dims = shapes.get(id(leaf), tuple(leaf.shape))
                leaves.append(("tensor", leaf.dtype, leaf.device.type, dims))
            else:
                leaves.append(("const", _hashable(leaf)))
        return InputSignature(spec, tuple(leaves))

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec or len(flat) != len(self.leaves):
            return False
        for leaf, expected in zip(flat, self.leaves):
            if expected[0] == "tensor":
                if not isinstance(leaf, torch.Tensor) or leaf.dtype != expected[1] or \
                        leaf.device.type != expected[2] or leaf.dim() != len(expected[3]):
                    return False
                for dim, size in zip(expected[3], leaf.shape):
                    if (dim is not None and dim != size) or (dim is None and size < 2):
                        return False  # (export specializes sizes 0 and 1)
            elif isinstance(leaf, torch.Tensor) or _hashable(leaf) != expected[1]:
                return False
        return True


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


# --------------------------------------------------------------------------------------------
# one captured region through the passes and verification


@dataclass
class Region:
    captured: CapturedProgram
    original: GraphModule
    rewritten: GraphModule
    context: PassContext
    passes: list
    signature: InputSignature
    errors: dict[str, ErrorStats] = field(default_factory=dict)
    output_error: Optional[ErrorStats] = None
    draws: int = 0
    skipped_draws: int = 0
    rolled_back: dict[str, dict] = field(default_factory=dict)  # guard: site → measurement
    #: guard with a task metric: {original, optimized, max_drop, passed}; it replaces the
    #: error budget as the gate for the approximate sites (their values must stay finite)
    metric: Optional[dict] = None
    #: the training mode the graph holds only in (`captured_mode`), or None for either mode
    mode: Optional[bool] = None
    #: the fast view of `rewritten` that calls run (made at the first call)
    _runner: Optional[GraphModule] = field(default=None, repr=False, compare=False)
    #: the specializations for unpadded batches (`unpadded.py`; False where there are none)
    _unpadded: Any = field(default=None, repr=False, compare=False)

    @property
    def approximations(self) -> dict[str, dict]:
        return self.context.approximations

    def site_passed(self, name: str) -> bool:
        """Exact sites within the dtype tolerance; approximate ones within the budget."""
        stats = self.errors.get(name)
        if stats is None:
            return True
        if name not in self.approximations:
            return stats.passed
        if self.metric is not None:
            return stats.finite_ok
        budget = self.context.policy.budget
        return stats.finite_ok and stats.rel_err <= budget.site_rel_err and \
            stats.cosine >= budget.site_min_cosine

    @property
    def output_passed(self) -> bool:
        if self.output_error is None:
            return True
        if not self.approximations:
            return self.output_error.passed
        if self.metric is not None:
            return self.output_error.finite_ok and self.metric["passed"]
        return self.output_error.finite_ok and \
            self.output_error.rel_err <= self.context.policy.budget.output_rel_err

    @property
    def passed(self) -> bool:
        return self.output_passed and all(self.site_passed(name) for name in self.errors)

    def run(self, args: tuple, kwargs: Optional[dict] = None):
        return call_graph(self, args, kwargs or {})

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        """Whether the graph computes this call: the inputs' signature, and the module's
        training mode where the graph holds in one mode only (`captured_mode`)."""
        return (self.mode is None or self.captured.module.training == self.mode) and \
            self.signature.accepts(args, kwargs)

    def runner(self, args: Optional[tuple] = None, kwargs: Optional[dict] = None
               ) -> GraphModule:
        """`rewritten` as calls run it: a view of its eager copy (`runner.eager_graph`,
        `runner.fast_view`; the passes are done by then), or `rewritten` itself under
        torch.compile. For a call (`args`, `kwargs`) whose mask inputs are all ones, the view
        of the copy without the masks that all ones make redundant (`unpadded.py`)."""
        if torch.compiler.is_compiling():
            return self.rewritten
        if self._runner is None:
            self._runner = make_runner(self.rewritten)
        unpadded = self.unpadded() if args is not None and unpadded_enabled() else None
        if unpadded is not None:
            specialized = unpadded.runner_for(args, kwargs or {})
            if specialized is not None:
                return specialized
        return self._runner

    def unpadded(self) -> Optional[UnpaddedGraphs]:
        """The specializations for unpadded batches, or None where no site has a mask built
        from mask inputs alone (planned once; the passes are done by then)."""
        if self._unpadded is None:
            self._unpadded = UnpaddedGraphs.of(self.rewritten, self.captured.args,
                                               self.captured.kwargs, make_runner) or False
        return self._unpadded or None


def make_runner(graph_module: GraphModule) -> GraphModule:
    """What calls run for a rewritten graph: a view of its eager copy (`runner.py`)."""
    return fast_view(eager_graph(graph_module))


def pass_pipeline(policy: Policy) -> list:
    passes = [EliminateDeadCode(), FunctionalizeArithmetic(), DetectAttention(), ClassifyMasks()]
    if policy.rewrites_anything:
        passes.append(CanonicalizeAttention())
        if policy.weights:
            passes += [PruneHeads(), ConvertToGroupedQuery(), QuantizeProjections(),
                       DropReplacedParameters()]
        if policy.rules_approximate:
            passes.append(ApproximateAttention())
        passes.append(SelectBackends())
    return passes


def build_region(captured: CapturedProgram, policy: Policy, verify_each: bool,
                 exact_sites: Optional[dict] = None,
                 loss: Optional[Callable] = None,
                 entropy_cache: Optional[dict] = None) -> Region:
    """Run the pass pipeline on a captured program. `exact_sites` (site name, or (site,
    rewrite) → why) keeps those exact whatever the policy says: the guard's rollbacks. `loss`
    (the model's output → a scalar) lets head pruning score heads by gradient.
    `entropy_cache` carries the sites' attention entropies from one guard round to the next."""
    original = captured.exported.module()
    eliminate_dead_code(original)
    original.recompile()
    rewritten = captured.exported.module()
    context = PassContext(captured.args, captured.kwargs, policy, name_prefix=captured.path,
                          exact_sites=dict(exact_sites or {}), loss=loss,
                          entropy_cache=entropy_cache)

    def check(graph_module: GraphModule) -> None:  # verify_each: the examples only
        stats = compare_outputs(graph_module(*captured.args, **captured.kwargs),
                                captured.module(*captured.args, **captured.kwargs))
        if context.approximations:  # approximate passes are held to the budget
            within = stats.finite_ok and stats.rel_err <= policy.budget.output_rel_err
        else:
            within = stats.passed
        if not within:
            raise VerificationError("outputs differ", format_table([("output", stats)]))

    manager = PassManager(pass_pipeline(policy), verify_each=verify_each, check=check)
    with torch.no_grad():
        rewritten = manager.run(rewritten, context)
    signature = InputSignature.of(rewritten, captured.args, captured.kwargs)
    return Region(captured, original, rewritten, context, manager.records, signature,
                  mode=captured_mode(original, captured.module))


#: dropout ops as an exported graph holds them: (input, p, train), `train` the capture's mode
_DROPOUTS = {getattr(torch.ops.aten, name).default for name in (
    "dropout", "dropout_", "native_dropout", "feature_dropout", "feature_dropout_",
    "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_")}


def captured_mode(graph: GraphModule, module: nn.Module) -> Optional[bool]:
    """The training mode a captured graph is right in only: `module`'s mode at capture where
    the graph has a dropout with p > 0 or a batch norm (export bakes their `train` flag in, so
    an eval-mode graph would skip dropout in training), else None (the same in both modes).
    Calls in the other mode run the original module."""
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS:
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            if p != 0:
                return module.training
        elif "batch_norm" in str(node.target):
            return module.training
    return None


#: Bytes of original-graph values `OriginalRecordings` keeps across the guard's rounds (past
#: it, later rounds run the original graph again).
RECORDINGS_BUDGET = 1 << 30


class OriginalRecordings:
    """The original graph's outputs and watched values per verification input set, kept across
    the guard's rebuild-and-verify rounds: the original graph, its weights and the (seeded)
    draws are the same every round, so only the rewritten side needs running again. A round
    that watches a node no earlier round recorded records that input set again."""

    def __init__(self, budget: int = RECORDINGS_BUDGET):
        self.budget = budget
        self.bytes = 0
        # input set index -> (watched names, their values, outputs, bytes); None: it failed
        self.entries: dict[int, Optional[tuple[frozenset, dict, list, int]]] = {}
        self.runs = 0  # original-graph runs (what keeping them saves)

    def get(self, graph: GraphModule, index: int, args: tuple, kwargs: dict,
            watch: set) -> Optional[tuple[dict, list]]:
        """(watched values, outputs); None where the input set fails in the original graph."""
        entry = self.entries.get(index, ())
        if entry is None:
            return None
        if entry and watch <= entry[0]:
            return entry[1], entry[2]
        try:
            self.runs += 1
            old, reference = record_values(graph, args, kwargs, watch)
        except Exception:  # noqa: BLE001 - a draw outside what the capture accepts
            if index == 0:
                raise
            self.entries[index] = None
            return None
        if entry:  # recorded before, for fewer nodes: replaced
            self.bytes -= entry[3]
            del self.entries[index]
        size = sum(t.numel() * t.element_size() for t in pytree.tree_leaves((old, reference))
                   if isinstance(t, torch.Tensor))
        if self.bytes + size <= self.budget:
            self.entries[index] = (frozenset(watch), old, reference, size)
            self.bytes += size
        return old, reference


@torch.no_grad()
def verify_region(region: Region, draws: int,
                  recordings: Optional[OriginalRecordings] = None) -> None:
    """Original vs rewritten on the examples and fresh draws: outputs, and every site alone.

    Per input set the original graph runs once (through an Interpreter that keeps each site's
    output and the inputs of its replacement; `recordings` keeps those across calls) and the
    rewritten graph runs as users call it, both with SDPA on `reference_sdpa_backends`. Each
    site's error is measured in isolation: its replacement is replayed on the original run's
    values, so an upstream site's error never counts against a downstream one.
    """
    names = region.context.site_nodes
    sync_state(region.rewritten, region.captured.module)
    replays = {site: replay_plan(region, new, site) for site, (_, new) in names.items()}
    watch = {old for old, _ in names.values()} | \
        {name for plan in replays.values() for name in plan.input_names}
    recordings = recordings or OriginalRecordings(budget=0)
    draws_list = input_draws(region.captured.args, region.captured.kwargs, draws=draws)
    for index, (args, kwargs) in enumerate(draws_list):
        with reference_sdpa_backends():
            with same_random_draws(index):
                recorded = recordings.get(region.original, index, args, kwargs, watch)
            if recorded is None:  # (e.g. values a data-dependent branch specialized on)
                region.skipped_draws += 1
                continue
            old, reference = recorded
            with same_random_draws(index):
                candidate = call_graph(region, args, kwargs)
            replayed = {site_name: run_plan(replays[site_name], old)[0]
                        for site_name in names}
        region.output_error = compare_outputs(candidate, reference).worst(region.output_error)
        for site_name, (old_name, _) in names.items():
            site_stats = compare_outputs(replayed[site_name], old[old_name])
            region.errors[site_name] = site_stats.worst(region.errors.get(site_name))
        region.draws += 1


#: the random state each verification input set starts from (`same_random_draws`)
VERIFY_SEED = 20260


@contextlib.contextmanager
def same_random_draws(index: int):
    """Run one verification input set from a fixed random state, restored afterwards: a graph
    captured in training mode draws its dropout masks in the same order in the original and the
    rewritten graph (rewrites never touch a dropout), so both draw the same masks. Fixed, not
    just forked, because `OriginalRecordings` reuses an original run in later guard rounds;
    restored, so the user's random stream is left as it was."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(VERIFY_SEED + index)
        yield


def reference_sdpa_backends():
    """SDPA restricted to the backends that compute its definition everywhere (flash,
    efficient, math), for both sides of a verification. cuDNN's backend, which PyTorch
    prefers on recent GPUs, returns other values than the definition's zeros on query rows
    that see no key at all (the padding rows of a left-padded batch; measured on an H100 with
    torch 2.11, docs/BENCHMARKS.md); with it as the reference, the generated kernel, which
    returns zeros there, would be failed for rows whose output carries no information."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def replay_plan(region: Region, new_name: str, site: str = "") -> EvaluationPlan:
    """How to compute a site's replacement in the rewritten graph from the values of the
    nodes it reads that the original graph also has (parameters are read from the graph).

    Nodes downstream of the site's own new nodes upstream of it (its int8 projections) are
    recomputed even where they keep an original name (the views between a projection and
    the attention), so the site's error includes its projections'."""
    original_names = {n.name for n in region.original.graph.nodes}
    (target,) = [n for n in region.rewritten.graph.nodes if n.name == new_name]
    members = region.context.site_members.get(site, set())
    recomputed: set = set()
    for node in region.rewritten.graph.nodes if members else ():
        if node.name in members or any(a in recomputed for a in node.all_input_nodes):
            recomputed.add(node)
    return plan_evaluation(region.rewritten, [target], lambda node: node is not target and
                           node.name in original_names and node.op != "get_attr" and
                           node not in recomputed)


def call_graph(region: Region, args: tuple, kwargs: dict):
    runner = region.runner(args, kwargs)
    sync_state(runner, region.captured.module)
    return runner(*args, **kwargs)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def signature_key(args: tuple, kwargs: dict) -> tuple:
    """A hashable description of a call's inputs: shapes and dtypes, constants by repr."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec),) + tuple((tuple(t.shape), t.dtype, t.device.type)
                                if isinstance(t, torch.Tensor) else repr(t) for t in leaves)


class RegionCache:
    """The rewritten graphs of one module or function, by input signature.

    `find` returns the region whose graph accepts a call; for a signature none accepts it
    builds one (capture, rewrite, verify) once. A signature whose build fails — with one of
    the `tolerated` errors — or yields nothing is remembered, and its calls run the original.
    Regions may carry a `tag` that must match too (an attention function's constants).
    """

    def __init__(self, regions=(), tags=(), tolerated: tuple = (Exception,)):
        self.regions: list[Region] = list(regions)
        self.tags: list = list(tags) or [None] * len(self.regions)
        self.tolerated = tolerated
        self.refused: set = set()

    def find(self, args: tuple, kwargs: dict, build: Callable, tag=None) -> Optional[Region]:
        for region, region_tag in zip(self.regions, self.tags):
            if region_tag == tag and region.accepts(args, kwargs):
                return region
        key = (repr(tag), signature_key(args, kwargs))
        if key in self.refused:
            return None
        self.refused.add(key)  # one attempt per signature, whatever happens
        try:
            region = build(args, kwargs, tag)
        except self.tolerated:
            return None
        if region is not None:
            self.regions.append(region)
            self.tags.append(tag)
        return region
