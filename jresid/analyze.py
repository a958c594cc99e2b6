"""The single compiled program: forward pass with the metrics inside the layer loop.

`analyze` runs one `jax.jit` program that embeds the tokens, scans over the
blocks and, inside each step of the scan, computes the block's update
`u = resid_post - resid_pre` and its four metrics for every sequence
(`jax.vmap` over the batch). Only `[B, L, T]` numbers leave the loop, so no
`[L, B, T, D]` stack of activations is ever held; requested captures are
written into their own buffers alongside.

Prompt lengths are padded up to a small set of buckets, so a sweep over
prompts of many lengths compiles a bounded number of programs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jresid import distributed
from jresid import metrics as metrics_lib
from jresid import modes as modes_lib
from jresid import sharding as sharding_lib
from jresid.capture import ActivationCache, CaptureSpec, NamesFilter
from jresid.metrics import MetricOptions
from jresid.pretrained import Model

logger = logging.getLogger(__name__)

METRIC_NAMES = ("energy", "innovation", "expansion", "complexity")

# Smallest bucket, and the step above which buckets grow linearly instead of doubling.
_MIN_BUCKET = 16
_LINEAR_BUCKET_STEP = 1024


def bucket_length(length: int) -> int:
    """Return the padded length for a prompt of `length` tokens.

    Powers of two from 16 up to 1024, then multiples of 1024: at most
    7 + ceil(T / 1024) distinct lengths for prompts up to T tokens, and
    never more than double the work of the unpadded prompt.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if length <= _LINEAR_BUCKET_STEP:
        return max(_MIN_BUCKET, 1 << (length - 1).bit_length())
    return -(-length // _LINEAR_BUCKET_STEP) * _LINEAR_BUCKET_STEP


@dataclasses.dataclass
class AnalysisResult:
    """What `analyze` returns. Per-token arrays are `[B, L, T]` float32, NaN at padding.

    Attributes:
        energy, innovation, expansion, complexity: per-token metrics.
        mode: `[B, L, T]` int8 mode codes; `mode_names[code]` is the label.
        sequence_complexity: `[B, L]` complexity of all valid updates of a
            layer taken together.
        valid: `[B, T]` bool, the real tokens.
        input_ids: `[B, T]` the token ids analysed.
        calibration: the tercile boundaries used for the mode labels.
        options: the metric options used.
        cache: captured activations, when requested.
    """

    energy: np.ndarray
    innovation: np.ndarray
    expansion: np.ndarray
    complexity: np.ndarray
    mode: np.ndarray
    sequence_complexity: np.ndarray
    valid: np.ndarray
    input_ids: np.ndarray
    calibration: modes_lib.Calibration
    options: MetricOptions
    cache: ActivationCache | None = None
    mode_names: tuple[str, ...] = modes_lib.MODE_NAMES

    @property
    def num_layers(self) -> int:
        return self.energy.shape[1]

    def layer_means(self) -> dict[str, np.ndarray]:
        """Per-layer mean of each metric over valid tokens with a finite value, `[L]` each."""
        out = {}
        for name in METRIC_NAMES:
            values = getattr(self, name)
            with np.errstate(invalid="ignore"):
                out[name] = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=(0, 2))
        out["sequence_complexity"] = np.nanmean(self.sequence_complexity, axis=0)
        return out

    def mode_shares(self) -> dict[str, np.ndarray]:
        """Per-layer share of valid tokens carrying each mode label, `[L]` each."""
        valid_B1T = self.valid[:, None, :]
        count = valid_B1T.sum(axis=(0, 2)) * np.ones(self.num_layers)
        return {
            name: ((self.mode == code) & valid_B1T).sum(axis=(0, 2)) / np.maximum(count, 1)
            for code, name in enumerate(self.mode_names)
        }

    def summary_table(self) -> str:
        """A plain-text per-layer table of metric means and mode shares."""
        means = self.layer_means()
        shares = self.mode_shares()
        header = (f"{'layer':>5} {'energy':>10} {'innovation':>10} {'expansion':>9} {'complexity':>10} "
                  f"{'seq.compl':>9} " + " ".join(f"{name[:12]:>12}" for name in self.mode_names))
        lines = [header]
        for layer in range(self.num_layers):
            row = (f"{layer:>5} {means['energy'][layer]:>10.4g} {means['innovation'][layer]:>10.4f} "
                   f"{means['expansion'][layer]:>9.4f} {means['complexity'][layer]:>10.4f} "
                   f"{means['sequence_complexity'][layer]:>9.3f} ")
            row += " ".join(f"{shares[name][layer]:>12.1%}" for name in self.mode_names)
            lines.append(row)
        return "\n".join(lines)


