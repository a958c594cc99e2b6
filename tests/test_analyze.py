"""jresid.analyze: the fused program against the metric functions applied to captures."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402

import jresid  # noqa: E402
from jresid import modes  # noqa: E402
from jresid.analyze import METRIC_NAMES, analyze, bucket_length, compile_count  # noqa: E402
from jresid.metrics import MetricOptions, layer_metrics  # noqa: E402
from tests.hf_checkpoints import random_ids  # noqa: E402

ATOL = 2e-5


def metrics_from_cache(cache, mask, num_layers, options: MetricOptions):
    """Apply the standalone metric functions to captured activations, layer by layer."""
    out = {name: [] for name in (*METRIC_NAMES, "sequence_complexity")}
    valid = np.asarray(mask, dtype=bool)
    for layer in range(num_layers):
        u = np.asarray(cache["resid_post", layer], np.float32) - np.asarray(cache["resid_pre", layer], np.float32)
        components = np.concatenate(
            [np.asarray(cache["result", layer], np.float32), np.asarray(cache["mlp_out", layer], np.float32)[:, :, None]],
            axis=2,
        )
        per_layer = jax.vmap(lambda u_, v_, c_: layer_metrics(u_, v_, c_, options))(u, valid, components)
        for name in out:
            out[name].append(np.asarray(getattr(per_layer, name)))
    return {name: np.stack(values, axis=1) for name, values in out.items()}


def assert_metrics_close(ours, theirs, where):
    for name in (*METRIC_NAMES, "sequence_complexity"):
        a, b = getattr(ours, name) if not isinstance(ours, dict) else ours[name], theirs[name]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{where}: NaN pattern of {name}")
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4, equal_nan=True, err_msg=f"{where}: {name}")


@pytest.fixture(scope="module")
def model(tiny_untied):
    return jresid.from_pretrained(tiny_untied.path)


@pytest.fixture(scope="module")
def batch():
    ids = random_ids(3, 120, 256, seed=4)
    mask = np.ones_like(ids)
    mask[1, :30] = 0   # left padding
    mask[2, 90:] = 0   # right padding
    return ids, mask


@pytest.mark.parametrize("options", [
    {},
    {"history": "full", "rank_measure": "numerical"},
    {"history": "ema", "complexity_basis": "window", "rank_measure": "stable"},
    {"complexity_basis": "sequence", "rank_measure": "participation", "window": 3},
])
def test_fused_equals_metrics_of_captures(model, batch, options):
    ids, mask = batch
    if options.get("history") == "full":
        # Past D = 64 positions the full history spans the whole space and
        # expansion depends on singular values near the rtol cut.
        ids, mask = ids[:, :48], mask[:, :48]
    result = analyze(model, ids, mask, **options)
    _, cache = model.run_with_cache(ids, mask)
    expected = metrics_from_cache(cache, mask, model.config.num_hidden_layers, result.options)
    assert_metrics_close(result, expected, f"options {options}")


def test_shapes_and_padding(model, batch):
    ids, mask = batch
    result = analyze(model, ids, mask)
    B, T = ids.shape
    L = model.config.num_hidden_layers
    for name in METRIC_NAMES:
        values = getattr(result, name)
        assert values.shape == (B, L, T), name
        assert np.isnan(values[~np.broadcast_to(mask[:, None, :].astype(bool), values.shape)]).all(), \
            f"{name} is not NaN at padding"
        assert np.isfinite(values[0, :, 1:]).all(), f"{name} has NaN or inf at a real token"
    assert result.mode.shape == (B, L, T)
    assert (result.mode[~np.broadcast_to(mask[:, None, :].astype(bool), result.mode.shape)] == 0).all()
    assert result.sequence_complexity.shape == (B, L)
    assert result.options == MetricOptions(sequence_complexity=True)


def test_padding_does_not_change_metrics(model, batch):
    ids, mask = batch
    result = analyze(model, ids, mask)
    alone = analyze(model, ids[1:2, 30:], calibration=result.calibration)
    for name in METRIC_NAMES:
        np.testing.assert_allclose(getattr(result, name)[1][:, 30:], getattr(alone, name)[0], atol=ATOL,
                                   rtol=1e-4, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(result.mode[1][:, 30:], alone.mode[0])


def test_captures_alongside(model, batch):
    ids, mask = batch
    result = analyze(model, ids, mask, names_filter=["blocks.1.hook_resid_post"])
    _, cache = model.run_with_cache(ids, mask, names_filter=["blocks.1.hook_resid_post"])
    assert list(result.cache) == ["blocks.1.hook_resid_post"]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(result.cache["blocks.1.hook_resid_post"])[real],
                               np.asarray(cache["blocks.1.hook_resid_post"])[real], atol=1e-6)


def modes_numpy(energy, expansion, complexity, valid):
    """Plain NumPy terciles and signature table."""
    B, L, T = energy.shape
    labels = np.zeros((B, L, T), dtype=np.int8)
    for layer in range(L):
        levels = []
        for values in (expansion, complexity, energy):
            pooled = values[:, layer][valid & np.isfinite(expansion[:, layer]) & np.isfinite(complexity[:, layer])
                                      & np.isfinite(energy[:, layer])]
            pooled_metric = values[:, layer][valid & np.isfinite(values[:, layer])]
            del pooled
            lower, upper = np.quantile(pooled_metric, [1 / 3, 2 / 3])
            level = np.where(values[:, layer] <= lower, 0, np.where(values[:, layer] <= upper, 1, 2))
            level[~np.isfinite(values[:, layer])] = -1
            levels.append(level)
        x, c, e = levels
        labels[:, layer][(x == 0) & (c == 0) & (e == 0)] = 1
        labels[:, layer][(x == 2) & (c == 0) & (e == 1)] = 2
        labels[:, layer][(x == 2) & (c == 2) & (e == 2)] = 3
        labels[:, layer][~valid] = 0
    return labels


def test_modes_match_numpy(model, batch):
    ids, mask = batch
    result = analyze(model, ids, mask)
    expected = modes_numpy(result.energy, result.expansion, result.complexity, mask.astype(bool))
    np.testing.assert_array_equal(result.mode, expected)
    assert set(np.unique(result.mode)) <= set(range(len(modes.MODE_NAMES)))


def test_calibration_file_round_trip(model, batch, tmp_path):
    ids, mask = batch
    first = analyze(model, ids, mask)
    path = tmp_path / "calibration.json"
    first.calibration.save(path)
    again = analyze(model, ids[:1], calibration=str(path))
    np.testing.assert_array_equal(again.mode[0], first.mode[0])
    loaded = modes.Calibration.load(path)
    np.testing.assert_allclose(loaded.energy, first.calibration.energy)


def test_calibration_for_other_model_rejected(model, batch, tmp_path):
    ids, mask = batch
    import dataclasses

    found = analyze(model, ids, mask).calibration
    calibration = dataclasses.replace(found, energy=found.energy[:1], expansion=found.expansion[:1],
                                      complexity=found.complexity[:1], tokens=found.tokens[:1])
    with pytest.raises(modes.CalibrationError, match="1 layers but the model has 3"):
        analyze(model, ids, mask, calibration=calibration)


@pytest.mark.parametrize("options, message", [
    ({"history": "sliding"}, "history='sliding' is invalid"),
    ({"window": 0}, "window"),
    ({"rank_measure": "trace"}, "rank_measure"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_options_rejected(model, batch, options, message):
    ids, mask = batch
    with pytest.raises((ValueError, TypeError), match=message):
        analyze(model, ids, mask, **options)


def test_bucketed_lengths_bound_compilations(model):
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 3000)] == [16, 16, 32, 128, 1024, 2048, 3072]
    before = compile_count()
    rng = np.random.default_rng(0)
    for length in (20, 21, 25, 31, 32):
        analyze(model, rng.integers(0, 256, size=(1, length)))
    assert compile_count() - before <= 1


def test_metrics_match_transformer_lens_cache(tiny_untied, model, batch):
    pytest.importorskip("transformer_lens")
    from jresid import reference

    ids, _ = batch
    ids = ids[:2, :100]
    mask = np.ones_like(ids)
    hooked = reference.load_hooked_transformer(tiny_untied.path)
    names = [f"blocks.{l}.{p}" for l in range(3) for p in
             ("hook_resid_pre", "hook_resid_post", "attn.hook_result", "hook_mlp_out")]
    _, tl_cache = reference.run_reference(hooked, ids, mask, names=names)
    cache = {name: np.asarray(value) for name, value in tl_cache.items()}
    ours = analyze(model, ids, mask)
    expected = metrics_from_cache(jresid.ActivationCache(cache), mask, 3, ours.options)
    assert_metrics_close(ours, expected, "TransformerLens cache")


def random_components(seed: int, B: int, T: int, H: int, E: int, D: int):
    """Return float32 head outputs z `[B, T, H, E]`, an output kernel `[H, E, D]` and MLP outputs `[B, T, D]`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, T, H, E)).astype(np.float32)
    w = rng.normal(size=(H, E, D)).astype(np.float32)
    mlp = rng.normal(size=(B, T, D)).astype(np.float32)
    return z, w, mlp


