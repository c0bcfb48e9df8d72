"""The EMA of the train state: its warm-up removes the weight left on the initial parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.training import train_state


def _initial_weight_after(num_steps: int, decay: float, *, warmup: bool) -> float:
    """Weight the EMA still gives the initial parameters (0) when the parameters are 1."""

    def step(ema, n):
        d = train_state.ema_decay_at(decay, n, warmup=warmup)
        return train_state.update_ema(ema, jnp.float32(1.0), d), None

    ema, _ = jax.lax.scan(step, jnp.float32(0.0), jnp.arange(num_steps))
    return 1.0 - float(ema)


def test_without_warmup_the_initial_parameters_keep_decay_to_the_n():
    np.testing.assert_allclose(
        _initial_weight_after(2000, 0.999, warmup=False), 0.999**2000, rtol=1e-3
    )


def test_warmup_forgets_the_initial_parameters():
    # prod_{k < n} (1 + k) / (10 + k) = 9! n! / (n + 9)!: 1e-4 of the init after 10 steps.
    assert _initial_weight_after(10, 0.999, warmup=True) < 1e-4
    assert _initial_weight_after(2000, 0.999, warmup=True) < 1e-6


def test_warmup_decay_values():
    steps = jnp.array([0, 10, 1000, 10**6])
    np.testing.assert_allclose(
        train_state.ema_decay_at(0.9999, steps, warmup=True),
        [0.1, 11 / 20, 1001 / 1010, 0.9999],
        rtol=1e-6,
    )
    assert float(train_state.ema_decay_at(0.9999, steps[0], warmup=False)) == np.float32(0.9999)


def test_the_ema_of_a_parameter_that_does_not_move_is_that_parameter():
    """decay * x + (1 - decay) * x rounds away from x (decay 0.1, the warm-up's first): the
    EMA of a frozen parameter would drift; ema + (1 - decay) (x - ema) does not."""
    x = jax.random.normal(jax.random.key(0), (10_000,)) * 0.02
    for decay in (0.1, 0.5, 0.999):
        ema = jax.jit(train_state.update_ema)(x, x, jnp.float32(decay))
        np.testing.assert_array_equal(ema, x)
