"""The FID Inception's weights file: our .npz format (flat "params/..." arrays plus "meta/"
entries: format version, content digest, the source file's SHA-256), saved and loaded with
every shape checked against the network.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation.inception import (
    FID_WEIGHTS_SHA256_PREFIX,
    INCEPTION_SIZE,
    FIDInceptionV3,
)
from diffusion_jax.runtime import storage

FORMAT_VERSION = 1
_META_PREFIX = "meta/"


def _flatten_leaves(tree: Mapping) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(key.key) for key in path): leaf for path, leaf in leaves}


def flatten_variables(variables: Mapping) -> dict[str, np.ndarray]:
    """Nested {"params": ..., "batch_stats": ...} -> {"params/a/b/kernel": array}."""
    return {name: np.asarray(leaf) for name, leaf in _flatten_leaves(variables).items()}


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> dict:
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


@functools.cache
def expected_variable_shapes() -> dict[str, tuple[int, ...]]:
    """Flattened name -> shape of every variable of FIDInceptionV3 (no computation)."""
    abstract = jax.eval_shape(
        FIDInceptionV3().init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32),
    )
    return {name: tuple(leaf.shape) for name, leaf in _flatten_leaves(abstract).items()}


def content_digest(flat: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and float32 bytes: independent of the zip."""
    digest = hashlib.sha256()
    for name in sorted(flat):
        array = np.ascontiguousarray(flat[name], dtype=np.float32)
        digest.update(f"{name}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_variable_shapes(flat: Mapping[str, np.ndarray], *, source: str) -> None:
    """Raises ValueError naming `source` if names or shapes differ from FIDInceptionV3's."""
    expected = expected_variable_shapes()
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [
        f"{name}: {tuple(flat[name].shape)} != {shape}"
        for name, shape in expected.items()
        if name in flat and tuple(flat[name].shape) != shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source}: not FID InceptionV3 weights in our format: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"wrong shapes {wrong[:5]} ({len(wrong)}). Convert the pytorch-fid file with "
            "`python -m diffusion_jax.convert.inception` (docs/evaluation.md)."
        )


class InceptionWeightsInfo(NamedTuple):
    path: str
    source_sha256: str  # SHA-256 of the .pth file the weights were converted from
    content_digest: str

    @property
    def is_standard_fid_weights(self) -> bool:
        """True when converted from pytorch-fid's pt_inception-2015-12-05-6726825d.pth."""
        return self.source_sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)


def save_inception_variables(
    path: str | os.PathLike, variables: Mapping, *, source_sha256: str
) -> InceptionWeightsInfo:
    """Writes variables as an .npz of flattened names plus metadata (loadable without torch)."""
    flat = flatten_variables(variables)
    check_variable_shapes(flat, source=str(path))
    digest = content_digest(flat)
    meta = {
        f"{_META_PREFIX}format_version": np.asarray(FORMAT_VERSION),
        f"{_META_PREFIX}source_sha256": np.asarray(source_sha256),
        f"{_META_PREFIX}content_digest": np.asarray(digest),
    }
    arrays = {name: value.astype(np.float32) for name, value in flat.items()}
    storage.save_npz(path, **arrays, **meta)
    return InceptionWeightsInfo(str(path), source_sha256, digest)


def load_inception_variables(
    path: str | os.PathLike, *, expected_digest: str | None = None
) -> tuple[dict, InceptionWeightsInfo]:
    """Loads and verifies converted weights: names, shapes, content digest.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not ours,
    is corrupted (digest differs from the one written at conversion), or differs from
    `expected_digest`.
    """
    path = str(path)
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(
            f"Inception weights file {path!r} does not exist. Get pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth and convert it with `python -m "
            "diffusion_jax.convert.inception --torch_weights FILE --out "
            f"{path}` (see docs/evaluation.md)."
        )
    try:
        with storage.load_npz(path) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz weights file ({error})") from error
    meta = {k[len(_META_PREFIX) :]: v for k, v in contents.items() if k.startswith(_META_PREFIX)}
    flat = {k: v for k, v in contents.items() if not k.startswith(_META_PREFIX)}
    if int(meta.get("format_version", -1)) != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    check_variable_shapes(flat, source=path)
    digest = content_digest(flat)
    if digest != str(meta["content_digest"]):
        raise ValueError(f"{path}: content digest {digest} != recorded {meta['content_digest']}")
    if expected_digest is not None and digest != expected_digest:
        raise ValueError(f"{path}: content digest {digest} != expected_digest {expected_digest}")
    info = InceptionWeightsInfo(path, str(meta["source_sha256"]), digest)
    return unflatten_variables(flat), info
