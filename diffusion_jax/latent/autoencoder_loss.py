"""The KL autoencoder's training loss (Rombach et al. 2022, App. G; LDM's
`LPIPSWithDiscriminator`, after Esser et al. 2021, Eq. 5-7).

With x_hat decoded from a posterior sample z ~ q(z | x), per image (sums over pixels and
latent elements, means over the batch):

    rec   = |x - x_hat|  (or (x - x_hat)^2)  [+ perceptual_weight * LPIPS(x, x_hat)]
    nll   = sum(rec / exp(s) + s)            s: one learned log-variance, initially 0
    kl    = KL(q(z | x) || N(0, I))          (`posterior.DiagonalGaussian.kl`)
    g     = -mean D(x_hat)                   the generator's adversarial loss
    lambda = |grad_W nll| / (|grad_W g| + 1e-4), clipped to [0, 1e4], times disc_weight,
             W the decoder's last convolution (Esser et al., Eq. 7)
    L_autoencoder = nll + kl_weight * kl + lambda * f(step) * g
    L_discriminator = f(step) * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2  (hinge)

The perceptual term (LPIPS of Zhang et al. 2018, `evaluation.lpips`: one number per image,
added to every pixel's error as LDM adds it, so it also enters lambda's grad_W nll) is there
only when the factory is given an LPIPS function, i.e. when the user gave LPIPS weights;
without one the loss is the one above without it. f(step) is 1 from `disc_start` on, else
0. Both players are updated in the same step from the same batch: the loss returned is
L_autoencoder with the discriminator's parameters held constant plus L_discriminator with
the reconstruction held constant, so its gradient is each player's own gradient (LDM
alternates two optimizer steps per batch instead, the second seeing the updated
autoencoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoders import AutoencoderKL, DiagonalGaussian
from diffusion_jax.models.autoencoders.discriminator import PatchDiscriminator

RECONSTRUCTION_LOSSES = ("l1", "l2")
ADAPTIVE_WEIGHT_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class AutoencoderLoss:
    """The loss's options (module docstring); `disc_weight` 0 trains without the GAN.
    `perceptual_weight` (LDM's 1.0) weighs LPIPS when the loss is given an LPIPS function."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    learn_logvar: bool = True
    disc_weight: float = 0.5
    disc_start: int = 50001

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction={self.reconstruction!r}; allowed: {RECONSTRUCTION_LOSSES}"
            )
        weights = (self.kl_weight, self.perceptual_weight, self.disc_weight, self.disc_start)
        if min(weights) < 0:
            raise ValueError(
                "kl_weight, perceptual_weight, disc_weight and disc_start must be >= 0"
            )

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0


def _per_image_sum(values: jax.Array) -> jax.Array:
    return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def nll_loss(
    x: jax.Array,
    x_hat: jax.Array,
    logvar: jax.Array,
    reconstruction: str,
    perceptual: jax.Array | None = None,
) -> jax.Array:
    """mean over images of sum(rec / exp(logvar) + logvar) (module docstring); x, x_hat
    [B, H, W, C]. `perceptual` [B], already weighted, is added to every pixel's rec, as
    LDM's `rec_loss + perceptual_weight * p_loss` broadcasts it."""
    error = x - x_hat
    rec = jnp.abs(error) if reconstruction == "l1" else jnp.square(error)  # [B, H, W, C]
    if perceptual is not None:
        rec = rec + perceptual.reshape(-1, *([1] * (rec.ndim - 1)))
    return jnp.mean(_per_image_sum(rec / jnp.exp(logvar) + logvar))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """(mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2 (Lim & Ye 2017; Miyato et al.)."""
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
    )


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """|grad nll| / (|grad g| + 1e-4), clipped to [0, 1e4], times disc_weight, held
    constant (Esser et al. 2021, Eq. 7)."""
    ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX) * disc_weight)


def _with_last_kernel(params: dict, kernel: jax.Array) -> dict:
    decoder = dict(params["decoder"])
    decoder["conv_out"] = {**decoder["conv_out"], "kernel": kernel}
    return {**params, "decoder": decoder}


PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, x_hat) -> [B]


