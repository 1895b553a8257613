"""The public API: policies, reports, lazy optimization, capture strategies, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.errors import CaptureError, PassError, PolicyError, VerificationError
from attnopt.passes.manager import PassContext, PassManager, PassResult
from canonical_calls import CanonicalCalls
from zoo import ZOO, _qkv

B, S, E, H = 2, 8, 32, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.label = "a custom attribute"

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, E // H).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // H), -1)
        return self.out((probs @ v).transpose(1, 2).reshape(x.shape))

    def describe(self):
        return f"Block({self.label})"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_report_dict_is_json_with_required_keys():
    optimized = attnopt.optimize(Tiny(), example_inputs=(torch.randn(B, S, E),))
    data = json.loads(json.dumps(optimized.report.to_dict()))
    assert {"sites", "passes", "policy", "capture"} <= set(data)
    assert data["policy"]["name"] == "exact"
    assert data["capture"]["strategy"] == "whole"
    for site in data["sites"]:
        assert {"name", "rewrite", "reason", "max_abs_err"} <= set(site)
        assert site["rewrite"] == "exact" and site["max_abs_err"] < 1e-5
        assert site["backend"] == "sdpa" and "cpu" in site["backend_reason"]
    assert [p["name"] for p in data["passes"]] == [
        "eliminate_dead_code", "functionalize_arithmetic", "detect_attention", "classify_masks",
        "canonicalize_attention", "select_backends"]
    text = str(optimized.report)
    assert "blocks.0" in text and "blocks.1" in text and "verification: passed" in text


def test_optimized_module_forwards_attributes_and_keeps_state_dict():
    model = Tiny()
    optimized = attnopt.optimize(model, example_inputs=(torch.randn(B, S, E),))
    assert optimized.blocks[0].describe() == "Block(a custom attribute)"
    assert set(optimized._orig_mod.state_dict()) == set(model.state_dict())
    assert optimized.blocks is model.blocks


class Gained(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Tiny()
        self.register_buffer("gain", torch.full((E,), 1.5))

    def forward(self, x):
        return self.body(x) * self.gain


def test_rewritten_forward_reads_no_attribute_through_module_getattr(monkeypatch):
    """The rewritten graph runs on a view of its module tree whose parameters, buffers and
    children are plain attributes (`runner.fast_view`): an exported graph reads each one
    through its module path, one `nn.Module.__getattr__` per step, which made host-bound
    forwards slower than the model's own."""
    model = Gained().eval()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    with torch.no_grad():
        expected = model(x)
    lookups = []
    module_getattr = nn.Module.__getattr__
    monkeypatch.setattr(nn.Module, "__getattr__",
                        lambda self, name: lookups.append(name) or module_getattr(self, name))
    with torch.no_grad():
        actual = optimized(x)
    monkeypatch.undo()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert lookups == []


