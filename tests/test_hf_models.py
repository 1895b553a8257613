"""attnopt on tiny random-weight Hugging Face models built from configs (nothing downloaded).

Each model is built twice from the same seed: `reference` stays untouched, `model` is handed
to `attnopt.optimize` (the submodule strategy swaps forwards inside it). Every case is built
once per module (module-scoped fixture, indirectly parametrized by case id) and checked for:
sites found and rewritten exactly, the rewritten graph actually running (counted calls of
`torch.ops.attnopt.attention`), outputs within 1e-5 of the reference, the capture strategy and,
for decoders, greedy `generate()` tokens.

Known attnopt failures are marked per (test, case) in KNOWN_FAILURES as strict xfails.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

transformers = pytest.importorskip("transformers")

import attnopt  # noqa: E402
from canonical_calls import CanonicalCalls  # noqa: E402

pytestmark = pytest.mark.hf

TOL = 1e-5
IMPLS = ("eager", "sdpa")
ATTENTION_OP = torch.ops.attnopt.attention.default


# --------------------------------------------------------------------------------------------
# tiny models


def _bert(impl):
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, attn_implementation=impl)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return transformers.BertModel(cfg), dict(input_ids=ids, attention_mask=mask)


def _gpt2(impl):
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(cfg), _decoder_inputs()


def _llama(impl):
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg), _decoder_inputs()


def _decoder_inputs():
    return dict(input_ids=torch.randint(3, 100, (2, 8)),
                attention_mask=torch.ones(2, 8, dtype=torch.long))


def _bloom(impl):
    """ALiBi as a (B·H, 1, S) key bias through baddbmm, the probabilities viewed back to
    (B·H, S, S) for the value bmm."""
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4,
                                   attn_implementation=impl)
    return transformers.BloomForCausalLM(cfg), _padded_decoder_inputs()


def _mpt(impl):
    cfg = transformers.MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                                 max_seq_len=32, expansion_ratio=2, attn_implementation=impl)
    return transformers.MptForCausalLM(cfg), _padded_decoder_inputs()


def _falcon_alibi(impl):
    """Eager: the ALiBi scores scaled in place (`*=`); sdpa: ALiBi folded into the mask."""
    cfg = transformers.FalconConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        new_decoder_architecture=False, multi_query=False, attn_implementation=impl)
    return transformers.FalconForCausalLM(cfg), _padded_decoder_inputs()


def _xglm(impl):
    """Fairseq-style: (B·H) scores viewed to (B, H) for the mask and floored at finfo.min."""
    cfg = transformers.XGLMConfig(vocab_size=100, d_model=32, num_layers=2, attention_heads=4,
                                  ffn_dim=64, max_position_embeddings=32,
                                  attn_implementation=impl)
    return transformers.XGLMForCausalLM(cfg), _padded_decoder_inputs()


def _padded_decoder_inputs():
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    return dict(input_ids=torch.randint(3, 100, (2, 8)), attention_mask=mask)


def _vit(impl):
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, attn_implementation=impl)
    return transformers.ViTModel(cfg), dict(pixel_values=torch.randn(2, 3, 32, 32))


def _t5(impl):
    cfg = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        decoder_start_token_id=0, attn_implementation=impl)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return transformers.T5Model(cfg), dict(
        input_ids=torch.randint(0, 100, (2, 8)), attention_mask=mask,
        decoder_input_ids=torch.randint(0, 100, (2, 6)), use_cache=False)


def _whisper(impl):
    cfg = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, attn_implementation=impl)
    # input_features: (B, num_mel_bins, 2 * max_source_positions)
    return transformers.WhisperModel(cfg), dict(
        input_features=torch.randn(2, 8, 16), decoder_input_ids=torch.randint(3, 100, (2, 6)),
        use_cache=False)


@dataclass(frozen=True)
class Spec:
    build: Callable
    sites: int
    strategy: str
    use_cache: Optional[bool] = None  # decoders: False → whole capture, None → default args
    decoder: bool = False
    # per-site expectations (in report order): dicts of AttentionSite attribute → value
    expect: tuple = ()
    impls: tuple = IMPLS  # the attention implementations the model offers


def _self(q_len, kv_len=None, heads=4, kv_heads=4, head_dim=8, **more):
    return dict(heads=heads, kv_heads=kv_heads, q_len=q_len,
                kv_len=q_len if kv_len is None else kv_len, head_dim=head_dim, **more)


_BERT = (_self(8, mask_kind="padding", gqa_group=1),) * 2
_GPT2 = (_self(8, gqa_group=1),) * 2
_LLAMA = (_self(8, kv_heads=2, gqa_group=2),) * 2
_VIT = (_self(17, mask_kind="none"),) * 2          # 16 patches + [CLS]
_T5 = (_self(8, scale=1.0), _self(6, scale=1.0), _self(6, 8, scale=1.0))
_ALIBI = (_self(8, mask_kind="additive"),) * 2
_WHISPER = (_self(8, mask_kind="none"), _self(6, mask_kind="causal"),
            _self(6, 8, mask_kind="none"))

MODELS = {
    "bert": Spec(_bert, 2, "whole", expect=_BERT),
    "vit": Spec(_vit, 2, "whole", expect=_VIT),
    "t5": Spec(_t5, 3, "whole", expect=_T5),
    "whisper": Spec(_whisper, 3, "whole", expect=_WHISPER),
    "gpt2-nocache": Spec(_gpt2, 2, "whole", use_cache=False, decoder=True, expect=_GPT2),
    "gpt2-default": Spec(_gpt2, 2, "attention-functions", decoder=True, expect=_GPT2),
    "llama-gqa-nocache": Spec(_llama, 2, "whole", use_cache=False, decoder=True,
                              expect=_LLAMA),
    "llama-gqa-default": Spec(_llama, 2, "attention-functions", decoder=True,
                              expect=_LLAMA),
    # ALiBi decoders write attention in their own modules (no attention functions to reach
    # with a KV cache): captured whole, without one
    "bloom": Spec(_bloom, 2, "whole", use_cache=False, expect=_ALIBI, impls=("eager",)),
    "mpt": Spec(_mpt, 2, "whole", use_cache=False, expect=_ALIBI, impls=("eager",)),
    "falcon-alibi": Spec(_falcon_alibi, 2, "whole", use_cache=False, expect=_ALIBI),
    "xglm": Spec(_xglm, 2, "whole", use_cache=False,
                 expect=(_self(8, mask_kind="causal+padding"),) * 2, impls=("eager",)),
}

CASE_IDS = [f"{name}-{impl}" for name in MODELS for impl in MODELS[name].impls]
DECODER_CASES = [c for c in CASE_IDS if MODELS[c.rsplit("-", 1)[0]].decoder]

# --------------------------------------------------------------------------------------------
# known attnopt failures: {test name: {case id: reason}}; each one a strict xfail

KNOWN_FAILURES: dict[str, dict[str, str]] = {}


def cases(test: str, ids=CASE_IDS):
    known = KNOWN_FAILURES.get(test, {})
    return [pytest.param(cid, id=cid, marks=[pytest.mark.xfail(strict=True, reason=known[cid])]
                         if cid in known else []) for cid in ids]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


class _CountOp(TorchDispatchMode):
    """Counts calls of one op (seen at the Python dispatch key)."""

    def __init__(self, op):
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == self.op:
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Case:
    id: str
    spec: Spec
    impl: str
    reference: torch.nn.Module
    model: torch.nn.Module
    kwargs: dict
    optimized: Any = None
    error: Optional[BaseException] = None
    cache: dict = field(default_factory=dict)

    def require(self):
        if self.error is not None:
            raise self.error
        return self.optimized


def _build(spec: Spec, impl: str):
    torch.manual_seed(0)
    model, kwargs = spec.build(impl)
    return model.eval(), kwargs


@pytest.fixture(scope="module")
def case(request) -> Case:
    cid = request.param
    name, impl = cid.rsplit("-", 1)
    spec = MODELS[name]
    reference, kwargs = _build(spec, impl)
    model, _ = _build(spec, impl)
    assert model.config._attn_implementation == impl
    if spec.use_cache is not None:
        kwargs = {**kwargs, "use_cache": spec.use_cache}
    result = Case(cid, spec, impl, reference, model, kwargs)
    try:
        result.optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised by each test that needs it
        result.error = error
    return result


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output.to_tuple() if hasattr(output, "to_tuple")
                                          else output)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_abs_diff(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb) and ta, (len(ta), len(tb))
    worst = 0.0
    for x, y in zip(ta, tb):
        assert x.shape == y.shape
        worst = max(worst, (x - y).abs().max().item())
    return worst


def _describe(report) -> str:
    return f"\n{report}"


def _generate(model, kwargs):
    return model.generate(kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
                          max_new_tokens=3, do_sample=False, pad_token_id=0)


def _reference_tokens(case: Case) -> torch.Tensor:
    if "tokens" not in case.cache:
        with torch.no_grad():
            case.cache["tokens"] = _generate(case.reference, case.kwargs)
    return case.cache["tokens"]


# --------------------------------------------------------------------------------------------
# every model


@pytest.mark.parametrize("case", cases("sites"), indirect=True)
def test_sites_found_and_rewritten(case):
    report = case.require().report
    found = [r for r in report.sites if r.site is not None]
    assert len(report.sites) == case.spec.sites, _describe(report)
    assert len(found) == case.spec.sites, _describe(report)
    assert [r.rewrite for r in report.sites] == ["exact"] * case.spec.sites, _describe(report)
    assert len(report.rewritten) == case.spec.sites
    for record in report.sites:
        assert record.max_abs_err is not None and record.max_abs_err <= TOL, _describe(report)
    for record, expected in zip(report.sites, case.spec.expect):
        site = record.site
        got = {key: getattr(site, key) for key in expected}
        assert got == expected, f"{record.name}: {got} != {expected}{_describe(report)}"
        assert site.batch == 2
        assert site.gqa_group == site.heads // site.kv_heads
    if case.spec.decoder:
        for record in report.sites:
            assert record.site.mask_kind in ("causal", "causal+padding"), _describe(report)


@pytest.mark.parametrize("case", cases("strategy"), indirect=True)
def test_capture_strategy(case):
    report = case.require().report
    assert report.capture["strategy"] == case.spec.strategy, _describe(report)


@pytest.mark.parametrize("case", cases("outputs"), indirect=True)
def test_outputs_match_original(case):
    optimized = case.require()
    with torch.no_grad():
        expected = case.reference(**case.kwargs)
        got = optimized(**case.kwargs)
    assert type(got) is type(expected)
    assert _max_abs_diff(got, expected) <= TOL


@pytest.mark.parametrize("case", cases("rewrite_runs"), indirect=True)
def test_rewritten_attention_runs(case):
    """Calling the optimized model runs one canonical attention op per site."""
    optimized = case.require()
    with torch.no_grad(), _CountOp(ATTENTION_OP) as counter:
        optimized(**case.kwargs)
    assert counter.count == case.spec.sites, _describe(optimized.report)


@pytest.mark.parametrize("case", cases("inspect", ["bert-eager", "t5-sdpa"]), indirect=True)
def test_inspect_matches_report(case):
    sites = attnopt.inspect(case.reference, example_kwargs=case.kwargs)
    assert len(sites) == case.spec.sites
    assert [s.module_path for s in sites] == \
        [r.site.module_path for r in case.require().report.sites]
    assert not any(hasattr(m.forward, "__attnopt_region__") for m in case.reference.modules())


def test_t5_has_no_scaling_and_relative_bias():
    """T5's scores are unscaled and carry a relative position bias (an additive mask)."""
    torch.manual_seed(0)
    model, kwargs = _t5("eager")
    sites = attnopt.inspect(model.eval(), example_kwargs=kwargs)
    assert [s.scale for s in sites] == [1.0, 1.0, 1.0]
    assert sites[0].mask_kind == "additive" and sites[1].mask_kind == "additive"
    assert sites[2].mask_kind in ("padding", "additive")
    assert sites[2].q_len == 6 and sites[2].kv_len == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_scale_is_inverse_sqrt_head_dim(impl):
    torch.manual_seed(0)
    model, kwargs = _bert(impl)
    sites = attnopt.inspect(model.eval(), example_kwargs=kwargs)
    assert [s.scale for s in sites] == pytest.approx([1 / math.sqrt(8)] * 2)


