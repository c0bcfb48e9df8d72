"""--mode=eval: the sampler grid, options, sharded sampling, and a tiny digits run end to end."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import digits, toy2d
from diffusion_jax import data, models
from diffusion_jax.evaluation import sample_quality
from diffusion_jax.runs import evaluate as run
from diffusion_jax.runs import likelihood as likelihood_run
from diffusion_jax.runs import train
from diffusion_jax.runtime import parallel
from tests.label_recorder import LabelRecorder


def tiny_digits_config(**overrides):
    """digits:tiny with a 50-step chain, a few training steps and a cheap evaluation."""
    config = digits.get_config("tiny")
    config.training.num_steps = 4
    config.training.checkpoint_every = 4
    config.training.progress_bar = False
    config.diffusion.num_timesteps = 50
    config.eval.num_steps = (4,)
    config.eval.etas = (0.0, 1.0)
    config.eval.num_samples = 72  # fd_digits needs more samples than its 64 features
    config.eval.metrics = ("frechet", "precision_recall")
    config.eval.likelihoods = ("vlb", "ode")
    config.eval.num_bins = 17  # digits: grey levels 0..16
    config.eval.ode_rtol = config.eval.ode_atol = 1e-2
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    return config


def test_sampler_grid_and_params_name():
    config = tiny_digits_config()
    config.eval.num_steps = (10, 20, 50)
    settings = run.sampler_settings(config)
    assert [(s["num_steps"], s["eta"]) for s in settings] == [
        (10, 0.0), (10, 1.0), (20, 0.0), (20, 1.0), (50, 0.0), (50, 1.0)
    ]  # fmt: skip
    config.eval.sampler = "dpm_solver++"  # no eta: one setting per step count
    assert [s["eta"] for s in run.sampler_settings(config)] == [None] * 3
    variant = run.with_sampler(config, settings[1])
    assert (variant.sampling.sampler, variant.sampling.num_steps, variant.sampling.eta) == (
        "ddim", 10, 1.0
    )  # fmt: skip
    assert config.sampling.num_steps == 20  # the original is untouched
    assert run.params_name(config) == "ema_0.999"
    config.sampling.ema_index = -1
    assert run.params_name(config) == "raw"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval.metrics", ("fid",), "eval.metrics"),
        ("eval.likelihoods", ("elbo",), "eval.likelihoods"),
        ("eval.extractor", "clip", "eval.extractor"),
        ("eval.sampler", "no_such_sampler", "sampling.sampler"),
        ("eval.num_bins", 1, "eval.num_bins"),
        ("eval.ode_divergence", "trace", "eval.ode_divergence"),
    ],
)
def test_bad_options_are_named(key, value, message):
    config = tiny_digits_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        run.check_options(config)


def test_too_few_images_for_a_frechet_distance_are_refused_before_sampling():
    frechet = ("frechet",)  # the digits features are 64-d
    with pytest.raises(ValueError, match="eval.num_samples=64.*at least 65"):
        sample_quality.check_enough_images(64, "eval.num_samples", frechet, 64)
    sample_quality.check_enough_images(65, "eval.num_samples", frechet, 64)
    sample_quality.check_enough_images(8, "eval.num_samples", ("kid",), 64)  # no Frechet distance


def test_too_few_samples_for_precision_recall_are_refused_with_the_options():
    config = tiny_digits_config(**{"eval.num_samples": 3, "eval.metrics": ("precision_recall",)})
    with pytest.raises(ValueError, match="eval.num_samples=3.*3 nearest.*at least 4"):
        run.check_options(config)
    config.eval.num_samples = 4
    run.check_options(config)


class FlatPixels:
    """An extractor whose features are the pixels: shows which images were extracted."""

    def features_and_logits(self, images):
        flat = np.asarray(images).reshape(len(images), -1)
        return flat, flat[:, :2]


def test_reference_features_hold_every_image_of_the_split_once_in_order():
    """1,500 digits training images in batches of 64: 1,472 in whole batches, the 28 left
    from a padded last batch."""
    config = tiny_digits_config(**{"eval.batch_size": 64})
    features, logits = run.reference_features(config, FlatPixels())
    whole = data.make_eval_dataset(config.data, split="train", seed=0, global_batch_size=1500)
    (expected,) = [batch["x"].reshape(1500, -1) for batch in whole]
    assert features.shape == (1500, 64) and logits.shape == (1500, 2)
    np.testing.assert_array_equal(features, expected)


def test_continuous_data_are_not_dequantized():
    config = toy2d.get_config()
    config.eval.likelihoods = ("ode",)
    likelihood_run.check_options(config)  # toy2d's default: num_bins=0
    config.eval.num_bins = 256
    with pytest.raises(ValueError, match="eval.num_bins=256.*eval.num_bins=0"):
        likelihood_run.check_options(config)
    config.eval.num_bins = 0
    likelihood_run.check_options(config)


def test_vlb_needs_a_discrete_process_and_images_need_inception_weights(tmp_path):
    config = toy2d.get_config()
    config.diffusion.loss_type = "flow_matching"
    config.eval.likelihoods = ("vlb",)
    with pytest.raises(ValueError, match="'vlb'"):
        likelihood_run.check_options(config)
    config = tiny_digits_config(**{"eval.extractor": "inception"})
    with pytest.raises(ValueError, match="eval.inception_weights"):
        run.make_extractor(config, tmp_path)


def test_local_rows_of_a_sharded_batch_keep_the_global_order():
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    values = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    array = jax.device_put(values, NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS)))
    np.testing.assert_array_equal(parallel.gather_rows(parallel.local_rows(array)), values)
    np.testing.assert_array_equal(parallel.local_row_positions(array), np.arange(16))


def test_sampling_is_split_over_every_device_and_compiles_once():
    config = tiny_digits_config()
    model = models.build_model(config.model)
    params = models.init_params(model, config.model, jax.random.key(0))
    mesh = parallel.make_mesh()
    setting = run.sampler_settings(config)[0]
    generate = run.make_sharded_generate(config, model, mesh, setting)
    first, second = (generate(params, jax.random.key(seed)) for seed in (1, 2))
    assert len(generate.compiled) == 1  # one compiled program for every batch
    # One row per device: the work of a batch of 8 was split over all 8 devices.
    assert len(first.addressable_shards) == 8
    assert all(shard.data.shape == (1, 8, 8, 1) for shard in first.addressable_shards)
    rows = parallel.local_rows(first)
    np.testing.assert_array_equal(parallel.local_row_positions(first), np.arange(8))
    assert rows.shape == (8, 8, 8, 1) and np.all(np.isfinite(rows))
    assert not np.allclose(rows, parallel.local_rows(second))  # each batch has its own noise


@pytest.mark.slow
def test_eval_mode_end_to_end_and_checkpoint_mismatch(tmp_path):
    config = tiny_digits_config(**{"eval.etas": (0.0,)})
    train.train_and_evaluate(config, str(tmp_path))
    report = run.evaluate(config, str(tmp_path))

    path = tmp_path / "eval" / "step_4_ema_0.999.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert report["params"] == "ema_0.999" and report["step"] == 4
    assert report["extractor"]["name"] == "digits_classifier"
    assert report["reference"] == {"split": "train", "num_images": 1500}
    assert [(s["num_steps"], s["eta"]) for s in report["samples"]] == [(4, 0.0)]
    for entry in report["samples"]:
        assert entry["num_samples"] == 72
        assert entry["fd_digits"] > 0 and 0 <= entry["precision"] <= 1
    vlb, ode = report["likelihood"]["vlb"], report["likelihood"]["ode"]
    assert "variational bound" in vlb["what"] and "probability-flow ODE" in ode["what"]
    assert vlb["num_examples"] == ode["num_examples"] == 8
    assert vlb["nfe_per_batch"] == [50] and ode["nfe_per_batch"][0] > 6
    # A network trained 4 steps is far from the data: both above the log2(17) = 4.09 bits/dim
    # of the uniform law on the 17 grey levels.
    assert np.log2(17) < vlb["bits_per_dim"] < 100 and np.log2(17) < ode["bits_per_dim"] < 100

    wider = tiny_digits_config()
    wider.model.ch = 2 * config.model.ch
    with pytest.raises(ValueError, match="different model"):
        run.evaluate(wider, str(tmp_path))


def test_conditional_sample_labels_cycle_through_the_classes_over_batches(monkeypatch):
    """5 batches of 8 with 10 classes: sample n has label n % 10, so each class has 4
    samples, and one compiled program serves every batch."""
    config = tiny_digits_config(**{"eval.num_samples": 40, "eval.batch_size": 8})
    config.data.use_labels, config.model.num_classes = True, 10
    made, original = [], run.make_sharded_generate
    monkeypatch.setattr(
        run, "make_sharded_generate", lambda *a: made.append(original(*a)) or made[-1]
    )
    recorder = LabelRecorder(batch_size=8)
    setting = run.sampler_settings(config)[0]
    local = run.generate_local_samples(config, recorder, {}, parallel.make_mesh(), setting)
    jax.effects_barrier()
    assert len(made) == 1 and len(made[0].compiled) == 1  # one program for every batch
    np.testing.assert_array_equal(local.positions, np.arange(40))
    batches = {tuple(int(label) for label in labels) for labels in recorder.seen}
    assert batches == {tuple((8 * index + np.arange(8)) % 10) for index in range(5)}
    counts = np.bincount(np.concatenate(sorted(batches)), minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 4))
