"""transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (Stable Diffusion's text
encoders, Radford et al. 2021) as our `models.text.CLIPTextModel`.

    config, params = load_text_encoder("stable-diffusion-v1-5/text_encoder")

The folder's config.json chooses the architecture (`CLIPTextConfig.from_transformers`, which
refuses other architectures and activations by key) and its safetensors file gives the
weights, read without PyTorch (pickled `.bin` files are refused). Both layouts of the state
dict load: the one the Hub's folders hold (``text_model.embeddings...``, as transformers 4
saved) and transformers 5's `CLIPTextModel`, which drops the ``text_model.`` prefix. The
``position_ids`` buffer older folders carry is not a weight and is skipped. Every missing,
unused or misshapen weight stops the load with its name and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffusion_jax.convert import diffusers_folder, torch_layout
from diffusion_jax.models import text
from diffusion_jax.models.text import CLIPTextConfig
from diffusion_jax.runtime import storage

PREFIX = "text_model."
PROJECTION = "text_projection.weight"
BUFFERS = (f"{PREFIX}embeddings.position_ids", "embeddings.position_ids")


def canonical_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict with transformers 4's names (``text_model.`` prefix on all but the
    projection), without the ``position_ids`` buffer."""
    weights = {name: value for name, value in state_dict.items() if name not in BUFFERS}
    if any(name.startswith(PREFIX) for name in weights):
        return weights
    return {(name if name == PROJECTION else PREFIX + name): v for name, v in weights.items()}


def text_encoder_params(
    state_dict: Mapping[str, np.ndarray], config: CLIPTextConfig, *, source: str
) -> dict:
    """Our `CLIPTextModel(config)` parameters of transformers' state dict (NumPy arrays)."""
    expected = text.param_shapes(config)
    return torch_layout.params_from_state_dict(
        canonical_state_dict(state_dict), expected, source=source
    )


def load_text_encoder(
    folder: storage.PathLike, *, variant: str | None = None
) -> tuple[CLIPTextConfig, dict]:
    """(config, params) of a transformers CLIP text encoder folder (config.json +
    model.safetensors, or its shards; ``variant="fp16"`` reads model.fp16.safetensors)."""
    folder = storage.as_path(folder)
    raw_config, state_dict = diffusers_folder.read_component(folder, variant=variant)
    config = CLIPTextConfig.from_transformers(raw_config, source=str(folder / "config.json"))
    weights = diffusers_folder.weight_files(folder, variant=variant)
    source = ", ".join(str(path) for path in weights)
    return config, text_encoder_params(state_dict, config, source=source)
