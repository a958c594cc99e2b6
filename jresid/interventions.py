"""Interventions: edits of the residual stream applied inside the forward pass.

The capture points `blocks.{l}.hook_resid_pre` and `blocks.{l}.hook_resid_post`
double as intervention points. An `Intervention` names a layer, a point and an
operation:

    add      x <- x + alpha * vector           at hook_resid_pre or hook_resid_post
    scale    u <- u + alpha * P u              at hook_resid_post
    ablate   u <- u - alpha * P u              at hook_resid_post

where `u = resid_post - resid_pre` is the block's update and `P = B^T B`
projects onto the span of the rows of `basis` (orthonormalised here). So
`scale` multiplies the update's component in the subspace by `1 + alpha`, and
`ablate` with `alpha = 1` removes it.

What each consumer of the forward pass reads:

* The residual stream and the captures carry every edit: the next block
  reads the edited stream, and `hook_resid_pre`/`hook_resid_post` return the
  edited values. `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out` and
  `attn.hook_result` return what the block computed, because `scale` and
  `ablate` act on the block's output only (the MLP reads the unedited
  attention output).
* The metrics (a `layer_fn`) measure what the block wrote. `scale` and
  `ablate` are part of the update and apply to every component (each head's
  result and the MLP output), so the components still sum to the update.
  An `add` is not part of any block's update and changes only what later
  blocks read.

`compile_interventions` turns a list of interventions into `SteeringTables`:
per-layer arrays that the scan over blocks indexes by layer. Layers without
an intervention get zero rows, and a zero row leaves every value bit for bit
unchanged (`x + 0 == x` for finite x), so `alpha = 0` reproduces the
unsteered numbers exactly. The tables are traced arrays, so changing `alpha`
or the vectors does not recompile the program.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OPERATIONS = ("add", "scale", "ablate")
POINTS = ("hook_resid_pre", "hook_resid_post")

# Rows of a basis whose singular value is at or below this fraction of the
# largest are dropped as linearly dependent before orthonormalising.
_BASIS_RTOL = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of the residual stream at one layer.

    Attributes:
        layer: Block index, 0-based.
        operation: "add", "scale" or "ablate" (see the module docstring).
        vector: For "add", the `[D]` vector added (times `alpha`). For
            "scale" and "ablate", a `[k, D]` (or `[D]`) basis whose rows span
            the subspace; they need not be orthonormal.
        alpha: Strength, a finite number. 0 leaves the model unchanged.
        point: "hook_resid_pre" or "hook_resid_post". "scale" and "ablate"
            act on the block's update, so they need "hook_resid_post".
    """

    layer: int
    operation: str
    vector: Any
    alpha: float = 1.0
    point: str = "hook_resid_post"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} is invalid; use a block index >= 0")
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation={self.operation!r} is invalid; use one of {', '.join(OPERATIONS)}")
        if self.point not in POINTS:
            raise ValueError(f"point={self.point!r} is invalid; use one of {', '.join(POINTS)}")
        if self.operation != "add" and self.point != "hook_resid_post":
            raise ValueError(
                f"operation {self.operation!r} edits the block's update, which exists only at hook_resid_post; "
                f"got point={self.point!r}"
            )
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)
                or not math.isfinite(self.alpha)):
            raise ValueError(f"alpha={self.alpha!r} is invalid; use a finite number")
        vector = np.asarray(self.vector, dtype=np.float64)
        if self.operation == "add" and vector.ndim != 1:
            raise ValueError(f"an 'add' vector must be [D], got shape {vector.shape}")
        if self.operation != "add":
            if vector.ndim == 1:
                vector = vector[None]
            if vector.ndim != 2 or vector.shape[0] == 0:
                raise ValueError(f"a {self.operation!r} basis must be [k, D] with k >= 1, got shape {vector.shape}")
        if not np.isfinite(vector).all():
            raise ValueError(f"the {self.operation!r} vector at layer {self.layer} has non-finite entries")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "vector", vector)

    @property
    def width(self) -> int:
        return int(self.vector.shape[-1])


def orthonormal_rows(basis_KD: np.ndarray) -> np.ndarray:
    """Return an orthonormal basis `[k', D]` of the row span of `basis_KD`, in float64.

    Rows that are linearly dependent on the others (singular value at or
    below 1e-6 of the largest) are dropped, so `k' <= k`.

    Raises:
        ValueError: every row is zero.
    """
    basis_KD = np.asarray(basis_KD, dtype=np.float64)
    _, sigma, vt = np.linalg.svd(basis_KD, full_matrices=False)
    if sigma.size == 0 or sigma[0] == 0.0:
        raise ValueError("the basis is zero; it spans no subspace to scale or ablate")
    return vt[sigma > _BASIS_RTOL * sigma[0]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SteeringTables:
    """Per-layer intervention arrays that the scan over blocks reads; a pytree.

    A field is None when no intervention needs it, so a forward pass with
    only `add` interventions computes no projection.

    Attributes:
        add_pre_LD: float32 vector added to the stream entering each block.
        add_post_LD: float32 vector added to the stream leaving each block.
        gain_L: float32 gain of the update's subspace component per block
            (alpha for "scale", -alpha for "ablate", 0 elsewhere).
        basis_LKD: float32 orthonormal basis rows per block, zero rows where
            a block's subspace has fewer than K directions.
    """

    add_pre_LD: jax.Array | None = None
    add_post_LD: jax.Array | None = None
    gain_L: jax.Array | None = None
    basis_LKD: jax.Array | None = None

    def edit_input(self, x_BTD: jax.Array, layer: jax.Array) -> jax.Array:
        """Apply the `hook_resid_pre` additions of `layer` to the stream entering it."""
        if self.add_pre_LD is None:
            return x_BTD
        return _add(x_BTD, self.add_pre_LD[layer])

    def edit_update(self, resid_pre_BTD, value_BTD, layer) -> jax.Array:
        """Return `value + gain * P (value - resid_pre)`: the scaled or ablated stream leaving `layer`."""
        update_BTD = value_BTD.astype(jnp.float32) - resid_pre_BTD.astype(jnp.float32)
        return self.edit_component(value_BTD, update_BTD, layer)

    def edit_component(self, value_BTD, direction_source_BTD, layer) -> jax.Array:
        """Return `value + gain * P source`, computed in float32 and cast back to value's dtype."""
        if self.gain_L is None:
            return value_BTD
        basis_KD = self.basis_LKD[layer]
        coefficients_BTK = jnp.einsum("btd,kd->btk", direction_source_BTD.astype(jnp.float32), basis_KD,
                                      precision=jax.lax.Precision.HIGHEST)
        projected_BTD = jnp.einsum("btk,kd->btd", coefficients_BTK, basis_KD, precision=jax.lax.Precision.HIGHEST)
        return (value_BTD.astype(jnp.float32) + self.gain_L[layer] * projected_BTD).astype(value_BTD.dtype)

    def edit_output_kernel(self, o_kernel_HED: jax.Array, layer: jax.Array) -> jax.Array:
        """Return the attention output kernel with `gain * P` applied to each head's output."""
        basis_KD = self.basis_LKD[layer]
        kernel_HED = o_kernel_HED.astype(jnp.float32)
        coefficients_HEK = jnp.einsum("hed,kd->hek", kernel_HED, basis_KD, precision=jax.lax.Precision.HIGHEST)
        projected_HED = jnp.einsum("hek,kd->hed", coefficients_HEK, basis_KD, precision=jax.lax.Precision.HIGHEST)
        return (kernel_HED + self.gain_L[layer] * projected_HED).astype(o_kernel_HED.dtype)

    def add_output(self, x_BTD: jax.Array, layer: jax.Array) -> jax.Array:
        """Apply the `hook_resid_post` additions of `layer` to the stream leaving it."""
        if self.add_post_LD is None:
            return x_BTD
        return _add(x_BTD, self.add_post_LD[layer])


def _add(x_BTD: jax.Array, vector_D: jax.Array) -> jax.Array:
    # Added in float32 and cast back, so a bfloat16 stream stays bfloat16 and
    # a zero vector leaves it bit for bit unchanged.
    return (x_BTD.astype(jnp.float32) + vector_D).astype(x_BTD.dtype)


def compile_interventions(interventions: Intervention | Sequence[Intervention] | None, num_layers: int,
                          width: int) -> SteeringTables | None:
    """Build the per-layer tables of a list of interventions for a model.

    Several "add" interventions at one layer and point are summed. At most
    one "scale" or "ablate" is allowed per layer.

    Args:
        interventions: one intervention, a sequence of them, or None.
        num_layers: the model's number of blocks.
        width: the model's residual width D.

    Returns:
        The tables, or None for no interventions (the unsteered program).

    Raises:
        ValueError: a layer out of range, a vector of another width, or two
            subspace edits at one layer.
    """
    if interventions is None:
        return None
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions)
    if not interventions:
        return None
    for item in interventions:
        if not isinstance(item, Intervention):
            raise TypeError(f"expected Intervention objects, got {type(item).__name__}")
        if item.layer >= num_layers:
            raise ValueError(f"layer {item.layer} is out of range for a model with {num_layers} blocks; "
                             f"use 0 to {num_layers - 1}")
        if item.width != width:
            raise ValueError(f"the {item.operation!r} vector at layer {item.layer} has width {item.width}, "
                             f"but the model's residual stream has width {width}")

    adds = {point: np.zeros((num_layers, width)) for point in POINTS}
    used = {point: False for point in POINTS}
    bases: dict[int, tuple[float, np.ndarray]] = {}
    for item in interventions:
        if item.operation == "add":
            adds[item.point][item.layer] += item.alpha * item.vector
            used[item.point] = True
            continue
        if item.layer in bases:
            raise ValueError(f"layer {item.layer} has two 'scale'/'ablate' interventions; combine their bases "
                             "into one intervention")
        gain = item.alpha if item.operation == "scale" else -item.alpha
        bases[item.layer] = (gain, orthonormal_rows(item.vector))

    tables = {}
    if used["hook_resid_pre"]:
        tables["add_pre_LD"] = jnp.asarray(adds["hook_resid_pre"], jnp.float32)
    if used["hook_resid_post"]:
        tables["add_post_LD"] = jnp.asarray(adds["hook_resid_post"], jnp.float32)
    if bases:
        rank = max(basis.shape[0] for _, basis in bases.values())
        gain_L = np.zeros(num_layers)
        basis_LKD = np.zeros((num_layers, rank, width))
        for layer, (gain, basis) in bases.items():
            gain_L[layer] = gain
            basis_LKD[layer, : basis.shape[0]] = basis
        tables["gain_L"] = jnp.asarray(gain_L, jnp.float32)
        tables["basis_LKD"] = jnp.asarray(basis_LKD, jnp.float32)
    return SteeringTables(**tables)
