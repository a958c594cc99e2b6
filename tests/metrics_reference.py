"""Float64 NumPy reference for the residual update metrics.

Written for clarity, not speed: explicit loops over tokens, explicit SVDs of
the history and component matrices, explicit projections. No Gram matrices
and no truncation of the "ema" history. Histories run over valid tokens in
their original order; padding never enters one.
"""

from __future__ import annotations

import numpy as np


def _valid_positions(valid):
    return np.flatnonzero(np.asarray(valid, dtype=bool))


def energy(u, valid):
    """Return ||u_t|| at valid tokens and NaN at padding."""
    u = np.asarray(u, dtype=np.float64)
    out = np.full(u.shape[0], np.nan)
    for t in _valid_positions(valid):
        out[t] = np.linalg.norm(u[t])
    return out


def innovation(u, valid, *, window=None, eps=1e-6):
    """Return 1 - max cosine with the last `window` (or all) earlier valid, nondegenerate updates."""
    u = np.asarray(u, dtype=np.float64)
    positions = _valid_positions(valid)
    out = np.full(u.shape[0], np.nan)
    for k, t in enumerate(positions):
        norm_t = np.linalg.norm(u[t])
        if norm_t <= eps:
            continue
        first = 0 if window is None else max(0, k - window)
        cosines = []
        for i in positions[first:k]:
            norm_i = np.linalg.norm(u[i])
            if norm_i > eps:
                cosines.append(np.dot(u[t], u[i]) / (norm_t * norm_i))
        if cosines:
            out[t] = 1.0 - max(cosines)
    return out


def kept_right_singular_vectors(history, *, rtol, energy_fraction=None):
    """Return the right singular vectors of `history` kept by the rank and energy rules.

    Kept: sigma > rtol * sigma_max and sigma > 0; with `energy_fraction`,
    also the singular values whose strictly larger ones hold less than that
    fraction of sum(sigma^2).
    """
    history = np.asarray(history, dtype=np.float64)
    if history.shape[0] == 0:
        return np.zeros((0, history.shape[1]))
    _, sigma, vt = np.linalg.svd(history, full_matrices=False)
    if sigma.max() == 0.0:
        return np.zeros((0, history.shape[1]))
    keep = (sigma > 0.0) & (sigma > rtol * sigma.max())
    if energy_fraction is not None:
        squares = sigma**2
        total = squares.sum()
        for j in range(len(sigma)):
            mass_above = squares[sigma > sigma[j]].sum()
            if not mass_above < energy_fraction * total:
                keep[j] = False
    return vt[keep]


def expansion(
    u,
    valid,
    *,
    history="window",
    window=8,
    decay=0.9,
    energy_fraction=0.99,
    rtol=1e-3,
    eps=1e-6,
):
    """Return 1 - ||P u_t||^2 / ||u_t||^2 with P built from an explicit SVD of the history."""
    u = np.asarray(u, dtype=np.float64)
    positions = _valid_positions(valid)
    out = np.full(u.shape[0], np.nan)
    for k, t in enumerate(positions):
        norm_t = np.linalg.norm(u[t])
        if norm_t <= eps:
            continue
        if history == "window":
            earlier = positions[max(0, k - window) : k]
        else:
            earlier = positions[:k]
        rows = []
        for j, i in enumerate(earlier):
            row = u[i] if np.linalg.norm(u[i]) > eps else np.zeros_like(u[i])
            if history == "ema":
                distance = len(earlier) - 1 - j
                row = decay**distance * row
            rows.append(row)
        rows = np.array(rows).reshape(len(rows), u.shape[1])
        fraction = energy_fraction if history == "ema" else None
        basis = kept_right_singular_vectors(rows, rtol=rtol, energy_fraction=fraction)
        projection = basis.T @ (basis @ u[t])
        out[t] = 1.0 - np.dot(projection, projection) / norm_t**2
    return out


