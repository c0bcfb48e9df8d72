"""--mode=eval: sample quality and likelihood of the latest checkpoint, as JSON beside it.

    python -m diffusion_jax.main --config configs/digits.py --workdir /tmp/digits --mode eval \
        --config.eval.num_steps=10,20,50 --config.eval.etas=0.0,1.0

`evaluate(config, workdir)` restores the latest checkpoint (a checkpoint of another model is
refused with the parameters that differ), takes the parameters of `sampling.ema_index` (an
EMA, or the raw parameters for -1; the JSON names which) and writes
`workdir/eval/step_<step>_<params>.json` with

- "samples": for each `eval.num_steps` x `eval.etas` (etas only for samplers that have one),
  `eval.num_samples` samples of `eval.sampler` and their metrics against `eval.reference_split`
  in the extractor's feature space (the FID Inception for images, the digits classifier for
  digits: "fd_digits" is not FID);
- "prompt_accuracy" (a text-conditional model, `eval.guidance_scales`): the digits
  classifier's accuracy on samples of each class's prompt at each guidance scale
  (`runs.prompt_accuracy`);
- "likelihood": bits/dim on `eval.num_batches` batches of `data.eval_split`: "vlb", the
  discrete variational bound of DDPM (Ho et al. 2020, Eq. 5), and "ode", the probability-flow
  ODE likelihood of uniformly dequantized data (Song et al. 2021, App. D.2), with its NFE.

Sampling is one jit over a mesh of every device of every process, the batch split on its
"data" axis; each process extracts the features of its own rows and the features are then
gathered on every process (`process_allgather`) and put back in the order of one process, so
that a report does not depend on the number of processes. Process 0 writes the file.
"""

from __future__ import annotations

import copy
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import data, samplers
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import sample_quality
from diffusion_jax.runs import generate, latent, prompt_accuracy, restore
from diffusion_jax.runs import likelihood as likelihood_eval
from diffusion_jax.runtime import compilation, console, parallel, progress, storage

EVAL_DIR = "eval"
EXTRACTORS = ("auto", "digits", "inception")


class LocalImages(NamedTuple):
    """This process's images and the position of each in the sequence of all processes'."""

    images: np.ndarray  # [N_local, H, W, C]
    positions: np.ndarray  # [N_local] int


