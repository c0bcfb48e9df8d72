"""Training objectives: the simple loss and its weightings, the VLB, the hybrid loss of Improved
DDPM, flow matching and the EDM loss.

Each factory fixes its choices and returns a pure
`loss_fn(params, batch, rng, loss_history=None) -> (loss, aux)`, with `aux` holding the
per-example losses and the sampled times. The network is seen through
`apply_fn(params, x_t, network_time, label, rng) -> output` (label None if unconditional).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import parameterization, timestep_sampling, vlb
from diffusion_jax.diffusion import process as process_lib

ApplyFn = Callable[..., jnp.ndarray]
LossFn = Callable[..., tuple[jnp.ndarray, dict]]

LOSS_TYPES = ("simple", "hybrid", "vlb", "flow_matching", "edm")
DISCRETE_LOSSES = ("simple", "hybrid", "vlb")  # losses of the discrete process (its bound exists)
TARGETS = ("eps", "x0", "v")
WEIGHTINGS = ("constant", "snr", "truncated_snr", "min_snr")
FLOW_TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def _check_choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {key} {value!r}; allowed: {list(allowed)}")


def target_weight(
    snr: jnp.ndarray, *, target: str, weighting: str, snr_gamma: float = 5.0
) -> jnp.ndarray:
    """Weight on the squared error of `target` that realises a weighting of the x0 error.

    A target's squared error is a multiple of the x0 error: ||eps - eps_hat||^2 =
    snr ||x0 - x0_hat||^2, ||v - v_hat||^2 = (snr + 1) ||x0 - x0_hat||^2 (Salimans & Ho 2022).
    The x0-space weightings are: "constant" (plain MSE on the target, whatever it is),
    "snr" (snr: L_simple of Ho et al. for eps), "truncated_snr" (max(snr, 1), Salimans & Ho
    2022, Sec. 4) and "min_snr" (min(snr, gamma), Hang et al. 2023, Eq. 10).
    """
    _check_choice(target, TARGETS, "diffusion.target")
    _check_choice(weighting, WEIGHTINGS, "diffusion.loss_weighting")
    if weighting == "constant":
        return jnp.ones_like(snr)
    x0_weight = {
        "snr": snr,
        "truncated_snr": jnp.maximum(snr, 1.0),
        "min_snr": jnp.minimum(snr, snr_gamma),
    }[weighting]
    to_target = {"eps": snr, "x0": jnp.ones_like(snr), "v": snr + 1.0}[target]
    return x0_weight / jnp.maximum(to_target, 1e-20)


def simple_loss(
    process: process_lib.DiffusionProcess,
    prediction: jnp.ndarray,
    x0: jnp.ndarray,
    noise: jnp.ndarray,
    t: jnp.ndarray,
    *,
    target: str = "eps",
    weighting: str = "constant",
    snr_gamma: float = 5.0,
) -> jnp.ndarray:
    """Weighted mean squared error of the prediction of `target` [B] (Eq. 14 of Ho et al.)."""
    alpha, sigma = process_lib.alpha_sigma(process, t, x0.ndim)
    target_value = parameterization.from_x0_eps(x0, noise, alpha, sigma, target)
    # From the float64-computed square roots: 1 - alpha_bar in float32 loses ~1e-3 at small t.
    snr = (process.sqrt_alphas_cumprod[t] / process.sqrt_one_minus_alphas_cumprod[t]) ** 2
    weight = target_weight(snr, target=target, weighting=weighting, snr_gamma=snr_gamma)
    return weight * vlb.mean_over_dims((prediction - target_value) ** 2)


def check_target_at_terminal_snr(target: str, alpha_last: float) -> None:
    """Refuse eps-prediction on a schedule whose last alpha is 0 (zero terminal SNR).

    There x_T is pure noise, the eps target is x_T itself and x0 = (x_T - sigma eps) / alpha is
    undefined: the bound and its hybrid loss are infinite at t = T and SNR weights divide by 0.
    Lin et al. 2024 (Sec. 3.2) train such schedules with v-prediction.
    """
    if target == "eps" and not alpha_last > 0:
        raise ValueError(
            "diffusion.target='eps' cannot train a zero-terminal-SNR schedule "
            "(diffusion.zero_terminal_snr=True: alpha = 0 at the last step, so x0 is undefined "
            "there); allowed targets: 'v', 'x0'"
        )


def make_diffusion_loss_fn(
    process: process_lib.DiffusionProcess,
    apply_fn: ApplyFn,
    *,
    loss_type: str = "simple",
    target: str = "eps",
    weighting: str = "constant",
    snr_gamma: float = 5.0,
    variance_type: str = "fixed_small",
    hybrid_lambda: float = 1e-3,
) -> LossFn:
    """Loss of a discrete process: "simple", "hybrid" or "vlb" (Nichol & Dhariwal 2021, Sec. 3.1).

    hybrid = simple + lambda K L_t with the prediction under a stop-gradient in L_t, so the
    VLB term trains only the variance; vlb = K L_t. K L_t (bits/dim) is an unbiased estimate of
    the whole bound for uniform t. With a `loss_history` (importance sampling, Sec. 3.3) t is
    drawn by importance and each loss reweighted.
    """
    _check_choice(loss_type, ("simple", "hybrid", "vlb"), "diffusion.loss_type")
    _check_choice(target, TARGETS, "diffusion.target")
    check_target_at_terminal_snr(target, float(process.sqrt_alphas_cumprod[-1]))
    process_lib.check_variance_type(variance_type)
    learned = variance_type in ("learned", "learned_range")
    if learned and loss_type == "simple":
        raise ValueError(
            f"diffusion.variance_type={variance_type!r} is learned, so the loss must train it: "
            "diffusion.loss_type must be 'hybrid' or 'vlb', not 'simple'"
        )
    if not learned and loss_type == "hybrid":
        raise ValueError(
            "diffusion.loss_type='hybrid' trains only a learned variance through its VLB term "
            "(the mean sees it under a stop-gradient), so with "
            f"diffusion.variance_type={variance_type!r} it would train as 'simple'; allowed: "
            "variance_type 'learned' or 'learned_range' with 'hybrid', or loss_type 'simple'"
        )

    def loss_fn(params, batch, rng, loss_history=None):
        x0 = batch["x"]
        t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        num_steps = process.num_timesteps
        t, weights = timestep_sampling.sample_timesteps(t_rng, x0.shape[0], num_steps, loss_history)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = process_lib.q_sample(process, x0, t, noise)
        output = apply_fn(
            params, x_t, process_lib.model_time(process, t), batch.get("label"), model_rng
        )
        prediction, variance_values = process_lib.split_output(output, variance_type)
        losses = jnp.zeros(x0.shape[0], jnp.float32)
        if loss_type in ("simple", "hybrid"):
            losses += simple_loss(
                process, prediction, x0, noise, t,
                target=target, weighting=weighting, snr_gamma=snr_gamma,
            )  # fmt: skip
        if loss_type in ("hybrid", "vlb"):
            vlb_prediction = (
                jax.lax.stop_gradient(prediction) if loss_type == "hybrid" else prediction
            )
            vlb_output = (
                jnp.concatenate([vlb_prediction, variance_values], axis=-1)
                if learned
                else vlb_prediction
            )
            bits = vlb.vlb_term_bits(
                process, vlb_output, x0, x_t, t, prediction=target, variance_type=variance_type
            )
            scale = hybrid_lambda if loss_type == "hybrid" else 1.0
            losses += scale * num_steps * bits
        return jnp.mean(weights * losses), {"per_example": losses, "t": t}

    return loss_fn


def make_flow_matching_loss_fn(
    apply_fn: ApplyFn, *, time_distribution: str = "uniform", time_scale: float = 1000.0
) -> LossFn:
    """Rectified flow / conditional flow matching (Liu et al. 2023, Eq. 1; Lipman et al. 2023).

    x_t = (1 - t) x_0 + t eps and the network regresses the velocity u = eps - x_0.
    t is uniform or logit-normal (Esser et al. 2024, Eq. 19); the network sees t * time_scale.
    """
    _check_choice(time_distribution, FLOW_TIME_DISTRIBUTIONS, "diffusion.flow_time_distribution")

    def loss_fn(params, batch, rng, loss_history=None):
        x0 = batch["x"]
        t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        if time_distribution == "uniform":
            t = jax.random.uniform(t_rng, (x0.shape[0],))
        else:
            t = jax.nn.sigmoid(jax.random.normal(t_rng, (x0.shape[0],)))
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        t_b = t.reshape((-1,) + (1,) * (x0.ndim - 1))
        x_t = (1.0 - t_b) * x0 + t_b * noise
        output = apply_fn(params, x_t, t * time_scale, batch.get("label"), model_rng)
        losses = vlb.mean_over_dims((output - (noise - x0)) ** 2)
        return jnp.mean(losses), {"per_example": losses, "t": t}

    return loss_fn


def edm_denoiser(
    apply_fn: ApplyFn, params, x: jnp.ndarray, sigma: jnp.ndarray, label, rng, *, sigma_data: float
) -> jnp.ndarray:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Eq. 7)."""
    sigma_b = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    c_skip, c_out, c_in, c_noise = parameterization.edm_preconditioning(
        sigma_b, sigma_data=sigma_data
    )
    network_output = apply_fn(params, c_in * x, c_noise.reshape(-1), label, rng)
    return c_skip * x + c_out * network_output


