"""Winograd's F(2x2, 3x3) and F(4x4, 3x3) convolutions (models.winograd) against their
defining identity and XLA's direct convolution, the gradient for training, and the U-Net's
use of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from diffusion_jax.models import build_model, conv_algorithm, init_params, winograd
from diffusion_jax.models.linear import Conv


def _direct(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("m", [2, 4])
def test_minimal_filtering_identity_in_one_dimension(m):
    """Lavin & Gray (2016), Sec. 4.1-4.2: A^T [(G g) ⊙ (B^T d)] = (sum_k d_{i+k} g_k for i < m)
    for every (m + 2)-sample input d and 3-tap filter g."""
    bt, g_matrix, at = winograd.ALGORITHMS[m]
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        y = at @ ((g_matrix @ g) * (bt @ d))
        np.testing.assert_allclose(y, [d[i : i + 3] @ g for i in range(m)], rtol=1e-12, atol=1e-12)


def _assert_equal_up_to_g(m, actual, expected):
    """F(2x2, 3x3) on small integers is exact in float32 (G's entries are halves); F(4x4,
    3x3)'s G has sixths, whose rounding stays far below the 1 that a wrong index costs."""
    if m == 2:
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2), (1, 1, 1, 4), (3, 4, 3, 1)])
def test_equals_the_direct_convolution_on_small_integers(shape, m):
    """Any wrong index, sign or padding shows as a difference of at least 1. Odd sizes
    exercise the padding up to whole tiles and the cropping."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-2, 3, (3, 3, shape[-1], 5)), jnp.float32)
    y = winograd.conv3x3(x, winograd.transform_kernel(kernel, m))
    _assert_equal_up_to_g(m, y, _direct(x, kernel))


# Largest error against float64, relative to the output's largest magnitude. F(4x4, 3x3)'s
# transforms have entries up to 8 and 1/24 and add more terms: measured 5.6e-6 against
# F(2x2, 3x3)'s 3.6e-7 and the direct float32 convolution's 8.2e-7.
FLOAT32_ERROR = {2: 4e-6, 4: 2e-5}


@pytest.mark.parametrize("m", [2, 4])
def test_float32_error_is_that_of_rounding(m):
    """Against the direct convolution in float64 (numpy), the Winograd error is of the size
    of float32 rounding (the direct float32 convolution's own is within 4e-6)."""
    keys = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(keys[0], (2, 32, 32, 64))
    kernel = jax.random.normal(keys[1], (3, 3, 64, 32)) / 24.0
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    exact = sum(
        padded[:, i : i + 32, j : j + 32] @ np.asarray(kernel, np.float64)[i, j]
        for i in range(3)
        for j in range(3)
    )
    fast = jax.jit(lambda a, k: winograd.conv3x3(a, winograd.transform_kernel(k, m)))
    scale = np.max(np.abs(exact))
    assert np.max(np.abs(fast(x, kernel) - exact)) < FLOAT32_ERROR[m] * scale
    assert np.max(np.abs(_direct(x, kernel) - exact)) < 4e-6 * scale


@pytest.mark.parametrize("m", [2, 4])
def test_linear_in_the_input_forward_and_reverse(m):
    """The ODE likelihood differentiates the network in forward mode: jvp and vjp of the
    Winograd convolution are those of the direct one."""
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x, v = jax.random.normal(keys[0], (1, 6, 6, 4)), jax.random.normal(keys[1], (1, 6, 6, 4))
    kernel = jax.random.normal(keys[2], (3, 3, 4, 3))
    w = jax.random.normal(keys[3], (1, 6, 6, 3))
    fast = lambda a: winograd.conv3x3(a, winograd.transform_kernel(kernel, m))
    direct = lambda a: _direct(a, kernel)
    np.testing.assert_allclose(jax.jvp(fast, (x,), (v,))[1], direct(v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vjp(fast, x)[1](w)[0], jax.vjp(direct, x)[1](w)[0], atol=1e-5)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2), (3, 4, 3, 1)])