def _check_subset(values, allowed: tuple, option: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{option}={tuple(values)} has {unknown}; allowed: {list(allowed)}")


def check_options(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the first `eval` option that cannot work."""
    evaluation = config.eval
    _check_subset(evaluation.metrics, sample_quality.METRICS, "eval.metrics")
    _check_subset(evaluation.likelihoods, likelihood_eval.LIKELIHOODS, "eval.likelihoods")
    if evaluation.extractor not in EXTRACTORS:
        raise ValueError(f"eval.extractor={evaluation.extractor!r}; allowed: {list(EXTRACTORS)}")
    samplers.get_sampler(evaluation.sampler)
    if evaluation.num_samples < 2:
        raise ValueError(f"eval.num_samples={evaluation.num_samples} must be >= 2")
    sample_quality.check_enough_images(
        evaluation.num_samples, "eval.num_samples", config.eval.metrics
    )
    likelihood_eval.check_options(config)
    prompt_accuracy.check_options(config)


def params_name(config: ml_collections.ConfigDict) -> str:
    """ "ema_<decay>" or "raw": which parameters `sampling.ema_index` selects."""
    index = config.sampling.ema_index
    return "raw" if index == -1 else f"ema_{config.training.ema_decays[index]:g}"


def sampler_settings(config: ml_collections.ConfigDict) -> list[dict]:
    """[{"sampler", "num_steps", "eta"}, ...]: eval.num_steps x eval.etas (eta None if unused)."""
    evaluation = config.eval
    takes_eta = "eta" in samplers.sampler_options(evaluation.sampler)
    etas = tuple(evaluation.etas) if takes_eta else (None,)
    if not evaluation.num_steps or not etas:
        raise ValueError("eval.num_steps and eval.etas must each hold at least one value")
    return [
        {"sampler": evaluation.sampler, "num_steps": int(steps), "eta": eta}
        for steps in evaluation.num_steps
        for eta in etas
    ]


def with_sampler(config: ml_collections.ConfigDict, setting: dict) -> ml_collections.ConfigDict:
    """A copy of the config whose `sampling` section is this setting, at eval.batch_size."""
    variant = copy.deepcopy(config)
    variant.sampling.sampler = setting["sampler"]
    variant.sampling.num_steps = setting["num_steps"]
    if setting["eta"] is not None:
        variant.sampling.eta = float(setting["eta"])
    variant.sampling.batch_size = config.eval.batch_size
    return variant


def place_params(params, mesh, strategy: str):
    """Parameters usable by a jit over `mesh`: as restored for "data" / "fsdp", replicated
    from the host copy for "pmap" (restored onto each process's first device)."""
    if strategy != "pmap":
        return params
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.make_array_from_callback(
            leaf.shape, replicated, lambda index, host=np.asarray(leaf): host[index]
        ),
        params,
    )


def make_sharded_generate(config, model, mesh, setting: dict, decode=None):
    """jit of `generate(params, rng, offset) -> [eval.batch_size, ...]` (samples offset, ...,
    offset + eval.batch_size - 1, decoded by `decode` in a latent run), its rows split over
    the mesh."""
    variant = with_sampler(config, setting)
    generate_fn = generate.make_generate_fn(
        variant, model, count=config.eval.batch_size, decode=decode
    )
    sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    return compilation.CompiledTogether(
        jax.jit(generate_fn, out_shardings=sharding), "eval_generate"
    )


def generate_local_samples(config, model, params, mesh, setting: dict, decode=None) -> LocalImages:
    """This process's rows of eval.num_samples samples, in whole batches of eval.batch_size,
    with their positions in the sequence of all samples (a class-conditional model's sample
    n has label n % K, or `sampling.label`: classes balanced across batches)."""
    generate = make_sharded_generate(config, model, mesh, setting, decode)
    rng = jax.random.fold_in(jax.random.key(config.eval.seed), setting["num_steps"])
    num_batches = -(-config.eval.num_samples // config.eval.batch_size)
    eta = "" if setting["eta"] is None else f", eta {setting['eta']:g}"
    bar = progress.ProgressBar(
        f"evaluation: sampling ({setting['sampler']}, {setting['num_steps']} steps{eta})",
        num_batches * config.eval.batch_size,
        unit="img",
        lines_off_terminal=10,
        enabled=config.training.progress_bar and jax.process_index() == 0,
    )
    images, positions = [], []
    for index in range(num_batches):
        offset = jnp.asarray(index * config.eval.batch_size, jnp.int32)
        batch = generate(params, jax.random.fold_in(rng, index), offset)
        images.append(parallel.local_rows(batch))
        positions.append(index * config.eval.batch_size + parallel.local_row_positions(batch))
        bar.update((index + 1) * config.eval.batch_size)
    bar.close()
    return LocalImages(np.concatenate(images), np.concatenate(positions))


def make_extractor(config: ml_collections.ConfigDict, workdir) -> features_lib.FeatureExtractor:
    """The digits classifier (trained once, cached in workdir/eval) or the FID Inception."""
    kind = config.eval.extractor
    if kind == "auto":
        kind = "digits" if config.data.name == "digits" else "inception"
    if kind == "digits":
        directory = storage.as_path(workdir) / EVAL_DIR
        directory.mkdir(parents=True, exist_ok=True)
        return features_lib.digits_extractor(cache_path=directory / "digits_classifier.npz")
    if not config.eval.inception_weights:
        raise ValueError(
            "eval.inception_weights is empty: FID, KID, IS and precision/recall of images need "
            "the converted FID InceptionV3 weights (.npz, see docs/evaluation.md); set "
            "--config.eval.inception_weights=PATH, or eval.metrics=() for likelihoods only"
        )
    return features_lib.load_inception_extractor(config.eval.inception_weights)


def extract_gathered(extractor, local: LocalImages) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of every process's images, each process extracting its own, in
    the order of `local.positions` (so that order-dependent metrics, KID's subsets and the
    Inception Score's splits, do not depend on the number of processes)."""
    features, logits = extractor.features_and_logits(local.images)
    order = np.argsort(parallel.gather_rows(local.positions), kind="stable")
    return parallel.gather_rows(features)[order], parallel.gather_rows(logits)[order]


def reference_features(config, extractor) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of every image of `eval.reference_split` (unflipped, in order; the
    last batch is padded, and its padding dropped, as are the samples beyond eval.num_samples)."""
    iterator = data.make_eval_dataset(
        config.data,
        split=config.eval.reference_split,
        seed=config.eval.seed,
        global_batch_size=config.eval.batch_size,
        pad_last_batch=True,
    )
    images, positions = [], []
    try:
        for index, batch in enumerate(iterator):
            images.append(np.asarray(batch["x"]))
            positions.append(
                data.shard_positions(
                    index,
                    global_batch_size=config.eval.batch_size,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                )
            )
    finally:
        iterator.close()
    features, logits = extract_gathered(
        extractor, LocalImages(np.concatenate(images), np.concatenate(positions))
    )
    return features[: iterator.num_examples], logits[: iterator.num_examples]


def evaluate_samples(config, workdir, model, params, mesh, decode=None) -> dict:
    """{"extractor", "reference", "samples": [metrics of each sampler setting]}."""
    extractor = make_extractor(config, workdir)
    wanted, dim = config.eval.metrics, extractor.feature_dim
    sample_quality.check_enough_images(config.eval.num_samples, "eval.num_samples", wanted, dim)
    reference = reference_features(config, extractor)
    split = f"eval.reference_split={config.eval.reference_split!r}, images"
    sample_quality.check_enough_images(len(reference[0]), split, wanted, dim)
    report = {
        "extractor": {"name": extractor.name, "feature_dim": extractor.feature_dim},
        "reference": {"split": config.eval.reference_split, "num_images": len(reference[0])},
        "samples": [],
    }
    count = config.eval.num_samples
    for setting in sampler_settings(config):
        local = generate_local_samples(config, model, params, mesh, setting, decode)
        features, logits = extract_gathered(extractor, local)
        result = sample_quality.sample_metrics(
            extractor,
            reference,
            (features[:count], logits[:count]),
            wanted=wanted,
            seed=config.eval.seed,
        )
        report["samples"].append({**setting, **result})
        logging.info("%s: %s", setting, result)
    return report


def evaluate_prompts(config, workdir, model, params, mesh, decode=None) -> list[dict]:
    """`eval.prompt_classifier`'s accuracy on samples of each class's prompt at each of
    `eval.guidance_scales` (`runs.prompt_accuracy`)."""
    classifier_config = copy.deepcopy(config)
    classifier_config.eval.extractor = config.eval.prompt_classifier
    extractor = make_extractor(classifier_config, workdir)
    results = prompt_accuracy.prompt_accuracy(
        config,
        lambda variant, setting: generate_local_samples(
            variant, model, params, mesh, setting, decode
        ),
        lambda local: extract_gathered(extractor, local)[1],
        sampler_settings(config),
    )
    for result in results:
        logging.info("Prompt accuracy: %s", result)
    return results


def write_report(workdir: str | os.PathLike, report: dict) -> epath.Path:
    directory = storage.as_path(workdir) / EVAL_DIR
    path = directory / f"step_{report['step']}_{report['params']}.json"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        storage.write_text(path, json.dumps(report, indent=2) + "\n")
    return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Metrics of the latest checkpoint in `workdir`; returns the report it writes."""
    check_options(config)
    parallel.check_batch_size(config.eval.batch_size, jax.device_count(), option="eval.batch_size")
    model, state, step = restore.restore_for_inference(config, workdir)
    mesh = parallel.make_mesh()
    params = place_params(restore.inference_params(state, config), mesh, config.parallel.strategy)
    report = {
        "step": step,
        "params": params_name(config),
        "checkpoint": str(storage.absolute(workdir) / "checkpoints" / str(step)),
        "likelihood": {},
    }
    decode = latent.decoder_for(config, state, mesh)
    if config.eval.metrics:
        report.update(evaluate_samples(config, workdir, model, params, mesh, decode))
    if config.eval.guidance_scales:
        report["prompt_accuracy"] = evaluate_prompts(config, workdir, model, params, mesh, decode)
    for name in config.eval.likelihoods:
        report["likelihood"][name] = likelihood_eval.evaluate_likelihood(
            name, config, model, params, mesh
        )
        logging.info("Step %d, likelihood %s: %s", step, name, report["likelihood"][name])
    path = write_report(workdir, report)
    logging.info("Wrote the evaluation of step %d (%s) to %s", step, report["params"], path)
    if jax.process_index() == 0:
        show_summary(report, path)
    return report


def show_summary(report: dict, path: os.PathLike) -> None:
    """The report's figures, one row per sampler setting and likelihood."""
    rows = []
    for entry in report.get("samples", []):
        eta = "" if entry["eta"] is None else f", eta {entry['eta']:g}"
        name = f"{entry['sampler']} {entry['num_steps']}{eta}"
        figures = {k: v for k, v in entry.items() if isinstance(v, float)}
        rows.append((name, ", ".join(f"{k} {v:.4g}" for k, v in figures.items())))
    for entry in report.get("prompt_accuracy", []):
        name = f"{entry['prompt_template']!r} at guidance {entry['guidance_scale']:g}"
        rows.append((name, f"accuracy {entry['accuracy']:.3f}"))
    for name, result in report["likelihood"].items():
        rows.append(
            (name, f"{result['bits_per_dim']:.4f} bits/dim (+- {result['standard_error']:.2g})")
        )
    rows.append(("report", path))
    console.print_summary(
        f"evaluation of the checkpoint of step {report['step']} ({report['params']})", rows
    )
