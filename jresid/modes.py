"""Label each token's update as refinement, recall or reasoning.

Each metric gets three levels per layer, split at its terciles over a
calibration set. Low is at or below the 1/3 quantile, and high is above the
2/3 quantile. Medium lies between: above the first boundary and at or below
the second. The levels of expansion, complexity and energy then select a
mode:

    mode         expansion  complexity  energy
    refinement   low        low         low
    recall       high       low         medium
    reasoning    high       high        high

Any other combination, and any token with a NaN metric (padding, a
degenerate update, a token without history), is "unclassified", code 0.
Padding gets code 0 too, so codes alone do not tell padding from an
unclassified token; keep the valid mask for that.

A `Calibration` contains the boundaries ([L, 2] per metric), the metric options
they were measured with and the model they came from, and saves to a JSON
file that others can reuse (see `Calibration.save` for the format).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jresid.metrics.options import MetricOptions

MODE_NAMES = ("unclassified", "refinement", "recall", "reasoning")
UNCLASSIFIED, REFINEMENT, RECALL, REASONING = range(len(MODE_NAMES))

# The tercile boundaries: value <= first is low, value > second is high.
QUANTILES = (1.0 / 3.0, 2.0 / 3.0)

CALIBRATED_METRICS = ("energy", "expansion", "complexity")

FILE_FORMAT = "jresid-calibration"
FILE_FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file or dict with a missing or invalid field."""


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """Per-layer tercile boundaries of the metrics, and where they came from.

    A pytree: the boundary arrays are its leaves and `options` and
    `model_id` its static data, so it can be passed through `jax.jit`.

    Attributes:
        energy: [L, 2] energy boundaries (1/3 and 2/3 quantiles) per layer.
        expansion: [L, 2] expansion boundaries per layer.
        complexity: [L, 2] complexity boundaries per layer.
        tokens: [L, 3] number of valid tokens with a finite value behind the
            boundaries of energy, expansion and complexity (in that order),
            or None when unknown.
        options: Metric options the calibration set was measured with, or
            None when unknown.
        model_id: Model the calibration set came from (a Hugging Face id or
            a path), or "" when unknown.
    """

    energy: jax.Array
    expansion: jax.Array
    complexity: jax.Array
    tokens: jax.Array | None = None
    options: MetricOptions | None = None
    model_id: str = ""

    @property
    def num_layers(self) -> int:
        """Number of layers the boundaries cover."""
        return int(self.energy.shape[0])

    def check_compatible(self, num_layers: int) -> None:
        """Raise CalibrationError unless the calibration covers `num_layers` layers."""
        if self.num_layers != num_layers:
            raise CalibrationError(
                f"the calibration has {self.num_layers} layers but the model has {num_layers}; "
                "calibrate on this model or load a calibration made for it"
            )

    def boundaries(self, metric: str) -> jax.Array:
        """Return the [L, 2] boundaries of "energy", "expansion" or "complexity"."""
        if metric not in CALIBRATED_METRICS:
            raise ValueError(f"metric={metric!r} is invalid; use one of {', '.join(CALIBRATED_METRICS)}")
        return getattr(self, metric)

    def to_dict(self) -> dict[str, Any]:
        """Return the calibration as the JSON-ready dict that `save` writes."""
        return {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "model_id": self.model_id,
            "metric_options": None if self.options is None else self.options.to_dict(),
            "quantiles": list(QUANTILES),
            "num_layers": self.num_layers,
            "tokens": None
            if self.tokens is None
            else {
                metric: [int(count) for count in np.asarray(self.tokens)[:, column]]
                for column, metric in enumerate(CALIBRATED_METRICS)
            },
            "boundaries": {
                metric: [
                    [None if math.isnan(value) else value for value in pair]
                    for pair in np.asarray(self.boundaries(metric), dtype=np.float64).tolist()
                ]
                for metric in CALIBRATED_METRICS
            },
        }

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "calibration") -> Calibration:
        """Validate a dict in the `to_dict` layout and build the calibration.

        Raises:
            CalibrationError: A field is missing or invalid; the message names it.
        """
        return _parse(raw, source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the calibration to a JSON file.

        The file is one JSON object:

            format          "jresid-calibration"
            format_version  1
            model_id        string, "" when unknown
            metric_options  object of MetricOptions fields, or null
            quantiles       [1/3, 2/3], the quantiles the boundaries are at
            num_layers      L
            tokens          {"energy": [count x L], "expansion": ...,
                             "complexity": ...}: valid tokens with a finite
                            value behind each layer's boundaries, or null
            boundaries      {"energy": [[low, high] x L], "expansion": ...,
                             "complexity": ...}; a layer without finite
                            values has [null, null]
        """
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_dict(), file, indent=2)
            file.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read and validate a calibration file written by `save`.

        Raises:
            CalibrationError: The file is missing, is not JSON, or a field is
                missing or invalid; the message names the file and the field.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as file:
                raw = json.load(file)
        except FileNotFoundError as error:
            raise CalibrationError(f"calibration file not found: {path}") from error
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{path} is not valid JSON: {error}") from error
        return _parse(raw, path)


jax.tree_util.register_dataclass(
    Calibration,
    data_fields=["energy", "expansion", "complexity", "tokens"],
    meta_fields=["options", "model_id"],
)


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise CalibrationError(f"{source}: required field '{key}' is missing")
    return raw[key]


def _parse_boundaries(value: Any, metric: str, num_layers: int, source: str) -> np.ndarray:
    field = f"boundaries.{metric}"
    if not isinstance(value, list) or len(value) != num_layers:
        raise CalibrationError(f"{source}: field '{field}' must list {num_layers} [low, high] pairs, got {value!r}")
    pairs = np.full((num_layers, 2), np.nan, dtype=np.float32)
    for layer, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CalibrationError(f"{source}: field '{field}[{layer}]' must be [low, high], got {pair!r}")
        for side, number in enumerate(pair):
            if number is None:
                continue
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise CalibrationError(
                    f"{source}: field '{field}[{layer}][{side}]' must be a finite number or null, got {number!r}"
                )
            pairs[layer, side] = number
        low, high = pairs[layer]
        if np.isnan(low) != np.isnan(high):
            raise CalibrationError(f"{source}: field '{field}[{layer}]' has one null boundary: {pair!r}")
        if low > high:
            raise CalibrationError(f"{source}: field '{field}[{layer}]' has low {low} above high {high}")
    return pairs


def _parse_tokens(value: Any, num_layers: int, source: str) -> np.ndarray | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CalibrationError(f"{source}: field 'tokens' must be an object or null, got {value!r}")
    counts = np.zeros((num_layers, len(CALIBRATED_METRICS)), dtype=np.int32)
    for column, metric in enumerate(CALIBRATED_METRICS):
        field = f"tokens.{metric}"
        if metric not in value:
            raise CalibrationError(f"{source}: required field '{field}' is missing")
        layer_counts = value[metric]
        if not isinstance(layer_counts, list) or len(layer_counts) != num_layers:
            raise CalibrationError(f"{source}: field '{field}' must list {num_layers} counts, got {layer_counts!r}")
        for layer, count in enumerate(layer_counts):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise CalibrationError(
                    f"{source}: field '{field}[{layer}]' must be an integer >= 0, got {count!r}"
                )
            counts[layer, column] = count
    return counts


def _parse(raw: Any, source: str) -> Calibration:
    if not isinstance(raw, dict):
        raise CalibrationError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    file_format = _require(raw, "format", source)
    if file_format != FILE_FORMAT:
        raise CalibrationError(f"{source}: field 'format' is {file_format!r}, expected {FILE_FORMAT!r}")
    version = _require(raw, "format_version", source)
    if version != FILE_FORMAT_VERSION or isinstance(version, bool):
        raise CalibrationError(
            f"{source}: field 'format_version' is {version!r}; this jresid reads version {FILE_FORMAT_VERSION}"
        )

    model_id = _require(raw, "model_id", source)
    if not isinstance(model_id, str):
        raise CalibrationError(f"{source}: field 'model_id' must be a string, got {model_id!r}")

    raw_options = _require(raw, "metric_options", source)
    options = None
    if raw_options is not None:
        try:
            options = MetricOptions.from_dict(raw_options)
        except (TypeError, ValueError) as error:
            raise CalibrationError(f"{source}: field 'metric_options' is invalid: {error}") from error

    quantiles = _require(raw, "quantiles", source)
    if (
        not isinstance(quantiles, list)
        or len(quantiles) != len(QUANTILES)
        or not all(isinstance(q, (int, float)) and abs(q - expected) < 1e-9 for q, expected in zip(quantiles, QUANTILES))
    ):
        raise CalibrationError(f"{source}: field 'quantiles' must be [1/3, 2/3], got {quantiles!r}")

    num_layers = _require(raw, "num_layers", source)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise CalibrationError(f"{source}: field 'num_layers' must be an integer >= 1, got {num_layers!r}")

    boundaries = _require(raw, "boundaries", source)
    if not isinstance(boundaries, dict):
        raise CalibrationError(f"{source}: field 'boundaries' must be an object, got {boundaries!r}")
    unknown = sorted(set(boundaries) - set(CALIBRATED_METRICS))
    if unknown:
        raise CalibrationError(f"{source}: field 'boundaries' has unknown metrics {unknown}")
    arrays = {}
    for metric in CALIBRATED_METRICS:
        if metric not in boundaries:
            raise CalibrationError(f"{source}: required field 'boundaries.{metric}' is missing")
        arrays[metric] = jnp.asarray(_parse_boundaries(boundaries[metric], metric, num_layers, source))
    tokens = _parse_tokens(raw.get("tokens"), num_layers, source)
    return Calibration(
        tokens=None if tokens is None else jnp.asarray(tokens),
        options=options,
        model_id=model_id,
        **arrays,
    )


def _layer_terciles(values_BLT: jax.Array, valid_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return [L, 2] quantiles of each layer's valid, finite values (NaN for none) and their [L] counts."""
    values_BLT = jnp.asarray(values_BLT)
    values_BLT = values_BLT.astype(jnp.promote_types(values_BLT.dtype, jnp.float32))
    usable_BLT = valid_BT[:, None, :] & jnp.isfinite(values_BLT)
    masked_BLT = jnp.where(usable_BLT, values_BLT, jnp.nan)
    num_layers = values_BLT.shape[1]
    per_layer_LN = jnp.moveaxis(masked_BLT, 1, 0).reshape(num_layers, -1)
    quantiles_QL = jnp.nanquantile(per_layer_LN, jnp.asarray(QUANTILES), axis=1)
    counts_L = jnp.sum(usable_BLT, axis=(0, 2)).astype(jnp.int32)
    return quantiles_QL.T, counts_L


def calibrate(
    energy_BLT: jax.Array,
    expansion_BLT: jax.Array,
    complexity_BLT: jax.Array,
    valid_BT: jax.Array,
    *,
    options: MetricOptions | None = None,
    model_id: str = "",
) -> Calibration:
    """Measure the per-layer tercile boundaries of each metric over a calibration set.

    The boundaries are the 1/3 and 2/3 quantiles (linear interpolation, as
    `numpy.nanquantile`) over the valid tokens with finite values of every
    sequence. A layer with no such token gets NaN boundaries, which leaves
    all its tokens unclassified. Jit-compatible with `options` and
    `model_id` static.

    Args:
        energy_BLT: Energy per sequence, layer and position.
        expansion_BLT: Expansion, same shape.
        complexity_BLT: Complexity, same shape.
        valid_BT: True at real tokens.
        options: Metric options the values were computed with, kept in the
            calibration for reference.
        model_id: Model the values came from.

    Returns:
        The calibration.
    """
    valid_BT = jnp.asarray(valid_BT, dtype=bool)
    shape = jnp.shape(energy_BLT)
    for name, values in (("expansion_BLT", expansion_BLT), ("complexity_BLT", complexity_BLT)):
        if jnp.shape(values) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(values)}, expected {shape} like energy_BLT")
    if len(shape) != 3 or valid_BT.shape != (shape[0], shape[2]):
        raise ValueError(
            f"metrics must be [B, L, T] and valid_BT [B, T]; got {shape} and {valid_BT.shape}"
        )
    energy_L2, energy_count_L = _layer_terciles(energy_BLT, valid_BT)
    expansion_L2, expansion_count_L = _layer_terciles(expansion_BLT, valid_BT)
    complexity_L2, complexity_count_L = _layer_terciles(complexity_BLT, valid_BT)
    return Calibration(
        energy=energy_L2,
        expansion=expansion_L2,
        complexity=complexity_L2,
        tokens=jnp.stack([energy_count_L, expansion_count_L, complexity_count_L], axis=1),
        options=options,
        model_id=model_id,
    )


