"""Length-based presets, the latency calibration behind them, and approximate rewrites on
the core zoo and Hugging Face models."""

from __future__ import annotations

import json

import pytest
import torch

import attnopt
from attnopt import Policy
from attnopt.costmodel import Calibration, _fit, calibrate
from attnopt.errors import PolicyError
from attnopt.presets import fast_policy, long_policy, memory_policy
from attnopt.site import AttentionSite

from zoo import ZOO


def _site(q_len: int) -> AttentionSite:
    return AttentionSite(name="s", module_path="layers.0.attn", module_type="A", form="matmul",
                         batch=1, heads=4, kv_heads=4, q_len=q_len, kv_len=q_len, head_dim=64,
                         v_head_dim=64, scale=0.125)


def test_long_policy_chooses_by_length_and_round_trips():
    policy = long_policy(t1=1024, t2=8192)
    assert [policy.decide(_site(n))[0] for n in (1, 1023, 1024, 8191, 8192, 10 ** 6)] == \
        ["exact", "exact", "sparse", "sparse", "hybrid", "hybrid"]
    assert "T1=1024" in policy.decide(_site(2000))[1]
    again = Policy.from_json(policy.to_json())
    assert [again.decide(_site(n))[0] for n in (10, 2000, 9000)] == ["exact", "sparse", "hybrid"]


def test_thresholds_from_the_environment_skip_calibration(monkeypatch):
    monkeypatch.setenv("ATTNOPT_THRESHOLDS", "300,5000")
    for name in ("long", "memory", "accurate"):
        policy = attnopt.resolve_policy(name)
        assert policy.decide(_site(299))[0] == "exact"
        assert policy.decide(_site(5000))[0] in ("hybrid", "performer")
    monkeypatch.setenv("ATTNOPT_THRESHOLDS", "a,b")
    with pytest.raises(PolicyError, match="two integers"):
        attnopt.resolve_policy("long")


def test_unknown_variant_parameters_are_rejected():
    with pytest.raises(PolicyError, match="unknown parameter"):
        attnopt.Rule("performer", params={"feature": 64})
    with pytest.raises(PolicyError, match="unknown parameter"):
        Policy("p", default="sparse", default_params={"windw": 3})


def test_fit_recovers_a_quadratic_and_stays_non_negative():
    lengths = [512, 1024, 2048, 4096]
    a, b, c = _fit(lengths, [2.0 + 0.01 * n + 1e-5 * n * n for n in lengths])
    assert abs(a - 2.0) < 1e-6 and abs(b - 0.01) < 1e-8 and abs(c - 1e-5) < 1e-11
    assert min(_fit(lengths, [5.0, 4.0, 6.0, 9.0])) >= 0.0


def _calibration(times: dict) -> Calibration:
    return Calibration("test-device", "float32", 4, 64, False, torch.__version__,
                       [512, 1024, 2048, 4096], times)


def test_thresholds_and_fastest_variants_follow_the_measurements():
    lengths = [512, 1024, 2048, 4096]
    calibration = _calibration({
        "exact": [1e-5 * n * n for n in lengths],      # crosses the others around 1-2K
        "sparse": [0.02 * n for n in lengths],
        "hybrid": [0.04 * n for n in lengths],
        "performer": [0.03 * n for n in lengths]})
    t1, t2 = calibration.thresholds(min_speedup=2.0)
    # 1e-5 n² = 0.02 n at 2000; = 2 × 0.04 n at 8000 (a grid of 1/16 steps above)
    assert 2000 <= t1 <= 2000 * 1.07 and 8000 <= t2 <= 8000 * 1.07
    policy = fast_policy(calibration=calibration)
    assert policy.decide(_site(256))[0] == "exact"
    assert policy.decide(_site(16384))[0] == "sparse"


def test_calibration_measures_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    measured = calibrate("cpu", heads=1, head_dim=16, lengths=(128, 256, 512), runs=1)
    assert set(measured.times_ms) == {"exact", "sparse", "hybrid", "performer"}
    assert all(len(t) == 3 and min(t) > 0 for t in measured.times_ms.values())
    cache = json.loads((tmp_path / "calibration.json").read_text())
    (key,) = cache
    assert "cpu" in key and "d16" in key
    reloaded = calibrate("cpu", heads=1, head_dim=16)  # from the cache, no new measurement
    assert reloaded.times_ms == measured.times_ms


@pytest.mark.parametrize("case", sorted(ZOO))
def test_every_zoo_site_takes_an_approximation_or_says_why(case):
    """Unverified, so nothing is rolled back: each site is rewritten, or the report says
    why the variant does not apply; outputs keep their shape and stay finite."""
    make, inputs, _ = ZOO[case]
    model, example = make(), inputs()
    for variant in ("performer", "sparse"):
        policy = Policy(variant, default=variant,
                        default_params={"block": 16} if variant == "sparse" else {})
        optimized = attnopt.optimize(model, policy, example_inputs=example, verify=False)
        for record in optimized.report.sites:
            if record.site is None:
                continue
            assert record.rewrite == variant or "not applicable" in record.reason, \
                (record.name, record.rewrite, record.reason)
        with torch.no_grad():
            got, want = optimized(*example), model(*example)
        for a, b in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(want)):
            assert a.shape == b.shape and torch.isfinite(a).all()


@pytest.mark.parametrize("case", sorted(ZOO))
def test_long_policy_on_the_zoo_is_verified(case):
    make, inputs, _ = ZOO[case]
    optimized = attnopt.optimize(make(), long_policy(t1=1, t2=6), example_inputs=inputs())
    assert optimized.report.verification["passed"]
    for record in optimized.report.sites:
        if record.site is not None:
            assert record.passed, (record.name, record.rewrite, record.reason)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_long_policy_on_hugging_face_models(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64,
                                         max_position_embeddings=256)
        model = transformers.BertModel(config).eval()
        mask = torch.ones(2, 128, dtype=torch.long)
        mask[1, 100:] = 0
        kwargs = dict(input_ids=torch.randint(0, 100, (2, 128)), attention_mask=mask)
    else:
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=256)
        model = transformers.LlamaForCausalLM(config).eval()
        kwargs = dict(input_ids=torch.randint(3, 100, (2, 128)), use_cache=False)
    policy = long_policy(t1=64, t2=100)  # every site at 128 takes the hybrid, guarded
    optimized = attnopt.optimize(model, policy, example_kwargs=kwargs)
    sites = [r for r in optimized.report.sites if r.site is not None]
    assert len(sites) == 2 and optimized.report.verification["passed"]
    for record in sites:
        assert record.rewrite in ("hybrid", "exact")
        assert record.rewrite == "hybrid" or record.rolled_back or \
            "not applicable" in record.reason
    with torch.no_grad():
        got = optimized(**kwargs)[0]
        want = model(**kwargs)[0]
    assert ((got - want).norm() / want.norm()) <= policy.budget.output_rel_err
