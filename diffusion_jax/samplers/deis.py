"""DEIS (Zhang & Chen 2023): the exponential integrator with polynomial extrapolation in log rho.

In rho = sigma_t / alpha_t (EDM's sigma) the probability-flow ODE of x / alpha is
d(x / alpha) = eps(rho) d rho (Zhang & Chen, Eq. 10 with the data scaled out), so a step is
x_t / alpha_t = x_s / alpha_s + integral_{rho_s}^{rho_t} eps(rho) d rho. DEIS's multistep
"logrho" variant (tAB-DEIS, Eq. 15) replaces eps by the Lagrange polynomial in u = log rho
through the last `order` outputs, whose basis integrates in closed form (`_basis_integral`).
Order 1 is DDIM. Lower orders during warm-up and, with fewer than 15
steps and `lower_order_final`, at the end (diffusers' DEISMultistepScheduler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import common, sigma_grid
from diffusion_jax.samplers.dpm_solver_sde import diffusers_multistep_orders

ORDERS = (1, 2, 3)


def _basis_integral(rho_s, rho_t, node, others):
    """integral_{rho_s}^{rho_t} l(log rho) d rho of the Lagrange basis l in u = log rho that is
    1 at log(node) and 0 at log(others) (one or two of them). With rho = e^u the antiderivative
    is rho G(u), G(u) = u - 1 - l_1 (linear) or (u - 1)^2 + 1 - (l_1 + l_2)(u - 1) + l_1 l_2
    (quadratic), over prod(log node - l_k); the difference is taken as
    (rho_t - rho_s) G(u_s) + rho_t (G(u_t) - G(u_s)), u_t - u_s = log1p(rho_t / rho_s - 1),
    which does not cancel when the step is short."""
    u_s = jnp.log(rho_s)
    du = jnp.log1p((rho_t - rho_s) / rho_s)
    logs = [jnp.log(o) for o in others]
    if len(others) == 1:
        g_s, dg = u_s - 1.0 - logs[0], du
    else:
        total, product = logs[0] + logs[1], logs[0] * logs[1]
        g_s = (u_s - 1.0) ** 2 + 1.0 - total * (u_s - 1.0) + product
        dg = du * (2.0 * (u_s - 1.0) + du - total)
    denominator = 1.0
    for log_other in logs:
        denominator = denominator * (jnp.log(node) - log_other)
    return ((rho_t - rho_s) * g_s + rho_t * dg) / denominator


def _deis_update(order, x, outputs, levels, sigma_t):
    """x_t = alpha_t (x / alpha_s + sum_j c_j eps_j), c_j the integrals over [rho_s, rho_t]."""
    # In x's dtype (float64 under jax_enable_x64); the integrals are written not to cancel.
    levels, sigma_t = [jnp.asarray(v, x.dtype) for v in levels], jnp.asarray(sigma_t, x.dtype)
    alpha_s, _ = sigma_grid.alpha_sigma_of_sigma("vp", levels[0])
    alpha_t, _ = sigma_grid.alpha_sigma_of_sigma("vp", sigma_t)
    rho_s = levels[0]
    if order == 1:
        return alpha_t * (x / alpha_s + (sigma_t - rho_s) * outputs[0])
    total = x / alpha_s
    for j in range(order):
        others = [levels[k] for k in range(order) if k != j]
        total = total + _basis_integral(rho_s, sigma_t, levels[j], others) * outputs[j]
    return alpha_t * total


def make_deis_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    order: int = 2,
    lower_order_final: bool = True,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str | None = None,
    time_spacing: str = "log_snr",
    clip_x0: bool = False,
    thresholding: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """DEIS-logrho of `order` with num_steps evaluations. final_sigma defaults to diffusers':
    the smallest training sigma on the schedule's own levels, the last level repeated (a
    zero step) on Karras / exponential / Beta levels; "zero" ends at x0_hat (first order)."""
    common.check_choice(order, ORDERS, option="order of deis")
    if final_sigma is None:
        final_sigma = "sigma_min" if sigmas == "schedule" else "last"
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name="deis", prediction=prediction, convention="multistep",
        round_karras=True, sigmas=sigmas, spacing=spacing, steps_offset=steps_offset, rho=rho,
        final_sigma=final_sigma, time_spacing=time_spacing,
    )  # fmt: skip
    if grid.kind != "vp":
        raise ValueError(f"Sampler 'deis' runs on VP schedules, got a {grid.kind!r} schedule")
    orders = jnp.asarray(
        diffusers_multistep_orders(
            num_steps,
            order,
            lower_order_final=lower_order_final,
            final_to_zero=float(grid.sigmas[-1]) == 0.0,
        )  # fmt: skip
    )
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0,
        thresholding=thresholding,
    )  # fmt: skip
    branches = [lambda *args, o=o: _deis_update(o, *args) for o in range(1, order + 1)]

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic

        def step(i, carry):
            x, outputs, levels = carry  # eps_hat at the last levels, newest first
            sigma = grid.sigmas[i]
            alpha, vp_sigma = grid.alpha_sigma(sigma)
            model_t = common.batch_time(grid.model_times[i], x)
            _, eps = x0_eps_fn(model_fn, x, model_t, alpha, vp_sigma, cond)
            outputs, levels = (eps,) + outputs[:-1], (sigma,) + levels[:-1]
            x = jax.lax.switch(orders[i] - 1, branches, x, outputs, levels, grid.sigmas[i + 1])
            return x, outputs, levels

        x = grid.alpha_sigma(grid.sigmas[0])[1] * noise
        history = (jnp.zeros_like(x),) * order, (jnp.ones((), grid.sigmas.dtype),) * order
        x, _, _ = jax.lax.fori_loop(0, num_steps, step, (x,) + history)
        return x, {"nfe": jnp.int32(num_steps)}

    return sample
