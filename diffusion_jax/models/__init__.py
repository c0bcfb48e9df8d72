"""The denoiser networks (U-Net, DiT, residual MLP, the text-conditional U-Net), built from
the ``model`` config section.

``build_model(config.model)`` validates the section and returns a Flax module with
``apply({"params": params}, x, t, label=None, train=False, rngs={"dropout": key})``; the
label of "text_unet" is the captions' token ids [B, L].
Every error names the config option at fault, so it can be fixed from the command line.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.models.conditional_unet import UNetConditionConfig
from diffusion_jax.models.dit import DIT_PATCH_SIZES, DIT_SIZES, DiT
from diffusion_jax.models.layers import COMPUTE_DTYPES, TIME_EMBEDDINGS
from diffusion_jax.models.mlp import MLPDenoiser
from diffusion_jax.models.text import CLIPTextConfig
from diffusion_jax.models.text_conditional import TextConditionalUNet
from diffusion_jax.models.unet import UNet

CONV_ALGORITHMS = ("auto", "direct", "winograd")

__all__ = [
    "MODEL_BUILDERS",
    "build_model",
    "conditional_unet_config",
    "conv_algorithm",
    "count_params",
    "dit_dimensions",
    "forward_flops",
    "init_params",
    "output_channels",
    "sample_shape",
    "text_encoder_config",
]


def output_channels(config: ml_collections.ConfigDict) -> int:
    """Channels the network outputs: ``out_channels``, doubled when ``learn_sigma`` (the
    Improved-DDPM interpolation weights v of Nichol & Dhariwal 2021, Eq. 15)."""
    return config.out_channels * (2 if config.learn_sigma else 1)


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one input example: ``(data_dim,)`` for the MLP, ``(H, W, C)`` for images."""
    if config.name == "mlp":
        return (config.data_dim,)
    return (config.image_size, config.image_size, config.in_channels)


DOWNSAMPLE_PADDINGS = ("same", "symmetric")
# The options each network reads beyond the common ones, and the preset that has them.
MODEL_FIELDS = {
    "unet": (("ch", "ch_mult", "num_res_blocks", "attn_resolutions"), "configs.models.tiny()"),
    "dit": (("variant", "depth", "hidden_size", "mlp_ratio"), "configs.models.dit()"),
    "mlp": (("data_dim", "hidden_size", "num_layers"), "configs.models.mlp2d()"),
    "text_unet": (
        ("block_out_channels", "cross_attention_dim", "text_encoder"),
        "configs.models.text_unet()",
    ),
}


def _check_fields(config: ml_collections.ConfigDict) -> None:
    """A `model` section switched to another network by `model.name` lacks its options."""
    fields, preset = MODEL_FIELDS[config.name]
    missing = [field for field in fields if field not in config]
    if missing:
        raise ValueError(
            f"model.name={config.name!r} needs the options of its preset {preset}, and this "
            f"model section lacks {missing}: start from a config whose model is that preset "
            "(its config file sets config.model) rather than switching model.name"
        )


def _check_common(config: ml_collections.ConfigDict) -> None:
    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype={config.dtype!r}; allowed: {tuple(COMPUTE_DTYPES)}")
    if config.num_classes < 0:
        raise ValueError(f"model.num_classes={config.num_classes} must be >= 0 (0: unconditional)")
    if config.out_channels < 1:
        raise ValueError(f"model.out_channels={config.out_channels} must be >= 1")
    if config.in_channels < 1:
        raise ValueError(f"model.in_channels={config.in_channels} must be >= 1")
    if config.time_embedding not in TIME_EMBEDDINGS:
        raise ValueError(
            f"model.time_embedding={config.time_embedding!r}; allowed: {TIME_EMBEDDINGS}"
        )


