"""Device meshes and the partition rules for every Qwen2 parameter.

The mesh has two axes: `data` splits the batch, `model` splits each layer
Megatron-style (tensor parallelism). The rules below are the only place that
says how a parameter is split; read the table top to bottom like a model
card. Stacked block parameters carry the layer axis first, never split.

| parameter                  | shape          | split on `model`                  |
| -------------------------- | -------------- | --------------------------------- |
| embed.embedding            | [V, D]         | V (vocabulary-parallel)           |
| blocks.*_norm.weight       | [L, D]         | replicated                        |
| blocks.attn.q_kernel/bias  | [L, D, H, E]   | H (column-parallel)               |
| blocks.attn.k/v_kernel/bias| [L, D, K, E]   | K when the model axis divides K,  |
|                            |                | else replicated (see below)       |
| blocks.attn.o_kernel       | [L, H, E, D]   | H (row-parallel)                  |
| blocks.mlp.gate/up_kernel  | [L, D, F]      | F (column-parallel)               |
| blocks.mlp.down_kernel     | [L, F, D]      | F (row-parallel)                  |
| final_norm.weight          | [D]            | replicated                        |
| lm_head.kernel             | [D, V]         | V (column-parallel)               |

Grouped-query attention: Qwen2.5-0.5B has 14 query and 2 key/value heads,
7B has 28 and 4. The model axis must divide the number of query heads. When
it also divides the key/value heads, those are split like the queries.
Otherwise every shard keeps all key/value heads (they are small: K * E
columns against H * E for queries) and expands them to one per query head
before attention, so each shard computes exactly its own query heads.

A dimension that the model axis does not divide (a vocabulary of odd size,
say) is replicated rather than split unevenly.
"""

from __future__ import annotations

import logging
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jresid.config import Qwen2Config

logger = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"


class MeshError(ValueError):
    """A mesh that does not fit the devices or the model."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parse `data=2,model=4` into `{"data": 2, "model": 4}`; a missing axis is 1."""
    sizes = {DATA: 1, MODEL: 1}
    if not spec.strip():
        raise MeshError("empty mesh spec; write it like 'data=2,model=4'")
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
        if match is None:
            raise MeshError(f"invalid mesh spec {spec!r}; write it like 'data=2,model=4' with positive sizes")
        sizes[match.group(1)] = int(match.group(2))
    if min(sizes.values()) < 1:
        raise MeshError(f"invalid mesh spec {spec!r}; axis sizes must be at least 1")
    return sizes


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """Build a `(data, model)` mesh over `devices` (default: every device of every process).

    Args:
        data: size of the data axis; `None` uses every device not taken by `model`.
        model: size of the tensor-parallel axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise MeshError(f"model={model} does not divide the {len(devices)} available devices")
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise MeshError(
            f"mesh data={data} x model={model} needs {data * model} devices, but {len(devices)} are "
            "available; choose sizes whose product is the device count"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=axis_types, devices=devices)


def mesh_from_spec(spec: str, devices=None) -> Mesh:
    sizes = parse_mesh_spec(spec)
    return make_mesh(sizes[DATA], sizes[MODEL], devices)


def check_mesh(config: Qwen2Config, mesh: Mesh) -> None:
    """Raise `MeshError` when no layout of this model fits the mesh's model axis."""
    model = mesh.shape[MODEL]
    heads = config.num_attention_heads
    if heads % model:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        raise MeshError(
            f"the model axis has size {model}, which does not divide num_attention_heads={heads}; "
            f"use a model axis of {divisors}"
        )


def kv_heads_split(config: Qwen2Config, mesh: Mesh | None) -> bool:
    """Whether the key/value heads are split over the model axis (else replicated)."""
    if mesh is None:
        return True
    return config.num_key_value_heads % mesh.shape[MODEL] == 0


def partition_specs(config: Qwen2Config, mesh: Mesh) -> dict[str, P]:
    """Return the partition spec of every parameter, keyed by parameter path."""
    check_mesh(config, mesh)
    model = mesh.shape[MODEL]
    kv = MODEL if kv_heads_split(config, mesh) else None

    def along(size: int):
        return MODEL if size % model == 0 else None

    vocab = along(config.vocab_size)
    mlp = along(config.intermediate_size)
    specs = {
        "embed.embedding": P(vocab, None),
        "blocks.input_norm.weight": P(None, None),
        "blocks.attn.q_kernel": P(None, None, MODEL, None),
        "blocks.attn.q_bias": P(None, MODEL, None),
        "blocks.attn.k_kernel": P(None, None, kv, None),
        "blocks.attn.k_bias": P(None, kv, None),
        "blocks.attn.v_kernel": P(None, None, kv, None),
        "blocks.attn.v_bias": P(None, kv, None),
        "blocks.attn.o_kernel": P(None, MODEL, None, None),
        "blocks.post_norm.weight": P(None, None),
        "blocks.mlp.gate_kernel": P(None, None, mlp),
        "blocks.mlp.up_kernel": P(None, None, mlp),
        "blocks.mlp.down_kernel": P(None, mlp, None),
        "final_norm.weight": P(None),
    }
    if not config.tie_word_embeddings:
        specs["lm_head.kernel"] = P(None, vocab)
    for name, size in (("vocabulary", config.vocab_size), ("intermediate_size", config.intermediate_size)):
        if size % model:
            logger.warning("model axis %d does not divide %s=%d; that dimension is replicated", model, name, size)
    return specs


def parameter_shardings(config: Qwen2Config, mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec) for name, spec in partition_specs(config, mesh).items()}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of `[B, T]` inputs and `[B, L, T]` results: batch on the data axis."""
    return NamedSharding(mesh, P(DATA))


def residual_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of the `[B, T, D]` residual stream between blocks."""
    return NamedSharding(mesh, P(DATA, None, None))


def bytes_per_device(config: Qwen2Config, mesh: Mesh, itemsize: int) -> int:
    """Parameter bytes each device holds under these rules."""
    from jresid.checkpoint import param_shape, tensor_rules

    specs = partition_specs(config, mesh)
    total = 0
    for rule in tensor_rules(config):
        shape = param_shape(rule, config)
        split = math.prod(mesh.shape[axis] for axis in specs[rule.param] if axis is not None)
        total += math.prod(shape) * itemsize // split
    return total


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """Place a host array whose first axis is the batch on the data axis (every process passes the same array)."""
    if mesh is None:
        return jax.numpy.asarray(array)
    placement = batch_sharding(mesh)
    if jax.process_count() > 1:
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, placement, lambda index: array[index])
    return jax.device_put(array, placement)


def pad_batch(batch: int, mesh: Mesh | None) -> int:
    """Smallest batch size at or above `batch` that the data axis divides."""
    if mesh is None:
        return batch
    data = mesh.shape[DATA]
    return int(np.ceil(batch / data) * data)