def analyze(
    model: Model,
    input_ids,
    attention_mask=None,
    *,
    calibration: modes_lib.Calibration | str | None = None,
    names_filter: NamesFilter = (),
    bucket: bool = True,
    interventions=None,
    **options: Any,
) -> AnalysisResult:
    """Run the model and compute every residual-update metric and mode label.

    Args:
        model: a model from `jresid.from_pretrained`.
        input_ids: `[B, T]` or `[T]` token ids.
        attention_mask: 1 for real tokens, 0 for padding (either side).
        calibration: tercile boundaries for the mode labels, as a
            `Calibration` or the path of a saved one. `None` calibrates on
            this run's own tokens.
        names_filter: capture points to return alongside, as in
            `Model.run_with_cache`; empty by default.
        bucket: pad the length up to a bucket (see `bucket_length`) so that
            calls with different lengths share compiled programs.
        interventions: a `jresid.interventions.Intervention` or a list of
            them, applied inside the same program; the metrics then measure
            the steered model.
        **options: metric options (`history`, `window`, `decay`,
            `energy_fraction`, `complexity_basis`, `complexity_window`,
            `rank_measure`, `rtol`, `eps`); see `jresid.metrics.MetricOptions`.

    Raises:
        ValueError: an unknown option or an invalid value, before any compute.
    """
    options.setdefault("sequence_complexity", True)
    metric_options = MetricOptions.from_dict(options)
    calibration = read_calibration(calibration, model.config.num_hidden_layers, metric_options)
    spec = CaptureSpec.from_names_filter(names_filter, model.config.num_hidden_layers)
    steering = model.steering_tables(interventions)

    prepared = model.prepare_inputs(input_ids, attention_mask)
    B, T = prepared[0].shape
    ids_BT, mask_BT = prepare_batch(prepared, bucket)

    # Rows that place_batch adds to fill the mesh's data axis stay out of the calibration.
    real_rows_B = np.zeros(sharding_lib.pad_batch(B, model.mesh), dtype=np.int32)
    real_rows_B[:B] = 1
    ids_BT, mask_BT = model.place_batch(ids_BT, mask_BT)

    # Metadata stays out of the compiled program, so that a loaded calibration adds no compilation.
    boundaries = calibration_boundaries(calibration)
    real_rows_B = sharding_lib.put_batch(real_rows_B, model.mesh)
    replicated = None if model.mesh is None else sharding_lib.replicated(model.mesh)
    products = None
    if metric_options.complexity_basis == "components" and (steering is None or steering.gain_L is None):
        products = output_products(model)
    out = _analyze_program(model.graphdef, model.state, ids_BT, mask_BT, real_rows_B,
                           metric_options, spec, boundaries, replicated, steering, products)
    out = distributed.gather(out)
    return assemble_result(out, B, T, calibration, metric_options, model.path or "", spec)


def prepare_batch(prepared: tuple[jax.Array, jax.Array], bucket: bool) -> tuple[jax.Array, jax.Array]:
    """Pad checked `[B, T]` ids and mask up to the bucket length when `bucket` is set."""
    ids_BT, mask_BT = prepared
    T = ids_BT.shape[1]
    padded = bucket_length(T) if bucket else T
    if padded > T:
        ids_BT = jnp.pad(ids_BT, ((0, 0), (0, padded - T)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, padded - T)))
    return ids_BT, mask_BT


def read_calibration(calibration, num_layers: int, options: MetricOptions) -> modes_lib.Calibration | None:
    """Load a calibration given as a path and check that it fits a model of `num_layers` blocks.

    Logs a warning when the calibration was measured with other metric
    options than `options`: its terciles then describe other metrics.
    """
    if isinstance(calibration, (str, os.PathLike)):
        calibration = modes_lib.Calibration.load(calibration)
    if calibration is None:
        return None
    calibration.check_compatible(num_layers)
    if calibration.options is not None:
        differing = options.differences(calibration.options)
        if differing:
            details = ", ".join(f"{name}={getattr(options, name)!r} (calibration: "
                                f"{getattr(calibration.options, name)!r})" for name in differing)
            logger.warning("the calibration was measured with other metric options: %s; the mode labels "
                           "compare against terciles of other metrics, so calibrate again with these options",
                           details)
    return calibration


def calibration_boundaries(calibration: modes_lib.Calibration | None):
    """Return the calibration's boundaries as arrays, without the metadata that would change the program."""
    if calibration is None:
        return None
    return dataclasses.replace(
        calibration, options=None, model_id="", energy=jnp.asarray(calibration.energy, jnp.float32),
        expansion=jnp.asarray(calibration.expansion, jnp.float32),
        complexity=jnp.asarray(calibration.complexity, jnp.float32), tokens=None)


def assemble_result(out: dict, B: int, T: int, calibration: modes_lib.Calibration | None,
                    metric_options: MetricOptions, model_id: str, spec: CaptureSpec) -> AnalysisResult:
    """Cut the compiled program's outputs to `B` rows and `T` positions and wrap them in an `AnalysisResult`."""
    per_token = {name: np.asarray(out[name])[:B, :, :T] for name in (*METRIC_NAMES, "mode")}
    if calibration is None:
        found = out["boundaries"]
        calibration = modes_lib.Calibration(
            energy=np.asarray(found.energy), expansion=np.asarray(found.expansion),
            complexity=np.asarray(found.complexity), tokens=np.asarray(found.tokens),
            options=metric_options, model_id=model_id,
        )
    cache = None
    if not spec.is_empty:
        cache = ActivationCache({name: np.asarray(value)[:B, :T] for name, value in out["captures"].items()})
    return AnalysisResult(
        **{name: per_token[name] for name in METRIC_NAMES},
        mode=per_token["mode"],
        sequence_complexity=np.asarray(out["sequence_complexity"])[:B],
        valid=np.asarray(out["valid"])[:B, :T].astype(bool),
        input_ids=np.asarray(out["input_ids"])[:B, :T],
        calibration=calibration,
        options=metric_options,
        cache=cache,
    )


def compile_count() -> int:
    """Number of programs `analyze` has compiled in this process."""
    return _analyze_program._cache_size()