# --------------------------------------------------------------------------------------------
# decoders: generate()


@pytest.mark.parametrize("case", cases("generate", DECODER_CASES), indirect=True)
def test_generate_matches_greedy_tokens(case):
    optimized = case.require()
    expected = _reference_tokens(case)
    with torch.no_grad():
        got = optimized.generate(case.kwargs["input_ids"],
                                 attention_mask=case.kwargs["attention_mask"],
                                 max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert got.shape == (2, 8 + 3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", cases("generate_uses_rewrite",
                                       [c for c in DECODER_CASES if "default" in c]),
                         indirect=True)
def test_generate_runs_swapped_submodules(case):
    """KV-cache decoders: the user's own model, its attention functions dispatched to the
    rewritten graphs, generates the same greedy tokens; prefill and every decode step run the
    rewritten attention (3 new tokens: prefill + 2 decode steps per layer)."""
    optimized = case.require()
    assert optimized.report.capture["strategy"] == "attention-functions"
    expected = _reference_tokens(case)
    with torch.no_grad(), _CountOp(ATTENTION_OP) as counter:
        got = _generate(case.model, case.kwargs)
    assert torch.equal(got, expected)
    assert counter.count >= 3 * case.spec.sites, _describe(optimized.report)


def test_gemma2_softcap_and_sliding_window_are_described_and_exact():
    """Gemma 2 (eager): logit soft-capping and a sliding window on alternate layers."""
    config = transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        attn_logit_softcapping=5.0, sliding_window=4, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    input_ids = torch.randint(0, 100, (2, 8))
    optimized = attnopt.optimize(model, example_kwargs={"input_ids": input_ids,
                                                        "use_cache": False})
    sites = [r.site for r in optimized.report.sites if r.rewrite == "exact"]
    assert [(s.softcap, s.mask_kind, s.window) for s in sites] == [
        (5.0, "window", 4), (5.0, "causal", None)]
    with torch.no_grad():
        expected = model(input_ids=input_ids, use_cache=False).logits
        actual = optimized(input_ids=input_ids, use_cache=False).logits
    assert (expected - actual).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", cases("generate_nocache",
                                       [c for c in DECODER_CASES if "nocache" in c]),
                         indirect=True)