def _dispatched_ops(fn) -> list[str]:
    """Names of the ops the dispatcher ran during `fn()` (torch.profiler's CPU events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


def test_eager_call_runs_the_attention_implementation_without_the_dispatcher():
    """Calls run an eager copy of the rewritten graph (`runner.eager_graph`): aten ops through
    their Python bindings or C++ handles and the canonical op through `eager_attention`, which
    calls the device's implementation directly when nothing needs the dispatcher. A gradient
    to record, or a dispatch mode, goes through the op; results are the same every way."""
    from attnopt.runner import _Handle, python_bindings
    model = Gained().eval()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    region = optimized._attnopt_state.whole_regions[0]
    with torch.no_grad():
        expected = region.rewritten(x)
        ops = _dispatched_ops(lambda: optimized(x))
        actual = optimized(x)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert "attnopt::attention" not in ops
    assert ops.count("aten::scaled_dot_product_attention") == 2
    targets = [node.target for node in region.runner().graph.nodes
               if node.op == "call_function"]
    assert not any(isinstance(t, torch._ops.OpOverload) for t in targets)
    bindings = set(python_bindings().values())
    assert any(t in bindings for t in targets) and any(isinstance(t, _Handle) for t in targets)

    x_grad = x.clone().requires_grad_()  # a gradient to record: the op's autograd
    assert _dispatched_ops(lambda: optimized(x_grad)).count("attnopt::attention") == 2
    with CanonicalCalls() as spy:  # a dispatch mode sees every call
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), expected, atol=0, rtol=0)
    assert len(spy.calls) == 2


def test_eager_copy_matches_the_rewritten_graph_under_inference_mode_and_autocast():
    """The eager copy's bindings and direct attention calls compute what the rewritten graph's
    overloads and op do, bit for bit, in inference mode and under autocast (which the
    bindings go through like the overloads, and which the op falls through)."""
    model = Gained().eval()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    region = optimized._attnopt_state.whole_regions[0]
    with torch.inference_mode():
        torch.testing.assert_close(optimized(x), region.rewritten(x), atol=0, rtol=0)
        assert "attnopt::attention" not in _dispatched_ops(lambda: optimized(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = region.rewritten(x)
        actual = optimized(x)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    with torch.no_grad():  # (autocast did act: the projections ran in bfloat16)
        assert (optimized(x) - actual).abs().max() > 1e-3


def test_rewritten_graph_follows_replaced_parameters_and_buffers():
    """A parameter or buffer the user replaces by a new tensor after optimizing (here by
    assignment; `load_state_dict(assign=True)` and `.to()` on buffers replace them the same
    way) is what the next call reads."""
    model = Gained().eval()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    with torch.no_grad():
        before = optimized(x)
        model.gain = torch.full((E,), -2.0)
        model.body.blocks[1].out.weight = nn.Parameter(torch.randn(E, E))
        after = optimized(x)
        torch.testing.assert_close(after, model(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-2)


class Dropped(nn.Module):
    """Attention blocks with dropout on their output (not on the probabilities)."""

    def __init__(self):
        super().__init__()
        self.body = Tiny()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.body(x))


def test_graph_with_dropout_runs_only_in_the_mode_it_was_captured_in():
    """Export bakes dropout's train flag into the graph: a model optimized in eval mode and
    then trained runs the original (dropout on), and its graph again once back in eval mode.
    A graph without dropout runs in either mode."""
    x = torch.randn(B, S, E)
    model = Dropped().eval()
    optimized = attnopt.optimize(model, example_inputs=(x,))
    assert any("captured in eval mode" in note for note in optimized.report.notes)
    model.train()
    with torch.no_grad(), CanonicalCalls() as spy:
        torch.manual_seed(1)
        trained = optimized(x)
    torch.manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(trained, model(x))
    assert spy.calls == []
    model.eval()
    with torch.no_grad(), CanonicalCalls() as spy:
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(spy.calls) == 2

    plain = Tiny().eval()
    optimized = attnopt.optimize(plain, example_inputs=(x,))
    plain.train()
    with torch.no_grad(), CanonicalCalls() as spy:
        torch.testing.assert_close(optimized(x), plain(x), atol=1e-5, rtol=1e-5)
    assert len(spy.calls) == 2


def test_training_mode_graph_verifies_and_draws_the_dropout_masks_the_model_would():
    """Optimized in training mode, the graph verifies (both sides of each input set run from
    one random state, so dropout draws the same masks) and runs in training mode, dropout on:
    from one seed it gives the original's output. In eval mode the original runs."""
    x = torch.randn(B, S, E)
    model = Dropped().train()
    optimized = attnopt.optimize(model, example_inputs=(x,))
    assert optimized.report.verification["passed"]
    with torch.no_grad(), CanonicalCalls() as spy:
        torch.manual_seed(2)
        trained = optimized(x)
    torch.manual_seed(2)
    with torch.no_grad():
        torch.testing.assert_close(trained, model(x), atol=1e-5, rtol=1e-5)
    assert len(spy.calls) == 2
    model.eval()
    with torch.no_grad(), CanonicalCalls() as spy:
        torch.testing.assert_close(optimized(x), model(x))
    assert spy.calls == []


def test_lazy_optimization_at_first_call_caches_per_signature():
    model = Tiny()
    optimized = attnopt.optimize(model)
    assert "not optimized yet" in str(optimized.report)
    x = torch.randn(B, S, E)
    torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    regions = optimized._attnopt_state.whole_regions
    assert len(regions) == 1 and len(optimized.sites) == 2
    assert optimized.report.capture["dynamic"] is False  # static first, as torch.compile
    longer = torch.randn(3, 2 * S, E)  # new shapes: captured again, now with dynamic dims
    torch.testing.assert_close(optimized(longer), model(longer), atol=1e-5, rtol=1e-5)
    assert len(regions) == 2 and optimized.report.capture["dynamic"] is True
    other = torch.randn(4, 3 * S, E)  # served by the dynamic graph: no third capture
    torch.testing.assert_close(optimized(other), model(other), atol=1e-5, rtol=1e-5)
    assert len(regions) == 2


