"""Rotary position embeddings with Hugging Face's half-split pairing.

Channel `i` of a head is rotated together with channel `i + E/2` (the
`rotate_half` convention of Hugging Face's Llama and Qwen2 code), not with
its neighbour `i + 1` as in the original RoFormer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Return float32 cosines and sines of shape `[B, T, E]`.

    The inverse frequencies `theta ** (-2i / E)` and the angles are float32
    whatever the model's dtype, as in Hugging Face, so that positions in the
    thousands keep their precision.
    """
    exponents_E2 = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inverse_frequency_E2 = 1.0 / jnp.power(jnp.float32(theta), exponents_E2)
    angles_BTE2 = positions_BT.astype(jnp.float32)[..., None] * inverse_frequency_E2
    angles_BTE = jnp.concatenate([angles_BTE2, angles_BTE2], axis=-1)
    return jnp.cos(angles_BTE), jnp.sin(angles_BTE)


def apply_rotary(x_BTNE: jax.Array, cos_BTE: jax.Array, sin_BTE: jax.Array) -> jax.Array:
    """Rotate queries or keys `[B, T, heads, E]`; cos and sin are cast to x's dtype first."""
    cos_BT1E = cos_BTE.astype(x_BTNE.dtype)[:, :, None, :]
    sin_BT1E = sin_BTE.astype(x_BTNE.dtype)[:, :, None, :]
    first_half, second_half = jnp.split(x_BTNE, 2, axis=-1)
    rotated_BTNE = jnp.concatenate([-second_half, first_half], axis=-1)
    return x_BTNE * cos_BT1E + rotated_BTNE * sin_BT1E


def positions_from_mask(valid_BT: jax.Array) -> jax.Array:
    """Number the real tokens 0, 1, 2, ... in each row, whatever the padding side.

    Padding positions get 0. With this numbering a left-padded prompt sees the
    same rotary angles as the prompt run alone.
    """
    valid_BT = valid_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid_BT, axis=-1) - 1, 0) * valid_BT
