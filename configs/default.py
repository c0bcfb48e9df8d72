"""The base config: every option of a training run, with its default.

Data set configs (`configs/cifar10.py`, ...) import `get_config` and change a few lines.
Run any of them with

    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/run \
        --config.training.batch_size=64

The config is locked: overriding an option that does not exist is an error naming it.

Laptop switch: append `:tiny` to the config path (`--config configs/cifar10.py:tiny`) to
shrink any config to a CPU-sized run (a ~60K-parameter U-Net or a small MLP, batch 8,
40 steps, a 20-step sampler, checkpoints every 20 steps). The data set, the diffusion
process and the loss are unchanged, so `:tiny` checks a config end to end in about a minute.
Command-line overrides apply after `:tiny`.
"""

from __future__ import annotations

import ml_collections

from configs import models

SIZES = ("", "tiny")


def data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.name = "cifar10"  # a key of diffusion_jax.data.DATASETS
    data.tfds_name = ""  # for data.name = "tfds": any TFDS builder name
    data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (None: default)
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = True
    data.use_labels = False
    data.num_classes = 10  # read only when use_labels
    data.toy_distribution = "swiss_roll"  # data.name = "toy2d"
    data.toy_num_points = 10000
    data.folder_path = ml_collections.config_dict.placeholder(str)  # "folder", "captioned_folder"
    data.random_crop = False  # folder / captioned_folder / tfds: a random square, not the center
    # data.name = "captioned_folder": the caption key of metadata.jsonl (else NAME.txt files)
    data.caption_column = "text"
    data.caption_feature = ""  # data.name = "tfds": the Text feature that captions each image
    # captions of labelled data, e.g. ("a handwritten digit {name}", "the number {label}")
    data.caption_templates = ()
    data.caption_dropout = 0.0  # probability of the empty caption (classifier-free guidance)
    # corrupt images, missing or empty captions: left out and counted instead of an error
    data.skip_bad_examples = False
    data.num_workers = 0  # grain worker processes (0: threads in the training process)
    data.train_split = "train"
    data.eval_split = "test"
    return data


def diffusion_config() -> ml_collections.ConfigDict:
    diffusion = ml_collections.ConfigDict()
    # "simple" | "hybrid" | "vlb" (discrete process) | "flow_matching" | "edm"
    diffusion.loss_type = "simple"
    diffusion.schedule = "linear"  # beta schedule of the discrete process
    diffusion.num_timesteps = 1000
    diffusion.zero_terminal_snr = False
    diffusion.target = "eps"  # what the network predicts: "eps" | "x0" | "v"
    diffusion.loss_weighting = "constant"  # "constant" | "snr" | "truncated_snr" | "min_snr"
    diffusion.snr_gamma = 5.0  # for "min_snr"
    # "fixed_small" | "fixed_large" | "learned" | "learned_range" (learned needs model.learn_sigma)
    diffusion.variance_type = "fixed_small"
    diffusion.hybrid_lambda = 1e-3
    diffusion.timestep_sampling = "uniform"  # "uniform" | "importance" (Improved DDPM, 3.3)
    diffusion.loss_history_length = 10
    diffusion.label_dropout = 0.1  # classifier-free guidance training, when data.use_labels
    diffusion.flow_time_distribution = "uniform"  # "uniform" | "logit_normal"
    diffusion.flow_time_scale = 1000.0
    diffusion.edm_sigma_data = 0.5
    diffusion.edm_p_mean = -1.2
    diffusion.edm_p_std = 1.2
    diffusion.edm_sigma_min = 0.002  # EDM sampling range (Karras et al. 2022, Table 1)
    diffusion.edm_sigma_max = 80.0
    return diffusion


def optim_config() -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"  # "adam" | "adamw"
    optim.learning_rate = 2e-4
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0  # adamw only
    optim.warmup_steps = 5000
    optim.decay = "constant"  # "constant" | "cosine" | "linear", after warmup
    optim.final_lr_fraction = 0.0  # cosine/linear decay ends at learning_rate * this
    optim.grad_clip_norm = 1.0  # 0 disables clipping
    return optim


