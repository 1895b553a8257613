"""ONNX export: every attnopt op's translations run in onnxruntime and match PyTorch, whole
models export with dynamic batch and sequence dims, and bad input is refused without writing."""

from __future__ import annotations

import os

import pytest
import torch

import attnopt
from attnopt.onnx_export import translation_table
from zoo import ZOO

#: onnxruntime vs PyTorch, fp32 (same as verification's elementwise fp32 tolerance)
ATOL = 1e-5


class _CanonicalCall(torch.nn.Module):
    """One call of the canonical op with fixed non-tensor arguments."""

    def __init__(self, mask, is_causal, scale, enable_gqa, softcap, window_left=None,
                 alibi_slopes=None):
        super().__init__()
        self.mask, self.options = mask, (is_causal, scale, enable_gqa, softcap, window_left)
        self.register_buffer("alibi_slopes", alibi_slopes)

    def forward(self, q, k, v):
        return torch.ops.attnopt.attention(q, k, v, self.mask, *self.options,
                                           self.alibi_slopes)


OP_CASES = {
    "plain": dict(mask=None, is_causal=False, kv_heads=4, softcap=None),
    "causal": dict(mask=None, is_causal=True, kv_heads=4, softcap=None),
    "gqa_bool_mask": dict(mask="bool", is_causal=False, kv_heads=2, softcap=None),
    # a padded decoder's call after canonicalization: its boolean mask and the causal mark
    "gqa_bool_mask_causal": dict(mask="bool", is_causal=True, kv_heads=2, softcap=None),
    "float_mask_causal": dict(mask="float", is_causal=True, kv_heads=4, softcap=None),
    "softcap_float_mask": dict(mask="float", is_causal=False, kv_heads=4, softcap=5.0),
    "gqa_causal_softcap": dict(mask=None, is_causal=True, kv_heads=1, softcap=3.0),
    # sliding windows after canonicalization: a constant one as a band alone, a padded one as
    # its boolean mask with the causal mark and the band
    "causal_window": dict(mask=None, is_causal=True, kv_heads=4, softcap=None, window=3),
    "gqa_bool_mask_causal_window": dict(mask="bool", is_causal=True, kv_heads=2, softcap=None,
                                        window=4),
    "causal_window_softcap": dict(mask=None, is_causal=True, kv_heads=2, softcap=3.0, window=2),
    # ALiBi after canonicalization: slopes with the causal mark, and with a padded boolean mask
    "causal_alibi": dict(mask=None, is_causal=True, kv_heads=4, softcap=None, alibi=True),
    "gqa_bool_mask_causal_alibi": dict(mask="bool", is_causal=True, kv_heads=2, softcap=None,
                                       alibi=True),
}


def _fused_op(case, opset, target):
    """The one node the call should become, or None for the decomposed translation."""
    if target == "ort":  # GroupQueryAttention: causal, grouped or soft-capped self-attention
        grouped = case["is_causal"] or case["kv_heads"] != 4 or case["softcap"] is not None
        return "GroupQueryAttention" if grouped else "MultiHeadAttention"
    return "Attention" if opset >= 23 and case["softcap"] is None else None


@pytest.mark.parametrize("opset,target", [(18, "onnx"), (23, "onnx"), (18, "ort")])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_attention_op_translations_run_in_onnxruntime(name, opset, target):
    case = OP_CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)) + opset)
    q = torch.randn(2, 4, 12, 16, generator=generator)
    k, v = (torch.randn(2, case["kv_heads"], 12, 16, generator=generator) for _ in range(2))
    mask = {None: None, "bool": torch.rand(12, 12, generator=generator) > 0.3,
            "float": torch.randn(2, 1, 12, 12, generator=generator)}[case["mask"]]
    if case["mask"] == "bool" and case["is_causal"]:
        mask[0] = False  # a query that sees no key (a left-padded row): 0, as in torch
    slopes = torch.rand(4, generator=generator) if case.get("alibi") else None
    module = _CanonicalCall(mask, case["is_causal"], 0.3, case["kv_heads"] != 4, case["softcap"],
                            case.get("window"), slopes)
    program = torch.onnx.export(module, (q, k, v), dynamo=True, opset_version=opset,
                                verbose=False,
                                custom_translation_table=translation_table(opset, target))
    ops = {node.op_type for node in program.model.graph}
    fused = _fused_op(case, opset, target)
    assert ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention"} == \
        ({fused} if fused else set()), ops
    actual = program(q, k, v)[0]
    assert (actual - module(q, k, v)).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_export_and_verify(name, tmp_path):
    """Every form in the zoo: optimized, exported, run in onnxruntime on the examples and two
    fresh draws within tolerance (export_onnx raises otherwise)."""
    case = ZOO[name]
    torch.manual_seed(0)
    model, args = case.make().eval(), case.inputs()
    optimized = attnopt.optimize(model, example_inputs=args)
    path = tmp_path / "model.onnx"
    result = attnopt.export_onnx(optimized, path, example_inputs=args, dynamic=False)
    assert result.passed and os.path.exists(path)
    assert result.op_histogram.get("Attention", 0) + result.op_histogram.get("Softmax", 0) \
        >= case.sites


