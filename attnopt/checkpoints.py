"""Checkpoints: load a local Hugging Face model directory and synthesize example inputs for it.

A directory needs `config.json` and weights (`*.safetensors`, or `*.bin` read with
`weights_only=True`); nothing is downloaded. Example inputs come from the config: token ids
within the vocabulary and an attention mask for text models, decoder ids for encoder-decoders,
pixel values for vision models, log-mel features for speech encoders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from attnopt.errors import AttnoptError


class CheckpointError(AttnoptError):
    """A checkpoint directory that cannot be loaded; the message says what is missing."""


def load_hf_model(directory: str | Path) -> nn.Module:
    """The model in a local Hugging Face directory, in eval mode."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected a Hugging Face model "
                              "directory with config.json and weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json — not a Hugging Face model directory")
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise CheckpointError(f"{path}: config.json but no weights (*.safetensors or *.bin)")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from error
    import transformers
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = _model_class(config)
    try:
        model = model_class.from_pretrained(path, local_files_only=True,
                                            use_safetensors=bool(list(path.glob("*.safetensors"))))
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: weights could not be loaded "
                              f"({type(error).__name__}: {str(error).splitlines()[0]})") from error
    return model.eval()


def _model_class(config):
    import transformers
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModel


def example_inputs(model: nn.Module, batch: int = 1, seq_len: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs the model accepts, synthesized from its config."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if getattr(config, "model_type", "") in ("whisper",):
        frames = 2 * config.max_source_positions
        features = torch.randn(batch, config.num_mel_bins, frames, generator=generator)
        decoder = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
        return {"input_features": features.to(device), "decoder_input_ids": decoder.to(device),
                "use_cache": False}
    image_size = getattr(config, "image_size", None)
    if image_size is not None and getattr(config, "num_channels", None) is not None:
        size = image_size if isinstance(image_size, int) else image_size[0]
        pixels = torch.randn(batch, config.num_channels, size, size, generator=generator)
        return {"pixel_values": pixels.to(device)}
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise CheckpointError(f"cannot synthesize inputs for model type "
                              f"{getattr(config, 'model_type', '?')!r}: pass example inputs")
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        decoder = torch.randint(0, vocab, (batch, max(seq_len // 2, 2)), generator=generator)
        inputs["decoder_input_ids"] = decoder.to(device)
    return inputs
