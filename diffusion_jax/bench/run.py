"""The benchmark: training throughput, sampling speed, compile times and memory, optionally
against diffusers (PyTorch) on the same machine in the same process.

    python -m diffusion_jax.bench --config configs/cifar10.py --batch_size 16 --dtype float32
    python -m diffusion_jax.bench --config configs/cifar10.py --compare diffusers \
        --out bench.json

Training: the compiled step of `diffusion_jax.training.train_step` (loss, gradient, clipping, Adam,
EMA) on a synthetic batch; images/s from the median of timed repetitions after warm-up,
each blocking on the result. Model FLOPs per step come from XLA's cost analysis of the
step with direct convolutions; MFU = FLOPs / time / peak, with the peak from `--peak_tflops`
or the table `PEAK_TFLOPS` for the detected device. Sampling: DDIM and DPM-Solver++ at
each step count of `--steps`, one compiled program each; image-NFE/s = batch * NFE / time.
Timed callables (ours and theirs) are interleaved repetition by repetition, so that a
machine shared with other work slows both alike and the ratios stay meaningful. diffusers
runs on the device ours runs on (`--torch_device`), in the same compute dtype. See
docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import jax
import ml_collections

from diffusion_jax import models
from diffusion_jax.bench import logging_cost, op_profile
from diffusion_jax.bench.measure import environment, interleaved_times, memory_stats, peak_tflops
from diffusion_jax.bench.options import COMPARE, SAMPLERS, BenchOptions
from diffusion_jax.bench.runners import (
    diffusers_side,
    make_sample_runner,
    make_train_runner,
    model_config,
)


def _summary(times: list[float], items: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "times_s": times, "items_per_s": items / median}


def bench_training(config, options: BenchOptions, runner, unet=None) -> dict:
    """Images/s, FLOPs, MFU and compile time of our train step (`runner`, from
    `make_train_runner`) and of diffusers' (`unet`, when given)."""
    run, info = runner
    fns = {"ours": run}
    if unet is not None:
        from diffusion_jax.bench import torch_side as bench_torch

        fns["diffusers"] = bench_torch.make_train_runner(
            unet,
            batch_size=options.batch_size,
            betas=bench_torch.betas_of(config.diffusion),
            learning_rate=config.optim.learning_rate,
            grad_clip_norm=config.optim.grad_clip_norm,
            ema_decay=config.training.ema_decays[0],
            dtype=options.dtype,
            seed=options.seed,
        )
    times = interleaved_times(fns, repeats=options.repeats, warmup=options.warmup)
    result = {name: _summary(t, options.batch_size) for name, t in times.items()}
    ours = result["ours"]
    ours.update(info)
    ours["tflops_per_s"] = info["flops_per_step"] / ours["median_s"] / 1e12  # all devices
    peak = peak_tflops(jax.devices()[0], options.dtype, options.peak_tflops)
    ours["peak_tflops"] = peak  # one device's
    ours["mfu"] = ours["tflops_per_s"] / (peak * info["devices"]) if peak else None
    if unet is not None:
        result["ratio"] = ours["items_per_s"] / result["diffusers"]["items_per_s"]
    return result


def bench_sampling(config, options: BenchOptions, unet=None) -> dict:
    """Image-NFE/s, wall time and compile time of each sampler at each step count."""
    model = models.build_model(config.model)
    params = models.init_params(model, config.model, jax.random.PRNGKey(options.seed))
    results = {}
    for name in options.samplers:
        for num_steps in options.steps:
            run, info = make_sample_runner(config, model, params, name, num_steps, options)
            fns = {"ours": run}
            if unet is not None and name == "ddim":
                from diffusion_jax.bench import torch_side as bench_torch

                fns["diffusers"] = bench_torch.make_ddim_runner(
                    unet,
                    batch_size=options.sample_batch_size,
                    num_steps=num_steps,
                    betas=bench_torch.betas_of(config.diffusion),
                    clip_sample=config.sampling.clip_x0,
                    dtype=options.dtype,
                    seed=options.seed,
                )
            times = interleaved_times(
                fns, repeats=options.sample_repeats, warmup=options.sample_warmup
            )
            nfe = {"ours": info["nfe"], "diffusers": num_steps}
            entry = {
                key: _summary(t, options.sample_batch_size * nfe[key]) for key, t in times.items()
            }
            entry["ours"].update(info)
            if "diffusers" in entry:
                entry["ratio"] = entry["ours"]["items_per_s"] / entry["diffusers"]["items_per_s"]
            results[f"{name}_{num_steps}"] = entry
    return results


