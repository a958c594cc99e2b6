"""jresid.generate: cached decoding against recomputing the full forward pass, sampling, padding, stopping."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid.cli import default_model_path  # noqa: E402
from jresid.generate import generate, left_pad  # noqa: E402
from jresid.interventions import Intervention  # noqa: E402
from jresid.pretrained import pad_token_ids  # noqa: E402

# Cached decoding attends over T + N slots one query at a time while the full
# forward runs T x T products, so the float32 sums run in another order. The
# differences measured on these checkpoints stay below 1e-5 times the largest
# logit of the step (at most 7e-7 times it on the shipped model).
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tiny_untied):
    return jresid.from_pretrained(tiny_untied.path)


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    if not os.path.isdir(path):
        pytest.skip(f"the shipped model is missing at {path}")
    return jresid.from_pretrained(path)


def ragged_prompts(vocab: int, lengths=(5, 9, 2), seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, vocab, size=n).tolist() for n in lengths]
    return pad_token_ids(sequences, padding_side="right")


def recompute_step(model, result, step, interventions=None):
    """Logits of the full forward pass for the token after `step` new ones, `[B, V]`.

    The sequence is right-padded to the final length, so every step runs one
    compiled program; causal attention keeps the padding out of the logits.
    """
    rows, steps = result.tokens.shape
    ids = np.concatenate([result.prompt_ids, result.tokens], axis=1)
    new_mask = (np.arange(steps) < step).astype(np.int32)
    mask = np.concatenate([result.prompt_mask, np.broadcast_to(new_mask, (rows, steps))], axis=1)
    logits = np.asarray(model.forward(ids, mask, interventions=interventions))
    return logits[:, result.prompt_ids.shape[1] + step - 1]


def assert_cached_equals_recomputed(model, result):
    """Recompute the full forward pass for every new token and compare logits and choices."""
    for step in range(result.tokens.shape[1]):
        full_BV = recompute_step(model, result, step)
        cached_BV = result.logits[:, step]
        scale = max(1.0, float(np.abs(full_BV).max()))
        worst = float(np.abs(cached_BV - full_BV).max())
        assert worst <= RELATIVE_TOLERANCE * scale, f"step {step}: logits differ by {worst} (largest logit {scale})"
        assert np.array_equal(full_BV.argmax(-1), result.tokens[:, step]), f"step {step}: argmax differs"


def test_cached_greedy_matches_full_forward_tiny(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size)
    result = generate(tiny, ids, mask, max_new_tokens=6, return_logits=True)
    assert result.tokens.shape == (3, 6)
    assert_cached_equals_recomputed(tiny, result)


def test_cached_greedy_matches_full_forward_shipped(shipped):
    ids, mask = shipped.tokenize(["List: sun moon tree. Again:", "7 + 5 =", "Ana lives in Oslo. Where does Ana live?"])
    result = generate(shipped, ids, mask, max_new_tokens=8, return_logits=True)
    assert_cached_equals_recomputed(shipped, result)


def test_cached_steered_matches_full_forward(tiny):
    rng = np.random.default_rng(3)
    width = tiny.config.hidden_size
    interventions = [
        Intervention(0, "add", rng.normal(size=width), alpha=0.7, point="hook_resid_pre"),
        Intervention(1, "scale", rng.normal(size=(2, width)), alpha=1.5),
        Intervention(2, "add", rng.normal(size=width), alpha=-0.4),
    ]
    ids, mask = ragged_prompts(tiny.config.vocab_size, seed=1)
    steered = generate(tiny, ids, mask, max_new_tokens=5, interventions=interventions, return_logits=True)
    plain = generate(tiny, ids, mask, max_new_tokens=5, return_logits=True)
    assert not np.allclose(steered.logits, plain.logits), "the interventions changed nothing"
    for step in range(5):
        full_BV = recompute_step(tiny, steered, step, interventions)
        scale = max(1.0, float(np.abs(full_BV).max()))
        assert np.abs(steered.logits[:, step] - full_BV).max() <= RELATIVE_TOLERANCE * scale
        assert np.array_equal(full_BV.argmax(-1), steered.tokens[:, step])


def test_batched_rows_equal_single_rows(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size, lengths=(6, 2), seed=2)
    batched = generate(tiny, ids, mask, max_new_tokens=6)
    for row in range(ids.shape[0]):
        alone = generate(tiny, ids[row][mask[row] == 1], max_new_tokens=6)
        assert np.array_equal(alone.tokens[0], batched.tokens[row]), f"row {row}"


def test_left_pad_moves_real_tokens_right():
    ids = np.array([[5, 6, 0, 0], [0, 7, 0, 8]])
    mask = np.array([[1, 1, 0, 0], [0, 1, 0, 1]])
    out_ids, out_mask = left_pad(ids, mask)
    assert out_ids.tolist() == [[0, 0, 5, 6], [0, 0, 7, 8]]
    assert out_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_sampling_is_seeded(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size, seed=4)
    settings = dict(max_new_tokens=8, temperature=2.0)
    first = generate(tiny, ids, mask, key=7, **settings)
    again = generate(tiny, ids, mask, key=7, **settings)
    other = generate(tiny, ids, mask, key=8, **settings)
    assert np.array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


def test_top_k_one_is_greedy(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size, seed=5)
    greedy = generate(tiny, ids, mask, max_new_tokens=6)
    sampled = generate(tiny, ids, mask, max_new_tokens=6, temperature=1.0, top_k=1, key=3)
    assert np.array_equal(greedy.tokens, sampled.tokens)


def test_top_k_samples_only_top_tokens(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size, seed=6)
    result = generate(tiny, ids, mask, max_new_tokens=6, temperature=5.0, top_k=3, key=1, return_logits=True)
    top3 = np.argsort(-result.logits, axis=-1)[..., :3]
    assert (top3 == result.tokens[..., None]).any(-1).all()


def test_eos_stops_row(tiny):
    ids, mask = ragged_prompts(tiny.config.vocab_size, seed=7)
    free = generate(tiny, ids, mask, max_new_tokens=6)
    eos = int(free.tokens[0, 2])
    stopped = generate(tiny, ids, mask, max_new_tokens=6, eos_token_id=eos)
    first_eos = int(np.flatnonzero(free.tokens[0] == eos)[0])
    assert stopped.lengths[0] == first_eos + 1
    assert (stopped.tokens[0, first_eos:] == eos).all()
    assert np.array_equal(stopped.tokens[0, :first_eos], free.tokens[0, :first_eos])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=2, top_k=-1), "top_k"),
        (dict(max_new_tokens=2000), "max_position_embeddings"),
    ],
)
def test_generate_rejects_bad_settings(tiny, settings, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny, [1, 2, 3], **settings)
