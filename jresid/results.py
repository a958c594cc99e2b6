"""Result tables (Parquet) and the manifest that says what produced them.

Per-token table, one row per prompt, layer and token:

    prompt_id string, layer int16, position int32, token_id int32,
    token string, energy float32, innovation float32, expansion float32,
    complexity float32, mode string

Per-layer table, one row per prompt and layer: the means of each metric
over the prompt's tokens (NaN entries skipped), the sequence-basis
complexity, the token count and the share of tokens in each mode.

Both are plain Parquet files that pandas, polars and DuckDB read without
jresid.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jresid.analyze import METRIC_NAMES, AnalysisResult

TOKEN_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("layer", pa.int16()),
    ("position", pa.int32()),
    ("token_id", pa.int32()),
    ("token", pa.string()),
    ("energy", pa.float32()),
    ("innovation", pa.float32()),
    ("expansion", pa.float32()),
    ("complexity", pa.float32()),
    ("mode", pa.string()),
])


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Decode each token on its own; without a tokenizer, the id as text."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def prompt_tokens(result: AnalysisResult, row: int, tokenizer) -> tuple[np.ndarray, list[str]]:
    """Return a prompt's real token ids and their texts, in order."""
    ids = result.input_ids[row][result.valid[row]]
    return ids, token_texts(tokenizer, ids)


def token_table(result: AnalysisResult, prompt_ids: Sequence[str], tokenizer=None) -> pa.Table:
    """Build the per-token table of every prompt in `result`."""
    if len(prompt_ids) != result.energy.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompt ids for a batch of {result.energy.shape[0]}")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in TOKEN_SCHEMA.names}
    L = result.num_layers
    names = np.asarray(result.mode_names, dtype=object)
    for row, prompt_id in enumerate(prompt_ids):
        real = result.valid[row]
        ids, texts = prompt_tokens(result, row, tokenizer)
        T = len(ids)
        columns["prompt_id"].append(np.full(L * T, str(prompt_id), dtype=object))
        columns["layer"].append(np.repeat(np.arange(L, dtype=np.int16), T))
        columns["position"].append(np.tile(np.arange(T, dtype=np.int32), L))
        columns["token_id"].append(np.tile(ids.astype(np.int32), L))
        columns["token"].append(np.tile(np.asarray(texts, dtype=object), L))
        for name in METRIC_NAMES:
            columns[name].append(getattr(result, name)[row][:, real].reshape(-1).astype(np.float32))
        columns["mode"].append(names[result.mode[row][:, real].reshape(-1)])
    arrays = [pa.array(np.concatenate(columns[field.name]), type=field.type) for field in TOKEN_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=TOKEN_SCHEMA)


def layer_table(result: AnalysisResult, prompt_ids: Sequence[str]) -> pa.Table:
    """Build the per-layer table: one row per prompt and layer."""
    L = result.num_layers
    rows: dict[str, list[Any]] = {"prompt_id": [], "layer": [], "tokens": []}
    for name in METRIC_NAMES:
        rows[f"{name}_mean"] = []
    rows["sequence_complexity"] = []
    for name in result.mode_names:
        rows[f"share_{name}"] = []
    for row, prompt_id in enumerate(prompt_ids):
        real = result.valid[row]
        for layer in range(L):
            rows["prompt_id"].append(str(prompt_id))
            rows["layer"].append(layer)
            rows["tokens"].append(int(real.sum()))
            for name in METRIC_NAMES:
                values = getattr(result, name)[row, layer][real]
                finite = values[np.isfinite(values)]
                rows[f"{name}_mean"].append(float(finite.mean()) if finite.size else float("nan"))
            rows["sequence_complexity"].append(float(result.sequence_complexity[row, layer]))
            modes = result.mode[row, layer][real]
            for code, name in enumerate(result.mode_names):
                rows[f"share_{name}"].append(float((modes == code).mean()))
    table = pa.table(rows)
    return table.cast(pa.schema([
        (field.name, pa.int16() if field.name == "layer" else pa.int32() if field.name == "tokens"
         else pa.float32() if pa.types.is_floating(field.type) else field.type)
        for field in table.schema
    ]))


def write_table(table: pa.Table, path: str) -> None:
    """Write a Parquet file atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    pq.write_table(table, partial)
    os.replace(partial, path)


def write_json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(partial, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def model_identity(model) -> dict[str, Any]:
    """Describe a model well enough to tell whether two runs used the same one.

    The fingerprint hashes config.json and each weight file's name, size and
    safetensors header, which changes whenever a tensor's name, shape, dtype
    or position changes. NOTE: two checkpoints that differ only in tensor
    values with identical headers get the same fingerprint.
    """
    digest = hashlib.sha256()
    folder = model.path
    if folder is not None:
        with open(os.path.join(folder, "config.json"), "rb") as f:
            digest.update(f.read())
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    header_len = int.from_bytes(f.read(8), "little")
                    digest.update(name.encode())
                    digest.update(str(os.path.getsize(path)).encode())
                    digest.update(f.read(header_len))
    return {
        "path": None if folder is None else os.path.abspath(folder),
        "fingerprint": digest.hexdigest()[:16],
        "dtype": model.dtype.name,
        "num_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
    }


def versions() -> dict[str, str]:
    import flax
    import jax

    import jresid

    return {
        "jresid": jresid.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
    }
