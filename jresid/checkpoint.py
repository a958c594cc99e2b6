"""Hugging Face safetensors checkpoints: find, validate and lazily read tensors.

This is the only module that knows Hugging Face's tensor names. Each one
appears once, in `_TENSOR_TABLE`, next to the jresid parameter it becomes
and the layout change between the two.

Reading is lazy: every file is memory-mapped, a tensor is a NumPy view of
the mapping, and each device's slice of a parameter is copied straight out
of the mapping into the device buffer by `jax.make_array_from_callback`.
Pages are released after each parameter, so peak host memory stays near the
loaded parameters plus one parameter's host copy, not twice the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping

import jax
import ml_dtypes
import numpy as np
import safetensors

from jresid.config import Qwen2Config

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as the config describes."""


# --------------------------------------------------------------------------
# The tensor table.
#
# Each row: jresid parameter path, Hugging Face name (with {l} for the layer),
# a function from the config to the Hugging Face shape, and a function from
# the Hugging Face array (a NumPy view) to jresid's layout (also a view).
# Kernels are stored [in, out] with the head axis split out, so that every
# einsum in the model reads with named axes.
# --------------------------------------------------------------------------


def _heads_kernel(num_heads: Callable[[Qwen2Config], int]):
    """HF [heads * E, D] to jresid [D, heads, E]."""

    def to_jresid(weight: np.ndarray, c: Qwen2Config) -> np.ndarray:
        return weight.T.reshape(c.hidden_size, num_heads(c), c.head_dim)

    return to_jresid


def _heads_bias(num_heads: Callable[[Qwen2Config], int]):
    def to_jresid(bias: np.ndarray, c: Qwen2Config) -> np.ndarray:
        return bias.reshape(num_heads(c), c.head_dim)

    return to_jresid


def _out_kernel(weight: np.ndarray, c: Qwen2Config) -> np.ndarray:
    """HF o_proj [D, H * E] to jresid [H, E, D]."""
    return weight.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _transpose(weight: np.ndarray, c: Qwen2Config) -> np.ndarray:
    return weight.T


def _same(weight: np.ndarray, c: Qwen2Config) -> np.ndarray:
    return weight


def to_hf_layout(rule: TensorRule, value: np.ndarray, config: Qwen2Config) -> np.ndarray:
    """Invert `rule.to_jresid` for one layer's array: jresid layout back to Hugging Face's."""
    hf_shape = rule.hf_shape(config)
    if rule.to_jresid is _same:
        return value
    if rule.to_jresid is _transpose:
        return value.T
    if rule.to_jresid is _out_kernel:
        return value.reshape(-1, config.hidden_size).T
    if rule.param.endswith("_bias"):
        return value.reshape(hf_shape)
    return value.reshape(config.hidden_size, -1).T  # q/k/v kernels


def _q_heads(c: Qwen2Config) -> int:
    return c.num_attention_heads


def _kv_heads(c: Qwen2Config) -> int:
    return c.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class TensorRule:
    param: str
    hf_name: str
    hf_shape: Callable[[Qwen2Config], tuple[int, ...]]
    to_jresid: Callable[[np.ndarray, Qwen2Config], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.hf_name


_LAYER = "model.layers.{l}."
_TENSOR_TABLE = (
    TensorRule("embed.embedding", "model.embed_tokens.weight",
               lambda c: (c.vocab_size, c.hidden_size), _same),
    TensorRule("blocks.input_norm.weight", _LAYER + "input_layernorm.weight",
               lambda c: (c.hidden_size,), _same),
    TensorRule("blocks.attn.q_kernel", _LAYER + "self_attn.q_proj.weight",
               lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size), _heads_kernel(_q_heads)),
    TensorRule("blocks.attn.q_bias", _LAYER + "self_attn.q_proj.bias",
               lambda c: (c.num_attention_heads * c.head_dim,), _heads_bias(_q_heads)),
    TensorRule("blocks.attn.k_kernel", _LAYER + "self_attn.k_proj.weight",
               lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size), _heads_kernel(_kv_heads)),
    TensorRule("blocks.attn.k_bias", _LAYER + "self_attn.k_proj.bias",
               lambda c: (c.num_key_value_heads * c.head_dim,), _heads_bias(_kv_heads)),
    TensorRule("blocks.attn.v_kernel", _LAYER + "self_attn.v_proj.weight",
               lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size), _heads_kernel(_kv_heads)),
    TensorRule("blocks.attn.v_bias", _LAYER + "self_attn.v_proj.bias",
               lambda c: (c.num_key_value_heads * c.head_dim,), _heads_bias(_kv_heads)),
    TensorRule("blocks.attn.o_kernel", _LAYER + "self_attn.o_proj.weight",
               lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), _out_kernel),
    TensorRule("blocks.post_norm.weight", _LAYER + "post_attention_layernorm.weight",
               lambda c: (c.hidden_size,), _same),
    TensorRule("blocks.mlp.gate_kernel", _LAYER + "mlp.gate_proj.weight",
               lambda c: (c.intermediate_size, c.hidden_size), _transpose),
    TensorRule("blocks.mlp.up_kernel", _LAYER + "mlp.up_proj.weight",
               lambda c: (c.intermediate_size, c.hidden_size), _transpose),
    TensorRule("blocks.mlp.down_kernel", _LAYER + "mlp.down_proj.weight",
               lambda c: (c.hidden_size, c.intermediate_size), _transpose),
    TensorRule("final_norm.weight", "model.norm.weight",
               lambda c: (c.hidden_size,), _same),
    TensorRule("lm_head.kernel", "lm_head.weight",
               lambda c: (c.vocab_size, c.hidden_size), _transpose),
)