def test_generate_after_whole_capture_runs_rewritten_attention(case):
    """Whole-model capture serves forward; `generate()` (KV cache, not the captured graph)
    reaches the attention functions, which run verified rewritten graphs too."""
    optimized = case.require()
    assert optimized.report.capture["strategy"] == "whole"
    expected = _reference_tokens(case)
    with torch.no_grad(), _CountOp(ATTENTION_OP) as counter:
        got = _generate(optimized, case.kwargs)
    assert torch.equal(got, expected)
    assert counter.count >= 3 * case.spec.sites, _describe(optimized.report)


@pytest.mark.parametrize("name,impl", [("bloom", "eager"), ("mpt", "eager"),
                                       ("falcon-alibi", "eager"), ("falcon-alibi", "sdpa")])
def test_alibi_decoders_without_padding_carry_slopes(name, impl):
    """Called without an attention_mask, BLOOM, MPT and Falcon build their causal mask and
    ALiBi bias from shapes alone: each site becomes causal attention with ALiBi slopes and no
    mask tensor (with padding the bias depends on the attention_mask and stays additive)."""
    spec = MODELS[name]
    reference, kwargs = _build(spec, impl)
    model, _ = _build(spec, impl)
    inputs = dict(input_ids=kwargs["input_ids"], use_cache=False)
    optimized = attnopt.optimize(model, "exact", example_kwargs=inputs)
    sites = [r.site for r in optimized.report.sites]
    assert [(s.mask_kind, s.alibi) for s in sites] == [("causal", True)] * 2, \
        _describe(optimized.report)
    fresh = dict(input_ids=torch.randint(3, 100, (2, 8)), use_cache=False)
    with torch.no_grad(), CanonicalCalls() as calls:
        got = optimized(**fresh)
    assert calls.calls == [(True, False, None)] * 2 and calls.alibi == [True] * 2
    with torch.no_grad():
        assert _max_abs_diff(got, reference(**fresh)) <= TOL


