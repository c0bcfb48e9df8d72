"""Tests of the benchmark: it runs end to end on the tiny U-Net and writes its JSON, and
diffusers' counterpart of our U-Net has exactly our parameter count. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import pytest

from configs import cifar10
from configs import models as model_presets
from diffusion_jax import models
from diffusion_jax.bench import measure, runners
from diffusion_jax.bench import run as bench_run
from diffusion_jax.bench.options import BenchOptions


def _param_count(model_config) -> int:
    model = models.build_model(model_config)
    shapes = jax.eval_shape(
        lambda key: models.init_params(model, model_config, key), jax.random.PRNGKey(0)
    )
    return models.count_params(shapes)


def _assert_positive_timings(summary: dict) -> None:
    assert summary["median_s"] > 0 and summary["items_per_s"] > 0
    assert all(t > 0 for t in summary["times_s"])


def test_interleaved_times_alternates_and_counts_calls():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = measure.interleaved_times(fns, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_peak_tflops_table_and_override():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    cpu = types.SimpleNamespace(device_kind="cpu")
    assert measure.peak_tflops(h100, "bfloat16") == 989.0
    assert measure.peak_tflops(h100, "float32") == 495.0  # TF32: JAX's default precision
    assert measure.peak_tflops(cpu, "float32") is None
    assert measure.peak_tflops(cpu, "float32", override=0.5) == 0.5
    kinds = {  # device_kind as JAX names them
        "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0, "TPU v5 lite": 197.0,
        "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v4": 275.0,
    }  # fmt: skip
    for kind, peak in kinds.items():
        device = types.SimpleNamespace(device_kind=kind)
        assert measure.peak_tflops(device, "bfloat16") == peak, kind


def test_flops_per_step_are_the_whole_steps_on_eight_devices():
    """XLA's count of a compiled sharded step is one device's share; the model FLOPs (and the
    MFU's numerator) are the whole step's: 8 shares here."""
    config = runners.shrink_to_tiny(cifar10.get_config())
    config.model.conv_algorithm = "direct"
    options = BenchOptions(batch_size=8)
    _, info = runners.make_train_runner(config, options)
    assert info["devices"] == 8
    per_device = info["compiled_flops_per_step"]
    # Within 10%: the optimized program counts a few more operations than the lowered one.
    assert info["flops_per_step"] == pytest.approx(8 * per_device, rel=0.1)
    config.parallel.strategy = "pmap"
    with pytest.raises(ValueError, match="parallel.strategy='pmap'.*allowed: 'data', 'fsdp'"):
        runners.make_train_runner(config, options)


def test_memory_stats_on_cpu_is_host_resident_memory():
    memory = measure.memory_stats(jax.devices()[0])
    assert memory["kind"] == "host_rss" and memory["peak_bytes"] > 10 * 2**20


def test_bad_options_name_the_option():
    config = cifar10.get_config()
    with pytest.raises(ValueError, match="--compare"):
        bench_run.run_benchmark(config, BenchOptions(compare="tensorflow"))
    with pytest.raises(ValueError, match="--samplers"):
        bench_run.run_benchmark(config, BenchOptions(samplers=("heun",)))


HAS_TORCH = all(importlib.util.find_spec(name) for name in ("torch", "diffusers"))


@pytest.mark.slow
def test_cli_on_tiny_model_writes_json(tmp_path):
    """One run of the entry point, against diffusers where the [torch] extra is installed."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "diffusion_jax.bench", "--config", "configs/cifar10.py", "--tiny",
        "--batch_size", "8", "--steps", "2", "--samplers", "ddim,dpm_solver++",
        "--sample_batch_size", "2", "--repeats", "1", "--sample_repeats", "1", "--warmup", "0",
        "--sample_warmup", "0", "--profile_steps", "1", "--profile_dir", str(tmp_path / "trace"),
        "--out", str(out),
    ] + (["--compare", "diffusers"] if HAS_TORCH else [])  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # 1 device
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train img/s" in done.stdout
    results = json.loads(out.read_text())
    assert set(results) >= {"environment", "train", "sampling", "compile", "memory"}
    on_cpu = jax.default_backend() == "cpu"  # float32 on a CPU: Winograd ("auto")
    assert results["environment"]["conv_algorithm"] == ("winograd" if on_cpu else "direct")
    ours = results["train"]["ours"]
    _assert_positive_timings(ours)
    assert ours["params"] == _param_count(runners.shrink_to_tiny(cifar10.get_config()).model)
    assert ours["flops_per_step"] > 0 and ours["compile"]["wall_s"] > 0
    # The model's FLOPs are those of direct convolutions; Winograd's step needs fewer.
    assert (ours["compiled_flops_per_step"] < ours["flops_per_step"]) == on_cpu
    assert set(results["compile"]) == {"train_step", "ddim_2", "dpm_solver++_2"}
    assert set(results["sampling"]) == {"ddim_2", "dpm_solver++_2"}
    for entry in results["sampling"].values():
        _assert_positive_timings(entry["ours"])
        assert entry["ours"]["nfe"] == 2
    assert results["memory"]["peak_bytes"] > 0
    profile = results["profile"]  # --profile_steps 1: our train step per XLA operation
    assert profile["steps"] == 1 and profile["total_ms_per_step"] > 0 and profile["ops"]
    assert profile["wall_ms_per_step"] > 0
    assert "op profile (1 steps" in done.stdout
    if HAS_TORCH:  # --compare diffusers: same network, timed in the same process
        assert results["environment"]["xla_preallocate"] == "false"  # room for PyTorch
        assert results["diffusers"]["params"] == ours["params"]
        _assert_positive_timings(results["train"]["diffusers"])
        _assert_positive_timings(results["sampling"]["ddim_2"]["diffusers"])
        assert results["train"]["ratio"] > 0 and results["sampling"]["ddim_2"]["ratio"] > 0


