"""Capture points with TransformerLens' names, the capture spec and the cache.

The names are TransformerLens' hook names, so that code written against a
`HookedTransformer` cache reads the same here:

    hook_embed                       [B, T, D]  token embeddings
    blocks.{l}.hook_resid_pre        [B, T, D]  residual stream entering block l
    blocks.{l}.hook_attn_out         [B, T, D]  attention output of block l
    blocks.{l}.hook_resid_mid        [B, T, D]  resid_pre + attn_out
    blocks.{l}.hook_mlp_out          [B, T, D]  MLP output of block l
    blocks.{l}.hook_resid_post       [B, T, D]  residual stream leaving block l
    blocks.{l}.attn.hook_result      [B, T, H, D]  per-head attention outputs
    ln_final.hook_normalized         [B, T, D]  final RMS normalisation, before
                                                its gain (as in TransformerLens)

A `CaptureSpec` says which of them a forward pass returns. Points and layers
that are not requested are never written to memory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

HOOK_EMBED = "hook_embed"
LN_FINAL = "ln_final.hook_normalized"
BLOCK_POINTS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
    "attn.hook_result",
)

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


def block_name(layer: int, point: str) -> str:
    """Return the full capture name of `point` in block `layer`."""
    return f"blocks.{layer}.{point}"


def all_names(num_layers: int) -> list[str]:
    """List every capture name of a model with `num_layers` blocks, in forward order."""
    names = [HOOK_EMBED]
    for layer in range(num_layers):
        names.extend(block_name(layer, point) for point in BLOCK_POINTS)
    names.append(LN_FINAL)
    return names


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """Which capture points a forward pass returns.

    Attributes:
        embed: return `hook_embed`.
        ln_final: return `ln_final.hook_normalized`.
        block_layers: for each block point, the sorted layers to return.
    """

    embed: bool = False
    ln_final: bool = False
    block_layers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.embed or self.ln_final or self.block_layers)

    def layers_for(self, point: str) -> tuple[int, ...]:
        for name, layers in self.block_layers:
            if name == point:
                return layers
        return ()

    def names(self) -> list[str]:
        """List the requested capture names in forward order."""
        out = [HOOK_EMBED] if self.embed else []
        num_layers = 1 + max((max(layers) for _, layers in self.block_layers), default=-1)
        for layer in range(num_layers):
            for point in BLOCK_POINTS:
                if layer in self.layers_for(point):
                    out.append(block_name(layer, point))
        if self.ln_final:
            out.append(LN_FINAL)
        return out

    @classmethod
    def none(cls) -> CaptureSpec:
        return cls()

    @classmethod
    def from_names_filter(cls, names_filter: NamesFilter, num_layers: int) -> CaptureSpec:
        """Build a spec the way TransformerLens reads `names_filter`.

        Args:
            names_filter: `None` for every point, one name, a list of names, or
                a function from a name to a bool.
            num_layers: the model's number of blocks, to check layer indices.

        Raises:
            ValueError: a name is not a capture point of this model.
        """
        valid = all_names(num_layers)
        if names_filter is None:
            chosen = valid
        elif callable(names_filter):
            chosen = [name for name in valid if names_filter(name)]
        else:
            requested = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            valid_set = set(valid)
            unknown = [name for name in requested if name not in valid_set]
            if unknown:
                raise ValueError(
                    f"unknown capture point(s) {unknown}; valid names are 'hook_embed', "
                    f"'blocks.{{l}}.<point>' for l in 0..{num_layers - 1} and point in "
                    f"{list(BLOCK_POINTS)}, and '{LN_FINAL}'"
                )
            chosen = requested
        return cls.from_names(chosen)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> CaptureSpec:
        embed = False
        ln_final = False
        layers: dict[str, set[int]] = {}
        for name in names:
            if name == HOOK_EMBED:
                embed = True
            elif name == LN_FINAL:
                ln_final = True
            else:
                match = _BLOCK_NAME.match(name)
                if match is None or match.group(2) not in BLOCK_POINTS:
                    raise ValueError(f"unknown capture point {name!r}")
                layers.setdefault(match.group(2), set()).add(int(match.group(1)))
        block_layers = tuple(
            (point, tuple(sorted(layers[point]))) for point in BLOCK_POINTS if point in layers
        )
        return cls(embed=embed, ln_final=ln_final, block_layers=block_layers)


class ActivationCache(Mapping[str, Any]):
    """Captured activations keyed by TransformerLens' names.

    Works like TransformerLens' `ActivationCache` for reading: `cache[name]`,
    `cache["resid_pre", 3]` as a short form of `cache["blocks.3.hook_resid_pre"]`,
    `"name" in cache`, iteration over names. Values are JAX arrays;
    `to_numpy()` copies them to host memory.
    """

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = dict(arrays)

    def __getitem__(self, key: str | tuple[str, int]) -> Any:
        if isinstance(key, tuple):
            key = _expand_short_name(*key)
        try:
            return self._arrays[key]
        except KeyError:
            raise KeyError(
                f"{key!r} was not captured; captured points are {sorted(self._arrays)}. "
                "Request it through names_filter."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"ActivationCache({sorted(self._arrays)})"

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(value) for name, value in self._arrays.items()}

    def stack(self, point: str) -> Any:
        """Stack one block point over layers into a `[L, ...]` array."""
        import jax.numpy as jnp

        names = sorted(
            (int(m.group(1)), name)
            for name in self._arrays
            if (m := _BLOCK_NAME.match(name)) and m.group(2) == point
        )
        if not names:
            raise KeyError(f"no layer of {point!r} was captured")
        return jnp.stack([self._arrays[name] for _, name in names])


def _expand_short_name(point: str, layer: int) -> str:
    short = {
        "resid_pre": "hook_resid_pre",
        "attn_out": "hook_attn_out",
        "resid_mid": "hook_resid_mid",
        "mlp_out": "hook_mlp_out",
        "resid_post": "hook_resid_post",
        "result": "attn.hook_result",
    }
    if point in short:
        return block_name(layer, short[point])
    if point in BLOCK_POINTS:
        return block_name(layer, point)
    raise KeyError(f"unknown short capture name {point!r}; use one of {sorted(short)}")
