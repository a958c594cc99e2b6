"""Qwen2's SwiGLU feed-forward layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """`down(silu(gate(x)) * up(x))`, with no biases.

    Kernels are `[D, F]` (gate, up) and `[F, D]` (down); Hugging Face's
    `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj` transposed.
    """

    def __init__(self, width: int, hidden: int, *, dtype, precision, rngs: nnx.Rngs, stack=()):
        init = nnx.initializers.normal(0.02)
        self.precision = precision
        self.gate_kernel = nnx.Param(init(rngs.params(), (*stack, width, hidden), dtype))
        self.up_kernel = nnx.Param(init(rngs.params(), (*stack, width, hidden), dtype))
        self.down_kernel = nnx.Param(init(rngs.params(), (*stack, hidden, width), dtype))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.gate_kernel[...], precision=self.precision)
        up_BTF = jnp.einsum("btd,df->btf", x_BTD, self.up_kernel[...], precision=self.precision)
        hidden_BTF = jax.nn.silu(gate_BTF) * up_BTF
        return jnp.einsum("btf,fd->btd", hidden_BTF, self.down_kernel[...], precision=self.precision)
