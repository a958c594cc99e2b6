"""jresid: what each transformer block adds to the residual stream.

Axis letters used in array names across the package (`x_BTD` is a
`[batch, position, width]` array):

    B batch, T positions, L layers, D model width, H query heads,
    K key/value heads, E head width, F MLP width, V vocabulary,
    R rows of a component matrix (H heads plus the MLP).
"""

from jresid.config import ConfigError, Qwen2Config, UnsupportedConfigError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Qwen2Config",
    "UnsupportedConfigError",
    "__version__",
]
