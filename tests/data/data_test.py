"""Tests of the input pipelines: real data values, sharding, flips, exact resumption."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps
from scipy.spatial import cKDTree
from sklearn.datasets import load_digits

from diffusion_jax import data
from diffusion_jax.data import digits, folder, toy2d
from diffusion_jax.runtime import storage


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
        random_crop=False,
        caption_column="text",
        caption_feature="",
        caption_templates=(),
        caption_dropout=0.0,
        skip_bad_examples=False,
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
    epochs = []  # 1,000 = 25 global batches of 40: epochs end on a batch boundary
    for epoch in range(2):
        per_epoch = num_points // num_processes
        local = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = np.concatenate([points[local] for points in per_process])
        np.testing.assert_array_equal(np.unique(seen, axis=0), np.unique(all_points, axis=0))
        epochs.append(seen)
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


# ---------------------------------------------------------------- 2-D toy distributions


def _toy_points(distribution: str, num_points: int = 20000) -> np.ndarray:
    config = _config(
        name="toy2d", use_labels=False, toy_distribution=distribution, toy_num_points=num_points
    )
    iterator = data.make_dataset(
        config, split="train", seed=0, global_batch_size=1000, shuffle=False, num_epochs=1
    )
    points = _concat(list(iterator))
    assert points.shape == (num_points, 2) and points.dtype == np.float32
    return points.astype(np.float64)


def test_eight_gaussians_have_equal_modes_on_the_circle_of_radius_two():
    points = _toy_points("eight_gaussians")
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    mode = np.argmin(((points[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(mode, minlength=8)
    expected, sigma = len(points) / 8, np.sqrt(len(points) * (1 / 8) * (7 / 8))
    assert np.all(np.abs(counts - expected) < 5 * sigma), counts
    for k in range(8):
        offsets = points[mode == k] - centers[k]
        np.testing.assert_allclose(offsets.mean(0), 0.0, atol=0.01)
        np.testing.assert_allclose(offsets.std(0), 0.1, rtol=0.05)


def test_checkerboard_is_uniform_on_the_eight_dark_squares():
    points = _toy_points("checkerboard")
    assert np.all(np.abs(points) <= 2.0)
    cells = np.floor(points).astype(int)
    assert np.all((cells.sum(axis=1) % 2) == 0)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    sigma = np.sqrt(len(points) * (1 / 8) * (7 / 8))
    assert len(counts) == 8 and np.all(np.abs(counts - len(points) / 8) < 5 * sigma)
    within = points - cells  # uniform on [0, 1)^2: mean 1/2, variance 1/12
    np.testing.assert_allclose(within.mean(0), 0.5, atol=0.01)
    np.testing.assert_allclose(within.var(0), 1 / 12, rtol=0.03)


def test_swiss_roll_lies_at_gaussian_distance_from_its_curve():
    points = _toy_points("swiss_roll", 5000)
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 200_001)
    curve = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.0
    distance, _ = cKDTree(curve).query(points)
    # The arms are ~1.26 apart, so the nearest-curve distance is |normal noise| ~ |N(0, 0.1^2)|.
    noise = toy2d.SWISS_ROLL_NOISE
    np.testing.assert_allclose(distance.mean(), noise * np.sqrt(2 / np.pi), rtol=0.05)
    np.testing.assert_allclose(np.sqrt((distance**2).mean()), noise, rtol=0.05)


def test_toy_info_and_fixed_splits():
    config = _config(name="toy2d", use_labels=False, toy_num_points=500)
    info = data.dataset_info(config)
    assert info == data.DatasetInfo((2,), None, 500)
    train = data.build_source(config, split="train").records
    test = data.build_source(config, split="test").records
    np.testing.assert_array_equal(train, data.build_source(config, split="train").records)
    assert not np.array_equal(train, test)


# ---------------------------------------------------------------- image folders


def _model_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> [-1, 1] in float32, as the pipeline computes it."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _write_image(path: pathlib.Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _copy_to_bucket(local: pathlib.Path, emulator) -> str:
    """The files under `local` copied into a new bucket of the GCS emulator; its URL."""
    remote = storage.as_path(emulator.new_bucket()) / "images"
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(remote / path.relative_to(local).as_posix(), path.read_bytes())
    return str(remote)


@pytest.mark.parametrize("location", ["local", "gcs"])
def test_folder_reads_png_and_jpeg_recursively_with_subfolder_labels(tmp_path, location, request):
    rng = np.random.default_rng(0)
    png = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _write_image(tmp_path / "cat" / "a.png", png)
    _write_image(tmp_path / "cat" / "deeper" / "b.PNG", png[:, ::-1])
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 16, 3))
    _write_image(tmp_path / "dog" / "c.jpg", np.ascontiguousarray(smooth))
    _write_image(tmp_path / "dog" / "wide.jpeg", np.full((24, 40, 3), 200, np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    root = str(tmp_path)
    if location == "gcs":  # the same folder in a bucket: one listing, each image read whole
        root = _copy_to_bucket(tmp_path, request.getfixturevalue("gcs_emulator"))
    config = _config(name="folder", folder_path=root, image_size=16, num_channels=3, num_classes=2)
    assert data.dataset_info(config) == data.DatasetInfo((16, 16, 3), 2, 4)
    iterator = data.make_dataset(
        config, split="train", seed=0, global_batch_size=4, shuffle=False, num_epochs=1
    )
    (batch,) = list(iterator)
    np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1])  # sorted paths, sorted classes
    np.testing.assert_array_equal(batch["x"][0], _model_range(png))  # lossless PNG: exact
    np.testing.assert_array_equal(batch["x"][1], _model_range(png[:, ::-1]))
    np.testing.assert_allclose(batch["x"][2], smooth / 127.5 - 1.0, atol=0.05)  # JPEG: lossy
    np.testing.assert_allclose(batch["x"][3], 200 / 127.5 - 1.0, atol=0.02)  # cropped, resized


def test_folder_with_an_unreadable_file_names_it(tmp_path):
    _write_image(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    config = _config(
        name="folder", folder_path=str(tmp_path), use_labels=False, image_size=8, num_channels=3
    )
    iterator = data.make_dataset(config, split="train", seed=0, global_batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="broken.jpg"):
        next(iterator)
    with pytest.raises(FileNotFoundError, match="data.folder_path"):
        data.make_dataset(
            _config(name="folder", folder_path=str(tmp_path / "missing"), use_labels=False),
            split="train",
            seed=0,
            global_batch_size=2,
        )


def test_folder_16_bit_grey_png_keeps_the_high_byte_not_a_saturated_clip(tmp_path):
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode in ("I;16", "I")  # "I" in older Pillow
    expected = (gradient >> 8).astype(np.uint8)  # 0..65535 -> 0..255, 256 values per level
    for num_channels in (1, 3):
        image = folder.read_image(tmp_path / "grey16.png", size=256, num_channels=num_channels)
        assert image.dtype == np.uint8 and image.shape == (256, 256, num_channels)
        np.testing.assert_array_equal(image, np.repeat(expected[..., None], num_channels, -1))


def test_folder_16_bit_modes_rescale_and_unknown_ranges_name_the_file_and_mode(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65279, 65535]], np.uint16)
    expected = [[0, 0, 1, 128, 254, 255]]
    big_endian = Image.frombytes("I;16B", (6, 1), values.astype(">u2").tobytes())
    little_endian = Image.frombytes("I;16L", (6, 1), values.astype("<u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32))  # how older Pillow opens 16-bit PNGs
    for pil_image, file_format in ((big_endian, None), (little_endian, None), (as_int32, "PNG")):
        eight_bits = folder._to_8_bits(pil_image, file_format=file_format)
        assert eight_bits.mode == "L"
        np.testing.assert_array_equal(np.asarray(eight_bits), expected)
    # 32-bit integers and floats (TIFF content under a .png name) have no known range.
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "int32.png", format="TIFF")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float.png", format="TIFF")
    for name, mode in (("int32.png", "'I'"), ("float.png", "'F'")):
        with pytest.raises(ValueError, match=f"{name}.*{mode}"):
            folder.read_image(tmp_path / name, size=8, num_channels=3)


def _save_with_orientation(path: pathlib.Path, image: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)


# EXIF orientation -> counter-clockwise quarter turns that make the stored pixels upright.
@pytest.mark.parametrize(("orientation", "quarter_turns"), [(3, 2), (6, -1), (8, 1)])
def test_folder_applies_exif_orientation_as_viewers_show_it(tmp_path, orientation, quarter_turns):
    stored = np.random.default_rng(orientation).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _save_with_orientation(tmp_path / "photo.png", stored, orientation)  # PNG: lossless
    image = folder.read_image(tmp_path / "photo.png", size=8, num_channels=3)
    np.testing.assert_array_equal(image, np.rot90(stored, quarter_turns))
    with Image.open(tmp_path / "photo.png") as opened:
        np.testing.assert_array_equal(image, np.asarray(ImageOps.exif_transpose(opened)))


def test_folder_jpeg_with_exif_orientation_reads_as_its_exif_transpose(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 tall: left half black, right white
    stored[:, 8:] = 255
    _save_with_orientation(tmp_path / "phone.jpg", stored, 6)  # viewers turn it 90 degrees CW
    image = folder.read_image(tmp_path / "phone.jpg", size=8, num_channels=3)
    with Image.open(tmp_path / "phone.jpg") as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert upright.shape == (16, 8, 3)
    np.testing.assert_array_equal(image, upright[4:12])  # same decode, central square
    assert image[:4].max() < 20 and image[4:].min() > 235  # black above white: upright


def test_folder_skips_hidden_files_and_macos_metadata(tmp_path):
    root = tmp_path / ".datasets" / "photos"  # a hidden folder_path itself is fine
    grey = np.full((8, 8, 3), 100, np.uint8)
    _write_image(root / "cat" / "a.png", grey)
    _write_image(root / "dog" / "b.png", grey + 50)
    (root / "._top.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # top level: no labels
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # unreadable
    _write_image(root / "__MACOSX" / "cat" / "a.png", grey)
    _write_image(root / ".ipynb_checkpoints" / "b.png", grey)
    _write_image(root / "dog" / ".thumbnails" / "c.png", grey)
    assert folder.list_images(root) == [root / "cat" / "a.png", root / "dog" / "b.png"]
    config = _config(
        name="folder", folder_path=str(root), image_size=8, num_channels=3, num_classes=2
    )
    assert data.dataset_info(config) == data.DatasetInfo((8, 8, 3), 2, 2)
    iterator = data.make_dataset(
        config, split="train", seed=0, global_batch_size=2, shuffle=False, num_epochs=1
    )
    (batch,) = list(iterator)
    np.testing.assert_array_equal(batch["label"], [0, 1])
    np.testing.assert_array_equal(batch["x"][1], _model_range(grey + 50))


def test_folder_names_the_files_it_ignores_in_one_warning(tmp_path, caplog):
    grey = np.full((8, 8, 3), 100, np.uint8)
    _write_image(tmp_path / "a.png", grey)
    _write_image(tmp_path / "sub" / "b.jpg", grey)
    Image.fromarray(grey).save(tmp_path / "c.webp")  # an image, but not one we read
    for name in ("notes.md", "labels.csv", "sub/readme.txt", "sub/x.json", "y.npy", "z.bin"):
        (tmp_path / name).write_text("not an image")
    (tmp_path / ".DS_Store").write_text("hidden: skipped without a word")
    config = _config(name="folder", folder_path=str(tmp_path), use_labels=False, image_size=8)
    with caplog.at_level("WARNING"):
        assert len(data.build_source(config, split="train")) == 2
        data.build_source(config, split="train")  # built again: not reported again
    lines = [record.getMessage() for record in caplog.records if "Ignored" in record.getMessage()]
    assert lines == [
        f"Ignored 7 files that are not images (.png/.jpg/.jpeg) in {tmp_path}: c.webp, "
        "labels.csv, notes.md, sub/readme.txt, sub/x.json, ... (2 more)"
    ]


# ---------------------------------------------------------------- TFDS


class TinyArrayRecordImages(tfds.core.GeneratorBasedBuilder):
    """A real (tiny) TFDS data set, prepared as ArrayRecord files without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")
    # No source file to look up checksums next to (tfds would need importlib_resources).
    code_path = None

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24), "test": self._generate_examples(8)}

    def _generate_examples(self, num_examples):
        for index, (image, label) in enumerate(zip(*_tiny_examples(num_examples), strict=True)):
            yield index, {"image": image, "label": label}