def tensor_rules(config: Qwen2Config) -> list[TensorRule]:
    """Return the rules for the parameters this config needs."""
    rules = list(_TENSOR_TABLE)
    if config.tie_word_embeddings:
        rules = [rule for rule in rules if rule.param != "lm_head.kernel"]
    return rules


def param_shape(rule: TensorRule, config: Qwen2Config) -> tuple[int, ...]:
    """Return the jresid shape of a parameter, with the layer axis first when stacked."""
    view = rule.to_jresid(np.empty(rule.hf_shape(config), dtype=np.int8), config)
    if rule.per_layer:
        return (config.num_hidden_layers, *view.shape)
    return tuple(view.shape)


# --------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header.

    The `safetensors` package checks the header first (it rejects malformed
    JSON, overlapping or non-contiguous data and a wrong buffer size); this
    function then maps each tensor to absolute byte offsets.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safetensors.safe_open(path, framework="numpy"):
            pass
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({error}); the file may be truncated "
            "or corrupt, download it again"
        ) from error

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len

    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name} ends past the end of the file (truncated)")
        tensors[name] = TensorInfo(path, dtype if dtype is not None else entry["dtype"], shape,
                                   data_start + begin, data_start + end)
    return tensors


def checkpoint_files(folder: str) -> tuple[list[str], dict[str, str] | None]:
    """Return the safetensors files to read and, when sharded, the index's weight map."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a valid index (needs 'weight_map'): {error}") from error
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise CheckpointError(
                f"{folder}: the index names shard file(s) {missing} that are not in the folder; "
                "download the missing shards"
            )
        return [os.path.join(folder, name) for name in files], weight_map
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    raise CheckpointError(
        f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found; jresid reads Hugging Face "
        "safetensors checkpoints (convert .bin checkpoints with transformers' save_pretrained)"
    )


@dataclasses.dataclass
class Checkpoint:
    """A validated checkpoint: where each tensor lives, and how to read it."""

    folder: str
    config: Qwen2Config
    tensors: dict[str, TensorInfo]
    unused: list[str]
    storage_dtype: np.dtype

    @classmethod
    def open(cls, folder: str | os.PathLike[str], config: Qwen2Config) -> Checkpoint:
        """Index and validate every tensor the model needs, reading no tensor data.

        Raises:
            CheckpointError: a file or tensor is missing, a shape differs from
                the one the config implies, or a dtype is not a float type.
        """
        folder = os.fspath(folder)
        files, weight_map = checkpoint_files(folder)
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name} appears in both {tensors[name].file} and {path}")
                tensors[name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                info = tensors.get(name)
                if info is None or os.path.basename(info.file) != file:
                    raise CheckpointError(f"{folder}: the index puts {name} in {file}, but that file does not hold it")

        needed = {}
        for rule in tensor_rules(config):
            layers = range(config.num_hidden_layers) if rule.per_layer else [None]
            for layer in layers:
                needed[rule.hf_name.format(l=layer)] = rule.hf_shape(config)

        missing = [name for name in needed if name not in tensors]
        if missing:
            hint = ""
            if missing == ["lm_head.weight"]:
                hint = (" The config says tie_word_embeddings=false; set it to true if the "
                        "output layer shares the embedding matrix.")
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{folder}: tensor(s) missing from the checkpoint: {shown}.{hint}")

        for name, shape in needed.items():
            info = tensors[name]
            if info.shape != tuple(shape):
                raise CheckpointError(
                    f"{folder}: tensor {name} has shape {list(info.shape)} but the config implies "
                    f"{list(shape)}; the config.json does not belong to these weights"
                )
            if not isinstance(info.dtype, np.dtype):
                raise CheckpointError(f"{folder}: tensor {name} has dtype {info.dtype}; jresid reads F32, F16 and BF16")

        unused = sorted(name for name in tensors if name not in needed)
        if config.tie_word_embeddings and "lm_head.weight" in tensors:
            _warn_if_output_layer_differs(tensors, folder)
        if unused:
            logger.warning("%s: %d tensor(s) in the checkpoint are not used by the model: %s",
                           folder, len(unused), ", ".join(unused[:10]))

        storage = {tensors[name].dtype for name in needed}
        storage_dtype = storage.pop() if len(storage) == 1 else np.dtype(np.float32)
        return cls(folder, config, {n: tensors[n] for n in needed}, unused, storage_dtype)

    def nbytes(self) -> int:
        return sum(info.end - info.start for info in self.tensors.values())

    def load(
        self,
        dtype: np.dtype | None = None,
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, jax.Array]:
        """Read every parameter into device memory.

        Args:
            dtype: parameter dtype; `None` keeps the storage dtype.
            shardings: where each parameter lives, keyed by parameter path;
                parameters not named go to the first local device.

        Returns:
            A flat dict from parameter path (`blocks.attn.q_kernel`, ...) to array.
        """
        dtype = np.dtype(dtype) if dtype is not None else self.storage_dtype
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = shardings or {}
        maps = _MappedFiles()
        params = {}
        try:
            for rule in tensor_rules(self.config):
                sharding = shardings.get(rule.param, default)
                params[rule.param] = self._place(rule, dtype, sharding, maps)
        finally:
            maps.close()
        return params

    def read_layer(self, layer: int, dtype: np.dtype) -> dict[str, np.ndarray]:
        """Read one block's parameters into host memory, keyed by their path inside a block (`attn.q_kernel`).

        The arrays are aligned, so jax takes them over without a copy on CPU.
        """
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer {layer} is out of range; the model has {self.config.num_hidden_layers} blocks")
        maps = _MappedFiles()
        out = {}
        try:
            for rule in tensor_rules(self.config):
                if not rule.per_layer:
                    continue
                value = aligned_empty(param_shape(rule, self.config)[1:], dtype)
                self._copy_tensor(rule, layer, (), value, maps)
                out[rule.param.removeprefix("blocks.")] = value
        finally:
            maps.close()
        return out

    def _copy_tensor(self, rule: TensorRule, layer: int | None, index: tuple[slice, ...], out: np.ndarray,
                     maps: _MappedFiles) -> None:
        """Copy the `index` slice of one stored tensor, in jresid's layout, into `out`."""
        info = self.tensors[rule.hf_name.format(l=layer)]
        _copy_releasing(rule.to_jresid(maps.view(info), self.config)[index], out, lambda: maps.release(info))
        maps.release(info)

    def read_embedding_rows(self, ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Return the embedding rows of `ids` (any shape), read from the file without loading the whole table."""
        info = self.tensors["model.embed_tokens.weight"]
        maps = _MappedFiles()
        try:
            rows = np.take(maps.view(info), np.asarray(ids), axis=0).astype(dtype)
            maps.release(info)
        finally:
            maps.close()
        return rows

    def _place(self, rule: TensorRule, dtype: np.dtype, sharding, maps: _MappedFiles) -> jax.Array:
        config = self.config
        shape = param_shape(rule, config)

        def read_slice(index: tuple[slice, ...]) -> np.ndarray:
            # Fresh arrays, never views: the memory maps close after loading.
            # Aligned, so that jax takes them over without a copy on CPU.
            out = aligned_empty(_sliced_shape(shape, index), dtype)
            if not rule.per_layer:
                self._copy_tensor(rule, None, index, out, maps)
                return out
            layers = range(config.num_hidden_layers)[index[0]]
            for i, layer in enumerate(layers):
                self._copy_tensor(rule, layer, index[1:], out[i], maps)
            return out

        return jax.make_array_from_callback(shape, sharding, read_slice)


def _warn_if_output_layer_differs(tensors: dict[str, TensorInfo], folder: str) -> None:
    """Warn when a tied checkpoint stores an output layer that is not its embedding.

    jresid follows `tie_word_embeddings=true` and uses the embedding; note
    that transformers 5 instead unties such a model and uses `lm_head.weight`.
    """
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    if embed.shape != head.shape or embed.dtype != head.dtype:
        differs = True
    else:
        maps = _MappedFiles()
        try:
            differs = _arrays_differ(maps.view(embed), maps.view(head))
        finally:
            maps.release()
            maps.close()
    if differs:
        logger.warning(
            "%s: config.json says tie_word_embeddings=true but the checkpoint holds an lm_head.weight "
            "that differs from the embedding; jresid uses the embedding as the output layer, as the "
            "config says. Set tie_word_embeddings to false to use lm_head.weight instead.", folder)


def _arrays_differ(a: np.ndarray, b: np.ndarray) -> bool:
    # Compare in blocks of about 64 MB so the pages read can be released.
    rows = max(1, (64 << 20) // max(1, a.strides[0]))
    return any(not np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


# Alignment at which jax's CPU client uses a NumPy array's memory as its
# buffer instead of copying it (checked with jaxlib 0.10.2). NumPy's own
# large allocations start 16 bytes past a page boundary, so jax copies them.
BUFFER_ALIGNMENT = 64

# Bytes of a mapped tensor copied between two releases of its pages.
COPY_CHUNK_BYTES = 64 << 20


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Return an uninitialised C-contiguous array whose data starts at a `BUFFER_ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _copy_releasing(source: np.ndarray, out: np.ndarray, release: Callable[[], None]) -> None:
    """Copy a view of mapped pages into `out`, releasing the pages read every `COPY_CHUNK_BYTES`.

    The copy runs in slices along the source's axis of largest stride, so
    that each slice reads one contiguous stretch of the file, whatever
    transpose the view applies. Without the releases, every page of a large
    tensor (the 0.54 GB embedding of Qwen2-0.5B) would count towards the
    process's memory until the whole tensor is copied.
    """
    if source.ndim == 0 or source.nbytes <= COPY_CHUNK_BYTES:
        out[...] = source
        return
    axis = int(np.argmax(np.abs(source.strides)))
    per_step = max(1, source.nbytes // source.shape[axis])
    step = max(1, COPY_CHUNK_BYTES // per_step)
    for start in range(0, source.shape[axis], step):
        part = (slice(None),) * axis + (slice(start, start + step),)
        out[part] = source[part]
        release()


def _sliced_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(n)[i]) for n, i in zip(shape, index))


class _MappedFiles:
    """Read-only memory maps of checkpoint files, opened on first use."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, info: TensorInfo) -> np.ndarray:
        mapping = self._maps.get(info.file)
        if mapping is None:
            with open(info.file, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[info.file] = mapping
        count = math.prod(info.shape)
        return np.frombuffer(mapping, dtype=info.dtype, count=count, offset=info.start).reshape(info.shape)

    def release(self, info: TensorInfo | None = None) -> None:
        """Drop mapped pages of one tensor (or of everything) from this process's resident set.

        The data stays in the page cache, so a second read is cheap; without
        this, every page read would count towards the process's memory until
        the map closes.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for file, mapping in self._maps.items():
            if info is None:
                mapping.madvise(mmap.MADV_DONTNEED)
            elif file == info.file:
                start = info.start - info.start % mmap.PAGESIZE
                mapping.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:
                # A NumPy view still points into the map; it closes when collected.
                pass
        self._maps.clear()


def save_pretrained(params: Mapping[str, np.ndarray], config: Qwen2Config, folder: str | os.PathLike[str]) -> None:
    """Write parameters as a Hugging Face checkpoint (`config.json`, `model.safetensors`).

    Args:
        params: flat dict from jresid parameter path to array, stacked over
            layers, as `Checkpoint.load` returns it.
    """
    import safetensors.numpy

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for rule in tensor_rules(config):
        value = np.asarray(params[rule.param])
        if rule.per_layer:
            for layer in range(config.num_hidden_layers):
                tensors[rule.hf_name.format(l=layer)] = np.ascontiguousarray(to_hf_layout(rule, value[layer], config))
        else:
            tensors[rule.hf_name] = np.ascontiguousarray(to_hf_layout(rule, value, config))
    safetensors.numpy.save_file(tensors, os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
    # transformers 5 rejects null for fields such as max_window_layers, so unset fields are left out.
    raw = {key: value for key, value in config.to_dict().items() if value is not None}
    names = {_DTYPES[code]: name for name, code in _DTYPE_NAMES.items()}
    raw["dtype"] = names.get(next(iter(tensors.values())).dtype, "float32")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")


def dtype_from_name(name: str | np.dtype | None) -> np.dtype | None:
    """Turn 'float32', 'bfloat16', 'float16' (or a dtype) into a NumPy dtype."""
    if name is None:
        return None
    if isinstance(name, str):
        key = name.replace("torch.", "")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPE_NAMES)}")
        return _DTYPES[_DTYPE_NAMES[key]]
    dtype = np.dtype(name)
    if dtype not in (_DTYPES["F32"], _DTYPES["F16"], _DTYPES["BF16"]):
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype
