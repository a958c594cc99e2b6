"""Expansion: the part of an update outside the span of its history.

expansion_t = 1 - ||P u_t||^2 / ||u_t||^2, where P projects onto the history
subspace. With H the matrix whose rows are the (weighted) history updates,
the kept subspace is spanned by the right singular vectors of H with
sigma > rtol * sigma_max (and, for "ema", the smallest leading set holding
`energy_fraction` of ||H||_F^2). With G = H H^T and b = H u_t / ||u_t||,
||P u_t||^2 / ||u_t||^2 = b^T G_k^+ b, so each position needs a small Gram
block read from the layer's cosines and one symmetric eigendecomposition.

Two layouts of the per-position Gram blocks:

* slots: a fixed list of rows per position, a [T, S, S] batch. Used for
  windows of at most `MAX_SLOTS` rows and for the truncated "ema" history.
* prefix: every earlier row. Positions are cut into buckets of
  `PREFIX_BUCKET`. Position t of a bucket ending at row n uses an n x n
  block whose rows t..n-1 are removed. The work grows as T^4 / 4, against
  T^4 for one T x T block per position. Used for history="full", longer
  windows and slowly decaying "ema" histories.

The layout depends on the options alone, never on the sequence length, so
padding cannot change which computation a valid token gets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jresid.metrics.cosines import TILE, Cosines, compute_cosines, padded_length
from jresid.metrics.options import HISTORIES
from jresid.metrics.prepare import (
    PreparedUpdates,
    map_positions,
    nan_where,
    prepare_updates,
    scatter_back,
    window_indices,
)
from jresid.metrics.spectral import (
    computed_after,
    gram_from_scaled_rows,
    pinv_quadratic_form,
    row_floor,
)

# Positions per bucket of the prefix layout. It is a multiple of the cosine
# tile, so the blocks of a bucket do not depend on the padded length.
PREFIX_BUCKET = TILE

# Most history rows per position in the slot layout; longer histories use
# the prefix layout.
MAX_SLOTS = 128

# Older rows that the truncated "ema" history keeps besides its most recent
# ones: the heaviest by weighted norm, such as a first token whose update
# is thousands of times larger than the rest.
# NOTE: the truncation stays within float32 rounding only while at most this
# many older updates exceed the recent ones by more than about 3000 times.
EMA_HEAVY_SLOTS = 4


def ema_history_length(decay: float) -> int:
    """Return how many of the most recent updates the "ema" history keeps in full.

    The row i positions back has weight decay**i, so the rows from m back
    onward carry a fraction decay**(2 m) of the squared weights of an
    unbounded history. m is the smallest length for which that fraction is
    at most float32's machine epsilon (2**-23), that is below the rounding
    of the kept rows' Gram entries whenever the dropped updates are no
    larger than the kept ones. The `EMA_HEAVY_SLOTS` heaviest older rows are
    kept as well, for the updates that are larger.
    """
    eps32 = float(np.finfo(np.float32).eps)
    return max(1, math.ceil(math.log(eps32) / (2.0 * math.log(decay))))


def _uses_slots(history: str, window: int, decay: float) -> bool:
    if history == "window":
        return window <= MAX_SLOTS
    if history == "ema":
        return ema_history_length(decay) + EMA_HEAVY_SLOTS <= MAX_SLOTS
    return False


def expansion_span(history: str, window: int, decay: float, num_positions: int) -> int | None:
    """Return the cosine span expansion reads, or None when it needs every pair."""
    if history == "window" and _uses_slots(history, window, decay):
        return min(window, num_positions)
    return None


def _scaled(weights_N: jax.Array) -> jax.Array:
    """Divide history row lengths by their max; the projection does not depend on the scale."""
    largest = jax.lax.stop_gradient(jnp.max(weights_N))
    return weights_N / jnp.where(largest > 0, largest, 1.0)


def _heaviest_older_rows(prepared: PreparedUpdates, length: int, decay: float) -> jax.Array:
    """Return, per position, the `EMA_HEAVY_SLOTS` rows older than `length` with the largest weight.

    A row i has weight decay**(t - 1 - i) * ||u_i|| at position t, so the
    order among older rows, by log ||u_i|| - i log(decay), is the same for
    every t. Missing rows are marked -1.
    """
    num_positions = prepared.weight_T.shape[0]
    rows_T = jnp.arange(num_positions)
    weight_T = jax.lax.stop_gradient(prepared.weight_T)
    safe_weight_T = jnp.where(weight_T > 0, weight_T, 1.0)
    score_T = jnp.where(weight_T > 0, jnp.log(safe_weight_T) - rows_T * math.log(decay), -jnp.inf)
    older_TT = rows_T[None, :] < (rows_T[:, None] - length)
    score_TT = jnp.where(older_TT, score_T[None, :], -jnp.inf)
    slots = min(EMA_HEAVY_SLOTS, num_positions)
    best_score_TK, best_index_TK = jax.lax.top_k(score_TT, slots)
    return jnp.where(jnp.isfinite(best_score_TK), best_index_TK, -1)


def _slot_projections(
    prepared: PreparedUpdates,
    cosines: Cosines,
    index_TS: jax.Array,
    decay: float | None,
    rtol: float,
    energy_fraction: float | None,
) -> jax.Array:
    """Return ||P u_t||^2 / ||u_t||^2 for a history of the rows listed in `index_TS`.

    Negative indices mark empty slots. With `decay`, row i is weighted by
    decay**(t - 1 - i).
    """
    num_positions, num_slots = index_TS.shape

    def project(position):
        index_S = index_TS[position]
        in_use_S = index_S >= 0
        # Empty slots read the diagonal, which every cosine layout contains.
        safe_index_S = jnp.where(in_use_S, index_S, position)
        row_weight_S = jnp.where(in_use_S, prepared.weight_T[safe_index_S], 0.0)
        if decay is not None:
            distance_S = jnp.maximum(position - 1 - safe_index_S, 0).astype(row_weight_S.dtype)
            row_weight_S = row_weight_S * jnp.power(decay, distance_S)
        block_SS = cosines.lookup(safe_index_S[:, None], safe_index_S[None, :])
        gram_SS, scale_S = gram_from_scaled_rows(_scaled(row_weight_S), block_SS, row_floor(rtol))
        b_S = scale_S * cosines.lookup(safe_index_S, position)
        return pinv_quadratic_form(gram_SS, b_S, rtol, energy_fraction)

    return map_positions(project, jnp.arange(num_positions), num_slots * num_slots)


def _prefix_projections(
    prepared: PreparedUpdates,
    cosines: Cosines,
    window: int | None,
    decay: float | None,
    rtol: float,
    energy_fraction: float | None,
) -> jax.Array:
    """Return ||P u_t||^2 / ||u_t||^2 for a history of every earlier row (or the last `window`)."""
    num_positions = prepared.weight_T.shape[0]
    num_padded = padded_length(num_positions)
    weight_P = jnp.pad(prepared.weight_T, (0, num_padded - num_positions))
    projections = []
    for start in range(0, num_positions, PREFIX_BUCKET):
        rows = start + PREFIX_BUCKET
        rows_N = jnp.arange(rows)
        block_NN = computed_after(cosines.dense_PP[:rows, :rows], *projections)
        weight_N = weight_P[:rows]

        def project(position, rows_N=rows_N, block_NN=block_NN, weight_N=weight_N):
            history_N = rows_N < position
            if window is not None:
                history_N = history_N & (rows_N >= position - window)
            row_weight_N = jnp.where(history_N, weight_N, 0.0)
            if decay is not None:
                distance_N = jnp.maximum(position - 1 - rows_N, 0).astype(row_weight_N.dtype)
                row_weight_N = row_weight_N * jnp.power(decay, distance_N)
            gram_NN, scale_N = gram_from_scaled_rows(_scaled(row_weight_N), block_NN, row_floor(rtol))
            b_N = scale_N * block_NN[:, position]
            return pinv_quadratic_form(gram_NN, b_N, rtol, energy_fraction)

        positions = jnp.arange(start, min(rows, num_positions))
        projections.append(map_positions(project, positions, rows * rows))
    return jnp.concatenate(projections)


def expansion_from_cosines(
    prepared: PreparedUpdates,
    cosines: Cosines,
    *,
    history: str,
    window: int,
    decay: float,
    energy_fraction: float,
    rtol: float,
) -> jax.Array:
    """Return expansion per prepared row (valid tokens first), NaN at padding and degenerate rows.

    `cosines` must cover `expansion_span(history, window, decay, T)`.
    """
    num_positions = prepared.weight_T.shape[0]
    slots = _uses_slots(history, window, decay)
    if history == "window" and slots:
        index_TW = window_indices(num_positions, window, include_current=False)
        projection_T = _slot_projections(prepared, cosines, index_TW, None, rtol, None)
    elif history == "window":
        projection_T = _prefix_projections(prepared, cosines, window, None, rtol, None)
    elif history == "full":
        projection_T = _prefix_projections(prepared, cosines, None, None, rtol, None)
    elif history == "ema" and slots:
        length = ema_history_length(decay)
        index_TS = jnp.concatenate(
            [
                _heaviest_older_rows(prepared, length, decay),
                window_indices(num_positions, length, include_current=False),
            ],
            axis=1,
        )
        projection_T = _slot_projections(prepared, cosines, index_TS, decay, rtol, energy_fraction)
    elif history == "ema":
        projection_T = _prefix_projections(prepared, cosines, None, decay, rtol, energy_fraction)
    else:
        choices = ", ".join(repr(h) for h in HISTORIES)
        raise ValueError(f"history={history!r} is invalid; use one of {choices}")

    expansion_T = 1.0 - jnp.clip(projection_T, 0.0, 1.0)
    return nan_where(prepared.nondegenerate_T, expansion_T)


def expansion(
    u_TD: jax.Array,
    valid_T: jax.Array,
    *,
    history: str = "window",
    window: int = 8,
    decay: float = 0.9,
    energy_fraction: float = 0.99,
    rtol: float = 1e-3,
    eps: float = 1e-6,
) -> jax.Array:
    """Return 1 - ||P u_t||^2 / ||u_t||^2 per position, in [0, 1].

    Args:
        u_TD: Updates of one layer and sequence.
        valid_T: True at real tokens.
        history: "window" (span of the last `window` valid updates), "full"
            (span of every earlier valid update) or "ema". The "ema"
            subspace is the principal subspace with `energy_fraction` of the
            weighted squared norm of every earlier update, where the update
            d positions back has weight decay**(d - 1).
        window: History length for "window".
        decay: Weight per position for "ema".
        energy_fraction: Kept fraction of the squared Frobenius norm for
            "ema"; unused by the other histories.
        rtol: Singular directions with sigma <= rtol * sigma_max are dropped.
        eps: Norm at or below which an update is degenerate; degenerate
            updates add nothing to any history.

    Returns:
        Expansion per position: exactly 1 for an empty history, NaN at
        padding and at degenerate updates.
    """
    if history not in HISTORIES:
        choices = ", ".join(repr(h) for h in HISTORIES)
        raise ValueError(f"history={history!r} is invalid; use one of {choices}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid; use an integer >= 1")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay!r} is invalid; use a number in (0, 1)")
    if not 0.0 < energy_fraction <= 1.0:
        raise ValueError(f"energy_fraction={energy_fraction!r} is invalid; use a number in (0, 1]")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol={rtol!r} is invalid; use a number in (0, 1)")

    prepared = prepare_updates(u_TD, valid_T, eps)
    num_positions = prepared.valid_T.shape[0]
    cosines = compute_cosines(
        prepared.direction_TD, expansion_span(history, window, decay, num_positions)
    )
    values_T = expansion_from_cosines(
        prepared,
        cosines,
        history=history,
        window=window,
        decay=decay,
        energy_fraction=energy_fraction,
        rtol=rtol,
    )
    return scatter_back(values_T, prepared)