@pytest.mark.parametrize("name", ["fused_causal", "matmul_divide_padding", "mha_key_padding",
                                  "relative_bias"])
def test_zoo_models_export_to_onnxruntime_contrib_ops(name, tmp_path):
    case = ZOO[name]
    torch.manual_seed(0)
    model, args = case.make().eval(), case.inputs()
    optimized = attnopt.optimize(model, example_inputs=args)
    result = attnopt.export_onnx(optimized, tmp_path / "model.onnx", example_inputs=args,
                                 target="ort", dynamic=False)
    fused = result.op_histogram.get("MultiHeadAttention", 0) + \
        result.op_histogram.get("GroupQueryAttention", 0)
    assert result.passed and fused == case.sites


def test_dynamic_bert_export_runs_other_shapes(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    inputs = dict(input_ids=torch.randint(0, 100, (2, 12)), attention_mask=mask)
    optimized = attnopt.optimize(model, example_kwargs=inputs)
    result = attnopt.export_onnx(optimized, tmp_path / "bert.onnx", example_kwargs=inputs)
    assert result.passed and result.op_histogram["Attention"] == 2
    fused = attnopt.export_onnx(optimized, tmp_path / "bert-ort.onnx", example_kwargs=inputs,
                                target="ort")
    assert fused.passed and fused.op_histogram["MultiHeadAttention"] == 2
    assert result.file_bytes > 0 and result.ort_latency_ms > 0
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "bert.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    other_mask = torch.ones(3, 20, dtype=torch.long)
    other_mask[0, 15:] = 0
    other = dict(input_ids=torch.randint(0, 100, (3, 20)), attention_mask=other_mask)
    actual = session.run(None, {k: v.numpy() for k, v in other.items()})[0]
    with torch.no_grad():
        expected = model(**other).last_hidden_state
    assert abs(torch.from_numpy(actual) - expected).max().item() <= ATOL


def test_bad_arguments_write_nothing(tmp_path):
    model = torch.nn.Linear(4, 4)
    x = (torch.randn(2, 4),)
    with pytest.raises(ValueError, match="example inputs"):
        attnopt.export_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="unknown target"):
        attnopt.export_onnx(model, tmp_path / "a.onnx", example_inputs=x, target="tflite")
    with pytest.raises(ValueError, match="opset 11"):
        attnopt.export_onnx(model, tmp_path / "a.onnx", example_inputs=x, opset=11)
    with pytest.raises(ValueError, match="does not exist"):
        attnopt.export_onnx(model, tmp_path / "missing" / "a.onnx", example_inputs=x)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_decoders_export_to_group_query_attention_with_dynamic_shapes(family, tmp_path):
    """target="ort": Llama's grouped causal sites and Gemma 2's soft-capped ones (one with a
    sliding-window mask) become onnxruntime's GroupQueryAttention, k/v at their own head
    count; the file runs at other batch sizes and lengths (export_onnx checks fresh draws)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="eager")
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=8, attn_logit_softcapping=5.0, sliding_window=4))
    torch.manual_seed(0)
    model = model.eval()
    inputs = dict(input_ids=torch.randint(0, 100, (2, 8)), use_cache=False)
    optimized = attnopt.optimize(model, example_kwargs=inputs)
    result = attnopt.export_onnx(optimized, tmp_path / "decoder.onnx", example_kwargs=inputs,
                                 target="ort")
    assert result.passed and result.op_histogram.get("GroupQueryAttention", 0) == 2
    assert result.dynamic and len(result.errors) >= 3


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("opset,target", [(18, "onnx"), (23, "onnx"), (18, "ort")])
def test_padded_decoder_exports_with_rows_that_see_no_key(opset, target, window, tmp_path):
    """A left-padded batch (HF's SDPA path: a boolean causal mask, marked causal by
    canonicalization): export_onnx's fresh draws of the attention_mask leave some query rows
    with no key to see, which every translation must return as 0, as torch does. With a
    sliding window (Mistral) the calls carry the band too, which every translation applies."""
    transformers = pytest.importorskip("transformers")
    config_class = transformers.MistralConfig if window else transformers.LlamaConfig
    config = config_class(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa", **({"sliding_window": window} if window else {}))
    torch.manual_seed(0)
    model = (transformers.MistralForCausalLM if window else
             transformers.LlamaForCausalLM)(config).eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    inputs = dict(input_ids=torch.randint(3, 100, (2, 12)), attention_mask=mask,
                  use_cache=False)
    optimized = attnopt.optimize(model, example_kwargs=inputs)
    assert [r.site.window_band for r in optimized.report.sites] == [bool(window)] * 2
    result = attnopt.export_onnx(optimized, tmp_path / "decoder.onnx", example_kwargs=inputs,
                                 opset=opset, target=target, dynamic=False)
    assert result.passed
