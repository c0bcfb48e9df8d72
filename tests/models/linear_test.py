"""Conv / Dense with the GEMV bias gradient (models.linear, models.reductions): the same
parameters, initialisation, outputs and gradients as flax.linen.Conv / flax.linen.Dense."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.layers import default_init
from diffusion_jax.models.linear import Conv, Dense
from diffusion_jax.models.reductions import add_bias, broadcast_over_positions, sum_over_positions


def test_sum_over_positions_equals_sum():
    v = jax.random.normal(jax.random.PRNGKey(0), (3, 257, 33)) + 10.0
    np.testing.assert_allclose(
        sum_over_positions(v), np.asarray(v, np.float64).sum(axis=1), rtol=1e-6
    )


def test_bias_gradient_is_the_sum_of_the_output_gradient():
    y = jnp.zeros((2, 4, 5, 7))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    dy, dbias = jax.vjp(add_bias, y, jnp.zeros(7))[1](cotangent)
    np.testing.assert_array_equal(dy, cotangent)
    np.testing.assert_allclose(dbias, np.asarray(cotangent).sum(axis=(0, 1, 2)), rtol=1e-5)


def test_add_bias_forward_mode():
    y, bias = jnp.ones((2, 3, 4)), jnp.arange(4.0)
    y_dot, bias_dot = jax.random.normal(jax.random.PRNGKey(2), y.shape), jnp.arange(4.0) - 5.0
    out, out_dot = jax.jvp(add_bias, (y, bias), (y_dot, bias_dot))
    np.testing.assert_allclose(out, y + bias)
    np.testing.assert_allclose(out_dot, y_dot + bias_dot, rtol=1e-6)


def test_broadcast_over_positions_is_the_transpose_of_sum_over_positions():
    """<sum(v), w> = <v, broadcast(w)> for all v, w: the identity reverse mode relies on."""
    v = jax.random.normal(jax.random.PRNGKey(3), (3, 11, 5))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 5))
    np.testing.assert_allclose(
        jnp.vdot(sum_over_positions(v), w), jnp.vdot(v, broadcast_over_positions(w, 11)), rtol=1e-5
    )
    np.testing.assert_allclose(broadcast_over_positions(w, 11), np.repeat(w[:, None], 11, 1))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Conv(12, (3, 3), padding=1), nn.Conv(12, (3, 3), padding=1, kernel_init=default_init)),
        (
            Conv(12, (3, 3), strides=(2, 2), padding=1),
            nn.Conv(12, (3, 3), strides=(2, 2), padding=1, kernel_init=default_init),
        ),
        (Conv(12, (1, 1)), nn.Conv(12, (1, 1), kernel_init=default_init)),
        (Dense(12), nn.Dense(12, kernel_init=default_init)),
    ],
    ids=["conv3x3", "conv3x3_stride2", "conv1x1", "dense"],
)
def test_layer_matches_flax(ours, theirs):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 5))
    params = ours.init(jax.random.PRNGKey(0), x)
    # Same parameter names, shapes and initial values (same RNG stream).
    jax.tree.map(np.testing.assert_array_equal, params, theirs.init(jax.random.PRNGKey(0), x))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    y_ours, vjp_ours = jax.vjp(ours.apply, params, x)
    y_theirs, vjp_theirs = jax.vjp(theirs.apply, params, x)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), y_ours.shape)
    for got, want in zip(
        jax.tree.leaves(vjp_ours(cotangent)), jax.tree.leaves(vjp_theirs(cotangent))
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_compute_dtype():
    x = jnp.ones((2, 4, 4, 3))
    conv = Conv(6, (3, 3), padding=1, dtype=jnp.bfloat16)
    params = conv.init(jax.random.PRNGKey(0), x)
    assert conv.apply(params, x).dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
