"""Figures of an analysis: metric heatmaps, the mode map and per-layer curves.

All functions take NumPy arrays (one prompt's `[L, T]` metrics, or a stack
of them) and write PNG files with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import logging
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

logger = logging.getLogger(__name__)

METRICS = ("energy", "innovation", "expansion", "complexity")
# Colours for the mode map, indexed by mode code: unclassified, refinement, recall, reasoning.
MODE_COLOURS = ("#d9d9d9", "#4daf4a", "#377eb8", "#e41a1c")
MAX_TOKEN_COLUMNS = 160


def _token_columns(tokens: list[str]) -> tuple[np.ndarray, str | None]:
    """Pick the token positions to draw; long prompts keep every k-th token."""
    T = len(tokens)
    if T <= MAX_TOKEN_COLUMNS:
        return np.arange(T), None
    step = int(np.ceil(T / MAX_TOKEN_COLUMNS))
    return np.arange(0, T, step), f"{T} tokens: showing every {step}th token"


def _label(token: str) -> str:
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    if not token.strip():
        token = token.replace(" ", "␣")  # a space token would otherwise get an empty label
    return token if len(token) <= 12 else token[:11] + "…"


def _layer_axis(ax, num_layers: int) -> None:
    step = max(1, int(np.ceil(num_layers / 16)))
    ax.set_yticks(np.arange(0, num_layers, step))
    ax.set_ylabel("layer")


def _token_axis(ax, tokens: list[str], columns: np.ndarray) -> None:
    ax.set_xticks(np.arange(len(columns)))
    ax.set_xticklabels([_label(tokens[i]) for i in columns], rotation=90, fontsize=7)
    ax.set_xlabel("token")


def metric_heatmaps(values: dict[str, np.ndarray], tokens: list[str], path: str, title: str = "") -> str:
    """Draw one heatmap per metric, layers by tokens, in a single PNG.

    Args:
        values: metric name to `[L, T]` array (NaN where undefined).
        tokens: the text of each of the T tokens.
    """
    columns, note = _token_columns(tokens)
    L = next(iter(values.values())).shape[0]
    width = max(8.0, 0.12 * len(columns) + 3)
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(width, 2.2 + 0.25 * L * len(METRICS)), squeeze=False)
    for ax, name in zip(axes[:, 0], METRICS):
        data = values[name][:, columns]
        finite = data[np.isfinite(data)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest",
                          cmap="viridis", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)
        ax.set_title(name, fontsize=10, loc="left")
        _layer_axis(ax, L)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
        _token_axis(ax, tokens, columns)
    _finish(fig, title, note, path)
    return path


def mode_map(mode_LT: np.ndarray, tokens: list[str], mode_names: tuple[str, ...], path: str, title: str = "") -> str:
    """Draw the mode label of every layer and token in one colour per mode."""
    columns, note = _token_columns(tokens)
    L = mode_LT.shape[0]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(columns) + 3), 2.0 + 0.3 * L))
    cmap = ListedColormap(MODE_COLOURS[: len(mode_names)])
    ax.imshow(mode_LT[:, columns], aspect="auto", interpolation="nearest", cmap=cmap,
              vmin=-0.5, vmax=len(mode_names) - 0.5)
    _layer_axis(ax, L)
    _token_axis(ax, tokens, columns)
    handles = [plt.Rectangle((0, 0), 1, 1, color=MODE_COLOURS[i]) for i in range(len(mode_names))]
    ax.legend(handles, mode_names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _finish(fig, title or "mode per layer and token", note, path)
    return path


def layer_curves(values: dict[str, np.ndarray], path: str, title: str = "") -> str:
    """Draw each metric's per-layer mean over tokens, with the 10th to 90th percentile band.

    Args:
        values: metric name to `[..., L, T]` arrays; every leading axis and T
            are pooled, NaN entries skipped.
    """
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), squeeze=False)
    for ax, name in zip(axes[0], METRICS):
        data = values[name]
        per_layer = np.moveaxis(data, -2, 0).reshape(data.shape[-2], -1)
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            mean = np.nanmean(per_layer, axis=1)
            low, high = np.nanpercentile(per_layer, [10, 90], axis=1)
        layers = np.arange(per_layer.shape[0])
        ax.plot(layers, mean, marker="o", markersize=3, label="mean")
        ax.fill_between(layers, low, high, alpha=0.25, label="10th-90th percentile")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _finish(fig, title, None, path)
    return path


class _quiet_nan_warnings:
    """Silence NumPy's 'all-NaN slice' warnings for layers with no defined value."""

    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _finish(fig, title: str, note: str | None, path: str) -> None:
    if title:
        fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.01, 0.005, note, fontsize=8, style="italic")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