def _check_unet_sizes(config: ml_collections.ConfigDict) -> list[int]:
    """Checks image size against the down-sampling; returns the resolutions that occur."""
    ch_mult = tuple(config.ch_mult)
    if not ch_mult or min(ch_mult) < 1:
        raise ValueError(f"model.ch_mult={ch_mult} must be a non-empty tuple of positive ints")
    if config.num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks={config.num_res_blocks} must be >= 1")
    if config.downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(
            f"model.downsample_padding={config.downsample_padding!r}; allowed: "
            f"{DOWNSAMPLE_PADDINGS} (Ho et al.'s bottom-right, guided-diffusion's every side)"
        )
    if config.ch < 4 or config.ch % 2:
        raise ValueError(
            f"model.ch={config.ch}; allowed: even and >= 4 (the sinusoidal time embedding "
            "has ch features)"
        )
    factor = 2 ** (len(ch_mult) - 1)
    if config.image_size < factor or config.image_size % factor != 0:
        raise ValueError(
            f"model.image_size={config.image_size} is not divisible by {factor}, the "
            f"down-sampling factor of model.ch_mult={ch_mult}; allowed: multiples of {factor}"
        )
    resolutions = [config.image_size // 2**level for level in range(len(ch_mult))]
    missing = [r for r in config.attn_resolutions if r not in resolutions]
    if missing:
        raise ValueError(
            f"model.attn_resolutions={tuple(config.attn_resolutions)} never occurs for "
            f"image_size={config.image_size} with ch_mult={ch_mult}; resolutions that occur: "
            + ", ".join(str(r) for r in resolutions)
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"model.dropout={config.dropout} must be in [0, 1)")
    return resolutions


def _check_unet_channels(config: ml_collections.ConfigDict, resolutions: list[int]) -> None:
    widths = [config.ch] + [config.ch * m for m in config.ch_mult]
    bad = [w for w in widths if w % config.norm_groups != 0]
    if bad:
        raise ValueError(
            f"model.norm_groups={config.norm_groups} does not divide the channel counts {bad} "
            f"(ch={config.ch}, ch_mult={tuple(config.ch_mult)}); allowed: a common divisor "
            f"of {sorted(set(widths))}"
        )
    attn_widths = {config.ch * config.ch_mult[-1]} | {
        config.ch * m
        for r, m in zip(resolutions, config.ch_mult, strict=True)
        if r in config.attn_resolutions
    }
    for width in sorted(attn_widths):
        if config.head_channels > 0 and width % config.head_channels != 0:
            raise ValueError(
                f"model.head_channels={config.head_channels} does not divide the attention "
                f"width {width}; allowed: a divisor of {sorted(attn_widths)} or -1"
            )
        if config.head_channels <= 0 and (config.num_heads < 1 or width % config.num_heads):
            raise ValueError(
                f"model.num_heads={config.num_heads} does not divide the attention width "
                f"{width}; allowed: a divisor of {sorted(attn_widths)}"
            )


def conv_algorithm(config: ml_collections.ConfigDict) -> str:
    """The U-Net's ``model.conv_algorithm`` with "auto" resolved: Winograd's F(2x2, 3x3) and
    F(4x4, 3x3) in float32 on CPUs (a train step at batch 16 in 0.90-0.92x the time; sampling
    1.3x faster with F(2x2, 3x3), 1.2x more with F(4x4, 3x3); docs/benchmarks.md), XLA's
    direct convolution elsewhere (cuDNN and the TPU compiler choose their own algorithms)."""
    if config.conv_algorithm not in CONV_ALGORITHMS:
        raise ValueError(
            f"model.conv_algorithm={config.conv_algorithm!r}; allowed: {CONV_ALGORITHMS}"
        )
    if config.conv_algorithm != "auto":
        return config.conv_algorithm
    on_cpu = jax.default_backend() == "cpu"
    return "winograd" if on_cpu and config.dtype == "float32" else "direct"


def _build_unet(config: ml_collections.ConfigDict) -> nn.Module:
    resolutions = _check_unet_sizes(config)
    _check_unet_channels(config, resolutions)
    return UNet(
        ch=config.ch,
        ch_mult=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=tuple(config.attn_resolutions),
        out_channels=output_channels(config),
        num_heads=config.num_heads,
        head_channels=config.head_channels,
        dropout=config.dropout,
        resblock_updown=config.resblock_updown,
        use_scale_shift_norm=config.use_scale_shift_norm,
        conv_resample=config.conv_resample,
        downsample_padding=config.downsample_padding,
        time_embedding=config.time_embedding,
        fourier_scale=config.fourier_scale,
        norm_groups=config.norm_groups,
        num_classes=config.num_classes,
        dtype=COMPUTE_DTYPES[config.dtype],
        remat=config.remat,
        conv_algorithm=conv_algorithm(config),
    )


def dit_dimensions(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Depth, width, heads and patch size of a DiT config: ``variant`` ("S/2", "XL/8", ...,
    Table 1 of Peebles & Xie 2023, or "" for none) gives them, and any of ``depth``,
    ``hidden_size``, ``num_heads``, ``patch_size`` set > 0 overrides the variant's value."""
    dims = {"depth": 0, "hidden_size": 0, "num_heads": 0, "patch_size": 0}
    if config.variant:
        size, _, patch = config.variant.partition("/")
        allowed = [f"{s}/{p}" for s in DIT_SIZES for p in DIT_PATCH_SIZES]
        if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCH_SIZES:
            raise ValueError(f"model.variant={config.variant!r}; allowed: {allowed} or ''")
        dims["depth"], dims["hidden_size"], dims["num_heads"] = DIT_SIZES[size]
        dims["patch_size"] = int(patch)
    for key in dims:
        if config[key] > 0:
            dims[key] = config[key]
        if dims[key] < 1:
            raise ValueError(f"model.{key}={config[key]} must be > 0 when model.variant=''")
    return dims


def _build_dit(config: ml_collections.ConfigDict) -> nn.Module:
    dims = dit_dimensions(config)
    if config.image_size % dims["patch_size"] != 0:
        raise ValueError(
            f"model.image_size={config.image_size} is not divisible by the patch size "
            f"{dims['patch_size']} (model.patch_size / model.variant={config.variant!r})"
        )
    if dims["hidden_size"] % dims["num_heads"] != 0 or dims["hidden_size"] % 4 != 0:
        raise ValueError(
            f"model.hidden_size={dims['hidden_size']} must be divisible by 4 and by "
            f"model.num_heads={dims['num_heads']}"
        )
    if not config.mlp_ratio > 0:
        raise ValueError(f"model.mlp_ratio={config.mlp_ratio} must be > 0")
    return DiT(
        patch_size=dims["patch_size"],
        hidden_size=dims["hidden_size"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        out_channels=output_channels(config),
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        time_embedding=config.time_embedding,
        fourier_scale=config.fourier_scale,
        dtype=COMPUTE_DTYPES[config.dtype],
        remat=config.remat,
    )


def _build_mlp(config: ml_collections.ConfigDict) -> nn.Module:
    for key in ("data_dim", "hidden_size", "num_layers"):
        if config[key] < 1:
            raise ValueError(f"model.{key}={config[key]} must be >= 1")
    if config.hidden_size < 4 or config.hidden_size % 2 != 0:
        raise ValueError(f"model.hidden_size={config.hidden_size}; allowed: even and >= 4")
    return MLPDenoiser(
        out_channels=output_channels(config),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        time_embedding=config.time_embedding,
        fourier_scale=config.fourier_scale,
        num_classes=config.num_classes,
        dtype=COMPUTE_DTYPES[config.dtype],
    )


def _checked(build: Callable, section: str):
    """`build()`, its ValueError (naming a field of a model's own config) prefixed with the
    config section the field is in."""
    try:
        return build()
    except ValueError as error:
        raise ValueError(f"{section}.{error}") from None


def text_encoder_config(config: ml_collections.ConfigDict) -> CLIPTextConfig:
    """The CLIP text encoder of `model.text_encoder` (CLIPTextConfig's field names)."""
    text = config.text_encoder
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act")  # fmt: skip
    return _checked(
        lambda: CLIPTextConfig(**{key: text[key] for key in fields}, projection_dim=1),
        "model.text_encoder",
    )


def conditional_unet_config(config: ml_collections.ConfigDict) -> UNetConditionConfig:
    """The conditional U-Net of the `model` section (diffusers' config.json field names)."""
    fields = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
              "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
              "norm_num_groups", "use_linear_projection")  # fmt: skip
    values = {key: config[key] for key in fields}
    values["mid_block_type"] = config.mid_block_type or None
    return _checked(
        lambda: UNetConditionConfig(
            sample_size=config.image_size,
            in_channels=config.in_channels,
            out_channels=output_channels(config),
            **values,
        ),
        "model",
    )


def _build_text_unet(config: ml_collections.ConfigDict) -> nn.Module:
    """The U-Net of Rombach et al. 2022 (Sec. 3.3) cross-attending to CLIP text states."""
    unsupported = {"num_classes": 0, "learn_sigma": False, "time_embedding": "sinusoidal",
                   "remat": False}  # fmt: skip
    for key, allowed in unsupported.items():
        if config[key] != allowed:
            raise ValueError(
                f"model.{key}={config[key]!r} with model.name='text_unet'; allowed: {allowed!r}"
            )
    text_config = text_encoder_config(config)
    unet_config = conditional_unet_config(config)
    if text_config.hidden_size != unet_config.cross_attention_dim:
        raise ValueError(
            f"model.text_encoder.hidden_size={text_config.hidden_size} differs from "
            f"model.cross_attention_dim={unet_config.cross_attention_dim}; allowed: equal "
            "(the U-Net cross-attends to the text encoder's hidden states)"
        )
    factor = unet_config.downsampling_factor
    if config.image_size % factor:
        raise ValueError(
            f"model.image_size={config.image_size} is not divisible by {factor}, the "
            f"down-sampling of model.block_out_channels={tuple(config.block_out_channels)}"
        )
    return TextConditionalUNet(
        unet_config,
        text_config,
        train_text_encoder=bool(config.text_encoder.trainable),
        dtype=COMPUTE_DTYPES[config.dtype],
    )


MODEL_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "unet": _build_unet,
    "dit": _build_dit,
    "mlp": _build_mlp,
    "text_unet": _build_text_unet,
}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Validates the ``model`` config section and builds the network it names."""
    if config.name not in MODEL_BUILDERS:
        raise ValueError(f"model.name={config.name!r}; allowed: {tuple(MODEL_BUILDERS)}")
    _check_fields(config)
    _check_common(config)
    return MODEL_BUILDERS[config.name](config)


def _dummy_inputs(model: nn.Module, shape: tuple[int, ...]):
    x = jnp.zeros(shape, jnp.float32)
    t = jnp.zeros(shape[:1], jnp.float32)
    label = jnp.zeros(shape[:1], jnp.int32) if model.num_classes > 0 else None
    if isinstance(model, TextConditionalUNet):  # token ids of a whole sequence
        label = jnp.zeros((shape[0], model.max_length), jnp.int32)
    return x, t, label


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array):
    """Float32 parameters of ``model``, initialised on a dummy batch of one example."""
    x, t, label = _dummy_inputs(model, (1, *sample_shape(config)))
    return jax.jit(lambda key: model.init({"params": key}, x, t, label)["params"])(rng)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(params)))


def forward_flops(model: nn.Module, params, batch_shape: tuple[int, ...]) -> float:
    """Forward FLOPs per example (inference mode), from XLA's cost analysis of the compiled
    ``apply`` on a batch of ``batch_shape`` (for example ``(8, 32, 32, 3)``).

    XLA counts a multiply-add as 2 FLOPs and skips the taps of a convolution that fall on
    zero padding, so it reads a little below 2 x the dense MAC count (DDPM CIFAR-10: 11.67
    GFLOPs against 2 x 6.22 GMACs dense). The count is the network's as defined: a U-Net is
    measured with direct convolutions (Winograd's, ``conv_algorithm``, needs fewer: 7.15
    GFLOPs there)."""
    if isinstance(model, UNet):
        model = model.clone(conv_algorithm="direct")
    x, t, label = _dummy_inputs(model, tuple(batch_shape))
    apply = jax.jit(lambda p, x, t, label: model.apply({"params": p}, x, t, label))
    cost = apply.lower(params, x, t, label).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returns one dict per program
        cost = cost[0]
    return float(cost["flops"]) / batch_shape[0]