def block_metrics(block, acts, valid_BT, layer=None, *, options: MetricOptions, mesh=None, products_LHEX=None):
    """The metrics of one block for a batch: the function `analyze` runs inside the layer loop.

    On a mesh, the metrics run under `jax.shard_map`, each device on its own
    rows of the batch, since every sequence's metrics need only that
    sequence. The CPU eigensolvers there are traced as jaxlib kernels, one
    matrix per call (see `spectral.device_eigensolvers`).

    Args:
        block, acts, valid_BT, layer: as the model's scan passes them.
        options: the metric options.
        mesh: the device mesh, or None on one device.
        products_LHEX: `output_products` of the block's model, or None to
            compute the block's products here (needed when an intervention
            edits the output projection).
    """
    u_BTD = acts.resid_post.astype(jnp.float32) - acts.resid_pre.astype(jnp.float32)
    arrays = [u_BTD, valid_BT]
    if options.complexity_basis == "components":
        products_HEX = None if products_LHEX is None else products_LHEX[layer]
        arrays.append(component_gram(acts.z, block.attn.o_kernel[...], acts.mlp_out, products_HEX))

    def per_batch(u_BTD, valid_BT, gram_BTRR=None):
        if gram_BTRR is None:
            return jax.vmap(lambda u, v: metrics_lib.layer_metrics(u, v, None, options))(u_BTD, valid_BT)
        return jax.vmap(lambda u, v, g: metrics_lib.layer_metrics(u, v, None, options, component_gram_TRR=g))(
            u_BTD, valid_BT, gram_BTRR
        )

    if mesh is None:
        return per_batch(*arrays)
    rows = PartitionSpec(sharding_lib.DATA)
    with metrics_lib.spectral.device_eigensolvers():
        return jax.shard_map(per_batch, mesh=mesh, in_specs=(rows,) * len(arrays), out_specs=rows,
                             check_vma=False)(*arrays)


# Output projection products per model, computed on first use; see `output_products`.
_OUTPUT_PRODUCTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_products(model: Model) -> jax.Array:
    """Return `[L, H, E, H * E]` float32: W_h W_g^T for every pair of heads h, g of every block.

    `component_gram` needs these products of the output projection's head
    slices. They depend on the weights alone. By FLOP count, one block's
    products cost as much as the forward pass of about 50 tokens at the
    Qwen2-0.5B shape, and more for wider models. So they are computed once
    per model and kept while the model lives. They take L * (H * E)^2 * 4
    bytes: 77 MB for Qwen2-0.5B, 6.7 GB for QwQ-32B, split over the devices
    of a mesh like the output projection.
    """
    kernel_LHED = model.module.blocks.attn.o_kernel[...]
    cached = _OUTPUT_PRODUCTS.get(model)
    if cached is None or cached[0] is not kernel_LHED:
        cached = (kernel_LHED, _output_products(kernel_LHED))
        _OUTPUT_PRODUCTS[model] = cached
    return cached[1]


@jax.jit
def _output_products(o_kernel_LHED: jax.Array) -> jax.Array:
    # One block at a time, so that a bfloat16 model never has every kernel in float32 at once.
    return jax.lax.map(head_products, o_kernel_LHED)


def head_products(o_kernel_HED: jax.Array) -> jax.Array:
    """Return `[H, E, H * E]` float32: W_h W_g^T for the head slices W_h of one output projection."""
    H, E, D = o_kernel_HED.shape
    w_XD = o_kernel_HED.astype(jnp.float32).reshape(H * E, D)
    return jnp.matmul(w_XD, w_XD.T, precision=jax.lax.Precision.HIGHEST).reshape(H, E, H * E)


