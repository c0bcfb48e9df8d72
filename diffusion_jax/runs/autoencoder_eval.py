"""--mode=eval and --mode=sample of an autoencoder run: how well the latest checkpoint
reconstructs the held-out split.

    report = evaluate(config, workdir)   # WORKDIR/eval/step_<step>_reconstruction.json
    path = reconstruct(config, workdir)  # WORKDIR/reconstructions/step_<step>.png

The report has the mean PSNR and SSIM (`evaluation.reconstruction`) of every image of
`data.eval_split` (the last batch padded, its padding dropped) and the Frechet distance
between the reconstructions and the inputs in the feature space of `eval.extractor` (the
digits classifier for digits, "fd_digits"; the FID Inception otherwise: rFID).
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import data
from diffusion_jax.evaluation import metrics, reconstruction
from diffusion_jax.runs import autoencoder, restore, validate
from diffusion_jax.runs import evaluate as diffusion_eval
from diffusion_jax.runtime import console, images, parallel, storage
from diffusion_jax.training import optimizer


def restore_autoencoder(config: ml_collections.ConfigDict, workdir: str):
    """(networks, params of `sampling.ema_index`, step) of the latest checkpoint."""
    validate.check_loop(config)
    networks = autoencoder.build_networks(config)
    tx, _ = optimizer.make_optimizer(config.optim, num_steps=config.training.num_steps)
    create_fn = autoencoder.make_create_fn(config, networks, tx)
    state, step = restore.restore_latest_state(config, workdir, create_fn)
    return networks, restore.inference_params(state, config), step


def reconstruct(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    """The grid of `sampling.num_images` test images above their reconstructions."""
    networks, params, step = restore_autoencoder(config, workdir)
    inputs = autoencoder.test_images(config, config.sampling.num_images)
    outputs = np.asarray(jax.jit(autoencoder.make_reconstruct_fn(networks))(params, inputs))
    path = storage.as_path(workdir) / "reconstructions" / f"step_{step:07d}.png"
    if jax.process_index() == 0:
        images.write_png(path, autoencoder.reconstruction_grid(inputs, np.clip(outputs, -1, 1)))
        console.print_summary(f"reconstructions of the checkpoint of step {step}", [("grid", path)])
    return path


def _reconstruct_split(config, networks, params):
    """(inputs, reconstructions, PSNR, SSIM) of every image of data.eval_split (this
    process's rows, gathered over processes in order)."""
    reconstruct = autoencoder.make_reconstruct_fn(networks)

    @jax.jit
    def batch_metrics(params, x):
        x_hat = reconstruct(params, x)
        return x_hat, reconstruction.psnr(x, x_hat), reconstruction.ssim(x, x_hat)

    iterator = data.make_eval_dataset(
        config.data,
        split=config.data.eval_split,
        seed=config.eval.seed,
        global_batch_size=config.eval.batch_size,
        pad_last_batch=True,
    )
    rows = []
    try:
        for index, batch in enumerate(iterator):
            x = np.asarray(batch["x"])
            positions = data.shard_positions(
                index,
                global_batch_size=config.eval.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            rows.append((positions, x, *map(np.asarray, batch_metrics(params, x))))
    finally:
        iterator.close()
    positions, *columns = [parallel.gather_rows(np.concatenate(c)) for c in zip(*rows, strict=True)]
    order = np.argsort(positions, kind="stable")[: iterator.num_examples]
    return [column[order] for column in columns]


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The reconstruction report of the latest checkpoint (module docstring)."""
    networks, params, step = restore_autoencoder(config, workdir)
    inputs, outputs, psnr, ssim = _reconstruct_split(config, networks, params)
    extractor = diffusion_eval.make_extractor(config, workdir)
    real = extractor.features_and_logits(inputs)[0]
    fake = extractor.features_and_logits(np.clip(outputs, -1, 1))[0]
    frechet = metrics.frechet_distance(
        real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)
    )
    report = {
        "step": step,
        "params": diffusion_eval.params_name(config),
        "split": config.data.eval_split,
        "num_images": len(inputs),
        "psnr": float(np.mean(psnr)),
        "ssim": float(np.mean(ssim)),
        extractor.frechet_name: float(frechet),
        "extractor": {"name": extractor.name, "feature_dim": extractor.feature_dim},
    }
    path = storage.as_path(workdir) / diffusion_eval.EVAL_DIR / f"step_{step}_reconstruction.json"
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(report, indent=2) + "\n")
        console.print_summary(
            f"reconstruction of {len(inputs)} {config.data.eval_split} images at step {step}",
            [
                ("PSNR", f"{report['psnr']:.2f} dB"),
                ("SSIM", f"{report['ssim']:.4f}"),
                (extractor.frechet_name, f"{frechet:.4g}"),
                ("report", path),
            ],
        )
    logging.info("Reconstruction report of step %d: %s", step, report)
    return report
