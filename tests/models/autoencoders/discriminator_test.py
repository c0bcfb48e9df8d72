"""Tests of models/autoencoders/discriminator.py: PatchGAN's patch grid and the batch
statistics its normalisation uses."""

import jax
import numpy as np

from diffusion_jax.models.autoencoders.discriminator import (
    BatchStatisticsNorm,
    PatchDiscriminator,
)


def test_three_layers_give_a_logit_per_overlapping_patch():
    # 32 -> 16 -> 8 -> 4 (stride 2) -> 3 -> 2 (stride-1 4x4 convolutions, padding 1)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model = PatchDiscriminator(channels=8, num_layers=3)
    params = model.init(jax.random.key(1), x)["params"]
    assert model.apply({"params": params}, x).shape == (2, 2, 2, 1)
    assert params["conv_3"]["kernel"].shape == (4, 4, 32, 64)  # width 8 * min(2^3, 8)


def test_normalisation_uses_the_batch_statistics():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    norm = BatchStatisticsNorm()
    params = norm.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: np.ones_like(p) if p.ndim else p, params)
    params["params"]["bias"] = np.zeros(4, np.float32)
    y = np.asarray(norm.apply(params, x))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