def component_gram(z_BTHE: jax.Array, o_kernel_HED: jax.Array, mlp_BTD: jax.Array,
                   products_HEX: jax.Array | None = None) -> jax.Array:
    """Return the Gram matrices `[B, T, H + 1, H + 1]` of each token's head results and MLP output.

    Head h writes z_h W_h, with W_h its `[E, D]` slice of the output
    projection, so <z_h W_h, z_g W_g> = z_h (W_h W_g^T) z_g^T. One matrix
    product gives every W_h W_g^T. Then, for one head h at a time, the
    tokens' z_h times head h's rows of those products, multiplied by z_g
    and summed over the last axis, gives row h of every token's Gram
    matrix. On a 2-core CPU at the Qwen2-0.5B shape, going one head at a
    time ran in less than half the time of one contraction over all heads,
    and about three times faster than building the `[T, H, D]` head
    results.

    `products_HEX` are the products from `head_products`. Pass them when
    they are at hand, because at 512 tokens they cost more than the rest.
    """
    highest = jax.lax.Precision.HIGHEST
    B, T, H, E = z_BTHE.shape
    D = o_kernel_HED.shape[-1]
    z_NHE = z_BTHE.astype(jnp.float32).reshape(B * T, H, E)
    w_XD = o_kernel_HED.astype(jnp.float32).reshape(H * E, D)
    m_ND = mlp_BTD.astype(jnp.float32).reshape(B * T, D)

    if products_HEX is None:
        products_HEX = head_products(o_kernel_HED)

    def head_row(args):
        z_NE, products_EX = args
        mixed_NGE = jnp.matmul(z_NE, products_EX, precision=highest).reshape(B * T, H, E)
        return jnp.sum(mixed_NGE * z_NHE, axis=-1)

    heads_HNG = jax.lax.map(head_row, (jnp.swapaxes(z_NHE, 0, 1), products_HEX))
    heads_NHG = jnp.swapaxes(heads_HNG, 0, 1)

    projected_NHE = jnp.matmul(m_ND, w_XD.T, precision=highest).reshape(B * T, H, E)
    cross_NH = jnp.sum(z_NHE * projected_NHE, axis=-1)
    mlp_N = jnp.sum(m_ND * m_ND, axis=-1)

    top_NHR = jnp.concatenate([heads_NHG, cross_NH[..., None]], axis=-1)
    bottom_N1R = jnp.concatenate([cross_NH, mlp_N[:, None]], axis=-1)[:, None, :]
    return jnp.concatenate([top_NHR, bottom_N1R], axis=1).reshape(B, T, H + 1, H + 1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 8))
def _analyze_program(graphdef, state, ids_BT, mask_BT, real_rows_B, options: MetricOptions, spec: CaptureSpec,
                     boundaries, replicated=None, steering=None, products_LHEX=None):
    module = nnx.merge(graphdef, state)
    output = module(
        ids_BT,
        mask_BT,
        capture=spec,
        layer_fn=functools.partial(block_metrics, options=options,
                                   mesh=None if replicated is None else replicated.mesh,
                                   products_LHEX=products_LHEX),
        return_logits=False,
        steering=steering,
    )
    return label_and_collect(output.layer_outputs, output.captures, ids_BT, mask_BT, real_rows_B, boundaries,
                             replicated)


def label_and_collect(per_layer, captures, ids_BT, mask_BT, real_rows_B, boundaries, replicated=None) -> dict:
    """Label the modes and gather what `analyze` returns, inside a compiled program.

    Args:
        per_layer: `LayerMetrics` with fields `[L, B, T]` and
            sequence_complexity `[L, B]`.
        captures: captured activations by name.
        ids_BT, mask_BT: the padded batch.
        real_rows_B: 1 for rows of the caller's batch, 0 for added rows,
            which stay out of the calibration.
        boundaries: calibration boundaries, or None to calibrate on the batch.
        replicated: a replicated sharding on a mesh, or None.
    """
    values = {name: jnp.swapaxes(getattr(per_layer, name), 0, 1) for name in METRIC_NAMES}
    valid_BT = mask_BT.astype(bool)

    if boundaries is None:
        calibration_rows_BT = valid_BT & (real_rows_B[:, None] > 0)
        boundaries = modes_lib.calibrate(values["energy"], values["expansion"], values["complexity"],
                                         calibration_rows_BT)
    mode_BLT = modes_lib.label_modes(values["energy"], values["expansion"], values["complexity"], boundaries,
                                     valid_BT)
    out = {
        **values,
        "mode": mode_BLT,
        "sequence_complexity": jnp.swapaxes(per_layer.sequence_complexity, 0, 1),
        "boundaries": boundaries,
        "captures": captures,
        "valid": valid_BT,
        "input_ids": ids_BT,
    }
    if replicated is not None:
        # Every process gets the whole (small) result, so none needs a gather afterwards.
        out = jax.lax.with_sharding_constraint(out, replicated)
    return out
