"""UniPC (Zhao et al. 2023): the unified predictor-corrector of orders 1-3 on a sigma grid.

Both parts work in lambda = log(alpha_t / sigma_t) with h = lambda_t - lambda_s and hh = -h
(data prediction, x0 = D(x_t)) or hh = h (noise prediction, eps). With the model outputs m_k at
the previous levels, r_k = (lambda_k - lambda_s) / h and D1_k = (m_k - m_0) / r_k:
- UniP-p (Algorithm 2 of the paper, the predictor; Eq. 8):
  x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1(hh) m_0 - alpha_t B(h) sum_k a_k D1_k (data);
- UniC-p (Algorithm 1, the corrector; Eq. 7) redoes the same step once m_t at the predicted
  x_t is known, with one more difference D1_t = m_t - m_0; its evaluation is the next step's,
  so the corrector costs no network call.
The weights solve R a = b with R_{ij} = r_j^(i-1) and b_i = phi_{i+1}(hh) i! / B(h) (Eq. 9),
phi_1(z) = expm1(z), phi_{k+1}(z) = phi_k(z) / z - 1 / k!; order-2 predictor and order-1
corrector use a = 1/2 (Zhao et al., App. B). B(h) = hh ("bh1") or expm1(hh) ("bh2").
Multistep with lower orders during warm-up and, with `lower_order_final`, towards the end
(order min(order, steps left)), as diffusers' UniPCMultistepScheduler. A step to sigma = 0 is
first order and gives x0_hat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import common, sigma_grid

ORDERS = (1, 2, 3)
B_VARIANTS = ("bh1", "bh2")


def unipc_orders(num_steps: int, order: int, *, lower_order_final: bool) -> np.ndarray:
    """Predictor order of each step: min(order, i + 1, N - i if lower_order_final)."""
    steps = np.arange(num_steps)
    orders = np.minimum(order, steps + 1)
    if lower_order_final:
        orders = np.minimum(orders, num_steps - steps)
    return orders.astype(np.int32)


def _weights(order, rks, hh, variant, predictor):
    """(B(h), a): the weights of the differences (Eq. 9); rks [order] ends with 1."""
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    h_phi_k, factorial, b = jnp.expm1(hh) / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    powers = jnp.stack([rks**i for i in range(order)])  # R [order, order]
    b = jnp.stack(b)
    if predictor:
        if order == 2:
            return b_h, jnp.full((1,), 0.5, hh.dtype)
        return b_h, jnp.linalg.solve(powers[:-1, :-1], b[:-1])
    if order == 1:
        return b_h, jnp.full((1,), 0.5, hh.dtype)
    return b_h, jnp.linalg.solve(powers, b)


def _first_order(x, m_0, sigma_s, sigma_t, data):
    """x_t = (sigma_t / sigma_s) x + alpha_t (1 - r) m_0 (data) or (alpha_t / alpha_s) x -
    (alpha_t sigma_s - sigma_t) m_0 (noise), r = sigma_t / sigma_s in EDM sigmas: finite at 0."""
    (alpha_s, vp_sigma_s), (alpha_t, vp_sigma_t) = (
        sigma_grid.alpha_sigma_of_sigma("vp", sigma_s),
        sigma_grid.alpha_sigma_of_sigma("vp", sigma_t),
    )  # fmt: skip
    if data:
        return vp_sigma_t / vp_sigma_s * x + alpha_t * (1.0 - sigma_t / sigma_s) * m_0
    return alpha_t / alpha_s * x - (alpha_t * sigma_s - vp_sigma_t) * m_0


def _unified_update(order, predictor, data, variant, x, outputs, levels, sigma_t, model_t=None):
    """UniP (predictor) or UniC (corrector, with model_t) of `order` from levels[0] to sigma_t
    with the outputs (newest first) at `levels` (EDM sigmas)."""
    x_t = _first_order(x, outputs[0], levels[0], sigma_t, data)
    if predictor and order == 1:
        return x_t
    h = jnp.log(levels[0]) - jnp.log(sigma_t)
    hh = -h if data else h
    count = order - 1
    rks = [(jnp.log(levels[0]) - jnp.log(levels[k])) / h for k in range(1, count + 1)]
    differences = [(outputs[k] - outputs[0]) / rks[k - 1] for k in range(1, count + 1)]
    rks = jnp.stack(rks + [jnp.ones_like(h)])
    b_h, weights = _weights(order, rks, hh, variant, predictor)
    if not predictor:
        differences = differences + [model_t - outputs[0]]
    total = sum(weights[k] * differences[k] for k in range(len(differences)))
    alpha_t, vp_sigma_t = sigma_grid.alpha_sigma_of_sigma("vp", sigma_t)
    return x_t - (alpha_t if data else vp_sigma_t) * b_h * total


def make_unipc_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    order: int = 2,
    variant: str = "bh2",
    predict_x0: bool = True,
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
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
    """UniPC-p with B(h) `variant` in the data (predict_x0) or noise form, num_steps network
    evaluations. The corrector runs at every step i >= 1 except those with i - 1 in
    `disable_corrector` (diffusers' option; (num_steps - 2,) skips the last correction)."""
    common.check_choice(order, ORDERS, option="order of unipc")
    common.check_choice(variant, B_VARIANTS, option="unipc variant (B(h))")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name="unipc", prediction=prediction, convention="multistep",
        round_karras=True, sigmas=sigmas, spacing=spacing, steps_offset=steps_offset, rho=rho,
        final_sigma=final_sigma, time_spacing=time_spacing,
    )  # fmt: skip
    if grid.kind != "vp":
        raise ValueError(f"Sampler 'unipc' runs on VP schedules, got a {grid.kind!r} schedule")
    orders = unipc_orders(num_steps, order, lower_order_final=lower_order_final)
    if float(grid.sigmas[-1]) == 0.0:
        orders[-1] = 1  # lambda = inf at sigma = 0: only the first-order step is defined
    disabled = set(int(i) for i in disable_corrector)
    corrector_orders = np.asarray(
        [0] + [0 if i - 1 in disabled else orders[i - 1] for i in range(1, num_steps)], np.int32
    )
    orders, corrector_orders = jnp.asarray(orders), jnp.asarray(corrector_orders)
    x0_eps_fn = common.make_x0_eps_fn(
        prediction=prediction, variance_type=variance_type, clip_x0=clip_x0,
        thresholding=thresholding,
    )  # fmt: skip

    def predictor(o):
        return lambda x, outputs, levels, sigma_t: _unified_update(
            o, True, predict_x0, variant, x, outputs, levels, sigma_t
        )

    def corrector(o):
        if o == 0:
            return lambda x, x_last, outputs, levels, sigma_t, model_t: x
        return lambda x, x_last, outputs, levels, sigma_t, model_t: _unified_update(
            o, False, predict_x0, variant, x_last, outputs, levels, sigma_t, model_t
        )

    predictors = [predictor(o) for o in range(1, order + 1)]
    correctors = [corrector(o) for o in range(0, order + 1)]

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic

        def step(i, carry):
            x, x_last, outputs, levels = carry  # outputs at levels, newest first
            sigma = grid.sigmas[i]
            alpha, vp_sigma = grid.alpha_sigma(sigma)
            model_t = common.batch_time(grid.model_times[i], x)
            x0, eps = x0_eps_fn(model_fn, x, model_t, alpha, vp_sigma, cond)
            output = x0 if predict_x0 else eps
            x = jax.lax.switch(
                corrector_orders[i], correctors, x, x_last, outputs, levels, sigma, output
            )
            outputs, levels = (output,) + outputs[:-1], (sigma,) + levels[:-1]
            x_next = jax.lax.switch(
                orders[i] - 1, predictors, x, outputs, levels, grid.sigmas[i + 1]
            )
            return x_next, x, outputs, levels

        x = grid.alpha_sigma(grid.sigmas[0])[1] * noise
        history = (jnp.zeros_like(x),) * order, (jnp.ones((), grid.sigmas.dtype),) * order
        x, _, _, _ = jax.lax.fori_loop(0, num_steps, step, (x, x) + history)
        return x, {"nfe": jnp.int32(num_steps)}

    return sample
