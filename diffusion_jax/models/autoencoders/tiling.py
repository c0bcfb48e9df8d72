"""Memory-bounded encoding and decoding: overlapping tiles blended together, and batches in
slices (diffusers' `enable_tiling` and `enable_slicing`, with the same results).

    moments = tiled_encode(encode_fn, images, tile_size=512, factor=8)
    images = tiled_decode(decode_fn, latents, tile_size=512, factor=8)
    images = sliced(decode_fn, latents, slice_size=1)

Tiling: an input larger than `tile_size` pixels (the latent tile is tile_size / factor) is
cut into tiles of that size whose corners lie `tile * (1 - overlap)` apart; each tile is
coded on its own, then blended with the already blended tile above and to its left by a
linear ramp over `overlap` of the output tile, and cropped to `tile * (1 - overlap)`. The
blend hides the seams: a tile's GroupNorm statistics and mid-block attention see only the
tile, so a tiled code is close to, not equal to, the untiled one (for an encoder acting
pixel by pixel it is equal). Slicing codes the batch `slice_size` examples at a time with
`jax.lax.map`, inside one compiled program: per-example networks give identical results.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ImageFn = Callable[[jax.Array], jax.Array]  # [B, H, W, C] -> [B, H', W', C']


def _blend(above: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """`tile` whose first `extent` rows along `axis` ramp from `above`'s last rows (weight
    1 - y / extent) to its own (weight y / extent), as diffusers' blend_v / blend_h."""
    extent = min(above.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1] * tile.ndim
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=tile.dtype) / extent).reshape(shape)
    length = above.shape[axis]
    tail = jax.lax.slice_in_dim(above, length - extent, length, axis=axis)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - weight) + head * weight, rest], axis=axis)


def _tiled(fn: ImageFn, x: jax.Array, *, tile_in: int, tile_out: int, overlap: float):
    """fn over overlapping `tile_in`-pixel tiles of x, blended and cropped (module doc)."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    height, width = x.shape[1:3]
    rows = []  # the blended, uncropped tiles, which the next row and column blend with
    for i in range(0, height, stride):
        row = []
        for j_index, j in enumerate(range(0, width, stride)):
            tile = fn(x[:, i : i + tile_in, j : j + tile_in])
            if rows:
                tile = _blend(rows[-1][j_index], tile, extent, axis=1)
            if row:
                tile = _blend(row[-1], tile, extent, axis=2)
            row.append(tile)
        rows.append(row)
    cropped = [jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows]
    return jnp.concatenate(cropped, axis=1)


def _check(tile_size: int, factor: int, overlap: float) -> None:
    """Tiles and their strides on the latent grid: a tile starting between two latent cells
    would encode a shifted grid."""
    if tile_size < factor or tile_size % factor:
        raise ValueError(
            f"tile_size={tile_size} must be a multiple of the downsampling factor {factor}"
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap={overlap} must be in [0, 1)")
    stride = int(tile_size * (1 - overlap))
    if stride % factor:
        raise ValueError(
            f"tile_size={tile_size} with overlap={overlap} puts tiles {stride} pixels apart, "
            f"not a multiple of the downsampling factor {factor}; allowed: tile_size and "
            f"overlap with tile_size * (1 - overlap) a multiple of {factor}"
        )


def tiled_encode(
    encode_fn: ImageFn, x: jax.Array, *, tile_size: int, factor: int, overlap: float = 0.25
) -> jax.Array:
    """`encode_fn(x)` (images -> moments) computed in tiles of `tile_size` pixels when x is
    larger than one tile (diffusers' `_tiled_encode`)."""
    _check(tile_size, factor, overlap)
    if max(x.shape[1:3]) <= tile_size:
        return encode_fn(x)
    return _tiled(encode_fn, x, tile_in=tile_size, tile_out=tile_size // factor, overlap=overlap)


def tiled_decode(
    decode_fn: ImageFn, z: jax.Array, *, tile_size: int, factor: int, overlap: float = 0.25
) -> jax.Array:
    """`decode_fn(z)` (latents -> images) computed in latent tiles of tile_size / factor
    when z is larger than one (diffusers' `tiled_decode`)."""
    _check(tile_size, factor, overlap)
    latent_tile = tile_size // factor
    if max(z.shape[1:3]) <= latent_tile:
        return decode_fn(z)
    return _tiled(decode_fn, z, tile_in=latent_tile, tile_out=tile_size, overlap=overlap)


def sliced(fn: ImageFn, x: jax.Array, *, slice_size: int) -> jax.Array:
    """`fn(x)` computed `slice_size` examples at a time (a sequential `jax.lax.map`)."""
    if slice_size < 1:
        raise ValueError(f"slice_size={slice_size} must be >= 1")
    if x.shape[0] <= slice_size:
        return fn(x)
    return jax.lax.map(lambda example: fn(example[None])[0], x, batch_size=slice_size)
