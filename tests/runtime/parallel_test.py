"""Tests of diffusion_jax.runtime.parallel: one program on 1 or 8 devices, data parallel or FSDP,
and the pmap path, all training the same model the same way."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import digits
from diffusion_jax import data
from diffusion_jax.runs import build, restore
from diffusion_jax.runtime import parallel
from diffusion_jax.training import train_step as train_step_lib

NUM_STEPS = 3


def _config():
    config = digits.get_config("tiny")
    with config.unlocked():
        config.training.batch_size = 8
    return config


def _train_losses(config, strategy, num_steps=NUM_STEPS, loss_fn=None):
    """Losses of `num_steps` steps and the final parameters (numpy), from one seed."""
    chex.clear_trace_counter()  # each call builds a new train_step with the same name
    model, tx, lr_schedule = restore.build_model_and_optimizer(config)
    create = build.make_create_fn(config, model, tx)
    rng = jax.random.key(0)
    state = strategy.init_state(create, rng)
    axis_name = parallel.PMAP_AXIS if isinstance(strategy, parallel.PmapStrategy) else None
    step_fn = train_step_lib.make_train_step(
        loss_fn or build.make_loss_fn(config, model),
        tx,
        lr_schedule,
        ema_decays=(0.9,),
        axis_name=axis_name,
    )
    # jax.pmap (in maintenance mode) traces once more when the state first comes back as its
    # own output; jit over a mesh compiles exactly once.
    max_traces = 2 if axis_name else 1
    step_fn = strategy.compile_train_step(
        chex.assert_max_traces(step_fn, n=max_traces), jax.eval_shape(create, rng)
    )
    iterator = data.make_dataset(config.data, split="train", seed=0, global_batch_size=8)
    losses = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, strategy.device_batch(next(iterator)), rng)
        losses.append(float(metrics["loss"]))
    iterator.close()
    params = parallel.to_host(strategy.checkpointable(state).params)
    return np.array(losses), params, state


def _mesh_strategy(devices, strategy="data", fsdp_min_size=2**14):
    return parallel.MeshStrategy(
        mesh=parallel.make_mesh(devices), strategy=strategy, fsdp_min_size=fsdp_min_size
    )


def _assert_trees_close(a, b, *, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_eight_devices_data_parallel_and_fsdp_match_one_device():
    assert jax.device_count() == 8
    config = _config()
    one_losses, one_params, _ = _train_losses(config, _mesh_strategy(jax.devices()[:1]))
    assert np.all(np.isfinite(one_losses))
    data_losses, data_params, _ = _train_losses(config, _mesh_strategy(jax.devices()))
    fsdp = _mesh_strategy(jax.devices(), "fsdp", fsdp_min_size=256)
    fsdp_losses, fsdp_params, fsdp_state = _train_losses(config, fsdp)
    np.testing.assert_allclose(data_losses, one_losses, rtol=2e-5)
    np.testing.assert_allclose(fsdp_losses, one_losses, rtol=2e-5)
    _assert_trees_close(data_params, one_params, atol=2e-5)
    _assert_trees_close(fsdp_params, one_params, atol=2e-5)
    # FSDP really shards: the largest kernels are split over the 8 devices.
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(fsdp_state.params)]
    assert any(parallel.DATA_AXIS in spec for spec in specs)
    assert PartitionSpec() in specs  # small arrays (biases) stay replicated


def _deterministic_loss(config, model):
    """A loss without randomness, so that every strategy computes exactly the same thing."""

    def loss_fn(params, batch, rng, loss_history=None):
        t = jnp.full((batch["x"].shape[0],), 10.0)
        output = model.apply({"params": params}, batch["x"], t, train=False)
        per_example = jnp.mean((output - batch["x"]) ** 2, axis=(1, 2, 3))
        return jnp.mean(per_example), {"per_example": per_example, "t": t}

    return loss_fn


def test_pmap_path_averages_gradients_like_the_mesh_path():
    config = _config()
    model = restore.build_model_and_optimizer(config)[0]
    loss_fn = _deterministic_loss(config, model)
    pmap = parallel.PmapStrategy(devices=jax.local_devices())
    pmap_losses, pmap_params, pmap_state = _train_losses(config, pmap, loss_fn=loss_fn)
    mesh_losses, mesh_params, _ = _train_losses(
        config, _mesh_strategy(jax.devices()), loss_fn=loss_fn
    )
    np.testing.assert_allclose(pmap_losses, mesh_losses, rtol=2e-5)
    _assert_trees_close(pmap_params, mesh_params, atol=2e-5)
    # The replicas stay identical.
    kernel = jax.tree.leaves(pmap_state.params)[0]
    assert kernel.shape[0] == 8
    np.testing.assert_array_equal(np.asarray(kernel)[0], np.asarray(kernel)[7])


def test_fsdp_partition_spec_shards_largest_divisible_axis():
    assert parallel.fsdp_partition_spec((3, 3, 64, 128), 8, 0) == PartitionSpec(
        None, None, None, "data"
    )
    assert parallel.fsdp_partition_spec((3, 3, 64, 7), 8, 0) == PartitionSpec(
        None, None, "data", None
    )
    assert parallel.fsdp_partition_spec((5, 7), 8, 0) == PartitionSpec()  # indivisible
    assert parallel.fsdp_partition_spec((64,), 8, 1000) == PartitionSpec()  # too small


def test_global_batch_is_split_over_the_data_axis():
    strategy = _mesh_strategy(jax.devices())
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    batch = strategy.device_batch(local)
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    assert len(batch["x"].addressable_shards) == 8
    assert batch["x"].addressable_shards[1].data.shape == (2, 3)


def test_batch_size_that_does_not_divide_over_devices_names_the_option():
    with pytest.raises(ValueError, match=r"training.batch_size=12 .* 8 devices"):
        parallel.check_batch_size(12, 8)
    parallel_config = _config().parallel
    with parallel_config.unlocked():
        parallel_config.strategy = "tensor"
    with pytest.raises(ValueError, match=r"parallel.strategy='tensor'; allowed"):
        parallel.make_strategy(parallel_config)
