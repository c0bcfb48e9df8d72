"""3x3 convolutions by Winograd's minimal filtering algorithms F(2x2, 3x3) and F(4x4, 3x3)
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016, Sec. 4).

Each m x m block of outputs is computed from an (m + 2) x (m + 2) tile of the input as

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A            (the nested 2-D form of Lavin & Gray)

with the constant matrices of `ALGORITHMS` below, so that a 3x3 convolution takes (m + 2)^2
multiplications per m x m outputs and input-output channel pair instead of 9 m^2: 2.25x
fewer for m = 2, 4x fewer for m = 4. Summed over the input channels, the ⊙ becomes one
matrix product per tile position ((m + 2)^2 of them, as Lavin & Gray arrange it):
``M_k = V_k U_k`` with ``V_k [tiles, C_in]`` the transformed input and ``U_k [C_in, C_out]``
the transformed kernel.

Used on CPUs, where XLA's direct convolution runs at the speed of its matrix products, so
fewer multiplications mean less time (docs/benchmarks.md: the 3x3 convolutions of the DDPM
CIFAR-10 U-Net at batch 4 in 259 ms instead of 346 ms with F(2x2, 3x3); its forward pass at
batch 16 in 0.86x the time with F(4x4, 3x3) where that has enough tiles). Two forms:

- `conv3x3` (inference): differentiable by JAX in both modes (the ODE likelihood's jvp).
  The kernel transform ``G g G^T`` is a small product on the parameters, which XLA hoists
  out of a sampler's loop (computed once per sampling run, not per step).
- `conv3x3_for_training`: a custom VJP. A convolution's input gradient is itself a 3x3
  "same" convolution (of the output gradient with the kernel turned by 180 degrees, input
  and output channels swapped), so it runs by Winograd too; the kernel gradient is XLA's
  own. Two of a training step's three convolutions per layer by Winograd (JAX's transpose
  of `conv3x3` is slower than the direct convolution's gradient).

Float32 only: the transforms add and subtract up to 9 (m = 2) or 25 (m = 4) terms, which
costs bfloat16 more precision than float32. In float32 the error stays within 4e-6 of the
output's magnitude for m = 2, as the direct convolution's own rounding, and within 2e-5 for
m = 4 (entries up to 8 and 1/24 in its transforms; tests/winograd_test.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# F(2, 3) of Lavin & Gray (2016), Sec. 4.1: y = A^T [(G g) ⊙ (B^T d)] for a 4-sample input d
# and a 3-tap filter g gives the 2 outputs y_i = sum_k d_{i+k} g_k (a correlation, as
# convolutional networks use).
F2_3_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
F2_3_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
F2_3_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# F(4, 3) of Lavin & Gray (2016), Sec. 4.2 (interpolation points 0, 1, -1, 2, -2 and
# infinity): 4 outputs from a 6-sample input, 6 multiplications instead of 12.
F4_3_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
F4_3_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
F4_3_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float64,
)


class Matrices(NamedTuple):
    """B^T, G and A^T of one-dimensional F(m, 3); the 2-D algorithm nests them."""

    bt: np.ndarray  # [m + 2, m + 2]
    g: np.ndarray  # [m + 2, 3]
    at: np.ndarray  # [m, m + 2]


# By output tile size m: F(2x2, 3x3) and F(4x4, 3x3).
ALGORITHMS = {2: Matrices(F2_3_BT, F2_3_G, F2_3_AT), 4: Matrices(F4_3_BT, F4_3_G, F4_3_AT)}
# Fewest output tiles (`num_tiles`) where an algorithm pays: with fewer, its (m + 2)^2 matrix
# products have too few rows. The DDPM CIFAR-10 U-Net forward pass on a 2-core AVX2 CPU
# (docs/benchmarks.md), F(2x2, 3x3) at one more resolution against without it: 64 tiles
# lose (batch 1 at 16x16: 108.7 against 106.9 ms; batch 4 at 8x8: 263 against 259 ms of
# convolutions), 256 tiles win (batch 16 at 8x8: 1258 against 1307 ms; batch 64 at 4x4:
# 4679 against 4914 ms). F(4x4, 3x3) against F(2x2, 3x3), one layer at batch 16 on a 2-core
# AVX-512 CPU: faster with 256 of its tiles (16x16, 256 channels: 7.0 against 9.2 ms), no
# faster with 64 (8x8: 1.9 against 1.9 ms idle, 6.3 against 5.3 ms with other work running).
MIN_TILES = 256


def _matrices(output_tile: int) -> Matrices:
    if output_tile not in ALGORITHMS:
        raise ValueError(f"Winograd output_tile={output_tile}; allowed: {tuple(ALGORITHMS)}")
    return ALGORITHMS[output_tile]


def num_tiles(batch: int, height: int, width: int, output_tile: int = 2) -> int:
    """The ``output_tile`` x ``output_tile`` output tiles of a ``[batch, height, width, C]``
    convolution output."""
    return batch * -(-height // output_tile) * -(-width // output_tile)


def output_tile(
    kernel_size, strides, padding: int, dtype, batch: int, height: int, width: int, *, training
) -> int:
    """The output tile m of the Winograd algorithm F(m x m, 3x3) that computes this
    convolution fastest, or 0 where XLA's direct convolution does. Winograd needs a 3x3
    kernel, stride 1, "same" padding and float32; it takes m = 4 (4x fewer multiplications)
    where that makes at least `MIN_TILES` tiles and the pass is not ``training``, else m = 2
    (2.25x fewer) where that makes at least `MIN_TILES`.

    Training keeps F(2x2, 3x3): with F(4x4, 3x3) the CIFAR-10 U-Net's loss gradient at batch
    16 compiled 1.5x longer (26.9 against 17.6 s on an idle AVX-512 CPU; 88 against 57 s
    with other work running), too much for the 60 s that a train step may take to compile on
    slower CPUs, and ran in 0.95x the time idle but 1.08x under load (docs/benchmarks.md)."""
    if not (
        tuple(kernel_size) == (3, 3)
        and tuple(strides) == (1, 1)
        and padding == 1
        and jnp.dtype(dtype) == jnp.float32
    ):
        return 0
    candidates = (2,) if training else (4, 2)
    return next((m for m in candidates if num_tiles(batch, height, width, m) >= MIN_TILES), 0)


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


def transform_kernel(kernel: jax.Array, output_tile: int = 2) -> jax.Array:
    """``U = G g G^T`` of a ``[3, 3, C_in, C_out]`` kernel for F(m x m, 3x3), m =
    ``output_tile``: ``[(m + 2)^2, C_in, C_out]``, tile positions in row-major order.

    As one matrix product ``(G ⊗ G) [(m + 2)^2, 9]`` by the 9 taps ``[9, C_in * C_out]``: XLA
    compiles it as one kernel, where the sums of taps (as `_two_sided` would write them) are
    one fused loop per tile position; with those, Winograd's programs compiled 5x slower (8
    chained F(2x2, 3x3) convolutions: 2.85 s against 0.58 s)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(m x m, 3x3) needs a 3x3 kernel, got {kernel.shape}")
    g = _matrices(output_tile).g
    taps = kernel.reshape(9, *kernel.shape[2:])  # [(i, j), C_in, C_out]
    return jnp.einsum("pt,tco->pco", np.kron(g, g).astype(kernel.dtype), taps)


