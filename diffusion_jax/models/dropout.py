"""Dropout (Srivastava et al. 2014) with counter-based random bits, one key per network.

The bits are Threefry-2x32 (Salmon et al. 2011), the generator of ``jax.random``, of the
network's one key at counters that tell the layers apart: layer ``stream`` of a batch of
``B`` examples uses the counter pairs ``(stream * B + b, j)`` for example ``b``, and both
32-bit output words of each pair (Random123's scheme). flax's ``nn.Dropout`` instead derives
a key per layer (``fold_in``, one Threefry loop each) and draws a pair per element of
which ``jax.random.bits`` keeps the xor: on CPUs, where JAX runs Threefry as a loop of five
passes over its counters, the CIFAR-10 U-Net's train step had 44 loops instead of 22, and
each loop twice the counters (docs/benchmarks.md, "Dropout with one key").

(Threefry written out as array operations would need no loop, but XLA fuses such an
expression into every consumer of the mask, forward and backward, and repeats it there.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

_COUNTER_LIMIT = 2**32


def threefry_key(key: jax.Array) -> jax.Array:
    """The uint32[2] Threefry key of ``key``, a typed JAX key or a raw ``PRNGKey``."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"dropout needs a Threefry key (uint32[2]), got {key.dtype}{list(key.shape)}"
        )
    return key


def random_bits(key: jax.Array, stream: int, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of ``shape`` ``[B, ...]``: Threefry-2x32 of ``key`` at the counter pairs
    ``(stream * B + b, j)``, j < ceil(n / 2) for the n elements of an example; example b's
    elements in row-major order are the first output words, then the second ones."""
    batch, per_example = shape[0], int(np.prod(shape[1:]))
    pairs = -(-per_example // 2)
    if (stream + 1) * batch > _COUNTER_LIMIT:
        raise ValueError(
            f"dropout stream {stream} of a batch of {batch} runs past Threefry's 2**32 counters"
        )
    grid = (batch, pairs)
    x0 = lax.broadcasted_iota(jnp.uint32, grid, 0) + np.uint32(stream * batch)
    x1 = lax.broadcasted_iota(jnp.uint32, grid, 1)
    k0, k1 = threefry_key(key)
    y0, y1 = threefry2x32_p.bind(k0, k1, x0, x1)
    return jnp.concatenate([y0, y1], axis=1)[:, :per_example].reshape(shape)


def dropout(x: jax.Array, rate: float, key: jax.Array, stream: int) -> jax.Array:
    """``x`` with each element zeroed with probability ``rate`` and the rest scaled by
    1 / (1 - rate), so that the expectation is ``x`` (Srivastava et al. 2014, Sec. 4).

    An element is kept when its bits are at least ``round(rate * 2**32)``: the rate is
    exact to 2**-33, and the scale uses the rate so rounded, keeping the mean exact."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = min(round(rate * _COUNTER_LIMIT), _COUNTER_LIMIT - 1)
    if threshold == 0:
        return x
    keep = random_bits(key, stream, x.shape) >= np.uint32(threshold)
    scale = _COUNTER_LIMIT / (_COUNTER_LIMIT - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))
