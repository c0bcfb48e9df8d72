"""LoRA files: ours saved in the format diffusers' `load_lora_weights` reads, and the
published formats read into our `models.lora.LoRA`s.

    save_lora(path, {"unet": unet_lora, "text_encoder": text_lora})
    loras = load_lora(path, {"unet": unet_params, "text_encoder": text_params})

Saved: safetensors in PEFT's naming with the component as prefix
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``, A [r, d_in]
and B [d_out, r] in PyTorch's layout; a convolution's A [r, d_in, kh, kw], B [d_out, r, 1, 1]),
and each component's PEFT `LoraConfig` (r, lora_alpha, target_modules, rank and alpha
patterns) in the file's metadata under ``lora_adapter_metadata``, as diffusers'
`save_lora_weights` writes them (a folder gets ``pytorch_lora_weights.safetensors``).

Read (REFERENCE2 Sec. 3): that format; diffusers' own ``.lora.down/up.weight`` and
``.lora_linear_layer.down/up.weight`` keys and its older attention-processor keys
(``attn1.processor.to_q_lora.down.weight``); PEFT's ``adapter_model.safetensors`` with its
``adapter_config.json`` (keys unprefixed or under ``base_model.model.``, for one component);
and kohya's / A1111's (``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` with per-module
``.alpha``; ``lora_te_`` for the text encoder). A module's scale is alpha / r from, in order:
its ``.alpha`` key, the metadata or adapter_config.json (with their patterns), else 1 (alpha =
r, diffusers' convention). Files are read as safetensors only. A key of another kind (DoRA's
magnitudes, LoHa, SDXL's second text encoder) or a module that the model does not have stops
the load with the key's name, nothing half-loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import struct as struct_lib
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util
from safetensors.numpy import load, save

from diffusion_jax.convert import torch_layout
from diffusion_jax.convert.diffusers_pipeline import PipelineWeights
from diffusion_jax.models import lora as lora_lib
from diffusion_jax.models.lora import LoRA
from diffusion_jax.runtime import storage

COMPONENTS = ("unet", "text_encoder")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"
_KOHYA_PREFIXES = {"unet": "unet", "te": "text_encoder"}
# diffusers' attention-processor LoRA names -> the projections they adapt
_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_PEFT_KEY = re.compile(
    r"^(?:(unet|text_encoder)\.)?(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$"
)
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"
)
_PROCESSOR_KEY = re.compile(
    r"^(unet|text_encoder)\.(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)
_KOHYA_KEY = re.compile(r"^lora_(unet|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_ALPHA_KEY = re.compile(r"^(?:(unet|text_encoder)\.)?(.+)\.alpha$")
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up", "lora_down.weight": "down",
          "lora_up.weight": "up", "alpha": "alpha"}  # fmt: skip


# --- The names of a model's modules ---------------------------------------------------------


def torch_module_names(params) -> dict[str, tuple[str, ...]]:
    """{PyTorch module name: our module path} of every module with a kernel in `params`
    (``down_blocks.0.attentions.0.proj_in`` -> ("down_blocks_0", "attentions_0", "proj_in"))."""
    names = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] == "kernel":
            names[torch_layout.torch_name(path).removesuffix(".weight")] = path[:-1]
    return names


def _find_module(name: str, names: Mapping[str, tuple], *, kohya: bool) -> tuple | None:
    """Our path of PyTorch module `name` (a kohya name has "_" for every "."); transformers
    5's text encoder names lack the ``text_model.`` prefix that ours have."""
    if kohya:
        names = {torch.replace(".", "_"): path for torch, path in names.items()}
    for candidate in (name, f"text_model{'_' if kohya else '.'}{name}"):
        if candidate in names:
            return names[candidate]
    return None


# --- Reading -------------------------------------------------------------------------------


def _read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, the header's __metadata__) of a safetensors file, local or remote."""
    data = storage.as_path(path).read_bytes()
    try:
        (length,) = struct_lib.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        return load(data), metadata
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a safetensors file: {error}") from None


def _lora_file(path) -> tuple[storage.PathLike, dict | None]:
    """(the weights file, PEFT's adapter_config.json or None) of a file or folder `path`."""
    path = storage.as_path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        return path, None
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE, None
    if (path / PEFT_FILE).is_file():
        config = path / PEFT_CONFIG
        return path / PEFT_FILE, json.loads(config.read_text()) if config.is_file() else None
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path} holds no {LORA_FILE} or {PEFT_FILE}; it holds {present}")


