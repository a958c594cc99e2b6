"""Per-mode directions in the space of block updates, derived from labelled tokens.

For a layer `l`, every valid token of a prompt set has an update
`u = resid_post - resid_pre` and a mode label (`jresid.modes`). For each mode
m of refinement, recall and reasoning, with `U_m` the updates labelled m and
`U_rest` every other valid update of that layer (unclassified included):

* the mean difference `mean(U_m) - mean(U_rest)`, a `[D]` vector. Adding it
  once (`alpha = 1`) moves an average token's update by the gap between
  the mode and the rest;
* the subspace: the top `rank` right singular vectors of `U_m` (not
  centred), an orthonormal `[rank, D]` basis of the directions that carry
  most of the mode's squared update norm.

`ModeDirections` keeps them with the model identity, the metric options and
the calibration they came from, and saves to one `.npz` file (see
`ModeDirections.save` for the format).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jresid import modes as modes_lib
from jresid.interventions import Intervention
from jresid.metrics import MetricOptions
from jresid.pretrained import Model

logger = logging.getLogger(__name__)

STEERABLE_MODES = ("refinement", "recall", "reasoning")
FILE_FORMAT = "jresid-directions"
FILE_FORMAT_VERSION = 1

# Parameters whose leading entries identify a model's weights (see `weight_probe`).
_PROBE_PARAMS = ("embed.embedding", "blocks.attn.q_kernel", "blocks.mlp.down_kernel", "final_norm.weight")
_PROBE_ENTRIES = 8
# bfloat16 keeps about 3 significant digits, so the same checkpoint loaded in
# another dtype stays within this relative tolerance.
_PROBE_RTOL = 1e-2


class DirectionsError(ValueError):
    """A directions file that is invalid, or made for another model."""


def weight_probe(model: Model) -> list[float]:
    """Return a few leading parameter entries that tell one model's weights from another's.

    The config fingerprint of `jresid.results.model_identity` covers
    config.json and the safetensors headers only. Two checkpoints with the
    same shapes but other values share it, and these entries tell them apart.
    """
    params = model.params()
    values = []
    for name in _PROBE_PARAMS:
        if name not in params:
            continue
        param = params[name]
        leading = param[(0,) * (param.ndim - 1)] if param.ndim > 1 else param
        values.extend(float(v) for v in np.asarray(leading[:_PROBE_ENTRIES], dtype=np.float64))
    return values


def model_identity(model: Model) -> dict[str, Any]:
    """Describe a model: path, config fingerprint, dtype, shape and weight probe."""
    from jresid.results import model_identity as config_identity

    identity = dict(config_identity(model))
    identity["weight_probe"] = weight_probe(model)
    return identity


def check_model_identity(saved: dict[str, Any], model: Model, source: str) -> None:
    """Raise DirectionsError unless `saved` (a `model_identity`) describes `model`.

    A different folder with the same fingerprint and weights is accepted,
    because a checkpoint may have been moved or copied.
    """
    current = model_identity(model)
    for field in ("num_layers", "hidden_size"):
        if saved.get(field) != current[field]:
            raise DirectionsError(
                f"{source} was made for a model with {field}={saved.get(field)} ({saved.get('path')}), "
                f"but this model has {field}={current[field]} ({current['path']}); derive directions on this model"
            )
    if saved.get("fingerprint") != current["fingerprint"]:
        raise DirectionsError(
            f"{source} was made for the model at {saved.get('path')} (config fingerprint {saved.get('fingerprint')}), "
            f"but this model at {current['path']} has fingerprint {current['fingerprint']}; "
            "derive directions on this model or load the model they were made for"
        )
    probe = np.asarray(saved.get("weight_probe") or [], dtype=np.float64)
    now = np.asarray(current["weight_probe"], dtype=np.float64)
    scale = max(float(np.abs(now).max(initial=0.0)), 1e-30)
    if probe.shape != now.shape or not np.allclose(probe, now, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * scale):
        raise DirectionsError(
            f"{source} was made for the model at {saved.get('path')}, whose weights differ from those of "
            f"{current['path']} (same config fingerprint {current['fingerprint']}); derive directions on this model"
        )
    if saved.get("path") != current["path"]:
        logger.info("%s was made at %s; the same model now loads from %s", source, saved.get("path"),
                    current["path"])


@dataclasses.dataclass(eq=False)
class ModeDirections:
    """Per-mode directions of a few layers, with where they came from.

    Arrays are float32 and indexed `[layer slot, mode]`, where
    `layers[slot]` is the block and modes are in `STEERABLE_MODES` order.

    Attributes:
        layers: the blocks the directions belong to.
        mean_difference: `[nL, 3, D]` mean update of the mode minus the mean
            of every other valid update of that layer; zero where the mode
            has no token.
        basis: `[nL, 3, rank, D]` orthonormal rows spanning the mode's top
            singular directions; rows past the number of the mode's tokens
            (or its rank) are zero.
        singular_values: `[nL, 3, rank]` the singular values of those rows.
        counts: `[nL, 3]` int, tokens labelled with each mode.
        total_tokens: valid tokens per layer behind the directions.
        mean_update_norm: `[nL]` mean update norm over the valid tokens,
            a scale for `alpha`.
        model: `model_identity` of the model they came from.
        options: metric options the labels were computed with.
        calibration: the tercile boundaries the labels used.
        num_prompts: prompts behind the directions.
    """

    layers: tuple[int, ...]
    mean_difference: np.ndarray
    basis: np.ndarray
    singular_values: np.ndarray
    counts: np.ndarray
    total_tokens: int
    mean_update_norm: np.ndarray
    model: dict[str, Any]
    options: MetricOptions
    calibration: modes_lib.Calibration
    num_prompts: int

    @property
    def rank(self) -> int:
        return int(self.basis.shape[2])

    def _slot(self, mode: str, layer: int) -> tuple[int, int]:
        if mode not in STEERABLE_MODES:
            raise ValueError(f"mode={mode!r} is invalid; use one of {', '.join(STEERABLE_MODES)}")
        if layer not in self.layers:
            raise ValueError(f"the directions cover layers {list(self.layers)}, not layer {layer}; "
                             "derive directions for that layer")
        slot, column = self.layers.index(layer), STEERABLE_MODES.index(mode)
        if self.counts[slot, column] == 0:
            raise ValueError(f"no token of the {self.num_prompts} prompts was labelled {mode} at layer {layer}, "
                             "so that mode has no direction there; choose another layer or use more prompts")
        return slot, column

    def direction(self, mode: str, layer: int) -> np.ndarray:
        """Return the `[D]` mean difference of `mode` at `layer`.

        Raises:
            ValueError: an unknown mode, a layer not covered, or a mode
                without tokens at that layer.
        """
        slot, column = self._slot(mode, layer)
        return self.mean_difference[slot, column]

    def subspace(self, mode: str, layer: int) -> np.ndarray:
        """Return the orthonormal `[k, D]` basis of `mode` at `layer`, without zero rows."""
        slot, column = self._slot(mode, layer)
        rows = self.basis[slot, column]
        return rows[self.singular_values[slot, column] > 0]

    def intervention(self, mode: str, layer: int, operation: str = "add", alpha: float = 1.0,
                     point: str = "hook_resid_post") -> Intervention:
        """Build the intervention that steers `layer` toward (or away from) `mode`.

        "add" adds `alpha` times the mean difference; "scale" and "ablate"
        act on the mode's subspace.
        """
        vector = self.direction(mode, layer) if operation == "add" else self.subspace(mode, layer)
        return Intervention(layer=layer, operation=operation, vector=vector, alpha=alpha, point=point)

    def check_model(self, model: Model, source: str = "the directions") -> None:
        """Raise DirectionsError unless these directions were derived on `model`."""
        check_model_identity(self.model, model, source)

    def metadata(self) -> dict[str, Any]:
        """Return the JSON metadata that `save` writes."""
        return {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "modes": list(STEERABLE_MODES),
            "layers": list(self.layers),
            "rank": self.rank,
            "total_tokens": int(self.total_tokens),
            "num_prompts": int(self.num_prompts),
            "model": self.model,
            "metric_options": self.options.to_dict(),
            "calibration": self.calibration.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the directions to one `.npz` file (NumPy's uncompressed zip of arrays).

        Members, readable with `numpy.load(path)` and no pickle:

            metadata          0-d string, a JSON object: format
                              "jresid-directions", format_version 1, modes,
                              layers, rank, total_tokens, num_prompts,
                              model (path, fingerprint, dtype, num_layers,
                              hidden_size, weight_probe), metric_options,
                              calibration (the jresid-calibration layout)
            mean_difference   float32 [nL, 3, D]
            basis             float32 [nL, 3, rank, D]
            singular_values   float32 [nL, 3, rank]
            counts            int64 [nL, 3]
            mean_update_norm  float32 [nL]
        """
        path = os.fspath(path)
        with open(path, "wb") as file:
            np.savez(
                file,
                metadata=np.asarray(json.dumps(self.metadata())),
                mean_difference=self.mean_difference.astype(np.float32),
                basis=self.basis.astype(np.float32),
                singular_values=self.singular_values.astype(np.float32),
                counts=self.counts.astype(np.int64),
                mean_update_norm=self.mean_update_norm.astype(np.float32),
            )
        logger.info("wrote directions for layers %s to %s", list(self.layers), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Model | None = None) -> ModeDirections:
        """Read directions written by `save`, and check them against `model` when given.

        Raises:
            DirectionsError: the file is missing or invalid, or was made for
                another model.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DirectionsError(f"directions file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise DirectionsError(f"{path} is not a directions .npz file: {error}") from error
        directions = _from_arrays(arrays, path)
        if model is not None:
            directions.check_model(model, path)
        return directions


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> ModeDirections:
    required = ("metadata", "mean_difference", "basis", "singular_values", "counts", "mean_update_norm")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DirectionsError(f"{source}: missing member(s) {missing}; it was not written by ModeDirections.save")

    try:
        meta = json.loads(str(arrays["metadata"]))
    except json.JSONDecodeError as error:
        raise DirectionsError(f"{source}: member 'metadata' is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise DirectionsError(f"{source}: metadata field 'format' must be {FILE_FORMAT!r}")
    if meta.get("format_version") != FILE_FORMAT_VERSION:
        raise DirectionsError(f"{source}: metadata field 'format_version' is {meta.get('format_version')!r}; "
                              f"this jresid reads version {FILE_FORMAT_VERSION}")
    if meta.get("modes") != list(STEERABLE_MODES):
        raise DirectionsError(f"{source}: metadata field 'modes' must be {list(STEERABLE_MODES)}")

    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers) or not layers:
        raise DirectionsError(f"{source}: metadata field 'layers' must be a non-empty list of integers")
    num_slots = len(layers)
    width = arrays["mean_difference"].shape[-1] if arrays["mean_difference"].ndim == 3 else -1
    rank = meta.get("rank")
    expected = {
        "mean_difference": (num_slots, 3, width),
        "basis": (num_slots, 3, rank, width),
        "singular_values": (num_slots, 3, rank),
        "counts": (num_slots, 3),
        "mean_update_norm": (num_slots,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise DirectionsError(f"{source}: member '{name}' has shape {arrays[name].shape}, expected {shape}")

    try:
        options = MetricOptions.from_dict(meta.get("metric_options"))
    except (TypeError, ValueError) as error:
        raise DirectionsError(f"{source}: metadata field 'metric_options' is invalid: {error}") from error
    calibration = modes_lib.Calibration.from_dict(meta.get("calibration"), source=f"{source} calibration")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise DirectionsError(f"{source}: metadata field 'model' must be an object")
    return ModeDirections(
        layers=tuple(layers),
        mean_difference=arrays["mean_difference"].astype(np.float32),
        basis=arrays["basis"].astype(np.float32),
        singular_values=arrays["singular_values"].astype(np.float32),
        counts=arrays["counts"].astype(np.int64),
        total_tokens=int(meta.get("total_tokens", 0)),
        mean_update_norm=arrays["mean_update_norm"].astype(np.float32),
        model=model,
        options=options,
        calibration=calibration,
        num_prompts=int(meta.get("num_prompts", 0)),
    )


def mode_directions(updates_ND: np.ndarray, modes_N: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """Compute the directions of one layer from its valid updates and their mode codes.

    Args:
        updates_ND: the updates of the layer's valid tokens, float64.
        modes_N: their mode codes (`jresid.modes`: 1 refinement, 2 recall,
            3 reasoning, 0 unclassified).
        rank: singular directions to keep per mode.

    Returns:
        `mean_difference` `[3, D]`, `basis` `[3, rank, D]`,
        `singular_values` `[3, rank]` and `counts` `[3]`.
    """
    updates_ND = np.asarray(updates_ND, dtype=np.float64)
    width = updates_ND.shape[1]
    mean_difference = np.zeros((3, width))
    basis = np.zeros((3, rank, width))
    singular_values = np.zeros((3, rank))
    counts = np.zeros(3, dtype=np.int64)
    for column, mode in enumerate(STEERABLE_MODES):
        code = modes_lib.MODE_NAMES.index(mode)
        chosen = modes_N == code
        counts[column] = int(chosen.sum())
        if counts[column] == 0:
            continue
        mode_updates = updates_ND[chosen]
        rest = updates_ND[~chosen]
        rest_mean = rest.mean(axis=0) if rest.size else np.zeros(width)
        mean_difference[column] = mode_updates.mean(axis=0) - rest_mean
        _, sigma, vt = np.linalg.svd(mode_updates, full_matrices=False)
        # Directions with no weight are left as zero rows, so `subspace` drops them.
        keep = min(rank, int((sigma > 1e-6 * sigma[0]).sum()) if sigma[0] > 0 else 0)
        basis[column, :keep] = vt[:keep]
        singular_values[column, :keep] = sigma[:keep]
    return {"mean_difference": mean_difference, "basis": basis, "singular_values": singular_values,
            "counts": counts}


def derive_directions(
    model: Model,
    prompts: Sequence[str] | None = None,
    *,
    input_ids=None,
    attention_mask=None,
    layers: Sequence[int] | None = None,
    rank: int = 4,
    calibration: modes_lib.Calibration | None = None,
    batch_size: int = 32,
    **options: Any,
) -> ModeDirections:
    """Run `analyze` on a prompt set and derive every mode's directions at `layers`.

    The updates come from the `hook_resid_pre` and `hook_resid_post`
    captures of the same compiled program that computes the metrics. Without
    a calibration, the tercile boundaries are measured over all the prompts
    together (not per batch), and the labels use them.

    Args:
        model: the model.
        prompts: texts, tokenised with the model's tokenizer; or give
            `input_ids` (and `attention_mask`) instead.
        layers: blocks to derive directions for (default: every block).
        rank: singular directions kept per mode, >= 1.
        calibration: tercile boundaries for the labels; None measures them.
        batch_size: prompts per `analyze` call.
        **options: metric options, as for `jresid.analyze`.

    Raises:
        ValueError: no prompts, a layer out of range, or an invalid rank or
            option, before any compute.
    """
    from jresid.analyze import analyze

    num_layers = model.config.num_hidden_layers
    layers = tuple(range(num_layers)) if layers is None else tuple(sorted(set(int(layer) for layer in layers)))
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {num_layers} blocks; "
                             f"use 0 to {num_layers - 1}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is invalid; use an integer >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; use an integer >= 1")
    options.setdefault("sequence_complexity", False)
    metric_options = MetricOptions(**options)
    if calibration is not None:
        calibration.check_compatible(num_layers)

    if input_ids is None:
        if not prompts:
            raise ValueError("no prompts to derive directions from; pass prompts or input_ids")
        ids_BT, mask_BT = model.tokenize(list(prompts))
    else:
        ids_BT, mask_BT = model.prepare_inputs(input_ids, attention_mask)
        ids_BT, mask_BT = np.asarray(ids_BT), np.asarray(mask_BT)
    num_prompts = ids_BT.shape[0]
    names = [f"blocks.{layer}.{point}" for layer in layers for point in ("hook_resid_pre", "hook_resid_post")]

    energy, expansion, complexity, valid, updates = [], [], [], [], []
    for start in range(0, num_prompts, batch_size):
        stop = min(start + batch_size, num_prompts)
        result = analyze(model, ids_BT[start:stop], mask_BT[start:stop], names_filter=names,
                         calibration=calibration, **metric_options.to_dict())
        energy.append(result.energy)
        expansion.append(result.expansion)
        complexity.append(result.complexity)
        valid.append(result.valid)
        updates.append(np.stack([
            result.cache[f"blocks.{layer}.hook_resid_post"].astype(np.float64)
            - result.cache[f"blocks.{layer}.hook_resid_pre"].astype(np.float64)
            for layer in layers
        ], axis=1))  # [B, nL, T, D]
    energy_BLT, expansion_BLT, complexity_BLT = (np.concatenate(v) for v in (energy, expansion, complexity))
    valid_BT = np.concatenate(valid)
    updates_BlTD = np.concatenate(updates)

    if calibration is None:
        found = modes_lib.calibrate(energy_BLT, expansion_BLT, complexity_BLT, valid_BT)
        calibration = modes_lib.Calibration(
            energy=np.asarray(found.energy), expansion=np.asarray(found.expansion),
            complexity=np.asarray(found.complexity), tokens=np.asarray(found.tokens),
            options=metric_options, model_id=model.path or "")
    mode_BLT = np.asarray(modes_lib.label_modes(energy_BLT, expansion_BLT, complexity_BLT, calibration, valid_BT))

    per_layer = []
    for slot, layer in enumerate(layers):
        layer_updates_ND = updates_BlTD[:, slot][valid_BT]
        per_layer.append(mode_directions(layer_updates_ND, mode_BLT[:, layer][valid_BT], rank))
        counts = dict(zip(STEERABLE_MODES, per_layer[-1]["counts"].tolist()))
        logger.info("layer %d: %d valid tokens, mode counts %s", layer, layer_updates_ND.shape[0], counts)
    mean_update_norm = np.asarray([
        np.linalg.norm(updates_BlTD[:, slot][valid_BT], axis=-1).mean() for slot in range(len(layers))
    ])
    return ModeDirections(
        layers=layers,
        mean_difference=np.stack([d["mean_difference"] for d in per_layer]).astype(np.float32),
        basis=np.stack([d["basis"] for d in per_layer]).astype(np.float32),
        singular_values=np.stack([d["singular_values"] for d in per_layer]).astype(np.float32),
        counts=np.stack([d["counts"] for d in per_layer]),
        total_tokens=int(valid_BT.sum()),
        mean_update_norm=mean_update_norm.astype(np.float32),
        model=model_identity(model),
        options=metric_options,
        calibration=calibration,
        num_prompts=num_prompts,
    )


__all__ = [
    "STEERABLE_MODES",
    "DirectionsError",
    "ModeDirections",
    "derive_directions",
    "mode_directions",
    "model_identity",
]
