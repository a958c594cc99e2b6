"""Config parsing: both transformers layouts, values in effect, unsupported fields."""

from __future__ import annotations

import json

import pytest

from jresid.config import ConfigError, Qwen2Config, UnsupportedConfigError

BASE_V4 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "sliding_window": 4096,
    "use_sliding_window": False,
    "max_window_layers": 2,
}


def v5_layout(raw: dict) -> dict:
    raw = dict(raw)
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    raw["dtype"] = raw.pop("torch_dtype")
    return raw


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_layouts_give_same_values(layout):
    raw = BASE_V4 if layout == "v4" else v5_layout(BASE_V4)
    config = Qwen2Config.from_dict(raw)
    assert config.rope_theta == 1e6
    assert config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is True
    assert config.num_key_value_heads == 2
    assert config.head_dim == 8
    assert config.torch_dtype == "bfloat16"
    assert config.sliding_window == 4096
    assert config.use_sliding_window is False
    assert config.layer_types == ("full_attention",) * 4


def test_explicit_head_dim_wins():
    config = Qwen2Config.from_dict(dict(BASE_V4, head_dim=16))
    assert config.head_dim == 16


def test_missing_kv_heads_means_multi_head():
    raw = dict(BASE_V4)
    del raw["num_key_value_heads"]
    assert Qwen2Config.from_dict(raw).num_key_value_heads == 8


def test_from_json_reads_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE_V4))
    assert Qwen2Config.from_json(tmp_path).vocab_size == 1000


def test_to_dict_round_trip():
    config = Qwen2Config.from_dict(BASE_V4)
    assert Qwen2Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}, "[1]"),
    ],
)
def test_unsupported_field_named(change, field):
    with pytest.raises(UnsupportedConfigError) as error:
        Qwen2Config.from_dict(dict(BASE_V4, **change))
    assert field in str(error.value)


def test_sliding_window_beyond_last_layer_is_full_attention():
    # Sliding starts at max_window_layers; with 4 layers and 4 full layers none slides.
    config = Qwen2Config.from_dict(dict(BASE_V4, use_sliding_window=True, max_window_layers=4))
    assert config.layer_types == ("full_attention",) * 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 60, "num_attention_heads": 8}, "not divisible"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rope_parameters": {"rope_theta": 5.0}}, "conflicting"),
    ],
)
def test_invalid_values_named(change, message):
    with pytest.raises(ConfigError) as error:
        Qwen2Config.from_dict(dict(BASE_V4, **change))
    assert message in str(error.value)


def test_missing_required_field():
    raw = dict(BASE_V4)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        Qwen2Config.from_dict(raw)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Qwen2Config.from_json(tmp_path)


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2Config.from_json(tmp_path)


def test_param_count_matches_transformers():
    pytest.importorskip("torch")
    import transformers

    for tie in (True, False):
        raw = dict(BASE_V4, tie_word_embeddings=tie, torch_dtype="float32")
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**raw))
        expected = sum(p.numel() for p in hf.parameters())
        assert Qwen2Config.from_dict(raw).param_count == expected, f"tie={tie}"