def _tiny_examples(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(num_examples)
    return rng.integers(0, 256, (num_examples, 32, 32, 3), np.uint8), np.arange(num_examples) % 10


def _image_multiset(images: np.ndarray, labels: np.ndarray) -> list:
    return sorted(zip((image.tobytes() for image in images), labels.tolist(), strict=True))


def test_prepared_tfds_data_set_is_read_through_data_source(tmp_path):
    TinyArrayRecordImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    config = _config(
        name="tfds",
        tfds_name="tiny_array_record_images",
        data_dir=str(tmp_path),
        image_size=32,
        num_channels=3,
        random_flip=True,
    )
    assert data.dataset_info(config) == data.DatasetInfo((32, 32, 3), 10, 24)
    shards = [
        list(
            data.make_dataset(
                config,
                split="train",
                seed=4,
                global_batch_size=8,
                process_index=index,
                process_count=2,
                num_epochs=1,
            )
        )
        for index in range(2)
    ]
    images = np.concatenate([_concat(batches) for batches in shards])
    labels = np.concatenate([_concat(batches, "label") for batches in shards])
    assert images.shape == (24, 32, 32, 3) and labels.dtype == np.int32
    expected_images, expected_labels = _tiny_examples(24)
    unflipped = np.where(  # undo the flips: each image must be its original or its mirror
        np.isin(
            [image.tobytes() for image in images],
            [_model_range(image).tobytes() for image in expected_images],
        )[:, None, None, None],
        images,
        images[:, :, ::-1],
    )
    assert _image_multiset(unflipped, labels) == _image_multiset(
        _model_range(expected_images), expected_labels
    )


def test_unprepared_tfds_data_set_says_how_to_prepare_it(tmp_path):
    config = _config(name="cifar10", data_dir=str(tmp_path), image_size=32, num_channels=3)
    with pytest.raises(FileNotFoundError, match="not prepared") as error:
        data.make_dataset(config, split="train", seed=0, global_batch_size=8)
    message = str(error.value)
    assert "tfds.builder('cifar10', data_dir=" in message and str(tmp_path) in message
    assert "download_and_prepare(file_format='array_record')" in message


def test_mocked_cifar10_mnist_and_celeb_a_have_the_documented_shapes():
    with tfds.testing.mock_data(num_examples=8):
        cifar10 = _config(name="cifar10", image_size=32, num_channels=3)
        batch = next(data.make_dataset(cifar10, split="train", seed=0, global_batch_size=8))
        assert batch["x"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32
        assert np.all(np.abs(batch["x"]) <= 1.0) and np.all(
            (batch["label"] >= 0) & (batch["label"] < 10)
        )

        mnist = _config(name="mnist", image_size=32, num_channels=1, random_flip=False)
        padded = next(
            data.make_dataset(mnist, split="train", seed=0, global_batch_size=8, shuffle=False)
        )["x"]
        native = tfds.data_source("mnist", split="train", download=False)
        assert padded.shape == (8, 32, 32, 1)
        np.testing.assert_array_equal(padded[0, 2:30, 2:30], _model_range(native[0]["image"]))
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert np.all(padded[:, border] == -1.0)  # zero padding is black

        celeb_a = _config(name="celeb_a", image_size=64, num_channels=3, use_labels=False)
        faces = next(data.make_dataset(celeb_a, split="train", seed=0, global_batch_size=8))["x"]
        assert faces.shape == (8, 64, 64, 3) and np.all(np.abs(faces) <= 1.0)
        with pytest.raises(ValueError, match="data.use_labels"):
            data.make_dataset(
                _config(name="celeb_a", image_size=64, num_channels=3),
                split="train",
                seed=0,
                global_batch_size=8,
            )


def test_eval_dataset_is_one_ordered_unflipped_pass_whatever_the_config():
    flipping = _config(random_flip=True)
    flipping.lock()
    batches = list(data.make_eval_dataset(flipping, split="test", seed=3, global_batch_size=33))
    reference = list(
        data.make_dataset(
            _config(), split="test", seed=3, global_batch_size=33, shuffle=False, num_epochs=1
        )
    )
    assert len(batches) == 297 // 33 == len(reference)
    np.testing.assert_array_equal(_concat(batches), _concat(reference))
    np.testing.assert_array_equal(_concat(batches, "label"), _concat(reference, "label"))
    assert flipping.random_flip  # the caller's config is left as it was


def test_padded_eval_dataset_holds_every_example_then_the_stream_that_follows():
    """297 test images in batches of 33 * 2 processes: 5 batches, positions >= 297 padding."""
    whole = _concat(list(data.make_eval_dataset(_config(), split="test", seed=0,
                                                global_batch_size=297)))  # fmt: skip
    rows = np.zeros((330,) + whole.shape[1:], np.float32)
    for process_index in range(2):
        iterator = data.make_dataset(
            _config(), split="test", seed=0, global_batch_size=66, process_index=process_index,
            process_count=2, shuffle=False, num_epochs=1, pad_last_batch=True,
        )  # fmt: skip
        assert len(iterator) == 5 and iterator.num_examples == 297
        for index, batch in enumerate(iterator):
            positions = data.shard_positions(
                index, global_batch_size=66, process_index=process_index, process_count=2
            )
            rows[positions] = batch["x"]
    np.testing.assert_array_equal(rows[:297], whole)
    np.testing.assert_array_equal(rows[297:], whole[:33])  # the next pass's first images
    with pytest.raises(ValueError, match="pad_last_batch needs a finite stream"):
        data.make_dataset(_config(), split="test", seed=0, global_batch_size=8,
                          pad_last_batch=True)  # fmt: skip


def test_padding_longer_than_the_split_repeats_it():
    iterator = data.make_dataset(
        _config(), split="test", seed=0, global_batch_size=1000, shuffle=False, num_epochs=1,
        pad_last_batch=True,
    )  # fmt: skip
    (batch,) = list(iterator)
    assert batch["x"].shape[0] == 1000
    np.testing.assert_array_equal(batch["x"][297:594], batch["x"][:297])


def test_shard_positions_are_where_shard_and_batch_took_each_row():
    import grain

    from diffusion_jax.data import pipeline

    stream = grain.MapDataset.range(26).map(lambda i: {"i": np.int64(i)})
    seen = []
    for process_index in range(2):
        batches = pipeline.shard_and_batch(
            stream, global_batch_size=6, process_index=process_index, process_count=2
        )
        for index in range(len(batches)):
            positions = data.shard_positions(
                index, global_batch_size=6, process_index=process_index, process_count=2
            )
            np.testing.assert_array_equal(batches[index]["i"], positions)
            seen.extend(positions)
    assert sorted(seen) == list(range(24))  # whole global batches, each row once
