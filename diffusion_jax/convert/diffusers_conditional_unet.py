"""diffusers' `UNet2DConditionModel` (Stable Diffusion's denoiser) as our conditional U-Net.

    config, params = load_unet("stable-diffusion-v1-5/unet")             # a diffusers folder
    config, params = load_unet("stable-diffusion-2-1/unet", variant="fp16")
    eps = UNet2DConditionModel(config).apply({"params": params}, latents, t, text_states)

The folder's config.json chooses the architecture (`UNetConditionConfig.from_diffusers`,
which refuses what this port lacks by key and value) and its safetensors file(s) give the
weights, read without PyTorch (pickled .bin files are refused by `diffusers_folder`). Our
module names are diffusers' parameter names, so `torch_layout` maps every weight by one rule
against the shapes of our model's own tree; every missing, unused or misshapen weight stops
the load with its name and shapes, nothing half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffusion_jax.convert import diffusers_folder, torch_layout
from diffusion_jax.models import conditional_unet
from diffusion_jax.models.conditional_unet import UNetConditionConfig
from diffusion_jax.runtime import storage


def unet_params_from_diffusers(
    state_dict: Mapping[str, np.ndarray],
    config: UNetConditionConfig,
    *,
    source: str,
    dtype=np.float32,
) -> dict:
    """Our `UNet2DConditionModel(config)` parameters of diffusers' state dict (NumPy
    arrays), cast to `dtype`; a ValueError naming `source` and every weight that does not fit.
    """
    expected = conditional_unet.param_shapes(config)
    return torch_layout.params_from_state_dict(state_dict, expected, source=source, dtype=dtype)


def load_unet(
    folder: storage.PathLike, *, variant: str | None = None, dtype=np.float32
) -> tuple[UNetConditionConfig, dict]:
    """(config, params) of a diffusers `unet/` folder (config.json + safetensors), the
    parameters as NumPy arrays of `dtype` (float32 by default, also for fp16 variants)."""
    folder = storage.as_path(folder)
    raw_config = diffusers_folder.read_config(folder)
    config = UNetConditionConfig.from_diffusers(raw_config, source=str(folder / "config.json"))
    state_dict = diffusers_folder.read_weights(folder, variant=variant)
    weights = diffusers_folder.weight_files(folder, variant=variant)
    source = ", ".join(str(path) for path in weights)
    return config, unet_params_from_diffusers(state_dict, config, source=source, dtype=dtype)
