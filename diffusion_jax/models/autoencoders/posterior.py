"""The encoder's diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))).

The encoder outputs 2 x latent_channels "moments": the first half of the channels is the
mean, the second the log-variance, clipped to [-30, 20] (as LDM's and diffusers'
`DiagonalGaussianDistribution`). The KL term of the autoencoder's loss is the VAE's
KL(q(z | x) || N(0, I)) (Kingma & Welling 2014, App. B), summed over a latent's elements.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian(NamedTuple):
    mean: jax.Array  # [B, h, w, latent_channels]
    logvar: jax.Array  # same shape, clipped to LOGVAR_RANGE

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split the encoder's [B, h, w, 2 L] output into mean and clipped log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick)."""
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example [B]: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))

    def nll(self, z: jax.Array) -> jax.Array:
        """-log q(z | x) per example [B]."""
        terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(z - self.mean) / jnp.exp(self.logvar)
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))
