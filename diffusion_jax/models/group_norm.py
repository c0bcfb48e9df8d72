"""Group normalisation (Wu & He 2018) with a hand-written derivative.

For activations ``x [B, ..., C]`` with the channels split into G groups of C/G, over the
N = P * C/G values of each (example, group), P the number of positions (Wu & He, Eq. 1-4):

    mu = mean(x),  rstd = 1 / sqrt(var(x) + eps),  x_hat = (x - mu) * rstd,
    y = scale * x_hat + bias.

Its tangent, with a = scale * rstd per (example, channel) and group means over positions and
the group's channels, mu' = mean(x') and m = mean(x_hat * x'):

    y' = a * x' + (bias' - a * mu') + x_hat * (scale' - a * m),

two per-(example, channel) terms spread over the positions. Its transpose, the gradient,
then needs only two sums over positions, S2 = sum_p dy and S1 = sum_p dy * x_hat
(with g1 = mean_group(scale * S2), g2 = mean_group(scale * S1)):

    d scale = sum_b S1,   d bias = sum_b S2,   dx = rstd * (scale * dy - g1 - x_hat * g2).

Why write it out: the gradient JAX derives from the definition reads the activations in four
separate reductions over positions (d scale, d bias and two per-group sums), each
recomputing its fused producers, and XLA:CPU runs each on one thread (`reductions`): the
DDPM U-Net's 51 GroupNorms took about a sixth of a CPU train step. Here the sums are
`reductions.sum_over_positions` and the backward pass reads ``x`` and ``dy`` twice: once
for S1 and S2, once for dx. A custom JVP rather than a custom VJP (whose backward pass
measured the same in the U-Net's train step, docs/benchmarks.md) keeps
forward mode (`jax.jvp`, used by the ODE likelihood) working.
Parameters are ``scale`` and ``bias``, as ``flax.linen.GroupNorm``'s, so checkpoints of
either load into the other.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import Dtype
from diffusion_jax.models.reductions import broadcast_over_positions, sum_over_positions


def _per_channel(group_values: jax.Array, channels: int) -> jax.Array:
    """``[B, G] -> [B, 1, C]``: each group's value repeated over its C/G channels."""
    groups = group_values.shape[1]
    return jnp.repeat(group_values, channels // groups, axis=1)[:, None, :]


def _group_sums(channel_values: jax.Array, groups: int) -> jax.Array:
    """``[B, C] -> [B, G]``: sums over the channels of each group."""
    batch, channels = channel_values.shape
    return channel_values.reshape(batch, groups, channels // groups).sum(axis=-1)


def _statistics(
    x: jax.Array, groups: int, eps: float, centered: bool
) -> tuple[jax.Array, jax.Array]:
    """Per-(example, group) mean and 1 / sqrt(var + eps) of ``x [B, P, C]``, float32 [B, G].

    The variance is E[x^2] - E[x]^2 (one pass, flax.linen.GroupNorm's default), or with
    ``centered`` E[(x - E[x])^2] (two passes, as PyTorch's): the second keeps its precision
    when a group's mean is large against its spread (few positions, e.g. a 1 x 1 tile)."""
    count = x.shape[1] * (x.shape[2] // groups)
    x = x.astype(jnp.float32)
    mean = _group_sums(sum_over_positions(x), groups) / count
    if centered:
        deviation = x - _per_channel(mean, x.shape[2])
        var = _group_sums(sum_over_positions(jnp.square(deviation)), groups) / count
    else:
        mean_square = _group_sums(sum_over_positions(jnp.square(x)), groups)
        var = jnp.maximum(mean_square / count - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def _normalized(x: jax.Array, mean: jax.Array, rstd: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    return (x.astype(jnp.float32) - _per_channel(mean, channels)) * _per_channel(rstd, channels)


def _per_channel_mean(channel_sums: jax.Array, groups: int, count: int) -> jax.Array:
    """``[B, C] -> [B, C]``: the mean of each group (sums over the group's channels / count),
    repeated over its channels."""
    return _per_channel(_group_sums(channel_sums, groups) / count, channel_sums.shape[1])[:, 0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, groups: int, eps: float, out_dtype, centered: bool):
    """``x [B, P, C]`` normalised per (example, group), then ``scale * x_hat + bias``."""
    mean, rstd = _statistics(x, groups, eps, centered)
    return (_normalized(x, mean, rstd) * scale + bias).astype(out_dtype)


@_group_norm.defjvp
def _group_norm_jvp(groups, eps, out_dtype, centered, primals, tangents):
    """The tangent of the module docstring; every tangent that is constant over positions is
    spread by `broadcast_over_positions`, so that the transpose sums with GEMVs."""
    x, scale, bias = primals
    x_dot, scale_dot, bias_dot = tangents
    positions, channels = x.shape[1], x.shape[2]
    count = positions * (channels // groups)
    mean, rstd = _statistics(x, groups, eps, centered)
    x_hat = _normalized(x, mean, rstd)
    y = (x_hat * scale + bias).astype(out_dtype)
    a = _per_channel(rstd, channels)[:, 0] * scale  # [B, C]
    x_dot = x_dot.astype(jnp.float32)
    mean_dot = _per_channel_mean(sum_over_positions(x_dot), groups, count)  # [B, C]
    m = _per_channel_mean(sum_over_positions(x_hat * x_dot), groups, count)  # [B, C]
    shift = bias_dot[None] - a * mean_dot
    gain = scale_dot[None] - a * m
    y_dot = (
        a[:, None] * x_dot
        + broadcast_over_positions(shift, positions)
        + x_hat * broadcast_over_positions(gain, positions)
    )
    return y, y_dot.astype(out_dtype)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    groups: int,
    eps: float = 1e-6,
    dtype: Dtype | None = None,
    centered: bool = False,
) -> jax.Array:
    """Group normalisation of ``x [B, ..., C]`` over all positions and the C/G channels of
    each group (module docstring), output in ``dtype`` (default: ``x.dtype`` promoted with
    float32, as flax's)."""
    channels = x.shape[-1]
    if groups <= 0 or channels % groups != 0:
        raise ValueError(f"groups={groups} must divide the channel count {channels}")
    flat = x.reshape(x.shape[0], -1, channels)  # [B, P, C]
    out_dtype = jnp.result_type(x.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
    y = _group_norm(
        flat, scale.astype(jnp.float32), bias.astype(jnp.float32), groups, eps, out_dtype, centered
    )
    return y.reshape(x.shape)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm(num_groups)``'s parameters and outputs (statistics in float32,
    output in ``dtype``), with the backward pass of the module docstring; ``centered``
    computes the variance in two passes (`_statistics`)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    centered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,))
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
        return group_norm(
            x,
            scale,
            bias,
            groups=self.num_groups,
            eps=self.epsilon,
            dtype=self.dtype,
            centered=self.centered,
        )
