"""Public entry points: `optimize`, `inspect`, and the `OptimizedModule` they return.

`optimize` runs the whole data flow for one input signature:
  capture (whole model; else attention-bearing submodules; else, for Hugging Face decoders
  with a KV cache, their attention-function calls) → passes (dead code, detect, classify
  masks, canonicalize; region.py) → verify against the original → install (an fx graph
  behind the OptimizedModule, or rewritten graphs swapped into the user's modules or
  dispatched from their attention functions, only after verification passed).
A capture failure caused by wrong inputs surfaces as the model's own error.

Without example inputs it does this lazily at the first call, per input signature.
"""

from __future__ import annotations

import functools
import inspect as inspect_module
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from attnopt.capture import (
    CapturedProgram, candidate_paths, export_module, has_cache_like_input, record_calls,
)
from attnopt.errors import AttnoptError, CaptureError, VerificationError
from attnopt.costmodel import flop_ratio
from attnopt.guard import TaskMetric, guarded_region
from attnopt.integrations import huggingface
from attnopt.passes.fx_utils import eliminate_dead_code
from attnopt.passes.detect import find_attention
from attnopt.passes.inplace import functionalize_arithmetic
from attnopt.policy import Policy, resolve_policy
from attnopt.report import Report, SiteRecord
from attnopt.site import AttentionSite
from attnopt.region import (
    Region, RegionCache, build_region, call_graph, parameter_bytes, signature_key,
    verify_region,
)
from attnopt.verify import DEFAULT_DRAWS, format_table

CAPTURE_STRATEGIES = ("auto", "whole", "submodules")
#: Backend that runs canonical exact attention until a generated kernel applies.


# --------------------------------------------------------------------------------------------
# capture strategies


def _capture_submodules(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool
                        ) -> tuple[list[CapturedProgram], list[str]]:
    recording = record_calls(model, args, kwargs)
    selected: list[CapturedProgram] = []
    notes: list[str] = []
    failed: set[str] = set()

    def overlaps(path: str) -> bool:
        return any(path == c.path or path.startswith(c.path + ".") or
                   c.path.startswith(path + ".") for c in selected)

    for hit in recording.attention_callers:
        for path in candidate_paths(hit):
            if overlaps(path):
                break
            record = recording.calls.get(path)
            if record is None or path in failed:
                continue
            failed.add(path)  # tried once; a success leaves the loop below
            cache = has_cache_like_input(record)
            if cache is not None:
                notes.append(f"{path}: not captured, input {cache} is a stateful object")
                continue
            try:
                captured = export_module(record.module, record.args, record.kwargs, path,
                                         dynamic=dynamic)
            except CaptureError as error:
                notes.append(f"{path}: {error}")
                continue
            probe = captured.exported.module()
            eliminate_dead_code(probe)
            functionalize_arithmetic(probe)
            matches, rejections = find_attention(probe)
            if matches:
                if recording.call_counts.get(path, 1) > 1:
                    notes.append(f"{path}: called {recording.call_counts[path]} times; "
                                 "calls with other inputs run the original module")
                selected.append(captured)
                break
            reasons = "; ".join(r.reason for r in rejections) or "no attention inside"
            notes.append(f"{path}: no complete site ({reasons}); trying its parent")
    return selected, notes


# --------------------------------------------------------------------------------------------
# the module users get back


