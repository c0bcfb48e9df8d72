"""The architecture of a text-conditional U-Net, named as diffusers' `UNet2DConditionModel`
config.json names it, and the presets of Stable Diffusion 1.x and 2.x.

    config = UNetConditionConfig.from_diffusers(json.load(open("unet/config.json")))
    config = PRESETS["sd15"]    # Stable Diffusion 1.x (Rombach et al. 2022)

diffusers' ``attention_head_dim`` is, for SD, the number of heads (its issue #2011): a block's
heads are ``num_attention_heads or attention_head_dim`` and each head is
``channels // heads`` wide, as diffusers resolves them (`heads`, `head_dims`). Options this
port does not implement (other block types, time embeddings, attention kinds) are refused by
key, value and what is supported, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

CLASS_NAME = "UNet2DConditionModel"
CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
DOWN_BLOCK_TYPES = (CROSS_ATTN_DOWN, DOWN)
UP_BLOCK_TYPES = (CROSS_ATTN_UP, UP)
MID_BLOCK_TYPES = (MID, None)

# config.json keys whose only supported values are these (diffusers' default first)
FIXED_KEYS: dict[str, tuple] = {
    "act_fn": ("silu",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "downsample_padding": (1,),
    "dropout": (0.0,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# bookkeeping, and a key that only matters with an addition embedding (refused above)
_IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "addition_embed_type_num_heads",
}
_PER_BLOCK = ("layers_per_block", "transformer_layers_per_block", "attention_head_dim")


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class UNetConditionConfig:
    """The architecture of `UNet2DConditionModel` (Rombach et al. 2022, Sec. 3.3 and App. E),
    field for field diffusers' config.json; defaults are diffusers' defaults.

    One down block per entry of ``block_out_channels`` (each but the last halving the
    resolution), the middle block, one up block per level from the lowest resolution up;
    ``layers_per_block``, ``transformer_layers_per_block``, ``attention_head_dim`` and
    ``num_attention_heads`` are one int or one per level (down order).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
    mid_block_type: str | None = MID
    up_block_types: tuple[str, ...] = (UP,) + (CROSS_ATTN_UP,) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    mid_block_scale_factor: float = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    time_embedding_dim: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _as_tuple(getattr(self, field.name)))
        self.check()

    # --- derived, one entry per level (down order) ---------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    def per_level(self, name: str) -> tuple:
        """Field `name` (an int or one value per level) as one value per level."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.num_levels

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level: ``num_attention_heads or attention_head_dim``."""
        if self.num_attention_heads is not None:
            return self.per_level("num_attention_heads")
        return self.per_level("attention_head_dim")

    @property
    def head_dims(self) -> tuple[int, ...]:
        """Width of one head per level, ``channels // heads`` (diffusers floors it)."""
        return tuple(c // h for c, h in zip(self.block_out_channels, self.heads, strict=True))

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # --- checks --------------------------------------------------------------------------
    def check(self) -> None:
        """A ValueError naming the field (config.json key) at fault and what is allowed."""
        self._check_block_types()
        self._check_per_level()
        names = ("in_channels", "out_channels", "norm_num_groups", "cross_attention_dim")
        for name in names:
            self._check_positive(name, getattr(self, name))
        channels = self.block_out_channels
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={list(channels)} (these do not: {bad})"
            )
        for name in ("num_class_embeds", "time_embedding_dim"):
            if getattr(self, name) is not None:
                self._check_positive(name, getattr(self, name))
        key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        too_many = [(c, h) for c, h in zip(channels, self.heads, strict=True) if h > c]
        if too_many:
            raise ValueError(f"{key}: more heads than channels (channels, heads) {too_many}")

    def _check_block_types(self) -> None:
        levels = self.num_levels
        if levels < 1:
            raise ValueError("block_out_channels must be non-empty")
        self._check_positive("block_out_channels", self.block_out_channels)
        for name, allowed in [
            ("down_block_types", DOWN_BLOCK_TYPES),
            ("up_block_types", UP_BLOCK_TYPES),
        ]:
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != levels:
                raise ValueError(
                    f"{name}={types!r} needs one entry per block_out_channels ({levels})"
                )
            unsupported = sorted({t for t in types if t not in allowed}, key=str)
            if unsupported:
                raise ValueError(
                    f"{name}={list(types)}: {unsupported} not supported; supported: {list(allowed)}"
                )
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"mid_block_type={self.mid_block_type!r} is not supported; supported: "
                f"{list(MID_BLOCK_TYPES)}"
            )

    def _check_per_level(self) -> None:
        for name in (*_PER_BLOCK, "num_attention_heads"):
            value = getattr(self, name)
            if value is None and name == "num_attention_heads":
                continue
            if isinstance(value, tuple) and len(value) != self.num_levels:
                raise ValueError(
                    f"{name}={list(value)} needs one entry per block_out_channels "
                    f"({self.num_levels})"
                )
            self._check_positive(name, value)

    @staticmethod
    def _check_positive(name: str, value) -> None:
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(_is_int(v) and v >= 1 for v in values):
            raise ValueError(f"{name}={value!r} must be a positive int (or one per level)")

    # --- diffusers config.json -----------------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "config.json"):
        """Our config of a diffusers `UNet2DConditionModel` config.json; a ValueError naming
        the key, its value and the supported values for anything this port lacks."""
        name = config.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"{source}: _class_name={name!r}; supported: {CLASS_NAME!r}")
        for key, allowed in FIXED_KEYS.items():
            if key in config and not _allowed(config[key], allowed):
                raise ValueError(
                    f"{source}: {key}={config[key]!r} is not supported; supported: {list(allowed)}"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields - set(FIXED_KEYS) - _IGNORED_KEYS)
        if unknown:
            raise ValueError(
                f"{source}: unknown {CLASS_NAME} option(s) {unknown}; known: "
                f"{sorted(fields | set(FIXED_KEYS))}"
            )
        try:
            return cls(**{key: config[key] for key in fields if key in config})
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source}: {error}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json of the same architecture for diffusers' `UNet2DConditionModel`."""
        values = {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }
        fixed = {key: allowed[0] for key, allowed in FIXED_KEYS.items()}
        return {"_class_name": CLASS_NAME, **fixed, **values}


def _allowed(value, allowed: tuple) -> bool:
    """`value` is one of `allowed`, telling bools and None apart from numbers (False is not
    0 here) but taking an int for an equal float (a config.json may write 1 for 1.0)."""
    for option in allowed:
        if option is None or isinstance(option, (bool, str)):
            if type(value) is type(option) and value == option:
                return True
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == option:
            return True
    return False


PRESETS: dict[str, UNetConditionConfig] = {
    # SD 1.x (CompVis / runwayml v1-5): 8 heads, CLIP ViT-L/14 text states (768), conv
    # projections; 859,520,964 parameters
    "sd15": UNetConditionConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    # SD 2.x (stabilityai 2-1, the 768-v model): 64-wide heads (5, 10, 20, 20 heads), OpenCLIP
    # ViT-H/14 text states (1024), linear projections, float32 attention logits;
    # 865,910,724 parameters
    "sd21": UNetConditionConfig(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}