@pytest.mark.parametrize("case", cases("untouched", ["llama-gqa-nocache-eager"]), indirect=True)
def test_users_model_called_directly_is_unchanged_after_whole_capture(case):
    """Only the OptimizedModule (and its methods) runs rewritten attention; the user's own model,
    called or exported directly, runs its original code."""
    case.require()
    with torch.no_grad(), _CountOp(ATTENTION_OP) as counter:
        case.model(**case.kwargs)
        _generate(case.model, case.kwargs)
    assert counter.count == 0
    exported = torch.export.export(case.model, (), case.kwargs, strict=False)
    assert not any("attnopt" in str(n.target) for n in exported.graph.nodes)


def test_inspect_leaves_transformers_attention_functions_as_they_were():
    """inspect() records calls through a dispatcher; afterwards every function slot no live
    optimized module uses holds the original function again (Mistral: no other test uses it)."""
    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = transformers.MistralForCausalLM(config).eval()
    namespace = __import__("sys").modules[type(model.model.layers[0].self_attn).__module__]
    before = namespace.eager_attention_forward
    sites = attnopt.inspect(model, (torch.randint(3, 100, (2, 8)),))
    assert len(sites) == 1
    assert namespace.eager_attention_forward is before
    assert not hasattr(namespace.eager_attention_forward, "__attnopt_original__")
