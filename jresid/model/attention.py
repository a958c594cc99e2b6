"""Grouped-query causal self-attention of Qwen2.

Queries, keys and values have biases; the output projection has none. Each
key/value head serves `G = H / K` consecutive query heads (query head `h`
reads key/value head `h // G`, as Hugging Face's `repeat_kv` arranges them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jresid.model.positions import apply_rotary


class Attention(nnx.Module):
    """Kernels keep the head axis: q `[D, H, E]`, k and v `[D, K, E]`, o `[H, E, D]`."""

    def __init__(self, width, num_heads, num_kv_heads, head_dim, *, dtype, precision, rngs: nnx.Rngs, stack=(),
                 expand_kv: bool = False):
        init = nnx.initializers.normal(0.02)
        # expand_kv: copy each key/value head to its query heads before attention, so
        # that attention splits cleanly by query head when key/value heads are replicated.
        self.expand_kv = expand_kv
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.precision = precision
        self.q_kernel = nnx.Param(init(rngs.params(), (*stack, width, num_heads, head_dim), dtype))
        self.q_bias = nnx.Param(jnp.zeros((*stack, num_heads, head_dim), dtype))
        self.k_kernel = nnx.Param(init(rngs.params(), (*stack, width, num_kv_heads, head_dim), dtype))
        self.k_bias = nnx.Param(jnp.zeros((*stack, num_kv_heads, head_dim), dtype))
        self.v_kernel = nnx.Param(init(rngs.params(), (*stack, width, num_kv_heads, head_dim), dtype))
        self.v_bias = nnx.Param(jnp.zeros((*stack, num_kv_heads, head_dim), dtype))
        self.o_kernel = nnx.Param(init(rngs.params(), (*stack, num_heads, head_dim, width), dtype))

    def heads(self, x_BTD, cos_BTE, sin_BTE, allowed_BTS) -> jax.Array:
        """Return the per-head outputs `z` `[B, T, H, E]`, before the output projection.

        `allowed_BTS[b, t, s]` says whether query `t` may read key `s`. Rows
        with no allowed key (padding) get a uniform, finite distribution.
        """
        q_BTHE, k_BTKE, v_BTKE = self.queries_keys_values(x_BTD, cos_BTE, sin_BTE)
        return self.attend(q_BTHE, k_BTKE, v_BTKE, allowed_BTS)

    def queries_keys_values(self, x_BTD, cos_BTE, sin_BTE) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return rotated queries `[B, T, H, E]` and keys, and values `[B, T, K, E]`."""
        p = self.precision
        q_BTHE = jnp.einsum("btd,dhe->bthe", x_BTD, self.q_kernel[...], precision=p) + self.q_bias[...]
        k_BTKE = jnp.einsum("btd,dke->btke", x_BTD, self.k_kernel[...], precision=p) + self.k_bias[...]
        v_BTKE = jnp.einsum("btd,dke->btke", x_BTD, self.v_kernel[...], precision=p) + self.v_bias[...]
        q_BTHE = apply_rotary(q_BTHE, cos_BTE, sin_BTE)
        k_BTKE = apply_rotary(k_BTKE, cos_BTE, sin_BTE)
        return q_BTHE, k_BTKE, v_BTKE

    def attend(self, q_BTHE, k_BSKE, v_BSKE, allowed_BTS) -> jax.Array:
        """Attend `T` queries to `S` keys and values: `z` `[B, T, H, E]`.

        The full forward passes its own keys (`S = T`); cached decoding
        passes the key/value cache, with `allowed_BTS` hiding unused slots.
        """
        B, T, _, _ = q_BTHE.shape
        K, E = self.num_kv_heads, self.head_dim
        G = self.num_heads // K
        p = self.precision
        if self.expand_kv and G > 1:
            k_BSKE = jnp.repeat(k_BSKE, G, axis=2)
            v_BSKE = jnp.repeat(v_BSKE, G, axis=2)
            K, G = self.num_heads, 1

        # Scores and softmax in float32 whatever the parameter dtype.
        q_BTKGE = q_BTHE.reshape(B, T, K, G, E)
        scores_BKGTS = jnp.einsum(
            "btkge,bske->bkgts", q_BTKGE, k_BSKE, precision=p, preferred_element_type=jnp.float32
        ) * (E**-0.5)
        mask_B11TS = allowed_BTS[:, None, None, :, :]
        scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKE.dtype)

        z_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE, precision=p)
        return z_BTKGE.reshape(B, T, K * G, E)

    def project(self, z_BTHE: jax.Array) -> jax.Array:
        """Sum the heads through the output projection: `attn_out` `[B, T, D]`."""
        return jnp.einsum("bthe,hed->btd", z_BTHE, self.o_kernel[...], precision=self.precision)

    def head_results(self, z_BTHE: jax.Array) -> jax.Array:
        """Each head's contribution to the residual stream, `[B, T, H, D]` (`hook_result`)."""
        return jnp.einsum("bthe,hed->bthd", z_BTHE, self.o_kernel[...], precision=self.precision)
