"""Learned steering vectors: optimise an added vector toward a mode's metric signature.

A vector `v` is added to the residual stream at one layer and point (an
"add" intervention with `alpha = 1`). The loss has two terms, both computed
in one differentiable forward pass that also runs the metrics:

    loss(v) = signature(v) + kl_weight * KL(p_unsteered || p_steered)

* `signature` pushes the metrics of the later layers toward the target
  mode's levels (`jresid.modes`). For each metric that the mode constrains,
  a token pays the squared distance of its value to the calibration's
  tercile range for that level. The distance is in units of the layer's
  tercile spread `high - low`. For "high" that is `relu(high - x) / spread`, for "low"
  `relu(x - low) / spread`, and for "medium" the distance to `[low, high]`.
  The mean runs over valid tokens with a finite value in the target layers.
* the KL term is the mean over valid tokens of the KL divergence of the
  steered next-token distribution from the unsteered one, so the vector
  keeps the model's predictions close to what they were.

Optax's Adam takes the steps. After each step `v` is projected back onto the
ball `||v|| <= max_norm`. The loop stops when the loss has not improved by
more than `tol` (relative) for `patience` steps, or after `steps` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jresid import modes as modes_lib
from jresid.interventions import POINTS, Intervention, SteeringTables
from jresid.metrics import MetricOptions
from jresid.pretrained import Model
from jresid.steering.directions import STEERABLE_MODES

logger = logging.getLogger(__name__)

# The level each mode requires of each metric, as in the table of jresid.modes.
MODE_SIGNATURES = {
    "refinement": (("energy", "low"), ("expansion", "low"), ("complexity", "low")),
    "recall": (("energy", "medium"), ("expansion", "high"), ("complexity", "low")),
    "reasoning": (("energy", "high"), ("expansion", "high"), ("complexity", "high")),
}


@dataclasses.dataclass
class LearnedVector:
    """A steering vector found by `learn_steering_vector`, and how the search went.

    Attributes:
        vector: `[D]` float32, the vector to add.
        layer, point: where it is added.
        mode: the target mode.
        max_norm: the norm bound it was held to.
        history: one dict per step with `loss`, `signature` and `kl`
            (before that step's update), and the vector's `norm`.
        converged: True when the loss stopped improving before the step
            budget ran out.
    """

    vector: np.ndarray
    layer: int
    point: str
    mode: str
    max_norm: float
    history: list[dict[str, float]]
    converged: bool

    def intervention(self, alpha: float = 1.0) -> Intervention:
        """Return the "add" intervention of `alpha` times the vector."""
        return Intervention(layer=self.layer, operation="add", vector=self.vector, alpha=alpha, point=self.point)


def target_layers(layer: int, point: str, num_layers: int) -> tuple[int, ...]:
    """Return the layers whose updates an addition at `layer` and `point` can change.

    Raises:
        ValueError: the point is the output of the last block, which no
            later block reads.
    """
    first = layer if point == "hook_resid_pre" else layer + 1
    if first >= num_layers:
        raise ValueError(f"a vector added at {point} of layer {layer} changes no later block's update in a model "
                         f"with {num_layers} blocks; choose an earlier layer or point hook_resid_pre")
    return tuple(range(first, num_layers))


def signature_penalty(values: dict[str, jax.Array], calibration: modes_lib.Calibration, valid_BT: jax.Array,
                      layers_L: jax.Array, mode: str) -> jax.Array:
    """Return the mean squared distance of the metrics to `mode`'s tercile ranges (see the module docstring).

    Args:
        values: `[B, L, T]` arrays of "energy", "expansion" and "complexity".
        calibration: the tercile boundaries, `[L, 2]` per metric.
        valid_BT: real tokens.
        layers_L: 1.0 for the layers that count, 0.0 for the rest.
        mode: the target mode.
    """
    total = jnp.float32(0.0)
    for metric, level in MODE_SIGNATURES[mode]:
        boundaries_L2 = jnp.asarray(calibration.boundaries(metric), jnp.float32)
        low_L11, high_L11 = boundaries_L2[:, 0][:, None, None], boundaries_L2[:, 1][:, None, None]
        x_LBT = jnp.swapaxes(values[metric], 0, 1)
        usable_LBT = (valid_BT[None] & jnp.isfinite(x_LBT) & jnp.isfinite(low_L11) & jnp.isfinite(high_L11)
                      & (layers_L[:, None, None] > 0))
        # Replace unusable entries before any arithmetic, so that their NaN cannot reach the gradient.
        low_L11 = jnp.where(jnp.isfinite(low_L11), low_L11, 0.0)
        high_L11 = jnp.where(jnp.isfinite(high_L11), high_L11, 0.0)
        x_LBT = jnp.where(usable_LBT, x_LBT, low_L11)
        spread_L11 = jnp.maximum(high_L11 - low_L11, 1e-6 * (jnp.abs(high_L11) + jnp.abs(low_L11)) + 1e-12)
        if level == "high":
            gap_LBT = jax.nn.relu(high_L11 - x_LBT)
        elif level == "low":
            gap_LBT = jax.nn.relu(x_LBT - low_L11)
        else:
            gap_LBT = jax.nn.relu(low_L11 - x_LBT) + jax.nn.relu(x_LBT - high_L11)
        penalty_LBT = jnp.where(usable_LBT, (gap_LBT / spread_L11) ** 2, 0.0)
        total = total + penalty_LBT.sum() / jnp.maximum(usable_LBT.sum(), 1)
    return total / len(MODE_SIGNATURES[mode])


def _mean_kl(base_logp_BTV, logits_BTV, valid_BT) -> jax.Array:
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    kl_BT = jnp.sum(jnp.exp(base_logp_BTV) * (base_logp_BTV - logp_BTV), axis=-1)
    return jnp.sum(jnp.where(valid_BT, kl_BT, 0.0)) / jnp.maximum(valid_BT.sum(), 1)


def steering_loss(module, vector_D, ids_BT, mask_BT, base_logp_BTV, calibration, layers_L, kl_weight,
                  *, layer: int, point: str, mode: str, options: MetricOptions):
    """Return `(loss, (signature, kl))` of the vector added at `layer` and `point`.

    Differentiable in `vector_D`: the forward pass, the metrics and both
    terms are JAX functions of it.
    """
    from jresid.analyze import METRIC_NAMES, block_metrics

    num_layers, width = module.config.num_hidden_layers, module.config.hidden_size
    table_LD = jnp.zeros((num_layers, width), jnp.float32).at[layer].set(vector_D)
    steering = SteeringTables(**{("add_pre_LD" if point == "hook_resid_pre" else "add_post_LD"): table_LD})
    output = module(ids_BT, mask_BT, layer_fn=functools.partial(block_metrics, options=options),
                    return_logits=True, steering=steering)
    values = {name: jnp.swapaxes(getattr(output.layer_outputs, name), 0, 1) for name in METRIC_NAMES}
    valid_BT = mask_BT.astype(bool)
    signature = signature_penalty(values, calibration, valid_BT, layers_L, mode)
    kl = _mean_kl(base_logp_BTV, output.logits, valid_BT)
    return signature + kl_weight * kl, (signature, kl)


@functools.partial(jax.jit, static_argnums=(0, 9, 10, 11, 12))
def _loss_and_grad(graphdef, state, vector_D, ids_BT, mask_BT, base_logp_BTV, calibration, layers_L, kl_weight,
                   layer: int, point: str, mode: str, options: MetricOptions):
    module = nnx.merge(graphdef, state)
    loss_fn = functools.partial(steering_loss, module, layer=layer, point=point, mode=mode, options=options)
    return jax.value_and_grad(loss_fn, has_aux=True)(vector_D, ids_BT, mask_BT, base_logp_BTV, calibration,
                                                     layers_L, kl_weight)


@functools.partial(jax.jit, static_argnums=(0,))
def _base_log_probs(graphdef, state, ids_BT, mask_BT):
    module = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(module(ids_BT, mask_BT).logits, axis=-1)


def _boundary_arrays(calibration: modes_lib.Calibration) -> modes_lib.Calibration:
    # Metadata stays out of the compiled program, as in jresid.analyze.
    return dataclasses.replace(
        calibration, options=None, model_id="", tokens=None,
        energy=jnp.asarray(calibration.energy, jnp.float32),
        expansion=jnp.asarray(calibration.expansion, jnp.float32),
        complexity=jnp.asarray(calibration.complexity, jnp.float32))


def project_to_ball(vector_D: jax.Array, max_norm: float) -> jax.Array:
    """Scale `vector_D` down onto the ball of radius `max_norm` when it lies outside."""
    norm = jnp.linalg.norm(vector_D)
    return vector_D * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))


def _check_number(name: str, value: Any, *, minimum: float, inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid; use a finite number")
    if value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name}={value!r} is invalid; use a number {bound}")
    return float(value)


def learn_steering_vector(
    model: Model,
    input_ids,
    attention_mask=None,
    *,
    layer: int,
    mode: str,
    calibration: modes_lib.Calibration,
    point: str = "hook_resid_post",
    steps: int = 100,
    max_norm: float | None = None,
    learning_rate: float | None = None,
    kl_weight: float = 1.0,
    tol: float = 1e-3,
    patience: int = 10,
    log_every: int = 10,
    init: np.ndarray | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    options: MetricOptions | None = None,
) -> LearnedVector:
    """Optimise a vector added at `layer` and `point` toward `mode`'s metric signature.

    Args:
        model: the model.
        input_ids, attention_mask: the prompts the loss averages over.
        layer: block index.
        mode: "refinement", "recall" or "reasoning".
        calibration: tercile boundaries that define the mode's levels, for
            instance `ModeDirections.calibration`.
        point: "hook_resid_post" (default) or "hook_resid_pre".
        steps: most optimisation steps, >= 1.
        max_norm: norm bound of the vector; None uses the mean norm of the
            residual stream at that point over the valid tokens.
        learning_rate: Adam's step size; None uses `max_norm / (10 sqrt(D))`,
            so that reaching the bound takes at least about 10 steps.
        kl_weight: weight of the KL term, >= 0.
        tol: relative loss improvement below which a step counts as none.
        patience: steps without improvement before stopping.
        log_every: log progress every this many steps.
        init: starting vector `[D]`; None starts at zero.
        callback: called as `callback(step, record)` after every step.
        options: metric options (default: `MetricOptions()`).

    Raises:
        ValueError: an invalid argument, before any compute.
    """
    config = model.config
    if mode not in STEERABLE_MODES:
        raise ValueError(f"mode={mode!r} is invalid; use one of {', '.join(STEERABLE_MODES)}")
    if point not in POINTS:
        raise ValueError(f"point={point!r} is invalid; use one of {', '.join(POINTS)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"layer={layer!r} is out of range for a model with {config.num_hidden_layers} blocks; "
                         f"use 0 to {config.num_hidden_layers - 1}")
    layers = target_layers(layer, point, config.num_hidden_layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid; use an integer >= 1")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r} is invalid; use an integer >= 1")
    kl_weight = _check_number("kl_weight", kl_weight, minimum=0.0, inclusive=True)
    tol = _check_number("tol", tol, minimum=0.0, inclusive=True)
    if max_norm is not None:
        max_norm = _check_number("max_norm", max_norm, minimum=0.0, inclusive=False)
    if learning_rate is not None:
        learning_rate = _check_number("learning_rate", learning_rate, minimum=0.0, inclusive=False)
    calibration.check_compatible(config.num_hidden_layers)
    options = MetricOptions() if options is None else options

    ids_BT, mask_BT = model.prepare_inputs(input_ids, attention_mask)
    valid_BT = np.asarray(mask_BT).astype(bool)
    if max_norm is None:
        _, cache = model.run_with_cache(ids_BT, mask_BT, names_filter=f"blocks.{layer}.{point}")
        stream_BTD = np.asarray(cache[f"blocks.{layer}.{point}"], dtype=np.float64)
        max_norm = float(np.linalg.norm(stream_BTD[valid_BT], axis=-1).mean())
    width = config.hidden_size
    if learning_rate is None:
        learning_rate = max_norm / (10.0 * math.sqrt(width))

    base_logp_BTV = _base_log_probs(model.graphdef, model.state, ids_BT, mask_BT)
    boundaries = _boundary_arrays(calibration)
    layers_L = jnp.asarray([1.0 if index in layers else 0.0 for index in range(config.num_hidden_layers)])

    vector_D = jnp.zeros((width,), jnp.float32) if init is None else jnp.asarray(init, jnp.float32)
    if vector_D.shape != (width,):
        raise ValueError(f"init has shape {vector_D.shape}, expected ({width},)")
    vector_D = project_to_ball(vector_D, max_norm)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(vector_D)

    logger.info("learning a %s vector at blocks.%d.%s: up to %d steps, max norm %.4g, learning rate %.3g, "
                "KL weight %g, target layers %s", mode, layer, point, steps, max_norm, learning_rate, kl_weight,
                list(layers))
    history: list[dict[str, float]] = []
    best_loss, best_vector, since_best = math.inf, vector_D, 0
    converged = False
    for step in range(steps):
        # Through the host, so that the vector reaches jit uncommitted, as in `loss_of`, and both
        # share one compiled program.
        (loss, (signature, kl)), grad_D = _loss_and_grad(
            model.graphdef, model.state, jnp.asarray(np.asarray(vector_D), jnp.float32), ids_BT, mask_BT,
            base_logp_BTV, boundaries, layers_L, jnp.float32(kl_weight), layer, point, mode, options)
        loss = float(loss)
        if not (math.isfinite(loss) and bool(jnp.all(jnp.isfinite(grad_D)))):
            raise FloatingPointError(f"the steering loss or its gradient is not finite at step {step} "
                                     f"(loss {loss}); lower learning_rate or max_norm")
        record = {"step": step, "loss": loss, "signature": float(signature), "kl": float(kl),
                  "norm": float(jnp.linalg.norm(vector_D))}
        history.append(record)
        if not math.isfinite(best_loss) or loss < best_loss - tol * abs(best_loss):
            best_loss, best_vector, since_best = loss, vector_D, 0
        else:
            since_best += 1
        if step % log_every == 0 or step == steps - 1:
            logger.info("step %d: loss %.5g (signature %.5g, KL %.5g), norm %.4g", step, loss, record["signature"],
                        record["kl"], record["norm"])
        if callback is not None:
            callback(step, record)
        if since_best >= patience:
            converged = True
            logger.info("stopped at step %d: no improvement above %g for %d steps", step, tol, patience)
            break
        updates_D, opt_state = optimizer.update(grad_D, opt_state, vector_D)
        vector_D = project_to_ball(optax.apply_updates(vector_D, updates_D), max_norm)

    return LearnedVector(vector=np.asarray(best_vector), layer=layer, point=point, mode=mode, max_norm=max_norm,
                         history=history, converged=converged)


def loss_of(model: Model, vector, input_ids, attention_mask, *, layer: int, mode: str,
            calibration: modes_lib.Calibration, point: str = "hook_resid_post", kl_weight: float = 1.0,
            options: MetricOptions | None = None) -> tuple[float, float, float, np.ndarray]:
    """Evaluate the steering loss and its gradient for one vector.

    Returns:
        `(loss, signature, kl, gradient)` with the gradient `[D]` as NumPy.
    """
    options = MetricOptions() if options is None else options
    ids_BT, mask_BT = model.prepare_inputs(input_ids, attention_mask)
    layers = target_layers(layer, point, model.config.num_hidden_layers)
    layers_L = jnp.asarray([1.0 if index in layers else 0.0 for index in range(model.config.num_hidden_layers)])
    base_logp_BTV = _base_log_probs(model.graphdef, model.state, ids_BT, mask_BT)
    boundaries = _boundary_arrays(calibration)
    (loss, (signature, kl)), grad_D = _loss_and_grad(
        model.graphdef, model.state, jnp.asarray(vector, jnp.float32), ids_BT, mask_BT, base_logp_BTV, boundaries,
        layers_L, jnp.float32(kl_weight), layer, point, mode, options)
    return float(loss), float(signature), float(kl), np.asarray(grad_D)


__all__: Sequence[str] = [
    "MODE_SIGNATURES",
    "LearnedVector",
    "learn_steering_vector",
    "loss_of",
    "project_to_ball",
    "signature_penalty",
    "steering_loss",
    "target_layers",
]
