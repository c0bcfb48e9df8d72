"""The optimizer of the `optim` config section: Adam or AdamW after clipping by global norm,
on a learning-rate schedule with linear warm-up.

    tx, lr_schedule = make_optimizer(config.optim, num_steps=config.training.num_steps)
"""

from __future__ import annotations

import optax

from diffusion_jax.training import clipping

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine", "linear")


def make_lr_schedule(optim, *, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay."""
    peak = optim.learning_rate
    decay_steps = max(num_steps - optim.warmup_steps, 1)
    final = peak * optim.final_lr_fraction
    decays = {
        "constant": lambda: optax.constant_schedule(peak),
        "cosine": lambda: optax.cosine_decay_schedule(
            peak, decay_steps, alpha=optim.final_lr_fraction
        ),
        "linear": lambda: optax.linear_schedule(peak, final, decay_steps),
    }
    if optim.decay not in decays:
        raise ValueError(f"optim.decay={optim.decay!r}; allowed: {list(decays)}")
    if optim.warmup_steps == 0:
        return decays[optim.decay]()
    warmup = optax.linear_schedule(0.0, peak, optim.warmup_steps)
    return optax.join_schedules([warmup, decays[optim.decay]()], [optim.warmup_steps])


def make_optimizer(optim, *, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam or AdamW on the learning-rate schedule, after clipping by global norm.

    `optim` is the `optim` config section (any object with its fields)."""
    schedule = make_lr_schedule(optim, num_steps=num_steps)
    if optim.optimizer == "adam":
        update = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.optimizer == "adamw":
        update = optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
    else:
        raise ValueError(f"optim.optimizer={optim.optimizer!r}; allowed: {list(OPTIMIZERS)}")
    if optim.grad_clip_norm > 0:
        return optax.chain(clipping.clip_by_global_norm(optim.grad_clip_norm), update), schedule
    return update, schedule
