"""The PyTorch side of the benchmark: diffusers' ``UNet2DModel`` built from our ``model``
config section, its train step and its DDIM sampling loop (``--compare diffusers``).

Needs the ``[torch]`` extra (``pip install -e .[torch]``). The work per step is the same as
ours: a DDPM L_simple step (Ho et al. 2020, Algorithm 1) with Adam, gradient clipping and an
EMA of the weights; DDIM (Song et al. 2021, Eq. 12) with diffusers' ``DDIMScheduler``.

It runs where ours runs (`torch_device`): on the CPU, or on the GPU when JAX's backend is a
GPU that PyTorch sees too. Compute precision matches ours: ``bfloat16`` runs under
``torch.autocast`` (matrix products and convolutions in bfloat16, weights and
normalisations in float32, as our mixed precision); ``float32`` on a GPU allows TF32 in
matrix products and convolutions, as JAX's default precision does there.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusion_jax.diffusion import schedules

TORCH_DEVICES = ("auto", "cpu", "cuda")


def torch_device(requested: str, jax_backend: str) -> str:
    """The device of diffusers' side: ``requested``, or with "auto" the GPU when JAX runs on
    one and PyTorch sees a CUDA device, else the CPU."""
    if requested not in TORCH_DEVICES:
        raise ValueError(f"--torch_device={requested!r}; allowed: {TORCH_DEVICES}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--torch_device=cuda: this PyTorch build sees no CUDA device")
    if requested == "auto":
        return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"
    return requested


def set_precision(device: str) -> None:
    """float32 as JAX computes it on ``device``: TF32 products and convolutions on a GPU
    (JAX's default precision there), exact float32 on the CPU."""
    tf32 = device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = tf32  # let cuDNN time its algorithms, as XLA autotunes


def autocast(device: str, dtype: str):
    """The context of one forward pass in our compute ``dtype``: bfloat16 autocast, or none."""
    enabled = dtype == "bfloat16"
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device``, so that a timer measures it."""
    if device == "cuda":
        torch.cuda.synchronize()


def _attention_head_dim(config: ml_collections.ConfigDict) -> int:
    """diffusers gives one head width for every attention layer; ours may give a head count."""
    if config.head_channels > 0:
        return config.head_channels
    widths = {config.ch * config.ch_mult[-1]} | {
        config.ch * mult
        for level, mult in enumerate(config.ch_mult)
        if config.image_size // 2**level in config.attn_resolutions
    }
    if len(widths) != 1:
        raise ValueError(
            f"model.num_heads={config.num_heads} with attention widths {sorted(widths)}: "
            "diffusers needs one head width; set model.head_channels > 0 instead"
        )
    return widths.pop() // config.num_heads


def _check_comparable(config: ml_collections.ConfigDict) -> None:
    if config.name != "unet":
        raise ValueError(f"--compare diffusers needs model.name='unet', not {config.name!r}")
    unsupported = {
        "resblock_updown": (config.resblock_updown, False),
        "conv_resample": (config.conv_resample, True),
        "time_embedding": (config.time_embedding, "sinusoidal"),
    }
    for key, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(f"--compare diffusers: model.{key}={value!r}; allowed: {allowed!r}")


def diffusers_unet_kwargs(config: ml_collections.ConfigDict) -> dict:
    """``UNet2DModel`` arguments of the same network as our U-Net of ``config`` (the
    ``model`` section); for DDPM CIFAR-10 they are those of google/ddpm-cifar10-32."""
    _check_comparable(config)
    levels = range(len(config.ch_mult))
    attn = [config.image_size // 2**level in config.attn_resolutions for level in levels]
    out_channels = config.out_channels * (2 if config.learn_sigma else 1)
    return dict(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=config.num_res_blocks,
        attention_head_dim=_attention_head_dim(config),
        norm_num_groups=config.norm_groups,
        norm_eps=1e-6,  # flax.linen.GroupNorm's default
        flip_sin_to_cos=False,  # [sin, cos], as Ho et al.'s get_timestep_embedding
        freq_shift=1,  # frequencies 10000^(-k / (half - 1))
        downsample_padding=0 if config.downsample_padding == "same" else 1,
        dropout=config.dropout,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        num_class_embeds=config.num_classes + 1 if config.num_classes > 0 else None,
    )


def build_diffusers_unet(
    config: ml_collections.ConfigDict, *, seed: int = 0, device: str = "cpu"
) -> UNet2DModel:
    """diffusers' U-Net of our ``model`` config, float32 weights on ``device``, built offline
    (no download)."""
    torch.manual_seed(seed)
    return UNet2DModel(**diffusers_unet_kwargs(config)).to(device)


def count_torch_params(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _device_of(module: torch.nn.Module) -> str:
    return next(module.parameters()).device.type


def torch_info(device: str = "cpu") -> dict:
    import diffusers

    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    return info


def peak_memory_bytes(device: str) -> int | None:
    """PyTorch's peak allocated GPU memory (None on the CPU, where the process's peak
    resident memory holds both frameworks')."""
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _class_labels(unet: UNet2DModel, labels: np.ndarray, device: str) -> torch.Tensor | None:
    """`labels` for a class-conditional ``unet`` (as ours gets them), None otherwise."""
    if unet.config.num_class_embeds is None:
        return None
    return torch.tensor(labels, dtype=torch.long, device=device)


def make_train_runner(
    unet: UNet2DModel,
    *,
    batch_size: int,
    betas: np.ndarray,
    learning_rate: float,
    grad_clip_norm: float,
    ema_decay: float,
    dtype: str = "float32",
    seed: int = 0,
) -> Callable[[], float]:
    """``run() -> loss``: one training step of ``unet`` on a fixed synthetic batch, on the
    device of its weights, the network evaluated in ``dtype`` (`autocast`)."""
    device = _device_of(unet)
    generator = torch.Generator(device).manual_seed(seed)
    config = unet.config
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    x0 = torch.rand(shape, generator=generator, device=device) * 2 - 1  # [B, C, H, W]
    num_classes = (config.num_class_embeds or 1) - 1  # the last embedding is the null label
    labels = np.random.default_rng(seed).integers(0, max(num_classes, 1), batch_size)
    class_labels = _class_labels(unet, labels, device)
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=learning_rate)
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    unet.train()

    def run() -> float:
        t = torch.randint(0, len(betas), (batch_size,), generator=generator, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        with autocast(device, dtype):
            eps = unet(x_t, t, class_labels=class_labels).sample[:, : config.in_channels]
        loss = torch.mean((eps.float() - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
        return loss.detach().item()  # waits for the step, on a GPU too

    return run


def make_ddim_runner(
    unet: UNet2DModel,
    *,
    batch_size: int,
    num_steps: int,
    betas: np.ndarray,
    clip_sample: bool,
    dtype: str = "float32",
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """``run() -> x0 [B, C, H, W]``: deterministic DDIM (eta = 0) with ``num_steps`` network
    evaluations in ``dtype``, the loop of diffusers' ``DDIMPipeline`` without its image
    post-processing, on the device of ``unet``'s weights; returns when the batch is done."""
    scheduler = DDIMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas,
        clip_sample=clip_sample,
        timestep_spacing="linspace",
    )
    config = unet.config
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    device = _device_of(unet)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    num_classes = (config.num_class_embeds or 1) - 1
    class_labels = _class_labels(unet, np.arange(batch_size) % max(num_classes, 1), device)

    def run() -> torch.Tensor:
        unet.eval()
        scheduler.set_timesteps(num_steps)  # on the CPU, as DDIMPipeline does
        x = noise
        with torch.inference_mode():
            for t in scheduler.timesteps:
                with autocast(device, dtype):
                    eps = unet(x, t, class_labels=class_labels).sample[:, : config.in_channels]
                x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
        synchronize(device)
        return x

    return run


def betas_of(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """The betas of our ``diffusion`` section, passed to diffusers as ``trained_betas``."""
    return schedules.get_betas(
        diffusion.schedule, diffusion.num_timesteps, zero_terminal_snr=diffusion.zero_terminal_snr
    ).astype(np.float64)