def rank_from_singular_values(sigma, *, rank_measure, rtol):
    """Return a rank measure over the singular values with sigma > rtol * sigma_max."""
    sigma = np.abs(np.asarray(sigma, dtype=np.float64))
    if sigma.size == 0 or sigma.max() == 0.0:
        return 0.0
    kept = sigma[(sigma > 0.0) & (sigma > rtol * sigma.max())]
    if rank_measure == "numerical":
        return float(len(kept))
    if rank_measure == "stable":
        return float(np.sum(kept**2) / kept.max() ** 2)
    if rank_measure == "participation":
        return float(np.sum(kept**2) ** 2 / np.sum(kept**4))
    if rank_measure == "effective":
        p = kept / kept.sum()
        return float(np.exp(-np.sum(p * np.log(p))))
    raise ValueError(rank_measure)


def complexity_components(components, valid, *, rank_measure="effective", rtol=1e-3):
    """Return the rank measure of each valid token's component matrix."""
    components = np.asarray(components, dtype=np.float64)
    out = np.full(components.shape[0], np.nan)
    for t in _valid_positions(valid):
        sigma = np.linalg.svd(components[t], compute_uv=False)
        out[t] = rank_from_singular_values(sigma, rank_measure=rank_measure, rtol=rtol)
    return out


def _rows_without_degenerate(u, indices, eps):
    rows = [u[i] if np.linalg.norm(u[i]) > eps else np.zeros_like(u[i]) for i in indices]
    return np.array(rows).reshape(len(rows), u.shape[1])


def complexity_window(u, valid, *, window=8, rank_measure="effective", rtol=1e-3, eps=1e-6):
    """Return the rank measure of the last `window` valid updates up to and including each token."""
    u = np.asarray(u, dtype=np.float64)
    positions = _valid_positions(valid)
    out = np.full(u.shape[0], np.nan)
    for k, t in enumerate(positions):
        rows = _rows_without_degenerate(u, positions[max(0, k - window + 1) : k + 1], eps)
        sigma = np.linalg.svd(rows, compute_uv=False)
        out[t] = rank_from_singular_values(sigma, rank_measure=rank_measure, rtol=rtol)
    return out


def complexity_sequence(u, valid, *, rank_measure="effective", rtol=1e-3, eps=1e-6):
    """Return the rank measure of the matrix of every valid update (NaN without valid tokens)."""
    u = np.asarray(u, dtype=np.float64)
    positions = _valid_positions(valid)
    if len(positions) == 0:
        return np.nan
    rows = _rows_without_degenerate(u, positions, eps)
    sigma = np.linalg.svd(rows, compute_uv=False)
    return rank_from_singular_values(sigma, rank_measure=rank_measure, rtol=rtol)


# Test inputs and comparison helpers shared by the metric test files.

MASKS = ("none", "left", "right", "holes")


