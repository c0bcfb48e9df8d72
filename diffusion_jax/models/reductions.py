"""Sums over the positions of an activation, written as matrix-vector products on the CPU.

A layer's backward pass sums over positions: a bias gradient sums its output gradient over
batch and space, GroupNorm's gradient sums per example and channel. XLA:CPU (jaxlib 0.10)
runs such a reduction over a non-minor axis on one thread, far below the memory bandwidth:
in the DDPM U-Net's CPU train step the bias gradients alone took about 0.3 s of 5.5 s. The
same sum as a product with a vector of ones is a (batched) GEMV, which XLA:CPU runs
multi-threaded and vectorised (docs/benchmarks.md). Other backends reduce well: there these
are plain `jnp.sum`s and broadcasts.

The two functions here are each other's transpose. A layer whose gradient needs a sum over
positions writes a custom JVP in which every per-(example, channel) tangent is spread over
the positions by `broadcast_over_positions`: reverse mode, the transpose of that JVP, then
sums with `sum_over_positions`, and forward mode (`jax.jvp`) still works, as it would not
with a `jax.custom_vjp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def sum_over_positions(v: jax.Array) -> jax.Array:
    """``[B, P, C] -> [B, C]``: the float32 sum over the P positions of each of the B rows."""
    v = v.astype(jnp.float32)
    if not _on_cpu():
        return jnp.sum(v, axis=1)
    ones = jnp.ones((v.shape[0], 1, v.shape[1]), jnp.float32)
    return jnp.einsum("bqp,bpc->bqc", ones, v, precision=_HIGHEST)[:, 0]  # [B, C]


def broadcast_over_positions(v: jax.Array, positions: int) -> jax.Array:
    """``[B, C] -> [B, P, C]``: each row repeated at P positions; the transpose of
    `sum_over_positions` (float32)."""
    v = v.astype(jnp.float32)
    if not _on_cpu():
        return jnp.broadcast_to(v[:, None, :], (v.shape[0], positions, v.shape[1]))
    ones = jnp.ones((v.shape[0], 1, positions), jnp.float32)
    return jnp.einsum("bqp,bqc->bpc", ones, v[:, None, :], precision=_HIGHEST)


@jax.custom_jvp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y [..., C] + bias [C]``; the bias gradient, the sum of the output gradient over all
    leading axes, is computed by `sum_over_positions`."""
    return y + bias


@add_bias.defjvp
def _add_bias_jvp(primals, tangents):
    y, bias = primals
    y_dot, bias_dot = tangents
    out = y + bias
    spread = broadcast_over_positions(bias_dot[None], y.size // y.shape[-1])  # [1, N, C]
    return out, (y_dot + spread.reshape(y.shape)).astype(out.dtype)
