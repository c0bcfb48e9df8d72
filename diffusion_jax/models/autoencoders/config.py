"""The architecture of a KL autoencoder, named as diffusers' `AutoencoderKL` config.json
names it, and the presets of the published latent spaces.

    config = AutoencoderConfig.from_diffusers(json.load(open("vae/config.json")))
    config = PRESETS["sd"]      # Stable Diffusion 1.x / 2.x (Rombach et al. 2022, kl-f8)

The latent a diffusion model sees is ``(z - shift_factor) * scaling_factor``; decoding
inverts it (`to_diffusion_latent`, `from_diffusion_latent`). SD's 0.18215 is 1 / std of the
first training batch's latents (LDM's scale-by-std); SD3 and Flux also shift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu",)
# config.json keys that describe weights we do not have (or runtime behaviour only)
_IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "force_upcast",
    "sample_size",
    "latents_mean",
    "latents_std",
}


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The architecture of `AutoencoderKL` (Rombach et al. 2022, Sec. 3.1 and App. G).

    The encoder has one down block of ``layers_per_block`` ResNet blocks per entry of
    ``block_out_channels`` (each but the last halving the resolution), the decoder mirrors
    it with ``layers_per_block + 1`` blocks per level; the downsampling factor is
    2 ** (len(block_out_channels) - 1).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        self.check()

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def check(self) -> None:
        """A ValueError naming the field at fault and what is allowed."""
        channels = self.block_out_channels
        if not channels or min(channels) < 1:
            raise ValueError(f"block_out_channels={channels} must be non-empty positive ints")
        bad = [c for c in channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={channels} (these do not: {bad})"
            )
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor} must be > 0")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "config.json"):
        """Our config of a diffusers `AutoencoderKL` config.json; a ValueError naming the key
        for anything this architecture does not have (another block type, activation, ...)."""
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(
                f"{source}: _class_name={config['_class_name']!r}; allowed: 'AutoencoderKL'"
            )
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        expected = {
            "down_block_types": [DOWN_BLOCK] * levels,
            "up_block_types": [UP_BLOCK] * levels,
        }
        for key, allowed in expected.items():
            found = list(config.get(key, allowed))
            if found != allowed:
                raise ValueError(f"{source}: {key}={found} is not supported; allowed: {allowed}")
        if config.get("act_fn", "silu") not in ACTIVATIONS:
            raise ValueError(f"{source}: act_fn={config['act_fn']!r}; allowed: {ACTIVATIONS}")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | set(expected) | {"act_fn"} | _IGNORED_KEYS
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"{source}: unsupported AutoencoderKL option(s) {unknown}; known: {sorted(known)}"
            )
        values = {key: config[key] for key in fields if config.get(key) is not None}
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json of the same architecture for diffusers' `AutoencoderKL`."""
        levels = len(self.block_out_channels)
        values = dataclasses.asdict(self)
        values["block_out_channels"] = list(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "down_block_types": [DOWN_BLOCK] * levels,
            "up_block_types": [UP_BLOCK] * levels,
            "act_fn": "silu",
            **values,
        }


def to_diffusion_latent(z: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """The latent a diffusion model sees: (z - shift_factor) * scaling_factor."""
    return (z - config.shift_factor) * config.scaling_factor


def from_diffusion_latent(latent: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """The autoencoder's z of a diffusion latent: latent / scaling_factor + shift_factor."""
    return latent / config.scaling_factor + config.shift_factor


PRESETS: dict[str, AutoencoderConfig] = {
    # SD 1.x / 2.x (CompVis kl-f8; HF `AutoencoderKL` of runwayml and stabilityai)
    "sd": AutoencoderConfig(),
    # SDXL: same architecture, retrained, scale 0.13025
    "sdxl": AutoencoderConfig(scaling_factor=0.13025),
    # SD3: 16 latent channels, no quantisation convolutions, (z - 0.0609) * 1.5305
    "sd3": AutoencoderConfig(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # Flux: as SD3 with scale 0.3611 and shift 0.1159
    "flux": AutoencoderConfig(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # Ours for 32 x 32 digits: f = 4 (8 x 8 x 4 latents), 32 / 64 / 64 channels
    "digits_f4": AutoencoderConfig(
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=1.0,
    ),
    # Ours for natural-image crops: f = 4, 64 / 128 / 128 channels, 3-channel latents (kl-f4)
    "photos_f4": AutoencoderConfig(
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        latent_channels=3,
        scaling_factor=1.0,
    ),
}
