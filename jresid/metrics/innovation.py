"""Innovation: how far an update's direction is from every earlier one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jresid.metrics.cosines import Cosines, compute_cosines
from jresid.metrics.prepare import (
    PreparedUpdates,
    nan_where,
    prepare_updates,
    scatter_back,
    window_indices,
)

# Below every cosine, so a masked entry never wins the max.
_NO_COSINE = -2.0


def innovation_span(window: int | None, num_positions: int) -> int | None:
    """Return the cosine span innovation reads: the window, or None for every pair."""
    return None if window is None else min(window, num_positions)


def innovation_from_cosines(prepared: PreparedUpdates, cosines: Cosines, window: int | None) -> jax.Array:
    """Return innovation per prepared row from the rows' cosines.

    Args:
        prepared: Output of `prepare_updates`.
        cosines: Cosines of the prepared rows, covering
            `innovation_span(window, T)`.
        window: Number of earlier valid updates in the history, or None for
            all of them.

    Returns:
        Innovation per prepared row (valid tokens first), NaN at padding, at
        degenerate updates and where no earlier nondegenerate update exists.
    """
    nondegenerate_T = prepared.nondegenerate_T
    num_positions = nondegenerate_T.shape[0]
    rows_T = jnp.arange(num_positions)

    if window is None:
        cosine_TT = cosines.dense_PP[:num_positions, :num_positions]
        history_TT = (rows_T[None, :] < rows_T[:, None]) & nondegenerate_T[None, :]
        best_T = jnp.max(jnp.where(history_TT, cosine_TT, _NO_COSINE), axis=-1)
        has_history_T = jnp.any(history_TT, axis=-1)
    else:
        # Slots before the first row read the diagonal, which stays in range,
        # and are then masked.
        length = min(window, num_positions)
        index_TW = window_indices(num_positions, length, include_current=False)
        in_range_TW = index_TW >= 0
        safe_index_TW = jnp.where(in_range_TW, index_TW, rows_T[:, None])
        history_TW = in_range_TW & nondegenerate_T[safe_index_TW]
        cosine_TW = cosines.lookup(rows_T[:, None], safe_index_TW)
        best_T = jnp.max(jnp.where(history_TW, cosine_TW, _NO_COSINE), axis=-1)
        has_history_T = jnp.any(history_TW, axis=-1)

    # Rounding can push a cosine of unit vectors a few ulps past +-1.
    innovation_T = jnp.clip(1.0 - best_T, 0.0, 2.0)
    return nan_where(nondegenerate_T & has_history_T, innovation_T)


def innovation(
    u_TD: jax.Array,
    valid_T: jax.Array,
    *,
    window: int | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Return 1 - max cosine between each update and its history, in [0, 2].

    The history of a token is the set of earlier valid tokens, or only the
    last `window` of them. Degenerate history updates (norm <= eps) are
    skipped by the max. An update opposite to an earlier one scores above 1:
    the cosine keeps its sign.

    Args:
        u_TD: Updates of one layer and sequence.
        valid_T: True at real tokens.
        window: Number of earlier valid updates to compare with, or None for
            all of them.
        eps: Norm at or below which an update is degenerate.

    Returns:
        Innovation per position: NaN at padding, at degenerate updates, and
        where the history contains no nondegenerate update (the first valid
        token, for instance).
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} is invalid; use an integer >= 1 or None")
    prepared = prepare_updates(u_TD, valid_T, eps)
    num_positions = prepared.valid_T.shape[0]
    cosines = compute_cosines(prepared.direction_TD, innovation_span(window, num_positions))
    values_T = innovation_from_cosines(prepared, cosines, window)
    return scatter_back(values_T, prepared)
