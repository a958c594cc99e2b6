"""Qwen2 `config.json` to a typed, validated config.

Field names follow Hugging Face's `Qwen2Config`, so a reader can hold the
checkpoint's `config.json` next to this code. Both layouts found on the hub
are accepted:

* transformers 4: top-level `rope_theta`, `rope_scaling` and `torch_dtype`.
* transformers 5: `rope_parameters` (`rope_theta`, `rope_type`) and `dtype`.

Every value that changes the numbers is read from the file; nothing is
looked up from the model's name. Anything this implementation does not
compute (sliding-window attention on some layer, a RoPE scaling type other
than the default, another architecture) raises `UnsupportedConfigError`
before any weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2",)
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2Model")
SUPPORTED_ROPE_TYPES = ("default",)
SUPPORTED_ACTIVATIONS = ("silu",)


class ConfigError(ValueError):
    """A `config.json` that is missing, malformed or inconsistent."""


class UnsupportedConfigError(ConfigError):
    """A valid configuration that asks for something jresid does not implement."""


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The values of a Qwen2 `config.json` that determine the forward pass.

    Attributes keep Hugging Face's names. `head_dim` is the value in effect:
    the file's `head_dim` when given, else `hidden_size // num_attention_heads`.
    `sliding_window` is the file's value; it has no effect because every
    layer in effect uses full causal attention (`layer_types`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: tuple[str, ...] = ()
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "qwen2"
    architectures: tuple[str, ...] = ("Qwen2ForCausalLM",)

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def param_count(self) -> int:
        """Number of parameters, counting a tied embedding once."""
        D, F, V = self.hidden_size, self.intermediate_size, self.vocab_size
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        attention = D * q_width + q_width + 2 * (D * kv_width + kv_width) + q_width * D
        mlp = 3 * D * F
        per_layer = attention + mlp + 2 * D
        unembed = 0 if self.tie_word_embeddings else V * D
        return V * D + self.num_hidden_layers * per_layer + D + unembed

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict in the transformers 5 layout."""
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["architectures"] = list(self.architectures)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["rope_parameters"] = {"rope_theta": out.pop("rope_theta"), "rope_type": "default"}
        out["dtype"] = out.pop("torch_dtype")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> Qwen2Config:
        """Validate a parsed `config.json` and build the config from it."""
        return _parse(raw, source)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Qwen2Config:
        """Read `config.json`, or the `config.json` inside a checkpoint folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"config file not found: {path}. Point at a Hugging Face checkpoint folder "
                "that contains config.json."
            )
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        return _parse(raw, path)


def _require(raw: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: required field '{key}' is missing")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: field '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{source}: field '{key}' must be a number, got {value!r}")
    return kind(value)


def _positive(value: int | float, key: str, source: str) -> None:
    if value <= 0:
        raise ConfigError(f"{source}: field '{key}' must be positive, got {value!r}")


def _rope(raw: dict[str, Any], source: str) -> float:
    """Return `rope_theta` from either layout, rejecting RoPE variants we lack."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be an object or null, got {scaling!r}")

    for field, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not block:
            continue
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedConfigError(
                f"{source}: {field}.rope_type is {rope_type!r}; jresid implements only "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} rotary embeddings. Remove the scaling "
                "block to run the model at its original context length."
            )

    candidates = {}
    if params and "rope_theta" in params:
        candidates["rope_parameters.rope_theta"] = params["rope_theta"]
    if "rope_theta" in raw and raw["rope_theta"] is not None:
        candidates["rope_theta"] = raw["rope_theta"]
    if not candidates:
        # NOTE: Qwen2Config's default when a file names no theta at all.
        return 10000.0
    values = {float(v) for v in candidates.values()}
    if len(values) > 1:
        raise ConfigError(f"{source}: conflicting RoPE bases {candidates}; keep one of them")
    theta = values.pop()
    _positive(theta, "rope_theta", source)
    return theta