def transform_input(x: jax.Array, output_tile: int = 2) -> jax.Array:
    """``V = B^T d B`` of every (m + 2) x (m + 2) input tile ``d`` (stride m = ``output_tile``)
    of ``x [B, H, W, C]``, zero-padded by one pixel ("same" padding, and up to multiples of
    m): ``[(m + 2)^2, B * ceil(H/m) * ceil(W/m), C]``, tile positions in row-major order, as
    `transform_kernel`.

    Separably: ``B^T`` along H on the padded rows (m + 2 strided row slices, m + 2
    combinations), then along W on those, which reads and writes less than all the tile
    pixels at once (F(2x2, 3x3): 9.3 -> 6.7 ms at [16, 32, 32, 128] on a 2-core AVX2 CPU)."""
    bt, m = _matrices(output_tile).bt, output_tile
    _, height, width, channels = x.shape
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    pad_h, pad_w = m * tiles_h + 1 - height, m * tiles_w + 1 - width
    padded = jnp.pad(x, ((0, 0), (1, pad_h), (1, pad_w), (0, 0)))
    rows, cols, size = m * tiles_h, m * tiles_w, m + 2
    along_h = jnp.stack(_combine(bt, [padded[:, i : i + rows : m] for i in range(size)]))
    # along_h [m + 2 (a), B, tiles_h, padded width, C]: B^T applied down each column of tiles
    along_w = _combine(bt, [along_h[:, :, :, j : j + cols : m] for j in range(size)])
    return jnp.stack(along_w, axis=1).reshape(size * size, -1, channels)  # [(a, b), N, C]