def _parse_key(key: str, default_component: str) -> tuple[str, str, str, bool] | None:
    """(component, PyTorch module name, role "down"/"up"/"alpha", is kohya) of a LoRA key."""
    if match := _KOHYA_KEY.match(key):
        prefix, module, role = match.groups()
        return _KOHYA_PREFIXES[prefix], module, _ROLES[role], True
    if match := _PROCESSOR_KEY.match(key):
        component, parent, projection, role = match.groups()
        return component, f"{parent}.{_PROCESSOR_NAMES[component][projection]}", role, False
    if match := _DIFFUSERS_KEY.match(key) or _PEFT_KEY.match(key):
        component, module, role = match.groups()
        return component or default_component, module, _ROLES[role], False
    if match := _ALPHA_KEY.match(key):
        component, module = match.groups()
        return component or default_component, module, "alpha", False
    return None


def _component_config(metadata: Mapping[str, str], adapter_config, component: str) -> dict:
    """The PEFT LoraConfig entries (r, lora_alpha, patterns) of `component`: from the file's
    metadata (keys prefixed ``unet.``, or not for one component) or adapter_config.json."""
    if adapter_config is not None:
        return adapter_config
    if METADATA_KEY not in metadata:
        return {}
    entries = json.loads(metadata[METADATA_KEY])
    prefixed = {k.removeprefix(f"{component}."): v for k, v in entries.items()
                if k.startswith(f"{component}.")}  # fmt: skip
    if prefixed:
        return prefixed
    return {} if any(k.startswith(f"{c}.") for k in entries for c in COMPONENTS) else entries


def _pattern_value(patterns: Mapping[str, float], name: str):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _module_scale(entry: dict, name: str, rank: int, config: Mapping) -> float:
    """alpha / r of one module (module docstring's order)."""
    if "alpha" in entry:
        return float(np.asarray(entry["alpha"])) / rank
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
    alpha = alpha if alpha is not None else config.get("lora_alpha")
    return 1.0 if alpha is None else float(alpha) / rank


def _layout(down: np.ndarray, up: np.ndarray, kernel_shape) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's A [r, in(, kh, kw)] and B [out, r(, 1, 1)] as our down and up (the adapter
    of a 1x1 convolution that our model holds as a linear layer is squeezed)."""
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim == 4 and len(kernel_shape) == 2 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if down.ndim == 4 and len(kernel_shape) == 4:
        return down.transpose(2, 3, 1, 0), up.T  # [r, in, kh, kw] -> [kh, kw, in, r]
    return down.T, up.T


def _gather(tensors, default_component) -> dict[str, dict[str, dict]]:
    """{component: {module name: {"down", "up", "alpha", "kohya"}}} of a file's tensors."""
    grouped: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for key, value in tensors.items():
        parsed = _parse_key(key, default_component)
        if parsed is None:
            raise ValueError(
                f"LoRA key {key!r} is of no format read here (PEFT/diffusers lora_A/lora_B, "
                "lora.down/up, processor to_q_lora, kohya lora_unet_/lora_te_ lora_down/up; "
                "DoRA, LoHa, LoKr and SDXL's text_encoder_2 are not supported)"
            )
        component, module, role, kohya = parsed
        grouped[component][module][role] = value
        grouped[component][module]["kohya"] = kohya
    return grouped


def _module_problem(name: str, entry: dict, path) -> str | None:
    """What keeps a file's module `name` from our model, or None."""
    if path is None:
        return f"{name} is not a layer of the model"
    missing = [role for role in ("down", "up") if role not in entry]
    return f"{name} lacks its {missing[0]} weight" if missing else None


def _component_lora(modules, params, config, source: str) -> LoRA:
    """One component's LoRA: layouts ours, each module's alpha / r folded relative to the
    most common (alpha, r)."""
    names = torch_module_names(params)
    kernels = traverse_util.flatten_dict(params)
    flat, scales, ranks, problems = {}, {}, {}, []
    for name, entry in sorted(modules.items()):
        path = _find_module(name, names, kohya=entry["kohya"])
        problem = _module_problem(name, entry, path)
        if problem is None:
            shape = tuple(kernels[(*path, "kernel")].shape)
            down, up = _layout(np.asarray(entry["down"]), np.asarray(entry["up"]), shape)
            fits = down.shape[:-1] == shape[:-1] and up.shape == (down.shape[-1], shape[-1])
            problem = None if fits else (
                f"{name}: down {entry['down'].shape} / up {entry['up'].shape} do not fit its "
                f"kernel {torch_layout.torch_shape('kernel', shape)}"
            )  # fmt: skip
        if problem:
            problems.append(problem)
            continue
        ranks[path] = down.shape[-1]
        scales[path] = _module_scale(entry, name, ranks[path], config)
        flat[(*path, "down")], flat[(*path, "up")] = down.astype(np.float32), up.astype(np.float32)
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems[:20]))
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    scale = collections.Counter(scales.values()).most_common(1)[0][0]
    for path, module_scale in scales.items():
        flat[(*path, "up")] = flat[(*path, "up")] * np.float32(module_scale / scale)
    return LoRA(traverse_util.unflatten_dict(flat), alpha=scale * rank, rank=rank)


