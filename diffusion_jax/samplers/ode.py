"""The probability-flow ODE solved by an adaptive Runge-Kutta method (diffrax).

dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat, which is f x - g^2 score / 2 (Eq. 13 of Song et
al. 2021) written with the denoiser, integrated from t_max to t_min with error control
(Dormand-Prince / Tsitouras 5(4), PID step-size controller, tolerances rtol and atol; on a
discrete schedule, optionally with steps that land on its kinks).
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.samplers import common

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# New evaluations per attempted step: 7 stages, the first shared with the last of the step
# before (first same as last), whether the step is accepted or rejected.
EVALUATIONS_PER_STEP = {"tsit5": 6, "dopri5": 6}


def count_evaluations(schedule, *, solver: str, steps, step_to_kinks: bool):
    """Field evaluations of `solve_adaptive`'s `steps` attempted steps: EVALUATIONS_PER_STEP
    each, +1 for the first step's first stage, +1 after each kink landed on (a step that ends
    on a jump time invalidates the stage shared with the next step). Each rejected attempt at
    the very first step also re-evaluates its first stage: those few are not counted."""
    kinks = schedule.kink_times().size if step_to_kinks else 0
    return EVALUATIONS_PER_STEP[solver] * steps + 1 + kinks


def step_size_controller(schedule, *, rtol: float, atol: float, step_to_kinks: bool):
    """A PID controller with tolerances rtol and atol; with `step_to_kinks`, its steps also end
    exactly on the schedule's kinks (the steps of a discrete process, where the field's time
    derivative jumps). An embedded error estimate does not see a step across a jump (both
    orders err alike there): on the linear DDPM schedule the transported log-density then
    keeps an error of ~2e-3 nats per dimension whatever the tolerance, against ~1e-4 when
    stepping onto the kinks, at the price of at least T steps (tests/ode_likelihood_test.py)."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    kinks = schedule.kink_times()
    if not step_to_kinks or kinks.size == 0:
        return controller
    return diffrax.ClipStepSizeController(controller, jump_ts=kinks)


def solve_adaptive(
    field, y0, *, schedule, t0, t1, first_step, solver, rtol, atol, max_steps, step_to_kinks
):
    """(y at t1, number of attempted steps, field evaluations (`count_evaluations`)) of
    dy/dt = field(t, y, args) by `solver` (SOLVERS) from t0, with the controller of
    `step_size_controller`. Stepping onto kinks takes at least one step per kink, so
    `max_steps` is raised to twice that if smaller."""
    if step_to_kinks:
        max_steps = max(max_steps, 2 * (schedule.kink_times().size + 1))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        SOLVERS[solver](),
        t0=t0,
        t1=t1,
        dt0=first_step,
        y0=y0,
        stepsize_controller=step_size_controller(
            schedule, rtol=rtol, atol=atol, step_to_kinks=step_to_kinks
        ),
        max_steps=max_steps,
    )
    final = jax.tree.map(lambda leaf: leaf[-1], solution.ys)
    steps = solution.stats["num_steps"]
    evaluations = count_evaluations(
        schedule, solver=solver, steps=steps, step_to_kinks=step_to_kinks
    )
    return final, steps, evaluations


def make_ode_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    step_to_kinks: bool = False,
    denoise_final: bool = False,
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """Adaptive solution of the probability-flow ODE; info holds "nfe" and "num_steps".

    num_steps sets the first step, (t_max - t_min) / num_steps; the controller then adapts it
    (at most `max_steps` steps; `step_to_kinks`: see `step_size_controller`). NFE: see
    `count_evaluations` (+1 if `denoise_final`, which returns x0_hat at t_min).
    """
    common.check_num_steps(num_steps, minimum=1, name="ode")
    common.check_choice(solver, tuple(SOLVERS), option="ode solver")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got {rtol}, {atol}")
    schedule = noise_schedule.as_noise_schedule(schedule)
    alpha_first, _ = schedule.alpha_sigma(jnp.float32(schedule.t_max))
    _, sigma_last = schedule.alpha_sigma(jnp.float32(schedule.t_min))
    common.check_prediction_at(prediction, float(alpha_first), float(sigma_last), name="ode")
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0
    )
    solve_options = dict(
        solver=solver, rtol=rtol, atol=atol, max_steps=max_steps, step_to_kinks=step_to_kinks
    )

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic

        def vector_field(t, x, args):
            (_, _), (dalpha, dsigma) = schedule.alpha_sigma_derivatives(t)
            x0, eps = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t, cond)
            return dalpha * x0 + dsigma * eps

        sigma_first = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1]
        x, steps, nfe = solve_adaptive(
            vector_field,
            sigma_first * noise,
            schedule=schedule,
            t0=schedule.t_max,
            t1=schedule.t_min,
            first_step=-(schedule.t_max - schedule.t_min) / num_steps,
            **solve_options,
        )
        if denoise_final:
            t_min = jnp.float32(schedule.t_min)
            x = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t_min, cond)[0]
            nfe = nfe + 1
        return x, {"nfe": jnp.asarray(nfe, jnp.int32), "num_steps": steps}

    return sample
