"""The architecture of a CLIP text encoder (Radford et al. 2021, Sec. 2.4), named as
transformers' `CLIPTextConfig` config.json names it, and the presets of Stable Diffusion's.

    config = CLIPTextConfig.from_transformers(json.load(open("text_encoder/config.json")))
    config = PRESETS["sd1"]     # openai/clip-vit-large-patch14, as in SD 1.x folders

`with_projection` tells a `CLIPTextModelWithProjection` (SDXL's second encoder: pooled
output times `text_projection`) from a `CLIPTextModel`; config.json's ``architectures``
says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
MODEL_TYPE = "clip_text_model"
# Bookkeeping, and options that act only in training or initialisation (dropout is off in
# inference, which is all the text encoder does here)
_IGNORED_KEYS = {
    "_name_or_path",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "attention_dropout",
    "dropout",
    "initializer_factor",
    "initializer_range",
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text transformer of CLIP (Radford et al. 2021, Sec. 2.4 and Table 20).

    ``num_hidden_layers`` pre-LN layers of causal self-attention (``num_attention_heads``
    heads over ``hidden_size``) and an MLP of width ``intermediate_size``, over token and
    learned position embeddings of at most ``max_position_embeddings`` tokens; a final
    LayerNorm. The pooled output is the state at the end-of-text token: the argmax of the
    token ids when ``eos_token_id == 2`` (configs written before transformers PR #24773,
    e.g. every SD folder), else the first position holding ``eos_token_id``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    with_projection: bool = False

    def __post_init__(self):
        self.check()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        """A ValueError naming the field at fault and what is allowed."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; supported: {ACTIVATIONS}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "projection_dim",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0")

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, source: str = "config.json"):
        """Our config of the config.json of a transformers `CLIPTextModel` or
        `CLIPTextModelWithProjection`; a ValueError naming the key for anything else."""
        architectures = list(config.get("architectures") or ["CLIPTextModel"])
        if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures={architectures}; supported: {sorted(ARCHITECTURES)}"
            )
        if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(
                f"{source}: model_type={config['model_type']!r}; supported: {MODEL_TYPE!r}"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        unknown = sorted(set(config) - fields - _IGNORED_KEYS)
        if unknown:
            raise ValueError(
                f"{source}: unsupported CLIPTextConfig option(s) {unknown}; known: "
                f"{sorted(fields | _IGNORED_KEYS)}"
            )
        values = {key: config[key] for key in fields if config.get(key) is not None}
        try:
            return cls(**values, with_projection=ARCHITECTURES[architectures[0]])
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def to_transformers(self) -> dict[str, Any]:
        """The config.json of the same architecture for transformers."""
        values = dataclasses.asdict(self)
        with_projection = values.pop("with_projection")
        architecture = next(name for name, proj in ARCHITECTURES.items() if proj == with_projection)
        return {"architectures": [architecture], "model_type": MODEL_TYPE, **values}


# The text encoders of SD folders keep the bos / eos / pad ids 0 / 2 / 1 that transformers'
# CLIPTextConfig defaulted to before PR #24773; eos 2 selects the argmax pooling rule, which
# finds the same end-of-text token as the tokenizer's 49407 is the largest id.
_SD_FOLDER_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

PRESETS: dict[str, CLIPTextConfig] = {
    # SD 1.x text_encoder/: openai/clip-vit-large-patch14's text tower. From REFERENCE2:
    # vocab 49408, hidden 768, 12 layers, 12 heads, 77 positions, quick_gelu. Ours (the
    # published config): intermediate 3072 (4 x hidden), projection_dim 768, eps 1e-5.
    "sd1": CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        **_SD_FOLDER_IDS,
    ),
    # SD 2.x text_encoder/: OpenCLIP ViT-H/14's text tower without its last block, so that
    # last_hidden_state is the penultimate layer + LN. From REFERENCE2: hidden 1024,
    # 23 layers, 16 heads. Ours (the folder's config.json): gelu, intermediate 4096,
    # projection_dim 512 (unused: a CLIPTextModel has no projection), vocab 49408.
    "sd2": CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=512,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        **_SD_FOLDER_IDS,
    ),
}
