"""A sweep of Hugging Face families beyond test_hf_models: each built tiny from its config
(random weights, nothing downloaded), optimized with the exact policy (which verifies the
rewrite against the original), and every attention site found with the expected mask kind.
Softmaxes that are not attention (Mixtral's router) must be left alone with their reason.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import attnopt  # noqa: E402

pytestmark = pytest.mark.hf

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=100, max_position_embeddings=64)
GPT_STYLE = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)

#: name -> (config class, model class, config overrides, expected mask kinds, attention
#: implementations, how many softmaxes are not attention)
FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, {"causal"}, ("eager", "sdpa"), 0),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(GPT_STYLE, rotary_dim=8), {"causal"},
             ("eager",), 0),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64),
            {"causal"}, ("eager", "sdpa"), 0),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, {"causal"}, ("eager", "sdpa"), 0),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2), {"causal"},
              ("eager", "sdpa"), 0),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_key_value_heads=2, head_dim=16, sliding_window=8), {"window"},
               ("eager", "sdpa"), 0),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(GPT_STYLE, rotary_dim=8, n_ctx=64),
                {"causal"}, ("eager",), 0),
    "roberta": ("RobertaConfig", "RobertaModel", {}, {"none"}, ("eager", "sdpa"), 0),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128), {"none"},
                   ("eager", "sdpa"), 0),
    "albert": ("AlbertConfig", "AlbertModel", dict(embedding_size=32), {"none"},
               ("eager", "sdpa"), 0),
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", {}, {"none"}, ("eager",), 0),
    "electra": ("ElectraConfig", "ElectraModel", dict(embedding_size=32), {"none"},
                ("eager", "sdpa"), 0),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, num_local_experts=2), {"causal"},
                ("eager", "sdpa"), 2),
    "falcon_new": ("FalconConfig", "FalconForCausalLM",
                   dict(new_decoder_architecture=True, num_kv_heads=2), {"causal"},
                   ("eager", "sdpa"), 0),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(GPT_STYLE, multi_query=True), {"causal"}, ("eager", "sdpa"), 0),
}

CASES = [pytest.param(name, impl, id=f"{name}-{impl}")
         for name, spec in FAMILIES.items() for impl in spec[4]]


@pytest.mark.parametrize("name,impl", CASES)
def test_every_attention_site_is_found_and_exact(name, impl):
    config_name, model_name, overrides, kinds, _, not_attention = FAMILIES[name]
    config = getattr(transformers, config_name)(**{**SMALL, **overrides},
                                                attn_implementation=impl)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    inputs = dict(input_ids=torch.randint(3, 100, (2, 12)))
    if model_name.endswith("ForCausalLM"):
        inputs["use_cache"] = False
    optimized = attnopt.optimize(model, "exact", example_kwargs=inputs)  # verifies, or raises
    report = optimized.report
    found = [r for r in report.sites if r.site is not None]
    left = [r for r in report.sites if r.site is None]
    assert len(found) == 2 and [r.rewrite for r in found] == ["exact"] * 2, str(report)
    assert {r.site.mask_kind for r in found} == kinds, str(report)
    assert len(left) == not_attention, str(report)
    assert all("fewer than 3 dims" in r.reason for r in left), str(report)