def test_dynamic_true_captures_batch_and_sequence_dynamic_at_once():
    model = Tiny()
    optimized = attnopt.optimize(model, example_inputs=(torch.randn(B, S, E),), dynamic=True)
    assert optimized.report.capture["dynamic"] is True
    (site,) = optimized.sites[:1]
    assert {"batch", "q_len", "kv_len"} <= set(site.dynamic_dims)
    longer = torch.randn(3, 2 * S, E)
    torch.testing.assert_close(optimized(longer), model(longer), atol=1e-5, rtol=1e-5)
    assert len(optimized._attnopt_state.whole_regions) == 1


def test_swapped_submodule_captures_new_shapes_lazily():
    model = DataDependent()
    x = torch.randn(B, S, E).abs()
    attnopt.optimize(model, example_inputs=(x,))
    regions = model.block.forward.__attnopt_regions__
    longer = torch.randn(3, 2 * S, E).abs()
    expected = Block.forward(model.block, longer)
    torch.testing.assert_close(model(longer), expected, atol=1e-5, rtol=1e-5)
    assert len(regions) == 2 and regions[1].captured.dynamic


def test_policy_none_detects_and_changes_nothing():
    model = Tiny()
    optimized = attnopt.optimize(model, "none", example_inputs=(torch.randn(B, S, E),))
    assert len(optimized.sites) == 2
    assert all(r.rewrite == "none" for r in optimized.report.sites)
    assert not optimized._attnopt_state.whole_regions


def test_policy_rules_select_sites_by_module_glob():
    policy = attnopt.Policy("first-only", default="none", rules=[
        attnopt.Rule("exact", attnopt.SiteSelector(module="blocks.0*"))])
    optimized = attnopt.optimize(Tiny(), policy, example_inputs=(torch.randn(B, S, E),))
    decisions = {r.name: r.rewrite for r in optimized.report.sites}
    assert decisions == {"blocks.0": "exact", "blocks.1": "none"}


def test_policy_round_trips_through_json():
    policy = attnopt.Policy("custom", default="exact", rules=[
        attnopt.Rule("none", attnopt.SiteSelector(layers=(0, 3), q_len=(1, 512), causal=True))],
        budget=attnopt.ErrorBudget(site_rel_err=0.01))
    assert attnopt.Policy.from_json(policy.to_json()) == policy
    assert attnopt.resolve_policy(policy.to_dict()) == policy


@pytest.mark.parametrize("bad, message", [
    ("fastest", "valid presets"),
    ({"name": "x", "rulez": []}, "valid keys"),
    ({"name": "x", "rules": [{"rewrite": "magic"}]}, "unknown rewrite"),
    ({"name": "x", "version": 99}, "version"),
])
def test_bad_policy_raises_value_error_listing_valid(bad, message):
    with pytest.raises(ValueError, match=message):
        attnopt.resolve_policy(bad)
    assert issubclass(PolicyError, ValueError)


def test_model_without_attention_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    assert "no attention sites found" in str(optimized.report)
    torch.testing.assert_close(optimized(x), model(x))
    assert not optimized._attnopt_state.whole_regions


def test_wrong_example_inputs_raise_the_models_own_error():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        attnopt.optimize(Tiny(), example_inputs=(torch.randn(B, S, E + 1),))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: whole-model export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


def test_capture_failure_falls_back_to_submodules_in_place():
    model = DataDependent()
    forward_before = model.block.forward
    x = torch.randn(B, S, E).abs()
    expected = model(x)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    report = optimized.report
    assert report.capture["strategy"] == "submodules"
    assert "whole-model capture failed" in report.capture["reason"]
    assert report.capture["regions"] == ["block"]
    assert type(model.block) is Block and model.block.forward is not forward_before
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(optimized(-x), model.block(x), atol=1e-5, rtol=1e-5)


