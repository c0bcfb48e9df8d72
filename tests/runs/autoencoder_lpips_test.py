"""The LPIPS term of an autoencoder run (runs/autoencoder.py): off and said to be off
without `autoencoder_loss.lpips_weights`; a bad file stops the run, named with the config
key, before any compute; with a weights file a tiny run trains with it and logs its name."""

import json
import logging

import numpy as np
import pytest

from configs import autoencoder_digits
from diffusion_jax.evaluation import lpips_weights
from diffusion_jax.runs import autoencoder
from tests.lpips_params import random_params


def _config(**loss):
    config = autoencoder_digits.get_config("tiny")
    with config.unlocked():
        config.autoencoder_loss.update(loss)
        config.training.update(num_steps=2, checkpoint_every=2, log_every=1)
        config.autoencoder_loss.disc_start = 1
    return config


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "lpips_random.npz"
    return lpips_weights.save_lpips(path, random_params(3), source="random test weights")


def test_the_log_says_whether_there_is_a_perceptual_term(weights_file):
    off = autoencoder.loss_options(_config())
    assert autoencoder.perceptual_weights(_config()) is None
    assert autoencoder.describe_loss(off, None).endswith(
        "; no perceptual (LPIPS) term (autoencoder_loss.lpips_weights is empty)"
    )
    zero = _config(lpips_weights=weights_file, perceptual_weight=0.0)
    assert autoencoder.perceptual_weights(zero) is None
    assert "perceptual_weight is 0" in autoencoder.describe_loss(
        autoencoder.loss_options(zero), None
    )
    on = _config(lpips_weights=weights_file)
    described = autoencoder.describe_loss(autoencoder.loss_options(on), weights_file)
    assert f"l1 reconstruction + 1 x LPIPS (VGG16, weights {weights_file}) + " in described
    assert "no perceptual" not in described


def test_a_bad_weights_file_is_named_with_the_key_before_any_compute(weights_file, tmp_path):
    workdir = tmp_path / "run"
    absent = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match=r"autoencoder_loss.lpips_weights='.*absent.npz'"):
        autoencoder.train(_config(lpips_weights=absent), str(workdir))
    flat = lpips_weights.flatten(random_params(3))
    flat["lin/relu4_3"] = np.ones(7, np.float32)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **flat, **{"meta/format_version": np.asarray(1)})
    with pytest.raises(ValueError) as error:
        autoencoder.train(_config(lpips_weights=str(wrong)), str(workdir))
    assert f"autoencoder_loss.lpips_weights='{wrong}'" in str(error.value)
    assert "lin/relu4_3 has shape (7,), expected (512,)" in str(error.value)
    assert not workdir.exists()


@pytest.mark.slow
def test_a_run_with_lpips_weights_trains_with_the_term_and_logs_the_file(
    weights_file, tmp_path, caplog
):
    with caplog.at_level(logging.INFO):
        autoencoder.train(_config(lpips_weights=weights_file), str(tmp_path))
    assert any(f"LPIPS (VGG16, weights {weights_file})" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "lpips" in r]
    assert len(logged) == 2 and all(r["lpips"] > 0 and np.isfinite(r["loss"]) for r in logged)
    assert logged[-1]["disc_factor"] == 1.0  # the GAN's adaptive weight ran with the term
