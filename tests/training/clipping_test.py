"""Tests of diffusion_jax.training.clipping: optax.clip_by_global_norm's updates, from a norm given
or computed; and a train step with it takes the steps one with optax's takes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.training import clipping, train_state
from diffusion_jax.training import train_step as train_step_lib


def _tree(scale):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w": scale * jax.random.normal(keys[0], (5, 4)),
        "b": scale * jax.random.normal(keys[1], (4,)),
        "deep": [scale * jax.random.normal(keys[2], (3, 3, 2))],
    }


@pytest.mark.parametrize("scale", [0.01, 10.0])  # norm below and above max_norm = 1
def test_updates_are_optax_clip_by_global_norm(scale):
    grads = _tree(scale)
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ours = clipping.clip_by_global_norm(1.0)
    for given in (None, optax.tree.norm(grads)):
        clipped, state = ours.update(grads, ours.init(grads), global_norm=given)
        assert state == optax.EmptyState()
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, theirs)
    np.testing.assert_allclose(optax.tree.norm(clipped), min(1.0, float(optax.tree.norm(grads))))


def test_given_norm_is_the_one_used():
    grads = _tree(1.0)
    clipped, _ = clipping.clip_by_global_norm(2.0).update(grads, None, global_norm=8.0)
    jax.tree.map(lambda c, g: np.testing.assert_allclose(c, g / 4.0, rtol=1e-6), clipped, grads)
    unclipped, _ = clipping.clip_by_global_norm(2.0).update(grads, None, global_norm=1.5)
    jax.tree.map(np.testing.assert_array_equal, unclipped, grads)


def test_non_positive_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm=0"):
        clipping.clip_by_global_norm(0.0)


def test_train_step_with_it_takes_optax_clipped_adam_steps():
    def loss_fn(params, batch, rng, loss_history=None):
        per_example = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, axis=-1)
        return jnp.mean(per_example), {"per_example": per_example, "t": jnp.zeros(4)}

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"x": jax.random.normal(k1, (4, 3)), "y": 10.0 * jax.random.normal(k2, (4, 2))}
    params = {"w": jnp.zeros((3, 2))}
    schedule = optax.constant_schedule(0.1)
    results = []
    for clip in (clipping.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)):
        tx = optax.chain(clip, optax.adam(schedule))
        step = jax.jit(train_step_lib.make_train_step(loss_fn, tx, schedule, ema_decays=(0.9,)))
        state = train_state.create_train_state(params, tx, num_ema=1)
        for _ in range(5):
            state, metrics = step(state, batch, jax.random.PRNGKey(0))
        assert float(metrics["grad_norm"]) > 1.0  # the clip acted
        results.append(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *results)
