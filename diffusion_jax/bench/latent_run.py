"""The latent-diffusion benchmark: Stable Diffusion 1.5's U-Net (`--model sd15_unet`) and the
SD autoencoder (`--model sd_vae`) with random weights, ours against diffusers' in the same
process on the same machine (`--compare diffusers`).

    python -m diffusion_jax.bench --model sd15_unet --compare diffusers --out sd15_unet.json
    python -m diffusion_jax.bench --model sd_vae --compare diffusers --out sd_vae.json
    python -m diffusion_jax.bench --model sd15_unet --tiny --latent_size 16 --text_tokens 8

sd15_unet: one U-Net call at --latent_size (64: 512 x 512 images) on a batch of 2 x
--prompts (the guided batch: unconditional and conditional branches) with --text_tokens
(77) text states, then for each of --samplers a whole guided generation loop of
--generation_steps (25) steps, ours one compiled program, diffusers' the loop of its
StableDiffusionPipeline with the matching scheduler. sd_vae: the encoder (images to the
posterior's moments) and the decoder (latents to images) at --image_size (256), batch
--vae_batch_size (1). Both sides hold the same weights (`latent_torch`); calls take turns
(`measure.interleaved_times`) and `ratio` is diffusers' median time / ours (> 1: ours is
faster), with the largest difference of the two outputs beside it. `--tiny`: the same
architectures at tiny widths (`latent_runners.TINY_UNET`, `TINY_VAE`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax.bench import latent_runners as ours
from diffusion_jax.bench.measure import environment, interleaved_times, memory_stats
from diffusion_jax.bench.options import COMPARE, BenchOptions
from diffusion_jax.models import autoencoders, conditional_unet
from diffusion_jax.text_to_image import scheduling

LATENT_MODELS = ("sd15_unet", "sd_vae")


def compare_calls(fns: dict[str, Callable[[], np.ndarray]], *, repeats: int, warmup: int):
    """Median and every time of each callable (taking turns; the first call of each, kept to
    compare the outputs, counts as one warm-up), diffusers' time / ours as `ratio`, and the
    largest absolute difference of diffusers' output from ours beside ours' largest value."""
    outputs = {name: fn() for name, fn in fns.items()}
    times = interleaved_times(fns, repeats=repeats, warmup=max(warmup - 1, 0))
    entry = {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}
    entry["ours"]["max_abs"] = float(np.max(np.abs(outputs["ours"])))
    if "diffusers" in fns:
        entry["ratio"] = entry["diffusers"]["median_s"] / entry["ours"]["median_s"]
        difference = np.abs(outputs["diffusers"] - outputs["ours"])
        entry["max_abs_diff"] = float(np.max(difference))
    return entry


def _torch_device(options: BenchOptions) -> tuple[str, dict]:
    """diffusers' device (`torch_side.torch_device`), threads and precision, and its info."""
    import torch

    from diffusion_jax.bench import torch_side

    device = torch_side.torch_device(options.torch_device, jax.default_backend())
    torch.set_num_threads(options.torch_threads or len(os.sched_getaffinity(0)))
    torch_side.set_precision(device)
    return device, torch_side.torch_info(device)


def _theirs(model_class_name: str, config, params, options: BenchOptions, info: dict):
    """diffusers' model holding our `params`, after checking the parameter counts."""
    import diffusers

    from diffusion_jax.bench import latent_torch, torch_side

    model = latent_torch.load_diffusers_model(
        getattr(diffusers, model_class_name), config, params, device=info["device"],
        dtype=options.dtype,
    )  # fmt: skip
    info["params"] = torch_side.count_torch_params(model)
    ours_count = int(sum(x.size for x in jax.tree.leaves(params)))
    if info["params"] != ours_count:
        raise ValueError(
            f"diffusers' {model_class_name} has {info['params']} parameters, ours {ours_count}"
        )
    return model


def bench_unet(options: BenchOptions, results: dict) -> None:
    """results["unet_step"] and results["generation"][f"{sampler}_{steps}"] (module docstring)."""
    config = ours.unet_config(options)
    params = ours.random_params(conditional_unet.init_params, config, options.seed)
    inputs = ours.latent_inputs(config, options)
    step, step_info = ours.make_unet_step_runner(config, params, inputs, options)
    results["model"].update(params=step_info["params"], batch=int(inputs.latents.shape[0]),
                            latent_shape=list(inputs.latents.shape[1:]),
                            text_shape=list(inputs.text.shape[1:]))  # fmt: skip
    unet = None
    if "diffusers" in results:
        from diffusion_jax.bench import latent_torch

        info = results["diffusers"]
        unet = _theirs("UNet2DConditionModel", config, params, options, info)
        theirs = dict(device=info["device"], dtype=options.dtype)
    fns = {"ours": step}
    if unet is not None:
        fns["diffusers"] = latent_torch.make_unet_step_runner(unet, inputs, **theirs)
    results["unet_step"] = compare_calls(fns, repeats=options.repeats, warmup=options.warmup)
    results["compile"] = {"unet_step": step_info["compile"]}
    results["generation"] = {}
    for name in options.samplers:
        loop, loop_info = ours.make_generation_runner(config, params, inputs, name, options)
        fns = {"ours": loop}
        if unet is not None:
            fns["diffusers"] = latent_torch.make_generation_runner(
                unet, inputs, name, num_steps=options.generation_steps,
                prompts=options.prompts, **theirs,
            )  # fmt: skip
        key = f"{name}_{options.generation_steps}"
        entry = compare_calls(fns, repeats=options.sample_repeats, warmup=options.sample_warmup)
        entry["ours"]["sampler"] = loop_info["sampler"]
        results["generation"][key] = entry
        results["compile"][key] = loop_info["compile"]


