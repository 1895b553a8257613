"""On CUDA, `optimize(policy="exact")` runs the generated Triton kernel in real models.

Skipped without a GPU (the kernels' semantics are covered on CPU by the interpreter tests).
Tiny Hugging Face models built from configs, head dim 32 so the kernel applies. With
`ATTNOPT_KERNELS=always` each site's report says backend "triton", verification passes, the
kernel is really called (counted), and outputs match the untouched model within the verification
tolerances of the dtype. In the default mode only soft-capped sites (Gemma 2), sliding-window
bands (Gemma 2, Mistral) and ALiBi slopes (BLOOM) take the kernel.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import attnopt  # noqa: E402
import attnopt.kernels.flash as flash  # noqa: E402
from attnopt.region import reference_sdpa_backends  # noqa: E402
from attnopt.verify import TOLERANCES, compare_tensors  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, HEADS = 128, 4  # head dim 32


def _bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=256, max_position_embeddings=128, attn_implementation="eager")
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 29:] = 0
    return transformers.BertModel(config), dict(input_ids=torch.randint(0, 100, (2, 40)),
                                                attention_mask=mask)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(config), dict(
        input_ids=torch.randint(3, 100, (2, 48)), use_cache=False)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=128, n_inner=256,
        attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config), dict(
        input_ids=torch.randint(3, 100, (2, 48)), use_cache=False)


def _gemma2():
    config = transformers.Gemma2Config(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=128, attn_logit_softcapping=5.0, sliding_window=16,
        attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config), dict(
        input_ids=torch.randint(0, 100, (2, 40)), use_cache=False)


def _mistral():
    """HF's sdpa path with a padded batch: a boolean sliding-window mask, kept, with the causal
    mark and the window band on the call."""
    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=16, attn_implementation="sdpa")
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    return transformers.MistralForCausalLM(config), dict(
        input_ids=torch.randint(3, 100, (2, 40)), attention_mask=mask, use_cache=False)


def _t5():
    config = transformers.T5Config(
        vocab_size=100, d_model=HIDDEN, d_kv=32, d_ff=256, num_layers=1, num_decoder_layers=1,
        num_heads=HEADS, decoder_start_token_id=0, attn_implementation="eager")
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 33:] = 0
    return transformers.T5Model(config), dict(
        input_ids=torch.randint(0, 100, (2, 40)), attention_mask=mask,
        decoder_input_ids=torch.randint(0, 100, (2, 24)), use_cache=False)


def _bloom():
    """No attention_mask: a constant causal mask with ALiBi, which the call carries as slopes."""
    config = transformers.BloomConfig(vocab_size=100, hidden_size=HIDDEN, n_layer=2,
                                      n_head=HEADS, attn_implementation="eager")
    return transformers.BloomForCausalLM(config), dict(
        input_ids=torch.randint(3, 100, (2, 40)), use_cache=False)


MODELS = {"bert": _bert, "llama-gqa": _llama, "gpt2": _gpt2, "gemma2": _gemma2, "t5": _t5,
          "mistral-window": _mistral, "bloom-alibi": _bloom}


def _outputs(output):
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = flash.flash_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(flash, "flash_forward", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_policy_runs_the_triton_kernel(name, dtype, kernel_calls, monkeypatch):
    """ATTNOPT_KERNELS=always: every site on the generated kernel, verified."""
    monkeypatch.setenv("ATTNOPT_KERNELS", "always")
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = model.to("cuda", dtype).eval()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # cuDNN's SDPA returns other values than the definition's zeros on query rows that see no
    # key (a left-padded row's padding, Mistral's case): the expectation runs without it
    with torch.no_grad(), reference_sdpa_backends():
        expected = _outputs(model(**inputs))
    optimized = attnopt.optimize(model, example_kwargs=inputs)
    report = optimized.report
    sites = [r for r in report.sites if r.rewrite == "exact"]
    assert sites, str(report)
    assert all(r.backend == "triton" for r in sites), str(report)
    assert report.verification["passed"], str(report)
    kernel_calls.clear()
    with torch.no_grad():
        actual = _outputs(optimized(**inputs))
    assert len(kernel_calls) >= len(sites)
    stats = compare_tensors(actual, expected, TOLERANCES[dtype])
    assert stats.passed, f"{name} {dtype}: {stats}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_mode_uses_the_kernel_only_where_sdpa_has_no_fused_path(name, kernel_calls,
                                                                     monkeypatch):
    """Default: soft-capped sites (Gemma 2), window bands (Gemma 2, Mistral) and ALiBi slopes
    (BLOOM) on the kernel, plain ones on SDPA, reasons given."""
    monkeypatch.delenv("ATTNOPT_KERNELS", raising=False)
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = model.to("cuda", torch.bfloat16).eval()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    optimized = attnopt.optimize(model, example_kwargs=inputs)
    sites = [r for r in optimized.report.sites if r.rewrite == "exact"]
    for record in sites:
        want = "triton" if record.site.softcap is not None or record.site.window_band \
            or record.site.alibi else "sdpa"
        assert record.backend == want, str(optimized.report)
        assert want == "triton" or "fused SDPA" in record.backend_reason
    kernel_calls.clear()
    with torch.no_grad():
        optimized(**inputs)
    assert bool(kernel_calls) == any(r.backend == "triton" for r in sites)


@pytest.mark.parametrize("variant, params", [
    ("sparse", {"pattern": "longformer", "block": 16}),
    ("sparse", {"pattern": "window", "window": 24, "block": 16}),
    ("performer", {"features": 64}),
    ("linear", {}),
    ("hybrid", {"window": 16, "block": 16, "features": 64}),
    ("topk", {"block": 16, "top_k": 2}),
    ("int8_qk", {}),
])
def test_approximate_rewrites_run_on_cuda(variant, params):
    """Every approximate op inside a real graph on CUDA (SDPA-laid-out outputs viewed by the
    model's own reshapes), unverified so nothing is rolled back; then guarded."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 256, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).cuda().eval()
    x = torch.randn(2, 200, HIDDEN, device="cuda", dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    policy = attnopt.Policy(variant, default=variant, default_params=params)
    optimized = attnopt.optimize(model, policy, example_inputs=(x,), verify=False)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert [r.rewrite for r in records] == [variant] * 2
    if variant in ("int8_qk", "hybrid"):  # on the generated kernel, not the reference
        assert all(r.backend == "triton" for r in records), [r.backend for r in records]
    with torch.no_grad():
        out = optimized(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    guarded = attnopt.optimize(model, policy, example_inputs=(x,))
    assert guarded.report.verification["passed"]


@pytest.mark.parametrize("form", ["separate", "packed_permuted", "packed_split", "torch_mha"])
def test_weight_rewrites_run_on_cuda(form, monkeypatch):
    """Head surgery and int8 projections on CUDA: heads built to make pruning and pooling exact
    (test_weights.py), so the rewritten model must match the original up to int8 rounding; the
    rebuilt GQA site runs the Triton kernel (counted) without repeating k/v."""
    from test_weights import _model, _silence_heads, _tie_heads, B, S, E
    monkeypatch.setenv("ATTNOPT_KERNELS", "always")
    model = _model(form)
    _silence_heads(model, [2, 3])
    _tie_heads(model, [(0, 1)])
    model = model.cuda()
    x = torch.randn(B, S, E, device="cuda")
    policy = attnopt.Policy("cuda-weights", weights=[
        attnopt.policy.Rule("prune_heads", params={"fraction": 0.5}),
        attnopt.policy.Rule("gqa", params={"kv_heads": 1}),
        attnopt.policy.Rule("int8", params={"mode": "weight_only"})])
    optimized = attnopt.optimize(model, policy, example_inputs=(x,))
    (record,) = [r for r in optimized.report.sites if r.site is not None]
    weights = record.approximation["weights"]
    assert weights["prune_heads"]["kept"] == [0, 1] and weights["gqa"]["kv_heads"] == 1
    assert weights["int8"]["quantized"]
    fresh = torch.randn(B, S, E, device="cuda")
    with torch.no_grad():
        expected, out = model(fresh), optimized(fresh)
    assert float((out - expected).norm() / expected.norm()) < 0.02