def test_whole_capture_failure_names_the_model_and_what_to_try():
    with pytest.raises(CaptureError, match="DataDependent.*Try capture='submodules'"):
        attnopt.optimize(DataDependent(), capture="whole",
                         example_inputs=(torch.randn(B, S, E),))


def test_unknown_capture_strategy_is_rejected():
    with pytest.raises(ValueError, match="valid"):
        attnopt.optimize(Tiny(), capture="magic")


def test_inspect_does_not_change_the_model():
    model = DataDependent()
    forward_before = model.block.forward
    sites = attnopt.inspect(model, (torch.randn(B, S, E).abs(),))
    assert [s.module_path for s in sites] == ["block"]
    assert model.block.forward == forward_before


class _BreakScale:
    """A deliberately wrong pass: doubles the scale of every canonical attention call."""

    name = "break_scale"

    def __call__(self, graph_module, context):
        from attnopt.ops import ATTENTION_OP
        for node in graph_module.graph.nodes:
            if node.target is ATTENTION_OP:
                args = list(node.args)
                args[5] = args[5] * 2
                node.args = tuple(args)
        return PassResult(graph_module, True, ["scale doubled"])


def test_verify_each_names_the_pass_that_broke_equivalence():
    from attnopt.passes.canonicalize import CanonicalizeAttention
    from attnopt.passes.classify import ClassifyMasks
    from attnopt.passes.detect import DetectAttention
    model = ZOO["einsum"].make()
    args = _qkv()
    exported = torch.export.export(model, args, strict=False)

    def check(graph_module):
        error = (graph_module(*args) - model(*args)).abs().max().item()
        if error > 1e-5:
            raise VerificationError(f"max_abs_err {error:.3g}")

    manager = PassManager([DetectAttention(), ClassifyMasks(), CanonicalizeAttention(),
                           _BreakScale()], verify_each=True, check=check)
    context = PassContext(args, {}, attnopt.resolve_policy("exact"))
    with pytest.raises(VerificationError, match="pass `break_scale` broke equivalence"):
        manager.run(exported.module(), context)
    assert [r.name for r in manager.records][-1] == "break_scale"


def test_failing_pass_error_names_passes_that_ran_before():
    class Explodes:
        name = "explodes"

        def __call__(self, graph_module, context):
            raise KeyError("boom")

    from attnopt.passes.detect import DetectAttention
    model = ZOO["einsum"].make()
    exported = torch.export.export(model, _qkv(), strict=False)
    manager = PassManager([DetectAttention(), Explodes()])
    with pytest.raises(PassError, match=r"`explodes` failed after \['detect_attention'\]"):
        manager.run(exported.module(), PassContext(_qkv(), {}, attnopt.resolve_policy("exact")))


def test_verification_failure_installs_nothing(monkeypatch):
    import attnopt.region as region

    original = region.pass_pipeline
    monkeypatch.setattr(region, "pass_pipeline",
                        lambda policy: original(policy) + [_BreakScale()])
    model = DataDependent()
    forward_before = model.block.forward
    with pytest.raises(VerificationError, match="nothing was installed"):
        attnopt.optimize(model, example_inputs=(torch.randn(B, S, E).abs(),))
    assert model.block.forward == forward_before


def test_optimized_graph_reexports_and_round_trips_pt2(tmp_path):
    model = Tiny()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    (region,) = optimized._attnopt_state.whole_regions
    exported = torch.export.export(region.rewritten, (x,), strict=False)
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "attnopt.attention.default" in targets
    path = tmp_path / "tiny.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_canonical_op_matches_float64_reference_and_has_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.attnopt.attention(q, k, v, bias, False, 0.3, False)
    reference = torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, -1) @ v
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: torch.ops.attnopt.attention(q, k, v, b, False, 0.3, False),
        (q, k, v, bias))
    kv = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.attnopt.attention(q, k, v, None, True, None, True),
        (q, kv, kv.detach().clone().requires_grad_()))


