"""Tests of data/photos.py: crops of the photographs scikit-learn and scikit-image ship,
each a pure function of its index, from held-out photographs in the test split."""

import ml_collections
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import photos, registry


def _config(size=32, channels=3):
    return ml_collections.ConfigDict(
        {
            "name": "photos",
            "image_size": size,
            "num_channels": channels,
            "use_labels": False,
            "num_classes": 0,
            "random_flip": False,
            "random_crop": False,
            "caption_column": "text",
            "caption_feature": "",
            "caption_templates": (),
            "caption_dropout": 0.0,
            "skip_bad_examples": False,
        }  # fmt: skip
    )


def test_a_crop_is_a_window_of_its_photograph_drawn_from_its_index():
    source = registry.build_source(_config(), split="train")
    assert len(source) == photos.NUM_TRAIN and source.example_shape == (32, 32, 3)
    names = photos.split_photos("train")
    for index in (0, 1, 17, 12345):
        crop = source[index]["x"]
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, source[index]["x"])  # a function of the index
        photo = photos.load_photo(names[index % len(names)], 4 * 32)
        assert min(photo.shape[:2]) == 128
        windows = np.lib.stride_tricks.sliding_window_view(photo, (32, 32, 3))[..., 0, :, :, :]
        assert np.any(np.all(windows == crop, axis=(-3, -2, -1)))
    assert not np.array_equal(source[0]["x"], source[len(names)]["x"])  # same photo, elsewhere
    assert source[0]["x"].std() > 5  # a photograph, not a flat patch


def test_the_test_split_holds_out_two_photographs():
    train, test = photos.split_photos("train"), photos.split_photos("test")
    assert set(test) == {"coffee.png", "flower.jpg"} and not set(train) & set(test)
    assert len(train) == 9
    source = registry.build_source(_config(16), split="test")
    assert len(source) == photos.NUM_TEST and source[5]["x"].shape == (16, 16, 3)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="data.num_channels=3"):
        registry.build_source(_config(channels=1), split="train")
    with pytest.raises(ValueError, match="split 'validation' does not exist"):
        registry.build_source(_config(), split="validation")


def test_the_pipeline_batches_photos_in_minus_one_to_one():
    from configs import autoencoder_photos

    config = autoencoder_photos.get_config().data
    iterator = data.make_dataset(config, split="train", seed=0, global_batch_size=4,
                                 process_index=0, process_count=1)  # fmt: skip
    batch = next(iter(iterator))
    x = np.asarray(batch["x"])
    assert x.shape == (4, 32, 32, 3) and -1 <= x.min() < x.max() <= 1
    iterator.close()
