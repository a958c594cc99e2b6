"""Options shared by every residual update metric.

`MetricOptions` is a frozen, hashable dataclass so that it can be passed to
`jax.jit` as a static argument. docs/metrics.md gives the reason behind each
default and the cost of each choice.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import numbers
from typing import Any

logger = logging.getLogger(__name__)

HISTORIES = ("window", "full", "ema")
COMPLEXITY_BASES = ("components", "window", "sequence")
RANK_MEASURES = ("effective", "numerical", "stable", "participation")

# The Gram route squares singular values, so float32 resolves sigma / sigma_max
# only down to about sqrt(float32 eps) = 3.5e-4. Below this rtol, float32
# rounding decides which directions the rank rule keeps.
FLOAT32_RTOL_FLOOR = 3.5e-4


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is invalid; use one of {choices}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1")
    return int(value)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid; use a finite number")
    return float(value)


@dataclasses.dataclass(frozen=True)
class MetricOptions:
    """Settings of the residual update metrics.

    Attributes:
        history: History subspace of expansion: "window" (the last `window`
            valid updates), "full" (every earlier valid update) or "ema"
            (every earlier update, weighted by `decay` per position).
            Innovation uses the same last `window` updates when history is
            "window" and every earlier valid update otherwise.
        window: Number of earlier valid updates in the "window" history, >= 1.
        decay: Per-position weight of the "ema" history, in (0, 1).
        energy_fraction: Fraction of the weighted history's squared Frobenius
            norm that the "ema" subspace keeps, in (0, 1].
        complexity_basis: Rows of the complexity matrix: "components" (the
            per-head attention outputs and the MLP output of one position),
            "window" (the last `complexity_window` valid updates up to and
            including the position) or "sequence" (every valid update).
        complexity_window: Rows of the "window" complexity matrix, >= 1.
        rank_measure: "effective", "numerical", "stable" or "participation".
        rtol: Relative singular value cut, in (0, 1). Singular directions
            with sigma <= rtol * sigma_max are dropped from every history
            subspace and from every rank measure.
        eps: Absolute norm at or below which an update is degenerate, >= 0.
        sequence_complexity: Compute `LayerMetrics.sequence_complexity` even
            when `complexity_basis` is not "sequence". It costs one T x T
            symmetric eigendecomposition per layer and sequence.
    """

    history: str = "window"
    window: int = 8
    decay: float = 0.9
    energy_fraction: float = 0.99
    complexity_basis: str = "components"
    complexity_window: int = 8
    rank_measure: str = "effective"
    rtol: float = 1e-3
    eps: float = 1e-6
    sequence_complexity: bool = False

    def __post_init__(self) -> None:
        _check_choice("history", self.history, HISTORIES)
        _check_choice("complexity_basis", self.complexity_basis, COMPLEXITY_BASES)
        _check_choice("rank_measure", self.rank_measure, RANK_MEASURES)
        window = _check_positive_int("window", self.window)
        complexity_window = _check_positive_int("complexity_window", self.complexity_window)

        decay = _check_real("decay", self.decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={self.decay!r} is invalid; use a number in (0, 1)")
        energy_fraction = _check_real("energy_fraction", self.energy_fraction)
        if not 0.0 < energy_fraction <= 1.0:
            raise ValueError(
                f"energy_fraction={self.energy_fraction!r} is invalid; use a number in (0, 1]"
            )
        rtol = _check_real("rtol", self.rtol)
        if not 0.0 < rtol < 1.0:
            raise ValueError(f"rtol={self.rtol!r} is invalid; use a number in (0, 1)")
        eps = _check_real("eps", self.eps)
        if eps < 0.0:
            raise ValueError(f"eps={self.eps!r} is invalid; use a number >= 0")
        if not isinstance(self.sequence_complexity, bool):
            raise ValueError(
                f"sequence_complexity={self.sequence_complexity!r} is invalid; use True or False"
            )

        # Store plain ints and floats so that equal options hash equally.
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "complexity_window", complexity_window)
        object.__setattr__(self, "decay", decay)
        object.__setattr__(self, "energy_fraction", energy_fraction)
        object.__setattr__(self, "rtol", rtol)
        object.__setattr__(self, "eps", eps)

        if rtol < FLOAT32_RTOL_FLOOR:
            logger.warning(
                "rtol=%g is below %g: float32 Gram eigenvalues cannot resolve singular "
                "values that small, so the rank rule near the cut follows rounding noise",
                rtol,
                FLOAT32_RTOL_FLOOR,
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MetricOptions:
        """Build options from `to_dict()` output. Missing keys take their defaults.

        Raises:
            ValueError: `raw` is not a dict, contains an unknown key, or has
                an invalid value.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"metric options must be a dict, got {type(raw).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                if close:
                    hints.append(f"{name!r} (did you mean {close[0]!r}?)")
                else:
                    hints.append(repr(name))
            raise ValueError(
                f"unknown metric option(s) {', '.join(hints)}; known options are {sorted(known)}"
            )
        return cls(**raw)

    def differences(self, other: MetricOptions) -> list[str]:
        """Return the names of the options that change per-token metrics and differ from `other`'s."""
        return [
            field.name
            for field in dataclasses.fields(self)
            if field.name != "sequence_complexity" and getattr(self, field.name) != getattr(other, field.name)
        ]