@pytest.mark.parametrize("case", ["padded_causal", "bias_grad_gqa", "softcap_window"])
def test_canonical_op_backward_differentiates_its_recorded_forward(case, monkeypatch):
    """The op's forward is recorded under autograd, so forward + backward runs the reference
    once (SDPA's backward runs on what its forward saved), gradients as autograd through the
    reference itself (a mask that needs one included); a second backward through a retained
    graph runs the forward again and gives the same gradients; nothing is left behind."""
    import sys
    from attnopt.ops import common
    op_module = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)
    reference = op_module.attention_reference
    calls = []
    monkeypatch.setattr(op_module, "attention_reference",
                        lambda *args: calls.append(1) or reference(*args))
    gen = torch.Generator().manual_seed(len(case))
    dtype = torch.float64 if case == "bias_grad_gqa" else torch.float32
    kv_heads = 2 if case == "bias_grad_gqa" else 4

    def draw(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)
    q, k, v = draw(2, 4, 16, 8), draw(2, kv_heads, 16, 8), draw(2, kv_heads, 16, 8)
    padded = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    padded[1, ..., :5] = False
    args = {"padded_causal": (padded, True),
            "bias_grad_gqa": (draw(2, 1, 16, 16), False, 0.3, True),
            "softcap_window": (None, True, None, False, 5.0, 6)}[case]
    inputs = (q, k, v) + ((args[0],) if case == "bias_grad_gqa" else ())
    out = torch.ops.attnopt.attention(q, k, v, *args)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    first = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    assert len(calls) == 1  # the forward's (recorded): none in the backward
    assert not common._KEPT  # taken by the backward's setup
    second = torch.autograd.grad(out, inputs, grad)  # the record is spent: recomputed
    assert len(calls) == 2
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    floats = [t.detach().double().requires_grad_() for t in inputs]
    rest = (floats[3],) + args[1:] if case == "bias_grad_gqa" else args
    expected = reference(*floats[:3], *rest)
    expected_grads = torch.autograd.grad(expected, floats, grad.double())
    tolerance = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else \
        dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), expected, **tolerance)
    for got, want in zip(first, expected_grads):
        torch.testing.assert_close(got.double(), want, **tolerance)
    with torch.no_grad():  # leaves that need a gradient, but no backward to take the record
        torch.ops.attnopt.attention(q, k, v, *args)
    assert not common._KEPT


def test_fine_tuning_through_the_rewritten_graph():
    model = Tiny()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    optimized(x).sum().backward()
    grad_optimized = model.blocks[0].qkv.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(grad_optimized, model.blocks[0].qkv.weight.grad,
                               atol=1e-5, rtol=1e-4)


def test_compiled_rewritten_graph_matches_and_trains():
    """torch.compile (AOT autograd, eager backend) of a rewritten model traces the canonical
    op through its fake implementation and Autograd kernel: outputs and gradients as the
    original's."""
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(B, S, E)
    optimized = attnopt.optimize(model, example_inputs=(x,))
    compiled = torch.compile(optimized, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)
    out.sum().backward()
    grad_compiled = model.blocks[0].qkv.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(grad_compiled, model.blocks[0].qkv.weight.grad,
                               atol=1e-5, rtol=1e-4)


def test_fused_dropout_in_training_mode_is_left_alone():
    class Train(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    optimized = attnopt.optimize(Train(), example_inputs=_qkv(), verify=False)
    (record,) = optimized.report.sites
    assert record.rewrite == "none" and "model.eval()" in record.reason


class _BreakFirstSite(_BreakScale):
    """Breaks only the first canonical call."""

    name = "break_first_site"

    def __call__(self, graph_module, context):
        from attnopt.ops import ATTENTION_OP
        first = next(n for n in graph_module.graph.nodes if n.target is ATTENTION_OP)
        args = list(first.args)
        args[5] = args[5] * 2
        first.args = tuple(args)
        return PassResult(graph_module, True, ["first scale doubled"])


def test_site_errors_are_measured_in_isolation(monkeypatch):
    """A broken first site fails; the second, fed the first one's wrong output downstream,
    still verifies, because each site is replayed on the original run's values."""
    import attnopt.region as region

    original = region.pass_pipeline
    monkeypatch.setattr(region, "pass_pipeline",
                        lambda policy: original(policy) + [_BreakFirstSite()])
    with pytest.raises(VerificationError) as failure:
        attnopt.optimize(Tiny(), example_inputs=(torch.randn(B, S, E),))
    table = str(failure.value)
    assert "blocks.0" in table and "blocks.1" not in table
    assert "model output" in table
