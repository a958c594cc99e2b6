"""Orbax checkpoints of jresid parameters: convert once, restore fast into any mesh.

A converted folder holds:

    config.json            the model's config (transformers 5 layout)
    jresid_orbax.json      marks the folder and records the parameter dtype
    params/                the Orbax checkpoint of the flat parameter dict
    tokenizer files        copied from the source checkpoint, when present

Restoring reads each parameter straight into the sharding the target mesh
asks for, whatever mesh (or single device) the checkpoint was written from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np

from jresid.config import Qwen2Config

logger = logging.getLogger(__name__)

MARKER = "jresid_orbax.json"
FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "generation_config.json", "added_tokens.json")


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save(model, out: str) -> None:
    """Write `model`'s parameters, config and tokenizer files as an Orbax checkpoint folder.

    Raises:
        FileExistsError: `out` exists and is not empty.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the Orbax checkpoint")
    os.makedirs(out, exist_ok=True)
    params = model.params()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(out, "params"), params)
        checkpointer.wait_until_finished()

    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, "dtype": model.dtype.name,
                   "source": model.path}, f, indent=2)
    if model.path is not None:
        for name in _TOKENIZER_FILES:
            source = os.path.join(model.path, name)
            if os.path.isfile(source):
                shutil.copy(source, os.path.join(out, name))
    logger.info("wrote Orbax checkpoint %s", out)


def restore(path: str, config: Qwen2Config, dtype=None, shardings=None) -> dict[str, jax.Array]:
    """Restore the flat parameter dict, placing each parameter in its sharding.

    Args:
        dtype: target parameter dtype; `None` keeps the stored dtype.
        shardings: parameter path to sharding; unnamed parameters go to the
            first local device.
    """
    import orbax.checkpoint as ocp

    from jresid.checkpoint import param_shape, tensor_rules

    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
        marker = json.load(f)
    if marker.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: Orbax checkpoint format {marker.get('format_version')!r} is not "
                         f"{FORMAT_VERSION}; convert the model again with this jresid version")
    stored = np.dtype(marker["dtype"]) if marker["dtype"] != "bfloat16" else jax.numpy.bfloat16
    target = stored if dtype is None else dtype
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = shardings or {}
    abstract = {
        rule.param: jax.ShapeDtypeStruct(param_shape(rule, config), target,
                                         sharding=shardings.get(rule.param, default))
        for rule in tensor_rules(config)
    }
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(path), "params"), abstract)
