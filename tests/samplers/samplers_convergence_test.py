"""Convergence orders of the deterministic samplers on the exact Gaussian-mixture model.

The reference is an independent float64 solution of the same probability-flow ODE from the
same x_T, integrated in log-SNR with diffrax's 8th-order Dormand-Prince at tight tolerances;
it uses the mixture's closed-form denoiser directly, not the samplers' schedule code.
Samplers that end with a denoising step (DDIM, EDM: the last step goes to sigma = 0) are
compared with the reference's x0_hat at t_min.

`python -m tests.samplers_convergence_test` prints the error-vs-NFE table to docs/samplers.md.
"""

from __future__ import annotations

import sys

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import gaussian_mixture, noise_schedule
from diffusion_jax.diffusion import process as process_lib

NUM_POINTS = 128
# (label, registry name, options, endpoint: "denoised" or "t_min", NFE -> num_steps)
SAMPLER_ROWS = [
    ("DDIM", "ddim", {}, "denoised", lambda nfe: nfe),
    ("DPM-Solver-1", "dpm_solver", {"order": 1}, "t_min", lambda nfe: nfe),
    ("DPM-Solver-2", "dpm_solver", {"order": 2}, "t_min", lambda nfe: nfe),
    ("DPM-Solver-3", "dpm_solver", {"order": 3}, "t_min", lambda nfe: nfe),
    ("DPM-Solver++(2S)", "dpm_solver++", {"multistep": False}, "t_min", lambda nfe: nfe),
    ("DPM-Solver++(2M)", "dpm_solver++", {}, "t_min", lambda nfe: nfe),
    ("DPM-Solver++(3M)", "dpm_solver++", {"order": 3}, "t_min", lambda nfe: nfe),
    ("DPM-Solver(2M), noise", "dpm_solver", {"order": 2, "multistep": True}, "t_min", lambda n: n),
    ("EDM Euler", "edm_euler", {}, "denoised", lambda nfe: nfe),
    ("EDM Heun", "edm_heun", {}, "denoised", lambda nfe: (nfe + 1) // 2),
]
SIGMA_MIN = {"final_sigma": "sigma_min"}  # end at t_min, where the reference is compared
# (label, registry name, options, NFE -> num_steps, schedule: "continuous" view or "discrete")
GRID_ROWS = [
    ("Euler (k-diffusion)", "euler", SIGMA_MIN, lambda nfe: nfe, "continuous"),
    ("Heun (k-diffusion)", "heun", SIGMA_MIN, lambda nfe: max(nfe // 2, 1), "continuous"),
    ("LMS-4", "lms", SIGMA_MIN, lambda nfe: nfe, "continuous"),
    ("DPM-2", "dpm2", SIGMA_MIN, lambda nfe: max(nfe // 2, 1), "continuous"),
    ("UniPC-2 bh2", "unipc", {**SIGMA_MIN, "order": 2}, lambda nfe: nfe, "continuous"),
    ("UniPC-2 bh1", "unipc", {**SIGMA_MIN, "order": 2, "variant": "bh1"}, lambda n: n,
     "continuous"),
    ("UniPC-3 bh2", "unipc", {**SIGMA_MIN, "order": 3}, lambda nfe: nfe, "continuous"),
    ("UniPC-3 bh2, noise", "unipc", {**SIGMA_MIN, "order": 3, "predict_x0": False},
     lambda nfe: nfe, "continuous"),
    ("DEIS-2", "deis", {"order": 2}, lambda nfe: nfe, "continuous"),
    ("DEIS-3", "deis", {"order": 3}, lambda nfe: nfe, "continuous"),
    ("PLMS (skip PRK, trailing)", "pndm", {"skip_prk_steps": True, "spacing": "trailing"},
     lambda nfe: max(nfe - 1, 1), "discrete"),
    ("PNDM (PRK, trailing)", "pndm", {"spacing": "trailing"}, lambda nfe: max(nfe - 9, 4),
     "discrete"),
]  # fmt: skip
FLOW_ROWS = [
    ("Flow Euler", "flow_euler", {}, lambda nfe: nfe),
    ("Flow Heun", "flow_heun", {}, lambda nfe: (nfe + 1) // 2),
]


def discrete_setup():
    """Linear-beta DDPM process (T = 1000), its continuous view and the exact eps model."""
    process = process_lib.make_process("linear", 1000)
    schedule = noise_schedule.DiscreteSchedule(process)
    mixture = gaussian_mixture.example_mixture()

    def alpha_sigma_fn(model_t):
        return schedule.alpha_sigma(schedule.t_from_model_time(model_t))

    model_fn = gaussian_mixture.exact_model_fn(mixture, alpha_sigma_fn, "eps")
    return process, schedule, mixture, model_fn


def start_noise(num_points=NUM_POINTS):
    return jax.random.normal(jax.random.key(42), (num_points, 2))


def _mixture64():
    mixture = gaussian_mixture.example_mixture()
    return gaussian_mixture.GaussianMixture(
        *(np.asarray(a, np.float64) for a in (mixture.weights, mixture.means, mixture.variances))
    )


def _solve64(vector_field, x_start, t0, t1):
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0=t0, t1=t1, dt0=(t1 - t0) / 64,
        y0=x_start, stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=100_000,
    )  # fmt: skip
    return solution.ys[-1]


def vp_reference(schedule, x_start):
    """(x at t_min, x0_hat there) of the VP probability-flow ODE, in float64 and in lambda."""
    ends = schedule.log_snr(jnp.asarray([schedule.t_max, schedule.t_min], jnp.float32))
    with jax.enable_x64(True):
        mixture = _mixture64()
        lambda_start, lambda_end = (float(v) for v in ends)

        def denoise(x, log_snr):
            alpha, sigma = jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))
            batch = jnp.full((x.shape[0],), 1.0)
            score, x0 = mixture.score_and_denoiser(x, alpha * batch, sigma * batch)
            return x0, -sigma * score, alpha, sigma

        def vector_field(log_snr, x, args):  # d alpha / d lambda = alpha sigma^2 / 2, ...
            x0, eps, alpha, sigma = denoise(x, log_snr)
            return 0.5 * alpha * sigma**2 * x0 - 0.5 * sigma * alpha**2 * eps

        x_end = _solve64(vector_field, jnp.asarray(x_start, jnp.float64), lambda_start, lambda_end)
        return np.asarray(x_end), np.asarray(denoise(x_end, lambda_end)[0])


def flow_reference(x_start):
    """x_0 of the rectified-flow ODE dx/dt = E[eps - x0 | x_t], t from 1 to 0, in float64."""
    with jax.enable_x64(True):
        mixture = _mixture64()

        def vector_field(t, x, args):
            batch = jnp.full((x.shape[0],), 1.0)
            score, x0 = mixture.score_and_denoiser(x, (1.0 - t) * batch, t * batch)
            return -t * score - x0

        return np.asarray(_solve64(vector_field, jnp.asarray(x_start, jnp.float64), 1.0, 0.0))


def rms_error(x, reference):
    return float(np.sqrt(np.mean(np.sum((np.asarray(x, np.float64) - reference) ** 2, axis=-1))))


def sampler_errors(name, options, endpoint, nfes, to_steps, setup=None, continuous=False):
    """[(nfe, error)] of one sampler on the discrete process against the VP reference; with
    `continuous`, on its continuous view (DPM-Solver's convention), where the sigma grids are
    log-SNR-uniform and the network's time is consistent with every level."""
    process, schedule, _, model_fn = setup or discrete_setup()
    noise = start_noise()
    x_start = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1] * noise
    reference = vp_reference(schedule, x_start)[0 if endpoint == "t_min" else 1]
    results = []
    for nfe in nfes:
        sample = samplers.make_sampler(
            name, schedule=schedule if continuous else process, num_steps=to_steps(nfe),
            prediction="eps", **options,
        )  # fmt: skip
        x, info = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(0))
        results.append((int(info["nfe"]), rms_error(x, reference)))
    return results


def flow_errors(name, options, nfes, to_steps):
    schedule = noise_schedule.FlowSchedule()
    mixture = gaussian_mixture.example_mixture()
    model_fn = gaussian_mixture.exact_model_fn(
        mixture, lambda t: schedule.alpha_sigma(t), "velocity"
    )
    noise = start_noise()
    reference = flow_reference(noise)
    results = []
    for nfe in nfes:
        sample = samplers.make_sampler(name, schedule=schedule, num_steps=to_steps(nfe), **options)
        x, info = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(0))
        results.append((int(info["nfe"]), rms_error(x, reference)))
    return results


