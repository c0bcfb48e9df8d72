"""Schedules against the values of ../shared/REFERENCE.md, computed from the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import schedules

REFERENCE_STEPS = [0, 100, 300, 500, 700, 999]
# As printed in REFERENCE.md: each value is compared at the precision it is printed with.
REFERENCE_ALPHAS_CUMPROD = {
    "linear": ["0.9999", "0.895142", "0.394011", "0.077797", "0.006868", "4.0358e-05"],
    "cosine": ["0.999959", "0.971576", "0.785632", "0.492285", "0.201869", "2.4288e-09"],
    "quadratic": ["0.9999", "0.971176", "0.736641", "0.331275", "0.066734", "7.3341e-04"],
}


def _round_like(value: float, printed: str) -> float:
    """Round `value` to the decimal places of `printed` (in its own notation)."""
    if "e" in printed:
        mantissa, exponent = printed.split("e")
        decimals = len(mantissa.split(".")[1])
        return round(value / 10 ** int(exponent), decimals) * 10 ** int(exponent)
    return round(value, len(printed.split(".")[1]))


REFERENCE_BETA_RANGE = {
    "linear": (1e-4, 0.02),
    "cosine": (4.1284e-05, 0.999),
    "quadratic": (1e-4, 0.02),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_ALPHAS_CUMPROD))
def test_alphas_cumprod_match_reference_table(name):
    alphas_cumprod = np.cumprod(1.0 - schedules.get_betas(name, 1000))
    for step, printed in zip(REFERENCE_STEPS, REFERENCE_ALPHAS_CUMPROD[name]):
        rounded = _round_like(float(alphas_cumprod[step]), printed)
        assert rounded == pytest.approx(float(printed), rel=1e-9), (step, alphas_cumprod[step])


@pytest.mark.parametrize("name", sorted(REFERENCE_BETA_RANGE))
def test_beta_endpoints(name):
    betas = schedules.get_betas(name, 1000)
    np.testing.assert_allclose([betas.min(), betas.max()], REFERENCE_BETA_RANGE[name], rtol=1e-4)


def test_linear_is_exactly_linspace_at_1000_steps():
    np.testing.assert_array_equal(
        schedules.get_betas("linear", 1000), np.linspace(1e-4, 0.02, 1000)
    )


def test_cosine_matches_its_definition_to_1e6():
    t = np.arange(1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = f[1:] / f[0]
    betas = schedules.cosine_betas(1000)
    unclipped = betas < 0.999
    np.testing.assert_allclose(np.cumprod(1 - betas)[unclipped], expected[unclipped], rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("num_timesteps", [50, 1000, 4000])
def test_alphas_cumprod_strictly_decreasing_and_betas_valid(name, num_timesteps):
    betas = schedules.get_betas(name, num_timesteps)
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert np.all(np.diff(alphas_cumprod) < 0)
    assert np.all((betas > 0) & (betas < 1))


def test_sigmoid_endpoints():
    betas = schedules.sigmoid_betas(1000)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(betas[0], 1e-4 + (0.02 - 1e-4) * sigmoid(-6.0))
    np.testing.assert_allclose(betas[-1], 1e-4 + (0.02 - 1e-4) * sigmoid(6.0))


def test_zero_terminal_snr_rescaling():
    betas = schedules.get_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    sqrt_before = np.sqrt(np.cumprod(1 - betas))
    sqrt_after = np.sqrt(np.cumprod(1 - rescaled))
    assert sqrt_after[-1] == pytest.approx(0.0, abs=1e-12)
    assert sqrt_after[0] == pytest.approx(sqrt_before[0], rel=1e-12)
    # An affine map of sqrt(alpha_bar): second differences stay proportional.
    scale = (sqrt_after[0] - sqrt_after[-1]) / (sqrt_before[0] - sqrt_before[-1])
    np.testing.assert_allclose(
        np.diff(sqrt_after), scale * np.diff(sqrt_before), rtol=1e-8, atol=1e-14
    )
    assert rescaled[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_spaced_timesteps_are_valid_for_every_step_count(spacing):
    """K distinct increasing steps in [0, T-1] for every K <= T (trailing's float stride once
    gave T=1000, K=61 a 62nd step, -1)."""
    for num_timesteps in (*range(1, 130), 1000, 4000):
        for num_steps in range(1, min(num_timesteps, 1000) + 1):
            steps = schedules.spaced_timesteps(num_timesteps, num_steps, spacing)
            assert len(steps) == num_steps, (num_timesteps, num_steps)
            assert np.all(np.diff(steps) > 0), (num_timesteps, num_steps)
            assert steps.min() >= 0 and steps.max() <= num_timesteps - 1
            if spacing == "trailing":
                assert steps[-1] == num_timesteps - 1


def test_trailing_spacing_counts_from_the_end_in_strides_of_t_over_k():
    """t_i = round(T - i T / K) - 1 for i = 0..K-1 (Lin et al. 2024, Table 2)."""
    for num_timesteps, num_steps in ((1000, 61), (1000, 103), (1000, 7), (4000, 61)):
        expected = [
            round(num_timesteps - i * num_timesteps / num_steps) - 1 for i in range(num_steps)
        ]
        np.testing.assert_array_equal(
            schedules.spaced_timesteps(num_timesteps, num_steps, "trailing"), expected[::-1]
        )


def test_spacings_known_values():
    np.testing.assert_array_equal(
        schedules.spaced_timesteps(1000, 4, "leading"), [0, 250, 500, 750]
    )
    np.testing.assert_array_equal(
        schedules.spaced_timesteps(1000, 4, "trailing"), [249, 499, 749, 999]
    )
    np.testing.assert_array_equal(
        schedules.spaced_timesteps(1000, 4, "linspace"), [0, 333, 666, 999]
    )
    for spacing in schedules.SPACINGS:  # one step starts from the noise
        np.testing.assert_array_equal(schedules.spaced_timesteps(1000, 1, spacing), [999])


def test_respaced_betas_keep_alphas_cumprod_at_kept_steps():
    betas = schedules.get_betas("cosine", 4000)
    steps = schedules.spaced_timesteps(4000, 100, "linspace")
    respaced = schedules.respace_betas(betas, steps)
    np.testing.assert_allclose(np.cumprod(1 - respaced), np.cumprod(1 - betas)[steps], rtol=1e-9)


def test_vp_log_snr_matches_the_sde_marginal():
    t = jnp.linspace(1e-3, 1.0, 17)
    log_alpha_sq = -(0.1 * t + 0.5 * (20.0 - 0.1) * t**2)
    alpha_sq = np.exp(np.asarray(log_alpha_sq, np.float64))
    expected = np.log(alpha_sq / (1 - alpha_sq))
    np.testing.assert_allclose(schedules.vp_log_snr(t), expected, rtol=1e-4)


def test_cosine_log_snr_endpoints_and_untruncated_form():
    log_snr = schedules.get_log_snr_fn("cosine", log_snr_min=-15.0, log_snr_max=15.0)
    np.testing.assert_allclose(log_snr(jnp.array([0.0, 1.0])), [15.0, -15.0], rtol=1e-4)
    # Untruncated, alpha = cos(pi t / 2), sigma = sin(pi t / 2).
    wide = schedules.get_log_snr_fn("cosine", log_snr_min=-60.0, log_snr_max=60.0)
    t = jnp.array([0.25, 0.5, 0.75])
    alpha, sigma = schedules.alpha_sigma_from_log_snr(wide(t))
    np.testing.assert_allclose(alpha, np.cos(np.pi * t / 2), rtol=1e-4)
    np.testing.assert_allclose(sigma, np.sin(np.pi * t / 2), rtol=1e-4)


def test_ve_log_snr_and_alpha_sigma_identity():
    t = jnp.linspace(0.0, 1.0, 5)
    sigma_ve = schedules.ve_sigma(t, sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(np.asarray(sigma_ve)[[0, -1]], [0.01, 50.0], rtol=1e-5)
    alpha, sigma = schedules.alpha_sigma_from_log_snr(schedules.ve_log_snr(t))
    # x0 + sigma_ve eps scaled by alpha is the VP process with sigma / alpha = sigma_ve.
    np.testing.assert_allclose(sigma / alpha, sigma_ve, rtol=1e-4)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)


def test_continuous_schedules_are_jittable_and_vmappable():
    for name in schedules.LOG_SNR_SCHEDULES:
        fn = schedules.get_log_snr_fn(name)
        t = jnp.linspace(0.01, 0.99, 8)
        np.testing.assert_allclose(jax.jit(jax.vmap(fn))(t), fn(t), rtol=1e-6)
        assert np.all(np.diff(np.asarray(fn(t))) < 0), name


def test_karras_sigmas_eq5():
    sigmas = schedules.karras_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert len(sigmas) == 19 and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[[0, 17]], [80.0, 0.002], rtol=1e-10)
    assert np.all(np.diff(sigmas) < 0)
    i = 9
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[i], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedules.get_betas("linearr", 1000), "allowed"),
        (lambda: schedules.get_betas("linear", 0), "num_timesteps"),
        (lambda: schedules.get_betas("linear", 10), r"num_timesteps=10 is too few"),
        (lambda: schedules.check_betas(np.array([0.1, 0.0, 0.2])), r"\(0, 1\)"),
        (lambda: schedules.check_betas(np.array([0.1, 1.2])), r"\(0, 1\)"),
        (lambda: schedules.spaced_timesteps(100, 101), "num_steps"),
        (lambda: schedules.spaced_timesteps(100, 10, "uniform"), "allowed"),
        (lambda: schedules.get_log_snr_fn("subvp"), "allowed"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_too_few_steps_for_the_scaled_linear_schedule_are_named():
    """1000 / T scaling makes the last beta 20 / T: T = 20 would be a zero-SNR end unasked."""
    with pytest.raises(ValueError, match=r"num_timesteps=20 .*allowed: num_timesteps > 20"):
        schedules.get_betas("linear", 20)
    assert schedules.get_betas("linear", 21)[-1] == pytest.approx(20 / 21)
