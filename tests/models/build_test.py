"""Tests of the denoiser networks against published sizes, costs and design properties."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from diffusion_jax.models import (
    build_model,
    count_params,
    forward_flops,
    init_params,
    output_channels,
    sample_shape,
)
from diffusion_jax.models.attention import attention
from diffusion_jax.models.dit import DiTBlock, sincos_pos_embed_2d
from diffusion_jax.models.layers import fourier_embedding, sinusoidal_embedding
from diffusion_jax.models.unet import AttentionBlock, ResBlock


def _inputs(config, batch: int = 2, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (batch, *sample_shape(config)))
    t = jax.random.uniform(keys[1], (batch,), maxval=1000.0)
    label = None
    if config.num_classes > 0:
        label = jax.random.randint(keys[2], (batch,), 0, config.num_classes + 1)
    return x, t, label


def _shape_params(config):
    model = build_model(config)
    return model, jax.eval_shape(lambda: init_params(model, config, jax.random.PRNGKey(0)))


def _random_params(config, seed: int = 1):
    """Random parameters of the network's shapes, drawn on the host (compiling JAX's RNG for
    every leaf is slow on CPU): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.05^2), biases
    N(0, 0.05^2), embeddings N(0, 1). Unlike the initial ones, no layer is zero."""
    rng = np.random.default_rng(seed)
    shapes = _shape_params(config)[1]

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "kernel" in name:
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        if "scale" in name:
            return jnp.asarray(1.0 + 0.05 * noise)
        return jnp.asarray(noise if "embedding" in name else 0.05 * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _with(make_config, **overrides):
    config = make_config()
    config.update(overrides)
    return config


def _tiny(**overrides):
    return _with(presets.tiny, **overrides)


def _small_dit(**overrides):
    config = presets.dit("S/2", image_size=8, in_channels=4, num_classes=10)
    config.update(dict(depth=2, hidden_size=64, num_heads=4, **overrides))
    return config


def _small_mlp(**overrides):
    config = presets.mlp2d()
    config.update(dict(hidden_size=32, num_layers=2, **overrides))
    return config


# --- Published sizes and costs ---------------------------------------------------------


def test_ddpm_cifar10_parameter_count_matches_independent_implementation():
    # diffusers UNet2DModel with block_out_channels (128, 256, 256, 256): 35,746,307.
    _, params = _shape_params(presets.ddpm_cifar10())
    assert abs(count_params(params) - 35_746_307) <= 0.005 * 35_746_307


def test_ddpm_256_parameter_count_matches_paper():
    # Ho et al. 2020, Appendix B: the LSUN and CelebA-HQ models have 114 million parameters.
    _, params = _shape_params(presets.ddpm_256())
    assert abs(count_params(params) - 114e6) <= 0.01 * 114e6


@pytest.mark.parametrize("variant, published", [("XL/2", 675e6), ("B/2", 130e6), ("S/2", 33e6)])
def test_dit_parameter_counts_match_paper_table_1(variant, published):
    # Peebles & Xie 2023, Table 1, ImageNet 256 on 32x32x4 latents, learned sigma.
    _, params = _shape_params(presets.dit(variant, image_size=32, in_channels=4))
    assert abs(count_params(params) - published) <= 0.01 * published


def test_ddpm_cifar10_forward_flops_match_reference():
    # About 12.2 GFLOPs (6.1 GMACs) per 32x32 image (REFERENCE.md). XLA measures 11.67 GFLOPs:
    # it skips convolution taps on the zero padding (the dense count is 2 x 6.22 GMACs).
    model, params = _shape_params(presets.ddpm_cifar10())
    flops = forward_flops(model, params, (2, 32, 32, 3))
    assert abs(flops - 12.2e9) <= 0.10 * 12.2e9


# --- Shapes, dtypes, initialisation -------------------------------------------------------


@pytest.mark.parametrize(
    "preset",
    [
        presets.ddpm_cifar10,
        presets.ddpm_256,
        presets.iddpm_cifar10,
        presets.tiny,
        lambda: presets.dit("XL/2", image_size=32, in_channels=4),
        lambda: presets.dit("B/4", image_size=64, in_channels=3, num_classes=0),
        lambda: presets.dit("L/8", image_size=32, in_channels=16, learn_sigma=False),
        presets.mlp2d,
    ],
)
def test_every_preset_has_expected_output_shape_and_float32_params(preset):
    config = preset()
    model, params = _shape_params(config)
    x, t, label = _inputs(config)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, label), params)
    assert out.shape == (*x.shape[:-1], output_channels(config))
    assert out.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_learned_variance_doubles_output_channels():
    assert output_channels(presets.iddpm_cifar10()) == 6
    assert output_channels(presets.ddpm_cifar10()) == 3
    assert output_channels(presets.dit("S/2", in_channels=4)) == 8


@pytest.mark.parametrize("make_config", [presets.tiny, _small_dit, _small_mlp])
def test_output_is_exactly_zero_at_initialisation(make_config):
    # Zero-initialised output layers (Ho et al.'s conv_out, DiT's adaLN-Zero final layer).
    config = make_config()
    model = build_model(config)
    params = init_params(model, config, jax.random.PRNGKey(0))
    x, t, label = _inputs(config)
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x, t, label), 0.0)


@pytest.mark.parametrize("make_config", [presets.tiny, _small_dit, _small_mlp])
def test_bfloat16_output_is_finite_and_close_to_float32(make_config):
    config = make_config()
    model32 = build_model(config)
    config.dtype = "bfloat16"
    model16 = build_model(config)
    params = _random_params(config)
    x, t, label = _inputs(config)
    out32 = jax.jit(model32.apply)({"params": params}, x, t, label)
    out16 = jax.jit(model16.apply)({"params": params}, x, t, label)
    assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
    assert bool(jnp.all(jnp.isfinite(out32))) and float(jnp.std(out32)) > 1e-3
    relative_error = jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)
    assert relative_error < 0.05


@pytest.mark.parametrize("make_config", [_tiny, _small_dit, _small_mlp])
def test_output_depends_on_time_and_label_and_apply_compiles_once(make_config):
    chex.clear_trace_counter()
    config = make_config(num_classes=3)
    model = build_model(config)
    params = _random_params(config)
    apply = jax.jit(
        chex.assert_max_traces(n=1)(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    )
    x, t, _ = _inputs(config)
    label = jnp.array([0, 3])  # 3 is the null class
    base = apply(params, x, t, label)
    later = apply(params, x, t + 100.0, label)
    relabelled = apply(params, x, t, jnp.array([1, 1]))
    assert float(jnp.max(jnp.abs(base - later))) > 1e-4
    assert float(jnp.max(jnp.abs(base - relabelled)[0])) > 1e-4
    assert float(jnp.max(jnp.abs(base - relabelled)[1])) > 1e-4


def test_dropout_is_active_only_in_training_also_under_remat():
    config = presets.tiny()
    config.remat = True  # dropout keys must flow through the rematerialised blocks
    model = build_model(config)
    params = _random_params(config)
    x, t, _ = _inputs(config)
    jitted_apply = jax.jit(model.apply, static_argnames="train")
    apply = lambda train, seed: jitted_apply(
        {"params": params}, x, t, train=train, rngs={"dropout": jax.random.PRNGKey(seed)}
    )
    np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
    assert float(jnp.max(jnp.abs(apply(True, 0) - apply(True, 1)))) > 1e-4


def test_remat_changes_neither_output_nor_gradient():
    config = presets.tiny()
    config.dropout = 0.0
    model = build_model(config)
    params = _random_params(config)
    config.remat = True
    remat_model = build_model(config)
    x, t, _ = _inputs(config)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, t) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss(model)))(params)
    remat_value, remat_grads = jax.jit(jax.value_and_grad(loss(remat_model)))(params)
    np.testing.assert_allclose(remat_value, value, rtol=1e-5)
    for remat_grad, grad in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(remat_grad, grad, atol=1e-4 * float(jnp.max(jnp.abs(grad))))


@pytest.mark.parametrize("make_config", [presets.tiny, _small_dit, _small_mlp])
def test_forward_and_reverse_mode_are_transposes(make_config):
    """<J v, w> = <v, J^T w> for the Jacobian J of the network in x: forward mode (jvp, as
    the ODE likelihood uses) and reverse mode agree, custom derivatives included."""
    config = _with(make_config, dropout=0.0)
    model, params = build_model(config), _random_params(config)
    x, t, label = _inputs(config)
    fn = lambda x_: model.apply({"params": params}, x_, t, label)
    v_key, w_key = jax.random.split(jax.random.PRNGKey(5))
    v = jax.random.normal(v_key, x.shape)
    w = jax.random.normal(w_key, jax.eval_shape(fn, x).shape)
    jv = jax.jit(lambda: jax.jvp(fn, (x,), (v,))[1])()
    jtw = jax.jit(lambda: jax.vjp(fn, x)[1](w)[0])()
    np.testing.assert_allclose(jnp.vdot(jv, w), jnp.vdot(v, jtw), rtol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_scale_shift_norm=True, resblock_updown=True, head_channels=8, learn_sigma=True),
        dict(conv_resample=False, time_embedding="fourier", num_classes=5),
    ],
)
def test_unet_variants_run_and_are_finite(overrides):
    config = presets.tiny()
    config.update(overrides)
    model = build_model(config)
    params = _random_params(config)
    x, t, label = _inputs(config)
    out = jax.jit(model.apply)({"params": params}, x, t / 1000.0, label)
    assert out.shape == (*x.shape[:-1], output_channels(config))
    assert bool(jnp.all(jnp.isfinite(out)))


# --- Building blocks ---------------------------------------------------------------------


def test_sinusoidal_embedding_matches_closed_form_and_separates_timesteps():
    t = jnp.arange(1000.0)
    emb = np.asarray(sinusoidal_embedding(t, 128))
    freqs = 10000.0 ** (-np.arange(64) / 63.0)
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, expected, atol=2e-4)
    gaps = np.linalg.norm(emb[1:] - emb[:-1], axis=1)
    assert gaps.min() > 0.1


def test_fourier_embedding_separates_continuous_times_without_parameters():
    emb = np.asarray(fourier_embedding(jnp.linspace(0.0, 1.0, 101), 64, scale=16.0))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1) ** 2, 32.0, rtol=1e-5)
    assert np.linalg.norm(emb[1:] - emb[:-1], axis=1).min() > 0.1
    sinusoidal = presets.tiny()
    fourier = presets.tiny()
    fourier.time_embedding = "fourier"
    assert count_params(_shape_params(fourier)[1]) == count_params(_shape_params(sinusoidal)[1])


def test_fourier_frequencies_do_not_depend_on_jax_random_settings():
    """Constants of the network, not of the PRNG: a checkpoint computes one function whatever
    JAX_DEFAULT_PRNG_IMPL or jax_threefry_partitionable a later run uses."""
    t = jnp.linspace(0.0, 1.0, 5)
    expected = np.asarray(fourier_embedding(t, 16, scale=16.0))
    with jax.default_prng_impl("rbg"):
        np.testing.assert_array_equal(fourier_embedding(t, 16, scale=16.0), expected)
    freqs = 16.0 * np.random.RandomState(0).standard_normal(8)
    angles = 2.0 * np.pi * np.asarray(t)[:, None] * freqs[None, :]
    reference = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    np.testing.assert_allclose(expected, reference, atol=2e-5)


def test_dit_patch_embedding_is_initialised_as_a_linear_map():
    """xavier_uniform of the [D, C p^2] matrix (DiT, MAE): std sqrt(2 / (C p^2 + D))."""
    config = _with(presets.dit, variant="S/8", image_size=32)
    params = init_params(build_model(config), config, jax.random.key(0))
    kernel = np.asarray(params["patch_embed"]["kernel"])  # [p, p, C, D]
    fan_in, fan_out = np.prod(kernel.shape[:3]), kernel.shape[3]
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (fan_in + fan_out)), rtol=0.03)


def test_attention_matches_naive_softmax_attention():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 2, 4))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh->btnh", weights, v)
    np.testing.assert_allclose(attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "block, inputs",
    [
        (ResBlock(16, 0.1, True, 8, True), (jnp.ones((2, 4, 4, 16)), jnp.ones((2, 32)))),
        (AttentionBlock(2, -1, 8), (jnp.ones((2, 4, 4, 16)),)),
        (DiTBlock(32, 4, 4.0), (jnp.ones((2, 6, 32)), jnp.ones((2, 32)))),
    ],
)
def test_residual_blocks_are_identity_at_initialisation(block, inputs):
    # Zero-initialised last layers (Ho et al.) and adaLN-Zero (Peebles & Xie, Sec. 3.2).
    x = inputs[0] * jnp.arange(inputs[0].shape[-1])
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), x, *inputs[1:])
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x, *inputs[1:]), x, atol=1e-6)


def test_dit_position_embedding_is_2d_sincos():
    embed = sincos_pos_embed_2d(8, 3)  # [9, 8]: column in the first half, row in the second
    row, col = 2, 1
    omega = 1.0 / 10000.0 ** (np.arange(2) / 2)
    expected = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(embed[row * 3 + col], expected, rtol=1e-6)


# --- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (_with(presets.ddpm_cifar10, image_size=36), "model.image_size=36 is not divisible by 8"),
        (_with(presets.ddpm_cifar10, attn_resolutions=(16, 2)), "resolutions that occur: 32, 16"),
        (_with(presets.ddpm_cifar10, norm_groups=24), "model.norm_groups=24"),
        (_with(presets.iddpm_cifar10, num_heads=3), "model.num_heads=3"),
        (_with(presets.tiny, head_channels=5), "model.head_channels=5"),
        (_with(presets.tiny, dtype="float16"), "model.dtype='float16'"),
        (_with(presets.tiny, time_embedding="learned"), "model.time_embedding='learned'"),
        (_with(presets.tiny, name="resnet"), "model.name='resnet'"),
        (_with(presets.dit, variant="XL/3"), "model.variant='XL/3'"),
        (_with(presets.dit, variant="S/8", image_size=36), "model.image_size=36"),
        (_with(presets.dit, variant="", depth=2), "model.hidden_size=0"),
        (_with(presets.mlp2d, num_layers=0), "model.num_layers=0"),
        (_with(presets.tiny, ch=2), "model.ch=2; allowed: even and >= 4"),
        (_with(presets.tiny, downsample_padding="valid"), "model.downsample_padding='valid'"),
        (_with(presets.tiny, in_channels=0), "model.in_channels=0 must be >= 1"),
        (_with(presets.mlp2d, hidden_size=2), "model.hidden_size=2; allowed: even and >= 4"),
        (_with(presets.dit, mlp_ratio=0.0), "model.mlp_ratio=0.0 must be > 0"),
        (_with(presets.tiny, name="dit"), "model.name='dit' needs the options of its preset"),
        (_with(presets.ddpm_cifar10, name="mlp"), "model.name='mlp' needs the options"),
    ],
)
def test_bad_config_raises_error_naming_the_option(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(config)


def test_label_without_conditional_model_and_missing_label_raise():
    config = presets.tiny()
    model = build_model(config)
    x, t, _ = _inputs(config)
    with pytest.raises(ValueError, match="model.num_classes=0"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, jnp.zeros(2, jnp.int32)))
    config.num_classes = 10
    with pytest.raises(ValueError, match="model.num_classes=10 needs a label"):
        jax.eval_shape(lambda: build_model(config).init(jax.random.PRNGKey(0), x, t))