def training_config() -> ml_collections.ConfigDict:
    training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all devices and processes
    training.num_steps = 800_000
    training.seed = 0
    training.ema_decays = (0.9999,)
    # decay min(d, (1 + step) / (10 + step)): needed by short runs (see train_state.ema_decay_at)
    training.ema_warmup = True
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.keep_checkpoints = 3
    # a failed save is saved again this many times in a row before the run stops
    training.checkpoint_retries = 0
    training.sample_every = 50_000  # 0: never; a grid is always written at the end
    training.eval_every = 0  # bits/dim on data.eval_split; 0: never
    training.on_nonfinite = "skip"  # "skip" the update | "stop" the run
    # With "skip": stop (an error naming the step and the last finite loss) when this many
    # updates in a row were skipped, as a diverged run skips every one; 0: never stop.
    training.max_consecutive_skips = 20
    training.progress_bar = True
    return training


def sampling_config() -> ml_collections.ConfigDict:
    sampling = ml_collections.ConfigDict()
    sampling.sampler = "ddpm"
    sampling.num_steps = 1000
    sampling.eta = 0.0  # DDIM
    sampling.spacing = "linspace"
    sampling.guidance_scale = 1.0  # classifier-free guidance; 1: none
    sampling.clip_x0 = True
    sampling.num_images = 64  # images in a sample grid
    sampling.batch_size = 64
    sampling.ema_index = 0  # which of training.ema_decays to sample from; -1: raw params
    sampling.seed = 1
    sampling.label = -1  # class of conditional samples; -1: cycle through the classes
    # prompts of a text-conditional model (model.name="text_unet"), image n has prompt n % P
    sampling.prompts = ()
    return sampling


def eval_config() -> ml_collections.ConfigDict:
    eval_ = ml_collections.ConfigDict()
    eval_.batch_size = 128
    eval_.num_batches = 4  # bits/dim on this many batches of data.eval_split
    eval_.decoder = "discretized"  # "discretized" (8-bit images) | "gaussian" (continuous data)
    # --mode=eval (diffusion_jax/runs/evaluate.py): the parameters are sampling.ema_index's.
    eval_.sampler = "ddim"  # sample-quality metrics: one run per num_steps x eta
    eval_.num_steps = (100,)
    eval_.etas = (0.0,)  # read only by samplers with an eta option (ddim)
    eval_.num_samples = 10_000  # per setting (FID is customarily reported on 10k or 50k)
    # any of "frechet" (fid / fd_digits), "kid", "inception_score", "precision_recall"
    eval_.metrics = ("frechet", "kid", "inception_score", "precision_recall")
    eval_.extractor = "auto"  # "auto" (digits data: "digits", else "inception") | ...
    eval_.inception_weights = ""  # converted FID InceptionV3 .npz (docs/evaluation.md)
    eval_.reference_split = "train"  # data split the samples are compared with
    eval_.likelihoods = ("vlb",)  # any of "vlb" (discrete bound), "ode" (probability-flow ODE)
    eval_.num_bins = 256  # levels of the discrete data, for ODE dequantization; 0: continuous
    eval_.ode_divergence = "rademacher"  # "rademacher" | "gaussian" (Hutchinson) | "exact"
    eval_.ode_rtol = 1e-5
    eval_.ode_atol = 1e-5
    # True: steps end on a discrete process's steps (exact to ~1e-4 nats/dim, NFE >= 6 T);
    # False: ~2e-3 nats/dim on DDPM's schedule, below the 0.01 bits/dim papers report
    eval_.ode_step_to_kinks = False
    eval_.seed = 0
    # --mode eval of a text-conditional model on labelled data: the accuracy of
    # eval.prompt_classifier on eval.num_samples samples of this prompt, class n % K for
    # sample n, at each of eval.guidance_scales ({name} / {label}: the class's name / index)
    eval_.prompt_template = "the number {label}"
    eval_.guidance_scales = ()
    eval_.prompt_classifier = "digits"  # the digits classifier of diffusion_jax.evaluation
    return eval_


