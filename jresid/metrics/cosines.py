"""Cosines between a layer's update directions, computed in 64-row tiles.

Every metric reads these cosines, and the Gram matrices of histories are the
cosines scaled by the rows' norms. They are computed as products of 64-row
tiles in one batched matmul per tile offset, for two reasons:

* Identical results for every padding length. One T x T matmul picks its
  kernel and summation order from T, so the same two tokens get cosines
  that differ in the last bits when the padding changes. A batched product
  of fixed 64 x D tiles runs the same kernel whatever the number of tiles.
* Less work for window histories. A window of at most w earlier rows needs
  only the tiles within ceil(w / 64) of the diagonal: at T=512 with w <= 64,
  15 of the 64 tiles.

Only tiles at or below the diagonal are computed, and every lookup reads the
entry with the larger index as row, so the cosine matrix is exactly
symmetric.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TILE = 64


def padded_length(num_positions: int) -> int:
    """Return `num_positions` rounded up to a whole number of tiles."""
    return -(-num_positions // TILE) * TILE


class Cosines(NamedTuple):
    """Cosines between the rows of a prepared layer, valid tokens first.

    Attributes:
        tiles_KNBB: tiles_KNBB[k, b] contains the cosines between the rows of
            tile b + k and those of tile b, for offsets k = 0..max_offset.
        dense_PP: The whole [P, P] matrix for P = `padded_length(T)`, when
            every offset was computed; None for a band.
        max_offset: Largest tile offset computed.
    """

    tiles_KNBB: jax.Array
    dense_PP: jax.Array | None
    max_offset: int

    def span(self) -> int:
        """Return the largest |i - j| for which every entry is available."""
        return self.max_offset * TILE

    def lookup(self, rows: jax.Array, cols: jax.Array) -> jax.Array:
        """Return the cosines at (rows, cols); |rows - cols| must be <= span()."""
        if self.dense_PP is not None:
            return self.dense_PP[rows, cols]
        high = jnp.maximum(rows, cols)
        low = jnp.minimum(rows, cols)
        offset = high // TILE - low // TILE
        return self.tiles_KNBB[offset, low // TILE, high % TILE, low % TILE]


def _tile_products(direction_PD: jax.Array, max_offset: int) -> jax.Array:
    """Return [max_offset + 1, N, TILE, TILE] products of tile b + k with tile b."""
    num_tiles = direction_PD.shape[0] // TILE
    tiles_NBD = direction_PD.reshape(num_tiles, TILE, -1)
    products = []
    for offset in range(max_offset + 1):
        count = num_tiles - offset
        product_NBB = jnp.matmul(
            tiles_NBD[offset:],
            jnp.swapaxes(tiles_NBD[:count], 1, 2),
            precision=jax.lax.Precision.HIGHEST,
        )
        products.append(jnp.pad(product_NBB, ((0, offset), (0, 0), (0, 0))))
    return jnp.stack(products)


def compute_cosines(direction_TD: jax.Array, span: int | None) -> Cosines:
    """Compute the cosines of unit rows, within `span` of the diagonal or all of them.

    Args:
        direction_TD: Unit rows (zero rows allowed).
        span: Largest |i - j| that will be looked up, or None for every pair,
            which also builds the dense matrix.

    Returns:
        The cosines.
    """
    num_positions = direction_TD.shape[0]
    num_padded = padded_length(num_positions)
    direction_PD = jnp.pad(direction_TD, ((0, num_padded - num_positions), (0, 0)))
    num_tiles = num_padded // TILE

    if span is None:
        max_offset = num_tiles - 1
    else:
        max_offset = min(num_tiles - 1, -(-span // TILE))
    tiles_KNBB = _tile_products(direction_PD, max_offset)
    cosines = Cosines(tiles_KNBB=tiles_KNBB, dense_PP=None, max_offset=max_offset)
    if span is None:
        index_P = jnp.arange(num_padded)
        dense_PP = cosines.lookup(index_P[:, None], index_P[None, :])
        cosines = cosines._replace(dense_PP=dense_PP)
    return cosines
