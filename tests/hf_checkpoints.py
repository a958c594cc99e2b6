"""Build small random Qwen2 checkpoints with transformers, as tests need them.

Every parameter is randomised, norm gains and biases included, so that an
implementation that ignores a gain or a bias cannot pass a parity test.
Weights are scaled so that the residual stream stays of order one, which
makes an absolute tolerance of 1e-5 a float32-rounding tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
)


@dataclasses.dataclass
class BuiltCheckpoint:
    path: pathlib.Path
    hf_config: dict
    tie: bool


def randomise(model, seed: int, scale: float = 0.05, outlier_channel: int | None = None,
              outlier_size: float = 0.0) -> None:
    """Overwrite every parameter with seeded random values.

    Args:
        outlier_channel: when given, the embedding puts `outlier_size` into this
            residual channel for every token, like the large channels of real
            Qwen models.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "embed_tokens" in name or "lm_head" in name:
                value = 0.5 * noise
            else:
                value = scale * noise
            param.copy_(value.to(param.dtype))
        if outlier_channel is not None:
            model.model.embed_tokens.weight[:, outlier_channel] = outlier_size


def build_hf_model(tie: bool, seed: int, **overrides):
    """Return a randomised eager-attention float32 `Qwen2ForCausalLM`."""
    import torch
    import transformers

    fields = dict(TINY, tie_word_embeddings=tie, **overrides)
    outlier = fields.pop("outlier_channel", None)
    outlier_size = fields.pop("outlier_size", 0.0)
    config = transformers.Qwen2Config(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    randomise(model, seed, outlier_channel=outlier, outlier_size=outlier_size)
    if tie:
        model.tie_weights()
    return model


def build_checkpoint(folder, tie: bool, seed: int, *, torch_dtype: str = "float32",
                     max_shard_size: str | None = None, v4_config: bool = False,
                     **overrides) -> BuiltCheckpoint:
    """Save a random model to `folder` and return where it is.

    Args:
        v4_config: rewrite config.json in the transformers 4 layout (top-level
            `rope_theta` and `torch_dtype`), as checkpoints on the hub have it.
    """
    import torch

    model = build_hf_model(tie, seed, **overrides)
    if torch_dtype != "float32":
        model = model.to(getattr(torch, torch_dtype))
    folder = pathlib.Path(folder)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if v4_config:
        config = to_transformers4_layout(config)
        config_path.write_text(json.dumps(config, indent=2))
    return BuiltCheckpoint(folder, config, tie)


def to_transformers4_layout(config: dict) -> dict:
    """Rewrite a transformers 5 config dict into the transformers 4 layout."""
    config = dict(config)
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    config.pop("layer_types", None)
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.43.1"
    return config


def load_hf_reference(path, dtype: str = "float32"):
    """Load a saved checkpoint into transformers with eager attention."""
    import torch
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def random_ids(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)
