"""TFDS data sets read through `tfds.data_source`: random access, no TensorFlow at training.

`tfds.data_source` reads the ArrayRecord files of a prepared data set. Preparing one
(downloading and converting) is a separate, one-off step that needs TensorFlow; if the
data set is not prepared, or was prepared in another file format, `load_tfds_split`
raises a FileNotFoundError that gives the exact command to prepare it.
"""

import dataclasses
import functools

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import image_ops
from diffusion_jax.data.caption_templates import CIFAR10_NAMES, DIGIT_NAMES
from diffusion_jax.data.sources import DataSource

CELEB_A_CROP = 140  # score_sde's central crop of the 218x178 CelebA faces
MNIST_NATIVE_SIZE = 28


def prepare_command(tfds_name: str, data_dir: str | None) -> str:
    """The shell command that downloads `tfds_name` and writes it as ArrayRecord files."""
    data_dir_arg = "" if data_dir is None else f", data_dir={str(data_dir)!r}"
    return (
        'pip install tensorflow && python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder({tfds_name!r}{data_dir_arg})"
        ".download_and_prepare(file_format='array_record')\""
    )


def _not_prepared_error(builder: tfds.core.DatasetBuilder, data_dir: str | None) -> Exception:
    """FileNotFoundError explaining that `builder`'s data cannot be read and how to fix it."""
    if builder.is_prepared():
        reason = (
            f"TFDS data set {builder.name!r} at {builder.data_dir} is prepared in the "
            f"{builder.info.file_format} format, not the ArrayRecord format that "
            "tfds.data_source needs; delete it or choose another data.data_dir"
        )
    else:
        reason = f"TFDS data set {builder.name!r} is not prepared in {builder.data_dir}"
    return FileNotFoundError(
        f"{reason}. Prepare it once with:\n  {prepare_command(builder.name, data_dir)}"
    )


def load_tfds_split(tfds_name: str, *, split: str, data_dir: str | None):
    """Random-access `tfds.data_source` of a prepared split (never downloads)."""
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"data.tfds_name={tfds_name!r} is not a registered TFDS data set "
            "(see tfds.list_builders())"
        ) from error
    except Exception as error:
        if str(error).startswith("Unknown split"):  # the message lists the splits
            raise ValueError(
                f"split {split!r} (data.train_split / data.eval_split) is not available for "
                f"{tfds_name!r}: {error}"
            ) from error
        # tfds fails in several ways (KeyError, NotImplementedError, ...) on missing data.
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
        if builder.is_prepared() and builder.info.file_format == array_record:
            raise  # the data is there: this is another problem
        raise _not_prepared_error(builder, data_dir) from error


def caption_text(value, *, feature: str) -> str:
    """A TFDS Text feature's value (bytes, str or a 0-d array of either) as a str."""
    value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"data.caption_feature={feature!r} holds {value!r}, not one text")


class _DecodeTfdsImage:
    """TFDS record -> {"x": uint8 [S, S, C], "label": int32, "text": str}, cropped, padded or
    resized ("shorter_side": resized so that the shorter side is S, for random crops)."""

    def __init__(self, *, size: int, mode: str, has_labels: bool, caption_feature: str = ""):
        self.size, self.mode, self.has_labels = size, mode, has_labels
        self.caption_feature = caption_feature

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.mode == "celeb_a":
            image = image_ops.center_crop_and_resize(
                image, size=self.size, crop=CELEB_A_CROP, method="bilinear"
            )
        elif self.mode == "pad":
            image = image_ops.pad_to_size(image, size=self.size)
        elif self.mode == "shorter_side":
            image = image_ops.resize_shorter_side(image, size=self.size)
        else:
            image = image_ops.center_crop_and_resize(image, size=self.size)
        example = {"x": image}
        if self.has_labels:
            example["label"] = np.int32(record["label"])
        if self.caption_feature:
            text = record[self.caption_feature]
            example["text"] = caption_text(text, feature=self.caption_feature)
        return example


def _check_caption_feature(features, name: str, tfds_name: str) -> None:
    """ValueError naming `data.caption_feature` unless `name` is a Text feature."""
    is_text = lambda feature: isinstance(feature, tfds.features.Text)
    texts = sorted(key for key, feature in features.items() if is_text(feature))
    if name not in features or not is_text(features[name]):
        raise ValueError(
            f"data.caption_feature={name!r} is not a text feature of {tfds_name!r}; allowed: "
            f"{texts} (its features: {sorted(features)})"
        )


def _tfds_image_source(
    data_config: ml_collections.ConfigDict, split: str, *, tfds_name: str, mode: str
) -> DataSource:
    records = load_tfds_split(tfds_name, split=split, data_dir=data_config.data_dir)
    features = records.dataset_info.features
    image_channels = features["image"].shape[-1]
    if image_channels != data_config.num_channels:
        raise ValueError(
            f"data.num_channels={data_config.num_channels} does not match {tfds_name!r}, "
            f"whose images have {image_channels} channel(s); allowed: {image_channels}"
        )
    num_classes = features["label"].num_classes if "label" in features else None
    class_names = tuple(features["label"].names) if "label" in features else None
    caption_feature = data_config.caption_feature
    if caption_feature:
        _check_caption_feature(features, caption_feature, tfds_name)
    if mode == "resize" and data_config.random_crop:
        mode = "shorter_side"
    size = data_config.image_size
    decode = _DecodeTfdsImage(size=size, mode=mode, has_labels=num_classes is not None,
                              caption_feature=caption_feature)  # fmt: skip
    return DataSource(records, decode, (size, size, image_channels), num_classes, class_names,
                      has_captions=bool(caption_feature))  # fmt: skip


def build_tfds(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """Any TFDS image data set `data.tfds_name` with an "image" (and optional "label")
    feature, center-cropped to a square and resized to `data.image_size` (or, with
    `data.random_crop`, resized to that shorter side for a random crop); with
    `data.caption_feature`, that Text feature is each example's caption, "text"."""
    return _tfds_image_source(data_config, split, tfds_name=data_config.tfds_name, mode="resize")


def build_cifar10(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """CIFAR-10, resized to `data.image_size`; classes named "airplane" ... "truck"."""
    source = _tfds_image_source(data_config, split, tfds_name="cifar10", mode="resize")
    return dataclasses.replace(source, class_names=CIFAR10_NAMES)


build_celeb_a = functools.partial(_tfds_image_source, tfds_name="celeb_a", mode="celeb_a")


def build_mnist(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """MNIST 28x28x1, zero-padded to `data.image_size` (32: so that U-Nets halve it cleanly
    down to 4x4; 28 keeps the native size); classes named "zero" ... "nine"."""
    if data_config.image_size < MNIST_NATIVE_SIZE:
        raise ValueError(
            f"data.image_size={data_config.image_size} is not allowed for mnist; "
            f"allowed: sizes >= {MNIST_NATIVE_SIZE} (32 pads 2 black pixels on each side)"
        )
    source = _tfds_image_source(data_config, split, tfds_name="mnist", mode="pad")
    return dataclasses.replace(source, class_names=DIGIT_NAMES)  # TFDS names them "0" ... "9"
