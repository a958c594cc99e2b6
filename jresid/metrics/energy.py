"""Energy: the norm of each update."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jresid.metrics.prepare import compute_dtype, nan_where, scaled_norm_and_direction


def energy(u_TD: jax.Array, valid_T: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Return ||u_t||_2 for each position, NaN at padding.

    A degenerate update (norm <= eps) still has its norm as energy, so `eps`
    does not change the result; it is accepted so that every metric takes
    the same options.

    Args:
        u_TD: Updates of one layer and sequence.
        valid_T: True at real tokens.
        eps: Degeneracy threshold (unused by energy).

    Returns:
        Energy per position, float32 or the input's wider dtype.
    """
    del eps
    u_TD = jnp.asarray(u_TD)
    u_TD = u_TD.astype(compute_dtype(u_TD.dtype))
    valid_T = jnp.asarray(valid_T, dtype=bool)
    norm_T, _ = scaled_norm_and_direction(jnp.where(valid_T[:, None], u_TD, 0.0))
    return nan_where(valid_T, norm_T)
