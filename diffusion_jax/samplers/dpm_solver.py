"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b) for the probability-flow ODE.

Both integrate the ODE exactly in its linear part, stepping in lambda = log(alpha / sigma)
(half the log-SNR; h = lambda_t - lambda_s), and expand the model output in lambda:
- noise prediction (DPM-Solver, Eq. 3.4), first order
  x_t = (alpha_t / alpha_s) x_s - sigma_t expm1(h) eps_s;
- data prediction (DPM-Solver++, Eq. 8), first order
  x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) x0_s.
Both are one formula with c_t = sigma_t, h_hat = h (noise) or c_t = alpha_t, h_hat = -h (data):
x_t = ratio x_s - c_t [phi_1(h_hat) m_0 + higher-order corrections], phi_1(z) = expm1(z),
phi_2(z) = phi_1(z) / z - 1, phi_3(z) = phi_2(z) / z - 1/2.
Single-step methods evaluate intermediate points (orders 1, 2, 3: Algorithms 1, 4, 5 of
DPM-Solver; 2S: Algorithm 1 of DPM-Solver++); multistep methods reuse the previous outputs
(2M: Algorithm 2 of DPM-Solver++; 3M as in the authors' code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_schedule
from diffusion_jax.samplers import common, dpm_solver_sde

ORDERS = (1, 2, 3)


def _phi_1(z):
    return jnp.expm1(z)


def _phi_2(z):
    return jnp.expm1(z) / z - 1.0


def _phi_3(z):
    return _phi_2(z) / z - 0.5


def singlestep_orders(num_evaluations: int, order: int) -> list[int]:
    """Orders of the steps that spend `num_evaluations` evaluations (DPM-Solver, App. D.1).

    As many steps of `order` as fit, then lower orders to use up the rest, so that the total
    number of evaluations is exactly `num_evaluations`.
    """
    if order == 1:
        return [1] * num_evaluations
    if order == 2:
        return [2] * (num_evaluations // 2) + [1] * (num_evaluations % 2)
    num_steps = num_evaluations // 3 + 1
    remainder = num_evaluations % 3
    if remainder == 0:
        return [3] * (num_steps - 2) + [2, 1]
    return [3] * (num_steps - 1) + [remainder]


def multistep_orders(num_steps: int, order: int, *, lower_order_final: bool) -> list[int]:
    """Warm-up with lower orders; with few steps (< 10) also lower orders at the end."""
    orders = [min(order, i + 1) for i in range(num_steps)]
    if lower_order_final and num_steps < 10:
        orders = [min(o, num_steps - i) for i, o in enumerate(orders)]
    return orders


class _Solver:
    """The updates of one formulation (noise or data prediction) on one schedule."""

    def __init__(self, schedule, x0_eps_fn, *, data: bool):
        self.schedule, self.x0_eps_fn, self.data = schedule, x0_eps_fn, data

    def lambda_(self, t):
        """DPM-Solver's lambda_t = log(alpha_t / sigma_t), half the log-SNR."""
        return 0.5 * self.schedule.log_snr(t)

    def t_from_lambda(self, lambda_t):
        return self.schedule.t_from_log_snr(2.0 * lambda_t)

    def evaluate(self, model_fn, x, t, cond):
        x0, eps = common.x0_eps_at(self.x0_eps_fn, self.schedule, model_fn, x, t, cond)
        return x0 if self.data else eps

    def coefficients(self, s, t):
        """(ratio, c_t, h_hat) of the step s -> t."""
        (alpha_s, sigma_s), (alpha_t, sigma_t) = (
            self.schedule.alpha_sigma(s), self.schedule.alpha_sigma(t)
        )  # fmt: skip
        h = self.lambda_(t) - self.lambda_(s)
        if self.data:
            return sigma_t / sigma_s, alpha_t, -h
        return alpha_t / alpha_s, sigma_t, h

    def first_order(self, x, s, t, m_s):
        """DDIM (Lu et al. 2022a, Eq. 3.8 / 2022b, Eq. 9)."""
        ratio, c_t, h_hat = self.coefficients(s, t)
        return ratio * x - c_t * _phi_1(h_hat) * m_s

    def singlestep(self, order, model_fn, x, s, t, m_s, cond):
        """One step of order 1, 2 (r1 = 1/2) or 3 (r1 = 1/3, r2 = 2/3) from s to t."""
        x_t = self.first_order(x, s, t, m_s)
        if order == 1:
            return x_t
        _, c_t, h_hat = self.coefficients(s, t)
        lambda_s = self.lambda_(s)
        h = self.lambda_(t) - lambda_s
        r1 = 0.5 if order == 2 else 1.0 / 3.0
        s1 = self.t_from_lambda(lambda_s + r1 * h)
        d1 = self.evaluate(model_fn, self.first_order(x, s, s1, m_s), s1, cond) - m_s
        if order == 2:
            return x_t - c_t * (0.5 / r1) * _phi_1(h_hat) * d1
        r2 = 2.0 / 3.0
        s2 = self.t_from_lambda(lambda_s + r2 * h)
        _, c_s2, h_hat_2 = self.coefficients(s, s2)
        x_s2 = self.first_order(x, s, s2, m_s) - c_s2 * (r2 / r1) * _phi_2(h_hat_2) * d1
        d2 = self.evaluate(model_fn, x_s2, s2, cond) - m_s
        return x_t - c_t * (1.0 / r2) * _phi_2(h_hat) * d2

    def multistep(self, order, x, models, times, t):
        """One step from times[0] to t with the outputs `models` at times (newest first)."""
        x_t = self.first_order(x, times[0], t, models[0])
        if order == 1:
            return x_t
        _, c_t, h_hat = self.coefficients(times[0], t)
        lambdas = [self.lambda_(time) for time in times]
        h = self.lambda_(t) - lambdas[0]
        r0 = (lambdas[0] - lambdas[1]) / h
        d1_0 = (models[0] - models[1]) / r0
        if order == 2:
            return x_t - c_t * 0.5 * _phi_1(h_hat) * d1_0
        r1 = (lambdas[1] - lambdas[2]) / h
        d1_1 = (models[1] - models[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
        return x_t - c_t * (_phi_2(h_hat) * d1 + _phi_3(h_hat) * d2)


def make_dpm_solver(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    order: int = 3,
    multistep: bool = False,
    algorithm: str = "noise",
    time_spacing: str = "log_snr",
    lower_order_final: bool = True,
    denoise_final: bool = False,
    clip_x0: bool = False,
    thresholding: bool = False,
    threshold_percentile: float = 0.995,
    threshold_max: float = 1.0,
    variance_type: str = "fixed_small",
    sigmas: str | None = None,
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    second_difference: str = "taylor",
) -> common.SampleFn:
    """DPM-Solver ("noise") or DPM-Solver++ ("data") with num_steps network evaluations.

    With `sigmas` or `spacing` set, multistep DPM-Solver++ runs on the shared sigma grid
    (`sigma_grid`; diffusers' DPMSolverMultistepScheduler, `dpm_solver_sde` with
    stochastic=False), where `second_difference` chooses 3M's D2.

    Single-step: steps of `order` evaluations each, lower orders at the end to use exactly
    num_steps evaluations. Multistep: one evaluation per step, lower orders during warm-up
    (and at the end when num_steps < 10, `lower_order_final`). `denoise_final` returns x0_hat
    at t_min (one more evaluation). Thresholding acts on x0_hat in either formulation.
    """
    name = "dpm_solver++" if algorithm == "data" else "dpm_solver"
    if sigmas is not None or spacing is not None:
        if algorithm != "data" or not multistep or denoise_final:
            raise ValueError(
                "sigmas / spacing (a sigma grid) work with multistep 'dpm_solver++' without "
                "denoise_final; for noise prediction or single-step use time_spacing"
            )
        return dpm_solver_sde.make_dpm_solver_multistep(
            schedule, num_steps=num_steps, prediction=prediction, order=order, stochastic=False,
            second_difference=second_difference, lower_order_final=lower_order_final,
            sigmas=sigmas or "schedule", spacing=spacing, steps_offset=steps_offset, rho=rho,
            final_sigma=final_sigma, time_spacing=time_spacing, clip_x0=clip_x0,
            thresholding=thresholding, variance_type=variance_type,
        )  # fmt: skip
    common.check_choice(algorithm, ("noise", "data"), option="algorithm")
    common.check_choice(order, ORDERS, option=f"order of {name}")
    common.check_num_steps(num_steps, minimum=1, name=name)
    common.check_choice(time_spacing, noise_schedule.TIME_SPACINGS, option="time_spacing")
    schedule = noise_schedule.as_noise_schedule(schedule)
    common.check_finite_log_snr(schedule, name=name)
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0,
        thresholding=thresholding, threshold_percentile=threshold_percentile,
        threshold_max=threshold_max,
    )  # fmt: skip
    solver = _Solver(schedule, x0_eps_fn, data=algorithm == "data")
    if multistep:
        orders = multistep_orders(num_steps, order, lower_order_final=lower_order_final)
        loop = _multistep_loop(solver, orders, time_spacing)
    else:
        orders = singlestep_orders(num_steps, order)
        loop = _singlestep_loop(solver, orders, time_spacing)
    nfe = num_steps + int(denoise_final)

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic
        sigma_max = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1]
        x = loop(model_fn, sigma_max * noise, cond)
        if denoise_final:
            t_min = jnp.float32(schedule.t_min)
            x = common.x0_eps_at(x0_eps_fn, schedule, model_fn, x, t_min, cond)[0]
        return x, {"nfe": jnp.int32(nfe)}

    return sample


def _singlestep_loop(solver: _Solver, orders: list[int], time_spacing: str):
    orders_array = jnp.asarray(orders, jnp.int32)

    def loop(model_fn, x, cond):
        grid = noise_schedule.time_grid(solver.schedule, len(orders), time_spacing)
        branches = [
            lambda x, s, t, m, o=o: solver.singlestep(o, model_fn, x, s, t, m, cond)
            for o in range(1, max(orders) + 1)
        ]

        def step(i, x):
            s, t = grid[i], grid[i + 1]
            m_s = solver.evaluate(model_fn, x, s, cond)
            return jax.lax.switch(orders_array[i] - 1, branches, x, s, t, m_s)

        return jax.lax.fori_loop(0, len(orders), step, x)

    return loop


def _multistep_loop(solver: _Solver, orders: list[int], time_spacing: str):
    orders_array = jnp.asarray(orders, jnp.int32)
    max_order = max(orders)

    def loop(model_fn, x, cond):
        grid = noise_schedule.time_grid(solver.schedule, len(orders), time_spacing)
        branches = [
            lambda x, models, times, t, o=o: solver.multistep(o, x, models, times, t)
            for o in range(1, max_order + 1)
        ]

        def step(i, carry):
            x, models, times = carry  # outputs and times of the last steps, newest first
            s, t = grid[i], grid[i + 1]
            models = (solver.evaluate(model_fn, x, s, cond),) + models[:-1]
            times = (s,) + times[:-1]
            x = jax.lax.switch(orders_array[i] - 1, branches, x, models, times, t)
            return x, models, times

        history = (jnp.zeros_like(x),) * max_order, (jnp.float32(1.0),) * max_order
        x, _, _ = jax.lax.fori_loop(0, len(orders), step, (x,) + history)
        return x

    return loop