class OptimizedModule(nn.Module):
    """The user's model with its attention rewritten; behaves as the model (attributes too).

    `report` describes the last optimization. With the whole-model strategy the rewritten fx
    graph runs in `forward`; with the submodule strategy the user's attention-bearing modules
    run their rewritten graphs (swapped in only after verification passed).
    """

    def __init__(self, model: nn.Module, policy: Policy, *, verify: bool = True,
                 capture: str = "auto", verify_each: bool = False, draws: int = DEFAULT_DRAWS,
                 dynamic: Optional[bool] = None, loss: Optional[Callable] = None,
                 metric: Optional[TaskMetric] = None):
        super().__init__()
        if capture not in CAPTURE_STRATEGIES:
            raise ValueError(f"unknown capture strategy {capture!r}; valid: "
                             f"{list(CAPTURE_STRATEGIES)}")
        self._orig_mod = model
        object.__setattr__(self, "_attnopt_state", _State(policy, verify, capture,
                                                          verify_each, draws, dynamic=dynamic,
                                                          loss=loss, metric=metric))

    # attribute access falls through to the user's model; its methods (generate(), …) run with
    # rewritten attention functions dispatched (Hugging Face models, see integrations/)
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(self._modules["_orig_mod"], name)
            if inspect_module.ismethod(value) and value.__self__ is self._modules["_orig_mod"]:
                return _dispatching_method(value)
            return value

    @property
    def report(self) -> Report:
        state = self._attnopt_state
        if state.report is None:
            return Report(policy=state.policy.to_dict(), notes=[
                "not optimized yet: call the module or pass example inputs to optimize()"])
        # live counters: captures for input signatures first seen after optimize(), and calls
        # whose inputs a captured graph's guards refused (they ran the original function)
        state.report.capture["later_captures"] = state.lazy_captures
        state.report.capture["guard_fallbacks"] = huggingface.guard_fallbacks(self._orig_mod)
        return state.report

    @property
    def sites(self) -> list[AttentionSite]:
        return [r.site for r in self.report.sites if r.site is not None]

    def forward(self, *args, **kwargs):
        state = self._attnopt_state
        if state.strategy == "submodules":
            return self._orig_mod(*args, **kwargs)
        for region in state.whole_regions:
            if region.accepts(args, kwargs):
                return call_graph(region, args, kwargs)
        if not state.built_for(args, kwargs):
            self._optimize(args, kwargs)
            return self.forward(*args, **kwargs)
        return self._orig_mod(*args, **kwargs)

    # ----------------------------------------------------------------------------------------

    def _optimize(self, args: tuple, kwargs: dict) -> None:
        state = self._attnopt_state
        model = self._orig_mod
        state.seen.append(signature_key(args, kwargs))
        try:
            self._optimize_and_install(args, kwargs)
        finally:  # dispatchers installed to record calls go again where nothing uses them
            huggingface.remove_dispatchers_if_unused(model)

    def _optimize_and_install(self, args: tuple, kwargs: dict) -> None:
        state = self._attnopt_state
        model = self._orig_mod
        report = Report(policy=state.policy.to_dict())
        if not state.verify and state.policy.approximates:
            report.notes.append("approximate rewrites were not verified (verify=False): no error "
                                "budget guarded them")
        captured, capture_info = self._capture(args, kwargs)
        regions = [self._build(c) for c in captured]
        stateful = [n for n in capture_info["notes"] if "stateful object" in n]
        if not regions and capture_info["strategy"] == "submodules" and stateful and \
                huggingface.is_transformers_model(model):
            regions = self._capture_attention_functions(args, kwargs)
            capture_info = {**capture_info, "strategy": "attention-functions",
                            "reason": "the model and its attention modules pass a KV cache "
                            "(not exportable): captured their attention-function calls",
                            "regions": [r.captured.path for r in regions],
                            "notes": [f"{len(stateful)} module(s) not captured: they receive a "
                                      f"stateful object ({stateful[0].rsplit('input ', 1)[-1]})"]}
        self._fill_report(report, regions, capture_info)
        state.report = report
        if state.verify:
            rows = [(name, stats) for r in regions for name, stats in r.errors.items()
                    if not r.site_passed(name)]
            rows += [(r.captured.path or "model output", r.output_error) for r in regions
                     if r.output_error and not r.output_passed]
            if rows:
                raise VerificationError("the rewrite changed the model's outputs beyond "
                                        "tolerance (exact sites) or budget (approximate "
                                        "ones); nothing was installed", format_table(rows))
        self._install(regions, capture_info["strategy"])

    def _capture(self, args, kwargs) -> tuple[list[CapturedProgram], dict]:
        state = self._attnopt_state
        model = self._orig_mod
        reason = "requested" if state.capture != "auto" else ""
        if state.capture in ("auto", "whole"):
            try:
                captured = export_module(model, args, kwargs, dynamic=state.dynamic_now)
                info = {"strategy": "whole", "reason": reason or "whole-model export succeeded",
                        "dynamic": captured.dynamic, "regions": [""],
                        "notes": [captured.note] if captured.note else []}
                return [captured], info
            except CaptureError as error:
                if state.capture == "whole":
                    with torch.no_grad():
                        model(*args, **kwargs)  # wrong inputs: the model's own error
                    raise
                reason = f"whole-model capture failed: {error}"
        captured, notes = _capture_submodules(model, args, kwargs, state.dynamic_now)
        info = {"strategy": "submodules", "reason": reason or "requested",
                "dynamic": all(c.dynamic for c in captured) if captured else False,
                "regions": [c.path for c in captured], "notes": notes}
        return captured, info

    def _capture_attention_functions(self, args, kwargs) -> list[Region]:
        state = self._attnopt_state
        model = self._orig_mod
        calls = huggingface.record_function_calls(model, args, kwargs)
        paths = {id(m): p for p, m in model.named_modules()}
        regions = []
        for module, call in calls.items():
            wrapper = huggingface.AttentionCall(call.function, module, call.constants)
            captured = export_module(wrapper, call.args, {}, paths.get(id(module), ""),
                                     dynamic=state.dynamic_now,
                                     dynamic_shapes=huggingface.dynamic_spec(call.args))
            regions.append(self._build(captured))
        return regions

    def _dispatch_attention_functions(self, regions: list[Region]) -> None:
        """Hugging Face models: calls that bypass the whole graph — `generate()` with its KV
        cache — reach the attention functions; their sites are captured and verified there on
        first sight of each signature."""
        model = self._orig_mod
        if not huggingface.is_transformers_model(model) or \
                not getattr(model, "can_generate", lambda: False)():
            return
        modules = dict(model.named_modules())
        registered = False
        for region in regions:
            for site in region.context.sites:
                module = modules.get(site.module_path)
                if module is not None and site.name in region.context.site_nodes:
                    huggingface.register(module, huggingface.ModuleAttention(
                        site.module_path, self._build_function_region, always=False))
                    registered = True
        if registered:
            huggingface.install_dispatchers(model)

    def _build_function_region(self, wrapper, args: tuple, path: str) -> Optional[Region]:
        """Capture, rewrite and verify one more signature of an attention function."""
        state = self._attnopt_state
        captured = export_module(wrapper, args, {}, path, dynamic=state.dynamic is not False,
                                 dynamic_shapes=huggingface.dynamic_spec(args))
        return self._finish_lazy_region(captured)

    def _build_submodule_region(self, module: nn.Module, args: tuple, kwargs: dict,
                                path: str) -> Optional[Region]:
        """Capture, rewrite and verify a swapped submodule for one more input signature."""
        state = self._attnopt_state
        swapped = module.__dict__.pop("forward", None)  # export the module's own forward
        try:
            captured = export_module(module, args, kwargs, path,
                                     dynamic=state.dynamic is not False)
        finally:
            if swapped is not None:
                module.forward = swapped
        return self._finish_lazy_region(captured)

    def _finish_lazy_region(self, captured: CapturedProgram) -> Optional[Region]:
        state = self._attnopt_state
        region = self._build(captured)
        if not region.context.site_nodes:
            return None
        if state.verify and not region.passed:
            return None
        state.lazy_captures += 1
        return region

    def _build(self, captured: CapturedProgram) -> Region:
        """Rewrite one captured program and, when verifying, verify it — under the guard when
        the policy approximates (sites over budget go back to exact, remembered for later
        captures and exports)."""
        state = self._attnopt_state
        if state.verify and state.policy.approximates:
            # the metric gates the first capture (the inputs it is measured on are shaped like
            # those); captures for other input signatures are held to the error budget
            metric, state.metric = state.metric, None
            region = guarded_region(captured, state.policy, state.verify_each, state.draws,
                                    state.rollbacks, state.loss, metric)
            state.rollbacks.update(region.context.exact_sites)
            return region
        region = build_region(captured, state.policy, state.verify_each, state.rollbacks,
                              state.loss)
        if state.verify and region.context.site_nodes:  # nothing rewritten, nothing to verify
            verify_region(region, state.draws)
        return region

    def _fill_report(self, report: Report, regions: list[Region], capture_info: dict) -> None:
        report.capture = capture_info
        draws, worst, output_passed = 0, None, True
        for region in regions:
            context = region.context
            if region.mode is not None and context.site_nodes:
                mode, other = ("training", "eval") if region.mode else ("eval", "training")
                then = "are captured on their first call" if region.captured.path else \
                    "run the original (optimize in the mode the model will run in)"
                report.notes.append(
                    f"{region.captured.path or 'the model'} was captured in {mode} mode and "
                    f"has dropout or batch norm, which its graph holds in that mode: calls in "
                    f"{other} mode {then}")
            unpadded = region.unpadded() if context.site_nodes else None
            if unpadded is not None:
                report.notes.append(f"{region.captured.path or 'the model'}: {unpadded.describe()}")
            for site in context.sites:
                rewrite, why = context.decisions.get(site.name, ("none", "policy 'none': "
                                                                 "detect and report only"))
                stats = region.errors.get(site.name)
                backend, backend_reason = context.backends.get(site.name, ("", ""))
                rewritten = site.name in context.site_nodes
                record = SiteRecord(name=site.name, module_path=site.module_path,
                                     rewrite=rewrite, reason=why, site=site,
                                     backend=backend if rewritten else "",
                                     backend_reason=backend_reason if rewritten else "")
                approximation = context.approximations.get(site.name)
                if approximation is not None:
                    record.approximation = {**approximation,
                                            "flop_ratio": flop_ratio(approximation["variant"],
                                                                     approximation["params"],
                                                                     site)}
                if site.name in region.rolled_back:
                    record.rolled_back = region.rolled_back[site.name]
                record.weight_notes = list(context.weight_notes.get(site.name, []))
                if stats is not None:
                    record.record_errors(stats.max_abs_err, stats.max_rel_err, stats.cosine,
                                         region.site_passed(site.name), stats.rel_err)
                report.sites.append(record)
            for rejection in context.rejections:
                report.sites.append(SiteRecord(name=rejection.name,
                                                module_path=rejection.module_path,
                                                rewrite="none", reason=rejection.reason))
            report.passes.extend(
                {**p.to_dict(), "region": region.captured.path} for p in region.passes)
            draws = max(draws, region.draws)
            if region.output_error is not None:
                worst = region.output_error.worst(worst)
                output_passed = output_passed and region.output_passed
        if any(r.context.policy.weights for r in regions):
            report.parameters = {
                "before_bytes": sum(parameter_bytes(r.original) for r in regions),
                "after_bytes": sum(parameter_bytes(r.rewritten) for r in regions)}
        report.notes.extend(capture_info.get("notes", []))
        skipped = sum(r.skipped_draws for r in regions)
        if skipped:
            report.notes.append(f"{skipped} random draw(s) skipped: the captured original graph "
                                "rejects them (its guards specialized on input values)")
        if worst is not None:
            report.verification = {"draws": draws, **worst.to_dict(), "passed": output_passed}
            if any(r.approximations or r.rolled_back for r in regions):
                report.verification["budget"] = self._attnopt_state.policy.budget.to_dict()
            metrics = [r.metric for r in regions if r.metric is not None]
            if metrics:
                report.verification["metric"] = metrics[0]  # (a metric needs one region)

    def _install(self, regions: list[Region], strategy: str) -> None:
        state = self._attnopt_state
        rewritten = [r for r in regions if r.context.site_nodes]
        if strategy == "attention-functions":
            state.strategy = "submodules"  # the user's model runs; its functions dispatch
            for region in rewritten:
                call = region.captured.module  # the AttentionCall that was exported
                huggingface.register(call.target, huggingface.ModuleAttention(
                    region.captured.path, self._build_function_region,
                    RegionCache([region], [call.constants])))
            return
        if strategy == "whole":
            state.strategy = "whole"
            state.whole_regions.extend(rewritten)
            self._dispatch_attention_functions(rewritten)
            return
        state.strategy = "submodules"
        for region in rewritten:
            _swap_forward(region, self._build_submodule_region)


