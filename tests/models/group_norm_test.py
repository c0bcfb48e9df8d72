"""GroupNorm with its hand-written backward pass: the definition (Wu & He 2018, Eq. 1-4), its
invariances, and equality with flax.linen.GroupNorm and with JAX's derived gradient."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.group_norm import GroupNorm, group_norm

SHAPE, GROUPS = (3, 6, 5, 16), 4


def _inputs(seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    # A large mean and unequal scales per channel, as activations have.
    x = 3.0 + jax.random.normal(keys[0], SHAPE) * jnp.linspace(0.5, 2.0, SHAPE[-1])
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], SHAPE[-1:])
    bias = 0.3 * jax.random.normal(keys[2], SHAPE[-1:])
    cotangent = jax.random.normal(keys[3], SHAPE)
    return x, scale, bias, cotangent


def _definition(x, scale, bias, groups, eps=1e-6):
    """Eq. 1-4 in float64 numpy, two-pass variance."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    x_hat = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return x_hat * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def _autodiff_reference(x, scale, bias, groups, eps=1e-6):
    """The same definition in jnp, differentiated by JAX."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


def test_forward_matches_definition():
    x, scale, bias, _ = _inputs()
    y = group_norm(x, scale, bias, groups=GROUPS)
    np.testing.assert_allclose(y, _definition(x, scale, bias, GROUPS), rtol=1e-5, atol=2e-5)


def test_gradients_match_autodiff_of_definition():
    x, scale, bias, cotangent = _inputs(1)
    ours = jax.vjp(lambda *a: group_norm(*a, groups=GROUPS), x, scale, bias)[1](cotangent)
    reference = jax.vjp(lambda *a: _autodiff_reference(*a, GROUPS), x, scale, bias)[1](cotangent)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_forward_mode_matches_autodiff_of_definition():
    """`jax.jvp` works (a custom VJP would refuse it) and gives the derived tangent."""
    x, scale, bias, x_dot = _inputs(3)
    scale_dot, bias_dot = jnp.linspace(-1.0, 1.0, SHAPE[-1]), jnp.cos(jnp.arange(SHAPE[-1]))
    primals, tangents = (x, scale, bias), (x_dot, scale_dot, bias_dot)
    y, y_dot = jax.jvp(lambda *a: group_norm(*a, groups=GROUPS), primals, tangents)
    want_y, want_dot = jax.jvp(lambda *a: _autodiff_reference(*a, GROUPS), primals, tangents)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y_dot, want_dot, rtol=1e-4, atol=1e-4)


def test_input_gradient_is_orthogonal_to_shift_and_scale_of_each_group():
    """y does not change when a group of x is shifted or scaled, so the gradient dx sums to
    zero over each group and is orthogonal to x - mean there (exactly, up to rounding)."""
    x, scale, bias, cotangent = _inputs(2)
    dx = jax.vjp(lambda x_: group_norm(x_, scale, bias, groups=GROUPS), x)[1](cotangent)[0]
    dxg = np.asarray(dx, np.float64).reshape(SHAPE[0], -1, GROUPS, SHAPE[-1] // GROUPS)
    xg = np.asarray(x, np.float64).reshape(dxg.shape)
    centred = xg - xg.mean(axis=(1, 3), keepdims=True)
    scale_of_dx = np.abs(dxg).sum(axis=(1, 3))
    assert np.all(np.abs(dxg.sum(axis=(1, 3))) < 1e-5 * scale_of_dx)
    assert np.all(
        np.abs((dxg * centred).sum(axis=(1, 3))) < 1e-5 * scale_of_dx * np.abs(centred).max()
    )


def test_module_matches_flax_group_norm():
    x, _, _, cotangent = _inputs(3)
    ours, flax_norm = GroupNorm(GROUPS), nn.GroupNorm(GROUPS)
    params = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_norm.init(jax.random.PRNGKey(0), x)
    )
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape), params)
    y_ours, vjp_ours = jax.vjp(ours.apply, params, x)
    y_flax, vjp_flax = jax.vjp(flax_norm.apply, params, x)
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        jax.tree.leaves(vjp_ours(cotangent)), jax.tree.leaves(vjp_flax(cotangent))
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_output_and_float32_statistics():
    x, scale, bias, _ = _inputs(4)
    y = group_norm(x.astype(jnp.bfloat16), scale, bias, groups=GROUPS, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), _definition(x, scale, bias, GROUPS), atol=0.05, rtol=0.02
    )
    dx = jax.grad(lambda x_: group_norm(x_, scale, bias, groups=GROUPS).sum())(
        x.astype(jnp.bfloat16)
    )
    assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize("groups", [0, 3, 32])
def test_groups_that_do_not_divide_channels_are_refused(groups):
    x, scale, bias, _ = _inputs()
    with pytest.raises(ValueError, match=f"groups={groups} must divide the channel count 16"):
        group_norm(x, scale, bias, groups=groups)