def load_lora(path: storage.PathLike, params: Mapping[str, dict], *,
              component: str = "unet") -> dict[str, LoRA]:  # fmt: skip
    """{component: LoRA} of a LoRA file or folder (module docstring), fitted to the models'
    `params` ({"unet": ..., "text_encoder": ...}: arrays or shapes); `component` names the
    model of keys without a component prefix (PEFT's adapter_model.safetensors)."""
    weights_file, adapter_config = _lora_file(path)
    tensors, metadata = _read_safetensors(weights_file)
    loras = {}
    for name, modules in _gather(tensors, component).items():
        if name not in params:
            raise ValueError(f"{weights_file} adapts the {name}, which was not given; "
                             f"given: {sorted(params)}")  # fmt: skip
        config = _component_config(metadata, adapter_config, name)
        if config.get("use_dora"):
            raise ValueError(f"{weights_file}: DoRA adapters are not supported")
        loras[name] = _component_lora(modules, params[name], config, str(weights_file))
    if not loras:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    return loras


# --- Writing -------------------------------------------------------------------------------


def lora_state_dict(lora: LoRA, prefix: str) -> dict[str, np.ndarray]:
    """PEFT's tensors of `lora` in PyTorch's layout, keys under `prefix` (module docstring)."""
    tensors = {}
    flat = traverse_util.flatten_dict(lora.weights)
    for path in lora.modules():
        name = torch_layout.torch_name((*path, "kernel")).removesuffix(".weight")
        down, up = np.asarray(flat[(*path, "down")]), np.asarray(flat[(*path, "up")])
        if down.ndim == 4:  # [kh, kw, in, r] -> [r, in, kh, kw]; B a 1x1 convolution
            down, up = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:
            down, up = down.T, up.T
        tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(down, np.float32)
        tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(up, np.float32)
    return tensors


def lora_config(lora: LoRA) -> dict:
    """PEFT's LoraConfig entries of `lora`: a module of another rank r_m keeps the scale
    alpha / rank through its own rank and alpha patterns (r_m, alpha r_m / rank). Module
    names go without the text encoder's ``text_model.`` (PEFT matches name endings), which
    transformers 5's CLIPTextModel lacks."""
    flat = traverse_util.flatten_dict(lora.weights)
    names, rank_pattern, alpha_pattern = [], {}, {}
    for path in lora.modules():
        name = torch_layout.torch_name((*path, "kernel")).removesuffix(".weight")
        name = name.removeprefix("text_model.")
        names.append(name)
        rank = int(flat[(*path, "up")].shape[0])
        if rank != lora.rank:
            rank_pattern[name] = rank
            alpha_pattern[name] = lora.alpha * rank / lora.rank
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": names,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "init_lora_weights": "gaussian"}  # fmt: skip


def save_lora(path: storage.PathLike, loras: Mapping[str, LoRA]) -> storage.PathLike:
    """Write `loras` ({"unet": ..., "text_encoder": ...}) as one safetensors file with their
    configs in its metadata (module docstring); a folder `path` gets LORA_FILE. Returns the
    file's path."""
    unknown = sorted(set(loras) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"LoRA components {unknown} are unknown; allowed: {list(COMPONENTS)}")
    path = storage.as_path(path)
    if not path.name.endswith(".safetensors"):
        path = path / LORA_FILE
    tensors, configs = {}, {}
    for component, lora in loras.items():
        tensors.update(lora_state_dict(lora, component))
        configs.update({f"{component}.{k}": v for k, v in lora_config(lora).items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}
    storage.write_bytes(path, save(tensors, metadata=metadata))
    return path


# --- Text-to-image with LoRAs --------------------------------------------------------------


def with_loras(
    weights: PipelineWeights, files: Sequence[tuple[storage.PathLike, float]]
) -> PipelineWeights:
    """The pipeline's weights with each LoRA file merged into its U-Net and text encoder at
    its weight (sum_k w_k (alpha_k / r_k) down_k up_k, `models.lora.merge`)."""
    params = {"unet": weights.params["unet"], "text_encoder": weights.params["text_encoder"]}
    adapters = {component: [] for component in params}
    for path, weight in files:
        for component, lora in load_lora(path, params).items():
            adapters[component].append((lora, weight))
    merged = {c: lora_lib.merge(params[c], adapters[c]) if adapters[c] else params[c]
              for c in params}  # fmt: skip
    sources = "".join(f" + LoRA {path} x {weight}" for path, weight in files)
    return dataclasses.replace(weights, params={**weights.params, **merged},
                               source=weights.source + sources)  # fmt: skip
