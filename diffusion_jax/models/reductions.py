"""Sums over the positions of an activation, written as matrix-vector products on the CPU.

A layer's backward pass sums over positions: a bias gradient sums its output gradient over
batch and space, GroupNorm's gradient sums per example and channel. XLA:CPU (jaxlib 0.10)
runs such a reduction over a non-minor axis on one thread, far below the memory bandwidth:
in the DDPM U-Net's CPU train step the bias gradients alone took about 0.3 s of 5.5 s. The
same sum as a product with a vector of ones is a (batched) GEMV, which XLA:CPU runs
multi-threaded and vectorised (docs/benchmarks.md). Other backends reduce well: there these
are plain `jnp.sum`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_over_positions(v: jax.Array) -> jax.Array:
    """``[B, P, C] -> [B, C]``: the float32 sum over the P positions of each of the B rows."""
    v = v.astype(jnp.float32)
    if jax.default_backend() != "cpu":
        return jnp.sum(v, axis=1)
    ones = jnp.ones((v.shape[0], 1, v.shape[1]), jnp.float32)
    summed = jnp.einsum("bqp,bpc->bqc", ones, v, precision=jax.lax.Precision.HIGHEST)
    return summed[:, 0]  # [B, C]


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y [..., C] + bias [C]``; the bias gradient, the sum of the output gradient over all
    leading axes, is computed by `sum_over_positions`."""
    return y + bias


def _add_bias_forward(y, bias):
    return y + bias, bias


def _add_bias_backward(bias, dy):
    flat = dy.reshape(1, -1, dy.shape[-1])  # [1, positions, C]
    return dy, sum_over_positions(flat)[0].astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)
