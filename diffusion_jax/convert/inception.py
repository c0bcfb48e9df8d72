"""Converts pytorch-fid's FID Inception weights (.pth) into our .npz format.

    python -m diffusion_jax.convert.inception \\
        --torch_weights pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

On a machine with internet, `--download DIR` first fetches the .pth from pytorch-fid's
release and checks its SHA-256 prefix. Reading a .pth needs torch (`pip install -e
'.[torch]'`); the .npz it writes is loaded without torch by `inception.py`.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np

from diffusion_jax.evaluation import inception, inception_weights

# torch BatchNorm / Linear / Conv2d parameter names -> (collection, our leaf name).
_LEAF_NAMES = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}


def torch_key_to_flax_name(key: str) -> str | None:
    """ "Mixed_5b.branch1x1.conv.weight" -> "params/Mixed_5b/branch1x1/conv/kernel".

    Returns None for entries the FID network does not use (BatchNorm step counters).
    """
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    mapped = _LEAF_NAMES.get(tuple(parts[-2:]))
    if mapped is None:
        raise ValueError(
            f"state dict key {key!r} not allowed: expected conv.weight, bn.weight, bn.bias, "
            "bn.running_mean, bn.running_var, bn.num_batches_tracked, fc.weight or fc.bias"
        )
    collection, leaf = mapped
    return "/".join([collection, *parts[:-1], leaf])


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid `fid_inception_v3().state_dict()` (as numpy) -> flattened Flax variables.

    Conv kernels [out, in, kh, kw] become [kh, kw, in, out]; the fc weight [1008, 2048]
    becomes a Dense kernel [2048, 1008].
    """
    flat = {}
    for key, value in state_dict.items():
        name = torch_key_to_flax_name(key)
        if name is None:
            continue
        value = np.asarray(value, dtype=np.float32)
        if name.endswith("conv/kernel"):
            value = value.transpose(2, 3, 1, 0)
        elif name == "params/fc/kernel":
            value = value.T
        flat[name] = np.ascontiguousarray(value)
    inception_weights.check_variable_shapes(flat, source="converted state dict")
    return flat


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading a .pth file needs torch: pip install -e '.[torch]' "
            "(only the conversion needs it; the converted .npz loads without torch)"
        ) from error
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.detach().numpy() for key, value in state_dict.items()}


def check_fid_weights_hash(path: str | os.PathLike) -> str:
    """Returns the file's SHA-256; ValueError unless it starts with pytorch-fid's prefix."""
    sha256 = inception_weights.sha256_of_file(path)
    if not sha256.startswith(inception.FID_WEIGHTS_SHA256_PREFIX):
        raise ValueError(
            f"{path}: SHA-256 {sha256} does not start with "
            f"{inception.FID_WEIGHTS_SHA256_PREFIX!r}, so it is not pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (pass allow_nonstandard_weights / "
            "--allow_nonstandard_weights to convert it anyway: its scores are not FID)"
        )
    return sha256


def convert_torch_file(
    torch_weights: str | os.PathLike,
    out: str | os.PathLike,
    *,
    allow_nonstandard_weights: bool = False,
) -> inception_weights.InceptionWeightsInfo:
    """Reads a pytorch-fid .pth, converts it and writes our .npz (recording its SHA-256)."""
    if not os.path.isfile(torch_weights):
        raise FileNotFoundError(f"torch_weights {str(torch_weights)!r} does not exist")
    if allow_nonstandard_weights:
        source_sha256 = inception_weights.sha256_of_file(torch_weights)
    else:
        source_sha256 = check_fid_weights_hash(torch_weights)
    flat = convert_state_dict(read_torch_state_dict(torch_weights))
    variables = inception_weights.unflatten_variables(flat)
    return inception_weights.save_inception_variables(out, variables, source_sha256=source_sha256)


def download_fid_weights(directory: str | os.PathLike) -> str:
    """One-time download of pytorch-fid's .pth into `directory`, checking its hash prefix."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, os.path.basename(inception.FID_WEIGHTS_URL))
    if not os.path.isfile(path):
        partial = path + ".part"
        urllib.request.urlretrieve(inception.FID_WEIGHTS_URL, partial)
        os.replace(partial, path)
    check_fid_weights_hash(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_weights", help="pytorch-fid .pth file to convert")
    parser.add_argument("--download", metavar="DIR", help="download the .pth into DIR first")
    parser.add_argument("--out", required=True, help="output .npz (our format)")
    parser.add_argument("--allow_nonstandard_weights", action="store_true")
    args = parser.parse_args(argv)
    if (args.torch_weights is None) == (args.download is None):
        parser.error("give exactly one of --torch_weights FILE or --download DIR")
    torch_weights = args.torch_weights or download_fid_weights(args.download)
    info = convert_torch_file(
        torch_weights, args.out, allow_nonstandard_weights=args.allow_nonstandard_weights
    )
    print(f"wrote {info.path}\n  source_sha256  {info.source_sha256}")
    print(f"  content_digest {info.content_digest}")
    print(f"  standard FID weights: {info.is_standard_fid_weights}")


if __name__ == "__main__":
    main()
