"""3x3 convolutions by Winograd's minimal filtering algorithm F(2x2, 3x3) (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016, Sec. 4.1).

Each 2x2 block of outputs is computed from a 4x4 tile of the input as

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A            (the nested 2-D form of Lavin & Gray)

with the constant matrices of `F2_3_*` below, so that a 3x3 convolution takes 16
multiplications per 2x2 outputs and input-output channel pair instead of 36 (2.25x
fewer). Summed over the input channels, the ⊙ becomes one matrix product per tile
position (16 of them, as Lavin & Gray arrange it): ``M_k = V_k U_k`` with ``V_k [tiles,
C_in]`` the transformed input and ``U_k [C_in, C_out]`` the transformed kernel.

Used on CPUs, where XLA's direct convolution runs at the speed of its matrix products, so
fewer multiplications mean less time (docs/benchmarks.md: the 3x3 convolutions of the DDPM
CIFAR-10 U-Net at batch 4 in 259 ms instead of 346 ms). Two forms:

- `conv3x3` (inference): differentiable by JAX in both modes (the ODE likelihood's jvp).
  The kernel transform ``G g G^T`` is a small product on the parameters, which XLA hoists
  out of a sampler's loop (computed once per sampling run, not per step).
- `conv3x3_for_training`: a custom VJP. A convolution's input gradient is itself a 3x3
  "same" convolution (of the output gradient with the kernel turned by 180 degrees, input
  and output channels swapped), so it runs by Winograd too; the kernel gradient is XLA's
  own. Two of a training step's three convolutions per layer by Winograd (JAX's transpose
  of `conv3x3` is slower than the direct convolution's gradient).

Float32 only: the transforms add and subtract up to 9 terms, which costs bfloat16 more
precision than float32 (whose error stays within 4e-6 of the output's magnitude, as the
direct convolution's own rounding).
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
# G g G^T for the 9 taps g of a kernel flattened row-major: (G ⊗ G) vec(g), [16, 9].
KERNEL_TRANSFORM = np.kron(F2_3_G, F2_3_G)
TILE = 4  # input tile of F(2x2, 3x3): 2 outputs + 3 taps - 1
OUT = 2  # outputs per tile and axis
# Fewest 2x2 output tiles (`num_tiles`) where Winograd pays: with fewer, its 16 matrix
# products have too few rows. The DDPM CIFAR-10 U-Net forward pass on a 2-core AVX2 CPU
# (docs/benchmarks.md), Winograd at one more resolution against without it: 64 tiles lose
# (batch 1 at 16x16: 108.7 against 106.9 ms; batch 4 at 8x8: 263 against 259 ms of
# convolutions), 256 tiles win (batch 16 at 8x8: 1258 against 1307 ms; batch 64 at 4x4:
# 4679 against 4914 ms).
MIN_TILES = 256


def num_tiles(batch: int, height: int, width: int) -> int:
    """The 2x2 output tiles of a ``[batch, height, width, C]`` convolution output."""
    return batch * -(-height // OUT) * -(-width // OUT)


def applies(kernel_size, strides, padding: int, dtype, batch: int, height: int, width: int):
    """Whether Winograd computes this convolution faster than XLA's direct one: a 3x3
    kernel, stride 1, "same" padding, float32, at least `MIN_TILES` output tiles."""
    return (
        tuple(kernel_size) == (3, 3)
        and tuple(strides) == (1, 1)
        and padding == 1
        and jnp.dtype(dtype) == jnp.float32
        and num_tiles(batch, height, width) >= MIN_TILES
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
    positions in row-major order.

    As one matrix product ``(G ⊗ G) [16, 9]`` by the 9 taps ``[9, C_in * C_out]``: XLA
    compiles it as one kernel, where 16 sums of taps (as `_two_sided` would write it) are
    16 fused loops; with those, Winograd's programs compiled 5x slower (8 chained
    convolutions: 2.85 s against 0.58 s)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs a 3x3 kernel, got {kernel.shape}")
    taps = kernel.reshape(9, *kernel.shape[2:])  # [(i, j), C_in, C_out]
    return jnp.einsum("pt,tco->pco", KERNEL_TRANSFORM.astype(kernel.dtype), taps)


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
    # Interleaved by stacking at the inner axes ([B, th, 2 (row in block), tw, 2 (col), O]):
    # the same loop as stacking first and transposing, compiled in 2/3 of the time.
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)
    return y.reshape(batch, OUT * tiles_h, OUT * tiles_w, -1)[:, :height, :width]


def _direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's 3x3, stride-1, "same" convolution (NHWC, HWIO)."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def conv3x3_for_training(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [B, H, W, C_in]`` correlated with ``kernel [3, 3, C_in, C_out]``, stride 1, "same"
    padding, by Winograd, with a gradient that is fast too (module docstring): the input
    gradient by Winograd, the kernel gradient by XLA's convolution. Reverse mode only."""
    return conv3x3(x, transform_kernel(kernel))


def _for_training_forward(x, kernel):
    return conv3x3_for_training(x, kernel), (x, kernel)


def _for_training_backward(residuals, grad_out):
    """dL/dx[p] = sum_{i,j,o} grad_out[p - (i, j) + 1, o] kernel[i, j, :, o]: the "same"
    correlation of ``grad_out`` with the kernel turned by 180 degrees, [3, 3, C_out, C_in]."""
    x, kernel = residuals
    turned = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_x = conv3x3(grad_out, transform_kernel(turned))
    _, kernel_vjp = jax.vjp(lambda k: _direct(x, k), kernel)
    return grad_x, kernel_vjp(grad_out)[0]


conv3x3_for_training.defvjp(_for_training_forward, _for_training_backward)
