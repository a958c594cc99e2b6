"""Steering by update modes: per-mode directions and learned steering vectors.

* `jresid.steering.directions`: mean differences and singular subspaces of
  each mode's block updates, saved with the model they came from.
* `jresid.steering.learn`: steering vectors optimised with optax toward a
  mode's metric signature.
* `jresid.steering.prompts`: the built-in prompt set.

The interventions themselves live in `jresid.interventions`, and generation
in `jresid.generate`.
"""

from jresid.steering.directions import (
    STEERABLE_MODES,
    DirectionsError,
    ModeDirections,
    derive_directions,
)
from jresid.steering.learn import LearnedVector, learn_steering_vector
from jresid.steering.prompts import builtin_prompts

__all__ = [
    "STEERABLE_MODES",
    "DirectionsError",
    "LearnedVector",
    "ModeDirections",
    "builtin_prompts",
    "derive_directions",
    "learn_steering_vector",
]
