"""Tests of captioned data: image folders with metadata.jsonl or NAME.txt captions (local and
in a bucket), TFDS text features, templated captions of labelled data, caption dropout,
tokenization in the pipeline, random crops, skipped bad examples, exact resumption."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from diffusion_jax import data
from diffusion_jax.data import caption_templates
from diffusion_jax.models.text.tokenizer import CLIPTokenizer, build_tokenizer
from diffusion_jax.runtime import storage
from tests import clip_vocabulary

TOKENIZER = CLIPTokenizer(build_tokenizer(*clip_vocabulary.clip_vocabulary()))


def _config(**overrides) -> ml_collections.ConfigDict:
    config = default.data_config()
    config.update(
        dict(
            name="captioned_folder",
            image_size=8,
            num_channels=3,
            random_flip=False,
            use_labels=False,
            eval_split="train",
        )  # fmt: skip
    )
    config.update(overrides)
    return config


def _batches(config, *, num_epochs=1, batch_size=None, shuffle=False, seed=0, **kwargs):
    size = batch_size or len(data.build_source(config, split="train"))
    iterator = data.make_dataset(
        config, split="train", seed=seed, global_batch_size=size, shuffle=shuffle,
        num_epochs=num_epochs, tokenizer=TOKENIZER, keep_text=True, **kwargs,
    )  # fmt: skip
    return list(iterator)


def _texts(batches) -> list[str]:
    return [str(text) for batch in batches for text in batch["text"]]


def _model_range(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _images(root: pathlib.Path, names, size=(8, 8)) -> dict[str, np.ndarray]:
    """A random PNG (lossless, so read back exactly) at each name under `root`."""
    images = {}
    for index, name in enumerate(names):
        image = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
        images[name] = image
    return images


def _write_lines(path: pathlib.Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _copy_to_bucket(local: pathlib.Path, emulator) -> str:
    """The files under `local` copied into a new bucket of the GCS emulator; its URL."""
    remote = storage.as_path(emulator.new_bucket()) / "captioned"
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(remote / path.relative_to(local).as_posix(), path.read_bytes())
    return str(remote)


# ---------------------------------------------------------------- captioned folders


@pytest.mark.parametrize("location", ["local", "gcs"])
def test_metadata_jsonl_captions_are_read_back_exactly(tmp_path, location, request, caplog):
    images = _images(tmp_path, ["b.png", "a.png", "sub/c.png"])
    lines = [
        json.dumps({"file_name": "sub/c.png", "caption": "a caf\u00e9 on the moon", "text": "no"}),
        "",  # blank lines are passed over
        json.dumps({"file_name": "a.png", "caption": "  a photo of a cat\n", "id": 3}),
        json.dumps({"file_name": "./b.png", "caption": "a painting of a horse"}),
    ]
    _write_lines(tmp_path / "metadata.jsonl", lines)
    root = str(tmp_path)
    if location == "gcs":
        root = _copy_to_bucket(tmp_path, request.getfixturevalue("gcs_emulator"))
    config = _config(folder_path=root, caption_column="caption")
    with caplog.at_level("WARNING"):
        (batch,) = _batches(config)
    assert not [record for record in caplog.records if "Ignored" in record.getMessage()]
    expected = ["a photo of a cat", "a painting of a horse", "a caf\u00e9 on the moon"]
    assert _texts([batch]) == expected  # sorted paths: a.png, b.png, sub/c.png; stripped
    for row, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        np.testing.assert_array_equal(batch["x"][row], _model_range(images[name]))
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (3, 77)
    np.testing.assert_array_equal(batch["input_ids"], TOKENIZER(expected))
    assert set(batch) == {"x", "text", "input_ids"}


def test_caption_files_beside_the_images_are_their_captions(tmp_path, caplog):
    images = _images(tmp_path, ["dog.png", "cats/tabby.png"])
    (tmp_path / "dog.txt").write_text("a dog in the snow\n\n")
    (tmp_path / "cats" / "tabby.txt").write_text("\ufeffa tabby cat", encoding="utf-8")
    (tmp_path / "unused.txt").write_text("a caption of no image")
    (tmp_path / "labels.csv").write_text("not read")
    with caplog.at_level("WARNING"):
        (batch,) = _batches(_config(folder_path=str(tmp_path)))
    assert _texts([batch]) == ["a tabby cat", "a dog in the snow"]  # cats/tabby.png first
    np.testing.assert_array_equal(batch["x"][1], _model_range(images["dog.png"]))
    ignored = [record.getMessage() for record in caplog.records if "Ignored" in record.getMessage()]
    assert ignored == [f"Ignored 1 file that is not images (.png/.jpg/.jpeg) in {tmp_path}: "
                       "labels.csv"]  # fmt: skip
    without_tokenizer = next(data.make_dataset(
        _config(folder_path=str(tmp_path)), split="train", seed=0, global_batch_size=2
    ))  # fmt: skip
    assert set(without_tokenizer) == {"x"}  # captions are only there when asked for


def _metadata_cases(meta: str, root: str) -> list[tuple[list[str], str, int]]:
    """(metadata lines, first problem, number of problems) for images a.png and b.png."""
    good_a = json.dumps({"file_name": "a.png", "text": "a"})
    allowed = 'allowed: one object per line, {"file_name": "a.png", "text": "a photo of a cat"}'
    no_b = f"{root}/b.png has no caption: no line of {meta} names it"
    return [
        ([good_a, '{"file_name": "b.png", "text": "b"'],
         f"{meta} line 2: not JSON (Expecting ',' delimiter: line 1 column 35 (char 34)); "
         f"{allowed}", 2),
        ([good_a, '["b.png", "b"]'], f'{meta} line 2: no "file_name"; {allowed}', 2),
        ([json.dumps({"file_name": "b.png", "caption": "b"}), good_a],
         f"{meta} line 1: no caption column 'text' (data.caption_column); the line has "
         "['caption', 'file_name']", 2),
        ([good_a, json.dumps({"file_name": "b.png", "text": 7})],
         f"{meta} line 2: caption column 'text' is 7, not a string", 2),
        ([good_a, json.dumps({"file_name": "b.png", "text": " "})],
         f"{meta} line 2 ('b.png'): empty caption; allowed: non-empty text "
         "(data.caption_dropout makes the empty captions of classifier-free guidance)", 1),
        ([good_a, json.dumps({"file_name": "c.png", "text": "c"})],
         f"{meta} line 2: file_name 'c.png' is not an image of {root}; allowed: the path of a "
         ".png/.jpg/.jpeg file relative to the folder (not hidden)", 2),
        ([good_a, json.dumps({"file_name": "b.png", "text": "b"}), good_a],
         f"{meta} line 3: file_name 'a.png' is also on line 1", 1),
        ([good_a], no_b, 1),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(8))
def test_metadata_problems_name_the_file_and_line_or_are_left_out(tmp_path, case, caplog):
    _images(tmp_path, ["a.png", "b.png"])
    meta = tmp_path / "metadata.jsonl"
    lines, problem, count = _metadata_cases(str(meta), str(tmp_path))[case]
    _write_lines(meta, lines)
    more = f" (and {count - 1} more problem)" if count > 1 else ""
    with pytest.raises(ValueError) as error:
        data.build_source(_config(folder_path=str(tmp_path)), split="train")
    assert str(error.value) == f"{problem}{more}; data.skip_bad_examples=True leaves them out"
    with caplog.at_level("WARNING"):
        (batch,) = _batches(_config(folder_path=str(tmp_path), skip_bad_examples=True))
    duplicate = "is also on line" in problem  # the second line naming a.png is left out
    assert _texts([batch]) == (["a", "b"] if duplicate else ["a"])
    (warning,) = [
        record.getMessage() for record in caplog.records if "left out" in record.getMessage()
    ]
    assert warning.startswith(
        f"{tmp_path}: {count} problem{'s' * (count > 1)}, their images left out "
        f"(data.skip_bad_examples=True), {len(batch['x'])} captioned image"
    )
    assert problem in warning


def test_missing_and_empty_caption_files_are_named(tmp_path, caplog):
    _images(tmp_path, ["a.png", "b.png", "c.jpg"])
    (tmp_path / "a.txt").write_text("an apple")
    (tmp_path / "b.txt").write_text(" \n\t\n")
    config = _config(folder_path=str(tmp_path))
    with pytest.raises(ValueError) as error:
        data.build_source(config, split="train")
    assert str(error.value) == (
        f"{tmp_path}/c.jpg has no caption: {tmp_path}/c.txt does not exist; allowed: a caption "
        "file NAME.txt beside each image, or a metadata.jsonl (and 1 more problem); "
        "data.skip_bad_examples=True leaves them out"
    )
    (tmp_path / "c.txt").write_text("a cherry")
    with pytest.raises(ValueError, match=f"^{tmp_path}/b.txt: empty caption; allowed: non-empty"):
        data.build_source(config, split="train")
    with caplog.at_level("WARNING"):
        texts = _texts(_batches(_config(folder_path=str(tmp_path), skip_bad_examples=True)))
    assert texts == ["an apple", "a cherry"]
    assert any(
        "1 problem, their images left out" in record.getMessage() for record in caplog.records
    )


def test_a_corrupt_image_is_named_when_read_or_replaced_and_counted(tmp_path, caplog):
    images = _images(tmp_path, ["a.png", "c.png"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    config = _config(folder_path=str(tmp_path))
    iterator = data.make_dataset(config, split="train", seed=0, global_batch_size=3, shuffle=False)
    with pytest.raises(ValueError, match=f"^cannot read image file {tmp_path}/b.png: "):
        next(iterator)  # listing and captions were fine: found only when read
    with caplog.at_level("WARNING"):
        (batch,) = _batches(_config(folder_path=str(tmp_path), skip_bad_examples=True))
    assert _texts([batch]) == ["caption a", "caption c", "caption c"]  # b.png -> the next one
    np.testing.assert_array_equal(batch["x"][1], _model_range(images["c.png"]))
    (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warning.startswith(
        "Skipped an unreadable example (data.skip_bad_examples=True; 1 skipped in this process "
        f"so far): cannot read image file {tmp_path}/b.png"
    )


# ---------------------------------------------------------------- random crops


def test_random_crops_are_windows_of_the_shorter_side_image_at_varying_offsets(tmp_path):
    (image,) = _images(tmp_path, ["wide.png"], size=(8, 24)).values()  # shorter side 8 already
    (tmp_path / "wide.txt").write_text("a wide image")
    centered = _batches(_config(folder_path=str(tmp_path)), num_epochs=1)[0]["x"][0]
    np.testing.assert_array_equal(centered, _model_range(image[:, 8:16]))
    crops = _concat_x(_batches(_config(folder_path=str(tmp_path), random_crop=True), num_epochs=40))
    windows = [_model_range(image[:, left : left + 8]) for left in range(17)]
    offsets = [
        next(left for left, w in enumerate(windows) if np.array_equal(w, crop)) for crop in crops
    ]
    assert len(set(offsets)) > 10  # 40 draws of 17 offsets
    resized = data.build_source(_config(folder_path=str(tmp_path), random_crop=True, image_size=4),
                                split="train")[0]["x"]  # fmt: skip
    assert resized.shape == (4, 12, 3)  # shorter side to image_size, aspect ratio kept


def _concat_x(batches) -> np.ndarray:
    return np.concatenate([batch["x"] for batch in batches])


# ---------------------------------------------------------------- templates and dropout

DIGIT_TEMPLATES = ("a handwritten digit {name}", "the number {label}")


def _digits(**overrides):
    return _config(name="digits", num_channels=1, use_labels=True, eval_split="test", **overrides)


def test_templated_digit_captions_name_the_class_and_are_a_function_of_the_seed():
    batches = _batches(_digits(caption_templates=DIGIT_TEMPLATES), shuffle=True, seed=3)
    texts, labels = _texts(batches), np.concatenate([batch["label"] for batch in batches])
    names = caption_templates.DIGIT_NAMES
    first = [text == f"a handwritten digit {names[label]}" for text, label in zip(texts, labels)]
    second = [text == f"the number {label}" for text, label in zip(texts, labels)]
    assert np.all(np.logical_or(first, second))  # every caption is its own class's
    assert "a handwritten digit seven" in texts and "the number 7" in texts
    sigma = np.sqrt(0.25 / len(texts))
    assert abs(np.mean(first) - 0.5) < 5 * sigma
    again = _batches(_digits(caption_templates=DIGIT_TEMPLATES), shuffle=True, seed=3)
    assert _texts(again) == texts  # deterministic
    other_seed = _batches(_digits(caption_templates=DIGIT_TEMPLATES), shuffle=False, seed=4)
    unshuffled = _batches(_digits(caption_templates=DIGIT_TEMPLATES), shuffle=False, seed=3)
    assert _texts(other_seed) != _texts(unshuffled)
    np.testing.assert_array_equal(batches[0]["input_ids"], TOKENIZER(texts[:1500]))


def test_cifar10_templates_use_its_class_names():
    with tfds.testing.mock_data(num_examples=16):
        config = _config(name="cifar10", image_size=32, use_labels=True, num_classes=10,
                         caption_templates=("a photo of a {name}",))  # fmt: skip
        batch = next(data.make_dataset(config, split="train", seed=0, global_batch_size=16,
                                       keep_text=True))  # fmt: skip
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck")  # fmt: skip
    assert _texts([batch]) == [f"a photo of a {names[label]}" for label in batch["label"]]


def test_caption_dropout_rate_is_within_binomial_error_and_fixed_per_position():
    rate, config = 0.3, _digits(caption_templates=("the number {label}",), caption_dropout=0.3)
    dropped = np.array([text == "" for text in _texts(_batches(config, num_epochs=2))])
    dropped = dropped.reshape(2, 1500)  # two passes in order over the same 1,500 digits
    sigma = np.sqrt(rate * (1 - rate) / 1500)
    assert np.all(np.abs(dropped.mean(axis=1) - rate) < 5 * sigma), dropped.mean(axis=1)
    agreement = (dropped[0] == dropped[1]).mean()  # independent draws each epoch
    expected = rate**2 + (1 - rate) ** 2
    assert abs(agreement - expected) < 5 * np.sqrt(expected * (1 - expected) / 1500)
    again = np.array([text == "" for text in _texts(_batches(config, num_epochs=2))])
    np.testing.assert_array_equal(again.reshape(2, 1500), dropped)
    (batch,) = _batches(config, num_epochs=1, batch_size=1500)
    empty = TOKENIZER([""])[0]
    row = int(np.flatnonzero(batch["text"] == "")[0])
    np.testing.assert_array_equal(batch["input_ids"][row], empty)  # bos, eos, pads
    evaluation = data.make_eval_dataset(config, split="test", seed=0, global_batch_size=99,
                                        keep_text=True)  # fmt: skip
    assert "" not in _texts(list(evaluation))  # no dropout in evaluation


# ---------------------------------------------------------------- resumption


def test_resumed_iterator_repeats_images_captions_and_input_ids_exactly(tmp_path):
    _images(tmp_path, [f"{index}.png" for index in range(10)], size=(8, 13))
    for index in range(10):
        (tmp_path / f"{index}.txt").write_text(f"photo number {index}")
    config = _config(folder_path=str(tmp_path), random_crop=True, random_flip=True,
                     caption_dropout=0.4)  # fmt: skip
    make = lambda: data.make_dataset(config, split="train", seed=5, global_batch_size=4,
                                     tokenizer=TOKENIZER, keep_text=True)  # fmt: skip
    iterator = make()
    uninterrupted = [next(iterator) for _ in range(9)]
    interrupted = make()
    for _ in range(3):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert state["caption_dropout"] == 0.4 and state["random_crop"] is True
    resumed = make()
    resumed.set_state(state)
    for expected in uninterrupted[3:]:  # 36 examples: across the ends of three epochs of 10
        actual = next(resumed)
        np.testing.assert_array_equal(actual["x"], expected["x"])
        assert list(actual["text"]) == list(expected["text"])
        np.testing.assert_array_equal(actual["input_ids"], expected["input_ids"])
    assert "" in _texts(uninterrupted) and len(set(_texts(uninterrupted))) > 5
    other = _config(folder_path=str(tmp_path), random_crop=True, random_flip=True,
                    caption_dropout=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="caption_dropout=0.4"):
        data.make_dataset(other, split="train", seed=5, global_batch_size=4).set_state(state)


# ---------------------------------------------------------------- TFDS text features


class TinyCaptionedImages(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS data set with a text feature, prepared as ArrayRecord without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        })  # fmt: skip
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(6):
            image = np.full((8, 8, 3), index * 40, np.uint8)
            yield index, {"image": image, "caption": f"caf\u00e9 {index}", "label": index % 2}


def test_tfds_text_feature_is_each_examples_caption(tmp_path):
    TinyCaptionedImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    config = _config(name="tfds", tfds_name="tiny_captioned_images", data_dir=str(tmp_path),
                     caption_feature="caption")  # fmt: skip
    (batch,) = _batches(config)
    order = np.rint((batch["x"][:, 0, 0, 0] + 1) * 127.5 / 40).astype(int)  # image index
    assert _texts([batch]) == [f"caf\u00e9 {index}" for index in order]
    assert sorted(order) == list(range(6))
    np.testing.assert_array_equal(batch["input_ids"], TOKENIZER(_texts([batch])))
    templated = _config(name="tfds", tfds_name="tiny_captioned_images", data_dir=str(tmp_path),
                        caption_templates=("a {name}",))  # fmt: skip
    assert set(_texts(_batches(templated))) == {"a cat", "a dog"}  # ClassLabel names
    wrong = _config(name="tfds", tfds_name="tiny_captioned_images", data_dir=str(tmp_path),
                    caption_feature="label")  # fmt: skip
    with pytest.raises(ValueError) as error:
        data.build_source(wrong, split="train")
    assert str(error.value) == (
        "data.caption_feature='label' is not a text feature of 'tiny_captioned_images'; "
        "allowed: ['caption'] (its features: ['caption', 'image', 'label'])"
    )


def test_mocked_tfds_text_feature_gives_strings_and_token_ids(tmp_path):
    TinyCaptionedImages(data_dir=tmp_path, file_format="array_record")  # registers the name
    with tfds.testing.mock_data(num_examples=4):
        config = _config(name="tfds", tfds_name="tiny_captioned_images", caption_feature="caption")
        (batch,) = _batches(config, batch_size=4)
    assert len(_texts([batch])) == 4 and all(isinstance(text, str) for text in _texts([batch]))
    np.testing.assert_array_equal(batch["input_ids"], TOKENIZER(_texts([batch])))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(caption_dropout=1.5), "data.caption_dropout=1.5; allowed: a probability in [0, 1]"),
        (dict(caption_templates=("the number {digit}",)),
         "data.caption_templates: 'the number {digit}' has placeholders ['digit']; "
         "allowed: ['{name}', '{label}']"),
        (dict(caption_column=""), "data.caption_column=''; allowed: a metadata.jsonl key"),
        (dict(caption_feature="text"),
         "data.caption_feature='text' is for data.name='tfds', not 'digits'; allowed: ''"),
        (dict(random_crop=True),
         "data.random_crop=True with data.name='digits'; allowed: False, or True for "
         "data.name in ['captioned_folder', 'folder', 'tfds']"),
        (dict(skip_bad_examples=True),
         "data.skip_bad_examples=True with data.name='digits'; allowed: False, or True for "
         "data.name in ['captioned_folder', 'folder']"),
        (dict(caption_dropout=0.1),
         "data.caption_dropout=0.1 but data set 'digits' has no captions (data.name="
         "'captioned_folder', data.caption_feature or data.caption_templates give them); "
         "allowed: 0"),
    ],
)  # fmt: skip
def test_caption_options_are_checked_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        data.build_source(_digits(**overrides), split="train")
    assert str(error.value) == message


def test_templates_need_labels_and_a_run_config_is_validated_at_start_up(tmp_path):
    toy = _config(name="toy2d", caption_templates=("a {name}",))
    with pytest.raises(ValueError, match="^data.caption_templates caption examples by their"):
        data.build_source(toy, split="train")
    from diffusion_jax.runs import validate

    config = default.get_config()
    config.data.caption_dropout = -0.1
    with pytest.raises(ValueError, match=r"^data.caption_dropout=-0.1; allowed"):
        validate.validate(config)


@pytest.mark.slow
def test_worker_processes_yield_the_same_captions_and_input_ids(tmp_path):
    """Every caption stage (decoding, dropout, the tokenizer) is picklable for grain workers."""
    _images(tmp_path, [f"{index}.png" for index in range(6)], size=(8, 12))
    for index in range(6):
        (tmp_path / f"{index}.txt").write_text(f"photo {index}")
    make = lambda workers: data.make_dataset(
        _config(folder_path=str(tmp_path), random_crop=True, caption_dropout=0.5,
                skip_bad_examples=True, num_workers=workers),
        split="train", seed=1, global_batch_size=4, tokenizer=TOKENIZER, keep_text=True,
    )  # fmt: skip
    in_process, with_workers = make(0), make(1)
    try:
        for _ in range(4):
            expected, actual = next(in_process), next(with_workers)
            np.testing.assert_array_equal(actual["x"], expected["x"])
            assert list(actual["text"]) == list(expected["text"])
            np.testing.assert_array_equal(actual["input_ids"], expected["input_ids"])
    finally:
        with_workers.close()