def make_autoencoder_loss_fn(
    autoencoder: AutoencoderKL,
    loss: AutoencoderLoss,
    discriminator: PatchDiscriminator | None = None,
    perceptual_fn: PerceptualFn | None = None,
):
    """`loss_fn(params, batch, rng, loss_history=None, *, step) -> (loss, aux)` over
    params {"autoencoder", "logvar"[, "discriminator"]}; aux["metrics"] holds each term.
    `perceptual_fn(x, x_hat) -> [B]` (LPIPS with its weights closed over, held fixed)
    turns the perceptual term on when `loss.perceptual_weight` > 0."""
    if loss.adversarial and discriminator is None:
        raise ValueError("an adversarial loss (disc_weight > 0) needs the discriminator")
    perceptual_on = perceptual_fn is not None and loss.perceptual_weight > 0

    def nll_and_lpips(x, x_hat, logvar):
        if not perceptual_on:
            return nll_loss(x, x_hat, logvar, loss.reconstruction), None
        lpips = perceptual_fn(x, x_hat)  # [B]
        nll = nll_loss(x, x_hat, logvar, loss.reconstruction, loss.perceptual_weight * lpips)
        return nll, lpips

    def loss_fn(params, batch, rng, loss_history=None, *, step):
        del loss_history
        x, ae_params = batch["x"], params["autoencoder"]
        moments = autoencoder.apply({"params": ae_params}, x, method=autoencoder.encode)
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.sample(rng)
        logvar = params["logvar"] if loss.learn_logvar else jax.lax.stop_gradient(params["logvar"])

        def reconstruct(kernel):
            decode_params = _with_last_kernel(ae_params, kernel)
            return autoencoder.apply({"params": decode_params}, z, method=autoencoder.decode)

        kernel = ae_params["decoder"]["conv_out"]["kernel"]
        x_hat = reconstruct(kernel)
        nll, lpips = nll_and_lpips(x, x_hat, logvar)
        kl = jnp.mean(posterior.kl())
        total = nll + loss.kl_weight * kl
        metrics = {"nll": nll, "kl": kl, "logvar": logvar, "l1": jnp.mean(jnp.abs(x - x_hat))}
        if lpips is not None:
            metrics["lpips"] = jnp.mean(lpips)
        if loss.adversarial:
            nll_of_kernel = lambda k: nll_and_lpips(x, reconstruct(k), logvar)[0]
            total, adversarial = _add_adversarial(
                total,
                params,
                x,
                x_hat,
                reconstruct,
                kernel,
                nll_of_kernel,
                loss,
                discriminator,
                step,
            )
            metrics.update(adversarial)
        return total, {"metrics": metrics}

    return loss_fn


def _add_adversarial(total, params, x, x_hat, reconstruct, kernel, nll_of_kernel, loss, disc, step):
    """total + lambda f g + L_discriminator, and their metrics (module docstring). Before
    `disc_start` (f = 0) a branch skips the discriminator and the adaptive weight."""
    disc_params = params["discriminator"]
    frozen = jax.lax.stop_gradient(disc_params)

    def generator_loss(x_hat):
        return -jnp.mean(disc.apply({"params": frozen}, x_hat))

    def adversarial_terms(_):
        nll_grad = jax.grad(nll_of_kernel)(kernel)
        g_grad = jax.grad(lambda k: generator_loss(reconstruct(k)))(kernel)
        weight = adaptive_weight(nll_grad, g_grad, loss.disc_weight)
        g_loss = generator_loss(x_hat)
        real = disc.apply({"params": disc_params}, jax.lax.stop_gradient(x))
        fake = disc.apply({"params": disc_params}, jax.lax.stop_gradient(x_hat))
        d_loss = hinge_discriminator_loss(real, fake)
        terms = {"g_loss": g_loss, "d_loss": d_loss, "d_weight": weight,
                 "logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake)}  # fmt: skip
        return weight * g_loss + d_loss, terms

    def without_terms(_):
        zero = jnp.zeros((), jnp.float32)
        names = ("g_loss", "d_loss", "d_weight", "logits_real", "logits_fake")
        return zero, dict.fromkeys(names, zero)

    started = step >= loss.disc_start
    extra, metrics = jax.lax.cond(started, adversarial_terms, without_terms, None)
    metrics["disc_factor"] = started.astype(jnp.float32)
    return total + extra, metrics
