"""Importance sampling of t (Improved DDPM, Sec. 3.3): probabilities, unbiasedness, history."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import timestep_sampling as ts


def _warm_history(loss_of_step):
    num_steps = len(loss_of_step)
    history = ts.init_loss_history(num_steps, history_length=10)
    t = jnp.repeat(jnp.arange(num_steps), 10)
    return ts.update_loss_history(history, t, jnp.asarray(loss_of_step)[t])


def test_uniform_until_every_step_has_a_full_history():
    history = ts.init_loss_history(5, history_length=3)
    history = ts.update_loss_history(history, jnp.array([0, 1, 2, 3, 4, 4, 4]), jnp.ones(7))
    np.testing.assert_allclose(ts.importance_probs(history), 0.2)
    np.testing.assert_array_equal(history.counts, [1, 1, 1, 1, 3])


def test_history_keeps_the_newest_losses_in_order():
    history = ts.init_loss_history(2, history_length=3)
    history = ts.update_loss_history(history, jnp.array([1, 1, 1, 1]), jnp.array([1.0, 2, 3, 4]))
    np.testing.assert_allclose(history.losses[1], [2.0, 3.0, 4.0])


def test_probabilities_follow_root_mean_square_loss():
    loss_of_step = np.array([1.0, 2.0, 3.0, 10.0])
    probs = ts.importance_probs(_warm_history(loss_of_step), uniform_prob=0.0)
    np.testing.assert_allclose(probs, loss_of_step / loss_of_step.sum(), rtol=1e-6)


def test_importance_weighted_estimate_is_unbiased():
    loss_of_step = np.linspace(0.1, 5.0, 50) ** 2
    history = _warm_history(loss_of_step)
    t, weights = ts.sample_timesteps(jax.random.key(0), 200000, 50, history)
    estimate = float(jnp.mean(weights * jnp.asarray(loss_of_step)[t]))
    np.testing.assert_allclose(estimate, loss_of_step.mean(), rtol=0.01)
    # and its variance is below that of uniform sampling
    uniform_t, _ = ts.sample_timesteps(jax.random.key(1), 200000, 50)
    assert float(jnp.var(weights * jnp.asarray(loss_of_step)[t])) < float(
        jnp.var(jnp.asarray(loss_of_step)[uniform_t])
    )
