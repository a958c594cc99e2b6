"""A loaded model: config, parameters on their devices, tokenizer, and jitted entry points."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jresid.capture import ActivationCache, CaptureSpec, NamesFilter
from jresid.checkpoint import Checkpoint, CheckpointError, dtype_from_name
from jresid.config import ConfigError, Qwen2Config
from jresid.model import Qwen2

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class Model:
    """A Qwen2 model ready to run.

    Attributes:
        config: the parsed `config.json`.
        module: the Flax NNX module holding the parameters.
        tokenizer: the checkpoint's tokenizer (`transformers`), or `None` when
            the folder has no tokenizer files.
        path: the checkpoint folder it came from.
    """

    def __init__(self, module: Qwen2, tokenizer: Any = None, path: str | None = None, mesh=None):
        self.module = module
        self.config: Qwen2Config = module.config
        self.tokenizer = tokenizer
        self.path = path
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(module)

    @property
    def dtype(self) -> jnp.dtype:
        return self.module.dtype

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path!r}, layers={c.num_hidden_layers}, d_model={c.hidden_size}, "
                f"heads={c.num_attention_heads}/{c.num_key_value_heads}, dtype={self.dtype.name})")

    def params(self) -> dict[str, jax.Array]:
        """Return the parameters as a flat dict keyed by path (`blocks.attn.q_kernel`, ...)."""
        return flat_params(self.state)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the model as a Hugging Face checkpoint folder, with its tokenizer when it has one."""
        from jresid.checkpoint import save_pretrained

        save_pretrained({name: np.asarray(value) for name, value in self.params().items()}, self.config, folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def prepare_inputs(self, input_ids, attention_mask=None) -> tuple[jax.Array, jax.Array]:
        """Check token ids and mask, and return them as int32 arrays `[B, T]` (see `prepare_inputs`)."""
        return prepare_inputs(self.config, input_ids, attention_mask)

    def forward(self, input_ids, attention_mask=None, interventions=None) -> jax.Array:
        """Return float32 logits `[B, T, V]`, with `interventions` applied when given."""
        logits, _ = self.run_with_cache(input_ids, attention_mask, names_filter=[], interventions=interventions)
        return logits

    def run_with_cache(self, input_ids, attention_mask=None, names_filter: NamesFilter = None,
                       interventions=None):
        """Run the model and return `(logits, cache)`, like TransformerLens.

        Args:
            input_ids: `[B, T]` or `[T]` token ids.
            attention_mask: 1 for real tokens and 0 for padding; either side.
            names_filter: which capture points to keep (`None` keeps all; a
                name, a list of names, or a predicate on names).
            interventions: a `jresid.interventions.Intervention` or a list
                of them, applied inside the forward pass; captures show the
                edited stream.
        """
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        spec = CaptureSpec.from_names_filter(names_filter, self.config.num_hidden_layers)
        steering = self.steering_tables(interventions)
        rows = ids.shape[0]
        ids, mask = self.place_batch(ids, mask)
        logits, captures = _run(self.graphdef, self.state, ids, mask, spec, steering)
        if ids.shape[0] > rows:
            logits = logits[:rows]
            captures = {name: value[:rows] for name, value in captures.items()}
        return logits, ActivationCache(captures)

    def steering_tables(self, interventions):
        """Check interventions against this model and build their tables (None for none).

        Raises:
            ValueError: a layer out of range or a vector of another width.
        """
        from jresid.interventions import compile_interventions

        return compile_interventions(interventions, self.config.num_hidden_layers, self.config.hidden_size)

    def place_batch(self, ids_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Put a batch on the mesh's data axis, adding rows until the axis divides the batch.

        Added rows hold one real token (id 0) so that they compute finite
        numbers; callers drop them from the results.
        """
        if self.mesh is None:
            return ids_BT, mask_BT
        from jresid import sharding

        rows = sharding.pad_batch(ids_BT.shape[0], self.mesh)
        if rows > ids_BT.shape[0]:
            extra = rows - ids_BT.shape[0]
            ids_BT = jnp.concatenate([ids_BT, jnp.zeros((extra, ids_BT.shape[1]), ids_BT.dtype)])
            filler = jnp.zeros((extra, mask_BT.shape[1]), mask_BT.dtype).at[:, 0].set(1)
            mask_BT = jnp.concatenate([mask_BT, filler])
        return sharding.put_batch(np.asarray(ids_BT), self.mesh), sharding.put_batch(np.asarray(mask_BT), self.mesh)

    def tokenize(self, texts: str | list[str], padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Tokenise text with the checkpoint's tokenizer; returns `(input_ids, attention_mask)`."""
        return tokenize_texts(self.tokenizer, self.path, texts, padding_side)


def tokenize_texts(tokenizer, path: str | None, texts: str | list[str],
                   padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Tokenise text with `tokenizer` (the checkpoint at `path`'s) and pad it: `(input_ids, attention_mask)`."""
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass token ids")
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    return pad_token_ids(encoded, padding_side=padding_side)


def pad_token_ids(sequences: list[list[int]], padding_side: str = "right", length: int | None = None,
                  pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id lists into `(input_ids, attention_mask)` arrays `[B, T]`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is invalid; use 'left' or 'right'")
    longest = max(len(s) for s in sequences)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest} tokens)")
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    for row, seq in enumerate(sequences):
        n = len(seq)
        where = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, where] = seq
        mask[row, where] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def _run(graphdef, state, ids_BT, mask_BT, spec: CaptureSpec, steering=None):
    module = nnx.merge(graphdef, state)
    output = module(ids_BT, mask_BT, capture=spec, return_logits=True, steering=steering)
    return output.logits, output.captures


def flat_params(state) -> dict[str, jax.Array]:
    """Flatten an NNX state into `{"blocks.attn.q_kernel": array, ...}`."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        out[".".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))] = leaf
    return out


def prepare_inputs(config: Qwen2Config, input_ids, attention_mask=None) -> tuple[jax.Array, jax.Array]:
    """Check token ids and mask, and return them as int32 arrays `[B, T]`.

    Raises:
        ValueError: ids out of the vocabulary, a mask of another shape, or
            a row with no real token.
    """
    try:
        ids = np.asarray(input_ids)
    except ValueError as error:
        raise ValueError(f"input_ids must be a rectangular [batch, positions] array ({error}); pad rows of "
                         "different lengths with jresid.pad_token_ids, or tokenise with model.tokenize") from error
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"input_ids must be [batch, positions] with at least one token, got shape {ids.shape}")
    if ids.dtype.kind in "USO":
        raise ValueError("input_ids must be token ids, got text; tokenise it first with "
                         "model.tokenize(texts), which returns (input_ids, attention_mask)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, dtype=np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    real = mask.astype(bool)
    vocab = config.vocab_size
    bad = (ids < 0) | (ids >= vocab)
    if (bad & real).any():
        b, t = np.argwhere(bad & real)[0]
        raise ValueError(f"token id {ids[b, t]} at batch {b}, position {t} is outside the vocabulary [0, {vocab})")
    empty = np.flatnonzero(~real.any(axis=1))
    if empty.size:
        raise ValueError(f"batch row(s) {empty.tolist()} have no real token in attention_mask")
    ids = np.where(bad, 0, ids)  # padding ids outside the vocabulary are harmless
    longest = int(real.sum(axis=1).max())
    if longest > config.max_position_embeddings:
        raise ValueError(f"a prompt has {longest} tokens, more than the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    return jnp.asarray(ids, dtype=jnp.int32), jnp.asarray(mask, dtype=jnp.int32)


def build_module(config: Qwen2Config, params: dict[str, jax.Array], dtype, mesh=None) -> Qwen2:
    """Build the NNX module around already-placed parameters, with no random init."""
    from jresid import sharding

    expand_kv = not sharding.kv_heads_split(config, mesh)
    resid = None if mesh is None else sharding.residual_sharding(mesh)
    abstract = nnx.eval_shape(
        lambda: Qwen2(config, dtype=dtype, rngs=nnx.Rngs(0), expand_kv=expand_kv, resid_sharding=resid)
    )
    graphdef, abstract_state = nnx.split(abstract)

    def fill(path, leaf):
        name = ".".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))
        value = params[name]
        if value.shape != leaf.shape:
            raise CheckpointError(f"parameter {name} has shape {value.shape}, expected {leaf.shape}")
        return value

    state = jax.tree_util.tree_map_with_path(fill, abstract_state)
    return nnx.merge(graphdef, state)


def load_tokenizer(folder: str):
    """Load the folder's tokenizer with transformers, or return None when it has none."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        # AutoTokenizer would silently build an empty tokenizer here.
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def from_pretrained(path: str | os.PathLike[str], dtype=None, mesh=None, shardings=None) -> Model:
    """Load a Qwen2-family Hugging Face checkpoint folder.

    The config is parsed and every tensor is validated before any weight is
    read, so an unsupported or incomplete checkpoint fails fast.

    Args:
        path: folder with `config.json` and `model.safetensors` (or a
            sharded `model.safetensors.index.json`), and optionally tokenizer
            files; or a folder written by `jresid convert` (Orbax).
        dtype: parameter dtype, 'float32', 'bfloat16' or 'float16'; `None`
            keeps the checkpoint's storage dtype.
        mesh: a `jax.sharding.Mesh` to shard the parameters over; `None`
            places everything on the first local device.
        shardings: explicit per-parameter shardings (overrides `mesh`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"model folder not found: {path}")
    config = Qwen2Config.from_json(path)
    if mesh is not None and shardings is None:
        from jresid.sharding import parameter_shardings

        shardings = parameter_shardings(config, mesh)  # raises before any weight is read

    from jresid import orbax_store

    if orbax_store.is_orbax_checkpoint(path):
        params = orbax_store.restore(path, config, dtype_from_name(dtype), shardings)
        target = np.dtype(next(iter(params.values())).dtype)
    else:
        checkpoint = Checkpoint.open(path, config)
        target = dtype_from_name(dtype) or checkpoint.storage_dtype
        logger.info("loading %s (%d tensors, %.1f MB) as %s", path, len(checkpoint.tensors),
                    checkpoint.nbytes() / 1e6, target.name)
        params = checkpoint.load(target, shardings)
    module = build_module(config, params, jnp.dtype(target), mesh)
    return Model(module, load_tokenizer(path), path, mesh)
