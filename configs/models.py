"""Presets for the ``model`` config section (see ``diffusion_jax.models.build_model``).

Every preset of a network carries every field that network reads, so that any of them can
be overridden on the command line of a locked config, e.g.
``--config.model.dropout=0.2 --config.model.dtype=bfloat16``.
"""

from __future__ import annotations

import ml_collections


def _common(
    name: str, *, image_size: int, in_channels: int, learn_sigma: bool, num_classes: int
) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = name
    model.image_size = image_size
    model.in_channels = in_channels
    model.out_channels = in_channels  # before doubling for learn_sigma
    model.learn_sigma = learn_sigma
    model.num_classes = num_classes  # 0: unconditional; else index num_classes is "null"
    model.dtype = "float32"  # computation dtype; parameters are always float32
    model.remat = False
    model.time_embedding = "sinusoidal"  # "sinusoidal" (discrete t) | "fourier" (continuous)
    model.fourier_scale = 16.0
    return model


def _unet(**overrides) -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 U-Net (Ho et al. 2020, Appendix B), with ``overrides`` applied."""
    model = _common("unet", image_size=32, in_channels=3, learn_sigma=False, num_classes=0)
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.num_heads = 1
    model.head_channels = -1  # > 0 fixes the head width instead of num_heads
    model.dropout = 0.1
    model.resblock_updown = False  # True: BigGAN-style residual up/down-sampling
    model.use_scale_shift_norm = False  # True: FiLM time conditioning
    model.conv_resample = True
    # The stride-2 downsampling convolution pads "same" (bottom and right: Ho et al.'s TF code)
    # or "symmetric" (every side: guided-diffusion / Improved DDPM)
    model.downsample_padding = "same"
    model.norm_groups = 32
    # 3x3 convolutions: "auto" (Winograd on CPUs, in float32), "direct", "winograd"
    model.conv_algorithm = "auto"
    model.update(overrides)
    return model


def ddpm_cifar10() -> ml_collections.ConfigDict:
    """DDPM CIFAR-10 U-Net, 35.7M parameters (Ho et al. 2020, Appendix B)."""
    return _unet()


def ddpm_256() -> ml_collections.ConfigDict:
    """DDPM CelebA-HQ / LSUN 256x256 U-Net, 114M parameters (Ho et al. 2020, Appendix B)."""
    return _unet(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)


def iddpm_cifar10() -> ml_collections.ConfigDict:
    """Improved-DDPM CIFAR-10 U-Net with learned variance (Nichol & Dhariwal 2021, Sec. 2.2,
    Appendix A): 3 blocks, attention at 16 and 8 with 4 heads, FiLM conditioning, dropout 0.3."""
    return _unet(
        learn_sigma=True,
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        num_heads=4,
        dropout=0.3,
        use_scale_shift_norm=True,
        downsample_padding="symmetric",
    )


def tiny() -> ml_collections.ConfigDict:
    """A U-Net small enough for unit and end-to-end tests on CPU (8x8 images, 177K params)."""
    return _unet(
        image_size=8,
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        num_heads=2,
        dropout=0.1,
        norm_groups=8,
    )


def dit(
    variant: str = "XL/2",
    image_size: int = 32,
    in_channels: int = 4,
    *,
    num_classes: int = 1000,
    learn_sigma: bool = True,
) -> ml_collections.ConfigDict:
    """DiT (Peebles & Xie 2023); the defaults are the paper's ImageNet 256 setting on 32x32x4
    latents. ``depth``, ``hidden_size``, ``num_heads``, ``patch_size`` are 0: taken from
    ``variant``; set any of them > 0 to override it."""
    model = _common(
        "dit",
        image_size=image_size,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        num_classes=num_classes,
    )
    model.variant = variant  # "S|B|L|XL" / "2|4|8", or "" to give the sizes explicitly
    model.depth = 0
    model.hidden_size = 0
    model.num_heads = 0
    model.patch_size = 0
    model.mlp_ratio = 4.0
    return model


def mlp2d() -> ml_collections.ConfigDict:
    """Residual MLP denoiser for 2-D toy distributions (x of shape [B, 2])."""
    model = _common("mlp", image_size=0, in_channels=2, learn_sigma=False, num_classes=0)
    model.data_dim = 2
    model.hidden_size = 256
    model.num_layers = 4
    return model


def text_unet() -> ml_collections.ConfigDict:
    """A small text-conditional U-Net (diffusers' `UNet2DConditionModel` field names) on 8x8
    images, cross-attending to a small CLIP text encoder's states (Rombach et al. 2022,
    Sec. 3.3): attention at the 8x8 level and in the middle block, 4 heads."""
    model = _common("text_unet", image_size=8, in_channels=1, learn_sigma=False, num_classes=0)
    model.block_out_channels = (32, 64)
    model.layers_per_block = 1
    model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    model.mid_block_type = "UNetMidBlock2DCrossAttn"  # "" for none
    model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    model.attention_head_dim = 4  # heads per level, as SD's config.json means it
    model.transformer_layers_per_block = 1
    model.cross_attention_dim = 32  # = text_encoder.hidden_size
    model.norm_num_groups = 8
    model.use_linear_projection = True
    text = ml_collections.ConfigDict()
    text.vocab_size = 1024  # at least the tokenizer's (the digits captions': 561)
    text.hidden_size = 32
    text.intermediate_size = 128
    text.num_hidden_layers = 2
    text.num_attention_heads = 4
    text.max_position_embeddings = 16  # the tokenizer's max_length (CLIP's: 77)
    text.hidden_act = "quick_gelu"
    text.trainable = True  # False: frozen at its init or at `pretrained`, not in the optimizer
    # a transformers CLIPTextModel folder (config.json + model.safetensors) or a converted one
    text.pretrained = ""
    # a tokenizer folder (vocab.json + merges.txt, or tokenizer.json); "": a vocabulary
    # learned from data.caption_templates filled with the data set's class names
    text.tokenizer_path = ""
    model.text_encoder = text
    return model
