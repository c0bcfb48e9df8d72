"""The LPIPS weights file: our .npz format, read without torch and without unpickling.

Entries (float32, our layouts; Zhang et al. 2018's VGG16 network, `evaluation.lpips`):

    vgg/conv1_1/kernel  [3, 3, 3, 64]      ...  vgg/conv5_3/kernel  [3, 3, 512, 512]
    vgg/conv1_1/bias    [64]               ...  vgg/conv5_3/bias    [512]
    lin/relu1_2         [64]   the non-negative 1x1 "lin" weights of each tap (no bias)
    ...                 ...
    lin/relu5_3         [512]
    meta/format_version 1;  meta/source  the files it was converted from

`python -m diffusion_jax.convert.lpips` writes it from torchvision's VGG16 and the lin
weights the `lpips` package ships; `load_lpips(path)` reads and checks it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation import lpips
from diffusion_jax.runtime import storage

FORMAT_VERSION = 1
_META = "meta/"
CONVERT_COMMAND = "python -m diffusion_jax.convert.lpips --out FILE --vgg VGG16.pth"


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry but meta/ (module docstring), from the network itself."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(lpips.VGG16Features().init, jax.random.key(0), x)["params"]
    shapes = {
        f"vgg/{conv}/{leaf}": tuple(value.shape)
        for conv, leaves in abstract.items()
        for leaf, value in leaves.items()
    }
    shapes.update({f"lin/{tap}": (c,) for tap, c in zip(lpips.TAPS, lpips.TAP_CHANNELS)})
    return shapes


def check_entries(flat: Mapping[str, np.ndarray], *, source: str) -> None:
    """ValueError naming `source` and every missing, unexpected or misshapen entry, or lin
    weights below 0 (LPIPS's are non-negative, so that the distance is)."""
    expected = expected_shapes()
    problems = [f"missing {name} (expected shape {shape})" for name, shape in expected.items()
                if name not in flat]  # fmt: skip
    problems += [f"unexpected {name}" for name in sorted(set(flat) - set(expected))]
    problems += [
        f"{name} has shape {tuple(np.shape(flat[name]))}, expected {shape}"
        for name, shape in expected.items()
        if name in flat and tuple(np.shape(flat[name])) != shape
    ]
    problems += [
        f"{name} has negative weights (min {float(np.min(flat[name])):g}); LPIPS's are >= 0"
        for name in expected
        if name.startswith("lin/") and name in flat and np.size(flat[name])
        and np.min(flat[name]) < 0
    ]  # fmt: skip
    if problems:
        listed = "; ".join(problems[:12])
        more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(
            f"{source} is not an LPIPS (VGG16) weights file of ours: {listed}{more}. "
            f"Write one with `{CONVERT_COMMAND}`."
        )


def flatten(params: Mapping) -> dict[str, np.ndarray]:
    """{"vgg": {conv: {leaf}}, "lin": {tap}} -> {"vgg/conv/leaf", "lin/tap"}."""
    flat = {
        f"vgg/{conv}/{leaf}": np.asarray(value)
        for conv, leaves in params["vgg"].items()
        for leaf, value in leaves.items()
    }
    flat.update({f"lin/{tap}": np.asarray(value) for tap, value in params["lin"].items()})
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    params: dict = {"vgg": {}, "lin": {}}
    for name, value in flat.items():
        group, *rest = name.split("/")
        if group == "vgg":
            params["vgg"].setdefault(rest[0], {})[rest[1]] = value
        else:
            params["lin"][rest[0]] = value
    return params


def save_lpips(path: str | os.PathLike, params: Mapping, *, source: str) -> str:
    """Writes `params` (the tree `lpips.lpips_distance` takes) to `path`, checked first;
    `source` records where they came from. Returns the path."""
    flat = flatten(params)
    check_entries(flat, source=f"the LPIPS parameters for {path}")
    arrays = {name: value.astype(np.float32) for name, value in flat.items()}
    meta = {
        f"{_META}format_version": np.asarray(FORMAT_VERSION),
        f"{_META}source": np.asarray(source),
    }
    storage.save_npz(path, **arrays, **meta)
    return str(path)


def load_lpips(path: str | os.PathLike) -> dict:
    """The LPIPS parameters in `path` (our .npz, `save_lpips`), every entry checked.

    FileNotFoundError for a missing file; ValueError naming the file for one that is not
    an .npz, has another format version, or lacks, adds or misshapes an entry.
    """
    path = str(path)
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(
            f"LPIPS weights file {path!r} does not exist; write it with `{CONVERT_COMMAND}` "
            "(see diffusion_jax/convert/lpips.py)"
        )
    try:
        with storage.load_npz(path) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz LPIPS weights file ({error})") from None
    version = contents.pop(f"{_META}format_version", None)
    if version is None or int(version) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: meta/format_version is {version}, expected {FORMAT_VERSION}; "
            f"write the file with `{CONVERT_COMMAND}`"
        )
    flat = {name: value for name, value in contents.items() if not name.startswith(_META)}
    check_entries(flat, source=path)
    return jax.tree.map(jnp.asarray, unflatten(flat))
