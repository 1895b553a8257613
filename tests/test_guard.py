"""The guard on trained models: approximations stay where the model's attention allows them.

The fixtures (tests/trained.py) are trained here, so their attention has a known shape:
peaked and far-reaching (retrieval), peaked and local (local), spread out (diffuse). Under the
default error budget, Performer must be rolled back where attention is peaked and kept where
it is diffuse; a sliding window must be kept on the local task and rolled back on retrieval.
What is kept must keep the task's accuracy.
"""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt import ErrorBudget, Policy, guard, region

import trained

pytestmark = pytest.mark.xdist_group("trained")  # train each fixture once per worker

PERFORMER = Policy("performer-everywhere", default="performer",
                   default_params={"features": 256})
WINDOW = Policy("window-everywhere", default="sparse",
                default_params={"pattern": "window", "window": 24, "block": 16})
#: Accuracy a kept approximation may lose on its task (fraction of positions).
ACCURACY_DROP = 0.02


def _optimized(task: str, policy, **options):
    model = trained.train(task)
    tokens, _ = trained.draw(task, 8, torch.Generator().manual_seed(5))
    return model, attnopt.optimize(model, policy, example_inputs=(tokens,), **options)


def _site(optimized):
    (record,) = [r for r in optimized.report.sites if r.site is not None]
    return record


@pytest.mark.parametrize("task, policy, kept", [
    ("retrieval", PERFORMER, False),
    ("local", PERFORMER, False),
    ("diffuse", PERFORMER, True),
    ("local", WINDOW, True),
    ("retrieval", WINDOW, False),
])
def test_guard_keeps_approximations_only_where_attention_allows(task, policy, kept):
    model, optimized = _optimized(task, policy)
    record = _site(optimized)
    variant = policy.default
    if kept:
        assert record.rewrite == variant and record.approximation["variant"] == variant
        assert record.passed and record.rel_err <= policy.budget.site_rel_err
        before, after = trained.accuracy(model, task), trained.accuracy(optimized, task)
        assert after >= before - ACCURACY_DROP
    else:
        assert record.rewrite == "exact" and record.rolled_back["variant"] == variant
        assert "rolled back" in record.reason
        assert record.rolled_back["rel_err"] > policy.budget.site_rel_err or \
            record.rolled_back["cosine"] < policy.budget.site_min_cosine
        # rolled back means exact: the outputs are the original model's
        tokens, _ = trained.draw(task, 4, torch.Generator().manual_seed(9))
        with torch.no_grad():
            assert torch.allclose(optimized(tokens), model(tokens), atol=1e-5, rtol=1e-4)
    assert optimized.report.verification["passed"]


def test_guard_records_the_original_graph_once_per_input_set(monkeypatch):
    """Rounds after the first reuse the original graph's recorded values (the rollback below
    takes two rounds), and measure what recording again would."""
    made = []

    def recordings(budget):
        class Counting(region.OriginalRecordings):
            def __init__(self):
                super().__init__(budget)
                made.append(self)
        return Counting

    monkeypatch.setattr(guard, "OriginalRecordings", recordings(region.RECORDINGS_BUDGET))
    _, kept = _optimized("retrieval", PERFORMER)
    monkeypatch.setattr(guard, "OriginalRecordings", recordings(0))
    _, again = _optimized("retrieval", PERFORMER)
    (cached, uncached) = made
    input_sets = len(cached.entries)
    assert input_sets > 1 and cached.runs == input_sets
    assert uncached.runs >= 2 * input_sets and not uncached.entries
    first, second = _site(kept), _site(again)
    assert first.rewrite == second.rewrite == "exact"
    for key in ("rel_err", "cosine"):
        assert first.rolled_back[key] == second.rolled_back[key]


TWO_FEATURES = Policy("performer-2", default="performer", default_params={"features": 2})


def _task_accuracy(task: str):
    """A user's metric: accuracy on a held-out batch shaped like the examples."""
    tokens, targets = trained.draw(task, 8, torch.Generator().manual_seed(11))

    def accuracy(model) -> float:
        with torch.no_grad():
            return float((model(tokens).argmax(-1) == targets).float().mean())
    return accuracy


