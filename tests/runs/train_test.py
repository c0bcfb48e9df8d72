"""Tests of diffusion_jax.runs.train: the train step (EMA, skipped non-finite updates, one
compilation), the learning-rate schedule, and real runs of the configs: the swiss roll is
learned, the class-conditional config samples with guidance, the full-size CIFAR-10 config
trains on mock data, bad inputs are named."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar10, cifar10_cond, digits, toy2d
from diffusion_jax import data
from diffusion_jax.runs import build, generate, restore, train
from diffusion_jax.training import checkpointing, loop, optimizer, train_state
from diffusion_jax.training import train_step as train_step_lib


def _override(config, **sections):
    with config.unlocked():
        for section, values in sections.items():
            config[section].update(values)
    return config


def _quadratic_loss(params, batch, rng, loss_history=None):
    per_example = jnp.sum((batch["x"] - params["w"]) ** 2, axis=-1)
    return jnp.mean(per_example), {"per_example": per_example, "t": jnp.zeros_like(per_example)}


def test_train_step_moves_ema_and_skips_non_finite_updates():
    tx = optax.sgd(0.1)
    step_fn = jax.jit(
        chex.assert_max_traces(
            train_step_lib.make_train_step(
                _quadratic_loss,
                tx,
                optax.constant_schedule(0.1),
                ema_decays=(0.5, 0.0),
                ema_warmup=False,  # the plain EMA; train_state_test covers the warm-up
            ),
            n=1,
        )
    )
    state = train_state.create_train_state({"w": jnp.zeros(2)}, tx, num_ema=2)
    rng = jax.random.key(0)
    state, metrics = step_fn(state, {"x": jnp.ones((4, 2), jnp.float32)}, rng)
    # SGD on mean ||x - w||^2 from w = 0: w = 0.1 * 2 = 0.2; EMA 0.5: 0.1; EMA 0: w.
    np.testing.assert_allclose(state.params["w"], [0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(state.ema_params[0]["w"], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(state.ema_params[1]["w"], [0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], 2.0, rtol=1e-6)
    before = jax.tree.map(np.asarray, state)
    state, metrics = step_fn(state, {"x": jnp.full((4, 2), jnp.nan, jnp.float32)}, rng)
    assert not bool(metrics["finite"])
    assert int(state.step) == 2 and int(state.num_skipped) == 1
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _adam_step_fn(skip_with: str):
    tx = optax.adam(0.1)
    step_fn = train_step_lib.make_train_step(
        _quadratic_loss,
        tx,
        optax.constant_schedule(0.1),
        ema_decays=(0.9,),
        ema_warmup=False,
        skip_with=skip_with,
    )
    return jax.jit(step_fn), train_state.create_train_state({"w": jnp.zeros(2)}, tx, num_ema=1)


@pytest.mark.parametrize("skip_with", train_step_lib.SKIP_FORMS)
def test_skipped_step_leaves_adam_moments_and_emas_untouched(skip_with):
    step_fn, state = _adam_step_fn(skip_with)
    rng = jax.random.key(0)
    state, _ = step_fn(state, {"x": jnp.ones((4, 2), jnp.float32)}, rng)
    before = jax.tree.map(np.asarray, (state.params, state.ema_params, state.opt_state))
    assert np.all(before[0]["w"] != 0.0)  # the finite step did move the parameters
    state, metrics = step_fn(state, {"x": jnp.full((4, 2), jnp.inf, jnp.float32)}, rng)
    assert not bool(metrics["finite"]) and int(state.num_skipped) == 1
    after = (state.params, state.ema_params, state.opt_state)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_both_ways_of_skipping_give_the_same_steps():
    """The "cond" and "select" forms are two programs of one function: bitwise equal states
    over finite and skipped steps alike; an unknown form is named."""
    (cond_fn, cond_state), (select_fn, select_state) = map(_adam_step_fn, train_step_lib.SKIP_FORMS)
    rng = jax.random.key(0)
    for x in (1.0, 2.0, np.nan, 3.0):
        batch = {"x": jnp.full((4, 2), x, jnp.float32)}
        cond_state, _ = cond_fn(cond_state, batch, rng)
        select_state, _ = select_fn(select_state, batch, rng)
        chex.assert_trees_all_equal(cond_state, select_state)
    assert int(cond_state.num_skipped) == 1 and int(cond_state.step) == 4
    with pytest.raises(ValueError, match="skip_with='where'"):
        train_step_lib.make_train_step(
            _quadratic_loss, optax.adam(0.1), optax.constant_schedule(0.1), ema_decays=(),
            skip_with="where",
        )  # fmt: skip


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    config = _override(
        digits.get_config(), optim={"warmup_steps": 10, "decay": "cosine", "final_lr_fraction": 0.1}
    )
    schedule = optimizer.make_lr_schedule(config.optim, num_steps=110)
    peak = config.optim.learning_rate
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), peak * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), peak * 0.1, rtol=1e-5)


def test_logged_learning_rate_is_the_one_applied_after_skipped_steps():
    """optax's schedule counts applied updates: after 2 skipped steps, step 4 applies the
    rate of the 2nd update, and that is what is logged."""
    schedule = optax.linear_schedule(0.0, 1.0, transition_steps=10)
    tx = optax.sgd(schedule)
    step_fn = jax.jit(
        train_step_lib.make_train_step(_quadratic_loss, tx, schedule, ema_decays=(0.5,))
    )
    state = train_state.create_train_state({"w": jnp.zeros(2)}, tx, num_ema=1)
    rng, ones = jax.random.key(0), jnp.ones((4, 2), jnp.float32)
    logged = []
    for x in (jnp.full_like(ones, jnp.nan), jnp.full_like(ones, jnp.nan), ones, ones):
        w_before = state.params["w"]
        state, metrics = step_fn(state, {"x": x}, rng)
        logged.append(float(metrics["learning_rate"]))
        if bool(metrics["finite"]):  # sgd: w -= lr * 2 (w - 1)
            applied = float((state.params["w"] - w_before)[0] / (2.0 * (1.0 - w_before[0])))
            np.testing.assert_allclose(logged[-1], applied, rtol=1e-6)
    np.testing.assert_allclose(logged, [0.0, 0.0, 0.0, 0.1], atol=1e-7)


def test_logged_loss_and_gradient_norm_average_the_applied_steps(tmp_path):
    """A skipped (non-finite) step counts in skipped_updates, not in the window's means."""
    import types

    from diffusion_jax.runtime import metrics_writer

    run = types.SimpleNamespace(
        options=train.loop_options(digits.get_config("tiny")),
        writer=metrics_writer.MetricsWriter(tmp_path, enabled=False),
    )
    nan = float("nan")
    pending = [
        {"finite": True, "loss": 1.0, "grad_norm": 2.0, "learning_rate": 0.1},
        {"finite": False, "loss": nan, "grad_norm": nan, "learning_rate": 0.1},
        {"finite": True, "loss": 3.0, "grad_norm": 4.0, "learning_rate": 0.1},
    ]
    scalars = loop.log_metrics(run, 3, pending, loop.Throughput(0))
    assert (scalars["loss"], scalars["grad_norm"], scalars["skipped_updates"]) == (2.0, 3.0, 1)


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_on_nonfinite_stop_names_the_step_and_keeps_the_checkpoint(tmp_path):
    config = _override(
        digits.get_config("tiny"),
        training={"num_steps": 12, "checkpoint_every": 5, "log_every": 5},
        optim={"learning_rate": 1e30, "warmup_steps": 0},
        sampling={"num_steps": 2, "num_images": 4},
    )
    with config.unlocked():
        config.training.on_nonfinite = "stop"
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step \d+"):
        train.train_and_evaluate(config, str(tmp_path))
    for step in checkpointing.checkpoint_steps(tmp_path):  # whatever was saved is finite
        _, state, _ = restore.restore_for_inference(config, str(tmp_path))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
        assert step <= int(state.step)


