"""Reading one component folder of a diffusers (or transformers) model: its config.json
and its safetensors weights, as NumPy arrays, without PyTorch.

    config, state_dict = read_component("stable-diffusion-v1-5/vae")  # or gs://bucket/...

A component folder holds `config.json` and `<stem>.safetensors` (diffusers' stem is
`diffusion_pytorch_model`, transformers' `model`), or shards listed in
`<stem>.safetensors.index.json`; `variant="fp16"` reads `<stem>.fp16.safetensors`. Pickled
`.bin` weights are never loaded (unpickling runs code a file may carry): the error says how
to save them as safetensors. A folder may be local or a URL (`gs://`, through
`runtime.storage`); remote weights are read whole into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from safetensors.numpy import load, load_file

from diffusion_jax.runtime import storage

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def read_config(folder: epath.Path) -> dict:
    """The folder's config.json, with a clear error when it is absent or not JSON."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers component folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _suffix(variant: str | None) -> str:
    return f".{variant}.safetensors" if variant else ".safetensors"


def weight_files(
    folder: epath.Path, *, variant: str | None = None, stems: Sequence[str] = WEIGHT_STEMS
) -> list[epath.Path]:
    """The safetensors file(s) holding the folder's weights (one file, or the shards of an
    index), or a FileNotFoundError that names what was looked for and what is there."""
    suffix = _suffix(variant)
    for stem in stems:
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise FileNotFoundError(
            f"{folder} holds only pickled weights {pickles}, which are not loaded (unpickling "
            "can run code). Save them as safetensors first, e.g. in PyTorch: "
            "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`"
        )
    looked_for = [f"{stem}{suffix}" for stem in stems]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise FileNotFoundError(f"{folder}: none of {looked_for} (or their index) found; it holds "
                            f"{present}")  # fmt: skip


def read_weights(folder: epath.Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), by its PyTorch name."""
    state_dict = {}
    for path in weight_files(folder, variant=variant):
        if not path.is_file():
            raise FileNotFoundError(f"{path}, a shard listed in the folder's index, is missing")
        if storage.is_remote(path):
            state_dict.update(load(path.read_bytes()))
        else:
            state_dict.update(load_file(os.fspath(path)))
    return state_dict


def read_component(
    folder: storage.PathLike, *, variant: str | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, the state dict as NumPy arrays) of a component folder."""
    folder = storage.as_path(folder)
    return read_config(folder), read_weights(folder, variant=variant)
