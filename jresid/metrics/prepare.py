"""Turn one layer's updates into unit directions and norms, valid tokens first.

Every history is defined over valid tokens in their original order, so the
metrics first move the valid tokens to the front (a stable sort on the
padding mask). After that move, a history of "the last w valid updates" is
the positional slice [t - w, t). Padding sits after every valid token, so it
never enters a history, and its amount or side cannot change the history of
a valid token. `scatter_back` returns results to the original positions.

Norms are computed from each update divided by its own largest entry. So
neither 1e20 (whose square overflows float32) nor 1e-20 (whose square
underflows) loses precision, and every Gram matrix is built from unit
directions whose entries are at most 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Return float32, or the input dtype when it is a wider float."""
    return jnp.promote_types(dtype, jnp.float32)


class PreparedUpdates(NamedTuple):
    """One layer's updates, valid tokens first.

    Attributes:
        order_T: Original position of each row; valid positions come first.
        inverse_T: Row of each original position (the inverse of `order_T`).
        valid_T: Row contains a valid token.
        nondegenerate_T: Row contains a valid token whose norm exceeds eps.
        direction_TD: Unit direction of each nondegenerate row, zero elsewhere.
        norm_T: Norm of every row, padding included.
        weight_T: Norm of nondegenerate rows and zero elsewhere: the row's
            length as a history vector, since degenerate updates add nothing
            to any span.
    """

    order_T: jax.Array
    inverse_T: jax.Array
    valid_T: jax.Array
    nondegenerate_T: jax.Array
    direction_TD: jax.Array
    norm_T: jax.Array
    weight_T: jax.Array


def scaled_norm_and_direction(x_TD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return the norm and unit direction of each row of `x_TD`.

    Rows are divided by their largest absolute entry before squaring, so the
    sum of squares lies in [1, D] for every nonzero row. A zero row gets norm
    0 and direction 0, and gradients stay finite there.

    The scale is held constant under differentiation: the direction does not
    depend on it, and the norm is homogeneous of degree one in it, so the
    gradient is exact.
    """
    scale_T = jax.lax.stop_gradient(jnp.max(jnp.abs(x_TD), axis=-1))
    nonzero_T = scale_T > 0
    safe_scale_T = jnp.where(nonzero_T, scale_T, 1.0)
    scaled_TD = x_TD / safe_scale_T[:, None]
    sum_squares_T = jnp.sum(scaled_TD * scaled_TD, axis=-1)
    root_T = jnp.sqrt(jnp.where(nonzero_T, sum_squares_T, 1.0))
    norm_T = jnp.where(nonzero_T, scale_T * root_T, 0.0)
    direction_TD = scaled_TD / root_T[:, None]
    return norm_T, direction_TD


def prepare_updates(u_TD: jax.Array, valid_T: jax.Array, eps: float) -> PreparedUpdates:
    """Normalise one layer's updates and move the valid tokens first.

    Args:
        u_TD: Updates of one layer and sequence, any float dtype.
        valid_T: True at real tokens.
        eps: Norm at or below which an update is degenerate.

    Returns:
        The prepared updates, computed in float32 or the input's wider dtype.
    """
    u_TD = jnp.asarray(u_TD)
    u_TD = u_TD.astype(compute_dtype(u_TD.dtype))
    valid_T = jnp.asarray(valid_T, dtype=bool)
    num_positions = u_TD.shape[0]

    # Padding may hold anything, NaN included; zeroing it keeps it out of
    # every value and every gradient.
    u_TD = jnp.where(valid_T[:, None], u_TD, 0.0)

    order_T = jnp.argsort(~valid_T, stable=True)
    inverse_T = jnp.zeros_like(order_T).at[order_T].set(jnp.arange(num_positions))
    valid_count = jnp.sum(valid_T)
    sorted_valid_T = jnp.arange(num_positions) < valid_count

    norm_T, direction_TD = scaled_norm_and_direction(u_TD[order_T])
    nondegenerate_T = sorted_valid_T & (norm_T > eps)
    direction_TD = jnp.where(nondegenerate_T[:, None], direction_TD, 0.0)
    weight_T = jnp.where(nondegenerate_T, norm_T, 0.0)
    return PreparedUpdates(
        order_T=order_T,
        inverse_T=inverse_T,
        valid_T=sorted_valid_T,
        nondegenerate_T=nondegenerate_T,
        direction_TD=direction_TD,
        norm_T=norm_T,
        weight_T=weight_T,
    )


def scatter_back(values_T: jax.Array, prepared: PreparedUpdates) -> jax.Array:
    """Move per-row results back to the original token positions."""
    return values_T[prepared.inverse_T]


def nan_where(mask_T: jax.Array, values_T: jax.Array) -> jax.Array:
    """Return `values_T` where `mask_T` is True and NaN elsewhere."""
    return jnp.where(mask_T, values_T, jnp.nan)


# Largest number of Gram entries materialised at once; beyond it positions
# are processed in sequential batches.
MAX_GRAM_ENTRIES = 1 << 22


def map_positions(fn, positions: jax.Array, entries_per_position: int) -> jax.Array:
    """Apply `fn` to each position, in batches of at most MAX_GRAM_ENTRIES Gram entries.

    The batches run one after the other. Positions are padded with copies of
    the last one up to a whole number of batches, because `jax.lax.map`
    computes a partial last batch outside its loop, where its eigensolver
    could run beside the loop's (see `spectral.computed_after`).
    """
    count = positions.shape[0]
    batch_size = MAX_GRAM_ENTRIES // max(entries_per_position, 1)
    batch_size = max(1, min(count, batch_size))
    num_batches = -(-count // batch_size)
    if num_batches == 1:
        return jax.vmap(fn)(positions)

    padded = jnp.concatenate([positions, jnp.full(num_batches * batch_size - count, positions[-1])])
    results = jax.lax.map(jax.vmap(fn), padded.reshape(num_batches, batch_size))
    return results.reshape(num_batches * batch_size, *results.shape[2:])[:count]


def window_indices(num_positions: int, length: int, include_current: bool) -> jax.Array:
    """Return the row indices of each position's window, oldest first.

    Row t gets [t - length, t) or, with `include_current`, [t - length + 1, t].
    Indices before the sequence start are negative; callers mask them.
    """
    start = 1 if include_current else 0
    offsets_W = jnp.arange(start - length, start)
    return jnp.arange(num_positions)[:, None] + offsets_W[None, :]