def _energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), zero iff the laws are equal."""

    def mean_distance(u, v):
        return float(np.mean(np.linalg.norm(u[:, None] - v[None], axis=-1)))

    return 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)


@pytest.mark.slow
def test_toy2d_learns_the_swiss_roll(tmp_path):
    config = _override(
        toy2d.get_config(),
        training={"num_steps": 1500, "log_every": 500, "checkpoint_every": 1500},
        sampling={"num_steps": 200, "num_images": 1000, "batch_size": 1000},
    )
    train.train_and_evaluate(config, str(tmp_path))
    test_points = next(
        data.make_dataset(config.data, split="test", seed=0, global_batch_size=1000)
    )["x"]
    model, state, _ = restore.restore_for_inference(config, str(tmp_path))
    generate_fn = jax.jit(generate.make_generate_fn(config, model, count=1000))
    rng = jax.random.key(7)
    trained = np.asarray(generate_fn(state.ema_params[0], rng))
    initial_params = build.make_create_fn(config, model, optax.identity())(
        jax.random.split(jax.random.key(config.training.seed), 3)[0]
    ).params
    initial = np.asarray(generate_fn(initial_params, rng))
    trained_distance = _energy_distance(trained, test_points)
    initial_distance = _energy_distance(initial, test_points)
    print(f"energy distance to the swiss roll: initial {initial_distance:.4f}, "
          f"trained {trained_distance:.4f}")  # fmt: skip
    assert trained_distance < 0.1 * initial_distance
    assert trained_distance < 0.05
    losses = [record["loss"] for record in _metrics(tmp_path)]
    assert losses[-1] < losses[0]
    assert (tmp_path / "samples.png").exists()


@pytest.mark.slow
def test_class_conditional_config_trains_and_samples_with_guidance(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        config = _override(cifar10_cond.get_config("tiny"), training={"num_steps": 4})
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape[0] > 32 and grid.std() > 0
    model = restore.build_model_and_optimizer(config)[0]
    rng = jax.random.key(0)
    # After 4 steps the output layer is still near its zero initialisation, so the network
    # barely depends on the label; perturbed parameters make the conditional and null
    # predictions differ, so that guidance visibly acts.
    leaves, treedef = jax.tree.flatten(state.ema_params[0])
    keys = jax.random.split(rng, len(leaves))
    params = jax.tree.unflatten(
        treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    )
    samples = {}
    for scale in (1.0, 3.0):
        guided = _override(config.copy_and_resolve_references(), sampling={"guidance_scale": scale})
        generate_fn = jax.jit(generate.make_generate_fn(guided, model, count=4))
        samples[scale] = np.asarray(generate_fn(params, rng))
    assert np.all(np.isfinite(samples[3.0]))
    assert not np.allclose(samples[1.0], samples[3.0])  # guidance changes the samples


@pytest.mark.slow
def test_full_size_cifar10_config_trains_two_steps_on_mock_data(tmp_path):
    config = _override(
        cifar10.get_config(),
        training={"num_steps": 2, "batch_size": 8, "log_every": 1, "eval_every": 0},
        sampling={"num_steps": 2, "num_images": 1},
    )
    with tfds.testing.mock_data(num_examples=16):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    losses = [record["loss"] for record in _metrics(tmp_path)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert checkpointing.checkpoint_steps(tmp_path) == [2]


def test_batch_size_that_does_not_divide_over_devices_is_named(tmp_path):
    config = _override(digits.get_config("tiny"), training={"batch_size": 12})
    with pytest.raises(ValueError, match=r"training.batch_size=12 does not divide over the 8"):
        train.train_and_evaluate(config, str(tmp_path))


def test_workdir_of_another_model_is_refused_and_its_checkpoint_kept(tmp_path):
    config = _override(
        digits.get_config("tiny"),
        training={"num_steps": 2, "checkpoint_every": 2},
        sampling={"num_steps": 2, "num_images": 4},
    )
    train.train_and_evaluate(config, str(tmp_path))
    wider = _override(config.copy_and_resolve_references(), model={"ch": 32})
    with pytest.raises(ValueError, match="belongs to a different model"):
        train.train_and_evaluate(wider, str(tmp_path))
    assert checkpointing.checkpoint_steps(tmp_path) == [2]


def test_unreadable_image_in_a_folder_data_set_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(8):
        Image.fromarray(np.full((8, 8, 3), index * 30, np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    config = _override(
        digits.get_config("tiny"),
        data={"name": "folder", "folder_path": str(folder), "num_channels": 3},
        model={"in_channels": 3, "out_channels": 3},
        training={"num_steps": 2},
    )
    with pytest.raises(Exception, match="broken.png"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_inconsistent_sections_are_named():
    config = _override(digits.get_config("tiny"), model={"in_channels": 3})
    with pytest.raises(ValueError, match="model.image_size=8, model.in_channels=3"):
        train.train_and_evaluate(config, "/tmp/unused")
    config = _override(digits.get_config("tiny"), diffusion={"variance_type": "learned_range"})
    with pytest.raises(ValueError, match="model.learn_sigma=True"):
        train.train_and_evaluate(config, "/tmp/unused")


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"batch_size": 12}, r"eval.batch_size=12 does not divide over the 8 devices"),
        ({"num_batches": 0}, r"eval.num_batches=0 must be >= 1"),
        ({"batch_size": 512}, r"data.eval_split='test' has 297 examples.*eval.batch_size=512"),
    ],
)
def test_evaluation_settings_are_checked_before_the_first_step(tmp_path, evaluation, message):
    config = _override(digits.get_config("tiny"), training={"eval_every": 2}, eval=evaluation)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists() or not _metrics(tmp_path)


def test_a_failing_evaluation_loses_no_checkpoint(tmp_path, monkeypatch):
    config = _override(
        digits.get_config("tiny"),
        training={"num_steps": 4, "eval_every": 2, "checkpoint_every": 2},
        sampling={"num_steps": 2, "num_images": 4},
    )

    def failing_evaluation(*args):
        raise OSError("the evaluation data went away")

    monkeypatch.setattr(train, "make_bits_per_dim_hook", lambda *args: failing_evaluation)
    with pytest.raises(OSError, match="went away"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpointing.checkpoint_steps(tmp_path) == [2]


def test_a_resumed_run_records_each_step_once(tmp_path, monkeypatch):
    """Stopped at step 3 with the checkpoint of step 2, then resumed: metrics.jsonl holds
    steps 1..4 once each (step 3 of the stopped run is dropped, then logged again)."""
    config = _override(
        digits.get_config("tiny"),
        training={"num_steps": 4, "log_every": 1, "checkpoint_every": 2},
        sampling={"num_steps": 2, "num_images": 4},
    )
    original = loop.after_step

    def crash_at_step_3(run, step, metrics):
        original(run, step, metrics)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "after_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path))
    assert [row["step"] for row in _metrics(tmp_path)] == [1, 2, 3]
    monkeypatch.setattr(loop, "after_step", original)
    train.train_and_evaluate(config, str(tmp_path))
    assert [row["step"] for row in _metrics(tmp_path)] == [1, 2, 3, 4]


def test_bits_per_dim_is_evaluated_every_eval_every_steps(tmp_path):
    config = _override(
        digits.get_config("tiny"),
        diffusion={"num_timesteps": 50},
        training={"num_steps": 4, "eval_every": 2, "log_every": 2, "checkpoint_every": 4},
        sampling={"num_steps": 2, "num_images": 4},
        eval={"batch_size": 8, "num_batches": 2},
    )
    train.train_and_evaluate(config, str(tmp_path))
    evaluated = {
        r["step"]: r["eval_bits_per_dim"] for r in _metrics(tmp_path) if "eval_bits_per_dim" in r
    }
    assert sorted(evaluated) == [2, 4]
    # An untrained model is far from the data, yet a bound on 8-bit data stays in (0, 100).
    assert all(0.0 < value < 100.0 for value in evaluated.values())


def _final_params(config, workdir) -> list[np.ndarray]:
    _, state, _ = restore.restore_for_inference(config, str(workdir))
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_rbg_prng_trains_with_dropout_and_resumes_bitwise(tmp_path):
    # JAX_DEFAULT_PRNG_IMPL=rbg (XLA's RngBitGenerator, common on TPUs): every key of the run
    # is an rbg key, dropout's included.
    config = _override(
        digits.get_config("tiny"),
        model={"dropout": 0.1},
        training={"num_steps": 6, "checkpoint_every": 3, "log_every": 3},
        sampling={"num_steps": 2, "num_images": 4},
    )
    stopped = _override(config.copy_and_resolve_references(), training={"num_steps": 3})
    with jax.default_prng_impl("rbg"):
        train.train_and_evaluate(config, str(tmp_path / "straight"))
        train.train_and_evaluate(stopped, str(tmp_path / "resumed"))
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
        straight = _final_params(config, tmp_path / "straight")
        resumed = _final_params(config, tmp_path / "resumed")
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    losses = [r["loss"] for r in _metrics(tmp_path / "straight") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
