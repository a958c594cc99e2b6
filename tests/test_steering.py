"""Interventions, mode directions, learned steering vectors and the `jresid steer` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid import cli, modes  # noqa: E402
from jresid.analyze import METRIC_NAMES, analyze  # noqa: E402
from jresid.interventions import Intervention, compile_interventions  # noqa: E402
from jresid.steering import DirectionsError, ModeDirections, derive_directions, learn_steering_vector  # noqa: E402
from jresid.steering.learn import loss_of  # noqa: E402
from tests import metrics_reference  # noqa: E402
from tests.hf_checkpoints import random_ids  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny(tiny_untied):
    return jresid.from_pretrained(tiny_untied.path)


@pytest.fixture(scope="module")
def batch(tiny):
    ids = random_ids(3, 12, tiny.config.vocab_size, seed=11)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def unsteered(tiny, batch):
    ids, mask = batch
    logits, cache = tiny.run_with_cache(ids, mask)
    return np.asarray(logits), {name: np.asarray(value, dtype=np.float64) for name, value in cache.items()}


def random_vector(width, seed, rows=None):
    rng = np.random.default_rng(seed)
    return rng.normal(size=width if rows is None else (rows, width))


def operations(width):
    return [
        ("add", "hook_resid_pre", random_vector(width, 1)),
        ("add", "hook_resid_post", random_vector(width, 2)),
        ("scale", "hook_resid_post", random_vector(width, 3, rows=3)),
        ("ablate", "hook_resid_post", random_vector(width, 4, rows=2)),
    ]


def projector(basis_KD):
    """Float64 orthogonal projector onto the row span of `basis_KD`."""
    q, _ = np.linalg.qr(np.asarray(basis_KD, dtype=np.float64).T)
    return q @ q.T


def reference_edit(operation, point, vector, alpha, resid_pre, resid_post):
    """The edited value at `point`, in float64 NumPy."""
    if operation == "add":
        base = resid_pre if point == "hook_resid_pre" else resid_post
        return base + alpha * vector
    gain = alpha if operation == "scale" else -alpha
    update = resid_post - resid_pre
    return resid_post + gain * update @ projector(vector)


def reference_logits(model, resid_BTD):
    """Final RMS norm and output layer in float64 NumPy."""
    params = {name: np.asarray(value, dtype=np.float64) for name, value in model.params().items()}
    eps = model.config.rms_norm_eps
    normalized = resid_BTD / np.sqrt(np.mean(resid_BTD**2, axis=-1, keepdims=True) + eps)
    kernel = params["lm_head.kernel"] if "lm_head.kernel" in params else params["embed.embedding"].T
    return (normalized * params["final_norm.weight"]) @ kernel


# --- alpha = 0 ------------------------------------------------------------------------------------------------


def test_alpha_zero_is_bitwise_unsteered(tiny, batch, unsteered):
    """All four operations at alpha = 0, at different layers, in one program."""
    ids, mask = batch
    width = tiny.config.hidden_size
    interventions = [
        Intervention(0, "add", random_vector(width, 1), alpha=0.0, point="hook_resid_pre"),
        Intervention(0, "ablate", random_vector(width, 4, rows=2), alpha=0.0),
        Intervention(1, "add", random_vector(width, 2), alpha=0.0, point="hook_resid_post"),
        Intervention(2, "scale", random_vector(width, 3, rows=3), alpha=0.0),
    ]
    logits, cache = tiny.run_with_cache(ids, mask, interventions=interventions)
    assert np.array_equal(np.asarray(logits), unsteered[0])
    for name, value in cache.items():
        assert np.array_equal(np.asarray(value, dtype=np.float64), unsteered[1][name]), name

    plain = analyze(tiny, ids, mask)
    steered = analyze(tiny, ids, mask, interventions=interventions, calibration=plain.calibration)
    for name in (*METRIC_NAMES, "mode", "sequence_complexity"):
        assert np.array_equal(getattr(steered, name), getattr(plain, name), equal_nan=True), name


# --- each operation against a float64 reference ---------------------------------------------------------------


@pytest.mark.parametrize("index", range(4), ids=["add-pre", "add-post", "scale", "ablate"])
def test_operation_matches_numpy_reference(tiny, batch, unsteered, index):
    ids, mask = batch
    _, captured = unsteered
    operation, point, vector = operations(tiny.config.hidden_size)[index]
    layer = 1
    alpha = 0.8
    intervention = Intervention(layer, operation, vector, alpha=alpha, point=point)
    _, cache = tiny.run_with_cache(ids, mask, interventions=intervention)
    expected = reference_edit(operation, point, vector, alpha, captured[f"blocks.{layer}.hook_resid_pre"],
                              captured[f"blocks.{layer}.hook_resid_post"])
    actual = np.asarray(cache[f"blocks.{layer}.{point}"], dtype=np.float64)
    assert np.abs(actual - expected).max() <= ATOL * max(1.0, np.abs(expected).max())
    assert np.abs(actual - captured[f"blocks.{layer}.{point}"]).max() > 1e-3, "the edit changed nothing"
    # The block before is untouched, and the next block reads the edited stream.
    assert np.array_equal(np.asarray(cache[f"blocks.{layer - 1}.hook_resid_post"], dtype=np.float64),
                          captured[f"blocks.{layer - 1}.hook_resid_post"])
    if point == "hook_resid_post":
        assert np.array_equal(cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"])


@pytest.mark.parametrize("index", [1, 2, 3], ids=["add-post", "scale", "ablate"])
def test_last_layer_edit_matches_reference_logits(tiny, batch, unsteered, index):
    ids, mask = batch
    _, captured = unsteered
    last = tiny.config.num_hidden_layers - 1
    operation, point, vector = operations(tiny.config.hidden_size)[index]
    intervention = Intervention(last, operation, vector, alpha=1.3, point=point)
    logits = np.asarray(tiny.forward(ids, mask, interventions=intervention))
    edited = reference_edit(operation, point, vector, 1.3, captured[f"blocks.{last}.hook_resid_pre"],
                            captured[f"blocks.{last}.hook_resid_post"])
    expected = reference_logits(tiny, edited)
    valid = mask.astype(bool)
    assert np.abs(logits[valid] - expected[valid]).max() <= ATOL * max(1.0, np.abs(expected).max())


def test_add_after_block_equals_add_before_next(tiny, batch):
    ids, mask = batch
    vector = random_vector(tiny.config.hidden_size, 5)
    after = np.asarray(tiny.forward(ids, mask, interventions=Intervention(0, "add", vector, 1.1)))
    before = np.asarray(tiny.forward(ids, mask, interventions=Intervention(1, "add", vector, 1.1,
                                                                           point="hook_resid_pre")))
    assert np.abs(after - before).max() <= ATOL * max(1.0, np.abs(after).max())


def test_scale_metrics_match_edited_components(tiny, batch, unsteered):
    """The metrics of a scaled layer measure the edited update and its edited components."""
    ids, mask = batch
    _, captured = unsteered
    layer, alpha = 1, 1.5
    basis = random_vector(tiny.config.hidden_size, 6, rows=2)
    plain = analyze(tiny, ids, mask)
    steered = analyze(tiny, ids, mask, calibration=plain.calibration,
                      interventions=Intervention(layer, "scale", basis, alpha=alpha))
    edit = np.eye(basis.shape[1]) + alpha * projector(basis)
    update = (captured[f"blocks.{layer}.hook_resid_post"] - captured[f"blocks.{layer}.hook_resid_pre"]) @ edit
    heads = captured[f"blocks.{layer}.attn.hook_result"] @ edit
    mlp = captured[f"blocks.{layer}.hook_mlp_out"] @ edit
    components = np.concatenate([heads, mlp[:, :, None, :]], axis=2)
    for row in range(ids.shape[0]):
        valid = mask[row].astype(bool)
        expected_energy = metrics_reference.energy(update[row], valid)
        expected_complexity = metrics_reference.complexity_components(components[row], valid)
        np.testing.assert_allclose(steered.energy[row, layer], expected_energy, rtol=1e-5, atol=ATOL)
        np.testing.assert_allclose(steered.complexity[row, layer], expected_complexity, rtol=1e-4, atol=1e-4)
    assert np.nanmax(np.abs(steered.energy[:, layer] - plain.energy[:, layer])) > 1e-3


def test_added_vector_is_not_part_of_the_update(tiny, batch):
    ids, mask = batch
    plain = analyze(tiny, ids, mask)
    steered = analyze(tiny, ids, mask, calibration=plain.calibration,
                      interventions=Intervention(1, "add", random_vector(tiny.config.hidden_size, 7), 2.0))
    for layer in (0, 1):
        assert np.array_equal(steered.energy[:, layer], plain.energy[:, layer], equal_nan=True), layer
    assert np.nanmax(np.abs(steered.energy[:, 2] - plain.energy[:, 2])) > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer=0, operation="rotate", vector=np.ones(4)), "operation"),
        (dict(layer=0, operation="add", vector=np.ones(4), alpha=float("inf")), "alpha"),
        (dict(layer=0, operation="scale", vector=np.ones(4), point="hook_resid_pre"), "hook_resid_post"),
        (dict(layer=-1, operation="add", vector=np.ones(4)), "layer"),
        (dict(layer=0, operation="add", vector=np.full(4, np.nan)), "non-finite"),
    ],
)
def test_intervention_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Intervention(**kwargs)


def test_compile_rejects_layer_and_width():
    with pytest.raises(ValueError, match="out of range"):
        compile_interventions(Intervention(5, "add", np.ones(8)), num_layers=3, width=8)
    with pytest.raises(ValueError, match="width"):
        compile_interventions(Intervention(0, "add", np.ones(4)), num_layers=3, width=8)


# --- directions -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directions(tiny):
    ids = random_ids(16, 20, tiny.config.vocab_size, seed=12)
    return derive_directions(tiny, input_ids=ids, rank=3, batch_size=16), ids


def test_directions_match_numpy_reference(tiny, directions):
    found, ids = directions
    names = [f"blocks.{layer}.{point}" for layer in found.layers for point in ("hook_resid_pre", "hook_resid_post")]
    result = analyze(tiny, ids, names_filter=names, sequence_complexity=False)
    labels_BLT = np.asarray(modes.label_modes(result.energy, result.expansion, result.complexity, found.calibration,
                                              result.valid))
    for slot, layer in enumerate(found.layers):
        updates = (result.cache[f"blocks.{layer}.hook_resid_post"].astype(np.float64)
                   - result.cache[f"blocks.{layer}.hook_resid_pre"].astype(np.float64)).reshape(-1, tiny.config.hidden_size)
        labels = labels_BLT[:, layer].reshape(-1)
        for column, code in enumerate((1, 2, 3)):
            chosen = labels == code
            assert found.counts[slot, column] == chosen.sum()
            if not chosen.any():
                continue
            expected = updates[chosen].mean(0) - updates[~chosen].mean(0)
            np.testing.assert_allclose(found.mean_difference[slot, column], expected, rtol=1e-4, atol=1e-5)
            basis = found.basis[slot, column][found.singular_values[slot, column] > 0].astype(np.float64)
            np.testing.assert_allclose(basis @ basis.T, np.eye(basis.shape[0]), atol=1e-5)
            # The basis spans the top singular directions of the mode's updates.
            _, sigma, vt = np.linalg.svd(updates[chosen], full_matrices=False)
            top = vt[: basis.shape[0]]
            np.testing.assert_allclose(projector(basis), projector(top), atol=1e-3)


def test_directions_save_load_round_trip(tiny, directions, tmp_path):
    found, _ = directions
    path = tmp_path / "directions.npz"
    found.save(path)
    loaded = ModeDirections.load(path, model=tiny)
    for name in ("mean_difference", "basis", "singular_values", "counts", "mean_update_norm"):
        assert np.array_equal(getattr(loaded, name), getattr(found, name)), name
    assert loaded.layers == found.layers
    assert loaded.options == found.options
    assert loaded.calibration.to_dict() == found.calibration.to_dict()
    assert loaded.model == found.model


def test_directions_reject_other_config(directions, tiny_tied, tmp_path):
    found, _ = directions
    path = tmp_path / "directions.npz"
    found.save(path)
    other = jresid.from_pretrained(tiny_tied.path)
    with pytest.raises(DirectionsError, match="fingerprint"):
        ModeDirections.load(path, model=other)


def test_directions_reject_other_weights(directions, tiny_untied, tmp_path):
    from safetensors.numpy import load_file, save_file

    found, _ = directions
    copy = tmp_path / "perturbed"
    shutil.copytree(tiny_untied.path, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 0.5
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    other = jresid.from_pretrained(copy)
    with pytest.raises(DirectionsError, match="weights differ"):
        found.check_model(other)


def test_directions_reject_unknown_mode_and_layer(directions):
    found, _ = directions
    with pytest.raises(ValueError, match="mode"):
        found.direction("planning", 0)
    with pytest.raises(ValueError, match="layers"):
        found.direction("recall", 7)


# --- learned vectors ------------------------------------------------------------------------------------------


def test_learned_loss_gradient_is_finite(tiny, batch, directions):
    found, _ = directions
    ids, mask = batch
    for seed in (None, 8):
        vector = np.zeros(tiny.config.hidden_size) if seed is None else random_vector(tiny.config.hidden_size, seed)
        loss, signature, kl, grad = loss_of(tiny, vector, ids, mask, layer=0, mode="reasoning",
                                            calibration=found.calibration)
        assert np.isfinite([loss, signature, kl]).all()
        assert np.isfinite(grad).all()
        assert np.abs(grad).max() > 0


def test_learned_vector_reduces_its_loss(tiny, batch, directions):
    found, _ = directions
    ids, mask = batch
    learned = learn_steering_vector(tiny, ids, mask, layer=0, mode="reasoning", calibration=found.calibration,
                                    steps=12, max_norm=2.0)
    start = loss_of(tiny, np.zeros(tiny.config.hidden_size), ids, mask, layer=0, mode="reasoning",
                    calibration=found.calibration)[0]
    end = loss_of(tiny, learned.vector, ids, mask, layer=0, mode="reasoning", calibration=found.calibration)[0]
    assert end < start
    assert np.linalg.norm(learned.vector) <= 2.0 * (1 + 1e-5)
    assert len(learned.history) <= 12


def test_learn_rejects_last_block_output(tiny, batch, directions):
    found, _ = directions
    ids, mask = batch
    last = tiny.config.num_hidden_layers - 1
    with pytest.raises(ValueError, match="no later block"):
        learn_steering_vector(tiny, ids, mask, layer=last, mode="recall", calibration=found.calibration)


# --- the command line on the shipped model ---------------------------------------------------------------------

needs_shipped = pytest.mark.skipif(not os.path.isdir(cli.default_model_path()),
                                   reason=f"the shipped model is missing at {cli.default_model_path()}")
PROMPT = "Ana lives in Oslo. Ben lives in Lima. Where does Ben live?"


def shift_rows(printed: str) -> dict[int, list[float]]:
    """Parse the per-layer metric shift table printed by `jresid steer`."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric shift")) + 2
    rows = {}
    for line in lines[start:]:
        fields = line.split()
        if not fields:
            break
        rows[int(fields[0])] = [float(value) for value in fields[1:]]
    return rows


