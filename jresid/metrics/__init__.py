"""Per-layer metrics of the residual stream update u = resid_post - resid_pre.

Every function takes one layer of one sequence (`u_TD`, `valid_T`) and is
pure, so it can be jitted and vmapped over batch and layer axes. Per-token
results are [T] arrays with NaN at padding; docs/metrics.md defines each
metric, its range and its NaN rules.
"""

from jresid.metrics.complexity import (
    complexity_components,
    complexity_from_gram,
    complexity_sequence,
    complexity_window,
    component_gram,
    rank_from_gram_eigenvalues,
    rank_from_singular_values,
)
from jresid.metrics.energy import energy
from jresid.metrics.expansion import ema_history_length, expansion
from jresid.metrics.innovation import innovation
from jresid.metrics.layer import LayerMetrics, innovation_window, layer_metrics
from jresid.metrics.options import (
    COMPLEXITY_BASES,
    HISTORIES,
    RANK_MEASURES,
    MetricOptions,
)

__all__ = [
    "COMPLEXITY_BASES",
    "HISTORIES",
    "RANK_MEASURES",
    "LayerMetrics",
    "MetricOptions",
    "complexity_components",
    "complexity_from_gram",
    "complexity_sequence",
    "complexity_window",
    "component_gram",
    "ema_history_length",
    "energy",
    "expansion",
    "innovation",
    "innovation_window",
    "layer_metrics",
    "rank_from_gram_eigenvalues",
    "rank_from_singular_values",
]
