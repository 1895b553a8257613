"""The pass manager: runs named graph passes, records what each did, checks the graph after each.

A pass is any callable `(graph_module, context) -> PassResult` with a `name`. After every pass
the manager lints the graph, removes dead code and recompiles; it records wall time and the
changes the pass reports. With `verify_each=True` it also runs the graph on the examples after
each pass and names the pass that broke equivalence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from torch.fx import GraphModule

from attnopt.errors import PassError, VerificationError
from attnopt.passes.fx_utils import eliminate_dead_code
from attnopt.site import AttentionSite, Rejection


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    changes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What passes share explicitly: examples, the policy, and the sites found so far."""

    args: tuple
    kwargs: dict
    policy: Any
    name_prefix: str = ""
    matches: list = field(default_factory=list)           # detect → classify → canonicalize
    mask_infos: dict = field(default_factory=dict)        # match index → MaskInfo
    sites: list[AttentionSite] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict)  # site → (rewrite, why)
    site_nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # site → (old, new)
    backends: dict[str, tuple[str, str]] = field(default_factory=dict)    # site → (backend, why)
    rule_params: dict[str, dict] = field(default_factory=dict)            # site → rule params
    # guard rollbacks: site → why (the whole site stays exact), or (site, component) → why
    # for one of its rewrites ("attention", "gqa", "prune_heads", "int8")
    exact_sites: dict = field(default_factory=dict)
    approximations: dict[str, dict] = field(default_factory=dict)  # site → variant, params, …
    # weight rewrites: sites whose head count changed are measured at the out-projection's
    # output (site_nodes names those nodes); notes on weight rewrites not applied
    measured_after_projection: set[str] = field(default_factory=set)
    weight_notes: dict[str, list[str]] = field(default_factory=dict)
    replaced_parameters: set[str] = field(default_factory=set)   # dropped when unused
    # site → new nodes its rewrites put upstream of its measurement point under views that
    # keep their original names (verification recomputes what depends on them)
    site_members: dict[str, set[str]] = field(default_factory=dict)
    loss: Optional[Callable] = None  # optimize(loss=...): the model's output → a scalar
    # the guard's rounds share the exact attention's row entropies (a diagnostic that needs
    # the graph run up to each site): (site, weight rewrites applied) → entropy
    entropy_cache: Optional[dict] = None


    def rolled_back(self, site: str, component: str) -> Optional[str]:
        """Why the guard keeps `component` of `site` exact (None: it does not)."""
        return self.exact_sites.get(site) or self.exact_sites.get((site, component))

    def note_weights(self, site: str, text: str) -> None:
        """A line for the site's report about its weight rewrites."""
        self.weight_notes.setdefault(site, []).append(text)

    def record_weights(self, site: str, kind: str, info: dict) -> None:
        """A weight rewrite applied at `site` (the guard and the report read it)."""
        entry = self.approximations.setdefault(site, {"variant": "exact", "params": {}})
        entry.setdefault("weights", {})[kind] = info


class GraphPass(Protocol):
    name: str

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    changes: list[str]

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 6), "modified": self.modified,
                "changes": list(self.changes)}


class PassManager:
    def __init__(self, passes: list[GraphPass], *, verify_each: bool = False,
                 check: Optional[Callable[[GraphModule], None]] = None):
        self.passes = passes
        self.verify_each = verify_each
        self.check = check  # raises VerificationError when the graph no longer matches
        self.records: list[PassRecord] = []

    def run(self, graph_module: GraphModule, context: PassContext) -> GraphModule:
        for graph_pass in self.passes:
            start = time.perf_counter()
            try:
                result = graph_pass(graph_module, context)
            except VerificationError:
                raise
            except Exception as error:
                ran = [r.name for r in self.records]
                raise PassError(f"pass `{graph_pass.name}` failed after {ran or 'no passes'}: "
                                f"{type(error).__name__}: {error}") from error
            graph_module = result.graph_module
            if result.modified:
                eliminate_dead_code(graph_module)
                graph_module.graph.lint()
                graph_module.recompile()
            self.records.append(PassRecord(graph_pass.name, time.perf_counter() - start,
                                           result.modified, result.changes))
            if self.verify_each and result.modified and self.check is not None:
                try:
                    self.check(graph_module)
                except VerificationError as error:
                    raise VerificationError(
                        f"pass `{graph_pass.name}` broke equivalence: {error}",
                        table=error.table) from error
        return graph_module