@pytest.fixture(scope="module")
def shipped_directions(tmp_path_factory):
    if not os.path.isdir(cli.default_model_path()):
        pytest.skip("the shipped model is missing")
    path = tmp_path_factory.mktemp("steer") / "directions.npz"
    code = cli.main(["steer", "--mode", "reasoning", "--layer", "1", "--alpha", "0", "--prompt", PROMPT,
                     "--max-new-tokens", "6", "--save-directions", str(path)])
    assert code == 0
    return path


@needs_shipped
def test_steer_alpha_zero_changes_nothing(shipped_directions, capsys):
    code = cli.main(["steer", "--mode", "recall", "--layer", "2", "--alpha", "0", "--prompt", PROMPT,
                     "--directions", str(shipped_directions), "--max-new-tokens", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "unsteered" in printed
    assert "| steered" in printed
    assert "0 of 8 generated tokens differ" in printed
    rows = shift_rows(printed)
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(value == 0 for values in rows.values() for value in values)


@needs_shipped
def test_steer_shifts_only_later_layers(shipped_directions, capsys):
    code = cli.main(["steer", "--mode", "reasoning", "--layer", "1", "--alpha", "3", "--prompt", PROMPT,
                     "--directions", str(shipped_directions), "--max-new-tokens", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loaded from" in printed
    rows = shift_rows(printed)
    assert all(value == 0 for layer in (0, 1) for value in rows[layer])
    assert any(value != 0 for value in rows[2])


@needs_shipped
def test_steer_scale_operation(shipped_directions, capsys):
    code = cli.main(["steer", "--mode", "recall", "--layer", "2", "--alpha", "2", "--operation", "scale",
                     "--prompt", PROMPT, "--directions", str(shipped_directions), "--max-new-tokens", "4"])
    assert code == 0
    rows = shift_rows(capsys.readouterr().out)
    assert all(value == 0 for value in rows[1])
    assert rows[2][0] > 0, "scaling a subspace component up raises the layer's mean energy"


@needs_shipped
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--mode", "planning"], "--mode 'planning' is invalid"),
        (["--layer", "9"], "--layer 9 is out of range"),
        (["--alpha", "nan"], "--alpha 'nan' is not finite"),
        (["--alpha", "inf"], "--alpha 'inf' is not finite"),
        (["--prompt", "   "], "the prompt is empty"),
        (["--operation", "scale", "--point", "hook_resid_pre"], "needs --point hook_resid_post"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid"),
        (["--directions", "missing.npz"], "directions file not found"),
    ],
)
def test_steer_rejects_bad_input_before_loading(arguments, message, capsys, monkeypatch):
    def fail(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", fail)
    base = {"--mode": "reasoning", "--layer": "1", "--alpha": "1", "--prompt": PROMPT}
    for flag, value in zip(arguments[::2], arguments[1::2]):
        base[flag] = value
    argv = ["steer"] + [item for pair in base.items() for item in pair]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("jresid: error: ")
    assert message in err[0]


@needs_shipped
def test_steer_bad_input_exit_code_in_process():
    done = subprocess.run([sys.executable, "-m", "jresid.cli", "steer", "--mode", "reasoning", "--layer", "42",
                           "--alpha", "1", "--prompt", PROMPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"jresid: error: --layer 42 is out of range for {cli.default_model_path()}, which has 4 blocks; use 0 to 3"
    ]
