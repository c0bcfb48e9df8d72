"""DPM-Solver++ on a sigma grid: multistep 2M / 3M for the ODE and the SDE, single-step SDE.

Data prediction x0 = D(x_t) in lambda = log(alpha_t / sigma_t), h = lambda_t - lambda_s, written
with r = exp(-h) = sigma_t / sigma_s in EDM's sigma (so a step to sigma = 0 has no infinities):
- ODE, first order (DPM-Solver++, Lu et al. 2022b, Eq. 9):
  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - r) D_0;
- SDE, first order (Lu et al. 2022b, App. B; the reverse SDE integrated exactly in its linear
  part, the noise term's variance in closed form):
  x_t = (sigma_t / sigma_s) r x_s + alpha_t (1 - r^2) D_0 + sigma_t sqrt(1 - r^2) z.
Multistep corrections (2M: Algorithm 2 of DPM-Solver++; 3M: the authors' code) use the backward
differences D1 = (D_0 - D_1) / r0, D2 ~ second difference, with the phi-function coefficients of
each form; lower orders during warm-up and, as diffusers does, at the last step (and the last
two with fewer than 15 steps, `lower_order_final`).

`second_difference`: "taylor" D2 = 2 (D1_0 - D1_1) / (r0 + r1), the Taylor-consistent one (third
order, see docs/samplers.md), or "reference" with factor 1, as DPM-Solver's code and diffusers.
"reference" also reproduces diffusers' 3M SDE, whose D2 coefficient ((1 - e^{-2h} - 2h) /
(2h)^2 - 0.5, added) is -phi_3 - 1 rather than k-diffusion's -phi_3 (phi_3 = phi_2 / 2h - 1/2,
phi_2 = 1 - (1 - e^{-2h}) / 2h): an O(h^2) error per step (with the factor 2 as well, the
samples diverged on the mixture). "taylor" uses -phi_3.

The single-step SDE (k-diffusion's `sample_dpmpp_sde`, diffusers' DPMSolverSDEScheduler) takes an
ancestral first-order step to the lambda-midpoint, evaluates there and redoes the step with that
x0 (DPM-Solver++(2S), Algorithm 1 with r = 1/2), each part aiming at sigma_down and adding
Brownian noise. diffusers draws the two overlapping increments W(sigma_mid) - W(sigma) and
W(sigma_next) - W(sigma) from a torchsde BrownianTree; here they are built from two Gaussians of
the sampler's key with the same joint law, so samples match diffusers in distribution only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import common, sigma_grid
from diffusion_jax.samplers.euler_ancestral import ancestral_levels

ORDERS = (1, 2, 3)
SECOND_DIFFERENCES = ("taylor", "reference")


def diffusers_multistep_orders(num_steps: int, order: int, *, lower_order_final: bool,
                               final_to_zero: bool) -> np.ndarray:  # fmt: skip
    """Per-step orders of DPMSolverMultistepScheduler: warm-up min(order, i + 1); order 1 at
    the last step when it ends at sigma = 0 or (lower_order_final and N < 15), and <= 2 at the
    one before in the latter case."""
    orders = np.minimum(order, np.arange(num_steps) + 1)
    few = lower_order_final and num_steps < 15
    if final_to_zero or few:
        orders[-1] = 1
    if few and num_steps >= 2:
        orders[-2] = min(orders[-2], 2)
    return orders.astype(np.int32)


def _update(order, stochastic, factor, x, outputs, levels, sigma_next, noise):
    """One DPM-Solver++ step from levels[0] to sigma_next (EDM sigmas, VP family) with the
    outputs (newest first) at `levels`."""
    (_, sigma_s), (alpha_t, sigma_t) = (
        sigma_grid.alpha_sigma_of_sigma("vp", levels[0]),
        sigma_grid.alpha_sigma_of_sigma("vp", sigma_next),
    )  # fmt: skip
    ratio = sigma_next / levels[0]  # r = exp(-h)
    if stochastic:
        e = 1.0 - ratio**2  # 1 - exp(-2h)
        x_t = sigma_t / sigma_s * ratio * x + alpha_t * e * outputs[0]
        x_t = x_t + sigma_t * jnp.sqrt(jnp.maximum(e, 0.0)) * noise
    else:
        e = 1.0 - ratio
        x_t = sigma_t / sigma_s * x + alpha_t * e * outputs[0]
    if order == 1:
        return x_t
    h = jnp.log(levels[0]) - jnp.log(sigma_next)
    r0 = (jnp.log(levels[1]) - jnp.log(levels[0])) / h
    d1_0 = (outputs[0] - outputs[1]) / r0
    if order == 2:
        return x_t + 0.5 * alpha_t * e * d1_0
    r1 = (jnp.log(levels[2]) - jnp.log(levels[1])) / h
    d1_1 = (outputs[1] - outputs[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = factor * (d1_0 - d1_1) / (r0 + r1)
    if stochastic:
        phi_2 = 1.0 - e / (2.0 * h)  # with 2h in place of h (k-diffusion's h_eta, eta = 1)
        if factor == 1.0:  # diffusers' coefficient of D2, -phi_3 - 1 (see the module doc)
            return (
                x_t + alpha_t * phi_2 * d1 + alpha_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
            )
        phi_3 = phi_2 / (2.0 * h) - 0.5
        return x_t + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
    phi_2 = (ratio - 1.0) / h + 1.0
    phi_3 = (ratio - 1.0 + h) / h**2 - 0.5
    return x_t + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2


def make_dpm_solver_multistep(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    order: int = 2,
    stochastic: bool = True,
    second_difference: str = "taylor",
    lower_order_final: bool = True,
    s_noise: float = 1.0,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    time_spacing: str = "log_snr",
    clip_x0: bool = False,
    thresholding: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """DPM-Solver++ 2M / 3M (order 2 / 3), the SDE form by default ("dpm_solver++_sde"; with
    stochastic=False the ODE form, which `dpm_solver++` uses on a `sigmas` / `spacing` grid),
    as diffusers' DPMSolverMultistepScheduler (algorithm_type "sde-dpmsolver++" /
    "dpmsolver++", solver_type "midpoint"). The noise of step i is `common.step_noise(rng, i,
    x)`. NFE: num_steps. VP grids only (alpha = 1 / sqrt(1 + sigma^2))."""
    name = "dpm_solver++_sde" if stochastic else "dpm_solver++"
    common.check_choice(order, ORDERS, option=f"order of {name}")
    common.check_choice(second_difference, SECOND_DIFFERENCES, option="second_difference")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name=name, prediction=prediction, convention="multistep",
        round_karras=True, sigmas=sigmas, spacing=spacing, steps_offset=steps_offset, rho=rho,
        final_sigma=final_sigma, time_spacing=time_spacing,
    )  # fmt: skip
    if grid.kind != "vp":
        raise ValueError(f"Sampler {name!r} runs on VP schedules, got a {grid.kind!r} schedule")
    final_to_zero = float(grid.sigmas[-1]) == 0.0
    orders = jnp.asarray(
        diffusers_multistep_orders(
            num_steps, order, lower_order_final=lower_order_final, final_to_zero=final_to_zero
        )
    )
    factor = 2.0 if second_difference == "taylor" else 1.0
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0,
        thresholding=thresholding,
    )  # fmt: skip

    def sample(model_fn, noise, rng, cond=None):
        branches = [
            lambda *args, o=o: _update(o, stochastic, factor, *args) for o in range(1, order + 1)
        ]

        def step(i, carry):
            x, outputs, levels = carry  # x0_hat and sigma of the last evaluations, newest first
            sigma = grid.sigmas[i]
            alpha, sigma_t = grid.alpha_sigma(sigma)
            model_t = common.batch_time(grid.model_times[i], x)
            x0, _ = x0_eps_fn(model_fn, x, model_t, alpha, sigma_t, cond)
            outputs, levels = (x0,) + outputs[:-1], (sigma,) + levels[:-1]
            z = s_noise * common.step_noise(rng, i, x)
            x = jax.lax.switch(orders[i] - 1, branches, x, outputs, levels, grid.sigmas[i + 1], z)
            return x, outputs, levels

        x = grid.alpha_sigma(grid.sigmas[0])[1] * noise
        history = (jnp.zeros_like(x),) * order, (jnp.ones((), grid.sigmas.dtype),) * order
        x, _, _ = jax.lax.fori_loop(0, num_steps, step, (x,) + history)
        return x, {"nfe": jnp.int32(num_steps)}

    return sample


def brownian_increments(rng, x, sigma, sigma_mid, sigma_next):
    """Normalised increments (W(sigma_mid) - W(sigma)) / sqrt(|.|) and (W(sigma_next) -
    W(sigma)) / sqrt(|.|) of one Brownian path in sigma-time, from two independent normals."""
    first, second = common.step_noise(rng, 0, x), common.step_noise(rng, 1, x)
    near, far = jnp.sqrt(sigma - sigma_mid), jnp.sqrt(sigma_mid - sigma_next)
    return first, (near * first + far * second) / jnp.sqrt(sigma - sigma_next)


def make_dpm_solver_singlestep_sde(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    time_spacing: str = "log_snr",
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """DPM-Solver++(2S) SDE (see the module docstring) on the shared grid, in EDM's scaled
    variable x = x_t / alpha_t; a step to sigma = 0 is an Euler step. NFE: 2 num_steps - 1
    when the grid ends at 0."""
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got {eta}, {s_noise}")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name="dpm_solver++_2s_sde", prediction=prediction, sigmas=sigmas,
        spacing=spacing, steps_offset=steps_offset, rho=rho, final_sigma=final_sigma,
        time_spacing=time_spacing,
    )  # fmt: skip
    denoise = sigma_grid.make_denoiser(
        grid,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )
    nfe = 2 * num_steps - int(float(grid.sigmas[-1]) == 0.0)

    def ancestral_first_order(x, x0, sigma, sigma_to, noise):
        sigma_down, sigma_up = ancestral_levels(sigma, sigma_to, eta)
        ratio = sigma_down / sigma  # the DPM-Solver++ first-order (DDIM) step to sigma_down
        return ratio * x + (1.0 - ratio) * x0 + s_noise * sigma_up * noise

    def sample(model_fn, noise, rng, cond=None):
        def step(i, x):
            sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
            x0 = denoise(model_fn, x, sigma, grid.model_times[i], cond)

            def two_stages(x):
                sigma_mid = jnp.sqrt(sigma * sigma_next)  # the midpoint in lambda
                near, far = brownian_increments(
                    jax.random.fold_in(rng, i), x, sigma, sigma_mid, sigma_next
                )
                x_mid = ancestral_first_order(x, x0, sigma, sigma_mid, near)
                time_mid = grid.model_time_of_sigma(sigma_mid)
                x0_mid = denoise(model_fn, x_mid, sigma_mid, time_mid, cond)
                return ancestral_first_order(x, x0_mid, sigma, sigma_next, far)

            euler = lambda x: x0  # the step to sigma_next = 0: x + (0 - sigma) (x - x0) / sigma
            return jax.lax.cond(sigma_next > 0, two_stages, euler, x)

        x = jax.lax.fori_loop(0, num_steps, step, grid.sigmas[0] * noise)
        x0 = sigma_grid.unscaled(grid, x)
        return x0, {"nfe": jnp.int32(nfe)}

    return sample