def run_benchmark(config: ml_collections.ConfigDict, options: BenchOptions) -> dict:
    """Every measurement of the benchmark, as a JSON-ready dict."""
    if options.compare not in COMPARE:
        raise ValueError(f"--compare={options.compare!r}; allowed: {COMPARE}")
    unknown = [name for name in options.samplers if name not in SAMPLERS]
    if unknown:
        raise ValueError(f"--samplers={unknown}; allowed: {SAMPLERS}")
    config = model_config(config, options.dtype)
    results = {"environment": environment(options)}
    if config.model.name == "unet":  # the 3x3 convolutions: "winograd" or "direct"
        results["environment"]["conv_algorithm"] = models.conv_algorithm(config.model)
    runner = make_train_runner(config, options)
    unet = None
    if options.compare == "diffusers":
        unet, results["diffusers"] = diffusers_side(config, options, runner[1]["params"])
    results["train"] = bench_training(config, options, runner, unet)
    if options.log_to:
        results["logging"] = logging_cost.bench_logging(runner[0], options)
    if options.profile_steps > 0:
        results["profile"] = profile_train_step(runner[0], options)
    results["sampling"] = bench_sampling(config, options, unet)
    compile_times = {key: entry["ours"]["compile"] for key, entry in results["sampling"].items()}
    results["compile"] = {"train_step": results["train"]["ours"]["compile"], **compile_times}
    results["memory"] = memory_stats(jax.devices()[0])
    if unet is not None:
        from diffusion_jax.bench import torch_side as bench_torch

        results["diffusers"]["peak_bytes"] = bench_torch.peak_memory_bytes(
            results["diffusers"]["device"]
        )
    return results


def profile_train_step(run: Callable[[], object], options: BenchOptions) -> dict:
    """Our train step's time per XLA operation (`op_profile`), or the error that stopped the
    profiler (a lent GPU's profiler may be unavailable: the timings above still count)."""
    try:
        trace, seconds = op_profile.capture(run, options.profile_steps, options.profile_dir)
        return op_profile.summarize(trace, options.profile_steps, wall_s=seconds)
    except Exception as error:  # reported in the results instead of losing them
        return {"error": f"{type(error).__name__}: {error}"}


def format_table(results: dict) -> str:
    """The console table: one row per measurement, ours / diffusers / ratio."""
    rows = [("measurement", "ours", "diffusers", "ours/theirs")]
    train = results["train"]
    ours = train["ours"]
    theirs = train.get("diffusers", {})
    rows.append(("train img/s", ours["items_per_s"], theirs.get("items_per_s"), train.get("ratio")))
    rows.append(("train step TFLOP (model)", ours["flops_per_step"] / 1e12, None, None))
    rows.append(("... as compiled (XLA)", ours["compiled_flops_per_step"] / 1e12, None, None))
    rows.append(("train TFLOP/s", ours["tflops_per_s"], None, None))
    rows.append(("train MFU", ours["mfu"], None, None))
    for name, entry in results.get("logging", {}).items():
        where = "unlogged" if name == "none" else f"logged to {name}"
        rows.append((f"train step s, {where}", entry["median_s"], None, entry["ratio"]))
    for key, entry in results["sampling"].items():
        their = entry.get("diffusers", {})
        ratio = entry.get("ratio")
        rows.append(
            (f"{key} image-NFE/s", entry["ours"]["items_per_s"], their.get("items_per_s"), ratio)
        )
        rows.append((f"{key} batch wall s", entry["ours"]["median_s"], their.get("median_s"), None))
    for key, seconds in results["compile"].items():
        rows.append((f"compile {key} s (wall)", seconds["wall_s"], None, None))
        rows.append((f"compile {key} s (CPU)", seconds["cpu_s"], None, None))
    memory = results["memory"]
    theirs_peak = results.get("diffusers", {}).get("peak_bytes")
    rows.append(
        (
            f"peak memory GiB ({memory['kind']})",
            memory["peak_bytes"] / 2**30,
            None if theirs_peak is None else theirs_peak / 2**30,
            None,
        )
    )
    if "diffusers" in results:
        rows.append(("diffusers device", None, results["diffusers"]["device"], None))
    cell = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.4g}")
    widths = [max(len(cell(row[i])) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell(v).ljust(w) if i == 0 else cell(v).rjust(w)
            for i, (v, w) in enumerate(zip(row, widths))
        )
        for row in rows
    )
