"""Tests of convert/diffusers_unet.py: diffusers' UNet2DModel weights in our U-Net compute
diffusers' function (needs the [torch] extra)."""

import jax
import numpy as np
import pytest

from configs import models as model_presets
from diffusion_jax import models
from diffusion_jax.convert import diffusers_unet


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_our_unet_with_diffusers_weights_computes_diffusers_function(padding):
    """The networks the benchmark compares are one function: diffusers' weights copied into
    ours give its output, with either downsampling padding (DDPM's "same" is diffusers'
    downsample_padding=0; guided-diffusion's "symmetric" its 1)."""
    pytest.importorskip("diffusers", reason="--compare diffusers needs the [torch] extra")
    import torch

    from diffusion_jax.bench import torch_side as bench_torch

    config = model_presets.tiny()
    config.dropout, config.conv_algorithm, config.downsample_padding = 0.0, "direct", padding
    unet = bench_torch.build_diffusers_unet(config).eval()
    with torch.no_grad():
        for weight in unet.parameters():
            weight.copy_(torch.randn_like(weight) * 0.2)
    state_dict = {name: value.numpy() for name, value in unet.state_dict().items()}
    params = diffusers_unet.unet_params_from_diffusers(
        state_dict, num_levels=len(config.ch_mult), num_res_blocks=config.num_res_blocks
    )
    model = models.build_model(config)
    diffusers_unet.check_same_tree(params, models.init_params(model, config, jax.random.key(0)))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([3.0, 517.0], np.float32)
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    ours = model.apply({"params": params}, x, t)
    np.testing.assert_allclose(
        np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), atol=2e-5 * np.abs(ours).max()
    )


def test_a_tree_of_another_model_is_refused_naming_the_parameters():
    config = model_presets.tiny()
    config.dropout = 0.0
    params = models.init_params(models.build_model(config), config, jax.random.key(0))
    broken = {name: value for name, value in params.items() if name != "conv_in"}
    broken["extra"] = {"kernel": np.zeros((1,))}
    with pytest.raises(
        ValueError, match=r"missing: conv_in.bias; conv_in.kernel \| unexpected: extra.kernel"
    ):
        diffusers_unet.check_same_tree(broken, params)
