"""Winograd's F(2x2, 3x3) convolution (models.winograd) against its defining identity and
XLA's direct convolution, and the U-Net's use of it for inference."""

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


def test_minimal_filtering_identity_in_one_dimension():
    """Lavin & Gray (2016), Sec. 4.1: A^T [(G g) ⊙ (B^T d)] = (d0 g0 + d1 g1 + d2 g2,
    d1 g0 + d2 g1 + d3 g2) for every 4-sample input d and 3-tap filter g."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal(4), rng.standard_normal(3)
        y = winograd.F2_3_AT @ ((winograd.F2_3_G @ g) * (winograd.F2_3_BT @ d))
        np.testing.assert_allclose(y, [d[0:3] @ g, d[1:4] @ g], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2), (1, 1, 1, 4), (3, 4, 3, 1)])
def test_equals_the_direct_convolution_exactly_in_exact_arithmetic(shape):
    """Small integers keep every float32 operation of both algorithms exact (G's halves
    included), so any wrong index, sign or padding shows as a nonzero difference. Odd
    sizes exercise the padding up to whole tiles and the cropping."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-2, 3, (3, 3, shape[-1], 5)), jnp.float32)
    y = winograd.conv3x3(x, winograd.transform_kernel(kernel))
    np.testing.assert_array_equal(y, _direct(x, kernel))


def test_float32_error_is_that_of_rounding():
    """Against the direct convolution in float64 (numpy), the Winograd error is of the size
    of float32 rounding, as the direct float32 convolution's own."""
    keys = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(keys[0], (2, 32, 32, 64))
    kernel = jax.random.normal(keys[1], (3, 3, 64, 32)) / 24.0
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    exact = sum(
        padded[:, i : i + 32, j : j + 32] @ np.asarray(kernel, np.float64)[i, j]
        for i in range(3)
        for j in range(3)
    )
    fast = jax.jit(lambda a, k: winograd.conv3x3(a, winograd.transform_kernel(k)))
    scale = np.max(np.abs(exact))
    assert np.max(np.abs(fast(x, kernel) - exact)) < 4e-6 * scale
    assert np.max(np.abs(_direct(x, kernel) - exact)) < 4e-6 * scale


def test_linear_in_the_input_forward_and_reverse():
    """The ODE likelihood differentiates the network in forward mode: jvp and vjp of the
    Winograd convolution are those of the direct one."""
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x, v = jax.random.normal(keys[0], (1, 6, 6, 4)), jax.random.normal(keys[1], (1, 6, 6, 4))
    kernel = jax.random.normal(keys[2], (3, 3, 4, 3))
    w = jax.random.normal(keys[3], (1, 6, 6, 3))
    fast = lambda a: winograd.conv3x3(a, winograd.transform_kernel(kernel))
    direct = lambda a: _direct(a, kernel)
    np.testing.assert_allclose(jax.jvp(fast, (x,), (v,))[1], direct(v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vjp(fast, x)[1](w)[0], jax.vjp(direct, x)[1](w)[0], atol=1e-5)


def test_applies_only_where_it_pays():
    size = winograd.MIN_SIZE
    assert winograd.applies((3, 3), (1, 1), 1, jnp.float32, size, size)
    assert not winograd.applies((3, 3), (2, 2), 1, jnp.float32, size, size)  # strided
    assert not winograd.applies((1, 1), (1, 1), 0, jnp.float32, size, size)  # 1x1
    assert not winograd.applies((3, 3), (1, 1), 1, jnp.bfloat16, size, size)  # bfloat16
    assert not winograd.applies((3, 3), (1, 1), 1, jnp.float32, size // 2, size)  # small


def test_conv_module_same_parameters_same_output():
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 8))
    direct, fast = Conv(12, (3, 3), padding=1), Conv(12, (3, 3), padding=1, winograd=True)
    params = direct.init(jax.random.PRNGKey(5), x)
    assert jax.tree.structure(params) == jax.tree.structure(fast.init(jax.random.PRNGKey(5), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
    np.testing.assert_allclose(fast.apply(params, x), direct.apply(params, x), atol=2e-5)


def _unet_16(algorithm: str):
    config = presets.tiny()
    config.image_size = 16  # 16x16 and 8x8 levels: Winograd at 16
    config.attn_resolutions = (8,)
    config.conv_algorithm = algorithm
    return config


def test_unet_inference_matches_direct_and_training_is_unchanged():
    direct_config, fast_config = _unet_16("direct"), _unet_16("winograd")
    direct_model, fast_model = build_model(direct_config), build_model(fast_config)
    params = init_params(direct_model, direct_config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.02, params)  # the zero-initialised convs too
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([10.0, 900.0])
    apply = lambda model, train: jax.jit(model.apply, static_argnames="train")(
        {"params": params}, x, t, train=train, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    direct_out = apply(direct_model, False)
    np.testing.assert_allclose(apply(fast_model, False), direct_out, atol=1e-4)
    assert not np.allclose(apply(fast_model, False), direct_out, atol=0, rtol=0)  # it is used
    np.testing.assert_array_equal(apply(fast_model, True), apply(direct_model, True))


def test_conv_algorithm_auto_and_bad_values():
    config = _unet_16("auto")
    expected = "winograd" if jax.default_backend() == "cpu" else "direct"
    assert conv_algorithm(config) == expected
    config.dtype = "bfloat16"
    assert conv_algorithm(config) == "direct"
    config.conv_algorithm = "fft"
    with pytest.raises(ValueError, match=r"model\.conv_algorithm='fft'; allowed: \('auto'"):
        build_model(config)