def _layer_types(raw: dict[str, Any], num_layers: int, source: str) -> tuple[str, ...]:
    """Return each layer's attention type as transformers 5 derives it."""
    use_sliding = bool(raw.get("use_sliding_window", False))
    sliding_window = raw.get("sliding_window")
    max_window_layers = raw.get("max_window_layers")
    given = raw.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != num_layers:
            raise ConfigError(
                f"{source}: 'layer_types' must list {num_layers} entries, got {given!r}"
            )
        types = tuple(str(t) for t in given)
    elif use_sliding and sliding_window is not None:
        first_sliding = max_window_layers if max_window_layers is not None else 0
        types = tuple(
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(num_layers)
        )
    else:
        types = ("full_attention",) * num_layers

    sliding_layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise UnsupportedConfigError(f"{source}: layer_types contains {other}, which jresid does not implement")
    if sliding_layers:
        raise UnsupportedConfigError(
            f"{source}: use_sliding_window={use_sliding!r} with sliding_window={sliding_window!r} "
            f"and max_window_layers={max_window_layers!r} puts layers {sliding_layers} under "
            "sliding-window attention, which jresid does not implement. Set "
            "use_sliding_window to false to run full causal attention."
        )
    return types


def _parse(raw: dict[str, Any], source: str) -> Qwen2Config:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{source}: model_type is {model_type!r}; jresid implements Qwen2-family "
            "checkpoints (model_type 'qwen2': Qwen2, Qwen2.5, QwQ, DeepSeek-R1-Distill-Qwen)"
        )
    architectures = tuple(raw.get("architectures") or ("Qwen2ForCausalLM",))
    unknown = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if unknown:
        raise UnsupportedConfigError(
            f"{source}: architectures is {list(architectures)}; jresid implements "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedConfigError(
            f"{source}: hidden_act is {hidden_act!r}; Qwen2 uses 'silu' and jresid implements only that"
        )

    hidden_size = _require(raw, "hidden_size", int, source)
    num_layers = _require(raw, "num_hidden_layers", int, source)
    num_heads = _require(raw, "num_attention_heads", int, source)
    num_kv_heads = raw.get("num_key_value_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _require(raw, "num_key_value_heads", int, source)
    vocab_size = _require(raw, "vocab_size", int, source)
    intermediate_size = _require(raw, "intermediate_size", int, source)
    for key, value in (
        ("hidden_size", hidden_size),
        ("num_hidden_layers", num_layers),
        ("num_attention_heads", num_heads),
        ("num_key_value_heads", num_kv_heads),
        ("vocab_size", vocab_size),
        ("intermediate_size", intermediate_size),
    ):
        _positive(value, key, source)

    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    if raw.get("head_dim") is not None:
        head_dim = _require(raw, "head_dim", int, source)
        _positive(head_dim, "head_dim", source)
    else:
        if hidden_size % num_heads:
            raise ConfigError(
                f"{source}: hidden_size={hidden_size} is not divisible by "
                f"num_attention_heads={num_heads}, and no head_dim is given"
            )
        head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")

    rms_norm_eps = float(raw.get("rms_norm_eps", 1e-6))
    _positive(rms_norm_eps, "rms_norm_eps", source)
    max_positions = int(raw.get("max_position_embeddings", 32768))
    _positive(max_positions, "max_position_embeddings", source)

    if raw.get("use_mrope"):
        raise UnsupportedConfigError(
            f"{source}: use_mrope is true (multimodal rotary embeddings of Qwen2-VL); jresid "
            "implements the text-only Qwen2 rotary embedding"
        )
    if raw.get("attention_bias") is False:
        raise UnsupportedConfigError(
            f"{source}: attention_bias is false; Qwen2 attention has q/k/v biases and jresid expects them"
        )

    dtype = raw.get("dtype", raw.get("torch_dtype"))
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        rope_theta=_rope(raw, source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=hidden_act,
        use_sliding_window=bool(raw.get("use_sliding_window", False)),
        sliding_window=raw.get("sliding_window"),
        max_window_layers=raw.get("max_window_layers"),
        layer_types=_layer_types(raw, num_layers, source),
        torch_dtype=None if dtype is None else str(dtype),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        model_type=model_type,
        architectures=architectures,
    )
