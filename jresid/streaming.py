"""Analysis with one block's weights in memory at a time.

`analyze` keeps the whole model in memory. `StreamedModel` instead keeps the
checkpoint's safetensors files memory-mapped and reads each block's weights
when the analysis reaches that block, then lets them go. The embedding table
is never loaded: only the rows of the prompt's tokens are read. So the peak
memory is about one block's parameters, the activations of the batch and
the metrics, whatever the depth, and a model larger than the device's
memory can be analysed on it.

The price is reading every block from the page cache (or the disk) in each
call, and computing the output projection's head products in each call
(`analyze` keeps them per model). Each block runs as its own compiled step,
the same program for every block; while one block computes, the next one's
weights are read.

The results equal `analyze`'s up to float32 rounding: the steps compute the
same operations, compiled as separate programs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jresid import sharding as sharding_lib
from jresid.analyze import (
    AnalysisResult,
    assemble_result,
    block_metrics,
    calibration_boundaries,
    label_and_collect,
    prepare_batch,
    read_calibration,
)
from jresid.capture import CaptureSpec
from jresid.checkpoint import Checkpoint, dtype_from_name, param_shape, tensor_rules
from jresid.config import ConfigError, Qwen2Config
from jresid.metrics import MetricOptions
from jresid.model.transformer import Block, attention_inputs

logger = logging.getLogger(__name__)


class StreamedModel:
    """A checkpoint that is analysed one block at a time (see the module docs).

    Attributes:
        config: the parsed `config.json`.
        tokenizer: the checkpoint's tokenizer, or `None` when it has none.
        path: the checkpoint folder.
        dtype: the parameter dtype the blocks run in.
    """

    def __init__(self, path: str | os.PathLike[str], dtype=None):
        from jresid import orbax_store
        from jresid.pretrained import load_tokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ConfigError(f"model folder not found: {path}")
        if orbax_store.is_orbax_checkpoint(path):
            raise ConfigError(f"{path} is an Orbax checkpoint; streaming reads safetensors checkpoints, so "
                              "point it at the Hugging Face folder the Orbax one was converted from")
        self.config = Qwen2Config.from_json(path)
        self.checkpoint = Checkpoint.open(path, self.config)
        self.dtype = np.dtype(dtype_from_name(dtype) or self.checkpoint.storage_dtype)
        self.tokenizer = load_tokenizer(path)
        self.path = path
        expand_kv = not sharding_lib.kv_heads_split(self.config, None)
        abstract = nnx.eval_shape(
            lambda: Block(self.config, dtype=jnp.dtype(self.dtype), rngs=nnx.Rngs(0), expand_kv=expand_kv))
        self._graphdef, self._abstract_state = nnx.split(abstract)

    def __repr__(self) -> str:
        c = self.config
        return (f"StreamedModel({self.path!r}, layers={c.num_hidden_layers}, d_model={c.hidden_size}, "
                f"dtype={self.dtype.name})")

    @property
    def param_bytes(self) -> int:
        """Bytes the parameters would take in `dtype` once loaded with `jresid.from_pretrained`."""
        count = sum(math.prod(param_shape(rule, self.config)) for rule in tensor_rules(self.config))
        return count * self.dtype.itemsize

    def tokenize(self, texts: str | list[str], padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Tokenise text with the checkpoint's tokenizer; returns `(input_ids, attention_mask)`."""
        from jresid.pretrained import tokenize_texts

        return tokenize_texts(self.tokenizer, self.path, texts, padding_side)

    def block_state(self, layer: int):
        """Read block `layer`'s weights and return them as the state of a one-block module."""
        params = self.checkpoint.read_layer(layer, self.dtype)

        # NOTE: measured on CPU only, where jax adopts the aligned host buffers. On GPU and TPU this
        # copies every block to the device in each call, a path no test or benchmark has run.
        def fill(path, leaf):
            name = ".".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))
            return jax.device_put(params[name])

        return jax.tree_util.tree_map_with_path(fill, self._abstract_state)

    def analyze(self, input_ids, attention_mask=None, *, calibration=None, bucket: bool = True,
                **options: Any) -> AnalysisResult:
        """Compute every metric and mode label, reading one block's weights at a time.

        Takes the arguments of `jresid.analyze` except `names_filter` and
        `interventions`, and returns the same `AnalysisResult`.

        Raises:
            ValueError: an unknown option or an invalid value, before any weight is read.
        """
        from jresid.pretrained import prepare_inputs

        for unsupported in ("names_filter", "interventions"):
            if unsupported in options:
                raise ValueError(f"{unsupported} is not supported when streaming blocks; load the model "
                                 "with jresid.from_pretrained and call jresid.analyze for it")
        options.setdefault("sequence_complexity", True)
        metric_options = MetricOptions.from_dict(options)
        num_layers = self.config.num_hidden_layers
        calibration = read_calibration(calibration, num_layers, metric_options)

        prepared = prepare_inputs(self.config, input_ids, attention_mask)
        B, T = prepared[0].shape
        ids_BT, mask_BT = prepare_batch(prepared, bucket)

        start = time.perf_counter()
        x_BTD = jnp.asarray(self.checkpoint.read_embedding_rows(np.asarray(ids_BT), self.dtype))
        valid_BT = mask_BT.astype(bool)
        positions = _attention_inputs(self.config, valid_BT)
        per_layer = []
        for layer in range(num_layers):
            state = self.block_state(layer)
            x_BTD, metrics = _block_step(self._graphdef, state, x_BTD, valid_BT, positions, metric_options)
            per_layer.append(metrics)
            del state
            logger.debug("block %d of %d dispatched after %.1f s", layer + 1, num_layers,
                         time.perf_counter() - start)
        stacked = jax.tree.map(lambda *values: jnp.stack(values), *per_layer)
        real_rows_B = jnp.ones((ids_BT.shape[0],), jnp.int32)
        out = _label_and_collect(stacked, ids_BT, mask_BT, real_rows_B,
                                 calibration_boundaries(calibration))
        return assemble_result(out, B, T, calibration, metric_options, self.path, CaptureSpec())


def stream_pretrained(path: str | os.PathLike[str], dtype=None) -> StreamedModel:
    """Open a Hugging Face Qwen2 checkpoint folder for analysis one block at a time.

    The config and every tensor's name and shape are checked here; no
    weight is read until `StreamedModel.analyze`.

    Args:
        path: folder with `config.json` and safetensors files.
        dtype: parameter dtype, 'float32', 'bfloat16' or 'float16'; `None`
            keeps the checkpoint's storage dtype.
    """
    return StreamedModel(path, dtype)


_attention_inputs = jax.jit(attention_inputs, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _block_step(graphdef, state, x_BTD, valid_BT, positions, options: MetricOptions):
    block = nnx.merge(graphdef, state)
    cos_BTE, sin_BTE, allowed_BTS = positions
    acts = block(x_BTD, cos_BTE, sin_BTE, allowed_BTS)
    metrics = block_metrics(block, acts, valid_BT, options=options)
    return acts.resid_post, metrics


@jax.jit
def _label_and_collect(per_layer, ids_BT, mask_BT, real_rows_B, boundaries):
    return label_and_collect(per_layer, {}, ids_BT, mask_BT, real_rows_B, boundaries)
