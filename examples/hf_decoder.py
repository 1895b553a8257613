"""Optimize a Hugging Face decoder and generate with it.

A tiny Llama-style model built from a config (random weights, no download) keeps this runnable
anywhere; point `from_pretrained` at a local checkpoint directory for a real one.

    .venv/bin/python examples/hf_decoder.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402

config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, attn_implementation="eager")
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
prompt = torch.randint(0, 1000, (1, 12))

# Called as generate() calls it (with a KV cache): attnopt captures each attention function
# below the cache update, verifies the rewrite, and dispatches to it.
optimized = attnopt.optimize(model, example_inputs=(prompt,))
print(optimized.report)

with torch.no_grad():
    tokens = optimized.generate(prompt, max_new_tokens=8, do_sample=False)
print("generated:", tokens[0, 12:].tolist())
print("captures for new signatures (decode steps):",
      optimized.report.capture["later_captures"])
