"""Tests of latent/autoencoder_loss.py: each term's closed form, the adaptive weight, that
one gradient of the returned loss is each player's own gradient, and the LPIPS term: absent
without LPIPS weights, LDM's per-pixel addition to the nll with them."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import lpips
from diffusion_jax.latent import autoencoder_loss
from diffusion_jax.latent.autoencoder_loss import AutoencoderLoss
from diffusion_jax.models.autoencoders import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from diffusion_jax.models.autoencoders import init_params as init_autoencoder
from diffusion_jax.models.autoencoders.discriminator import PatchDiscriminator
from tests.lpips_params import random_params

CONFIG = AutoencoderConfig(
    in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    latent_channels=2, norm_num_groups=4,
)  # fmt: skip


def test_nll_with_zero_log_variance_is_the_summed_reconstruction_error():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    x_hat = x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)
    l1 = autoencoder_loss.nll_loss(x, x_hat, jnp.float32(0.0), "l1")
    np.testing.assert_allclose(l1, np.abs(x - x_hat).sum(axis=(1, 2, 3)).mean(), rtol=1e-6)
    # with log-variance s: sum(|e| / e^s + s), so the optimal s is log(mean |e|)
    s = 0.7
    expected = (np.abs(x - x_hat) / np.exp(s) + s).sum(axis=(1, 2, 3)).mean()
    np.testing.assert_allclose(autoencoder_loss.nll_loss(x, x_hat, jnp.float32(s), "l1"),
                               expected, rtol=1e-6)  # fmt: skip
    l2 = autoencoder_loss.nll_loss(x, x_hat, jnp.float32(0.0), "l2")
    np.testing.assert_allclose(l2, np.square(x - x_hat).sum(axis=(1, 2, 3)).mean(), rtol=1e-6)


def test_hinge_loss_is_zero_beyond_the_margins_and_linear_inside():
    assert autoencoder_loss.hinge_discriminator_loss(jnp.full(4, 2.0), jnp.full(4, -3.0)) == 0
    # real logit 0.5 costs 0.5, fake logit 0 costs 1: (0.5 + 1) / 2
    value = autoencoder_loss.hinge_discriminator_loss(jnp.full(4, 0.5), jnp.zeros(4))
    np.testing.assert_allclose(value, 0.75)


def test_adaptive_weight_is_the_gradient_norm_ratio_clipped():
    nll_grad, g_grad = jnp.full((3,), 4.0), jnp.full((3,), 2.0)
    weight = autoencoder_loss.adaptive_weight(nll_grad, g_grad, 0.5)
    np.testing.assert_allclose(weight, 0.5 * np.sqrt(48) / (np.sqrt(12) + 1e-4), rtol=1e-6)
    huge = autoencoder_loss.adaptive_weight(nll_grad, jnp.zeros(3), 1.0)
    assert float(huge) == autoencoder_loss.ADAPTIVE_WEIGHT_MAX


@pytest.fixture(scope="module")
def setup():
    autoencoder, discriminator = AutoencoderKL(CONFIG), PatchDiscriminator(8, 2)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
    params = {
        "autoencoder": init_autoencoder(CONFIG, jax.random.key(1)),
        "logvar": jnp.float32(0.3),
        "discriminator": discriminator.init(jax.random.key(2), x)["params"],
    }
    return autoencoder, discriminator, params, {"x": x}


def test_one_gradient_holds_each_players_own_gradient(setup):
    """d/d(discriminator) of the returned loss is d/d(discriminator) of its hinge loss alone;
    d/d(autoencoder) is that of nll + kl_weight kl + lambda g with lambda held constant."""
    autoencoder, discriminator, params, batch = setup
    loss = AutoencoderLoss(kl_weight=0.01, disc_start=0)
    loss_fn = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss, discriminator)
    rng, step = jax.random.key(3), jnp.int32(5)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, rng, step=step)[0]))(params)
    _, aux = jax.jit(lambda p: loss_fn(p, batch, rng, step=step))(params)
    weight = aux["metrics"]["d_weight"]

    def reconstruction(ae_params):
        moments = autoencoder.apply({"params": ae_params}, batch["x"], method=autoencoder.encode)
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.sample(rng)
        return autoencoder.apply({"params": ae_params}, z, method=autoencoder.decode), posterior

    def autoencoder_objective(ae_params, logvar):
        x_hat, posterior = reconstruction(ae_params)
        g = -jnp.mean(discriminator.apply({"params": params["discriminator"]}, x_hat))
        nll = autoencoder_loss.nll_loss(batch["x"], x_hat, logvar, "l1")
        return nll + 0.01 * jnp.mean(posterior.kl()) + weight * g

    def discriminator_objective(disc_params):
        x_hat = reconstruction(params["autoencoder"])[0]
        real = discriminator.apply({"params": disc_params}, batch["x"])
        fake = discriminator.apply({"params": disc_params}, x_hat)
        return autoencoder_loss.hinge_discriminator_loss(real, fake)

    ae_grad, logvar_grad = jax.jit(jax.grad(autoencoder_objective, argnums=(0, 1)))(
        params["autoencoder"], params["logvar"]
    )
    disc_grad = jax.jit(jax.grad(discriminator_objective))(params["discriminator"])
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    jax.tree.map(close, grads["autoencoder"], ae_grad)
    jax.tree.map(close, grads["discriminator"], disc_grad)
    close(grads["logvar"], logvar_grad)
    assert float(weight) > 0


def test_before_disc_start_the_discriminator_is_still_and_the_gan_term_off(setup):
    autoencoder, discriminator, params, batch = setup
    loss = AutoencoderLoss(disc_start=10)
    loss_fn = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss, discriminator)
    rng = jax.random.key(4)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, rng, step=jnp.int32(9))[0]))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["discriminator"]))
    without_gan = autoencoder_loss.make_autoencoder_loss_fn(
        autoencoder, AutoencoderLoss(disc_weight=0.0)
    )
    reduced = {k: v for k, v in params.items() if k != "discriminator"}
    with_gan_loss = jax.jit(lambda p: loss_fn(p, batch, rng, step=jnp.int32(9))[0])(params)
    plain_loss = jax.jit(lambda p: without_gan(p, batch, rng, step=jnp.int32(9))[0])(reduced)
    np.testing.assert_allclose(with_gan_loss, plain_loss, rtol=1e-6)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"reconstruction='l3'; allowed: \('l1', 'l2'\)"):
        AutoencoderLoss(reconstruction="l3")
    with pytest.raises(ValueError, match="perceptual_weight.* must be >= 0"):
        AutoencoderLoss(perceptual_weight=-1.0)


@pytest.fixture(scope="module")
def lpips_setup():
    """16 x 16 images (LPIPS's smallest) and LPIPS with random weights closed over."""
    autoencoder, discriminator = AutoencoderKL(CONFIG), PatchDiscriminator(8, 2)
    x = jax.random.uniform(jax.random.key(5), (3, 16, 16, 1), minval=-1, maxval=1)
    params = {
        "autoencoder": init_autoencoder(CONFIG, jax.random.key(6)),
        "logvar": jnp.float32(0.3),
        "discriminator": discriminator.init(jax.random.key(7), x)["params"],
    }
    perceptual_fn = functools.partial(lpips.lpips_distance, random_params(1))
    return autoencoder, discriminator, params, {"x": x}, perceptual_fn


def _reconstruction(autoencoder, ae_params, x, rng):
    moments = autoencoder.apply({"params": ae_params}, x, method=autoencoder.encode)
    posterior = DiagonalGaussian.from_moments(moments)
    z = posterior.sample(rng)
    return autoencoder.apply({"params": ae_params}, z, method=autoencoder.decode), posterior


def test_without_lpips_weights_the_loss_has_no_perceptual_term(lpips_setup):
    autoencoder, _, params, batch, perceptual_fn = lpips_setup
    params = {k: v for k, v in params.items() if k != "discriminator"}
    rng, step = jax.random.key(8), jnp.int32(0)
    loss = AutoencoderLoss(kl_weight=0.01, disc_weight=0.0)  # perceptual_weight 1.0
    plain = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss)
    value, aux = jax.jit(lambda p: plain(p, batch, rng, step=step))(params)
    assert "lpips" not in aux["metrics"]
    # a weight of 0 with LPIPS given is the same loss, to float32 rounding (XLA may fuse the
    # two programs differently: the newest jax differs in the last bit)
    zero = dataclasses.replace(loss, perceptual_weight=0.0)
    off = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, zero, None, perceptual_fn)
    np.testing.assert_allclose(
        jax.jit(lambda p: off(p, batch, rng, step=step)[0])(params), value, rtol=1e-6
    )
    x_hat, posterior = _reconstruction(autoencoder, params["autoencoder"], batch["x"], rng)
    error = np.abs(np.asarray(batch["x"] - x_hat, np.float64))
    s = float(params["logvar"])
    expected = (error / np.exp(s) + s).sum(axis=(1, 2, 3)).mean() + 0.01 * np.mean(posterior.kl())
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_with_lpips_weights_each_pixel_error_gains_the_weighted_lpips(lpips_setup):
    """LDM: nll = sum_pixels((|x - x_hat| + w LPIPS(x, x_hat)) / e^s + s), so the term adds
    H W C w LPIPS / e^s per image to the nll."""
    autoencoder, _, params, batch, perceptual_fn = lpips_setup
    params = {k: v for k, v in params.items() if k != "discriminator"}
    rng, step = jax.random.key(9), jnp.int32(0)
    loss = AutoencoderLoss(disc_weight=0.0, perceptual_weight=0.7)
    plain = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss)
    with_lpips = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss, None, perceptual_fn)
    base, base_aux = jax.jit(lambda p: plain(p, batch, rng, step=step))(params)
    value, aux = jax.jit(lambda p: with_lpips(p, batch, rng, step=step))(params)
    x_hat, _ = _reconstruction(autoencoder, params["autoencoder"], batch["x"], rng)
    distances = np.asarray(perceptual_fn(batch["x"], x_hat), np.float64)  # [B]
    assert np.all(distances > 0)
    pixels = np.prod(batch["x"].shape[1:])
    added = pixels * 0.7 * distances.mean() / np.exp(float(params["logvar"]))
    np.testing.assert_allclose(aux["metrics"]["nll"], base_aux["metrics"]["nll"] + added, rtol=1e-5)
    np.testing.assert_allclose(value - base, added, rtol=1e-4)
    np.testing.assert_allclose(aux["metrics"]["lpips"], distances.mean(), rtol=1e-5)


