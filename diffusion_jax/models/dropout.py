"""Dropout (Srivastava et al. 2014) with counter-based random bits, one key per network.

With a Threefry key (JAX's default) the bits are Threefry-2x32 (Salmon et al. 2011) of the
network's one key at counters that tell the layers apart: layer ``stream`` of a batch of
``B`` examples uses the counter pairs ``(stream * B + b, j)`` for example ``b``, and both
32-bit output words of each pair (Random123's scheme). flax's ``nn.Dropout`` instead derives
a key per layer (``fold_in``, one Threefry loop each) and draws a pair per element of
which ``jax.random.bits`` keeps the xor: on CPUs, where JAX runs Threefry as a loop of five
passes over its counters, the CIFAR-10 U-Net's train step had 44 loops instead of 22, and
each loop twice the counters (docs/benchmarks.md, "Dropout with one key").

(Threefry written out as array operations would need no loop, but XLA fuses such an
expression into every consumer of the mask, forward and backward, and repeats it there.)

A key of another implementation (``jax_default_prng_impl=rbg`` or ``unsafe_rbg``, XLA's
RngBitGenerator, which TPU runs pick for speed) gets a key per layer, ``fold_in(key,
stream)``, and that key's ``jax.random.bits``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

_COUNTER_LIMIT = 2**32


def _typed_key(key: jax.Array) -> jax.Array:
    """``key`` as a typed key: a raw uint32[2] is a Threefry ``PRNGKey``, another raw key
    (uint32[4] under ``jax_default_prng_impl=rbg``) one of the default implementation."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    impl = "threefry2x32" if key.shape == (2,) else jax.config.jax_default_prng_impl
    try:
        return jax.random.wrap_key_data(key, impl=impl)
    except TypeError as error:
        raise ValueError(
            f"dropout needs a PRNG key; {key.dtype}{list(key.shape)} is not raw key data of "
            f"jax_default_prng_impl={impl!r}"
        ) from error


def random_bits(key: jax.Array, stream: int, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of ``shape`` ``[B, ...]``: Threefry-2x32 of ``key`` at the counter pairs
    ``(stream * B + b, j)``, j < ceil(n / 2) for the n elements of an example; example b's
    elements in row-major order are the first output words, then the second ones.

    A key of another implementation (``rbg``, ``unsafe_rbg``, which TPU users pick for
    speed) has no counters to address: its bits are ``jax.random.bits`` of the key folded
    with ``stream``."""
    key = _typed_key(key)
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return jax.random.bits(jax.random.fold_in(key, stream), shape, jnp.uint32)
    batch, per_example = shape[0], int(np.prod(shape[1:]))
    pairs = -(-per_example // 2)
    if (stream + 1) * batch > _COUNTER_LIMIT:
        raise ValueError(
            f"dropout stream {stream} of a batch of {batch} runs past Threefry's 2**32 counters"
        )
    grid = (batch, pairs)
    x0 = lax.broadcasted_iota(jnp.uint32, grid, 0) + np.uint32(stream * batch)
    x1 = lax.broadcasted_iota(jnp.uint32, grid, 1)
    k0, k1 = jax.random.key_data(key)
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
    # Scaled in float32: 1 / (1 - 0.1) rounded to bfloat16 would shrink the mean by 0.16%.
    kept = (x.astype(jnp.float32) * jnp.float32(scale)).astype(x.dtype)
    return jnp.where(keep, kept, jnp.zeros((), x.dtype))
