"""Linear multistep (LMS) in sigma space (k-diffusion's `sample_lms`).

Adams-Bashforth of order up to 4 on the probability-flow ODE dx/dsigma = d(x, sigma) =
(x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 3) on a non-uniform grid: the slope is the
Lagrange polynomial through the last `order` slopes, integrated exactly over [sigma_i,
sigma_{i+1}] (Hairer, Norsett & Wanner, Sec. III.5). The weights depend only on the grid, so
they are computed once on the host by quadrature (scipy.integrate.quad, as diffusers'
LMSDiscreteScheduler does) and the loop is one weighted sum per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

from diffusion_jax.samplers import common, sigma_grid

MAX_ORDER = 4


def lms_weights(sigmas: np.ndarray, order: int) -> np.ndarray:
    """[N, order] weights: step i adds sum_j w[i, j] d_{i-j}; the first steps use lower orders
    (min(i + 1, order) slopes), the missing weights are 0."""
    sigmas = np.asarray(sigmas, np.float64)
    num_steps = sigmas.shape[0] - 1
    weights = np.zeros((num_steps, order))
    for i in range(num_steps):
        step_order = min(i + 1, order)
        nodes = sigmas[i - np.arange(step_order)]
        for j in range(step_order):

            def basis(tau, j=j, nodes=nodes):
                others = np.delete(nodes, j)
                return np.prod((tau - others) / (nodes[j] - others))

            weights[i, j] = scipy.integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]
    return weights


def make_lms_sampler(
    schedule,
    *,
    num_steps: int,
    prediction: str = "eps",
    order: int = MAX_ORDER,
    sigmas: str = "schedule",
    spacing: str | None = None,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    time_spacing: str = "log_snr",
    clip_x0: bool = False,
    variance_type: str = "fixed_small",
) -> common.SampleFn:
    """LMS of `order` (1-4) on the shared grid (diffusers' LMSDiscreteScheduler). NFE:
    num_steps."""
    common.check_choice(order, tuple(range(1, MAX_ORDER + 1)), option="order of lms")
    grid = sigma_grid.checked_grid(
        schedule, num_steps, name="lms", prediction=prediction, sigmas=sigmas, spacing=spacing,
        steps_offset=steps_offset, rho=rho, final_sigma=final_sigma, time_spacing=time_spacing,
    )  # fmt: skip
    weights = jnp.asarray(lms_weights(np.asarray(grid.sigmas), order), jnp.float32)
    denoise = sigma_grid.make_denoiser(
        grid,
        common.make_x0_eps_fn(prediction=prediction, variance_type=variance_type, clip_x0=clip_x0),
    )

    def sample(model_fn, noise, rng, cond=None):
        del rng  # deterministic

        def step(i, carry):
            x, slopes = carry  # slopes [order, B, ...], newest first
            sigma = grid.sigmas[i]
            slope = (x - denoise(model_fn, x, sigma, grid.model_times[i], cond)) / sigma
            slopes = jnp.concatenate([slope[None], slopes[:-1]])
            w = weights[i].reshape((-1,) + (1,) * x.ndim)
            return x + jnp.sum(w * slopes, axis=0), slopes

        x = grid.sigmas[0] * noise
        slopes = jnp.zeros((order,) + x.shape, x.dtype)
        x, _ = jax.lax.fori_loop(0, num_steps, step, (x, slopes))
        x0 = sigma_grid.unscaled(grid, x)
        return x0, {"nfe": jnp.int32(num_steps)}

    return sample
