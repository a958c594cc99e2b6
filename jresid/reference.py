"""Compare jresid's logits and capture points with TransformerLens on the same tokens.

TransformerLens and PyTorch are the reference implementation, not a runtime
dependency. This is the only jresid module that uses them, and it imports
them inside functions, so `import jresid.reference` works without them and
the functions raise `ReferenceUnavailableError` naming the extra to install.

Two TransformerLens backends are supported:

* `"hooked"`: a `HookedTransformer` built offline from the checkpoint folder.
  Its config is written here from jresid's `Qwen2Config`, and the weights go
  through TransformerLens' own Qwen2 conversion. No weight processing is
  applied (no LayerNorm folding, centering or value-bias folding), so the
  capture points contain the raw numbers that jresid also computes.
* `"bridge"`: a `TransformerBridge`, which wraps transformers' own Qwen2
  modules (eager attention) and adds TransformerLens' hook points.

Both run in float32 on the CPU by default. With an attention mask, both
number the real tokens of each row from 0 (as jresid does), and the
comparison covers real tokens only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jresid.capture import CaptureSpec
from jresid.config import Qwen2Config

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'jresid[reference]'"
BACKENDS = ("hooked", "bridge")
LOGITS = "logits"
HOOK_RESULT = "attn.hook_result"

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ReferenceUnavailableError(ImportError):
    """torch or transformer_lens is not installed, so no reference can run."""


# ---------------------------------------------------------------------------
# Lazy imports


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ReferenceUnavailableError(
            f"the TransformerLens comparison needs PyTorch, which failed to import ({error}). "
            f"Install the reference extra: {INSTALL_HINT}"
        ) from error
    return torch


def _import_transformer_lens():
    _import_torch()
    try:
        import transformer_lens
    except ImportError as error:
        raise ReferenceUnavailableError(
            f"the TransformerLens comparison needs transformer_lens, which failed to import ({error}). "
            f"Install the reference extra: {INSTALL_HINT}"
        ) from error
    return transformer_lens


def transformer_lens_version() -> str:
    """Return the installed TransformerLens version.

    Raises:
        ReferenceUnavailableError: torch or transformer_lens is not installed.
    """
    _import_transformer_lens()
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        import transformer_lens

        return str(getattr(transformer_lens, "__version__", "unknown"))


def _torch_dtype(dtype: Any):
    torch = _import_torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in _TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_TORCH_DTYPES)}")
    return getattr(torch, _TORCH_DTYPES[key])


def _checkpoint_folder(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    return path


# ---------------------------------------------------------------------------
# Loading the references


def hf_reference(path: str | os.PathLike[str], dtype: Any = "float32"):
    """Load a checkpoint folder into transformers' `Qwen2ForCausalLM` with eager attention.

    Eager attention is the reference because the default `sdpa` kernel differs
    from it by up to about 2e-5 in float32 logits (measured on tiny random
    Qwen2 models, 300 tokens, transformers 5.25 on CPU). Nothing is
    downloaded, so the folder must contain `config.json` and the weights.

    Args:
        path: the checkpoint folder.
        dtype: 'float32' (default), 'bfloat16', 'float16' or a `torch.dtype`.

    Returns:
        The model in eval mode on the CPU.

    Raises:
        ReferenceUnavailableError: torch is not installed.
        FileNotFoundError: `path` is not a folder.
        jresid.ConfigError: the config is not a Qwen2 config that jresid supports.
    """
    _import_torch()
    folder = _checkpoint_folder(path)
    Qwen2Config.from_json(folder)  # rejects what jresid cannot compare before loading weights
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(
        folder, dtype=_torch_dtype(dtype), attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def hooked_transformer_config(config: Qwen2Config, dtype: Any = "float32", *, use_attn_result: bool = True,
                              n_ctx: int | None = None):
    """Build the `HookedTransformerConfig` of a Qwen2 model from jresid's config.

    Every number that changes the forward pass comes from `config`, so the
    reference cannot silently use another RoPE base or head width than the
    checkpoint's. TransformerLens' own Qwen2 config builder, for example,
    takes the head width as `hidden_size // num_attention_heads`.

    Args:
        config: the checkpoint's parsed `config.json`.
        dtype: parameter dtype of the reference.
        use_attn_result: compute `blocks.{l}.attn.hook_result`. TransformerLens
            then builds a `[batch, pos, head, d_head, d_model]` tensor per layer.
        n_ctx: context length; `None` or anything shorter uses
            `config.max_position_embeddings`.
    """
    _import_transformer_lens()
    from transformer_lens import HookedTransformerConfig

    context = max(config.max_position_embeddings, n_ctx or 0)
    return HookedTransformerConfig(
        d_model=config.hidden_size,
        d_head=config.head_dim,
        n_heads=config.num_attention_heads,
        n_key_value_heads=config.num_key_value_heads,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_ctx=context,
        d_vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        act_fn=config.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=config.head_dim,
        rotary_base=config.rope_theta,
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        use_attn_scale=True,
        use_attn_result=use_attn_result,
        original_architecture="Qwen2ForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        dtype=_torch_dtype(dtype),
        device="cpu",
    )


def _check_hooked_config(cfg, config: Qwen2Config) -> None:
    """Raise if TransformerLens changed a field of the config it was given."""
    expected = {
        "d_model": config.hidden_size,
        "d_head": config.head_dim,
        "n_heads": config.num_attention_heads,
        "n_key_value_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "d_vocab": config.vocab_size,
        "d_vocab_out": config.vocab_size,
        "eps": config.rms_norm_eps,
        "rotary_dim": config.head_dim,
        "rotary_base": config.rope_theta,
        "rotary_adjacent_pairs": False,
    }
    wrong = {key: (getattr(cfg, key, None), value) for key, value in expected.items()
             if getattr(cfg, key, None) != value}
    if wrong:
        details = ", ".join(f"{key}={got!r} (expected {want!r})" for key, (got, want) in wrong.items())
        raise RuntimeError(f"the HookedTransformer config does not match the checkpoint: {details}")


def load_hooked_transformer(path: str | os.PathLike[str], dtype: Any = "float32", use_attn_result: bool = True,
                            n_ctx: int | None = None):
    """Build a TransformerLens `HookedTransformer` from a local Qwen2 checkpoint folder.

    TransformerLens' `from_pretrained` only accepts its list of official model
    names, so the model is assembled by hand: the config from
    `hooked_transformer_config`, the weights from transformers through
    `transformer_lens.pretrained.weight_conversions.qwen2.convert_qwen2_weights`.
    No weight processing is applied, so the hooks hold the raw numbers.

    Args:
        path: the checkpoint folder.
        dtype: parameter dtype, 'float32' by default.
        use_attn_result: enable `blocks.{l}.attn.hook_result` (slow and large,
            a `[batch, pos, head, d_head, d_model]` tensor per layer).
        n_ctx: context length, at least `max_position_embeddings`.

    Returns:
        The model in eval mode on the CPU, with no tokenizer.

    Raises:
        ReferenceUnavailableError: torch or transformer_lens is not installed.
    """
    _import_transformer_lens()
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.qwen2 import convert_qwen2_weights

    folder = _checkpoint_folder(path)
    config = Qwen2Config.from_json(folder)
    cfg = hooked_transformer_config(config, dtype, use_attn_result=use_attn_result, n_ctx=n_ctx)
    hf_model = hf_reference(folder, dtype)
    with warnings.catch_warnings():
        # TransformerLens 3.x deprecates HookedTransformer in favour of the
        # bridge, but it is still one of the two references compared here.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=None)
    state_dict = convert_qwen2_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    _check_hooked_config(model.cfg, config)
    logger.info("built HookedTransformer from %s (%d layers, %s)", folder, cfg.n_layers, cfg.dtype)
    return model.eval()


def load_transformer_bridge(path: str | os.PathLike[str], dtype: Any = "float32", use_attn_result: bool = True):
    """Boot a TransformerLens `TransformerBridge` on a local Qwen2 checkpoint folder.

    The bridge wraps transformers' own modules and changes the model it is
    given, so it gets its own freshly loaded copy. It switches attention to
    eager.

    Args:
        path: the checkpoint folder.
        dtype: parameter dtype, 'float32' by default.
        use_attn_result: enable `blocks.{l}.attn.hook_result`. When the
            bridge's attention class cannot compute per-head results, a
            warning is logged and the hook stays off.

    Returns:
        The bridge in eval mode on the CPU.

    Raises:
        ReferenceUnavailableError: torch or transformer_lens is not installed.
    """
    _import_transformer_lens()
    from transformer_lens.model_bridge import TransformerBridge

    from jresid.pretrained import load_tokenizer

    folder = _checkpoint_folder(path)
    torch_dtype = _torch_dtype(dtype)
    # NOTE: TransformerBridge 3.9 reports cfg.rotary_base 10000 for a
    # checkpoint with rope_theta 1e6, but its forward pass uses transformers'
    # rotary module and is correct. Do not build a config from bridge.cfg.
    bridge = TransformerBridge.boot_transformers(
        folder,
        device="cpu",
        dtype=torch_dtype,
        hf_model=hf_reference(folder, dtype),
        tokenizer=load_tokenizer(folder),
    )
    if use_attn_result:
        try:
            bridge.set_use_attn_result(True)
        except NotImplementedError as error:
            logger.warning("TransformerBridge cannot provide %s: %s", HOOK_RESULT, error)
    logger.info("booted TransformerBridge on %s (%s)", folder, torch_dtype)
    return bridge.eval()


def load_reference(path: str | os.PathLike[str], backend: str = "hooked", dtype: Any = "float32",
                   use_attn_result: bool = True):
    """Load the TransformerLens model of `backend` ('hooked' or 'bridge') from a checkpoint folder."""
    _check_backend(backend)
    if backend == "hooked":
        return load_hooked_transformer(path, dtype, use_attn_result=use_attn_result)
    return load_transformer_bridge(path, dtype, use_attn_result=use_attn_result)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; use one of {list(BACKENDS)}")


def _backend_of(reference) -> str:
    name = type(reference).__name__
    if name == "HookedTransformer":
        return "hooked"
    if name == "TransformerBridge":
        return "bridge"
    raise TypeError(f"reference must be a HookedTransformer or a TransformerBridge, got {name}")


def reference_provides_attn_result(reference) -> bool:
    """Return True when a loaded reference computes `blocks.{l}.attn.hook_result`."""
    return bool(getattr(reference.cfg, "use_attn_result", False))


# ---------------------------------------------------------------------------
# Running


def sanitize_inputs(input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return `[B, T]` int64 ids with padding ids set to 0, and the mask as int64.

    jresid accepts any id at a padding position, but TransformerLens looks
    every id up in the embedding, so an out-of-vocabulary padding id would
    fail there. Both sides get the same sanitised ids.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, positions], got shape {ids.shape}")
    ids = ids.astype(np.int64)
    if attention_mask is None:
        return ids, None
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
    mask = mask.astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def run_reference(reference, input_ids, attention_mask=None, names: Iterable[str] = ()):
    """Run a TransformerLens model and return float32 NumPy logits and activations.

    Args:
        reference: a `HookedTransformer` or `TransformerBridge`.
        input_ids: `[B, T]` or `[T]` token ids, valid at padding positions too
            (see `sanitize_inputs`).
        attention_mask: 1 for real tokens, 0 for padding; `None` for none.
        names: capture names to return. A name the reference does not
            produce is left out of the result.

    Returns:
        `(logits [B, T, V], {name: array})`, both float32.
    """
    torch = _import_torch()
    ids, mask = sanitize_inputs(input_ids, attention_mask)
    requested = list(names)
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
    with torch.inference_mode():
        logits, cache = reference.run_with_cache(
            torch.from_numpy(ids), names_filter=lambda name: name in requested, **kwargs
        )
    captured = set(cache.keys())
    arrays = {name: cache[name].detach().float().cpu().numpy() for name in requested if name in captured}
    return logits.detach().float().cpu().numpy(), arrays


# ---------------------------------------------------------------------------
# Report


@dataclasses.dataclass(frozen=True)
class PointDifference:
    """The largest absolute difference at one capture point, over real tokens.

    Attributes:
        name: the capture name, or 'logits'.
        point: the name without the block prefix (`hook_resid_pre`, ...).
        layer: the block index, or `None` for points outside the blocks.
        max_abs_diff: max |jresid - reference| over real tokens; NaN when
            either side has a NaN there, inf when the shapes differ.
        max_abs_reference: max |reference| over real tokens, for scale.
        tolerance: the tolerance the point is held to: the absolute
            tolerance plus the relative one times `max_abs_reference`.
        location: index of the largest difference (batch, position, and
            head or channel), or `None` when there is none.
        shape: the reference array's shape.
    """

    name: str
    point: str
    layer: int | None
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float
    location: tuple[int, ...] | None = None
    shape: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        # NaN compares false, so a NaN difference fails.
        return bool(self.max_abs_diff <= self.tolerance)


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
    """Differences between jresid and TransformerLens on one batch.

    Attributes:
        backend: 'hooked' or 'bridge'.
        transformer_lens_version: the installed TransformerLens version.
        model_path: the checkpoint folder.
        model_dtype: jresid's parameter dtype.
        reference_dtype: the reference's parameter dtype.
        input_shape: `(batch, positions)`.
        real_tokens: number of real (non-padding) tokens compared.
        rtol: relative tolerance, times the largest |reference| of a row,
            added to that row's absolute tolerance.
        atol_resid: absolute tolerance for every capture point.
        atol_logits: absolute tolerance for the logits.
        logits: the logits row.
        points: one row per compared capture point, in forward order.
        missing: requested capture points that the reference did not return.
    """

    backend: str
    transformer_lens_version: str
    model_path: str | None
    model_dtype: str
    reference_dtype: str
    input_shape: tuple[int, int]
    real_tokens: int
    atol_resid: float
    atol_logits: float
    logits: PointDifference
    points: tuple[PointDifference, ...]
    missing: tuple[str, ...] = ()
    rtol: float = 0.0

    @property
    def rows(self) -> tuple[PointDifference, ...]:
        """The logits row followed by every capture point row."""
        return (self.logits, *self.points)

    @property
    def passed(self) -> bool:
        """True when the logits and every compared point are within tolerance.

        Points in `missing` were not compared and do not count.
        """
        return all(row.passed for row in self.rows)

    def failures(self) -> list[PointDifference]:
        """List the rows outside their tolerance, in forward order."""
        return [row for row in self.rows if not row.passed]

    def __getitem__(self, name: str) -> PointDifference:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{name!r} was not compared; compared names are {[row.name for row in self.rows]}")

    def max_diff_by_point(self) -> dict[str, PointDifference]:
        """Return the worst row of each point type, over layers (`hook_resid_pre`, ...)."""
        worst: dict[str, PointDifference] = {}
        for row in self.rows:
            current = worst.get(row.point)
            if current is None or _worse(row, current):
                worst[row.point] = row
        return worst

    def format(self, per_layer: bool = True) -> str:
        """Render the report as a plain-text table.

        Args:
            per_layer: list every layer's row; False lists only the worst row
                of each point type.
        """
        batch, positions = self.input_shape
        lines = [
            f"jresid ({self.model_dtype}) vs TransformerLens {self.transformer_lens_version} "
            f"{self.backend} ({self.reference_dtype}) on {self.model_path}",
            f"batch {batch} x {positions} positions, {self.real_tokens} real tokens compared; "
            f"tolerance {self.atol_resid:g} for capture points, {self.atol_logits:g} for logits, "
            f"plus {self.rtol:g} times the row's max |ref|",
            "",
        ]
        header = f"{'name':<32} {'layer':>5} {'max |diff|':>11} {'max |ref|':>10} {'tolerance':>9}  {'where':<16} status"
        lines.append(header)
        lines.append("-" * len(header))
        rows = self.rows if per_layer else tuple(self.max_diff_by_point().values())
        for row in rows:
            name = row.name
            if not per_layer and row.layer is not None:
                name = f"{row.point} (worst layer)"
            layer = "-" if row.layer is None else str(row.layer)
            where = "-" if row.location is None else str(tuple(int(i) for i in row.location))
            status = "ok" if row.passed else "FAIL"
            lines.append(
                f"{name:<32} {layer:>5} {row.max_abs_diff:>11.3e} {row.max_abs_reference:>10.3e} "
                f"{row.tolerance:>9.1e}  {where:<16} {status}"
            )
        if self.missing:
            lines.append("")
            lines.append(f"not provided by the reference, so not compared: {', '.join(self.missing)}")
        lines.append("")
        failed = self.failures()
        if failed:
            lines.append(f"FAILED: {len(failed)} of {len(self.rows)} rows outside tolerance")
        else:
            lines.append(f"passed: all {len(self.rows)} rows within tolerance")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready built-in types."""
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        return out


