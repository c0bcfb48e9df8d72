"""Sampling the training timestep t: uniform, or by importance (Improved DDPM, Sec. 3.3).

Importance sampling draws t with p_t proportional to sqrt(E[L_t^2]), estimated from the last
`history_length` losses seen at each t, and weights each loss by 1 / (K p_t) so the estimate
of sum_t L_t stays unbiased. Until every t has a full history it samples uniformly, as
Nichol & Dhariwal do. The history is a pytree, carried in the train state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

METHODS = ("uniform", "importance")


class LossHistory(NamedTuple):
    losses: jnp.ndarray  # [K, H] the last H losses seen at each step, newest last
    counts: jnp.ndarray  # [K] int32, how many losses each step has seen (saturates at H)


def init_loss_history(num_timesteps: int, *, history_length: int = 10) -> LossHistory:
    return LossHistory(
        losses=jnp.zeros((num_timesteps, history_length), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
    )


def importance_probs(history: LossHistory, *, uniform_prob: float = 0.001) -> jnp.ndarray:
    """p_t proportional to sqrt(mean of L_t^2), mixed with `uniform_prob` of uniform [K]."""
    num_timesteps, history_length = history.losses.shape
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
    root_mean_square = jnp.sqrt(jnp.mean(history.losses**2, axis=-1))
    probs = root_mean_square / jnp.maximum(jnp.sum(root_mean_square), 1e-30)
    probs = (1.0 - uniform_prob) * probs + uniform_prob * uniform
    warm = jnp.all(history.counts >= history_length)
    return jnp.where(warm, probs, uniform)


def sample_timesteps(
    rng: jax.Array, batch_size: int, num_timesteps: int, history: LossHistory | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """t [B] int32 and the loss weights [B] that keep the estimate unbiased (1 if uniform)."""
    if history is None:
        t = jax.random.randint(rng, (batch_size,), 0, num_timesteps)
        return t, jnp.ones((batch_size,), jnp.float32)
    probs = importance_probs(history)
    t = jax.random.choice(rng, num_timesteps, (batch_size,), p=probs)
    return t.astype(jnp.int32), 1.0 / (num_timesteps * probs[t])


def update_loss_history(history: LossHistory, t: jnp.ndarray, losses: jnp.ndarray) -> LossHistory:
    """Append each loss to the history of its step, in batch order (repeated t all count)."""

    def append(i, state):
        step, loss = t[i], losses[i]
        row = jnp.concatenate([state.losses[step, 1:], loss[None]])
        return LossHistory(
            losses=state.losses.at[step].set(row),
            counts=state.counts.at[step].set(
                jnp.minimum(state.counts[step] + 1, state.losses.shape[1])
            ),
        )

    return jax.lax.fori_loop(0, t.shape[0], append, history)
