"""All metrics of one layer and sequence, sharing one cosine matrix."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jresid.metrics.complexity import (
    complexity_from_gram,
    complexity_window_span,
    component_gram,
    sequence_complexity_from_cosines,
    window_complexity_from_cosines,
)
from jresid.metrics.cosines import compute_cosines
from jresid.metrics.expansion import expansion_from_cosines, expansion_span
from jresid.metrics.innovation import innovation_from_cosines, innovation_span
from jresid.metrics.options import MetricOptions
from jresid.metrics.prepare import nan_where, prepare_updates, scatter_back
from jresid.metrics.spectral import computed_after


class LayerMetrics(NamedTuple):
    """Metrics of one layer; per-token fields are [T] with NaN at padding.

    A NamedTuple, so it is a pytree: `jax.vmap` and `jax.lax.scan` stack each
    field along new leading axes.

    Attributes:
        energy: Norm of the update.
        innovation: 1 - max cosine with the history, in [0, 2].
        expansion: Fraction of the squared norm outside the history subspace,
            in [0, 1].
        complexity: Rank measure of the `options.complexity_basis` matrix. For
            the "sequence" basis, every valid token gets the sequence value.
        sequence_complexity: Rank measure of all valid updates (a scalar).
            NaN unless `options.sequence_complexity` is set or the basis is
            "sequence", and NaN for a sequence without valid tokens.
    """

    energy: jax.Array
    innovation: jax.Array
    expansion: jax.Array
    complexity: jax.Array
    sequence_complexity: jax.Array


def innovation_window(options: MetricOptions) -> int | None:
    """Return the innovation history length for `options`: the window, or None for all."""
    return options.window if options.history == "window" else None


def cosine_span(options: MetricOptions, num_positions: int) -> int | None:
    """Return the largest cosine span any metric reads under `options`, or None for every pair."""
    wants_sequence = options.sequence_complexity or options.complexity_basis == "sequence"
    spans = [
        innovation_span(innovation_window(options), num_positions),
        expansion_span(options.history, options.window, options.decay, num_positions),
        None if wants_sequence else 0,
    ]
    if options.complexity_basis == "window":
        spans.append(complexity_window_span(options.complexity_window, num_positions))
    if any(span is None for span in spans):
        return None
    return max(spans)


def layer_metrics(
    u_TD: jax.Array,
    valid_T: jax.Array,
    components_TRD: jax.Array | None,
    options: MetricOptions,
    *,
    component_gram_TRR: jax.Array | None = None,
) -> LayerMetrics:
    """Compute every metric of one layer and sequence.

    The cosines between the updates are computed once, only as far from the
    diagonal as the options need, and feed innovation, expansion and the
    window and sequence complexities.

    Args:
        u_TD: Updates (resid_post - resid_pre) of one layer and sequence.
        valid_T: True at real tokens; padding may sit on either side.
        components_TRD: [T, H + 1, D] per-head attention outputs and MLP
            output, summing to `u_TD`. Needed when
            `options.complexity_basis == "components"` unless
            `component_gram_TRR` is given.
        options: Metric settings; static under `jax.jit`.
        component_gram_TRR: Optional [T, H + 1, H + 1] Gram matrices of the
            component rows, used in place of `components_TRD`.

    Returns:
        The layer's metrics.

    Raises:
        ValueError: The "components" basis is selected and neither
            `components_TRD` nor `component_gram_TRR` is given.
    """
    if not isinstance(options, MetricOptions):
        raise TypeError(f"options must be a MetricOptions, got {type(options).__name__}")
    uses_components = options.complexity_basis == "components"
    if uses_components and components_TRD is None and component_gram_TRR is None:
        raise ValueError(
            "complexity_basis='components' needs components_TRD (the per-head attention "
            "outputs and the MLP output) or component_gram_TRR; pass one, or choose "
            "complexity_basis='window' or 'sequence'"
        )

    prepared = prepare_updates(u_TD, valid_T, options.eps)
    num_positions = prepared.valid_T.shape[0]
    cosines = compute_cosines(prepared.direction_TD, cosine_span(options, num_positions))

    energy_T = nan_where(prepared.valid_T, prepared.norm_T)
    innovation_T = innovation_from_cosines(prepared, cosines, innovation_window(options))
    expansion_T = expansion_from_cosines(
        prepared,
        cosines,
        history=options.history,
        window=options.window,
        decay=options.decay,
        energy_fraction=options.energy_fraction,
        rtol=options.rtol,
    )

    # Each stage below runs eigensolvers, and `computed_after` keeps them in
    # sequence because side-by-side calls can deadlock jaxlib's LAPACK kernels.
    wants_sequence = options.sequence_complexity or options.complexity_basis == "sequence"
    if wants_sequence:
        sequence_value = sequence_complexity_from_cosines(
            prepared._replace(weight_T=computed_after(prepared.weight_T, expansion_T)),
            cosines,
            rank_measure=options.rank_measure,
            rtol=options.rtol,
        )
    else:
        sequence_value = jnp.array(jnp.nan, dtype=energy_T.dtype)

    if options.complexity_basis == "window":
        sorted_complexity_T = window_complexity_from_cosines(
            prepared._replace(weight_T=computed_after(prepared.weight_T, expansion_T, sequence_value)),
            cosines,
            window=options.complexity_window,
            rank_measure=options.rank_measure,
            rtol=options.rtol,
        )
    elif options.complexity_basis == "sequence":
        sorted_complexity_T = nan_where(
            prepared.valid_T, jnp.broadcast_to(sequence_value, energy_T.shape)
        )
    else:
        sorted_complexity_T = None

    if sorted_complexity_T is None:
        if component_gram_TRR is None:
            component_gram_TRR = component_gram(components_TRD, valid_T)
        complexity_T = complexity_from_gram(
            computed_after(component_gram_TRR, expansion_T, sequence_value),
            valid_T,
            rank_measure=options.rank_measure,
            rtol=options.rtol,
        )
    else:
        complexity_T = scatter_back(sorted_complexity_T, prepared)

    return LayerMetrics(
        energy=scatter_back(energy_T, prepared),
        innovation=scatter_back(innovation_T, prepared),
        expansion=scatter_back(expansion_T, prepared),
        complexity=complexity_T.astype(energy_T.dtype),
        sequence_complexity=sequence_value,
    )