def conv3x3(x: jax.Array, transformed_kernel: jax.Array) -> jax.Array:
    """``x [B, H, W, C_in]`` correlated with a 3x3 kernel given as ``transform_kernel(kernel,
    m)``, stride 1, "same" zero padding: ``[B, H, W, C_out]``, as ``lax.conv_general_dilated``.
    The algorithm F(m x m, 3x3) follows from the transformed kernel's (m + 2)^2 positions."""
    batch, height, width, _ = x.shape
    size = round(np.sqrt(transformed_kernel.shape[0]))
    m = size - 2
    at = _matrices(m).at
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    v = transform_input(x, m)  # B^T d B, [(m + 2)^2, B * tiles_h * tiles_w, C_in]
    products = jnp.einsum("knc,kco->kno", v, transformed_kernel)  # one per tile position
    products = products.reshape(size, size, batch, tiles_h, tiles_w, -1)
    y = _two_sided(at, [[products[a, b] for b in range(size)] for a in range(size)])  # A^T M A
    # Interleaved by stacking at the inner axes ([B, th, m (row in block), tw, m (col), O]):
    # the same loop as stacking first and transposing, compiled in 2/3 of the time.
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)
    return y.reshape(batch, m * tiles_h, m * tiles_w, -1)[:, :height, :width]


def _direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's 3x3, stride-1, "same" convolution (NHWC, HWIO)."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_for_training(x: jax.Array, kernel: jax.Array, output_tile: int = 2) -> jax.Array:
    """``x [B, H, W, C_in]`` correlated with ``kernel [3, 3, C_in, C_out]``, stride 1, "same"
    padding, by Winograd's F(m x m, 3x3) (m = ``output_tile``), with a gradient that is fast
    too (module docstring): the input gradient by Winograd, the kernel gradient by XLA's
    convolution. Reverse mode only."""
    return conv3x3(x, transform_kernel(kernel, output_tile))


def _for_training_forward(x, kernel, output_tile):
    return conv3x3_for_training(x, kernel, output_tile), (x, kernel)


def _for_training_backward(output_tile, residuals, grad_out):
    """dL/dx[p] = sum_{i,j,o} grad_out[p - (i, j) + 1, o] kernel[i, j, :, o]: the "same"
    correlation of ``grad_out`` with the kernel turned by 180 degrees, [3, 3, C_out, C_in]."""
    x, kernel = residuals
    turned = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_x = conv3x3(grad_out, transform_kernel(turned, output_tile))
    _, kernel_vjp = jax.vjp(lambda k: _direct(x, k), kernel)
    return grad_x, kernel_vjp(grad_out)[0]


conv3x3_for_training.defvjp(_for_training_forward, _for_training_backward)
