"""--mode=sample: `sampling.num_images` samples from the latest checkpoint's EMA parameters.

`sample(config, workdir)` writes `workdir/samples/sample_<step>.npz` ("samples" and, for a
class-conditional model, "labels"; for a text-conditional one "prompts", image n's the prompt
n % P of `sampling.prompts`) and a PNG of them.
"""

from __future__ import annotations

import io
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax.runs import generate, latent, restore, text_conditioning
from diffusion_jax.runtime import compilation, console, images, parallel, progress, storage


def sample(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    """--mode=sample: `sampling.num_images` samples from the latest checkpoint's EMA params."""
    start = time.monotonic()
    model, state, step = restore.restore_for_inference(config, workdir)
    params = restore.inference_params(state, config)
    decode = latent.decoder_for(config, state, parallel.make_mesh())
    generate_fn = compilation.CompiledTogether(
        jax.jit(
            generate.make_generate_fn(
                config, model, count=config.sampling.batch_size, decode=decode
            )
        ),
        "generate",
    )
    samples, labels = generate.draw_samples(config, generate_fn, params)
    directory = storage.as_path(workdir) / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples} if labels is None else {"samples": samples, "labels": labels}
    if text_conditioning.uses_text(config):
        prompts = tuple(config.sampling.prompts)
        arrays["prompts"] = np.asarray([prompts[n % len(prompts)] for n in range(len(samples))])
    arrays_path = directory / f"sample_{step}.npz"
    encoded = io.BytesIO()
    np.savez(encoded, **arrays)
    storage.write_bytes(arrays_path, encoded.getvalue())
    path = images.write_samples(directory, f"sample_{step}", samples)
    logging.info("Wrote %d samples of step %d to %s", len(samples), step, path)
    if jax.process_index() == 0:
        seconds = time.monotonic() - start
        console.print_summary(
            f"sampling finished: {len(samples)} samples of the checkpoint of step {step} "
            f"({config.sampling.sampler}, {config.sampling.num_steps} steps) in "
            f"{progress.format_duration(seconds)}",
            [("arrays", arrays_path), ("picture", path)],
        )
    return path
