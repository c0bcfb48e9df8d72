"""Tests of evaluation/lpips.py and evaluation/lpips_weights.py without torch: LPIPS
(Zhang et al. 2018, Eq. 1) is a non-negative symmetric function of the VGG16 features,
zero on equal images, differentiable (finite even where a tap's features vanish), and its
weights file round-trips and names what is wrong with a bad one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import lpips, lpips_weights
from tests.lpips_params import random_params

SIZE = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(random params, the same params saved in our format and loaded back, the file)."""
    params = random_params(0)
    path = tmp_path_factory.mktemp("lpips_weights") / "lpips_random.npz"
    lpips_weights.save_lpips(path, params, source="random test weights")
    return params, lpips_weights.load_lpips(path), path


@pytest.fixture(scope="module")
def images():
    """Three pairs [3, 32, 32, 3] in [-1, 1]: noise and a perturbation of it."""
    x0 = jax.random.uniform(jax.random.key(1), (3, SIZE, SIZE, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    return x0, jnp.clip(x0 + 0.3 * noise, -1, 1)


distance = jax.jit(lpips.lpips_distance)


def test_equal_images_are_at_distance_zero_and_others_positive_and_symmetric(saved, images):
    params = saved[1]
    x0, x1 = images
    forward, backward = distance(params, x0, x1), distance(params, x1, x0)
    assert forward.shape == (3,) and np.all(np.asarray(forward) > 0)
    # 0 up to float32 rounding of the features: about 1e-15 against distances of about 1e-2
    np.testing.assert_allclose(distance(params, x0, x0), 0, atol=1e-10 * float(forward.min()))
    np.testing.assert_allclose(forward, backward, rtol=1e-6)


def _reference(params, x0, x1):
    """Eq. 1 of Zhang et al. 2018 in float64 NumPy from the VGG16 taps alone."""
    vgg = lpips.VGG16Features()
    taps0 = vgg.apply({"params": params["vgg"]}, lpips.scale_inputs(x0))
    taps1 = vgg.apply({"params": params["vgg"]}, lpips.scale_inputs(x1))
    total = np.zeros(len(x0))
    for tap, y0, y1 in zip(lpips.TAPS, taps0, taps1):
        y0, y1 = np.asarray(y0, np.float64), np.asarray(y1, np.float64)
        y0 = y0 / (np.linalg.norm(y0, axis=-1, keepdims=True) + 1e-10)
        y1 = y1 / (np.linalg.norm(y1, axis=-1, keepdims=True) + 1e-10)
        weights = np.asarray(params["lin"][tap], np.float64)
        total += (np.square(y0 - y1) @ weights).mean(axis=(1, 2))
    return total


def test_it_is_the_weighted_feature_distance_of_the_loaded_weights(saved, images):
    params, loaded, _ = saved
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    x0, x1 = images
    np.testing.assert_allclose(distance(loaded, x0, x1), _reference(params, x0, x1), rtol=1e-5)
    # a tap's lin weights scale its term alone: doubling all of them doubles the distance
    doubled = {**loaded, "lin": jax.tree.map(lambda w: 2 * w, loaded["lin"])}
    np.testing.assert_allclose(distance(doubled, x0, x1), 2 * distance(loaded, x0, x1), rtol=1e-6)


def test_a_grey_image_is_read_as_three_equal_channels(saved, images):
    params = saved[1]
    grey0, grey1 = images[0][..., :1], images[1][..., :1]
    rgb0, rgb1 = (jnp.repeat(g, 3, axis=-1) for g in (grey0, grey1))
    np.testing.assert_allclose(
        distance(params, grey0, grey1), distance(params, rgb0, rgb1), rtol=1e-6
    )


def test_gradients_are_finite_and_zero_at_equal_images(saved, images):
    params = saved[1]
    x0, x1 = images
    grad = jax.jit(jax.grad(lambda y: lpips.lpips_distance(params, x0, y).sum()))
    g = np.asarray(grad(x1))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # equal images are a minimum: the gradient there vanishes (up to float32 rounding)
    np.testing.assert_allclose(grad(x0), 0, atol=1e-5 * np.abs(g).max())
    # a first layer that never fires: every tap is 0 everywhere, where |y|'s square root
    # has an infinite slope; the distance is 0 and its gradient finite (lpips' is NaN)
    conv = {**params["vgg"]["conv1_1"], "bias": jnp.full((64,), -1e3)}
    dead = {**params, "vgg": {**params["vgg"], "conv1_1": conv}}
    dead_grad = jax.grad(lambda y: lpips.lpips_distance(dead, x0, y).sum())(x1)
    assert float(lpips.lpips_distance(dead, x0, x1).sum()) == 0
    assert np.all(np.isfinite(np.asarray(dead_grad)))


def test_it_compiles_once_for_one_shape(saved, images):
    params = saved[1]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced(params, x0, x1):
        return lpips.lpips_distance(params, x0, x1)

    x0, x1 = images
    traced(params, x0, x1)
    traced(params, x1, x0)


def test_bad_inputs_are_named(saved):
    params = saved[1]
    small = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="16 x 16 or more"):
        lpips.lpips_distance(params, small, small)
    with pytest.raises(ValueError, match="C = 3 \\(RGB\\) or 1"):
        lpips.lpips_distance(params, jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 16, 16, 4)))


def _write(path, flat, version=lpips_weights.FORMAT_VERSION):
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    np.savez(path, **arrays, **{"meta/format_version": np.asarray(version)})
    return path


def test_a_bad_weights_file_is_named_with_each_bad_entry(saved, tmp_path):
    flat = lpips_weights.flatten(saved[0])
    with pytest.raises(FileNotFoundError, match="absent.npz.*diffusion_jax.convert.lpips"):
        lpips_weights.load_lpips(tmp_path / "absent.npz")
    broken = dict(flat)
    del broken["vgg/conv3_2/kernel"]
    broken["vgg/conv1_1/bias"] = np.zeros(32, np.float32)
    broken["lin/relu2_2"] = -np.ones(128, np.float32)
    path = _write(tmp_path / "broken.npz", broken)
    with pytest.raises(ValueError) as error:
        lpips_weights.load_lpips(path)
    message = str(error.value)
    assert str(path) in message
    assert "missing vgg/conv3_2/kernel (expected shape (3, 3, 256, 256))" in message
    assert "vgg/conv1_1/bias has shape (32,), expected (64,)" in message
    assert "lin/relu2_2 has negative weights" in message
    with pytest.raises(ValueError, match="format_version is 7, expected 1"):
        lpips_weights.load_lpips(_write(tmp_path / "future.npz", flat, version=7))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="text.npz: not a readable .npz"):
        lpips_weights.load_lpips(tmp_path / "text.npz")