def test_training_gradient_equals_the_direct_one_on_small_integers(shape, m):
    """`conv3x3_for_training`'s custom VJP: the input gradient (Winograd with the kernel
    turned by 180 degrees, channels swapped) and the kernel gradient are those of the
    direct convolution (F(2x2, 3x3): bit for bit); odd sizes check the turned padding."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-2, 3, (3, 3, shape[-1], 5)), jnp.float32)
    cotangent = jnp.asarray(rng.integers(-2, 3, (*shape[:3], 5)), jnp.float32)
    y, vjp = jax.vjp(lambda a, k: winograd.conv3x3_for_training(a, k, m), x, kernel)
    y_direct, vjp_direct = jax.vjp(_direct, x, kernel)
    _assert_equal_up_to_g(m, y, y_direct)
    for grad, grad_direct in zip(vjp(cotangent), vjp_direct(cotangent), strict=True):
        _assert_equal_up_to_g(m, grad, grad_direct)


def test_training_gradient_float32_error_is_that_of_rounding():
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jax.random.normal(keys[0], (2, 32, 32, 32))
    kernel = jax.random.normal(keys[1], (3, 3, 32, 16)) / 17.0
    weights = jax.random.normal(keys[2], (2, 32, 32, 16))
    loss = lambda conv: lambda a, k: jnp.sum(jnp.tanh(conv(a, k)) * weights)
    grads = jax.jit(jax.grad(loss(winograd.conv3x3_for_training), argnums=(0, 1)))(x, kernel)
    expected = jax.jit(jax.grad(loss(_direct), argnums=(0, 1)))(x, kernel)
    for grad, grad_direct in zip(grads, expected, strict=True):
        assert np.max(np.abs(grad - grad_direct)) < 4e-6 * np.max(np.abs(grad_direct))


@pytest.mark.parametrize("m", [2, 4])
def test_kernel_transform_is_g_g_g_transposed(m):
    """`transform_kernel` as one matrix product equals Lavin & Gray's U = G g G^T."""
    g = winograd.ALGORITHMS[m].g
    kernel = np.random.default_rng(7).standard_normal((3, 3, 2, 3))
    u = np.asarray(winograd.transform_kernel(jnp.asarray(kernel, jnp.float32), m))
    expected = np.einsum("ai,ijco,bj->abco", g, kernel, g)
    np.testing.assert_allclose(u, expected.reshape((m + 2) ** 2, 2, 3), rtol=1e-6, atol=1e-6)


def test_an_unknown_output_tile_is_refused():
    with pytest.raises(ValueError, match=r"output_tile=3; allowed: \(2, 4\)"):
        winograd.transform_kernel(jnp.ones((3, 3, 1, 1)), 3)