@dataclass
class _State:
    policy: Policy
    verify: bool
    capture: str
    verify_each: bool
    draws: int
    report: Optional[Report] = None
    strategy: str = ""
    whole_regions: list = field(default_factory=list)
    seen: list = field(default_factory=list)  # signature keys optimize() ran for
    lazy_captures: int = 0
    dynamic: Optional[bool] = None
    rollbacks: dict = field(default_factory=dict)  # site → why the guard kept it exact
    loss: Optional[Callable] = None  # scores heads for pruning by gradient
    metric: Optional[TaskMetric] = None  # the first capture's guard gate, instead of the budget

    @property
    def dynamic_now(self) -> bool:
        """None ("automatic", as torch.compile): static first, dynamic once shapes change."""
        return self.dynamic if self.dynamic is not None else bool(self.seen[:-1])

    def built_for(self, args, kwargs) -> bool:
        return signature_key(args, kwargs) in self.seen


def _dispatching_method(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
        with huggingface.dispatching():
            return method(*args, **kwargs)
    return call


def _swap_forward(region: Region, rebuild: Callable) -> None:
    """Make the user's submodule run its rewritten graph for calls its capture accepts.

    A call no captured graph accepts is captured, rewritten and verified once (`rebuild`);
    if that fails, calls of that signature run the original forward.
    """
    module = region.captured.module
    original_forward = type(module).forward
    cache = RegionCache([region], tolerated=(AttnoptError,))

    def build(args, kwargs, _tag):
        return rebuild(module, args, kwargs, region.captured.path)

    def forward(*args, **kwargs):
        found = cache.find(args, kwargs, build)
        if found is not None:
            return call_graph(found, args, kwargs)
        return original_forward(module, *args, **kwargs)

    forward.__attnopt_regions__ = cache.regions
    module.forward = forward


# --------------------------------------------------------------------------------------------


def _as_args(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _model_device(model: nn.Module, example_inputs, example_kwargs) -> tuple[str, object]:
    """(device, floating dtype) the model runs in: its first floating parameter, else the
    first floating example tensor; CPU float32 when neither says."""
    from torch.utils import _pytree as pytree
    tensors = [p for p in model.parameters()] + [
        t for t in pytree.tree_leaves((example_inputs, example_kwargs))
        if isinstance(t, torch.Tensor)]
    for tensor in tensors:
        if tensor.is_floating_point():
            device = tensor.device.type if tensor.device.type != "cuda" else str(tensor.device)
            return device, tensor.dtype
    return "cpu", torch.float32


def optimize(model: nn.Module, policy: Union[str, Policy, dict] = "exact", *,
             example_inputs=None, example_kwargs: Optional[dict] = None, verify: bool = True,
             capture: str = "auto", verify_each: bool = False,
             draws: int = DEFAULT_DRAWS, dynamic: Optional[bool] = None,
             loss: Optional[Callable] = None, metric: Optional[Callable] = None,
             metric_drop: float = 0.0) -> OptimizedModule:
    """Find every attention in `model` and rewrite it as `policy` says; verified.

    With example inputs (a tuple of positional args and/or a dict of keyword args) the work
    happens now; otherwise at the first call, once per input signature.

    `dynamic`: None (default, as torch.compile) captures static shapes first and batch /
    sequence dims dynamic as soon as a call with other shapes arrives; True captures dynamic
    dims from the start; False captures each new shape statically.

    `loss`: a function of the model's output (as the model returns it) to a scalar, e.g. the
    task loss on the example batch; head pruning then scores heads by its gradient.

    `metric`: a function of a model (called as the original is) to a number, higher is better
    — e.g. accuracy on a held-out batch shaped like the examples. The guard then keeps the
    approximations that keep it within `metric_drop` of the original model's value, instead of
    holding each site and the output to the policy's error budget (attnopt/guard.py). It
    gates the capture of the example inputs; graphs captured later for other input shapes are
    held to the budget.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, not {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        raise AttnoptError("model is already an OptimizedModule; optimize its `_orig_mod` "
                           "instead")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a function of the model's output, not "
                        f"{type(loss).__name__}")
    task_metric = TaskMetric(metric, metric_drop) if metric is not None else None
    if task_metric is not None and not verify:
        raise AttnoptError("a metric guards the rewrites, which verify=False turns off; pass "
                           "verify=True (the default) or drop the metric")
    device, dtype = _model_device(model, example_inputs, example_kwargs)
    resolved = resolve_policy(policy, device, dtype)
    optimized = OptimizedModule(model, resolved, verify=verify, capture=capture,
                                verify_each=verify_each, draws=draws, dynamic=dynamic,
                                loss=loss, metric=task_metric)
    if example_inputs is not None or example_kwargs is not None:
        optimized._optimize(_as_args(example_inputs), dict(example_kwargs or {}))
    return optimized


def inspect(model: nn.Module, example_inputs=None, example_kwargs: Optional[dict] = None, *,
            capture: str = "auto") -> list[AttentionSite]:
    """Every attention site of `model` on these inputs; the model is not changed."""
    if example_inputs is None and example_kwargs is None:
        raise ValueError("inspect() needs example inputs (example_inputs and/or "
                         "example_kwargs) to trace the model")
    optimized = optimize(model, "none", example_inputs=example_inputs,
                         example_kwargs=example_kwargs, verify=False, capture=capture)
    return optimized.sites
