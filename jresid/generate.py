"""Text generation with a key/value cache: greedy or sampled, batched, with or without interventions.

One `jax.jit` program runs the whole generation. It first runs the prompt
through every block, writing each block's keys and values into a cache of
`T + N` slots (`T` prompt positions, `N` new tokens). Then a `jax.lax.scan`
over the new tokens runs one position at a time: the new token's keys and
values go into the next slot, and its queries attend to every filled slot.

Prompts are left-padded, so every row's next token goes into the same cache
slot; `generate` moves right-padded prompts to the left itself. Rotary
positions count real tokens only, so a padded prompt continues exactly as
it would alone.

Interventions (`jresid.interventions`) apply at every position, prompt and
new tokens alike, as in the full forward pass.

NOTE: generation has been tested on one device only. On a device mesh the
parameters keep their shardings, but the cache and the batch get no
sharding constraints.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jresid.interventions import SteeringTables
from jresid.model.norm import rms_normalize
from jresid.model.positions import positions_from_mask, rotary_angles
from jresid.model.transformer import steer_block_output
from jresid.pretrained import Model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationResult:
    """Result of `generate`: the new tokens, their counts and, on request, the logits.

    Attributes:
        tokens: `[B, N]` int32 new token ids. After a row's end-of-text
            token, the row contains `eos_token_id`.
        lengths: `[B]` number of new tokens up to and including the first
            end-of-text token (N when there is none).
        prompt_ids: `[B, T]` the prompts, left-padded.
        prompt_mask: `[B, T]` 1 at real prompt tokens.
        logits: `[B, N, V]` float32 logits from which each new token was
            chosen (before temperature and top-k), when requested.
        eos_token_id: the end-of-text token generation stopped at, or None.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    logits: np.ndarray | None = None
    eos_token_id: int | None = None

    def sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """Return `(ids, mask)` `[B, T + N]`: each left-padded prompt followed by its new tokens.

        Tokens after a row's end-of-text token are marked as padding.
        """
        new_mask = np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]
        ids = np.concatenate([self.prompt_ids, self.tokens], axis=1)
        mask = np.concatenate([self.prompt_mask, new_mask.astype(np.int32)], axis=1)
        return ids, mask

    def texts(self, tokenizer) -> list[str]:
        """Decode each row's new tokens, up to but excluding its end-of-text token."""
        out = []
        for row, length in zip(self.tokens, self.lengths):
            ids = [int(token) for token in row[: int(length)]]
            if ids and self.eos_token_id is not None and ids[-1] == self.eos_token_id:
                ids = ids[:-1]
            out.append(tokenizer.decode(ids))
        return out


def left_pad(ids_BT: np.ndarray, mask_BT: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens to the right end, keeping their order.

    Works for right padding, left padding and padding in between.
    """
    ids_BT = np.asarray(ids_BT)
    mask_BT = np.asarray(mask_BT).astype(bool)
    out_ids = np.full(ids_BT.shape, pad_id, dtype=np.int32)
    out_mask = np.zeros(ids_BT.shape, dtype=np.int32)
    width = ids_BT.shape[1]
    for row in range(ids_BT.shape[0]):
        real = ids_BT[row][mask_BT[row]]
        out_ids[row, width - real.size:] = real
        out_mask[row, width - real.size:] = 1
    return out_ids, out_mask


def _check_settings(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; use an integer >= 1")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not np.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature={temperature!r} is invalid; use a finite number >= 0 (0 is greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is invalid; use an integer >= 0 (0 keeps the whole vocabulary)")


def generate(
    model: Model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    key: jax.Array | int = 0,
    interventions=None,
    eos_token_id: int | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Continue each prompt by `max_new_tokens` tokens, with a key/value cache.

    Args:
        model: a model from `jresid.from_pretrained`.
        input_ids: `[B, T]` or `[T]` token ids, padded on either side.
        attention_mask: 1 for real tokens, 0 for padding; None for none.
        max_new_tokens: tokens to add to every row, >= 1.
        temperature: 0 picks the most likely token (greedy); above 0 samples
            from `softmax(logits / temperature)`.
        top_k: when sampling, draw only from the `top_k` most likely tokens;
            0 keeps the whole vocabulary. Ignored when greedy.
        key: a `jax.random` key or an integer seed; sampling is reproducible
            for a given key, batch and settings.
        interventions: a `jresid.interventions.Intervention` or a list of
            them, applied at every position.
        eos_token_id: stop a row at this token (later positions repeat it);
            None generates `max_new_tokens` for every row.
        return_logits: also return the `[B, N, V]` logits of every step.

    Raises:
        ValueError: an invalid setting, or a prompt plus `max_new_tokens`
            longer than the model's `max_position_embeddings`, before any
            compute.
    """
    _check_settings(max_new_tokens, temperature, top_k)
    if eos_token_id is not None and not 0 <= int(eos_token_id) < model.config.vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id!r} is outside the vocabulary [0, {model.config.vocab_size})")
    ids_BT, mask_BT = model.prepare_inputs(input_ids, attention_mask)
    ids_BT, mask_BT = left_pad(np.asarray(ids_BT), np.asarray(mask_BT))
    longest = int(mask_BT.sum(axis=1).max())
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens")
    steering = model.steering_tables(interventions)
    if isinstance(key, numbers.Integral):
        key = jax.random.key(int(key))

    vocab = model.config.vocab_size
    top_k = 0 if top_k >= vocab else int(top_k)
    logger.info("generating %d tokens for %d prompts of up to %d tokens", max_new_tokens, ids_BT.shape[0],
                ids_BT.shape[1])
    tokens_BN, lengths_B, logits_BNV = _generate_program(
        model.graphdef, model.state, jnp.asarray(ids_BT), jnp.asarray(mask_BT), steering, key,
        jnp.float32(max(temperature, 1e-30)), int(max_new_tokens), temperature == 0, top_k,
        None if eos_token_id is None else int(eos_token_id), return_logits,
    )
    result = GenerationResult(
        tokens=np.asarray(tokens_BN),
        lengths=np.asarray(lengths_B),
        prompt_ids=ids_BT,
        prompt_mask=mask_BT,
        logits=None if logits_BNV is None else np.asarray(logits_BNV),
        eos_token_id=None if eos_token_id is None else int(eos_token_id),
    )
    return result


