"""Policies: which rewrite each attention site gets, and the error budget that guards it.

A `Policy` is a list of `Rule`s — a `SiteSelector` (module-path glob, layer range, q-len range,
causal or not) and the rewrite to apply — plus a default rewrite and an `ErrorBudget`. The
first rule that selects a site decides it. Presets are Policy instances; `resolve_policy`
accepts a preset name, a Policy, or a dict (as written by `Policy.to_dict`, e.g. from JSON).

Rewrites: `exact` (canonical attention, lowered to the fastest exact path), `none` (leave the
site as written), and the approximate variants — `performer`, `linear`, `sparse`, `hybrid`,
`topk` — whose parameters a rule's `params` set (defaults in passes/approximate.py). Presets
that choose by sequence length (`long`, `fast`, `memory`, `accurate`) live in presets.py.

Weight rewrites — `gqa`, `prune_heads`, `int8` — change the projections around a site rather than the
attention itself. A policy's `weights` rules choose them (every kind whose first rule selects
a site applies; they compose with the site's attention rewrite), and the same error budget
guards them.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from attnopt.errors import PolicyError
from attnopt.site import AttentionSite

POLICY_FORMAT_VERSION = 1

#: Rewrite name → one-line description. A rule naming anything else is rejected.
REWRITES = {
    "exact": "canonical exact attention (SDPA until a generated kernel applies)",
    "none": "leave the site as written",
    "performer": "FAVOR+ random-feature attention (softmax or ReLU kernel)",
    "linear": "linear attention, phi = elu + 1",
    "sparse": "exact attention on a sparse pattern (window, Longformer, BigBird, dilated, ...)",
    "hybrid": "exact inside a local window, FAVOR+ outside, one normalizer",
    "topk": "exact attention on the top-k key blocks per query block",
    "int8_qk": "Q·Kᵀ on int8 q and smoothed k, per-block scales (SageAttention)",
}
#: Weight rewrite name → description; chosen by a policy's `weights` rules.
WEIGHT_REWRITES = {
    "gqa": "pool the k/v projections' heads in groups (MHA → GQA / MQA)",
    "prune_heads": "remove the least important heads from the q/k/v/out projections",
    "int8": "int8 weights for the q/k/v/out projections (weight-only or dynamic)",
}
#: The rewrites that change what a site computes: guarded by the error budget.
APPROXIMATE_REWRITES = ("performer", "linear", "sparse", "hybrid", "topk", "int8_qk")
#: Parameters of each approximate rewrite and their defaults (a rule's params override them;
#: a seed of None is derived from the site name). Sparse patterns: window, longformer,
#: bigbird, dilated, strided, random (attnopt.ops.sparsity).
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "performer": {"features": 256, "kernel": "softmax", "chunk": 64, "seed": None},
    "linear": {"chunk": 64},
    "sparse": {"pattern": "longformer", "block": 64, "local": 1, "global_blocks": 1,
               "random_blocks": 0, "dilation": 1, "stride": 0, "window": None, "seed": None},
    "hybrid": {"window": 64, "features": 128, "block": 64, "seed": None},
    "topk": {"block": 64, "top_k": 8, "local": 1},
    "int8_qk": {},  # blocks of 128 queries and 64 keys per scale (ops/quantized.py)
    # kv_heads: the target count (None: kv heads // group_size); grouping: contiguous,
    # clustered (heads with similar keys and values pooled), or best (the lower error of the
    # two on the examples)
    "gqa": {"kv_heads": None, "group_size": 2, "grouping": "best"},
    # fraction of heads removed (whole kv groups on GQA sites); importance: gradient (of
    # optimize's loss), output_norm, or auto (gradient when a loss is given)
    "prune_heads": {"fraction": 0.25, "importance": "auto"},
    # mode: dynamic (activations quantized per call) or weight_only; keep_fraction: the most
    # sensitive projections (measured on the examples) kept in full precision
    "int8": {"mode": "dynamic", "keep_fraction": 0.0},
}
#: Values a parameter must take, where it is a choice.
PARAM_CHOICES = {("gqa", "grouping"): ("contiguous", "clustered", "best"),
                 ("prune_heads", "importance"): ("auto", "gradient", "output_norm"),
                 ("int8", "mode"): ("dynamic", "weight_only")}


def check_params(rewrite: str, params: dict) -> None:
    allowed = VARIANT_DEFAULTS.get(rewrite, {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PolicyError(f"unknown parameter(s) {unknown} for rewrite {rewrite!r}; valid: "
                          f"{sorted(allowed) or 'none'}")
    for key, value in params.items():
        choices = PARAM_CHOICES.get((rewrite, key))
        if choices is not None and value not in choices:
            raise PolicyError(f"{rewrite} parameter {key}={value!r} is not one of {choices}")


def _check_keys(data: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PolicyError(f"unknown {what} key(s) {unknown}; valid keys: {sorted(allowed)}")


@dataclass
class SiteSelector:
    """Which sites a rule applies to; every given criterion must hold."""

    module: str = "*"                       # fnmatch glob over the site's module path
    layers: Optional[tuple[int, int]] = None  # inclusive range of the path's first index
    q_len: Optional[tuple[int, Optional[int]]] = None  # inclusive (min, max or None)
    causal: Optional[bool] = None

    def selects(self, site: AttentionSite) -> bool:
        if not fnmatch.fnmatchcase(site.module_path, self.module):
            return False
        if self.layers is not None:
            layer = site.layer_index
            if layer is None or not self.layers[0] <= layer <= self.layers[1]:
                return False
        if self.q_len is not None:
            low, high = self.q_len
            if site.q_len < low or (high is not None and site.q_len > high):
                return False
        if self.causal is not None and site.causal != self.causal:
            return False
        return True

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "SiteSelector":
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, "selector")
        data = dict(data)
        for key in ("layers", "q_len"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class Rule:
    rewrite: str
    select: SiteSelector = field(default_factory=SiteSelector)
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why the rule exists, shown as the site's reason

    def __post_init__(self):
        if self.rewrite not in REWRITES and self.rewrite not in WEIGHT_REWRITES:
            raise PolicyError(f"unknown rewrite {self.rewrite!r}; valid: "
                              f"{sorted(REWRITES) + sorted(WEIGHT_REWRITES)}")
        check_params(self.rewrite, self.params)

    def to_dict(self) -> dict:
        data = {"rewrite": self.rewrite, "select": self.select.to_dict(),
                "params": dict(self.params)}
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Rule":
        _check_keys(data, {"rewrite", "select", "params", "note"}, "rule")
        return cls(rewrite=data["rewrite"],
                   select=SiteSelector.from_dict(data.get("select", {})),
                   params=dict(data.get("params", {})), note=data.get("note", ""))


@dataclass
class ErrorBudget:
    """Largest error an approximate rewrite may add, per site and end to end.

    Relative error is normwise: ‖rewritten − original‖₂ / ‖original‖₂ over the whole tensor (a
    site's attention output; each model output leaf), worst over the verification inputs;
    cosine is that of the flattened tensors. Exact rewrites are held to the per-dtype
    tolerances in verify.py instead.

    Defaults come from the trained fixtures (tests/trained.py): approximations that kept task
    accuracy measured site errors up to ~0.35 and output errors up to ~0.09; those that broke
    it measured site errors above 0.6 and output errors above 0.15 (docs/APPROXIMATION.md).
    """

    site_rel_err: float = 0.5
    site_min_cosine: float = 0.9
    output_rel_err: float = 0.1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ErrorBudget":
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, "budget")
        return cls(**data)


@dataclass
class Policy:
    name: str
    rules: list[Rule] = field(default_factory=list)
    default: str = "exact"
    budget: ErrorBudget = field(default_factory=ErrorBudget)
    description: str = ""
    default_params: dict[str, Any] = field(default_factory=dict)
    weights: list[Rule] = field(default_factory=list)  # weight rewrites (WEIGHT_REWRITES)

    def __post_init__(self):
        if self.default not in REWRITES:
            raise PolicyError(f"unknown default rewrite {self.default!r}; valid: "
                              f"{sorted(REWRITES)}")
        check_params(self.default, self.default_params)
        for rule in self.rules:
            if rule.rewrite in WEIGHT_REWRITES:
                raise PolicyError(f"{rule.rewrite!r} is a weight rewrite: give it in the "
                                  "policy's `weights` rules, not `rules`")
        for rule in self.weights:
            if rule.rewrite not in WEIGHT_REWRITES:
                raise PolicyError(f"weights rule names {rule.rewrite!r}; weight rewrites are "
                                  f"{sorted(WEIGHT_REWRITES)}")

    @property
    def rewrites_anything(self) -> bool:
        return self.default != "none" or any(r.rewrite != "none" for r in self.rules) or \
            bool(self.weights)

    @property
    def approximates(self) -> bool:
        """Whether anything this policy rewrites changes what a site computes (guarded)."""
        return self.rules_approximate or bool(self.weights)

    @property
    def rules_approximate(self) -> bool:
        """Whether any attention rule (or the default) names an approximate variant."""
        return self.default in APPROXIMATE_REWRITES or \
            any(r.rewrite in APPROXIMATE_REWRITES for r in self.rules)

    def weight_rewrites(self, site: AttentionSite) -> dict[str, tuple[dict, str]]:
        """{weight rewrite: (params with defaults, why)} for a site: per kind, the first
        `weights` rule that selects it."""
        chosen: dict[str, tuple[dict, str]] = {}
        for index, rule in enumerate(self.weights):
            if rule.rewrite not in chosen and rule.select.selects(site):
                params = {**VARIANT_DEFAULTS[rule.rewrite], **rule.params}
                chosen[rule.rewrite] = (params, rule.note or
                                        f"policy {self.name!r} weights rule {index}")
        return chosen

    def decide(self, site: AttentionSite) -> tuple[str, str]:
        """(rewrite, reason) for a site: the first selecting rule, else the default."""
        rewrite, reason, _ = self.choose(site)
        return rewrite, reason

    def choose(self, site: AttentionSite) -> tuple[str, str, dict]:
        """(rewrite, reason, params) for a site: the first selecting rule, else the default."""
        for index, rule in enumerate(self.rules):
            if rule.select.selects(site):
                why = rule.note or f"policy {self.name!r} rule {index}"
                return rule.rewrite, why, dict(rule.params)
        return self.default, f"policy {self.name!r} default", dict(self.default_params)

    def to_dict(self) -> dict:
        data = {"version": POLICY_FORMAT_VERSION, "name": self.name,
                "description": self.description, "default": self.default,
                "rules": [r.to_dict() for r in self.rules], "budget": self.budget.to_dict()}
        if self.default_params:
            data["default_params"] = dict(self.default_params)
        if self.weights:
            data["weights"] = [r.to_dict() for r in self.weights]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Policy":
        _check_keys(data, {"version", "name", "description", "default", "rules", "budget",
                           "default_params", "weights"}, "policy")
        version = data.get("version", POLICY_FORMAT_VERSION)
        if version != POLICY_FORMAT_VERSION:
            raise PolicyError(f"policy format version {version} is not supported "
                              f"(this attnopt reads version {POLICY_FORMAT_VERSION})")
        return cls(name=data.get("name", "custom"), description=data.get("description", ""),
                   default=data.get("default", "exact"),
                   rules=[Rule.from_dict(r) for r in data.get("rules", [])],
                   budget=ErrorBudget.from_dict(data.get("budget", {})),
                   default_params=dict(data.get("default_params", {})),
                   weights=[Rule.from_dict(r) for r in data.get("weights", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, Policy] = {
    "exact": Policy("exact", default="exact",
                    description="canonicalize every site; fastest exact path; identical outputs"),
    "none": Policy("none", default="none", description="detect and report only"),
}


def resolve_policy(policy: Union[str, Policy, dict], device: str = "cpu", dtype=None) -> Policy:
    """A Policy from a preset name, a Policy, or a dict. The length-based presets (presets.py)
    are built for `device`, from its latency calibration."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if isinstance(policy, str):
        from attnopt import presets
        if policy in presets.BUILDERS:
            return presets.build(policy, device, dtype)
        if policy not in PRESETS:
            raise PolicyError(f"unknown policy {policy!r}; valid presets: "
                              f"{sorted(PRESETS) + sorted(presets.BUILDERS)}")
        return copy.deepcopy(PRESETS[policy])
    raise PolicyError(f"policy must be a preset name, a Policy or a dict, not "
                      f"{type(policy).__name__}")
