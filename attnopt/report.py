"""The report: everything `optimize` did, as a table (`str`) and as JSON (`to_dict`).

It records the capture strategy and why, every site with its decision and measured error,
sites left alone with the reason, and each pass's time and changes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from attnopt.ops.attention import FALLBACK_BACKEND
from attnopt.site import AttentionSite


@dataclass
class SiteRecord:
    name: str
    module_path: str
    rewrite: str                 # "none" when left alone
    reason: str
    site: Optional[AttentionSite] = None
    backend: str = ""            # what the rewritten site runs on: "triton" or "sdpa"
    backend_reason: str = ""
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    rel_err: Optional[float] = None  # normwise
    cosine: Optional[float] = None
    passed: Optional[bool] = None  # None: not verified
    # approximate sites: variant, params, exact-attention row entropy, FLOP ratio vs exact
    approximation: Optional[dict] = None
    # sites the guard sent back to exact: the approximation's measurement and why
    rolled_back: Optional[dict] = None
    # weight rewrites a rule asked for that could not be applied here, and why
    weight_notes: list[str] = field(default_factory=list)

    def record_errors(self, max_abs_err: float, max_rel_err: float, cosine: float,
                      passed: bool, rel_err: Optional[float] = None) -> None:
        self.max_abs_err, self.max_rel_err = max_abs_err, max_rel_err
        self.cosine, self.passed, self.rel_err = cosine, passed, rel_err

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "module_path": self.module_path, "rewrite": self.rewrite,
                "reason": self.reason, "backend": self.backend,
                "backend_reason": self.backend_reason,
                "max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err,
                "rel_err": self.rel_err, "cosine": self.cosine, "passed": self.passed,
                "approximation": self.approximation, "rolled_back": self.rolled_back,
                "weight_notes": list(self.weight_notes)}
        if self.site is not None:
            data.update({k: v for k, v in self.site.to_dict().items() if k not in data})
        return data


@dataclass
class Report:
    policy: dict = field(default_factory=dict)
    capture: dict = field(default_factory=dict)
    sites: list[SiteRecord] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    verification: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)  # weight rewrites: bytes before / after
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.rewrite != "none"]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "capture": self.capture,
                "sites": [s.to_dict() for s in self.sites], "passes": list(self.passes),
                "verification": self.verification, "parameters": self.parameters,
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [f"attnopt report — policy {self.policy.get('name', '?')!r}, capture "
                 f"{self.capture.get('strategy', '?')}"
                 + (f" ({self.capture['reason']})" if self.capture.get("reason") else "")]
        found = [s for s in self.sites if s.site is not None]
        if not self.sites:
            lines.append("no attention sites found; the model is unchanged")
        else:
            lines.append(f"{len(found)} site(s) found, {len(self.rewritten)} rewritten, "
                         f"{len(self.sites) - len(found)} candidate(s) left alone")
            header = (f"{'site':<36} {'form':<10} {'B×H/Hkv×Sq×Sk×D':<22} {'mask':<21} "
                      f"{'rewrite':<8} {'backend':<8} {'max_abs_err':>11}")
            lines += [header, "-" * len(header)]
            for record in self.sites:
                site = record.site
                shape = (f"{site.batch}×{site.heads}/{site.kv_heads}×{site.q_len}×"
                         f"{site.kv_len}×{site.head_dim}") if site else "-"
                mask = (site.mask_kind + (f"({site.window})" if site.window else "")
                        + ("+alibi" if site.alibi else "")) if site else "-"
                err = f"{record.max_abs_err:.2e}" if record.max_abs_err is not None else "-"
                lines.append(f"{record.name[-36:]:<36} {(site.form if site else '-'):<10} "
                             f"{shape:<22} {mask:<21} {record.rewrite:<8} "
                             f"{record.backend or '-':<8} {err:>11}")
                if record.rewrite == "none":
                    lines.append(f"{'':<4}↳ {record.reason}")
                if record.approximation is not None:
                    lines.append(f"{'':<4}↳ {_describe_approximation(record)}")
                if record.rolled_back is not None:
                    lines.append(f"{'':<4}↳ {record.reason}"
                                 + _entropy_note(record.rolled_back.get("entropy")))
                elif record.rewrite == "exact" and "not applicable" in record.reason:
                    lines.append(f"{'':<4}↳ {record.reason}")
                lines += [f"{'':<4}↳ {note}" for note in record.weight_notes]
            fallbacks = Counter(r.backend_reason for r in self.sites
                                if r.backend == FALLBACK_BACKEND and r.site is not None
                                and r.site.device == "cuda")
            for reason, count in fallbacks.items():
                lines.append(f"backend: {count} CUDA site(s) run SDPA: {reason}")
        if self.parameters:
            before, after = self.parameters["before_bytes"], self.parameters["after_bytes"]
            lines.append(f"parameters: {before / 1e6:.3f} MB → {after / 1e6:.3f} MB "
                         f"({after / max(before, 1):.1%}) in the rewritten graph")
        if self.verification:
            v = self.verification
            if v.get("budget"):
                b = v["budget"]
                lines.append(f"error budget (normwise): site rel err <= {b['site_rel_err']:g}, "
                             f"cosine >= {b['site_min_cosine']:g}; output rel err <= "
                             f"{b['output_rel_err']:g}")
            if v.get("metric"):
                m = v["metric"]
                lines.append(f"task metric (the gate instead of the budget): original "
                             f"{m['original']:.4g}, optimized {m['optimized']:.4g}, allowed "
                             f"drop {m['max_drop']:g} — {'kept' if m['passed'] else 'NOT kept'}")
            lines.append(f"verification: {'passed' if v.get('passed') else 'FAILED'} on "
                         f"{v.get('draws', 0)} input set(s); output max_abs_err "
                         f"{v.get('max_abs_err', 0):.2e}, cosine {v.get('cosine', 1):.6f}")
        if self.passes:
            timing = ", ".join(f"{p['name']} {p['seconds'] * 1e3:.1f} ms" for p in self.passes)
            lines.append(f"passes: {timing}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _entropy_note(entropy: Optional[float]) -> str:
    return "" if entropy is None else f" (attention row entropy {entropy:.2f})"


def approximation_label(info: dict) -> str:
    """One line naming what changed at a site: weight rewrites, then the attention variant."""
    parts = []
    for kind, weights in info.get("weights", {}).items():
        if kind == "gqa":
            parts.append(f"gqa(kv heads {weights['from_kv_heads']}→{weights['kv_heads']}, "
                         f"{weights['grouping']})")
        elif kind == "prune_heads":
            parts.append(f"prune_heads(heads {weights['from_heads']}→"
                         f"{len(weights['kept'])}, kept {weights['kept']})")
        elif kind == "int8":
            full = f", full precision: {','.join(weights['full_precision'])}" \
                if weights["full_precision"] else ""
            parts.append(f"int8 {weights['mode']}({','.join(weights['quantized'])}{full})")
    if info.get("variant", "exact") != "exact" or not parts:
        params = ", ".join(f"{k}={v}" for k, v in info.get("params", {}).items()
                           if k != "seed")
        parts.append(f"{info.get('variant', 'exact')}({params})")
    return " + ".join(parts)


def _describe_approximation(record: SiteRecord) -> str:
    info = record.approximation
    text = approximation_label(info)
    if record.max_rel_err is not None:
        text += f": rel err {record.rel_err:.2e}, cosine {record.cosine:.5f}"
    text += _entropy_note(info.get("entropy"))
    if info.get("flop_ratio") is not None:
        text += f", {info['flop_ratio']:.2f}× the FLOPs of exact"
    return text