def test_output_tile_only_where_it_pays():
    fits = (3, 3), (1, 1), 1  # kernel, strides, padding
    tiles = winograd.MIN_TILES  # at batch 1, a square image of m * sqrt(tiles) pixels
    side = 2 * int(np.sqrt(tiles))  # MIN_TILES tiles of F(2x2, 3x3)
    assert winograd.num_tiles(1, side, side) == tiles
    assert winograd.num_tiles(1, 2 * side, 2 * side, 4) == tiles
    assert winograd.num_tiles(3, 5, 7) == 3 * 3 * 4  # partial tiles count
    assert winograd.num_tiles(3, 5, 7, 4) == 3 * 2 * 2
    tile = lambda batch, side, training=False, dtype=jnp.float32, fit=fits: winograd.output_tile(
        *fit, dtype, batch, side, side, training=training
    )
    assert tile(1, side) == 2 and tile(4, side // 2) == 2  # F(4x4): too few tiles
    assert tile(4, side) == 4 and tile(1, 2 * side) == 4  # F(4x4) has MIN_TILES tiles
    assert tile(4, side, training=True) == 2  # training keeps F(2x2, 3x3)
    assert tile(1, side // 2) == 0 and tile(1, side // 2, training=True) == 0  # too few
    assert tile(4, side, fit=((3, 3), (2, 2), 1)) == 0  # strided
    assert tile(4, side, fit=((1, 1), (1, 1), 0)) == 0  # 1x1
    assert tile(4, side, dtype=jnp.bfloat16) == 0


@pytest.mark.parametrize("side", [16, 32])  # 256 tiles of F(2x2, 3x3) / of F(4x4, 3x3)
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_conv_module_same_parameters_same_output_and_gradient(mode, side):
    x = jax.random.normal(jax.random.PRNGKey(4), (4, side, side, 8))
    direct, fast = Conv(12, (3, 3), padding=1), Conv(12, (3, 3), padding=1, winograd=mode)
    params = direct.init(jax.random.PRNGKey(5), x)
    assert jax.tree.structure(params) == jax.tree.structure(fast.init(jax.random.PRNGKey(5), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
    y_direct = direct.apply(params, x)
    # Within the less accurate algorithm's float32 error, relative to the output's scale
    # (with jaxlib 0.12 F(4x4) differed by 2.07e-5 here: 4.0e-6 of max |y| = 5.16).
    scale = np.max(np.abs(y_direct))
    np.testing.assert_allclose(
        fast.apply(params, x), y_direct, rtol=0, atol=FLOAT32_ERROR[4] * scale
    )
    assert not np.array_equal(fast.apply(params, x), y_direct)  # it is used
    loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    grads, expected = jax.grad(loss(fast))(params), jax.grad(loss(direct))(params)
    for grad, grad_direct in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        scale = np.max(np.abs(grad_direct))  # sums over 4 * side^2 positions
        np.testing.assert_allclose(grad, grad_direct, rtol=0, atol=2e-5 * scale)


def test_conv_module_names_a_bad_mode():
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"winograd=True; allowed: \('none', 'inference'"):
        Conv(3, (3, 3), padding=1, winograd=True).init(jax.random.PRNGKey(0), x)


def _unet_32(algorithm: str):
    config = presets.tiny()
    config.image_size = 32  # 32x32 and 16x16 levels; at batch 4, in inference F(4x4, 3x3)
    config.attn_resolutions = (16,)  # at 32x32, F(2x2, 3x3) at 16x16; in training F(2x2)
    config.conv_algorithm = algorithm
    return config


def test_unet_matches_direct_in_inference_and_training():
    """Outputs of both passes, and the training loss's gradient, as with direct convolutions;
    the inference pass differentiates in forward mode (the ODE likelihood's jvp)."""
    direct_config, fast_config = _unet_32("direct"), _unet_32("winograd")
    direct_model, fast_model = build_model(direct_config), build_model(fast_config)
    params = init_params(direct_model, direct_config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.02, params)  # the zero-initialised convs too
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    t = jnp.array([10.0, 900.0, 300.0, 600.0])
    apply = lambda model, train: jax.jit(model.apply, static_argnames="train")(
        {"params": params}, x, t, train=train, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    for train in (False, True):
        direct_out, fast_out = apply(direct_model, train), apply(fast_model, train)
        np.testing.assert_allclose(fast_out, direct_out, atol=1e-4)
        assert not np.array_equal(fast_out, direct_out)  # it is used
    loss = lambda model: (
        lambda p: jnp.mean(
            model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
            ** 2
        )
    )
    grads = jax.jit(jax.grad(loss(fast_model)))(params)
    expected = jax.jit(jax.grad(loss(direct_model)))(params)
    for grad, grad_direct in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(grad, grad_direct, rtol=1e-3, atol=1e-5)
    fast = lambda a: fast_model.apply({"params": params}, a, t)
    direct = lambda a: direct_model.apply({"params": params}, a, t)
    tangent, tangent_direct = jax.jvp(fast, (x,), (x,))[1], jax.jvp(direct, (x,), (x,))[1]
    np.testing.assert_allclose(tangent, tangent_direct, atol=1e-4)


def test_conv_algorithm_auto_and_bad_values():
    config = _unet_32("auto")
    expected = "winograd" if jax.default_backend() == "cpu" else "direct"
    assert conv_algorithm(config) == expected
    config.dtype = "bfloat16"
    assert conv_algorithm(config) == "direct"
    config.conv_algorithm = "fft"
    with pytest.raises(ValueError, match=r"model\.conv_algorithm='fft'; allowed: \('auto'"):
        build_model(config)