def make_valid(kind, num_positions, seed=0):
    """Return a valid mask: no padding, left or right padding, or random interior holes."""
    valid = np.ones(num_positions, dtype=bool)
    if kind == "left":
        valid[:7] = False
    elif kind == "right":
        valid[-5:] = False
    elif kind == "holes":
        rng = np.random.default_rng(seed + 1000)
        valid[rng.choice(num_positions, size=num_positions // 8, replace=False)] = False
    elif kind != "none":
        raise ValueError(kind)
    return valid


def make_updates(kind, num_positions, width, seed=0):
    """Return float64 updates [T, D] of a named structure.

    gaussian: independent rows with norms spread over [0.5, 2].
    low_rank_noise: a rank-4 signal plus noise at about 1/30 of it, so every
        singular value sits far above the rtol cut.
    low_rank_tiny_noise: a rank-4 signal plus noise a million times smaller,
        so the noise directions sit far below the cut. Token t's signal is
        mostly basis vector t mod 4, so any 4 consecutive signals are well
        conditioned and no kept singular value comes near the cut.
    rank_deficient: gaussian rows with repeats, sums of earlier rows and zero
        rows, so many windows are rank deficient.
    dominant: gaussian rows with two updates 10^4 times larger, which push
        every other direction of their windows below the cut.
    """
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.normal(size=(num_positions, width)) * rng.uniform(0.5, 2.0, size=(num_positions, 1))
    if kind == "low_rank_noise":
        signal = rng.normal(size=(num_positions, 4)) @ rng.normal(size=(4, width))
        return signal + 0.3 * rng.normal(size=(num_positions, width))
    if kind == "low_rank_tiny_noise":
        coefficients = np.eye(4)[np.arange(num_positions) % 4] + 0.1 * rng.normal(size=(num_positions, 4))
        signal = coefficients @ rng.normal(size=(4, width))
        return signal + 1e-6 * rng.normal(size=(num_positions, width))
    if kind == "rank_deficient":
        u = rng.normal(size=(num_positions, width))
        for t in range(3, num_positions, 5):
            u[t] = u[t - 1]
        for t in range(4, num_positions, 7):
            u[t] = 0.5 * u[t - 2] - 2.0 * u[t - 3]
        u[num_positions // 3] = 0.0
        return u
    if kind == "dominant":
        u = rng.normal(size=(num_positions, width))
        u[num_positions // 10] *= 1e4
        u[num_positions // 2] *= 1e4
        return u
    raise ValueError(kind)


def make_components(kind, num_positions, rows, width, seed=0):
    """Return float64 component matrices [T, R, D] of a named structure.

    gaussian: independent rows with norms spread over [0.1, 3].
    low_rank: every position's rows lie in a random 3-dimensional subspace.
    rank_one: every position's rows are multiples of one vector.
    mixed: gaussian, with some positions rank one, some with zero rows and
        one all-zero position.
    """
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.1, 3.0, size=(num_positions, rows, 1))
    if kind == "gaussian":
        return rng.normal(size=(num_positions, rows, width)) * scales
    if kind == "low_rank":
        coefficients = rng.normal(size=(num_positions, rows, 3))
        basis = rng.normal(size=(num_positions, 3, width))
        return coefficients @ basis
    if kind == "rank_one":
        return rng.normal(size=(num_positions, rows, 1)) * rng.normal(size=(num_positions, 1, width))
    if kind == "mixed":
        c = rng.normal(size=(num_positions, rows, width)) * scales
        c[::4] = rng.normal(size=(len(c[::4]), rows, 1)) * rng.normal(size=(len(c[::4]), 1, width))
        c[1::4, rows // 2 :] = 0.0
        c[num_positions // 2] = 0.0
        return c
    raise ValueError(kind)


def assert_matches(actual, expected, *, atol, rtol=0.0, what):
    """Assert equal NaN positions and |actual - expected| <= atol + rtol |expected| elsewhere.

    The message names the first mismatching position and both values.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    nan_mismatch = np.flatnonzero(np.isnan(actual).ravel() != np.isnan(expected).ravel())
    if nan_mismatch.size:
        index = np.unravel_index(nan_mismatch[0], actual.shape)
        raise AssertionError(
            f"{what}: NaN pattern differs at position {index}: got {actual[index]!r}, "
            f"expected {expected[index]!r} ({nan_mismatch.size} positions differ)"
        )
    finite = ~np.isnan(expected)
    error = np.where(finite, np.abs(actual - expected), 0.0)
    bound = atol + rtol * np.abs(np.where(finite, expected, 0.0))
    bad = np.flatnonzero((error > bound).ravel())
    if bad.size:
        worst = np.unravel_index(np.argmax(np.where(error > bound, error - bound, -np.inf)), actual.shape)
        raise AssertionError(
            f"{what}: {bad.size} positions off; worst at position {worst}: got {actual[worst]:.9g}, "
            f"expected {expected[worst]:.9g}, |diff| {error[worst]:.3g} > {bound[worst]:.3g}"
        )
