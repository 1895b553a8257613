"""A sweep of Hugging Face families beyond test_hf_models: each built tiny from its config
(random weights, nothing downloaded), optimized with the exact policy (which verifies the
rewrite against the original), and every attention site found with the expected mask kinds.
Softmaxes that are not attention (Mixtral's router) must be left alone with their reason.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import attnopt  # noqa: E402

pytestmark = pytest.mark.hf

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=100, max_position_embeddings=64)
GPT_STYLE = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
SEQ2SEQ = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
IMAGE = dict(image_size=32, patch_size=8)


def _tokens():
    return dict(input_ids=torch.randint(3, 100, (2, 12)))


def _decoder():
    return dict(_tokens(), use_cache=False)


def _seq2seq():
    return dict(_tokens(), decoder_input_ids=torch.randint(3, 100, (2, 8)), use_cache=False)


def _pixels():
    return dict(pixel_values=torch.randn(2, 3, 32, 32))


@dataclass(frozen=True)
class Family:
    config: str
    model: str
    overrides: dict = field(default_factory=dict)
    kinds: frozenset = frozenset({"causal"})
    inputs: Callable = _decoder
    impls: tuple = ("eager", "sdpa")
    sites: int = 2
    not_attention: int = 0  # softmaxes that are not attention (left alone)


NONE = frozenset({"none"})
FAMILIES = {
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gptj": Family("GPTJConfig", "GPTJForCausalLM", dict(GPT_STYLE, rotary_dim=8),
                   impls=("eager",)),
    "opt": Family("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "phi": Family("PhiConfig", "PhiForCausalLM"),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "granite": Family("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2)),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "cohere": Family("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2)),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM",
                     dict(num_key_value_heads=2, head_dim=16, sliding_window=8),
                     frozenset({"window"})),
    "codegen": Family("CodeGenConfig", "CodeGenForCausalLM",
                      dict(GPT_STYLE, rotary_dim=8, n_ctx=64), impls=("eager",)),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM",
                      dict(num_key_value_heads=2, num_local_experts=2), not_attention=2),
    "falcon_new": Family("FalconConfig", "FalconForCausalLM",
                         dict(new_decoder_architecture=True, num_kv_heads=2)),
    "gpt_bigcode": Family("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                          dict(GPT_STYLE, multi_query=True)),
    "mbart": Family("MBartConfig", "MBartModel", SEQ2SEQ, frozenset({"causal", "none"}),
                    _seq2seq, sites=4),
    "roberta": Family("RobertaConfig", "RobertaModel", kinds=NONE, inputs=_tokens),
    "distilbert": Family("DistilBertConfig", "DistilBertModel",
                         dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128), NONE, _tokens),
    "albert": Family("AlbertConfig", "AlbertModel", dict(embedding_size=32), NONE, _tokens),
    "deberta_v2": Family("DebertaV2Config", "DebertaV2Model", kinds=NONE, inputs=_tokens,
                         impls=("eager",)),
    "electra": Family("ElectraConfig", "ElectraModel", dict(embedding_size=32), NONE, _tokens),
    "clip_text": Family("CLIPTextConfig", "CLIPTextModel", inputs=_tokens),
    "clip_vision": Family("CLIPVisionConfig", "CLIPVisionModel", IMAGE, NONE, _pixels),
    "siglip_vision": Family("SiglipVisionConfig", "SiglipVisionModel", IMAGE, NONE, _pixels,
                            sites=3),  # and the attention-pooling head
    "dinov2": Family("Dinov2Config", "Dinov2Model", IMAGE, NONE, _pixels),
    # a learned relative position bias, zero as initialized: kept as a mask (it trains)
    "beit": Family("BeitConfig", "BeitModel", dict(IMAGE, use_relative_position_bias=True),
                   frozenset({"additive"}), _pixels),
    "wav2vec2": Family("Wav2Vec2Config", "Wav2Vec2Model",
                       dict(conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
                       NONE, lambda: dict(input_values=torch.randn(2, 400))),
}

CASES = [pytest.param(name, impl, id=f"{name}-{impl}")
         for name, family in FAMILIES.items() for impl in family.impls]


@pytest.mark.parametrize("name,impl", CASES)
def test_every_attention_site_is_found_and_exact(name, impl):
    family = FAMILIES[name]
    config = getattr(transformers, family.config)(**{**SMALL, **family.overrides},
                                                  attn_implementation=impl)
    torch.manual_seed(0)
    model = getattr(transformers, family.model)(config).eval()
    optimized = attnopt.optimize(model, "exact", example_kwargs=family.inputs())  # verifies
    report = optimized.report
    found = [r for r in report.sites if r.site is not None]
    left = [r for r in report.sites if r.site is None]
    assert len(found) == family.sites, str(report)
    assert [r.rewrite for r in found] == ["exact"] * family.sites, str(report)
    assert {r.site.mask_kind for r in found} == family.kinds, str(report)
    assert len(left) == family.not_attention, str(report)
    assert all("fewer than 3 dims" in r.reason for r in left), str(report)
