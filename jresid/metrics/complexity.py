"""Complexity: the rank of a matrix built from the update.

All rank measures read the singular values sigma_j of the matrix, computed as
square roots of the eigenvalues of its Gram matrix. Singular values with
sigma_j <= rtol * sigma_max count as zero in every measure. The Gram route in
float32 resolves sigma_j / sigma_max only down to about 3.5e-4 (the square
root of float32 epsilon), so without the cut an exactly rank-one matrix would
read an effective rank near 1.03 from rounding noise alone.

Measures over the kept singular values:

* effective: exp(-sum p_j log p_j) with p_j = sigma_j / sum(sigma)
  (Roy and Vetterli, 2007).
* numerical: the number of kept singular values.
* stable: sum(sigma^2) / sigma_max^2.
* participation: sum(sigma^2)^2 / sum(sigma^4).

A zero matrix has complexity 0 under every measure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jresid.metrics.cosines import Cosines, compute_cosines
from jresid.metrics.options import RANK_MEASURES
from jresid.metrics.prepare import (
    PreparedUpdates,
    compute_dtype,
    map_positions,
    nan_where,
    prepare_updates,
    scatter_back,
    window_indices,
)
from jresid.metrics.spectral import (
    eigvalsh,
    gram_from_scaled_rows,
    keep_mask,
    remove_small_rows,
    row_floor,
)


def _check_rank_options(rank_measure: str, rtol: float) -> None:
    if rank_measure not in RANK_MEASURES:
        choices = ", ".join(repr(m) for m in RANK_MEASURES)
        raise ValueError(f"rank_measure={rank_measure!r} is invalid; use one of {choices}")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol={rtol!r} is invalid; use a number in (0, 1)")


def rank_from_gram_eigenvalues(w_N: jax.Array, *, rank_measure: str, rtol: float) -> jax.Array:
    """Return a rank measure from the eigenvalues (sigma^2) of a Gram matrix.

    Args:
        w_N: Eigenvalues along the last axis; leading axes are batch axes.
            Small negative values from rounding are treated as 0.
        rank_measure: "effective", "numerical", "stable" or "participation".
        rtol: Singular values with sigma <= rtol * sigma_max count as zero.

    Returns:
        The rank measure per batch entry, 0 for a zero matrix.
    """
    _check_rank_options(rank_measure, rtol)
    w_N = jnp.maximum(w_N, 0.0)
    keep_N = keep_mask(w_N, rtol)
    any_kept = jnp.any(keep_N, axis=-1)
    w_max = jnp.max(w_N, axis=-1, keepdims=True)
    ratio_N = jnp.where(keep_N, w_N / jnp.where(w_max > 0, w_max, 1.0), 0.0)

    if rank_measure == "numerical":
        value = jnp.sum(keep_N, axis=-1).astype(w_N.dtype)
    elif rank_measure == "stable":
        value = jnp.sum(ratio_N, axis=-1)
    elif rank_measure == "participation":
        total = jnp.sum(ratio_N, axis=-1)
        squares = jnp.sum(ratio_N * ratio_N, axis=-1)
        value = total * total / jnp.where(any_kept, squares, 1.0)
    else:
        # sqrt and log are evaluated on kept entries only, so that zero
        # singular values give finite gradients.
        sigma_N = jnp.where(keep_N, jnp.sqrt(jnp.where(keep_N, ratio_N, 1.0)), 0.0)
        total = jnp.sum(sigma_N, axis=-1, keepdims=True)
        p_N = sigma_N / jnp.where(total > 0, total, 1.0)
        safe_p_N = jnp.where(keep_N, p_N, 1.0)
        entropy = -jnp.sum(jnp.where(keep_N, p_N * jnp.log(safe_p_N), 0.0), axis=-1)
        value = jnp.exp(entropy)
    return jnp.where(any_kept, value, 0.0)


def rank_from_singular_values(sigma_N: jax.Array, *, rank_measure: str, rtol: float) -> jax.Array:
    """Return a rank measure from singular values along the last axis.

    See the module docstring for the measures and the rtol cut.
    """
    sigma_N = jnp.abs(jnp.asarray(sigma_N))
    sigma_N = sigma_N.astype(compute_dtype(sigma_N.dtype))

    # Squaring after dividing by the max keeps 1e-20 and 1e20 in range.
    sigma_max = jax.lax.stop_gradient(jnp.max(sigma_N, axis=-1, keepdims=True))
    ratio_N = sigma_N / jnp.where(sigma_max > 0, sigma_max, 1.0)
    return rank_from_gram_eigenvalues(ratio_N * ratio_N, rank_measure=rank_measure, rtol=rtol)


def component_gram(components_TRD: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
    """Return each position's Gram matrix of component rows, scaled to entries <= D.

    Each position's rows are divided by their largest absolute entry before
    the product, so updates of 1e20 do not overflow and 1e-20 do not
    underflow. Rank measures do not depend on that scale.

    Args:
        components_TRD: Component rows per position (heads, then the MLP).
        valid_T: Optional mask; positions where it is False get a zero Gram
            whatever their rows hold, NaN included.

    Returns:
        [T, R, R] scaled Gram matrices, float32 or the input's wider dtype.
    """
    components_TRD = jnp.asarray(components_TRD)
    components_TRD = components_TRD.astype(compute_dtype(components_TRD.dtype))
    scale_T = jax.lax.stop_gradient(jnp.max(jnp.abs(components_TRD), axis=(1, 2)))
    usable_T = scale_T > 0
    if valid_T is not None:
        usable_T = usable_T & jnp.asarray(valid_T, dtype=bool)
    safe_scale_T = jnp.where(usable_T, scale_T, 1.0)[:, None, None]
    scaled_TRD = jnp.where(usable_T[:, None, None], components_TRD / safe_scale_T, 0.0)
    return jnp.matmul(
        scaled_TRD, jnp.swapaxes(scaled_TRD, 1, 2), precision=jax.lax.Precision.HIGHEST
    )


def complexity_from_gram(
    gram_TRR: jax.Array,
    valid_T: jax.Array,
    *,
    rank_measure: str = "effective",
    rtol: float = 1e-3,
) -> jax.Array:
    """Return the rank measure of each position's matrix from its Gram matrix.

    Use this when the component Gram is built without materialising the
    rows (for instance from the heads' z and W_O W_O^T products). The Gram
    must be finite; any positive scale per position is allowed.

    Args:
        gram_TRR: [T, R, R] Gram matrices M_t M_t^T.
        valid_T: True at real tokens.
        rank_measure: "effective", "numerical", "stable" or "participation".
        rtol: Singular values with sigma <= rtol * sigma_max count as zero.

    Returns:
        Complexity per position, NaN at padding.
    """
    _check_rank_options(rank_measure, rtol)
    gram_TRR = jnp.asarray(gram_TRR)
    gram_TRR = gram_TRR.astype(compute_dtype(gram_TRR.dtype))
    valid_T = jnp.asarray(valid_T, dtype=bool)
    gram_TRR = jnp.where(valid_T[:, None, None], gram_TRR, 0.0)

    # Bring each matrix to a largest diagonal entry of 1 before the eigen
    # solve, so tiny Gram entries do not fall into float32 subnormals.
    diagonal_TR = jnp.diagonal(gram_TRR, axis1=1, axis2=2)
    scale_T = jax.lax.stop_gradient(jnp.max(jnp.abs(diagonal_TR), axis=-1))
    gram_TRR = gram_TRR / jnp.where(scale_T > 0, scale_T, 1.0)[:, None, None]
    gram_TRR = remove_small_rows(gram_TRR, row_floor(rtol))

    values_T = rank_from_gram_eigenvalues(eigvalsh(gram_TRR), rank_measure=rank_measure, rtol=rtol)
    return nan_where(valid_T, values_T)


def complexity_components(
    components_TRD: jax.Array,
    valid_T: jax.Array,
    *,
    rank_measure: str = "effective",
    rtol: float = 1e-3,
) -> jax.Array:
    """Return the rank of each position's component matrix.

    The rows are the H per-head attention outputs and the MLP output at the
    position, which sum to the update. High rank means the heads and the
    MLP write independent directions.

    Args:
        components_TRD: [T, H + 1, D] component rows.
        valid_T: True at real tokens.
        rank_measure: "effective", "numerical", "stable" or "participation".
        rtol: Singular values with sigma <= rtol * sigma_max count as zero.

    Returns:
        Complexity per position, NaN at padding.
    """
    _check_rank_options(rank_measure, rtol)
    return complexity_from_gram(
        component_gram(components_TRD, valid_T), valid_T, rank_measure=rank_measure, rtol=rtol
    )


def complexity_window_span(window: int, num_positions: int) -> int:
    """Return the cosine span the window complexity reads."""
    return min(window - 1, num_positions)


def window_complexity_from_cosines(
    prepared: PreparedUpdates,
    cosines: Cosines,
    *,
    window: int,
    rank_measure: str,
    rtol: float,
) -> jax.Array:
    """Return window complexity per prepared row (valid tokens first), NaN at padding.

    `cosines` must cover `complexity_window_span(window, T)`.
    """
    num_positions = prepared.weight_T.shape[0]
    length = min(window, num_positions)
    index_TW = window_indices(num_positions, length, include_current=True)

    def gram_eigenvalues(position):
        index_W = index_TW[position]
        in_range_W = index_W >= 0
        # Slots before the first row read the diagonal, which every cosine
        # layout contains, and get weight 0.
        safe_index_W = jnp.where(in_range_W, index_W, position)
        row_weight_W = jnp.where(in_range_W, prepared.weight_T[safe_index_W], 0.0)
        largest = jax.lax.stop_gradient(jnp.max(row_weight_W))
        scale_W = row_weight_W / jnp.where(largest > 0, largest, 1.0)
        block_WW = cosines.lookup(safe_index_W[:, None], safe_index_W[None, :])
        gram_WW, _ = gram_from_scaled_rows(scale_W, block_WW, row_floor(rtol))
        return eigvalsh(gram_WW)

    w_TW = map_positions(gram_eigenvalues, jnp.arange(num_positions), length * length)
    values_T = rank_from_gram_eigenvalues(w_TW, rank_measure=rank_measure, rtol=rtol)
    return nan_where(prepared.valid_T, values_T)


def sequence_complexity_from_cosines(
    prepared: PreparedUpdates,
    cosines: Cosines,
    *,
    rank_measure: str,
    rtol: float,
) -> jax.Array:
    """Return the rank of the matrix of every valid update; NaN without valid tokens.

    `cosines` must contain the dense matrix. Its padded size is a whole
    number of 64-row tiles. Padding that keeps that size leaves the result
    unchanged, and other padding changes it only by float32 rounding.
    """
    num_positions = prepared.weight_T.shape[0]
    num_padded = cosines.dense_PP.shape[0]
    weight_P = jnp.pad(prepared.weight_T, (0, num_padded - num_positions))
    largest = jax.lax.stop_gradient(jnp.max(weight_P))
    scale_P = weight_P / jnp.where(largest > 0, largest, 1.0)
    gram_PP, _ = gram_from_scaled_rows(scale_P, cosines.dense_PP, row_floor(rtol))
    w_P = eigvalsh(gram_PP)
    value = rank_from_gram_eigenvalues(w_P, rank_measure=rank_measure, rtol=rtol)
    return jnp.where(jnp.any(prepared.valid_T), value, jnp.nan)


def complexity_window(
    u_TD: jax.Array,
    valid_T: jax.Array,
    *,
    window: int = 8,
    rank_measure: str = "effective",
    rtol: float = 1e-3,
    eps: float = 1e-6,
) -> jax.Array:
    """Return the rank of the last `window` valid updates up to and including each position.

    Degenerate updates (norm <= eps) count as zero rows.

    Args:
        u_TD: Updates of one layer and sequence.
        valid_T: True at real tokens.
        window: Rows of the matrix, the position's own update included.
        rank_measure: "effective", "numerical", "stable" or "participation".
        rtol: Singular values with sigma <= rtol * sigma_max count as zero.
        eps: Norm at or below which an update is degenerate.

    Returns:
        Complexity per position, NaN at padding.
    """
    _check_rank_options(rank_measure, rtol)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid; use an integer >= 1")
    prepared = prepare_updates(u_TD, valid_T, eps)
    num_positions = prepared.valid_T.shape[0]
    cosines = compute_cosines(prepared.direction_TD, complexity_window_span(window, num_positions))
    values_T = window_complexity_from_cosines(
        prepared, cosines, window=window, rank_measure=rank_measure, rtol=rtol
    )
    return scatter_back(values_T, prepared)


def complexity_sequence(
    u_TD: jax.Array,
    valid_T: jax.Array,
    *,
    rank_measure: str = "effective",
    rtol: float = 1e-3,
    eps: float = 1e-6,
) -> jax.Array:
    """Return the rank of the matrix of all valid updates of one layer and sequence.

    Degenerate updates (norm <= eps) count as zero rows.

    Returns:
        A scalar: 0 for an all-zero layer, NaN when no token is valid.
    """
    _check_rank_options(rank_measure, rtol)
    prepared = prepare_updates(u_TD, valid_T, eps)
    cosines = compute_cosines(prepared.direction_TD, None)
    return sequence_complexity_from_cosines(prepared, cosines, rank_measure=rank_measure, rtol=rtol)
