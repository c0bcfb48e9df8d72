"""Tests of the input pipelines: real data values, sharding, flips, exact resumption."""

import json

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion_jax import data
from diffusion_jax.data import digits


def _config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(
        name="digits",
        tfds_name="",
        data_dir=None,
        image_size=8,
        num_channels=1,
        random_flip=False,
        use_labels=True,
        num_classes=10,
        toy_distribution="eight_gaussians",
        toy_num_points=1000,
        folder_path=None,
        num_workers=0,
        train_split="train",
        eval_split="test",
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def _take(iterator, num_batches: int) -> list[dict]:
    return [next(iterator) for _ in range(num_batches)]


def _concat(batches: list[dict], key: str = "x") -> np.ndarray:
    return np.concatenate([batch[key] for batch in batches])


# ---------------------------------------------------------------- digits


def test_digits_splits_are_disjoint_and_cover_the_1797_images():
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert len(train) == 1500 and len(test) == 297
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(1797))
    assert data.dataset_info(_config()).num_train_examples == 1500


def test_digits_values_match_sklearn_scaled_to_minus_one_one():
    sklearn_digits = load_digits()
    test_indices = digits.split_indices("test")
    iterator = data.make_dataset(
        _config(), split="test", seed=0, global_batch_size=27, shuffle=False, num_epochs=1
    )
    batches = list(iterator)
    assert len(batches) == 11  # 297 = 11 * 27
    images, labels = _concat(batches), _concat(batches, "label")
    expected = sklearn_digits.images[test_indices] / 8.0 - 1.0  # (g * 255/16) / 127.5 - 1
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-6)
    assert images.dtype == np.float32 and images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_array_equal(labels, sklearn_digits.target[test_indices])
    assert labels.dtype == np.int32


def _grey_level_multiset(images: np.ndarray, labels: np.ndarray) -> list:
    """Sorted (grey levels 0..16, label) pairs: images in [-1, 1] are g / 8 - 1 exactly."""
    levels = np.rint((images.reshape(len(images), -1) + 1.0) * 8.0).astype(int)
    return sorted(zip(map(tuple, levels), labels.tolist(), strict=True))


def test_digits_shuffled_epoch_is_a_permutation_of_the_split_and_labels_follow():
    iterator = data.make_dataset(_config(), split="train", seed=5, global_batch_size=100)
    batches = _take(iterator, 15)  # exactly one epoch of 1,500
    images, labels = _concat(batches), _concat(batches, "label")
    sklearn_digits = load_digits()
    train_indices = digits.split_indices("train")
    expected_images = sklearn_digits.images[train_indices] / 8.0 - 1.0
    expected_labels = sklearn_digits.target[train_indices]
    assert _grey_level_multiset(images, labels) == _grey_level_multiset(
        expected_images, expected_labels
    )
    assert not np.array_equal(labels, expected_labels)  # the order is shuffled


def test_digits_upsampled_to_16_repeats_each_pixel():
    iterator = data.make_dataset(
        _config(image_size=16), split="test", seed=0, global_batch_size=27, shuffle=False
    )
    images = next(iterator)["x"]
    assert images.shape == (27, 16, 16, 1)
    np.testing.assert_array_equal(images, np.repeat(np.repeat(images[:, ::2, ::2], 2, 1), 2, 2))
    with pytest.raises(ValueError, match="data.image_size"):
        data.make_dataset(_config(image_size=12), split="train", seed=0, global_batch_size=8)


# ---------------------------------------------------------------- sharding, flips, resumption


def test_batch_size_must_divide_among_processes():
    with pytest.raises(ValueError, match="training.batch_size"):
        data.make_dataset(_config(), split="train", seed=0, global_batch_size=10, process_count=4)


