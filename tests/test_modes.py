"""Mode labels and calibration files, checked against a plain NumPy implementation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jresid.metrics import MetricOptions
from jresid.modes import (
    MODE_NAMES,
    Calibration,
    CalibrationError,
    calibrate,
    label_modes,
)


def _terciles_numpy(values_BLT, valid_BT):
    """Return [L, 2] tercile boundaries and [L] counts over valid, finite values."""
    bounds, counts = [], []
    for layer in range(values_BLT.shape[1]):
        pooled = values_BLT[:, layer][valid_BT & np.isfinite(values_BLT[:, layer])]
        counts.append(pooled.size)
        bounds.append(np.quantile(pooled, [1 / 3, 2 / 3]) if pooled.size else [np.nan, np.nan])
    return np.array(bounds), np.array(counts)


def _level_numpy(value, low_boundary, high_boundary):
    if not np.isfinite(value) or not np.isfinite(low_boundary):
        return None
    if value <= low_boundary:
        return "low"
    if value <= high_boundary:
        return "medium"
    return "high"


def _labels_numpy(energy, expansion, complexity, bounds):
    """Return mode codes token by token with the signature table written out."""
    table = {
        ("low", "low", "low"): MODE_NAMES.index("refinement"),
        ("high", "low", "medium"): MODE_NAMES.index("recall"),
        ("high", "high", "high"): MODE_NAMES.index("reasoning"),
    }
    labels = np.zeros(energy.shape, dtype=np.int8)
    for b, layer, t in np.ndindex(*energy.shape):
        levels = tuple(
            _level_numpy(values[b, layer, t], *bounds[name][layer])
            for name, values in (("expansion", expansion), ("complexity", complexity), ("energy", energy))
        )
        labels[b, layer, t] = table.get(levels, MODE_NAMES.index("unclassified"))
    return labels


def _metrics(seed=0, batch=3, layers=4, positions=30):
    rng = np.random.default_rng(seed)
    energy = rng.lognormal(size=(batch, layers, positions)).astype(np.float32)
    expansion = rng.uniform(size=(batch, layers, positions)).astype(np.float32)
    complexity = rng.uniform(1.0, 15.0, size=(batch, layers, positions)).astype(np.float32)
    valid = np.ones((batch, positions), dtype=bool)
    valid[0, :4] = False
    valid[2, -6:] = False
    for values in (energy, expansion, complexity):
        values[~np.broadcast_to(valid[:, None, :], values.shape)] = np.nan
    expansion[:, :, 4] = np.nan
    return energy, expansion, complexity, valid


def test_mode_names_start_with_unclassified():
    assert MODE_NAMES == ("unclassified", "refinement", "recall", "reasoning")


def test_calibrate_matches_numpy_quantiles():
    energy, expansion, complexity, valid = _metrics()
    calibration = jax.jit(calibrate)(energy, expansion, complexity, valid)
    for column, (name, values) in enumerate(
        (("energy", energy), ("expansion", expansion), ("complexity", complexity))
    ):
        bounds, counts = _terciles_numpy(values, valid)
        np.testing.assert_allclose(getattr(calibration, name), bounds, rtol=1e-6, err_msg=f"{name} boundaries")
        np.testing.assert_array_equal(np.asarray(calibration.tokens)[:, column], counts, err_msg=f"{name} counts")


def test_calibrate_layer_without_values_gives_nan_boundaries():
    energy, expansion, complexity, valid = _metrics()
    expansion[:, 2] = np.nan
    calibration = calibrate(energy, expansion, complexity, valid)
    assert np.all(np.isnan(np.asarray(calibration.expansion)[2])), "a layer without finite values needs NaN boundaries"
    labels = np.asarray(label_modes(energy, expansion, complexity, calibration))
    assert np.all(labels[:, 2] == 0), "tokens of a layer without boundaries must be unclassified"


def test_labels_match_numpy_signature_table():
    energy, expansion, complexity, valid = _metrics(seed=1)
    calibration = calibrate(energy, expansion, complexity, valid)
    bounds = {name: np.asarray(getattr(calibration, name)) for name in ("energy", "expansion", "complexity")}
    got = np.asarray(jax.jit(label_modes)(energy, expansion, complexity, calibration))
    expected = _labels_numpy(energy, expansion, complexity, bounds)
    assert got.dtype == np.int8
    mismatch = np.argwhere(got != expected)
    assert mismatch.size == 0, f"label at (batch, layer, position) {tuple(mismatch[0])}: {got[tuple(mismatch[0])]} vs {expected[tuple(mismatch[0])]}"
    for code in range(1, len(MODE_NAMES)):
        assert np.any(got == code), f"the random metrics should produce some {MODE_NAMES[code]} tokens"


def test_labels_tie_rule_at_boundaries():
    # Boundaries (1, 2) for every metric: 1 is low, 2 is medium, 2.5 is high.
    bounds = jnp.asarray([[1.0, 2.0]])
    calibration = Calibration(energy=bounds, expansion=bounds, complexity=bounds)
    energy = jnp.asarray([[[1.0, 2.0, 2.5, 1.0, np.nan]]])
    expansion = jnp.asarray([[[1.0, 2.5, 2.5, 0.0, 2.5]]])
    complexity = jnp.asarray([[[1.0, 1.0, 2.5, 2.0, 2.5]]])
    got = np.asarray(label_modes(energy, expansion, complexity, calibration))[0, 0]
    expected = [
        MODE_NAMES.index("refinement"),
        MODE_NAMES.index("recall"),
        MODE_NAMES.index("reasoning"),
        MODE_NAMES.index("unclassified"),
        MODE_NAMES.index("unclassified"),
    ]
    np.testing.assert_array_equal(got, expected)


def test_labels_valid_mask_sets_padding_to_zero():
    energy, expansion, complexity, valid = _metrics(seed=2)
    filled = [np.nan_to_num(values, nan=0.5) for values in (energy, expansion, complexity)]
    calibration = calibrate(energy, expansion, complexity, valid)
    labels = np.asarray(label_modes(*filled, calibration, valid))
    padding = np.broadcast_to(~valid[:, None, :], labels.shape)
    assert np.all(labels[padding] == 0), "padding must be unclassified"
    np.testing.assert_array_equal(labels[~padding], np.asarray(label_modes(*filled, calibration))[~padding])


def test_labels_reject_wrong_layer_count():
    energy, expansion, complexity, valid = _metrics(layers=4)
    calibration = calibrate(energy, expansion, complexity, valid)
    with pytest.raises(ValueError, match="4 layers"):
        label_modes(energy[:, :3], expansion[:, :3], complexity[:, :3], calibration)
    with pytest.raises(CalibrationError, match="4 layers but the model has 3"):
        calibration.check_compatible(3)


def test_calibration_json_round_trip(tmp_path):
    energy, expansion, complexity, valid = _metrics(seed=3)
    expansion[:, 1] = np.nan
    options = MetricOptions(history="ema", decay=0.8, rank_measure="stable")
    calibration = calibrate(energy, expansion, complexity, valid, options=options, model_id="Qwen/Qwen2.5-0.5B")
    path = tmp_path / "calibration.json"
    calibration.save(path)
    loaded = Calibration.load(path)

    assert loaded.options == options
    assert loaded.model_id == "Qwen/Qwen2.5-0.5B"
    for name in ("energy", "expansion", "complexity", "tokens"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(calibration, name), err_msg=name)
    raw = json.loads(path.read_text())
    assert raw["boundaries"]["expansion"][1] == [None, None], "NaN boundaries are saved as null"
    assert raw["format_version"] == 1


def test_calibration_passes_through_jit():
    energy, expansion, complexity, valid = _metrics(seed=4)
    calibration = calibrate(energy, expansion, complexity, valid, model_id="m")
    labels = jax.jit(label_modes)(energy, expansion, complexity, calibration)
    np.testing.assert_array_equal(labels, label_modes(energy, expansion, complexity, calibration))


def _valid_file(tmp_path):
    energy, expansion, complexity, valid = _metrics(seed=5, layers=2)
    calibration = calibrate(energy, expansion, complexity, valid, options=MetricOptions())
    return calibration.to_dict()


def _edit(raw, path, value):
    """Set (or delete, for value ...) the field at a dotted path with list indices."""
    *parents, last = path
    target = raw
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return raw


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("format",), "something-else", "field 'format'"),
        (("format_version",), 2, "field 'format_version' is 2"),
        (("format_version",), ..., "required field 'format_version' is missing"),
        (("model_id",), 3, "field 'model_id' must be a string"),
        (("metric_options",), {"window": 0}, "field 'metric_options' is invalid: window=0"),
        (("metric_options",), {"colour": "blue"}, "unknown metric option"),
        (("quantiles",), [0.25, 0.75], "field 'quantiles'"),
        (("num_layers",), 0, "field 'num_layers'"),
        (("boundaries", "energy"), [[0.0, 1.0]], "field 'boundaries.energy' must list 2"),
        (("boundaries", "expansion", 1), [0.5], r"field 'boundaries.expansion\[1\]' must be \[low, high\]"),
        (("boundaries", "complexity", 0, 1), "high", r"field 'boundaries.complexity\[0\]\[1\]' must be a finite number"),
        (("boundaries", "energy", 0), [2.0, 1.0], "low 2.0 above high 1.0"),
        (("boundaries", "energy", 0), [None, 1.0], "one null boundary"),
        (("boundaries", "complexity"), ..., "required field 'boundaries.complexity' is missing"),
        (("tokens", "energy", 1), -1, r"field 'tokens.energy\[1\]' must be an integer >= 0"),
    ],
)
def test_calibration_load_rejects_bad_field(tmp_path, path, value, message):
    raw = _edit(_valid_file(tmp_path), path, value)
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match=message):
        Calibration.load(file)


def test_calibration_load_rejects_missing_and_malformed_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.load(broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(CalibrationError, match="expected a JSON object"):
        Calibration.load(listing)