def test_component_gram_matches_explicit_rows():
    from jresid.analyze import component_gram

    B, T, H, E, D = 2, 5, 3, 4, 6
    z, w, mlp = random_components(11, B, T, H, E, D)

    gram = np.asarray(component_gram(z, w, mlp))

    rows = np.concatenate([np.einsum("bthe,hed->bthd", z.astype(np.float64), w.astype(np.float64)),
                           mlp.astype(np.float64)[:, :, None, :]], axis=2)
    expected = np.einsum("btrd,btsd->btrs", rows, rows)
    assert gram.shape == (B, T, H + 1, H + 1)
    np.testing.assert_allclose(gram, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_component_gram_with_given_products():
    from jresid.analyze import component_gram, head_products

    B, T, H, E, D = 1, 4, 3, 2, 5
    z, w, mlp = random_components(12, B, T, H, E, D)

    products = np.asarray(head_products(w))
    w64 = w.astype(np.float64)
    expected = np.einsum("hed,gfd->hegf", w64, w64).reshape(H, E, H * E)
    np.testing.assert_allclose(products, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(component_gram(z, w, mlp, products)),
                               np.asarray(component_gram(z, w, mlp)), rtol=1e-6, atol=1e-6)


def test_output_products_cached_per_model(tiny_untied):
    import jax.numpy as jnp

    from jresid.analyze import head_products, output_products

    tiny_model = jresid.from_pretrained(tiny_untied.path)
    first = output_products(tiny_model)
    assert output_products(tiny_model) is first
    kernel = np.asarray(tiny_model.module.blocks.attn.o_kernel[...])
    assert first.shape == (kernel.shape[0], kernel.shape[1], kernel.shape[2], kernel.shape[1] * kernel.shape[2])
    for layer in range(kernel.shape[0]):
        np.testing.assert_array_equal(np.asarray(first[layer]), np.asarray(head_products(kernel[layer])))

    # New weights give new products.
    attn = tiny_model.module.blocks.attn
    original = attn.o_kernel[...]
    try:
        attn.o_kernel[...] = 2.0 * original
        doubled = output_products(tiny_model)
        np.testing.assert_allclose(np.asarray(doubled), 4.0 * np.asarray(first), rtol=1e-6)
    finally:
        attn.o_kernel[...] = original
    assert jnp.array_equal(output_products(tiny_model), first)
