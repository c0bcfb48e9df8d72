"""End-to-end tests of an autoencoder run (runs/autoencoder.py, runs/autoencoder_eval.py)
and of a latent diffusion run on its latents (runs/latent.py): both resume bitwise, the
latent scale is 1 / std of the first batch's latents and survives the resume, samples are
decoded images, mismatched sections are named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import autoencoder_digits, autoencoder_photos, ldm_digits
from diffusion_jax import data
from diffusion_jax.convert import diffusers_vae
from diffusion_jax.runs import autoencoder, autoencoder_eval, latent, restore, sample, train

pytestmark = pytest.mark.slow


def _override(config, **sections):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for section, values in sections.items():
            config[section].update(values)
    return config


def _ae_config(num_steps):
    return _override(
        autoencoder_digits.get_config("tiny"),
        autoencoder_loss={"disc_start": 3},
        training={"num_steps": num_steps, "checkpoint_every": 3, "log_every": 3},
        sampling={"num_images": 8},
    )


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
    """A 6-step run straight, and one stopped after 3 steps and resumed."""
    root = tmp_path_factory.mktemp("autoencoder")
    straight = autoencoder.train(_ae_config(6), str(root / "straight"))
    autoencoder.train(_ae_config(3), str(root / "resumed"))
    resumed = autoencoder.train(_ae_config(6), str(root / "resumed"))
    return root, straight, resumed


def test_an_autoencoder_run_resumes_bitwise_through_the_discriminator_start(trained_autoencoder):
    root, straight, resumed = trained_autoencoder
    assert set(straight.params) == {"autoencoder", "logvar", "discriminator"}
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    records = [
        json.loads(line) for line in (root / "straight/metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in records if "d_loss" in r]
    # updates 0-2 (state.step < disc_start = 3) without the GAN, updates 3-5 with it
    assert [r["disc_factor"] for r in logged] == [0.0, 1.0]
    assert (root / "straight/samples.png").is_file()


def test_the_exported_autoencoder_is_the_trained_one_and_evaluates(trained_autoencoder):
    root, straight, _ = trained_autoencoder
    ae_config, params = diffusers_vae.load_autoencoder(root / "straight/autoencoder")
    assert ae_config.block_out_channels == (8, 16, 16)
    for a, b in zip(_leaves(params), _leaves(straight.params["autoencoder"]), strict=True):
        np.testing.assert_array_equal(a, b)
    report = autoencoder_eval.evaluate(_ae_config(6), str(root / "straight"))
    assert report["num_images"] == 297 and report["step"] == 6
    assert 0 < report["psnr"] < 100 and -1 <= report["ssim"] <= 1 and report["fd_digits"] > 0
    assert autoencoder_eval.reconstruct(_ae_config(6), str(root / "straight")).is_file()


def _ldm_config(autoencoder_folder, num_steps):
    return _override(
        ldm_digits.get_config("tiny"),
        latent={"autoencoder": str(autoencoder_folder)},
        training={"num_steps": num_steps, "checkpoint_every": 2, "log_every": 2},
        sampling={"num_steps": 2, "num_images": 8, "batch_size": 8},
    )


def test_a_latent_run_resumes_bitwise_with_its_scale_and_samples_images(
    trained_autoencoder, tmp_path
):
    root, _, _ = trained_autoencoder
    folder = root / "straight/autoencoder"
    straight = train.train_and_evaluate(_ldm_config(folder, 4), str(tmp_path / "straight"))
    train.train_and_evaluate(_ldm_config(folder, 2), str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(_ldm_config(folder, 4), str(tmp_path / "resumed"))
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # the scale: 1 / std of the posterior samples of the first training batch
    config = _ldm_config(folder, 4)
    ae_config, params = diffusers_vae.load_autoencoder(folder)
    expected = latent.first_batch_scale(
        config, ae_config, params, jax.random.fold_in(_train_rng(config), latent.SCALE_STREAM)
    )
    np.testing.assert_allclose(float(straight.latent_scale), expected, rtol=1e-6)
    _, restored, _ = restore.restore_for_inference(config, str(tmp_path / "resumed"))
    assert float(restored.latent_scale) == float(straight.latent_scale)
    path = sample.sample(config, str(tmp_path / "straight"))
    samples = np.load(path.with_suffix(".npz"))["samples"]
    assert samples.shape == (8, 32, 32, 1)  # decoded 8 x 8 x 4 latents


def _train_rng(config):
    """The train key of `runs.train.setup_trainer`."""
    return jax.random.split(jax.random.key(config.training.seed), 3)[1]


def test_a_latent_model_that_does_not_fit_the_latents_is_named(trained_autoencoder, tmp_path):
    root, _, _ = trained_autoencoder
    config = _override(_ldm_config(root / "straight/autoencoder", 2), model={"in_channels": 3})
    with pytest.raises(ValueError, match=r"model.in_channels=3 does not fit .* allowed: "
                       r"model.in_channels=4"):  # fmt: skip
        train.train_and_evaluate(config, str(tmp_path))
    missing = _override(config, latent={"autoencoder": str(tmp_path / "none")})
    with pytest.raises(FileNotFoundError, match="latent.autoencoder=.*none.* is not a folder"):
        train.train_and_evaluate(missing, str(tmp_path / "other"))


def test_the_data_pipeline_gives_the_batch_the_scale_is_computed_on():
    """first_batch_scale reads the same first batch as the run's own iterator."""
    config = _ldm_config("unused", 2)
    first = [
        next(iter(data.make_dataset(config.data, split="train", seed=config.training.seed,
                                    global_batch_size=8, process_index=0, process_count=1)))
        for _ in range(2)
    ]  # fmt: skip
    np.testing.assert_array_equal(first[0]["x"], first[1]["x"])
    assert jnp.asarray(first[0]["x"]).shape == (8, 32, 32, 1)


def test_the_photos_autoencoder_trains_on_the_shipped_photographs(tmp_path):
    """configs/autoencoder_photos.py (tiny): two steps on crops of the shipped photographs,
    a finite loss, a reconstruction grid and the test split's PSNR."""
    config = _override(
        autoencoder_photos.get_config("tiny"),
        training={"num_steps": 2, "checkpoint_every": 2, "log_every": 1, "eval_every": 2},
        eval={"num_batches": 1},
        sampling={"num_images": 8},
    )
    autoencoder.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    assert any(0 < r.get("eval_psnr", 0) < 100 for r in records)
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "autoencoder").is_dir()
