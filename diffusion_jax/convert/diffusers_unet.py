"""diffusers' `UNet2DModel` weights in our U-Net's parameter tree (names and layouts).

    params = unet_params_from_diffusers(state_dict, num_levels=len(ch_mult), num_res_blocks=2)
    check_same_tree(params, expected)  # every name and shape of our model's tree

`state_dict` maps diffusers' names to NumPy arrays (e.g. a safetensors file read with
`safetensors.numpy.load_file`, or `{k: v.numpy() for k, v in unet.state_dict().items()}`).
PyTorch convolutions are [out, in, kh, kw] and linear layers [out, in]; ours are
[kh, kw, in, out] and [in, out]. diffusers' separate q, k, v projections are our one `qkv`
projection, concatenated on the output axis; its up blocks run from the lowest resolution
up, as our `up_<level>` blocks are numbered from the highest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffusion_jax.runtime import tree_shapes


def _converters(state_dict: Mapping[str, np.ndarray]):
    sd = state_dict

    def conv(name):
        return {"kernel": sd[f"{name}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{name}.bias"]}

    def dense(name):
        return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}

    def norm(name):
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

    def resnet(name):
        block = {
            "norm_0": norm(f"{name}.norm1"),
            "conv_0": conv(f"{name}.conv1"),
            "emb": dense(f"{name}.time_emb_proj"),
            "norm_1": norm(f"{name}.norm2"),
            "conv_1": conv(f"{name}.conv2"),
        }
        if f"{name}.conv_shortcut.weight" in sd:
            block["skip"] = conv(f"{name}.conv_shortcut")
        return block

    def attention(name):
        q, k, v = (dense(f"{name}.to_{part}") for part in "qkv")
        qkv = {p: np.concatenate([q[p], k[p], v[p]], axis=-1) for p in ("kernel", "bias")}
        return {
            "norm": norm(f"{name}.group_norm"),
            "qkv": qkv,
            "proj_out": dense(f"{name}.to_out.0"),
        }

    return conv, dense, norm, resnet, attention


def unet_params_from_diffusers(
    state_dict: Mapping[str, np.ndarray], *, num_levels: int, num_res_blocks: int
) -> dict:
    """Our U-Net's `params` from diffusers' `UNet2DModel` state dict (see the module doc)."""
    sd = {name: np.asarray(value) for name, value in state_dict.items()}
    conv, dense, norm, resnet, attention = _converters(sd)
    params = {
        "time_embed": {
            "dense_0": dense("time_embedding.linear_1"),
            "dense_1": dense("time_embedding.linear_2"),
        },
        "conv_in": conv("conv_in"),
        "norm_out": norm("conv_norm_out"),
        "conv_out": conv("conv_out"),
        "mid_res_0": resnet("mid_block.resnets.0"),
        "mid_attn": attention("mid_block.attentions.0"),
        "mid_res_1": resnet("mid_block.resnets.1"),
    }
    for level in range(num_levels):
        up = num_levels - 1 - level
        for i in range(num_res_blocks + 1):
            if i < num_res_blocks:
                params[f"down_{level}_res_{i}"] = resnet(f"down_blocks.{level}.resnets.{i}")
                if f"down_blocks.{level}.attentions.{i}.to_q.weight" in sd:
                    params[f"down_{level}_attn_{i}"] = attention(
                        f"down_blocks.{level}.attentions.{i}"
                    )
            params[f"up_{level}_res_{i}"] = resnet(f"up_blocks.{up}.resnets.{i}")
            if f"up_blocks.{up}.attentions.{i}.to_q.weight" in sd:
                params[f"up_{level}_attn_{i}"] = attention(f"up_blocks.{up}.attentions.{i}")
        if level != num_levels - 1:
            params[f"down_{level}_downsample"] = conv(f"down_blocks.{level}.downsamplers.0.conv")
        if level != 0:
            params[f"up_{level}_upsample"] = conv(f"up_blocks.{up}.upsamplers.0.conv")
    return params


def check_same_tree(params, expected, *, source: str = "the converted weights") -> None:
    """Raise a ValueError naming the parameters missing, unexpected or of another shape in
    `params` against `expected` (our model's tree, arrays or `jax.ShapeDtypeStruct`s)."""
    mismatch = tree_shapes.describe_mismatch(
        tree_shapes.leaf_shapes(params), tree_shapes.leaf_shapes(expected), found="converted"
    )
    if mismatch:
        raise ValueError(f"{source} do not fit the model ({mismatch})")