def bench_vae(options: BenchOptions, results: dict) -> None:
    """results["vae_encode"] and results["vae_decode"] (module docstring)."""
    config = ours.vae_config(options)
    params = ours.random_params(autoencoders.init_params, config, options.seed)
    images = ours.image_inputs(config, options)
    inputs = {"encode": images, "decode": ours.latents_of_images(config, images)}
    vae = None
    if "diffusers" in results:
        from diffusion_jax.bench import latent_torch

        info = results["diffusers"]
        vae = _theirs("AutoencoderKL", config, params, options, info)
    results["compile"] = {}
    for part, x in inputs.items():
        run, info = ours.make_vae_runner(config, params, x, part, options)
        results["model"]["params"] = info["params"]
        results["model"][f"{part}_input_shape"] = list(x.shape)
        fns = {"ours": run}
        if vae is not None:
            fns["diffusers"] = latent_torch.make_vae_runner(
                vae, x, part, device=results["diffusers"]["device"], dtype=options.dtype
            )
        results[f"vae_{part}"] = compare_calls(fns, repeats=options.repeats, warmup=options.warmup)
        results["compile"][f"vae_{part}"] = info["compile"]


def run_latent_benchmark(options: BenchOptions) -> dict:
    """Every measurement of `--model sd15_unet` or `--model sd_vae`, as a JSON-ready dict."""
    if options.model not in LATENT_MODELS:
        raise ValueError(f"--model={options.model!r}; allowed: {LATENT_MODELS}")
    if options.compare not in COMPARE:
        raise ValueError(f"--compare={options.compare!r}; allowed: {COMPARE}")
    unknown = [name for name in options.samplers if name not in scheduling.DIFFUSERS_CLASSES]
    if options.model == "sd15_unet" and unknown:
        allowed = sorted(scheduling.DIFFUSERS_CLASSES)
        raise ValueError(f"--samplers={unknown}: no diffusers scheduler; allowed: {allowed}")
    size = "tiny" if options.tiny else "full"
    results = {"environment": environment(options), "model": {"name": options.model,
                                                             "size": size}}  # fmt: skip
    if options.compare == "diffusers":
        results["diffusers"] = _torch_device(options)[1]
    (bench_unet if options.model == "sd15_unet" else bench_vae)(options, results)
    results["memory"] = memory_stats(jax.devices()[0])
    if "diffusers" in results:
        from diffusion_jax.bench import torch_side

        device = results["diffusers"]["device"]
        results["diffusers"]["peak_bytes"] = torch_side.peak_memory_bytes(device)
    return results


def format_latent_table(results: dict) -> str:
    """The console table: one row per measurement, seconds ours / diffusers, their ratio."""
    rows = [("measurement", "ours s", "diffusers s", "theirs/ours", "max |diff|")]
    timed = [("unet step", results.get("unet_step"))]
    timed += [(f"{key} loop", entry) for key, entry in results.get("generation", {}).items()]
    timed += [(f"vae {part}", results.get(f"vae_{part}")) for part in ("encode", "decode")]
    for name, entry in timed:
        if entry is not None:
            theirs = entry.get("diffusers", {}).get("median_s")
            rows.append((name, entry["ours"]["median_s"], theirs, entry.get("ratio"),
                         entry.get("max_abs_diff")))  # fmt: skip
    for key, seconds in results["compile"].items():
        rows.append((f"compile {key} s (wall)", seconds["wall_s"], None, None, None))
    memory, theirs = results["memory"], results.get("diffusers", {}).get("peak_bytes")
    gib = None if theirs is None else theirs / 2**30
    rows.append((f"peak memory GiB ({memory['kind']})", memory["peak_bytes"] / 2**30, gib,
                 None, None))  # fmt: skip
    model = results["model"]
    rows.append(("model", f"{model['name']} ({model['size']})", None, None, None))
    rows.append(("parameters", model["params"], results.get("diffusers", {}).get("params"),
                 None, None))  # fmt: skip
    cell = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.4g}")
    widths = [max(len(cell(row[i])) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell(v).ljust(w) if i == 0 else cell(v).rjust(w)
                  for i, (v, w) in enumerate(zip(row, widths)))
        for row in rows
    )  # fmt: skip