def _levels(values_LT: jax.Array, boundaries_L2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return the (low, medium, high) masks of values against per-layer boundaries; NaN is in none."""
    low_boundary = boundaries_L2[:, 0][:, None]
    high_boundary = boundaries_L2[:, 1][:, None]
    low = values_LT <= low_boundary
    high = values_LT > high_boundary
    medium = (values_LT > low_boundary) & (values_LT <= high_boundary)
    return low, medium, high


def label_modes(
    energy: jax.Array,
    expansion: jax.Array,
    complexity: jax.Array,
    calibration: Calibration,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Return the mode code of every token, as int8 indices into MODE_NAMES.

    Args:
        energy: Energy, [..., L, T] (for instance [B, L, T]).
        expansion: Expansion, same shape.
        complexity: Complexity, same shape.
        calibration: Boundaries for the same L layers.
        valid: Optional [..., T] mask (for instance [B, T]); positions where
            it is False get 0 whatever their metrics hold.

    Returns:
        int8 codes of the inputs' shape: 1 refinement, 2 recall,
        3 reasoning, 0 unclassified (padding and NaN metrics included).
    """
    shape = jnp.shape(energy)
    if jnp.shape(expansion) != shape or jnp.shape(complexity) != shape:
        raise ValueError(
            f"energy, expansion and complexity must share one shape; got {shape}, "
            f"{jnp.shape(expansion)} and {jnp.shape(complexity)}"
        )
    if len(shape) < 2 or shape[-2] != calibration.num_layers:
        raise ValueError(
            f"metrics of shape {shape} do not match the calibration's {calibration.num_layers} layers; "
            "the layer axis must be second to last"
        )

    energy_low, energy_medium, energy_high = _levels(jnp.asarray(energy), calibration.energy)
    expansion_low, _, expansion_high = _levels(jnp.asarray(expansion), calibration.expansion)
    complexity_low, _, complexity_high = _levels(jnp.asarray(complexity), calibration.complexity)

    refinement = expansion_low & complexity_low & energy_low
    recall = expansion_high & complexity_low & energy_medium
    reasoning = expansion_high & complexity_high & energy_high
    modes = jnp.where(refinement, REFINEMENT, UNCLASSIFIED)
    modes = jnp.where(recall, RECALL, modes)
    modes = jnp.where(reasoning, REASONING, modes)
    if valid is not None:
        valid = jnp.asarray(valid, dtype=bool)
        modes = jnp.where(jnp.expand_dims(valid, -2), modes, UNCLASSIFIED)
    return modes.astype(jnp.int8)
