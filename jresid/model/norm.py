"""RMS normalisation as Qwen2 computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x_BTD: jax.Array, eps: float) -> jax.Array:
    """Divide by the root mean square over the last axis, in float32.

    Returns the float32 result before any gain: TransformerLens' `hook_normalized`.
    """
    x_BTD = x_BTD.astype(jnp.float32)
    mean_square_BT1 = jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True)
    return x_BTD * jax.lax.rsqrt(mean_square_BT1 + eps)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned gain.

    Like Hugging Face's `Qwen2RMSNorm`, the statistics are float32 and the
    normalised value is cast back to the input dtype before the gain.
    """

    def __init__(self, width: int, eps: float, *, dtype: jnp.dtype, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((*stack, width), dtype=dtype))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        normalized_BTD = rms_normalize(x_BTD, self.eps).astype(x_BTD.dtype)
        return self.weight[...] * normalized_BTD