def _worse(row: PointDifference, other: PointDifference) -> bool:
    if np.isnan(row.max_abs_diff):
        return not np.isnan(other.max_abs_diff)
    return row.max_abs_diff > other.max_abs_diff


def split_name(name: str) -> tuple[str, int | None]:
    """Split 'blocks.3.hook_resid_pre' into ('hook_resid_pre', 3); other names keep layer None."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return parts[2], int(parts[1])
    return name, None


def difference_on_real_tokens(name: str, actual, expected, real_BT: np.ndarray | None,
                              tolerance: float, rtol: float = 0.0) -> PointDifference:
    """Measure max |actual - expected| over the real tokens of `[B, T, ...]` arrays.

    Args:
        name: the capture name, or 'logits'.
        actual: jresid's array.
        expected: the reference's array.
        real_BT: boolean mask of real tokens, or `None` for all tokens.
        tolerance: the absolute tolerance for this point.
        rtol: relative tolerance; `rtol * max |expected|` is added to
            `tolerance`, since float32 rounding grows with the values' size.
    """
    point, layer = split_name(name)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        logger.warning("%s: jresid shape %s differs from the reference's %s", name, actual.shape, expected.shape)
        return PointDifference(name, point, layer, float("inf"), float("nan"), tolerance, None, expected.shape)

    difference = np.abs(actual - expected)
    magnitude = np.abs(expected)
    if real_BT is not None:
        # Broadcast the [B, T] mask over the trailing axes and zero padding.
        real = real_BT.reshape(real_BT.shape + (1,) * (difference.ndim - 2))
        difference = np.where(real, difference, 0.0)
        magnitude = np.where(real, magnitude, 0.0)
    if difference.size == 0:
        return PointDifference(name, point, layer, 0.0, 0.0, tolerance, None, expected.shape)
    tolerance = float(tolerance + rtol * np.nanmax(magnitude))

    nan_at = np.argwhere(np.isnan(difference))
    if nan_at.size:
        location = tuple(int(i) for i in nan_at[0])
        return PointDifference(name, point, layer, float("nan"), float(np.nanmax(magnitude)), tolerance,
                               location, expected.shape)
    flat = int(np.argmax(difference))
    location = tuple(int(i) for i in np.unravel_index(flat, difference.shape))
    return PointDifference(name, point, layer, float(difference.flat[flat]), float(magnitude.max()), tolerance,
                           location, expected.shape)


# ---------------------------------------------------------------------------
# Comparison


def compare_with_transformer_lens(
    model_or_path,
    input_ids,
    attention_mask=None,
    *,
    backend: str = "hooked",
    names: None | str | Iterable[str] | Callable[[str], bool] = None,
    atol_resid: float = 1e-5,
    atol_logits: float = 1e-4,
    rtol: float = 1e-6,
    dtype: Any = "float32",
    reference=None,
) -> ComparisonReport:
    """Run jresid and TransformerLens on the same tokens and measure each capture point.

    Args:
        model_or_path: a `jresid.pretrained.Model`, or a checkpoint folder
            that is loaded with `dtype`.
        input_ids: `[B, T]` or `[T]` token ids.
        attention_mask: 1 for real tokens, 0 for padding, on either side.
            Only real tokens are compared.
        backend: 'hooked' (`HookedTransformer`) or 'bridge'
            (`TransformerBridge`). Ignored when `reference` is given.
        names: capture points to compare, as jresid's `names_filter` reads
            them; `None` compares all. The logits are always compared.
        atol_resid: absolute tolerance for every capture point.
        atol_logits: absolute tolerance for the logits.
        rtol: relative tolerance: each row may also differ by `rtol` times
            its largest |reference| value. The default covers float32
            rounding of residual streams that grow to hundreds.
        dtype: parameter dtype of whatever is loaded here (jresid from a
            path, and the reference).
        reference: an already loaded `HookedTransformer` or
            `TransformerBridge` of the same checkpoint, to reuse across calls.

    Returns:
        The report. Check `report.passed`, print `report.format()`.

    Raises:
        ReferenceUnavailableError: torch or transformer_lens is not installed.
        ValueError: an invalid backend, an unknown capture name, or a
            reference without `attn.hook_result` when that point is requested.
    """
    version = transformer_lens_version()
    if reference is None:
        _check_backend(backend)
    else:
        backend = _backend_of(reference)

    from jresid.pretrained import Model, from_pretrained

    if isinstance(model_or_path, Model):
        model = model_or_path
    else:
        model = from_pretrained(_checkpoint_folder(model_or_path), dtype=dtype)

    requested = CaptureSpec.from_names_filter(names, model.config.num_hidden_layers).names()
    needs_result = any(split_name(name)[0] == HOOK_RESULT for name in requested)
    if reference is None:
        if model.path is None:
            raise ValueError("the jresid model has no checkpoint folder (model.path is None); pass reference=")
        reference = load_reference(model.path, backend, dtype, use_attn_result=needs_result)
    elif needs_result and backend == "hooked" and not reference_provides_attn_result(reference):
        raise ValueError(
            f"{HOOK_RESULT} was requested but the HookedTransformer was built with use_attn_result=False; "
            "load it with load_hooked_transformer(path, use_attn_result=True) or leave the point out of names"
        )

    ids, mask = sanitize_inputs(input_ids, attention_mask)
    reference_logits, reference_arrays = run_reference(reference, ids, mask, requested)
    logits, cache = model.run_with_cache(ids, mask, names_filter=requested)
    arrays = cache.to_numpy()

    real_BT = None if mask is None else mask.astype(bool)
    logits_row = difference_on_real_tokens(LOGITS, np.asarray(logits), reference_logits, real_BT,
                                           atol_logits, rtol)
    rows = []
    missing = []
    for name in requested:
        if name not in reference_arrays:
            missing.append(name)
            continue
        rows.append(difference_on_real_tokens(name, arrays[name], reference_arrays[name], real_BT,
                                              atol_resid, rtol))
    if missing:
        logger.warning("the %s reference did not return %s; those points are not compared", backend, missing)

    report = ComparisonReport(
        backend=backend,
        transformer_lens_version=version,
        model_path=model.path,
        model_dtype=str(model.dtype),
        reference_dtype=str(reference.cfg.dtype).replace("torch.", ""),
        input_shape=(int(ids.shape[0]), int(ids.shape[1])),
        real_tokens=int(ids.size if mask is None else mask.sum()),
        atol_resid=atol_resid,
        atol_logits=atol_logits,
        rtol=rtol,
        logits=logits_row,
        points=tuple(rows),
        missing=tuple(missing),
    )
    failed = report.failures()
    if failed:
        worst = failed[0]
        for row in failed[1:]:
            if _worse(row, worst):
                worst = row
        logger.warning("%d of %d rows differ from TransformerLens (%s) beyond tolerance; worst %s by %.3e",
                       len(failed), len(report.rows), backend, worst.name, worst.max_abs_diff)
    return report
