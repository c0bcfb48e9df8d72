"""Converts LPIPS's VGG16 weights (Zhang et al. 2018) from PyTorch files into our .npz.

    python -m diffusion_jax.convert.lpips --out lpips_vgg.npz \\
        --vgg vgg16-397923af.pth [--lin vgg.pth]

`--vgg`: torchvision's ImageNet VGG16 state dict (keys `features.N.weight`; the classifier
is ignored). torchvision keeps it in ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth
once `torchvision.models.vgg16(weights="IMAGENET1K_V1")` has run; nothing is downloaded
here. `--lin`: the lin layers of LPIPS v0.1 (keys `lin0.model.1.weight` ... `lin4`); by
default the file the `lpips` package ships, lpips/weights/v0.1/vgg.pth (the same weights
LDM's taming `LPIPS` loads). A whole `lpips.LPIPS(net="vgg").state_dict()` (keys
`net.sliceK.N.weight` and `lin*`) serves as either file, and alone as both.

Reading a .pth needs torch (`pip install -e '.[torch]'`) and uses `torch.load(...,
weights_only=True)`, which unpickles no code; the .npz it writes loads without torch
(`evaluation.lpips_weights.load_lpips`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from diffusion_jax.evaluation import inception_weights, lpips, lpips_weights

# torchvision vgg16().features: the indices of the 13 convolutions (ReLUs and pools between).
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_KEY = re.compile(r"^(features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.[01]\.weight$")  # model.0 without dropout
SHIPPED_LIN = ("weights", "v0.1", "vgg.pth")
_WHAT = {
    "vgg": "VGG16 convolutions (features.N.weight, or net.sliceK.N.weight of lpips.LPIPS)",
    "lin": "LPIPS lin layers (lin0.model.1.weight ... lin4.model.1.weight)",
}


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of our entry `name` of `shape` (for error messages)."""
    if name.endswith("/kernel"):
        return (shape[3], shape[2], shape[0], shape[1])
    return (1, shape[0], 1, 1) if name.startswith("lin/") else shape


def _our_entry(key: str) -> tuple[str, str] | None:
    """(our name, "vgg" or "lin") of a PyTorch key, or None for keys LPIPS does not use
    (the classifier, the scaling layer's buffers, `lins.*` copies of `lin*`)."""
    convs = dict(zip(VGG_CONV_INDICES, lpips.conv_names()))
    match = _VGG_KEY.match(key)
    if match and int(match[2]) in convs:
        leaf = "kernel" if match[3] == "weight" else "bias"
        return f"vgg/{convs[int(match[2])]}/{leaf}", "vgg"
    match = _LIN_KEY.match(key)
    if match and int(match[1]) < len(lpips.TAPS):
        return f"lin/{lpips.TAPS[int(match[1])]}", "lin"
    return None


def entries_from_state_dict(
    state_dict: Mapping[str, np.ndarray], part: str, *, source: str
) -> dict[str, np.ndarray]:
    """Our entries of `part` ("vgg" or "lin") in a PyTorch state dict, in our layouts:
    conv weights [out, in, 3, 3] -> kernels [3, 3, in, out]; lin [1, C, 1, 1] -> [C].
    ValueError naming `source` and the PyTorch keys when any is missing or misshapen."""
    expected = {k: v for k, v in lpips_weights.expected_shapes().items() if k.startswith(part)}
    found, torch_keys, problems = {}, {}, []
    for key, value in state_dict.items():
        entry = _our_entry(key)
        if entry is None or entry[1] != part:
            continue
        name, value = entry[0], np.asarray(value, np.float32)
        torch_keys[name] = key
        torch_shape = _torch_shape(name, expected[name])
        if value.shape != torch_shape:
            problems.append(f"{key} has shape {value.shape}, expected {torch_shape}")
        elif name.endswith("/kernel"):
            found[name] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        else:
            found[name] = value.reshape(expected[name])
    missing = [name for name in expected if name not in torch_keys]
    if len(missing) == len(expected):
        what = _WHAT[part]
        raise ValueError(f"{source} holds no {what}")
    problems += [f"missing the weight of {name} (PyTorch shape "
                 f"{_torch_shape(name, expected[name])})" for name in missing]  # fmt: skip
    if problems:
        raise ValueError(f"{source} does not fit LPIPS's VGG16: " + "; ".join(problems))
    return found


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .pth state dict as NumPy arrays, read by `torch.load(weights_only=True)`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading a .pth file needs torch: pip install -e '.[torch]' "
            "(only the conversion needs it; the converted .npz loads without torch)"
        ) from error
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state_dict.items() if hasattr(v, "numpy")}


def shipped_lin_weights() -> pathlib.Path:
    """lpips/weights/v0.1/vgg.pth of the installed `lpips` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no --lin file given and the lpips package is not installed: pass --lin with "
            "LPIPS v0.1's vgg.pth, or pip install lpips"
        )
    return pathlib.Path(spec.origin).parent.joinpath(*SHIPPED_LIN)


def _describe(path) -> str:
    return f"{path} (sha256 {inception_weights.sha256_of_file(path)[:16]})"


def convert_files(
    out: str | os.PathLike,
    *,
    vgg: str | os.PathLike | None = None,
    lin: str | os.PathLike | None = None,
) -> str:
    """Reads the VGG16 (`vgg`) and lin (`lin`, default `shipped_lin_weights()`) state
    dicts, converts and writes our .npz to `out` (module docstring). Without `vgg` the
    convolutions come from the `lin` file, which must then be a whole LPIPS state dict."""
    lin = shipped_lin_weights() if lin is None else lin
    lin_state = read_torch_state_dict(lin)
    params = entries_from_state_dict(lin_state, "lin", source=str(lin))
    if vgg is None:
        if not any((e := _our_entry(k)) and e[1] == "vgg" for k in lin_state):
            raise ValueError(
                f"no --vgg file given and {lin} holds only the lin layers: pass --vgg with "
                "torchvision's VGG16 state dict (vgg16-397923af.pth; module docstring)"
            )
        params.update(entries_from_state_dict(lin_state, "vgg", source=str(lin)))
        source = f"vgg and lin: {_describe(lin)}"
    else:
        params.update(entries_from_state_dict(read_torch_state_dict(vgg), "vgg", source=str(vgg)))
        source = f"vgg: {_describe(vgg)}; lin: {_describe(lin)}"
    return lpips_weights.save_lpips(out, lpips_weights.unflatten(params), source=source)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .npz (our LPIPS format)")
    parser.add_argument("--vgg", help="torchvision VGG16 state dict (.pth)")
    parser.add_argument("--lin", help="LPIPS v0.1 lin weights (.pth); default: lpips's own")
    args = parser.parse_args(argv)
    path = convert_files(args.out, vgg=args.vgg, lin=args.lin)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
