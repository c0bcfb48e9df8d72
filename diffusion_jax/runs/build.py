"""The objects of a run built from its config sections: the discrete process, the network
as the losses see it, the loss, the initial train state and the bits/dim of the bound.

This is the edge: these functions read the config and call the config-free packages
(`diffusion`, `models`, `training`) with plain arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import data, models
from diffusion_jax.diffusion import likelihood, losses, timestep_sampling
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.runs import text_conditioning
from diffusion_jax.training import train_state as train_state_lib


def make_train_iterator(config: ml_collections.ConfigDict):
    """This process's share of `data.train_split` in global batches of `training.batch_size`,
    shuffled by `training.seed`, from its first batch; a text-conditional model's captions
    as token ids ("input_ids")."""
    tokenizer = None
    if text_conditioning.uses_text(config):
        tokenizer = text_conditioning.make_tokenizer(config)
    return data.make_dataset(
        config.data,
        split=config.data.train_split,
        seed=config.training.seed,
        global_batch_size=config.training.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=tokenizer,
    )


def make_process(diffusion: ml_collections.ConfigDict) -> process_lib.DiffusionProcess:
    """The discrete process of `diffusion.schedule` with `diffusion.num_timesteps` steps."""
    return process_lib.make_process(
        diffusion.schedule, diffusion.num_timesteps, zero_terminal_snr=diffusion.zero_terminal_snr
    )


def network_fn(model, *, train: bool) -> Callable:
    """`apply_fn(params, x, t, label, rng) -> output`, the losses' view of the network."""

    def apply_fn(params, x, t, label, rng):
        rngs = {"dropout": rng} if train else {}
        return model.apply({"params": params}, x, t, label=label, train=train, rngs=rngs)

    return apply_fn


def make_loss_fn(config: ml_collections.ConfigDict, model) -> losses.LossFn:
    """`loss_fn(params, batch, rng, loss_history)` of `diffusion.loss_type`, with label
    dropout for classifier-free guidance when the model is class-conditional; a
    text-conditional model is conditioned on the captions' token ids (caption dropout is the
    data's, `data.caption_dropout`)."""
    diffusion = config.diffusion
    apply_fn = network_fn(model, train=True)
    if diffusion.loss_type in losses.DISCRETE_LOSSES:
        loss_fn = losses.make_diffusion_loss_fn(
            make_process(diffusion),
            apply_fn,
            loss_type=diffusion.loss_type,
            target=diffusion.target,
            weighting=diffusion.loss_weighting,
            snr_gamma=diffusion.snr_gamma,
            variance_type=diffusion.variance_type,
            hybrid_lambda=diffusion.hybrid_lambda,
        )
    elif diffusion.loss_type == "flow_matching":
        loss_fn = losses.make_flow_matching_loss_fn(
            apply_fn,
            time_distribution=diffusion.flow_time_distribution,
            time_scale=diffusion.flow_time_scale,
        )
    elif diffusion.loss_type == "edm":
        loss_fn = losses.make_edm_loss_fn(
            apply_fn,
            sigma_data=diffusion.edm_sigma_data,
            p_mean=diffusion.edm_p_mean,
            p_std=diffusion.edm_p_std,
        )
    else:
        raise ValueError(
            f"diffusion.loss_type={diffusion.loss_type!r}; allowed: {list(losses.LOSS_TYPES)}"
        )
    if config.model.num_classes > 0 and diffusion.label_dropout > 0:
        loss_fn = losses.with_label_dropout(
            loss_fn, rate=diffusion.label_dropout, null_label=config.model.num_classes
        )
    if text_conditioning.uses_text(config):
        loss_fn = text_conditioning.captions_as_condition(loss_fn)
    return loss_fn


def make_create_fn(config: ml_collections.ConfigDict, model, tx) -> Callable:
    """`create(rng) -> TrainState` at step 0 (jit it with the state's shardings)."""
    diffusion = config.diffusion

    def create(rng):
        params = models.init_params(model, config.model, rng)
        params = text_conditioning.with_pretrained_text_encoder(config, params)
        history = None
        if diffusion.timestep_sampling == "importance":
            history = timestep_sampling.init_loss_history(
                diffusion.num_timesteps, history_length=diffusion.loss_history_length
            )
        # a latent run's scale, set once when it starts (`runs.latent`)
        scale = jnp.ones((), jnp.float32) if config.latent.autoencoder else None
        return train_state_lib.create_train_state(
            params,
            tx,
            num_ema=len(config.training.ema_decays),
            loss_history=history,
            latent_scale=scale,
        )

    return create


def make_bits_per_dim_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """`bpd(params, batch, rng) -> [B]`: the discrete ELBO in bits/dim (Ho et al., Eq. 5)."""
    process = make_process(config.diffusion)
    apply_fn = network_fn(model, train=False)

    def bits_per_dim(params, batch, rng):
        model_fn = lambda x, t: apply_fn(params, x, t, batch.get("label"), None)
        return likelihood.bits_per_dim(
            process,
            model_fn,
            batch["x"],
            rng,
            prediction=config.diffusion.target,
            variance_type=config.diffusion.variance_type,
            decoder=config.eval.decoder,
        )["total"]

    return bits_per_dim
