"""The benchmark's command line: flags to `BenchOptions`, the run, its table and JSON.

    python -m diffusion_jax.bench --config configs/cifar10.py --batch_size 16 --dtype float32
    python -m diffusion_jax.bench --config configs/cifar10.py --compare diffusers \
        --out bench.json
    python -m diffusion_jax.bench --config configs/digits.py --tiny \
        --log_to=/tmp/bench_local,gs://BUCKET/bench --out gs://BUCKET/bench.json
    python -m diffusion_jax.bench --model sd15_unet --compare diffusers --out sd15_unet.json
    python -m diffusion_jax.bench --model sd_vae --compare diffusers --out sd_vae.json
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import models
from diffusion_jax.bench import latent_run, op_profile
from diffusion_jax.bench.options import COMPARE, MODELS, SAMPLERS, BenchOptions
from diffusion_jax.bench.run import format_table, run_benchmark
from diffusion_jax.bench.runners import shrink_to_tiny
from diffusion_jax.runtime import host_memory, storage
from diffusion_jax.training import train_step as train_step_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10.py (--model config only)."
)
flags.DEFINE_enum(
    "model",
    "config",
    list(MODELS),
    "config: train and sample the model of --config; sd15_unet: SD 1.5's U-Net (a step and "
    "whole generation loops); sd_vae: SD's autoencoder (encode, decode). Random weights.",
)
flags.DEFINE_integer("prompts", 1, "sd15_unet: prompts per batch (U-Net batch: 2 x prompts).")
flags.DEFINE_integer("latent_size", 64, "sd15_unet: latent height and width (64: 512 px).")
flags.DEFINE_integer("text_tokens", 77, "sd15_unet: text states per prompt.")
flags.DEFINE_integer("generation_steps", 25, "sd15_unet: steps of each generation loop.")
flags.DEFINE_integer("image_size", 256, "sd_vae: image height and width.")
flags.DEFINE_integer("vae_batch_size", 1, "sd_vae: images per encode / decode call.")
flags.DEFINE_integer("batch_size", 16, "Training batch size (global).")
flags.DEFINE_enum("dtype", "float32", list(models.COMPUTE_DTYPES), "Compute dtype of the model.")
flags.DEFINE_enum("compare", "none", list(COMPARE), "Also run diffusers' UNet2DModel (PyTorch).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for the MFU (0: known table).")
flags.DEFINE_list("steps", ["20", "50"], "Sampler step counts.")
flags.DEFINE_list("samplers", list(SAMPLERS), "Samplers to time.")
flags.DEFINE_integer("sample_batch_size", 0, "Images per sampling batch (0: --batch_size).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of the train step (median reported).")
flags.DEFINE_integer("sample_repeats", 3, "Timed repetitions of each sampler.")
flags.DEFINE_integer("warmup", 4, "Untimed train steps before timing.")
flags.DEFINE_integer("sample_warmup", 1, "Untimed calls of each sampler before timing.")
flags.DEFINE_bool("ynn_convolutions", False, "XLA:CPU: keep YNNPACK convolutions (its default).")
flags.DEFINE_integer("torch_threads", 0, "PyTorch threads (0: the cores JAX uses).")
flags.DEFINE_enum(
    "torch_device", "auto", ["auto", "cpu", "cuda"], "diffusers' device (auto: where ours runs)."
)
flags.DEFINE_enum(
    "skip_with",
    "cond",
    list(train_step_lib.SKIP_FORMS),
    "Train step: how a non-finite update is skipped.",
)
flags.DEFINE_bool(
    "retain_freed_memory",
    True,
    "Keep freed host memory in the process, CPU programs in the calling thread (host_memory);"
    " --noretain_freed_memory: glibc's and JAX's defaults (always those with --model sd15_unet"
    " or sd_vae).",
)
flags.DEFINE_integer("profile_steps", 0, "Profile this many train steps per XLA op (0: none).")
flags.DEFINE_string("profile_dir", "/tmp/diffusion_jax_profile", "Where the profile trace goes.")
flags.DEFINE_bool(
    "tiny",
    False,
    "Benchmark the tiny U-Net of configs/models.py instead (--model sd15_unet, sd_vae: their "
    "architectures at tiny widths).",
)
flags.DEFINE_list(
    "log_to",
    [],
    "Workdirs (local, gs://BUCKET/DIR) to time the train step against with its scalars logged "
    "there every step (bench/logging_cost.py).",
)
flags.DEFINE_string("out", "bench.json", "Where to write the JSON results (a path or a URL).")


def options_from_flags() -> BenchOptions:
    return BenchOptions(
        batch_size=FLAGS.batch_size,
        dtype=FLAGS.dtype,
        steps=tuple(int(s) for s in FLAGS.steps),
        samplers=tuple(FLAGS.samplers),
        sample_batch_size=FLAGS.sample_batch_size or FLAGS.batch_size,
        repeats=FLAGS.repeats,
        sample_repeats=FLAGS.sample_repeats,
        warmup=FLAGS.warmup,
        sample_warmup=FLAGS.sample_warmup,
        compare=FLAGS.compare,
        peak_tflops=FLAGS.peak_tflops,
        ynn_convolutions=FLAGS.ynn_convolutions,
        torch_threads=FLAGS.torch_threads,
        torch_device=FLAGS.torch_device,
        skip_with=FLAGS.skip_with,
        retain_freed_memory=FLAGS.retain_freed_memory,
        profile_steps=FLAGS.profile_steps,
        profile_dir=FLAGS.profile_dir,
        log_to=tuple(FLAGS.log_to),
        model=FLAGS.model,
        tiny=FLAGS.tiny,
        prompts=FLAGS.prompts,
        latent_size=FLAGS.latent_size,
        text_tokens=FLAGS.text_tokens,
        generation_steps=FLAGS.generation_steps,
        image_size=FLAGS.image_size,
        vae_batch_size=FLAGS.vae_batch_size,
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if (FLAGS.config is None) != (FLAGS.model != "config"):
        raise app.UsageError("--config is required with --model config, and only then")
    options = options_from_flags()
    # Before JAX starts its threads, as diffusion_jax.main. Not for the latent models: with
    # glibc so set, diffusers' CPU calls of the tiny SD U-Net took 20-70x as long
    # (docs/benchmarks.md), which would flatter our ratio.
    if options.retain_freed_memory and options.model == "config":
        host_memory.retain_freed_memory()
    if options.compare != "none":  # before JAX's GPU client exists: it would take 75% of the
        # GPU's memory up front, leaving PyTorch, in the same process, the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if options.model == "config":
        config = shrink_to_tiny(FLAGS.config) if FLAGS.tiny else FLAGS.config
        results = run_benchmark(config, options)
        print(format_table(results))
    else:
        results = latent_run.run_latent_benchmark(options)
        print(latent_run.format_latent_table(results))
    if "profile" in results:
        profile = results["profile"]
        print(profile.get("error") or op_profile.format_summary(profile))
    storage.write_text(FLAGS.out, json.dumps(results, indent=2))
    print(f"Results written to {FLAGS.out}")
