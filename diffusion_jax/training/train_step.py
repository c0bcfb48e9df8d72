"""The pure train step `(state, batch, rng) -> (state, metrics)`.

Step s draws its randomness from `fold_in(rng, s)`, so with the data iterator's position
saved in the same checkpoint, a run restarted from any checkpoint continues exactly as the
uninterrupted run. An update whose loss or gradient is not finite is never applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.diffusion import losses, timestep_sampling
from diffusion_jax.training import train_state as train_state_lib
from diffusion_jax.training.train_state import TrainState

SKIP_FORMS = ("cond", "select")  # how `make_train_step` skips a non-finite update


def make_train_step(
    loss_fn: losses.LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    ema_decays: tuple[float, ...],
    ema_warmup: bool = True,
    axis_name: str | None = None,
    skip_with: str = "cond",
    loss_takes_step: bool = False,
) -> Callable:
    """The pure `train_step(state, batch, rng) -> (state, metrics)`.

    One Adam step on the loss, the EMAs and the loss history updated; nothing but the step
    counter and `num_skipped` changes when the loss or gradient norm is not finite. `tx` gets
    that gradient norm as the extra argument `global_norm` (`clipping` clips by it). Under
    `jax.pmap` pass `axis_name`: gradients are averaged over it and each device draws its own
    noise; under `jax.jit` on a mesh the batch is one global array and XLA does the rest.
    `skip_with` is how a non-finite update is skipped (`SKIP_FORMS`): "cond" (a branch) or
    "select" (`where(finite, new, old)`); the same results, different programs
    (`--skip_with` of the benchmark times both). With `loss_takes_step` the loss is called
    with the keyword `step` (the updates taken so far: a loss term may start at a step).
    Scalars the loss returns in aux["metrics"] join the step's metrics.
    """
    if skip_with not in SKIP_FORMS:
        raise ValueError(f"skip_with={skip_with!r}; allowed: {SKIP_FORMS}")

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        step_kwargs = {"step": state.step} if loss_takes_step else {}
        (loss, aux), grads = grad_fn(state.params, batch, rng, state.loss_history, **step_kwargs)
        loss_metrics = aux.pop("metrics", {}) if isinstance(aux, dict) else {}
        if axis_name is not None:
            loss, grads, loss_metrics = jax.lax.pmean((loss, grads, loss_metrics), axis_name)
            aux = jax.lax.all_gather(aux, axis_name, tiled=True)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(state: TrainState) -> TrainState:
            # The norm computed once, for clipping too (`clipping`).
            updates, opt_state = optax.with_extra_args_support(tx).update(
                grads, state.opt_state, state.params, global_norm=grad_norm
            )
            params = optax.apply_updates(state.params, updates)
            ema_params = tuple(
                train_state_lib.update_ema(
                    ema, params, train_state_lib.ema_decay_at(decay, state.step, warmup=ema_warmup)
                )
                for ema, decay in zip(state.ema_params, ema_decays, strict=True)
            )
            history = state.loss_history
            if history is not None:
                history = timestep_sampling.update_loss_history(
                    history, aux["t"], aux["per_example"]
                )
            return state.replace(
                params=params, ema_params=ema_params, opt_state=opt_state, loss_history=history
            )

        # A branch by default: a select of old and new made XLA:CPU copy the parameters and
        # both Adam moments at the start of every step (docs/benchmarks.md).
        if skip_with == "cond":
            kept = jax.lax.cond(finite, apply_update, lambda state: state, state)
        else:
            kept = jax.tree.map(functools.partial(jnp.where, finite), apply_update(state), state)
        new_state = kept.replace(
            step=state.step + 1, num_skipped=state.num_skipped + (~finite).astype(jnp.int32)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # optax counts applied updates only: a skipped step does not advance the schedule
            "learning_rate": lr_schedule(state.step - state.num_skipped),
            "finite": finite,
            **loss_metrics,
        }
        return new_state, metrics

    return train_step