def test_the_adaptive_weight_sees_the_perceptual_term(lpips_setup):
    """lambda = |grad_W nll| / (|grad_W g| + 1e-4) x disc_weight with LPIPS inside the nll,
    as LDM's `calculate_adaptive_weight(nll_loss, g_loss)`."""
    autoencoder, discriminator, params, batch, perceptual_fn = lpips_setup
    rng, step = jax.random.key(10), jnp.int32(0)
    loss = AutoencoderLoss(disc_start=0)
    with_lpips = autoencoder_loss.make_autoencoder_loss_fn(
        autoencoder, loss, discriminator, perceptual_fn
    )
    plain = autoencoder_loss.make_autoencoder_loss_fn(autoencoder, loss, discriminator)
    aux = jax.jit(lambda p: with_lpips(p, batch, rng, step=step)[1])(params)
    plain_aux = jax.jit(lambda p: plain(p, batch, rng, step=step)[1])(params)
    ae_params, logvar = params["autoencoder"], params["logvar"]
    kernel = ae_params["decoder"]["conv_out"]["kernel"]
    moments = autoencoder.apply({"params": ae_params}, batch["x"], method=autoencoder.encode)
    z = DiagonalGaussian.from_moments(moments).sample(rng)

    def decoded(k):
        decoder = {
            **ae_params["decoder"],
            "conv_out": {**ae_params["decoder"]["conv_out"], "kernel": k},
        }
        return autoencoder.apply({"params": {**ae_params, "decoder": decoder}}, z,
                                 method=autoencoder.decode)  # fmt: skip

    def nll(k):
        x_hat = decoded(k)
        perceptual = perceptual_fn(batch["x"], x_hat)
        return autoencoder_loss.nll_loss(batch["x"], x_hat, logvar, "l1", perceptual)

    def g(k):
        return -jnp.mean(discriminator.apply({"params": params["discriminator"]}, decoded(k)))

    expected = autoencoder_loss.adaptive_weight(jax.grad(nll)(kernel), jax.grad(g)(kernel), 0.5)
    np.testing.assert_allclose(aux["metrics"]["d_weight"], expected, rtol=1e-4)
    assert not np.isclose(
        float(aux["metrics"]["d_weight"]), float(plain_aux["metrics"]["d_weight"])
    )
