"""PNDM and PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models").

Every step is the transfer part of Eq. 11 (the DDIM step, Song et al. 2021, Eq. 12),
phi(x, e, a_t -> a_prev) = sqrt(a_prev / a_t) x - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) +
sqrt(a_t (1 - a_t) a_prev)) with a = alpha_bar, and the gradient part e combines the network's
eps like a classical method (Eqs. 12-13):
- PRK (pseudo Runge-Kutta) warm-up, 3 steps of 4 evaluations: e = (e1 + 2 e2 + 2 e3 + e4) / 6
  with e2, e3 at the half step and e4 at the full step;
- PLMS (pseudo linear multistep): e = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 (Adams-Bashforth
  4), lower orders while the history fills;
- `skip_prk_steps` (Stable Diffusion's setting) replaces the warm-up by one pseudo-improved-Euler
  step (e_0 + e_1) / 2 from a repeated evaluation, as diffusers' PNDMScheduler.
The schedule of evaluations (timesteps, the step each moves to, which rule) depends only on the
grid, so it is built on the host exactly as diffusers does, and the loop switches on the rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.process import DiffusionProcess
from diffusion_jax.samplers import common, sigma_grid

# Rules: the four PRK stages, PLMS's first step and its pseudo-improved-Euler redo, AB2-AB4.
PRK_1, PRK_2, PRK_3, PRK_4, PLMS_START, PLMS_HEUN, AB_2, AB_3, AB_4 = range(9)


def _base_timesteps(num_timesteps, num_steps, spacing, steps_offset):
    """diffusers' PNDMScheduler._timesteps, increasing."""
    if spacing == "linspace":
        return np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int64)
    if spacing == "leading":
        return np.arange(num_steps) * (num_timesteps // num_steps) + steps_offset
    stride = num_timesteps / num_steps
    return np.round(np.arange(num_timesteps, 0, -stride))[::-1].astype(np.int64) - 1


def pndm_schedule(num_timesteps, num_steps, *, spacing, steps_offset, skip_prk_steps):
    """[(model timestep, timestep moved from, timestep moved to, rule)] of every evaluation."""
    timesteps = _base_timesteps(num_timesteps, num_steps, spacing, steps_offset)
    ratio = num_timesteps // num_steps
    if skip_prk_steps:
        prk = np.zeros((0,), np.int64)
        plms = np.concatenate([timesteps[:-1], timesteps[-2:-1], timesteps[-1:]])[::-1]
    else:
        half = np.tile(np.asarray([0, ratio // 2]), 4)
        prk = (timesteps[-4:].repeat(2) + half)[:-1].repeat(2)[1:-1][::-1]
        plms = timesteps[:-3][::-1]
    evaluations = []
    for counter, t in enumerate(prk):
        moved_to = t - (0 if counter % 2 else ratio // 2)
        evaluations.append((t, prk[counter // 4 * 4], moved_to, PRK_1 + counter % 4))
    history = len(prk) // 4
    for j, t in enumerate(plms):
        counter = len(prk) + j
        if counter == 1:
            evaluations.append((t, t + ratio, t, PLMS_HEUN))
            continue
        history += 1
        rule = PLMS_START if history == 1 else AB_2 + min(history, 4) - 2
        evaluations.append((t, t, t - ratio, rule))
    return evaluations


def _transfer(x, e, alpha_bar, alpha_bar_prev):
    """phi of Eq. 11 (the DDIM step from alpha_bar to alpha_bar_prev)."""
    denominator = alpha_bar * jnp.sqrt(1.0 - alpha_bar_prev) + jnp.sqrt(
        alpha_bar * (1.0 - alpha_bar) * alpha_bar_prev
    )
    return jnp.sqrt(alpha_bar_prev / alpha_bar) * x - (alpha_bar_prev - alpha_bar) * e / denominator


def _rules():
    """Per rule: (x, base, acc, history, e) -> (new x, base, acc, history)."""

    def prk(weight, final):
        def rule(x, base, acc, history, e, a, a_prev):
            if weight == 1 / 6 and not final:  # the first stage starts a step
                base, acc, history = x, e / 6.0, (e,) + history[:-1]
                return _transfer(base, e, a, a_prev), base, acc, history
            if final:
                return _transfer(base, acc + e / 6.0, a, a_prev), base, jnp.zeros_like(acc), history
            return _transfer(base, e, a, a_prev), base, acc + weight * e, history

        return rule

    def plms_start(x, base, acc, history, e, a, a_prev):
        return _transfer(x, e, a, a_prev), x, acc, (e,) + history[:-1]

    def plms_heun(x, base, acc, history, e, a, a_prev):
        return _transfer(base, 0.5 * (e + history[0]), a, a_prev), base, acc, history

    def adams_bashforth(weights):
        def rule(x, base, acc, history, e, a, a_prev):
            history = (e,) + history[:-1]
            combined = sum(w * h for w, h in zip(weights, history))
            return _transfer(x, combined, a, a_prev), base, acc, history

        return rule

    return [
        prk(1 / 6, False), prk(1 / 3, False), prk(1 / 3, False), prk(1 / 6, True),
        plms_start, plms_heun,
        adams_bashforth((1.5, -0.5)),
        adams_bashforth((23 / 12, -16 / 12, 5 / 12)),
        adams_bashforth((55 / 24, -59 / 24, 37 / 24, -9 / 24)),
    ]  # fmt: skip


def make_pndm_sampler(
    schedule: DiffusionProcess,
    *,
    num_steps: int,
    prediction: str = "eps",
    skip_prk_steps: bool = False,
    set_alpha_to_one: bool = False,
    sigmas: str = "schedule",
    spacing: str = "leading",
    steps_offset: int = 0,
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """PNDM (PRK warm-up then PLMS) or, with skip_prk_steps, PLMS as Stable Diffusion runs it,
    on a discrete process. The last step goes to alpha_bar = 1 (set_alpha_to_one) or to the
    first training step's. NFE: num_steps + 9 (PRK) or num_steps + 1 (skip_prk_steps)."""
    if not isinstance(schedule, DiffusionProcess):
        raise ValueError("Sampler 'pndm' runs on a discrete DiffusionProcess (its timesteps)")
    if sigmas != "schedule":
        raise ValueError(
            f"Sampler 'pndm' steps between the process's timesteps: sigmas={sigmas!r} is not "
            "defined for it; allowed: 'schedule' (choose the timesteps with spacing)"
        )
    sigma_grid.check_grid_options(sigmas, spacing, "zero")
    common.check_num_steps(num_steps, minimum=1 if skip_prk_steps else 4, name="pndm")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    num_timesteps = alphas_cumprod.shape[0]
    evaluations = pndm_schedule(
        num_timesteps, num_steps, spacing=spacing, steps_offset=steps_offset,
        skip_prk_steps=skip_prk_steps,
    )  # fmt: skip
    final = 1.0 if set_alpha_to_one else alphas_cumprod[0]

    def alpha_bar_of(t):
        return alphas_cumprod[t] if t >= 0 else final

    columns = list(zip(*evaluations))
    model_timesteps = np.asarray(schedule.model_timesteps, np.float32)
    model_times = jnp.asarray(model_timesteps[np.asarray(columns[0])])
    model_alpha_bars = jnp.asarray([alpha_bar_of(t) for t in columns[0]], jnp.float32)
    from_alpha_bars = jnp.asarray([alpha_bar_of(t) for t in columns[1]], jnp.float32)
    to_alpha_bars = jnp.asarray([alpha_bar_of(t) for t in columns[2]], jnp.float32)
    rules = jnp.asarray(columns[3], jnp.int32)
    common.check_prediction_at(prediction, float(np.sqrt(alpha_bar_of(columns[0][0]))), 1.0,
                               name="pndm")  # fmt: skip
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0
    )
    branches = _rules()
    nfe = len(evaluations)

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic

        def step(k, carry):
            x, base, acc, history = carry
            a = model_alpha_bars[k]
            model_t = common.batch_time(model_times[k], x)
            _, e = x0_eps_fn(model_fn, x, model_t, jnp.sqrt(a), jnp.sqrt(1.0 - a), cond)
            return jax.lax.switch(
                rules[k], branches, x, base, acc, history, e, from_alpha_bars[k], to_alpha_bars[k]
            )

        x = jnp.sqrt(1.0 - model_alpha_bars[0]) * noise
        zeros = jnp.zeros_like(x)
        x, _, _, _ = jax.lax.fori_loop(0, nfe, step, (x, zeros, zeros, (zeros,) * 4))
        return x, {"nfe": jnp.int32(nfe)}

    return sample
