"""Tests of models/lora.py: the merged kernel computes the two-branch LoRA layer (linear and
convolution), a fresh adapter leaves the model unchanged, merge/unmerge and weighted
combinations are linear, only the adapters are trained, and bad targets are named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from diffusion_jax.models import conditional_unet, lora
from diffusion_jax.models.conditional_unet import UNetConditionConfig

CONFIG = UNetConditionConfig(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
    attention_head_dim=4, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip


@pytest.fixture(scope="module")
def unet_params():
    """Random everywhere: the init's zero output convolution would stop every gradient."""
    params = conditional_unet.init_params(CONFIG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, noisy)


def _random_lora(params, rank=3, alpha=6.0, seed=1, **kwargs):
    """A LoRA whose up is random too (a fresh one's is zero)."""
    fresh = lora.init_lora(jax.random.key(seed), params, rank=rank, alpha=alpha, **kwargs)
    leaves, tree = jax.tree.flatten(fresh.weights)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return lora.LoRA(jax.tree.unflatten(tree, noisy), fresh.alpha, fresh.rank)


def test_default_targets_are_the_attention_projections(unet_params):
    modules = lora.target_modules(unet_params, lora.UNET_ATTENTION)
    names = [lora.module_name(path) for path in modules]
    assert names and all(name.split(".")[-1] in lora.UNET_ATTENTION for name in names)
    # one self- and one cross-attention per transformer block, four projections each
    blocks = {name.rsplit(".", 2)[0] for name in names}
    assert len(names) == 8 * len(blocks)
    assert any(".attn2.to_k" in name for name in names)


def test_a_fresh_lora_leaves_the_model_unchanged_and_counts_r_times_in_plus_out(unet_params):
    fresh = lora.init_lora(jax.random.key(1), unet_params, targets=lora.UNET_ATTENTION, rank=4)
    merged = lora.merge(unet_params, fresh)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merged, unet_params)
    assert all(jax.tree.leaves(chex_equal))
    kernels = traverse_util.flatten_dict(unet_params)
    expected = sum(4 * sum(kernels[(*p, "kernel")].shape)
                   for p in lora.target_modules(unet_params, lora.UNET_ATTENTION))  # fmt: skip
    assert fresh.num_parameters() == expected
    assert fresh.scale == 1.0  # alpha defaults to the rank


def test_merged_dense_kernel_is_the_two_branch_layer():
    """x (W0 + s down up) = x W0 + s (x down) up, Hu et al. Eq. 3."""
    dense = nn.Dense(7)
    x = jax.random.normal(jax.random.key(0), (5, 6))
    params = {"layer": dense.init(jax.random.key(1), x)["params"]}
    adapter = _random_lora(params, rank=2, alpha=3.0, targets=("layer",))
    merged = lora.merge(params, adapter)
    w = adapter.weights["layer"]
    two_branch = dense.apply({"params": params["layer"]}, x) + 1.5 * (x @ w["down"]) @ w["up"]
    np.testing.assert_allclose(dense.apply({"params": merged["layer"]}, x), two_branch, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
def test_merged_convolution_is_a_convolution_to_r_channels_then_a_1x1(strides):
    """PEFT's Conv2d LoRA: conv_A (the base's kernel size, stride, padding) then a 1x1
    conv_B equals the convolution of the merged kernel."""
    conv = nn.Conv(5, (3, 3), strides=strides, padding=1)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    params = {"conv": conv.init(jax.random.key(1), x)["params"]}
    adapter = _random_lora(params, rank=2, alpha=2.0, targets=("conv",), convolutions=True)
    w = adapter.weights["conv"]
    down = nn.Conv(2, (3, 3), strides=strides, padding=1, use_bias=False)
    up = nn.Conv(5, (1, 1), use_bias=False)
    h = down.apply({"params": {"kernel": w["down"]}}, x)
    branch = up.apply({"params": {"kernel": w["up"][None, None]}}, h)
    merged = lora.merge(params, adapter)
    expected = conv.apply({"params": params["conv"]}, x) + branch
    np.testing.assert_allclose(conv.apply({"params": merged["conv"]}, x), expected, atol=1e-5)


def test_convolutions_only_when_asked(unet_params):
    linear = lora.target_modules(unet_params, ("conv1",), convolutions=True)
    assert linear and all(path[-1] == "conv1" for path in linear)
    with pytest.raises(ValueError, match=r"LoRA targets \['conv1'\] match no linear layer"):
        lora.target_modules(unet_params, ("conv1",))


def test_merge_is_linear_in_the_adapter_weights_and_unmerge_inverts_it(unet_params):
    a = _random_lora(unet_params, targets=lora.UNET_ATTENTION, seed=1)
    b = _random_lora(unet_params, rank=2, alpha=1.0, targets=("to_q", "proj_in"), seed=2)
    both = lora.merge(unet_params, [(a, 0.7), (b, -1.3)])
    one_by_one = lora.merge(lora.merge(unet_params, [(a, 0.7)]), [(b, -1.3)])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), both, one_by_one)
    back = lora.unmerge(both, [(a, 0.7), (b, -1.3)])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, unet_params)
    kernel = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    flat_a, flat_b = (traverse_util.flatten_dict(t.weights) for t in (a, b))
    change = (
        traverse_util.flatten_dict(both)[kernel] - traverse_util.flatten_dict(unet_params)[kernel]
    )
    expected = 0.7 * 2.0 * lora.delta(flat_a[(*kernel[:-1], "down")], flat_a[(*kernel[:-1], "up")])
    expected -= 1.3 * 0.5 * lora.delta(flat_b[(*kernel[:-1], "down")], flat_b[(*kernel[:-1], "up")])
    np.testing.assert_allclose(change, expected, atol=1e-6)