def test_diffusers_unet_of_ddpm_cifar10_has_the_published_parameter_count():
    pytest.importorskip("torch", reason="--compare diffusers needs the [torch] extra")
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    from diffusion_jax.bench import torch_side as bench_torch

    config = model_presets.ddpm_cifar10()
    unet = bench_torch.build_diffusers_unet(config)
    assert bench_torch.count_torch_params(unet) == 35_746_307 == _param_count(config)


def test_diffusers_comparison_rejects_models_it_cannot_mirror():
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    from diffusion_jax.bench import torch_side as bench_torch

    config = model_presets.tiny()
    config.resblock_updown = True
    with pytest.raises(ValueError, match="model.resblock_updown"):
        bench_torch.diffusers_unet_kwargs(config)
    with pytest.raises(ValueError, match="model.name"):
        bench_torch.diffusers_unet_kwargs(model_presets.dit("S/2"))


def test_diffusers_side_runs_where_ours_runs():
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    import torch

    from diffusion_jax.bench import torch_side as bench_torch

    assert bench_torch.torch_device("auto", "cpu") == "cpu"
    assert bench_torch.torch_device("cpu", "gpu") == "cpu"
    expected_on_gpu = "cuda" if torch.cuda.is_available() else "cpu"
    assert bench_torch.torch_device("auto", "gpu") == expected_on_gpu
    with pytest.raises(ValueError, match="--torch_device"):
        bench_torch.torch_device("mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--torch_device=cuda"):
            bench_torch.torch_device("cuda", "gpu")


def test_diffusers_bfloat16_runs_its_network_in_bfloat16():
    """`--dtype bfloat16` compares like with like: diffusers' convolutions and products in
    bfloat16 (autocast), its weights float32; the output within bfloat16's rounding of the
    float32 one."""
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    import torch

    from diffusion_jax.bench import torch_side as bench_torch

    unet = bench_torch.build_diffusers_unet(model_presets.tiny()).eval()  # no dropout
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.inference_mode():
        exact = unet(x, t).sample
        with bench_torch.autocast("cpu", "bfloat16"):
            rounded = unet(x, t).sample
        with bench_torch.autocast("cpu", "float32"):
            same = unet(x, t).sample
    assert exact.dtype == same.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(exact, same)
    error = (rounded.float() - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.05  # bfloat16 keeps 8 significant bits
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def test_diffusers_side_of_a_class_conditional_model_is_given_labels():
    """cifar10_cond's U-Net has class embeddings in both frameworks: diffusers' must be fed
    labels in training and sampling, as ours is (it refuses to run without)."""
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    from diffusion_jax.bench import torch_side as bench_torch

    config = model_presets.tiny()
    config.num_classes = 10
    unet = bench_torch.build_diffusers_unet(config)
    assert bench_torch.count_torch_params(unet) == _param_count(config)
    betas = bench_torch.betas_of(cifar10.get_config().diffusion)
    train_step = bench_torch.make_train_runner(
        unet, batch_size=2, betas=betas, learning_rate=1e-4, grad_clip_norm=1.0, ema_decay=0.9
    )
    assert train_step() > 0
    sample = bench_torch.make_ddim_runner(
        unet, batch_size=2, num_steps=2, betas=betas, clip_sample=True
    )
    assert sample().shape == (2, 3, config.image_size, config.image_size)