def make_edm_loss_fn(
    apply_fn: ApplyFn, *, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2
) -> LossFn:
    """The EDM loss, Eq. 8 and Table 1 of Karras et al. 2022.

    ln sigma ~ N(p_mean, p_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    loss = lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2.
    """

    def loss_fn(params, batch, rng, loss_history=None):
        x0 = batch["x"]
        sigma_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(sigma_rng, (x0.shape[0],)))
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * noise
        denoised = edm_denoiser(
            apply_fn, params, x, sigma, batch.get("label"), model_rng, sigma_data=sigma_data
        )
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        losses = weight * vlb.mean_over_dims((denoised - x0) ** 2)
        return jnp.mean(losses), {"per_example": losses, "t": sigma}

    return loss_fn


def with_label_dropout(loss_fn: LossFn, *, rate: float, null_label: int) -> LossFn:
    """Replace each label by `null_label` with probability `rate`, for classifier-free guidance
    (Ho & Salimans 2022, Algorithm 1)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"diffusion.label_dropout must be in [0, 1], got {rate}")

    def dropped_loss_fn(params, batch, rng, loss_history=None):
        drop_rng, rng = jax.random.split(rng)
        labels = batch["label"]
        drop = jax.random.bernoulli(drop_rng, rate, labels.shape)
        batch = {**batch, "label": jnp.where(drop, null_label, labels)}
        return loss_fn(params, batch, rng, loss_history)

    return dropped_loss_fn