def latent_config() -> ml_collections.ConfigDict:
    """Latent diffusion (configs/ldm_digits.py): the model diffuses the latents of this
    autoencoder, and samples are decoded to images."""
    latent = ml_collections.ConfigDict()
    # "" (pixel space) | an autoencoder run's WORKDIR/autoencoder | a converted folder
    # (python -m diffusion_jax.convert.diffusers_vae) | a diffusers AutoencoderKL folder
    latent.autoencoder = ""
    latent.scale_by_std = True  # 1 / std of the first batch's latents; else its scaling_factor
    latent.sample_posterior = True  # train on z ~ q(z | x) (LDM), else on its mean
    return latent


def parallel_config() -> ml_collections.ConfigDict:
    parallel = ml_collections.ConfigDict()
    parallel.strategy = "data"  # "data" | "fsdp" | "pmap"
    parallel.fsdp_min_size = 2**14  # FSDP shards only parameters with at least this many values
    # Multi-host: TPU pods are detected automatically; GPU / CPU clusters set these three.
    parallel.coordinator_address = ""  # "host:port" of process 0
    parallel.num_processes = 1
    parallel.process_id = 0
    parallel.local_device_ids = ()  # () = all local devices
    parallel.cpu_collectives = "gloo"  # collectives between CPU processes
    # JAX's persistent compilation cache, so that a resumed run loads its programs instead of
    # compiling them again: a relative path is under the workdir, "" turns it off.
    # JAX_COMPILATION_CACHE_DIR, where set, wins.
    parallel.compilation_cache_dir = "compilation_cache"
    return parallel


def get_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 setting (Ho et al. 2020), the base every other config edits."""
    config = ml_collections.ConfigDict()
    config.task = "diffusion"  # "diffusion" | "autoencoder" (configs/autoencoder_digits.py)
    config.data = data_config()
    config.model = models.ddpm_cifar10()
    config.diffusion = diffusion_config()
    config.optim = optim_config()
    config.training = training_config()
    config.sampling = sampling_config()
    config.eval = eval_config()
    config.latent = latent_config()
    config.parallel = parallel_config()
    return config


def _shrink(config: ml_collections.ConfigDict) -> None:
    if config.model.name == "mlp":
        config.model.hidden_size = 64
        config.model.num_layers = 2
    elif config.model.name == "text_unet":  # a 200K-parameter U-Net, a 19K-parameter encoder
        config.model.block_out_channels = (16, 32)
        config.model.attention_head_dim = 2
        config.model.cross_attention_dim = config.model.text_encoder.hidden_size = 16
        config.model.text_encoder.intermediate_size = 32
        config.model.text_encoder.num_hidden_layers = 1
        config.model.text_encoder.num_attention_heads = 2
    else:
        kept = config.model  # its input: the data's images, or a latent run's latents
        num_classes, learn_sigma = kept.num_classes, kept.learn_sigma
        config.model = models.tiny()
        config.model.image_size = kept.image_size
        config.model.in_channels, config.model.out_channels = kept.in_channels, kept.out_channels
        config.model.attn_resolutions = (kept.image_size // 2,)
        config.model.num_classes = num_classes
        config.model.learn_sigma = learn_sigma
    if "autoencoder" in config:  # 14K parameters, the GAN from step 20
        config.autoencoder.block_out_channels = (8, 16, 16)
        config.autoencoder.norm_num_groups = 4
        config.autoencoder_loss.disc_channels = 8
        config.autoencoder_loss.disc_start = 20
    config.training.batch_size = 8
    config.training.num_steps = 40
    config.training.log_every = 10
    config.training.checkpoint_every = 20
    config.training.sample_every = 0
    config.training.eval_every = 0
    config.optim.warmup_steps = 10
    config.sampling.num_steps = 20
    config.sampling.num_images = 16
    config.sampling.batch_size = 16
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    config.eval.num_steps = (10,)
    config.eval.num_samples = 128


def finalize(config: ml_collections.ConfigDict, size: str = "") -> ml_collections.ConfigDict:
    """Applies the size switch (`""` or `"tiny"`, see the module docstring) and locks."""
    if size not in SIZES:
        raise ValueError(f"Unknown config size {size!r} (the ':' suffix); allowed: {SIZES}")
    if size == "tiny":
        _shrink(config)
    config.lock()
    return config
