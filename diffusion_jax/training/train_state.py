"""The train state: one pytree with everything a run needs to continue exactly.

Step, parameters, one EMA of the parameters per decay rate (DDPM evaluates an EMA with decay
0.9999, Ho et al. 2020, Appendix B), the optimizer state, and for importance-sampled
timesteps the loss history (Nichol & Dhariwal 2021, Sec. 3.3). The random key is not part
of it: step s uses `fold_in(base_key, s)`, so the state fixes the randomness of what follows.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.diffusion import timestep_sampling


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: updates taken (skipped non-finite updates included)
    params: Any
    ema_params: tuple[Any, ...]  # one pytree per decay in `ema_decays`, same order
    opt_state: optax.OptState
    loss_history: timestep_sampling.LossHistory | None
    num_skipped: jnp.ndarray  # int32 scalar: updates skipped for a non-finite loss or gradient
    # float32 scalar of a latent diffusion run: latent = (z - shift) * latent_scale, z the
    # autoencoder's latent (Rombach et al. 2022, Sec. 4.3.2: scale-by-std); None in pixels
    latent_scale: jnp.ndarray | None = None


def create_train_state(
    params,
    tx: optax.GradientTransformation,
    *,
    num_ema: int,
    loss_history: timestep_sampling.LossHistory | None = None,
    latent_scale: jnp.ndarray | None = None,
) -> TrainState:
    """Step 0: every EMA starts at the initial parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
        opt_state=tx.init(params),
        loss_history=loss_history,
        num_skipped=jnp.zeros((), jnp.int32),
        latent_scale=latent_scale,
    )


def ema_decay_at(decay: float, step: jnp.ndarray, *, warmup: bool) -> jnp.ndarray:
    """The decay used at `step`: min(decay, (1 + step) / (10 + step)) with warm-up.

    Without warm-up, an EMA started at the initial parameters keeps decay^n of them after n
    steps (13% after 2,000 steps at 0.999): with a zero-initialised output layer its
    eps-prediction is too small, which deterministic samplers amplify by 1 / alpha_T. The
    warm-up is TensorFlow's ExponentialMovingAverage with `num_updates`.
    """
    if not warmup:
        return jnp.float32(decay)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params (Polyak averaging), computed as
    ema + (1 - decay) (params - ema), so that the EMA of a parameter that never moves (a
    frozen text encoder) stays bitwise equal to it."""
    return jax.tree.map(lambda ema, new: ema + (1.0 - decay) * (new - ema), ema_params, params)


def ema_or_params(state: TrainState, ema_index: int):
    """The EMA with index `ema_index`, or the raw parameters for -1."""
    if ema_index == -1:
        return state.params
    return state.ema_params[ema_index]
