"""The Qwen2 decoder: blocks with stacked parameters under `jax.lax.scan`.

All blocks share one set of modules whose parameters carry a leading layer
axis `[L, ...]`. The forward pass scans over that axis, so the program is
compiled once per block whatever the depth (QwQ-32B has 64 blocks).

Inside the scan, each block's activations go to two optional consumers:

* captures: the requested capture points and layers are written into
  preallocated buffers; nothing else leaves the loop.
* `layer_fn`: a function of one block's activations whose results are
  stacked over layers. `jresid.analyze` computes the metrics there, so only
  `[B, L, T]` numbers leave the loop.

Interventions (`jresid.interventions`) edit the stream in the same loop. With
none given, the loop traces exactly the program it traces without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jresid.capture import HOOK_EMBED, LN_FINAL, CaptureSpec, block_name
from jresid.config import Qwen2Config
from jresid.interventions import SteeringTables
from jresid.model.attention import Attention
from jresid.model.mlp import MLP
from jresid.model.norm import RMSNorm, rms_normalize
from jresid.model.positions import positions_from_mask, rotary_angles


class BlockActivations(NamedTuple):
    """One block's activations for a batch, each `[B, T, D]` unless noted."""

    resid_pre: jax.Array
    z: jax.Array  # [B, T, H, E] per-head attention outputs before the output projection
    attn_out: jax.Array
    resid_mid: jax.Array
    mlp_out: jax.Array
    resid_post: jax.Array


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32, or None when not requested
    captures: dict[str, jax.Array]
    layer_outputs: Any  # layer_fn's results stacked over layers, or None


LayerFn = Callable[["Block", BlockActivations, jax.Array, jax.Array], Any]


