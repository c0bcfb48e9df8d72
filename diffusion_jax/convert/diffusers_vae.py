"""diffusers' `AutoencoderKL` (Stable Diffusion's VAE) as our autoencoder, and its one-time
conversion to an Orbax checkpoint.

    config, params = load_autoencoder("stable-diffusion-v1-5/vae")   # a diffusers folder
    python -m diffusion_jax.convert.diffusers_vae --vae stable-diffusion-v1-5/vae --out sd_vae
    config, params = load_autoencoder("sd_vae")                       # the converted one

The folder's config.json chooses the architecture (`AutoencoderConfig.from_diffusers`,
which refuses other block types by key) and its safetensors file gives the weights, read
without PyTorch. Old checkpoints' attention names (query, key, value, proj_attn) are read
as the current ones (to_q, to_k, to_v, to_out.0), as diffusers does on loading them.
Every missing, unused or misshapen weight stops the load with its name and shapes.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import models
from diffusion_jax.convert import diffusers_folder, torch_layout
from diffusion_jax.models import autoencoders
from diffusion_jax.models.autoencoders import AutoencoderConfig
from diffusion_jax.runtime import storage

CONVERTED_CONFIG = "autoencoder_config.json"
CONVERTED_PARAMS = "params"
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _current_name(name: str) -> str:
    match = _DEPRECATED.match(name)
    if not match:
        return name
    prefix, part, leaf = match.groups()
    return f"{prefix}.{_DEPRECATED_ATTENTION[part]}.{leaf}"


def autoencoder_params_from_diffusers(
    state_dict: Mapping[str, np.ndarray], config: AutoencoderConfig, *, source: str
) -> dict:
    """Our `AutoencoderKL(config)` parameters of diffusers' state dict (NumPy arrays)."""
    renamed = {_current_name(name): value for name, value in state_dict.items()}
    expected = autoencoders.param_shapes(config)
    return torch_layout.params_from_state_dict(renamed, expected, source=source)


def load_diffusers_autoencoder(
    folder: storage.PathLike, *, variant: str | None = None
) -> tuple[AutoencoderConfig, dict]:
    """(config, params) of a diffusers `AutoencoderKL` folder (config.json + safetensors)."""
    folder = storage.as_path(folder)
    raw_config, state_dict = diffusers_folder.read_component(folder, variant=variant)
    config = AutoencoderConfig.from_diffusers(raw_config, source=str(folder / "config.json"))
    weights = diffusers_folder.weight_files(folder, variant=variant)
    source = ", ".join(str(path) for path in weights)
    return config, autoencoder_params_from_diffusers(state_dict, config, source=source)


def save_converted(out: storage.PathLike, config: AutoencoderConfig, params) -> epath.Path:
    """Writes `out/autoencoder_config.json` and the Orbax checkpoint `out/params`."""
    out = storage.absolute(out)
    storage.write_text(out / CONVERTED_CONFIG, json.dumps(config.to_diffusers(), indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / CONVERTED_PARAMS, params, force=True)
    return out


def load_autoencoder(
    path: storage.PathLike, *, variant: str | None = None
) -> tuple[AutoencoderConfig, dict]:
    """(config, params) of a converted folder (`save_converted`) or a diffusers folder."""
    path = storage.absolute(path)
    if not (path / CONVERTED_CONFIG).is_file():
        return load_diffusers_autoencoder(path, variant=variant)
    raw = json.loads((path / CONVERTED_CONFIG).read_text())
    config = AutoencoderConfig.from_diffusers(raw, source=str(path / CONVERTED_CONFIG))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / CONVERTED_PARAMS, autoencoders.param_shapes(config))
    return config, params


def main(argv: Sequence[str] | None = None) -> epath.Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder")
    parser.add_argument("--out", required=True, help="folder for the converted checkpoint")
    parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    args = parser.parse_args(argv)
    config, params = load_diffusers_autoencoder(args.vae, variant=args.variant)
    out = save_converted(args.out, config, params)
    print(
        f"Converted {args.vae} to {out}: {models.count_params(params) / 1e6:.1f}M parameters, "
        f"{config.latent_channels} latent channels, {config.downsampling_factor}x "
        f"downsampling, scaling_factor {config.scaling_factor}"
    )
    return out


if __name__ == "__main__":
    main()
