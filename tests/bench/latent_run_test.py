"""Tests of the latent-diffusion benchmark (`--model sd15_unet`, `--model sd_vae`): each runs
end to end at tiny widths and writes its rows; against diffusers, both sides hold the same
weights (the parameter counts agree, the outputs agree to float32 rounding) and the ratios are
positive finite numbers. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from diffusion_jax.bench import latent_run
from diffusion_jax.bench.options import BenchOptions

TINY = dict(tiny=True, repeats=1, warmup=1, sample_repeats=1, sample_warmup=1)
UNET_TINY = dict(TINY, latent_size=8, text_tokens=5, generation_steps=2)
VAE_TINY = dict(TINY, image_size=16)


def _assert_timed(entry: dict, *, compared: bool) -> None:
    """A row: positive times for each side; against diffusers a positive finite ratio and
    outputs that agree to float32 rounding (the same weights, the same network)."""
    sides = ("ours", "diffusers") if compared else ("ours",)
    for side in sides:
        assert entry[side]["median_s"] > 0 and all(t > 0 for t in entry[side]["times_s"])
    assert entry["ours"]["max_abs"] > 0  # perturbed weights: no identically zero output
    if compared:
        assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0
        assert entry["max_abs_diff"] < 1e-4 * max(1.0, entry["ours"]["max_abs"])
    else:
        assert "ratio" not in entry and "diffusers" not in entry


def _assert_unet_rows(results: dict, *, compared: bool) -> None:
    assert results["model"] == {
        "name": "sd15_unet", "size": "tiny", "params": results["model"]["params"], "batch": 2,
        "latent_shape": [8, 8, 4], "text_shape": [5, 32],
    }  # fmt: skip
    _assert_timed(results["unet_step"], compared=compared)
    assert set(results["generation"]) == {"ddim_2", "dpm_solver++_2"}
    for entry in results["generation"].values():
        _assert_timed(entry, compared=compared)
    assert set(results["compile"]) == {"unet_step", "ddim_2", "dpm_solver++_2"}
    assert all(seconds["wall_s"] > 0 for seconds in results["compile"].values())
    assert results["memory"]["peak_bytes"] > 0


def test_sd15_unet_tiny_against_diffusers_writes_its_rows():
    pytest.importorskip("torch", reason="--compare diffusers needs the [torch] extra")
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    options = BenchOptions(model="sd15_unet", compare="diffusers", **UNET_TINY)
    results = latent_run.run_latent_benchmark(options)
    _assert_unet_rows(results, compared=True)
    assert results["diffusers"]["params"] == results["model"]["params"]
    table = latent_run.format_latent_table(results)
    assert "unet step" in table and "dpm_solver++_2 loop" in table


def test_sd_vae_tiny_against_diffusers_writes_its_rows():
    pytest.importorskip("torch", reason="--compare diffusers needs the [torch] extra")
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    options = BenchOptions(model="sd_vae", compare="diffusers", **VAE_TINY)
    results = latent_run.run_latent_benchmark(options)
    assert results["model"]["encode_input_shape"] == [1, 16, 16, 3]
    assert results["model"]["decode_input_shape"] == [1, 8, 8, 4]  # f = 2 at tiny widths
    assert results["diffusers"]["params"] == results["model"]["params"]
    for part in ("encode", "decode"):
        _assert_timed(results[f"vae_{part}"], compared=True)
    assert set(results["compile"]) == {"vae_encode", "vae_decode"}
    assert "vae decode" in latent_run.format_latent_table(results)


def test_full_sizes_are_sd15_and_sd_presets_without_allocating_them():
    from diffusion_jax.bench import latent_runners
    from diffusion_jax.models import autoencoders, conditional_unet

    full = BenchOptions(model="sd15_unet")
    assert latent_runners.unet_config(full) == conditional_unet.PRESETS["sd15"]
    assert latent_runners.vae_config(full) == autoencoders.PRESETS["sd"]
    assert (full.prompts, full.latent_size, full.text_tokens) == (1, 64, 77)
    assert (full.generation_steps, full.image_size, full.vae_batch_size) == (25, 256, 1)


def test_bad_latent_options_name_the_option():
    with pytest.raises(ValueError, match="--model"):
        latent_run.run_latent_benchmark(BenchOptions(model="sdxl_unet"))
    with pytest.raises(ValueError, match="--compare"):
        latent_run.run_latent_benchmark(BenchOptions(model="sd_vae", compare="tensorflow"))
    with pytest.raises(ValueError, match="--samplers.*no diffusers scheduler"):
        latent_run.run_latent_benchmark(BenchOptions(model="sd15_unet", samplers=("nope",)))


def _bench(*flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # 1 device
    command = [sys.executable, "-m", "diffusion_jax.bench", *flags]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_cli_sd15_unet_tiny_writes_json_of_ours_alone(tmp_path):
    """The entry point's flags reach the latent benchmark; without --compare only our rows."""
    out = tmp_path / "sd15_unet.json"
    done = _bench(
        "--model", "sd15_unet", "--tiny", "--latent_size", "8", "--text_tokens", "5",
        "--generation_steps", "2", "--repeats", "1", "--warmup", "1", "--sample_repeats", "1",
        "--sample_warmup", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unet step" in done.stdout and "ddim_2 loop" in done.stdout
    results = json.loads(out.read_text())
    _assert_unet_rows(results, compared=False)
    assert results["environment"]["options"]["model"] == "sd15_unet"


def test_cli_takes_config_only_with_model_config():
    done = _bench("--model", "sd_vae", "--config", "configs/cifar10.py", timeout=120)
    assert done.returncode != 0 and "--config is required with --model config" in done.stderr
    done = _bench("--model", "config", timeout=120)
    assert done.returncode != 0 and "--config is required with --model config" in done.stderr