def _choose(logits_BV, key, temperature, greedy: bool, top_k: int):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
        scaled_BV = jnp.where(scaled_BV >= kth_B1, scaled_BV, -jnp.inf)
    return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)


def _run_cached(module, graphdef, stacked_state, x_BCD, positions_BC, allowed_BCS, cache, start,
                steering: SteeringTables | None):
    """Run every block on `C` new positions; return the final stream and the updated cache."""
    config = module.config
    cos_BCE, sin_BCE = rotary_angles(positions_BC, config.head_dim, config.rope_theta)

    def body(x_BCD, scanned):
        layer, layer_state, k_cache_BSKE, v_cache_BSKE = scanned
        block = nnx.merge(graphdef, layer_state)
        if steering is not None:
            x_BCD = steering.edit_input(x_BCD, layer)
        acts, k_cache_BSKE, v_cache_BSKE = block.cached(x_BCD, cos_BCE, sin_BCE, allowed_BCS, k_cache_BSKE,
                                                        v_cache_BSKE, start)
        if steering is not None:
            acts, _, _ = steer_block_output(block, acts, steering, layer, measure=False)
        return acts.resid_post, (k_cache_BSKE, v_cache_BSKE)

    k_cache_LBSKE, v_cache_LBSKE = cache
    layers = jnp.arange(config.num_hidden_layers)
    x_BCD, cache = jax.lax.scan(body, x_BCD, (layers, stacked_state, k_cache_LBSKE, v_cache_LBSKE))
    return x_BCD, cache


def _last_logits(module, x_BCD):
    normalized_BD = rms_normalize(x_BCD[:, -1:], module.config.rms_norm_eps)
    return module.unembed(normalized_BD, x_BCD.dtype)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11))
def _generate_program(graphdef, state, ids_BT, mask_BT, steering, key, temperature, max_new_tokens: int,
                      greedy: bool, top_k: int, eos_token_id: int | None, return_logits: bool):
    module = nnx.merge(graphdef, state)
    config = module.config
    block_graphdef, stacked_state = nnx.split(module.blocks)
    B, T = ids_BT.shape
    N = max_new_tokens
    S = T + N
    L, K, E = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    dtype = module.dtype
    cache = (jnp.zeros((L, B, S, K, E), dtype), jnp.zeros((L, B, S, K, E), dtype))

    valid_BT = mask_BT.astype(bool)
    filled_BS = jnp.concatenate([valid_BT, jnp.ones((B, N), dtype=bool)], axis=1)
    slots_S = jnp.arange(S)

    # Prompt: causal attention over the first T slots; the slots of new tokens lie in every query's future.
    allowed_BTS = (slots_S[None, None, :] <= jnp.arange(T)[None, :, None]) & filled_BS[:, None, :]
    x_BTD, cache = _run_cached(module, block_graphdef, stacked_state, module.embed(ids_BT),
                               positions_from_mask(valid_BT), allowed_BTS, cache, 0, steering)
    logits_BV = _last_logits(module, x_BTD)
    prompt_lengths_B = jnp.sum(valid_BT, axis=1).astype(jnp.int32)

    def pick(logits_BV, key, finished_B):
        token_B = _choose(logits_BV, key, temperature, greedy, top_k)
        if eos_token_id is not None:
            token_B = jnp.where(finished_B, eos_token_id, token_B)
            finished_B = finished_B | (token_B == eos_token_id)
        return token_B, finished_B

    key, first_key = jax.random.split(key)
    finished_B = jnp.zeros((B,), dtype=bool)
    first_token_B, finished_B = pick(logits_BV, first_key, finished_B)
    # A row's length counts tokens up to and including its first end-of-text token.
    length_B = jnp.ones((B,), jnp.int32)

    def step(carry, index):
        cache, token_B, finished_B, length_B, key = carry
        slot = T + index
        allowed_B1S = (slots_S[None, None, :] <= slot) & filled_BS[:, None, :]
        positions_B1 = (prompt_lengths_B + index)[:, None]
        x_B1D, cache = _run_cached(module, block_graphdef, stacked_state, module.embed(token_B[:, None]),
                                   positions_B1, allowed_B1S, cache, slot, steering)
        logits_BV = _last_logits(module, x_B1D)
        key, step_key = jax.random.split(key)
        length_B = length_B + (~finished_B).astype(jnp.int32)
        token_B, finished_B = pick(logits_BV, step_key, finished_B)
        emitted = (token_B, logits_BV if return_logits else None)
        return (cache, token_B, finished_B, length_B, key), emitted

    carry = (cache, first_token_B, finished_B, length_B, key)
    (_, _, _, length_B, _), (later_tokens_MB, later_logits_MBV) = jax.lax.scan(step, carry, jnp.arange(N - 1))
    tokens_BN = jnp.concatenate([first_token_B[:, None], later_tokens_MB.T], axis=1)
    logits_BNV = None
    if return_logits:
        logits_BNV = jnp.concatenate([logits_BV[:, None], jnp.swapaxes(later_logits_MBV, 0, 1)], axis=1)
    return tokens_BN, length_B, logits_BNV