def test_task_metric_keeps_what_the_budget_refuses_where_the_task_allows_it():
    """Two random features on the diffuse task: over the site budget (rolled back by default),
    kept when the user accepts a 0.2 drop of their metric, which it stays within."""
    model, budgeted = _optimized("diffuse", TWO_FEATURES)
    assert _site(budgeted).rewrite == "exact"
    metric = _task_accuracy("diffuse")
    _, kept = _optimized("diffuse", TWO_FEATURES, metric=metric, metric_drop=0.2)
    record = _site(kept)
    assert record.rewrite == "performer" and record.rolled_back is None
    assert record.rel_err > TWO_FEATURES.budget.site_rel_err
    measured = kept.report.verification["metric"]
    assert measured["original"] == metric(model) and measured["max_drop"] == 0.2
    assert measured["passed"] and measured["optimized"] >= measured["original"] - 0.2
    assert measured["optimized"] == metric(kept)  # what is installed is what was measured
    assert kept.report.verification["passed"] and "task metric" in str(kept.report)
    # another batch size is captured at call time and held to the budget: exact here
    tokens, _ = trained.draw("diffuse", 3, torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert torch.allclose(kept(tokens), model(tokens), atol=1e-5, rtol=1e-4)


def test_task_metric_rolls_back_what_costs_the_task():
    model, optimized = _optimized("local", PERFORMER, metric=_task_accuracy("local"),
                                  metric_drop=0.02)
    record = _site(optimized)
    assert record.rewrite == "exact" and "task metric" in record.reason
    assert optimized.report.verification["passed"]
    tokens, _ = trained.draw("local", 8, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(optimized(tokens), model(tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options, error, match", [
    (dict(metric=3), TypeError, "metric must be a function"),
    (dict(metric=lambda m: 1.0, metric_drop=-0.1), ValueError, "metric_drop"),
    (dict(metric=lambda m: 1.0, verify=False), attnopt.AttnoptError, "verify=False"),
    (dict(metric=lambda m: "high"), TypeError, "finite number"),
    (dict(metric=lambda m: float(m(torch.zeros(3, trained.LENGTH, dtype=torch.long))
                                 .detach().sum())), attnopt.AttnoptError, "does not accept"),
])
def test_task_metric_bad_input_is_named(options, error, match):
    with pytest.raises(error, match=match):
        _optimized("diffuse", PERFORMER, **options)


def test_original_recordings_stay_within_their_budget_and_remember_failures():
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x.view(4, 4) * 2 + 1

    graph = torch.fx.symbolic_trace(Tiny())
    view, mul, add = [n.name for n in graph.graph.nodes if n.op in ("call_method",
                                                                    "call_function")]
    x = torch.randn(16)
    kept = region.OriginalRecordings()
    first, _ = kept.get(graph, 0, (x,), {}, {mul})
    again, _ = kept.get(graph, 0, (x,), {}, {mul})
    assert kept.runs == 1 and again is first and torch.equal(first[mul], x.view(4, 4) * 2)
    kept.get(graph, 0, (x,), {}, {mul, add})  # a node no round recorded: recorded again
    assert kept.runs == 2 and kept.bytes == 3 * 16 * 4  # mul, add and the output
    tight = region.OriginalRecordings(budget=16)
    tight.get(graph, 0, (x,), {}, {mul})
    tight.get(graph, 0, (x,), {}, {mul})
    assert tight.runs == 2 and not tight.entries and tight.bytes == 0
    assert kept.get(graph, 1, (torch.randn(5),), {}, {mul}) is None  # rejected: remembered
    assert kept.get(graph, 1, (torch.randn(5),), {}, {mul}) is None and kept.runs == 3
    with pytest.raises(RuntimeError):  # the examples themselves must run
        region.OriginalRecordings().get(graph, 0, (torch.randn(5),), {}, {mul})


def test_guard_rounds_share_the_sites_attention_entropies(monkeypatch):
    """A rebuild under the same weight rewrites reads the entropies the first build measured
    (they need the graph run up to each site)."""
    from attnopt.capture import export_module
    from attnopt.passes.approximate import ApproximateAttention
    calls = []
    measure = ApproximateAttention._measure_entropies
    monkeypatch.setattr(ApproximateAttention, "_measure_entropies",
                        lambda *a: calls.append(1) or measure(*a))
    model = trained.train("diffuse")
    tokens, _ = trained.draw("diffuse", 8, torch.Generator().manual_seed(5))
    captured = export_module(model, (tokens,), {}, dynamic=False)
    cache: dict = {}
    first = region.build_region(captured, PERFORMER, False, entropy_cache=cache)
    again = region.build_region(captured, PERFORMER, False, entropy_cache=cache)
    (name,) = first.approximations
    assert len(calls) == 1 and 0.7 < first.approximations[name]["entropy"] <= 1.0
    assert again.approximations[name]["entropy"] == first.approximations[name]["entropy"]


def test_report_measures_attention_entropy():
    """Peaked heads have low row entropy, diffuse ones high: the report says which is which."""
    unguarded = dict(budget=ErrorBudget(site_rel_err=10, site_min_cosine=-1, output_rel_err=10))
    entropies = {}
    for task in ("retrieval", "diffuse"):
        policy = Policy("p", default="performer", **unguarded)
        _, optimized = _optimized(task, policy)
        entropies[task] = _site(optimized).approximation["entropy"]
    assert 0.0 <= entropies["retrieval"] < 0.3 < 0.7 < entropies["diffuse"] <= 1.0


def test_end_to_end_budget_rolls_back_sites_within_their_own_budget():
    policy = Policy("tight-output", default="performer",
                    budget=ErrorBudget(site_rel_err=10, site_min_cosine=-1, output_rel_err=1e-3))
    _, optimized = _optimized("diffuse", policy)
    record = _site(optimized)
    assert record.rewrite == "exact" and "end-to-end budget" in record.reason
    assert optimized.report.verification["passed"]


def test_report_lists_variant_parameters_errors_and_cost():
    _, optimized = _optimized("diffuse", PERFORMER)
    text = str(optimized.report)
    assert "performer(features=256" in text and "FLOPs of exact" in text
    assert "error budget (normwise)" in text
    data = optimized.report.to_dict()["sites"][0]
    assert data["approximation"]["params"]["features"] == 256
    assert 0 < data["approximation"]["flop_ratio"] < 10


@pytest.mark.parametrize("task", ["diffuse", "retrieval"])
def test_guarded_model_exports_to_onnx_with_its_rollbacks(task, tmp_path):
    """What is exported is what was verified: the kept Performer (diffuse) exports as random
    features, the rolled-back one (retrieval) as exact attention."""
    model, optimized = _optimized(task, PERFORMER)
    tokens, _ = trained.draw(task, 8, torch.Generator().manual_seed(5))
    result = attnopt.export_onnx(optimized, str(tmp_path / f"{task}.onnx"),
                                 example_inputs=(tokens,))
    assert result.passed
    kept = _site(optimized).rewrite == "performer"
    assert kept == (task == "diffuse")
    assert result.op_histogram.get("Attention", 0) == (0 if kept else 1)  # exact (opset 23)
    assert (result.op_histogram.get("Exp", 0) > 0) == kept  # the random features


def test_without_verification_nothing_is_guarded_and_the_report_says_so():
    _, optimized = _optimized("retrieval", PERFORMER, verify=False)
    record = _site(optimized)
    assert record.rewrite == "performer" and record.passed is None
    assert any("not verified" in note for note in optimized.report.notes)


# --------------------------------------------------------------------------------------------
# the compressing presets: the guard rolls back one rewrite of a site at a time


def test_compact_drops_the_lossy_gqa_and_keeps_int8_projections():
    """Pooling the two heads of the retrieval model breaks it (measured: accuracy 0.84 when
    forced); int8 projections do not. The guard must take back GQA only."""
    model, optimized = _optimized("retrieval", "compact")
    record = _site(optimized)
    assert record.rolled_back is None
    weights = record.approximation["weights"]
    assert "gqa" not in weights and weights["int8"]["quantized"]
    assert any(note.startswith("gqa rolled back") for note in record.weight_notes)
    parameters = optimized.report.parameters
    assert parameters["after_bytes"] < parameters["before_bytes"]
    before, after = trained.accuracy(model, "retrieval"), trained.accuracy(optimized, "retrieval")
    assert after >= before - ACCURACY_DROP


@pytest.mark.parametrize("task, linear_kept", [("diffuse", True), ("retrieval", False)])
def test_edge_keeps_linear_attention_only_where_attention_is_diffuse(task, linear_kept):
    model, optimized = _optimized(task, "edge")
    record = _site(optimized)
    assert record.rewrite == ("linear" if linear_kept else "exact")
    assert record.approximation["weights"]["int8"]["quantized"] == ["qkv", "out"]
    before, after = trained.accuracy(model, task), trained.accuracy(optimized, task)
    assert after >= before - ACCURACY_DROP
    assert optimized.report.verification["passed"]
