"""3x3 convolutions by Winograd's minimal filtering algorithm F(2x2, 3x3) (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016, Sec. 4.1).

Each 2x2 block of outputs is computed from a 4x4 tile of the input as

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A            (the nested 2-D form of Lavin & Gray)

with the constant matrices of `F2_3_*` below, so that a 3x3 convolution takes 16
multiplications per 2x2 outputs and input-output channel pair instead of 36 (2.25x
fewer). Summed over the input channels, the ⊙ becomes one matrix product per tile
position (16 of them, as Lavin & Gray arrange it): ``M_k = V_k U_k`` with ``V_k [tiles,
C_in]`` the transformed input and ``U_k [C_in, C_out]`` the transformed kernel.

Used for inference on CPUs, where XLA's direct convolution runs at the speed of its matrix
products, so fewer multiplications mean less time (docs/benchmarks.md: the 3x3 convolutions
of the DDPM CIFAR-10 U-Net at batch 4 in 259 ms instead of 346 ms). The kernel transform
``G g G^T`` is elementwise work on the parameters, which XLA hoists out of a sampler's
loop (loop-invariant code motion: computed once per sampling run, not per step). Float32
only: the transforms add and subtract up to 9 terms, which costs bfloat16 more precision
than float32 (whose error stays within 4e-6 of the output's magnitude, as the direct
convolution's own rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# F(2, 3) of Lavin & Gray (2016), Sec. 4.1: y = A^T [(G g) ⊙ (B^T d)] for a 4-sample input d
# and a 3-tap filter g gives the 2 outputs y_i = sum_k d_{i+k} g_k (a correlation, as
# convolutional networks use).
F2_3_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
F2_3_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
F2_3_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
TILE = 4  # input tile of F(2x2, 3x3): 2 outputs + 3 taps - 1
OUT = 2  # outputs per tile and axis
# Smallest H and W where it pays in the whole U-Net forward pass (2-core AVX2 CPU): with
# Winograd at 8x8 too, its convolutions took 263 against 259 ms at batch 4 and the forward
# pass 1324 against 1351 ms at batch 16 (within the noise), at 4x4 too 1371 ms. Alone, an
# 8x8x256 convolution is faster by Winograd (1.9 against 2.7 ms at batch 4): the whole
# pass, not the layer, decides (docs/benchmarks.md).
MIN_SIZE = 16


def applies(kernel_size, strides, padding: int, dtype, height: int, width: int) -> bool:
    """Whether `conv3x3` computes this convolution faster than XLA's direct one: a 3x3
    kernel, stride 1, "same" padding, float32, at least `MIN_SIZE` pixels a side."""
    return (
        tuple(kernel_size) == (3, 3)
        and tuple(strides) == (1, 1)
        and padding == 1
        and jnp.dtype(dtype) == jnp.float32
        and min(height, width) >= MIN_SIZE
    )


def _combine(matrix: np.ndarray, items: list[jax.Array]) -> list[jax.Array]:
    """``[sum_j matrix[i, j] * items[j] for each row i]``, skipping zero coefficients, so
    that XLA sees additions and subtractions it fuses into one loop, not a matrix product."""
    rows = []
    for coefficients in matrix:
        total = None
        for c, item in zip(coefficients, items, strict=True):
            if c == 0:
                continue
            term = item if c == 1 else -item if c == -1 else float(c) * item
            total = term if total is None else total + term
        rows.append(total)
    return rows


def _two_sided(matrix: np.ndarray, grid: list[list[jax.Array]]) -> list[list[jax.Array]]:
    """``matrix @ grid @ matrix^T`` for a grid of arrays (``grid[i][j]``), elementwise."""
    size = len(grid[0])
    columns = [_combine(matrix, [row[j] for row in grid]) for j in range(size)]  # [j][a]
    return [_combine(matrix, [column[a] for column in columns]) for a in range(len(matrix))]


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """``U = G g G^T`` of a ``[3, 3, C_in, C_out]`` kernel: ``[16, C_in, C_out]``, tile
    positions in row-major order."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs a 3x3 kernel, got {kernel.shape}")
    grid = [[kernel[i, j] for j in range(3)] for i in range(3)]
    return jnp.stack([u for row in _two_sided(F2_3_G, grid) for u in row])


def transform_input(x: jax.Array) -> jax.Array:
    """``V = B^T d B`` of every 4x4 input tile ``d`` (stride 2) of ``x [B, H, W, C]``,
    zero-padded by one pixel ("same" padding, and up to even H, W): ``[16, B * ceil(H/2) *
    ceil(W/2), C]``, tile positions in row-major order, as `transform_kernel`.

    Separably: ``B^T`` along H on the padded rows (4 strided row slices, 4 combinations),
    then along W on those, which reads and writes less than the 16 tile pixels at once
    (9.3 -> 6.7 ms at [16, 32, 32, 128] on a 2-core AVX2 CPU)."""
    _, height, width, channels = x.shape
    tiles_h, tiles_w = -(-height // OUT), -(-width // OUT)
    pad_h, pad_w = OUT * tiles_h + 1 - height, OUT * tiles_w + 1 - width
    padded = jnp.pad(x, ((0, 0), (1, pad_h), (1, pad_w), (0, 0)))
    rows, cols = OUT * tiles_h, OUT * tiles_w
    along_h = jnp.stack(_combine(F2_3_BT, [padded[:, i : i + rows : OUT] for i in range(TILE)]))
    # along_h [4 (a), B, tiles_h, padded width, C]: B^T applied down each column of tiles
    along_w = _combine(F2_3_BT, [along_h[:, :, :, j : j + cols : OUT] for j in range(TILE)])
    return jnp.stack(along_w, axis=1).reshape(TILE * TILE, -1, channels)  # [(a, b), N, C]


def conv3x3(x: jax.Array, transformed_kernel: jax.Array) -> jax.Array:
    """``x [B, H, W, C_in]`` correlated with a 3x3 kernel given as ``transform_kernel(kernel)``,
    stride 1, "same" zero padding: ``[B, H, W, C_out]``, as ``lax.conv_general_dilated``."""
    batch, height, width, _ = x.shape
    tiles_h, tiles_w = -(-height // OUT), -(-width // OUT)
    v = transform_input(x)  # B^T d B, [16, B * tiles_h * tiles_w, C_in]
    m = jnp.einsum("knc,kco->kno", v, transformed_kernel)  # one product per tile position
    m = m.reshape(TILE, TILE, batch, tiles_h, tiles_w, -1)
    y = _two_sided(F2_3_AT, [[m[a, b] for b in range(TILE)] for a in range(TILE)])  # A^T M A
    y = jnp.stack([jnp.stack(row) for row in y])  # [2 (row in block), 2 (col), B, th, tw, O]
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, OUT * tiles_h, OUT * tiles_w, -1)
    return y[:, :height, :width]