def test_process_shards_are_disjoint_and_cover_each_epoch():
    config = _config(name="toy2d", use_labels=False)
    num_points, global_batch, num_processes = 1000, 40, 4
    per_process = [
        _concat(
            list(
                data.make_dataset(
                    config,
                    split="train",
                    seed=11,
                    global_batch_size=global_batch,
                    process_index=index,
                    process_count=num_processes,
                    num_epochs=2,
                )
            )
        )
        for index in range(num_processes)
    ]
    assert all(len(points) == 2 * num_points // num_processes for points in per_process)
    all_points = data.build_source(config, split="train").records
    batches_per_epoch = num_points // global_batch
    epochs = []
    for epoch in range(2):
        local = slice(epoch * num_points // 4, (epoch + 1) * num_points // 4)
        seen = np.concatenate([points[local] for points in per_process])
        np.testing.assert_array_equal(np.unique(seen, axis=0), np.unique(all_points, axis=0))
        epochs.append(seen)
    assert batches_per_epoch * global_batch == num_points
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch is shuffled afresh


def test_global_batch_is_the_same_for_any_number_of_processes():
    config = _config(random_flip=True)
    single = _take(data.make_dataset(config, split="train", seed=2, global_batch_size=32), 3)
    halves = [
        _take(
            data.make_dataset(
                config,
                split="train",
                seed=2,
                global_batch_size=32,
                process_index=index,
                process_count=2,
            ),
            3,
        )
        for index in range(2)
    ]
    for step in range(3):
        for index in range(2):
            for key in ("x", "label"):
                np.testing.assert_array_equal(halves[index][step][key], single[step][key][index::2])


def test_random_flips_mirror_about_half_of_the_images_differently_each_epoch():
    config = _config(random_flip=True)
    reference = data.make_dataset(
        _config(), split="train", seed=0, global_batch_size=100, shuffle=False, num_epochs=1
    )
    flipped = data.make_dataset(
        config, split="train", seed=0, global_batch_size=100, shuffle=False, num_epochs=2
    )
    originals = _concat(list(reference))
    both_epochs = _concat(list(flipped)).reshape(2, 1500, 8, 8, 1)
    mirrored = np.zeros((2, 1500), bool)
    for epoch in range(2):
        images = both_epochs[epoch]
        is_original = np.all(images == originals, axis=(1, 2, 3))
        is_mirror = np.all(images == originals[:, :, ::-1], axis=(1, 2, 3))
        assert np.all(is_original | is_mirror)  # every image is itself or its exact mirror
        mirrored[epoch] = is_mirror & ~is_original
    asymmetric = ~np.all(originals == originals[:, :, ::-1], axis=(1, 2, 3))
    fractions = mirrored[:, asymmetric].mean(axis=1)
    sigma = np.sqrt(0.25 / asymmetric.sum())
    assert np.all(np.abs(fractions - 0.5) < 5 * sigma), fractions
    agreement = (mirrored[0] == mirrored[1])[asymmetric].mean()  # independent flips: ~1/2
    assert abs(agreement - 0.5) < 5 * sigma, agreement


def test_resumed_iterator_continues_bitwise_across_epochs_and_flips():
    config = _config(random_flip=True)
    make = lambda: data.make_dataset(config, split="train", seed=7, global_batch_size=64)
    uninterrupted = _take(make(), 40)  # 2,560 examples: crosses the epoch boundary at 1,500
    interrupted = make()
    _take(interrupted, 17)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert state["next_batch_index"] == 17
    resumed = make()
    resumed.set_state(state)
    for expected, actual in zip(uninterrupted[17:], _take(resumed, 23), strict=True):
        np.testing.assert_array_equal(actual["x"], expected["x"])
        np.testing.assert_array_equal(actual["label"], expected["label"])
    resumed_on_two_processes = data.make_dataset(
        config, split="train", seed=7, global_batch_size=64, process_index=1, process_count=2
    )
    resumed_on_two_processes.set_state(state)
    np.testing.assert_array_equal(next(resumed_on_two_processes)["x"], uninterrupted[17]["x"][1::2])


def test_state_from_another_stream_is_refused():
    state = data.make_dataset(_config(), split="train", seed=1, global_batch_size=8).get_state()
    other = data.make_dataset(_config(), split="train", seed=2, global_batch_size=8)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


@pytest.mark.slow
def test_worker_processes_yield_the_same_batches_as_in_process_reading():
    make = lambda workers: data.make_dataset(
        _config(random_flip=True, num_workers=workers), split="train", seed=3, global_batch_size=50
    )
    in_process, with_workers = _take(make(0), 6), make(2)
    try:
        for expected, actual in zip(in_process, _take(with_workers, 6), strict=True):
            np.testing.assert_array_equal(actual["x"], expected["x"])
    finally:
        with_workers.close()


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="data.name"):
        data.make_dataset(_config(name="imagenet"), split="train", seed=0, global_batch_size=8)
    with pytest.raises(ValueError, match="data.use_labels"):
        data.make_dataset(_config(name="toy2d"), split="train", seed=0, global_batch_size=8)
    with pytest.raises(ValueError, match="data.random_flip"):
        data.make_dataset(
            _config(name="toy2d", use_labels=False, random_flip=True),
            split="train",
            seed=0,
            global_batch_size=8,
        )
    with pytest.raises(ValueError, match="data.num_classes"):
        data.make_dataset(_config(num_classes=7), split="train", seed=0, global_batch_size=8)
    with pytest.raises(ValueError, match="data.train_split"):
        data.make_dataset(_config(), split="validation", seed=0, global_batch_size=8)
    with pytest.raises(ValueError, match="data.toy_distribution"):
        data.make_dataset(
            _config(name="toy2d", use_labels=False, toy_distribution="moons"),
            split="train",
            seed=0,
            global_batch_size=8,
        )