def fitted_order(results):
    """Slope of -log(error) against log(NFE), least squares."""
    nfes, errors = np.asarray(results, np.float64).T
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


# (registry name, options, endpoint, NFE values in the asymptotic range, minimum order)
ORDER_CASES = [
    ("ddim", {}, "denoised", [25, 50, 100, 200], 0.9),
    ("dpm_solver", {"order": 2}, "t_min", [10, 20, 40, 80], 1.8),
    ("dpm_solver", {"order": 3}, "t_min", [9, 15, 24, 36], 2.7),
    ("dpm_solver++", {}, "t_min", [20, 40, 80, 160], 1.8),
    ("dpm_solver++", {"multistep": False}, "t_min", [20, 40, 80, 160], 1.8),
    ("dpm_solver++", {"order": 3}, "t_min", [40, 80, 160], 2.5),
    ("edm_heun", {}, "denoised", [15, 31, 61, 121], 1.8),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, options, endpoint, nfes, minimum", ORDER_CASES)
def test_deterministic_samplers_converge_at_their_order(name, options, endpoint, nfes, minimum):
    to_steps = (lambda nfe: (nfe + 1) // 2) if name == "edm_heun" else (lambda nfe: nfe)
    results = sampler_errors(name, options, endpoint, nfes, to_steps)
    order = fitted_order(results)
    assert order >= minimum, (name, options, results, order)
    assert results[-1][1] < 1e-2


# (registry name, options, NFE values, NFE -> num_steps, minimum order; theory in the comment)
GRID_ORDER_CASES = [
    ("euler", SIGMA_MIN, [40, 80, 160, 320], lambda n: n, 0.9),  # 1
    ("heun", SIGMA_MIN, [20, 40, 80, 160], lambda n: n // 2, 1.8),  # 2
    ("lms", SIGMA_MIN, [20, 40, 80, 160], lambda n: n, 2.5),  # 4
    ("dpm2", SIGMA_MIN, [20, 40, 80, 160], lambda n: n // 2, 1.7),  # 2
    ("unipc", {**SIGMA_MIN, "order": 2}, [20, 40, 80, 160], lambda n: n, 2.0),  # 3
    ("unipc", {**SIGMA_MIN, "order": 2, "variant": "bh1"}, [20, 40, 80, 160], lambda n: n, 2.0),
    ("unipc", {**SIGMA_MIN, "order": 3}, [20, 40, 80, 160], lambda n: n, 2.9),  # 4
    ("unipc", {**SIGMA_MIN, "order": 3, "predict_x0": False}, [20, 40, 80, 160], lambda n: n,
     2.7),
    ("deis", {"order": 2}, [20, 40, 80, 160], lambda n: n, 1.7),  # 2
    ("deis", {"order": 3}, [20, 40, 80, 160], lambda n: n, 2.0),  # 3
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name, options, nfes, to_steps, minimum", GRID_ORDER_CASES)
def test_grid_samplers_converge_at_their_order(name, options, nfes, to_steps, minimum):
    """On the continuous view of the DDPM process (log-SNR-uniform levels, network time
    consistent with each level), ending at t_min, against the float64 reference."""
    results = sampler_errors(name, options, "t_min", nfes, to_steps, continuous=True)
    order = fitted_order(results)
    assert order >= minimum, (name, options, results, order)
    assert results[-1][1] < 1e-2


@pytest.mark.slow
def test_plms_converges_on_trailing_timesteps():
    """PLMS on the DDPM chain with trailing timesteps (its steps then land on the next
    evaluation's timestep): second order here, not Adams-Bashforth's fourth (the pseudo
    transfer step's own error dominates; docs/samplers.md)."""
    options = {"skip_prk_steps": True, "spacing": "trailing"}
    results = sampler_errors("pndm", options, "t_min", [41, 101, 201], lambda n: n - 1)
    assert fitted_order(results) >= 1.7, results
    assert results[-1][1] < 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("name, minimum", [("flow_euler", 0.9), ("flow_heun", 1.8)])
def test_flow_samplers_converge_at_their_order(name, minimum):
    to_steps = (lambda nfe: (nfe + 1) // 2) if name == "flow_heun" else (lambda nfe: nfe)
    results = flow_errors(name, {}, [20, 40, 80, 160], to_steps)
    assert fitted_order(results) >= minimum, results


def test_adaptive_ode_matches_reference_and_counts_evaluations():
    process, schedule, _, model_fn = discrete_setup()
    noise = start_noise(64)
    x_start = schedule.alpha_sigma(jnp.float32(schedule.t_max))[1] * noise
    reference, _ = vp_reference(schedule, x_start)
    calls = []

    def counted_model_fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return model_fn(x, t, cond)

    sample = samplers.make_sampler(
        "ode", schedule=process, num_steps=50, rtol=1e-5, atol=1e-5, prediction="eps"
    )
    x, info = jax.jit(sample, static_argnums=0)(counted_model_fn, noise, jax.random.key(0))
    jax.effects_barrier()
    assert rms_error(x, reference) < 1e-3
    assert int(info["nfe"]) == len(calls)


def test_dpm_solver_plus_plus_2m_at_20_beats_ddim_at_100():
    """True on this mixture with steps uniform in sqrt(t), not with log-SNR-uniform steps
    (2.7e-2 against DDIM's 1.6e-2; see docs/samplers.md)."""
    setup = discrete_setup()
    ddim = sampler_errors("ddim", {}, "denoised", [100], lambda n: n, setup)[0][1]
    options = {"time_spacing": "time_quadratic"}
    dpm = sampler_errors("dpm_solver++", options, "t_min", [20], lambda n: n, setup)[0][1]
    assert dpm < ddim, (dpm, ddim)


def error_table(nfes=(5, 10, 20, 50)) -> str:
    """Markdown table of RMS final-sample error against NFE for every deterministic sampler."""
    header = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [header, "|---" * (len(nfes) + 1) + "|"]
    setup = discrete_setup()
    for label, name, options, endpoint, to_steps in SAMPLER_ROWS:
        results = sampler_errors(name, options, endpoint, nfes, to_steps, setup)
        lines.append(f"| {label} | " + " | ".join(_cell(n, r) for n, r in zip(nfes, results)))
    for label, name, options, to_steps, view in GRID_ROWS:
        results = sampler_errors(
            name, options, "t_min", nfes, to_steps, setup, continuous=view == "continuous"
        )
        lines.append(f"| {label} | " + " | ".join(_cell(n, r) for n, r in zip(nfes, results)))
    for label, name, options, to_steps in FLOW_ROWS:
        results = flow_errors(name, options, nfes, to_steps)
        lines.append(f"| {label} | " + " | ".join(_cell(n, r) for n, r in zip(nfes, results)))
    return "\n".join(line if line.endswith("|") else line + " |" for line in lines)


# (label, registry name, options, NFE -> num_steps) of the stochastic samplers
STOCHASTIC_ROWS = [
    ("DDPM (ancestral)", "ddpm", {}, lambda nfe: nfe),
    ("Euler-Maruyama", "euler_maruyama", {}, lambda nfe: nfe),
    ("EDM Euler, S_churn = 40", "edm_euler", {"s_churn": 40.0}, lambda nfe: nfe),
    ("Euler ancestral", "euler_ancestral", {}, lambda nfe: nfe),
    ("DPM-2 ancestral", "dpm2_ancestral", {}, lambda nfe: (nfe + 1) // 2),
    ("DPM-Solver++ 2M SDE", "dpm_solver++_sde", {}, lambda nfe: nfe),
    ("DPM-Solver++ 3M SDE", "dpm_solver++_sde", {"order": 3}, lambda nfe: nfe),
    ("DPM-Solver++ 2S SDE", "dpm_solver++_2s_sde", {}, lambda nfe: (nfe + 1) // 2),
]
NUM_MOMENT_SAMPLES = 20_000


def moment_error(name, options, num_steps, setup) -> tuple[int, float]:
    """(NFE, ||mean - mean*|| + ||cov - cov*||_F) of NUM_MOMENT_SAMPLES samples against the
    mixture's exact mean and covariance; the sampling error alone is ~0.02 at this size."""
    process, _, mixture, model_fn = setup
    sample = samplers.make_sampler(name, schedule=process, num_steps=num_steps, **options)
    noise = jax.random.normal(jax.random.key(5), (NUM_MOMENT_SAMPLES, 2))
    x, info = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(6))
    x = np.asarray(x, np.float64)
    weights, means = np.asarray(mixture.weights), np.asarray(mixture.means)
    mean = weights @ means
    second = np.einsum("k,kd,ke->de", weights, means, means) + np.diag(
        weights @ np.asarray(mixture.variances)
    )
    covariance = second - np.outer(mean, mean)
    error = np.linalg.norm(x.mean(0) - mean) + np.linalg.norm(np.cov(x.T) - covariance)
    return int(info["nfe"]), float(error)


def moment_table(nfes=(5, 10, 20, 50)) -> str:
    """Markdown table of the moment error against NFE for every stochastic sampler."""
    header = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [header, "|---" * (len(nfes) + 1) + "|"]
    setup = discrete_setup()
    for label, name, options, to_steps in STOCHASTIC_ROWS:
        results = [moment_error(name, options, to_steps(n), setup) for n in nfes]
        lines.append(f"| {label} | " + " | ".join(_cell(n, r) for n, r in zip(nfes, results)))
    return "\n".join(line if line.endswith("|") else line + " |" for line in lines)


def _cell(nfe, result):
    used, error = result
    return f"{error:.2e}" if used == nfe else f"{error:.2e} ({used})"


if __name__ == "__main__":
    print(moment_table() if "--moments" in sys.argv else error_table(), file=sys.stdout)
