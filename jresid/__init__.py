"""jresid: what each transformer block adds to the residual stream.

Axis letters used in array names across the package (`x_BTD` is a
`[batch, position, width]` array):

    B batch, T positions, L layers, D model width, H query heads,
    K key/value heads, G query heads per key/value head, E head width,
    F MLP width, V vocabulary, R rows of a component matrix (H heads
    plus the MLP), S key positions.
"""

from jresid.capture import ActivationCache, CaptureSpec
from jresid.checkpoint import CheckpointError
from jresid.config import ConfigError, Qwen2Config, UnsupportedConfigError
from jresid.pretrained import Model, from_pretrained, pad_token_ids
from jresid.analyze import AnalysisResult, analyze  # noqa: E402  (needs the names above)
from jresid.streaming import StreamedModel, stream_pretrained
from jresid.metrics import MetricOptions
from jresid.interventions import Intervention
# `jresid.generate` is the function from here on, as `jresid.analyze` is; import the
# module's other names with `from jresid.generate import ...`.
from jresid.generate import GenerationResult, generate
from jresid.steering import LearnedVector, ModeDirections, derive_directions, learn_steering_vector

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "AnalysisResult",
    "MetricOptions",
    "analyze",
    "CaptureSpec",
    "CheckpointError",
    "ConfigError",
    "GenerationResult",
    "Intervention",
    "LearnedVector",
    "ModeDirections",
    "Model",
    "Qwen2Config",
    "StreamedModel",
    "UnsupportedConfigError",
    "__version__",
    "derive_directions",
    "stream_pretrained",
    "from_pretrained",
    "generate",
    "learn_steering_vector",
    "pad_token_ids",
]
