"""Analysis one block at a time against the analysis of the loaded model."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid.analyze import METRIC_NAMES, analyze  # noqa: E402
from tests.hf_checkpoints import random_ids  # noqa: E402


def padded_batch(vocab_size: int, seed: int):
    ids = random_ids(3, 70, vocab_size, seed=seed)
    mask = np.ones_like(ids)
    mask[1, :20] = 0   # left padding
    mask[2, 50:] = 0   # right padding
    return ids, mask


def assert_results_close(streamed, loaded, atol: float):
    for name in (*METRIC_NAMES, "sequence_complexity"):
        a, b = getattr(streamed, name), getattr(loaded, name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"NaN pattern of {name}")
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(streamed.valid, loaded.valid)
    np.testing.assert_array_equal(streamed.input_ids, loaded.input_ids)


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied", "tiny_sharded"])
def test_streamed_equals_loaded(fixture, request):
    built = request.getfixturevalue(fixture)
    model = jresid.from_pretrained(built.path)
    streamed = jresid.stream_pretrained(built.path)
    ids, mask = padded_batch(model.config.vocab_size, seed=5)

    loaded_result = analyze(model, ids, mask)
    streamed_result = streamed.analyze(ids, mask)
    assert_results_close(streamed_result, loaded_result, atol=2e-5)


def test_streamed_modes_with_shared_calibration(tiny_untied):
    model = jresid.from_pretrained(tiny_untied.path)
    streamed = jresid.stream_pretrained(tiny_untied.path)
    ids, mask = padded_batch(model.config.vocab_size, seed=6)
    calibration = analyze(model, ids, mask).calibration

    loaded_result = analyze(model, ids, mask, calibration=calibration)
    streamed_result = streamed.analyze(ids, mask, calibration=calibration)
    # Labels compare metrics with boundaries, so a value within rounding of a boundary may flip.
    agreement = np.mean(streamed_result.mode == loaded_result.mode)
    assert agreement >= 0.99


def test_streamed_options_reach_the_metrics(tiny_untied):
    model = jresid.from_pretrained(tiny_untied.path)
    streamed = jresid.stream_pretrained(tiny_untied.path)
    ids, mask = padded_batch(model.config.vocab_size, seed=7)
    options = {"history": "full", "complexity_basis": "window", "rank_measure": "numerical"}

    streamed_result = streamed.analyze(ids, mask, **options)
    assert streamed_result.options == jresid.MetricOptions(sequence_complexity=True, **options)
    # Expansions near 0 over the full history amplify the blocks' float32 rounding.
    assert_results_close(streamed_result, analyze(model, ids, mask, **options), atol=1e-4)


def test_streamed_bfloat16(tiny_bf16):
    model = jresid.from_pretrained(tiny_bf16.path)
    streamed = jresid.stream_pretrained(tiny_bf16.path)
    assert streamed.dtype == model.dtype
    ids, mask = padded_batch(model.config.vocab_size, seed=8)
    streamed_result = streamed.analyze(ids, mask)
    loaded_result = analyze(model, ids, mask)
    # Both run the same bfloat16 blocks, so only float32 rounding in the metrics differs.
    np.testing.assert_allclose(streamed_result.energy, loaded_result.energy, rtol=1e-3, equal_nan=True)


def test_embedding_rows_match_the_table(tiny_untied):
    model = jresid.from_pretrained(tiny_untied.path)
    streamed = jresid.stream_pretrained(tiny_untied.path)
    ids = np.array([[0, 5, 5, model.config.vocab_size - 1]])
    rows = streamed.checkpoint.read_embedding_rows(ids, streamed.dtype)
    table = np.asarray(model.module.embed.embedding[...])
    np.testing.assert_array_equal(rows, table[ids])


def test_block_weights_match_the_loaded_model(tiny_untied):
    model = jresid.from_pretrained(tiny_untied.path)
    streamed = jresid.stream_pretrained(tiny_untied.path)
    params = streamed.checkpoint.read_layer(2, streamed.dtype)
    np.testing.assert_array_equal(params["attn.o_kernel"], np.asarray(model.module.blocks.attn.o_kernel[...][2]))
    np.testing.assert_array_equal(params["mlp.down_kernel"], np.asarray(model.module.blocks.mlp.down_kernel[...][2]))


@pytest.mark.parametrize("argument", ["names_filter", "interventions"])
def test_streamed_rejects_captures_interventions(tiny_untied, argument):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match=f"{argument} is not supported when streaming"):
        streamed.analyze(np.array([[1, 2, 3]]), **{argument: ["blocks.0.hook_resid_pre"]})


def test_streamed_rejects_bad_input(tiny_untied):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        streamed.analyze(np.array([[1, streamed.config.vocab_size]]))
    with pytest.raises(ValueError, match="window=0 is invalid"):
        streamed.analyze(np.array([[1, 2]]), window=0)


def test_layer_out_of_range(tiny_untied):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match="layer 99 is out of range"):
        streamed.checkpoint.read_layer(99, streamed.dtype)


def test_missing_folder(tmp_path):
    with pytest.raises(jresid.ConfigError, match="model folder not found"):
        jresid.stream_pretrained(tmp_path / "absent")


def test_misspelt_option_gets_a_suggestion(tiny_untied):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match="'histroy' \\(did you mean 'history'\\?\\)"):
        streamed.analyze(np.array([[1, 2, 3]]), histroy="full")
    model = jresid.from_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match="did you mean 'window'"):
        analyze(model, np.array([[1, 2, 3]]), windw=4)


def test_text_and_ragged_ids_rejected(tiny_untied):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match="tokenise it first with model.tokenize"):
        streamed.analyze(["Ana lives in Oslo."])
    with pytest.raises(ValueError, match="pad rows of different lengths with jresid.pad_token_ids"):
        streamed.analyze([[1, 2, 3], [4, 5]])


def test_calibration_with_other_options_warns(tiny_untied, caplog):
    streamed = jresid.stream_pretrained(tiny_untied.path)
    ids, mask = padded_batch(streamed.config.vocab_size, seed=9)
    calibration = streamed.analyze(ids, mask).calibration
    with caplog.at_level("WARNING", logger="jresid.analyze"):
        streamed.analyze(ids, mask, calibration=calibration)
    assert "other metric options" not in caplog.text
    with caplog.at_level("WARNING", logger="jresid.analyze"):
        streamed.analyze(ids, mask, calibration=calibration, history="full")
    assert "history='full' (calibration: 'window')" in caplog.text


def test_streamed_tokenize_matches_loaded():
    from jresid.cli import default_model_path

    path = default_model_path()
    if not (os.path.isdir(path) and os.listdir(path)):
        pytest.skip(f"the shipped model is missing at {path}")
    texts = ["Ana lives in Oslo.", "Where does Ana live? Oslo."]
    streamed_ids, streamed_mask = jresid.stream_pretrained(path).tokenize(texts)
    loaded_ids, loaded_mask = jresid.from_pretrained(path).tokenize(texts)
    np.testing.assert_array_equal(streamed_ids, loaded_ids)
    np.testing.assert_array_equal(streamed_mask, loaded_mask)
