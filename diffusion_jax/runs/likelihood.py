"""Bits/dim of a trained network on `data.eval_split`: two different quantities, named.

- "vlb": the discrete variational bound of the DDPM chain (Ho et al. 2020, Eq. 5; every one
  of the T terms evaluated), with the decoder `eval.decoder` ("discretized": the 8-bit bins
  of Eq. 13). An upper bound on -log2 P(x) / D; what DDPM and Improved DDPM report.
- "ode": the probability-flow ODE likelihood (Song et al. 2021, App. D.2) of the data
  uniformly dequantized on `eval.num_bins` levels (0: continuous data, no dequantization),
  the divergence by Hutchinson's estimator (`eval.ode_divergence`); what score_sde reports
  (3.28 bits/dim for DDPM's CIFAR-10 weights, against 3.70-3.75 for the bound). Its NFE is
  reported too.

Each is averaged over `eval.num_batches` global batches of `eval.batch_size` examples, split
over the mesh's devices; class-conditional models are evaluated at the data's labels
(log p(x | y)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import data
from diffusion_jax.diffusion import losses
from diffusion_jax.evaluation import ode_likelihood
from diffusion_jax.runs import build, generate
from diffusion_jax.runtime import compilation, parallel, progress

LIKELIHOODS = ("vlb", "ode")
DESCRIPTIONS = {
    "vlb": "discrete variational bound of the diffusion chain (Ho et al. 2020, Eq. 5), "
    "decoder {decoder}; an upper bound on -log2 P(x) / D",
    "ode": "probability-flow ODE likelihood (Song et al. 2021, App. D.2), {dequantization}, "
    "divergence {divergence}, adaptive tsit5 rtol {rtol:g} atol {atol:g}",
}


def check_options(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming an `eval` likelihood option that cannot work."""
    evaluation = config.eval
    discrete = config.diffusion.loss_type in losses.DISCRETE_LOSSES
    if "vlb" in evaluation.likelihoods and not discrete:
        raise ValueError(
            f"eval.likelihoods has 'vlb', the bound of the discrete chain, undefined for "
            f"diffusion.loss_type={config.diffusion.loss_type!r} (allowed with it: 'ode'); "
            f"'vlb' needs one of {list(losses.DISCRETE_LOSSES)}"
        )
    if evaluation.num_bins == 1 or evaluation.num_bins < 0:
        raise ValueError(
            f"eval.num_bins={evaluation.num_bins}; allowed: 0 (continuous data) or >= 2 levels"
        )
    if "ode" in evaluation.likelihoods and evaluation.decoder == "gaussian" and evaluation.num_bins:
        raise ValueError(
            f"eval.num_bins={evaluation.num_bins} dequantizes discrete data, but "
            "eval.decoder='gaussian' says the data are continuous: set eval.num_bins=0 for "
            "the ODE likelihood of continuous data"
        )
    if evaluation.ode_divergence not in ode_likelihood.DIVERGENCES:
        raise ValueError(
            f"eval.ode_divergence={evaluation.ode_divergence!r}; "
            f"allowed: {list(ode_likelihood.DIVERGENCES)}"
        )


def eval_batches(config: ml_collections.ConfigDict) -> Iterator[dict]:
    """This process's rows of the first `eval.num_batches` batches of data.eval_split."""
    iterator = data.make_eval_dataset(
        config.data,
        split=config.data.eval_split,
        seed=config.eval.seed,
        global_batch_size=config.eval.batch_size,
    )
    try:
        yield from (batch for _, batch in zip(range(config.eval.num_batches), iterator))
    finally:
        iterator.close()


def make_ode_bits_per_dim_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """`fn(params, batch, rng) -> {"bits_per_dim" [B], "nfe", ...}` of the trained network."""
    schedule, prediction = generate.sampling_schedule(config.diffusion)
    evaluation = config.eval
    bits_per_dim_fn = ode_likelihood.make_ode_bits_per_dim_fn(
        schedule,
        num_bins=evaluation.num_bins or None,
        prediction=prediction,
        variance_type=config.diffusion.variance_type,
        divergence=evaluation.ode_divergence,
        rtol=evaluation.ode_rtol,
        atol=evaluation.ode_atol,
        step_to_kinks=evaluation.ode_step_to_kinks,
    )

    def bits_per_dim(params, batch, rng):
        model_fn = generate.model_fn_of(config, model, params, schedule)
        result = bits_per_dim_fn(model_fn, batch["x"], rng, batch.get("label"))
        return {"bits_per_dim": result["bits_per_dim"], "nfe": result["nfe"]}

    return bits_per_dim


def make_vlb_bits_per_dim_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """`fn(params, batch, rng) -> {"bits_per_dim" [B]}`: the bound of training's evaluation."""
    bits_per_dim_fn = build.make_bits_per_dim_fn(config, model)
    return lambda params, batch, rng: {"bits_per_dim": bits_per_dim_fn(params, batch, rng)}


def describe(name: str, config: ml_collections.ConfigDict) -> str:
    evaluation = config.eval
    if evaluation.num_bins:
        dequantization = f"uniform dequantization on {evaluation.num_bins} levels"
    else:
        dequantization = "continuous data (no dequantization)"
    return DESCRIPTIONS[name].format(
        decoder=evaluation.decoder,
        dequantization=dequantization,
        divergence=evaluation.ode_divergence,
        rtol=evaluation.ode_rtol,
        atol=evaluation.ode_atol,
    )


def evaluate_likelihood(name: str, config: ml_collections.ConfigDict, model, params, mesh) -> dict:
    """Mean bits/dim ("vlb" or "ode") over the eval batches, its standard error and NFE."""
    if name == "vlb":
        bits_per_dim_fn = make_vlb_bits_per_dim_fn(config, model)
    else:
        bits_per_dim_fn = make_ode_bits_per_dim_fn(config, model)
    jitted = compilation.CompiledTogether(jax.jit(bits_per_dim_fn), f"{name}_bits_per_dim")
    batch_sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    rng = jax.random.fold_in(jax.random.key(config.eval.seed), LIKELIHOODS.index(name))
    values, nfes = [], []
    bar = progress.ProgressBar(
        f"evaluation: {name} likelihood",
        config.eval.num_batches,
        unit="batch",
        lines_off_terminal=10,
        enabled=config.training.progress_bar and jax.process_index() == 0,
    )
    for index, local_batch in enumerate(eval_batches(config)):
        batch = parallel.global_batch(local_batch, batch_sharding)
        result = parallel.to_host(jitted(params, batch, jax.random.fold_in(rng, index)))
        values.append(result["bits_per_dim"])
        nfes.append(result.get("nfe", config.diffusion.num_timesteps))
        bar.update(index + 1, bits_per_dim=float(np.mean(np.concatenate(values))))
    bar.close()
    if not values:
        raise ValueError(f"data.eval_split={config.data.eval_split!r} gave no batch")
    values = np.concatenate(values)
    return {
        "bits_per_dim": float(np.mean(values)),
        "standard_error": float(np.std(values, ddof=1) / np.sqrt(len(values))),
        "num_examples": len(values),
        "nfe_per_batch": [int(n) for n in nfes],
        "what": describe(name, config),
    }