def attention_inputs(config: Qwen2Config, valid_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return the rotary cosines and sines `[B, T, E]` and the causal, padding-aware `allowed_BTS` of a batch."""
    T = valid_BT.shape[1]
    positions_BT = positions_from_mask(valid_BT)
    cos_BTE, sin_BTE = rotary_angles(positions_BT, config.head_dim, config.rope_theta)
    causal_TS = jnp.tril(jnp.ones((T, T), dtype=bool))
    allowed_BTS = causal_TS[None] & valid_BT[:, None, :]
    return cos_BTE, sin_BTE, allowed_BTS


def _matmul_precision(dtype) -> jax.lax.Precision:
    # float32 models compare against float32 references to 1e-5, so their
    # matmuls must not drop to bfloat16 passes (the TPU default) or TF32.
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


class Block(nnx.Module):
    """One pre-norm decoder block: attention then SwiGLU MLP, each added to the stream."""

    def __init__(self, config: Qwen2Config, *, dtype, rngs: nnx.Rngs, stack=(), expand_kv: bool = False):
        precision = _matmul_precision(dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, stack=stack)
        self.attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            dtype=dtype,
            precision=precision,
            rngs=rngs,
            stack=stack,
            expand_kv=expand_kv,
        )
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, stack=stack)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype=dtype, precision=precision,
                       rngs=rngs, stack=stack)

    def __call__(self, x_BTD, cos_BTE, sin_BTE, allowed_BTS) -> BlockActivations:
        z_BTHE = self.attn.heads(self.input_norm(x_BTD), cos_BTE, sin_BTE, allowed_BTS)
        attn_out_BTD = self.attn.project(z_BTHE)
        resid_mid_BTD = x_BTD + attn_out_BTD

        mlp_out_BTD = self.mlp(self.post_norm(resid_mid_BTD))
        resid_post_BTD = resid_mid_BTD + mlp_out_BTD
        return BlockActivations(x_BTD, z_BTHE, attn_out_BTD, resid_mid_BTD, mlp_out_BTD, resid_post_BTD)

    def cached(self, x_BCD, cos_BCE, sin_BCE, allowed_BCS, k_cache_BSKE, v_cache_BSKE, start):
        """Run the block on `C` new positions against a key/value cache of `S` slots.

        The same steps as `__call__`, except that the new keys and values are
        written into the cache at slots `[start, start + C)` and the queries
        attend to the whole cache, as `allowed_BCS` permits.

        Returns:
            `(activations, k_cache_BSKE, v_cache_BSKE)` with the updated caches.
        """
        q_BCHE, k_BCKE, v_BCKE = self.attn.queries_keys_values(self.input_norm(x_BCD), cos_BCE, sin_BCE)
        k_cache_BSKE = jax.lax.dynamic_update_slice_in_dim(k_cache_BSKE, k_BCKE.astype(k_cache_BSKE.dtype),
                                                           start, axis=1)
        v_cache_BSKE = jax.lax.dynamic_update_slice_in_dim(v_cache_BSKE, v_BCKE.astype(v_cache_BSKE.dtype),
                                                           start, axis=1)
        z_BCHE = self.attn.attend(q_BCHE, k_cache_BSKE, v_cache_BSKE, allowed_BCS)
        attn_out_BCD = self.attn.project(z_BCHE)
        resid_mid_BCD = x_BCD + attn_out_BCD

        mlp_out_BCD = self.mlp(self.post_norm(resid_mid_BCD))
        resid_post_BCD = resid_mid_BCD + mlp_out_BCD
        acts = BlockActivations(x_BCD, z_BCHE, attn_out_BCD, resid_mid_BCD, mlp_out_BCD, resid_post_BCD)
        return acts, k_cache_BSKE, v_cache_BSKE


class Embed(nnx.Module):
    def __init__(self, vocab_size, width, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, width), dtype))

    def __call__(self, ids_BT):
        return jnp.take(self.embedding[...], ids_BT, axis=0)


class Unembed(nnx.Module):
    def __init__(self, width, vocab_size, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (width, vocab_size), dtype))


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM in Flax NNX.

    Parameters (shapes with the layer axis L first for blocks) and their
    Hugging Face names are listed in `jresid.checkpoint`.
    """

    def __init__(self, config: Qwen2Config, *, dtype=jnp.float32, rngs: nnx.Rngs, expand_kv: bool = False,
                 resid_sharding=None):
        """
        Args:
            expand_kv: expand key/value heads to one per query head before
                attention (used when a mesh replicates key/value heads).
            resid_sharding: a sharding to constrain the residual stream to
                between blocks, or None.
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.resid_sharding = resid_sharding
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.blocks = Block(config, dtype=dtype, rngs=rngs, stack=(config.num_hidden_layers,), expand_kv=expand_kv)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Unembed(
            config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs
        )

    def unembed_kernel(self) -> jax.Array:
        """`[D, V]`: the output layer, or the transposed embedding when tied."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        *,
        capture: CaptureSpec = CaptureSpec(),
        layer_fn: LayerFn | None = None,
        return_logits: bool = True,
        steering: SteeringTables | None = None,
    ) -> ForwardOutput:
        """Run the model on a padded batch.

        Args:
            input_ids_BT: token ids; padding ids may be any valid id.
            attention_mask_BT: 1 for real tokens, 0 for padding, on either
                side. `None` means no padding.
            capture: which capture points to return.
            layer_fn: called once per block as `layer_fn(block, activations,
                valid_BT, layer)`, with `layer` the block's index as a traced
                integer; its results are stacked over layers.
            return_logits: skip the output layer when False.
            steering: intervention tables from
                `jresid.interventions.compile_interventions`, or None.
        """
        config = self.config
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            valid_BT = jnp.ones((B, T), dtype=bool)
        else:
            valid_BT = attention_mask_BT.astype(bool)

        cos_BTE, sin_BTE, allowed_BTS = attention_inputs(config, valid_BT)

        x_BTD = self.embed(input_ids_BT)
        captures = {}
        if capture.embed:
            captures[HOOK_EMBED] = x_BTD

        x_BTD, buffers, layer_outputs = self._scan_blocks(
            x_BTD, cos_BTE, sin_BTE, allowed_BTS, valid_BT, capture, layer_fn, steering
        )
        for point, layers in capture.block_layers:
            for slot, layer in enumerate(layers):
                captures[block_name(layer, point)] = buffers[point][slot]

        logits_BTV = None
        if capture.ln_final or return_logits:
            normalized_BTD = rms_normalize(x_BTD, config.rms_norm_eps)
            if capture.ln_final:
                captures[LN_FINAL] = normalized_BTD
            if return_logits:
                logits_BTV = self.unembed(normalized_BTD, x_BTD.dtype)
        return ForwardOutput(logits_BTV, captures, layer_outputs)

    def unembed(self, normalized_BTD: jax.Array, dtype) -> jax.Array:
        """Apply the final norm's gain and the output layer: float32 logits `[B, T, V]`.

        Args:
            normalized_BTD: the RMS-normalised final stream (`ln_final.hook_normalized`).
            dtype: the residual stream's dtype, which the gain is applied in.
        """
        final_BTD = self.final_norm.weight[...] * normalized_BTD.astype(dtype)
        return jnp.einsum(
            "btd,dv->btv",
            final_BTD,
            self.unembed_kernel(),
            precision=_matmul_precision(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def _scan_blocks(self, x_BTD, cos_BTE, sin_BTE, allowed_BTS, valid_BT, capture, layer_fn, steering=None):
        config = self.config
        L = config.num_hidden_layers
        B, T, D = x_BTD.shape

        # One buffer per requested point, one slot per requested layer; a
        # layer that was not requested writes to no slot.
        buffers = {}
        slot_tables = {}
        for point, layers in capture.block_layers:
            width = (config.num_attention_heads, D) if point == "attn.hook_result" else (D,)
            dtype = x_BTD.dtype
            buffers[point] = jnp.zeros((len(layers), B, T, *width), dtype=dtype)
            table = np.full((L,), -1, dtype=np.int32)
            table[list(layers)] = np.arange(len(layers), dtype=np.int32)
            slot_tables[point] = jnp.asarray(table)

        graphdef, stacked_state = nnx.split(self.blocks)
        resid_sharding = self.resid_sharding

        def body(carry, scanned):
            x_BTD, buffers = carry
            if resid_sharding is not None:
                x_BTD = jax.lax.with_sharding_constraint(x_BTD, resid_sharding)
            layer, layer_state = scanned
            block = nnx.merge(graphdef, layer_state)
            measured_block = block
            if steering is not None:
                x_BTD = steering.edit_input(x_BTD, layer)
            acts = block(x_BTD, cos_BTE, sin_BTE, allowed_BTS)
            measured = acts
            if steering is not None:
                acts, measured, measured_block = steer_block_output(block, acts, steering, layer,
                                                                    layer_fn is not None)

            new_buffers = {}
            for point, buffer in buffers.items():
                slot = slot_tables[point][layer]
                value = _capture_value(block, acts, point)
                index = jnp.maximum(slot, 0)
                kept = jax.lax.dynamic_index_in_dim(buffer, index, axis=0, keepdims=False)
                value = jnp.where(slot >= 0, value.astype(buffer.dtype), kept)
                new_buffers[point] = jax.lax.dynamic_update_index_in_dim(buffer, value, index, axis=0)

            outputs = None if layer_fn is None else layer_fn(measured_block, measured, valid_BT, layer)
            return (acts.resid_post, new_buffers), outputs

        (x_BTD, buffers), layer_outputs = jax.lax.scan(
            body, (x_BTD, buffers), (jnp.arange(L), stacked_state)
        )
        return x_BTD, buffers, layer_outputs


def steer_block_output(block: Block, acts: BlockActivations, steering: SteeringTables, layer: jax.Array,
                       measure: bool) -> tuple[BlockActivations, BlockActivations, Block]:
    """Apply a block's output interventions.

    Returns:
        `(flowing, measured, measured_block)`.
        `flowing` are the activations whose `resid_post` carries every edit
        into the next block. `measured` are the activations the metrics
        read, where a subspace edit is part of the update and an addition
        is not. `measured_block` is a block whose output kernel carries the
        subspace edit, so that each head's result does too. Without a
        subspace edit, `measured` is `acts` and `measured_block` is `block`.
    """
    measured, measured_block = acts, block
    resid_post_BTD = acts.resid_post
    if steering.gain_L is not None:
        resid_post_BTD = steering.edit_update(acts.resid_pre, acts.resid_post, layer)
        if measure:
            attn_out_BTD = steering.edit_component(acts.attn_out, acts.attn_out, layer)
            measured = acts._replace(
                attn_out=attn_out_BTD,
                resid_mid=acts.resid_pre + attn_out_BTD,
                mlp_out=steering.edit_component(acts.mlp_out, acts.mlp_out, layer),
                resid_post=resid_post_BTD,
            )
            graphdef, state = nnx.split(block)
            measured_block = nnx.merge(graphdef, state)
            measured_block.attn.o_kernel[...] = steering.edit_output_kernel(block.attn.o_kernel[...], layer)
    flowing = acts._replace(resid_post=steering.add_output(resid_post_BTD, layer))
    return flowing, measured, measured_block


def _capture_value(block: Block, acts: BlockActivations, point: str) -> jax.Array:
    if point == "attn.hook_result":
        return block.attn.head_results(acts.z)
    return {
        "hook_resid_pre": acts.resid_pre,
        "hook_attn_out": acts.attn_out,
        "hook_resid_mid": acts.resid_mid,
        "hook_mlp_out": acts.mlp_out,
        "hook_resid_post": acts.resid_post,
    }[point]