@pytest.mark.slow  # compiles the U-Net's gradient
def test_training_moves_only_the_adapters_and_starts_through_up(unet_params):
    """With up = 0 at the start, d loss / d down = 0 and d loss / d up != 0 (the change is
    bilinear); a few Adam steps on the adapters alone lower the loss, the base untouched."""
    model = conditional_unet.UNet2DConditionModel(CONFIG)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    text = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    base = jax.tree.map(jnp.copy, unet_params)

    def loss_fn(adapter):
        eps = model.apply({"params": lora.merge(base, adapter)}, x, t, text)
        return jnp.mean((eps - target) ** 2)

    adapter = lora.init_lora(jax.random.key(3), base, targets=lora.UNET_ATTENTION, rank=4)
    grads = jax.grad(loss_fn)(adapter)
    downs = [g for p, g in traverse_util.flatten_dict(grads.weights).items() if p[-1] == "down"]
    ups = [g for p, g in traverse_util.flatten_dict(grads.weights).items() if p[-1] == "up"]
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in downs)
    assert max(float(jnp.max(jnp.abs(g))) for g in ups) > 0.0
    optimizer = optax.adam(1e-2)
    state = optimizer.init(adapter)
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(adapter)  # adapters only

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(adapter, updates), state, loss

    losses = []
    for _ in range(5):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base, unet_params)
    assert all(jax.tree.leaves(same))


def test_bad_input_is_named(unet_params):
    with pytest.raises(ValueError, match=r"match no linear layer"):
        lora.init_lora(jax.random.key(0), unet_params, targets=("to_qq",), rank=4)
    with pytest.raises(TypeError, match="sequence of module names"):
        lora.target_modules(unet_params, "to_q")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.init_lora(jax.random.key(0), unet_params, targets=("to_q",), rank=0)
    with pytest.raises(ValueError, match=r"init='orthogonal' is unknown"):
        lora.init_lora(jax.random.key(0), unet_params, targets=("to_q",), rank=2,
                       init="orthogonal")  # fmt: skip
    other = {"layer": {"kernel": jnp.zeros((3, 4))}}
    adapter = lora.init_lora(jax.random.key(0), other, targets=("layer",), rank=2)
    with pytest.raises(ValueError, match="LoRA module layer is not a layer of the model"):
        lora.merge(unet_params, adapter)


@pytest.mark.parametrize("init, std", [("gaussian", 1 / 4), ("kaiming", None)])
def test_initial_down_weights_have_the_documented_spread(unet_params, init, std):
    """gaussian: N(0, 1/r^2); kaiming: U(+-1/sqrt(fan_in)), standard deviation
    1/sqrt(3 fan_in); up zero either way."""
    fresh = lora.init_lora(jax.random.key(5), unet_params, targets=("to_q", "conv1"), rank=4,
                           convolutions=True, init=init)  # fmt: skip
    for path, value in traverse_util.flatten_dict(fresh.weights).items():
        if path[-1] == "up":
            assert not np.any(np.asarray(value))
            continue
        expected = std or 1 / np.sqrt(3 * np.prod(value.shape[:-1]))
        assert abs(float(np.std(value)) / expected - 1) < 0.25, (path, float(np.std(value)))
        if init == "kaiming":
            assert float(np.max(np.abs(value))) <= np.sqrt(3) * expected
