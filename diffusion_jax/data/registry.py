"""Data set names typed in configs (`data.name`) -> the builder of their `DataSource`.

Adding a data set is one entry in `DATASETS`: a function
`(data_config, split) -> DataSource`. `build_source` checks the options every data set shares
(labels, flips, crops, captions) against what the data set holds.
"""

from collections.abc import Callable
from typing import NamedTuple

import ml_collections

from diffusion_jax.data.caption_templates import check_templates
from diffusion_jax.data.captioned_folder import build_captioned_folder
from diffusion_jax.data.digits import build_digits
from diffusion_jax.data.folder import build_folder
from diffusion_jax.data.photos import build_photos
from diffusion_jax.data.sources import DataSource, skip_unreadable
from diffusion_jax.data.tfds_sources import build_celeb_a, build_cifar10, build_mnist, build_tfds
from diffusion_jax.data.toy2d import build_toy2d

SourceBuilder = Callable[[ml_collections.ConfigDict, str], DataSource]

DATASETS: dict[str, SourceBuilder] = {
    "cifar10": build_cifar10,
    "celeb_a": build_celeb_a,
    "mnist": build_mnist,
    "tfds": build_tfds,
    "digits": build_digits,
    "toy2d": build_toy2d,
    "folder": build_folder,
    "captioned_folder": build_captioned_folder,
    "photos": build_photos,
}
# Data sets whose images are resized to their shorter side for `data.random_crop`.
RANDOM_CROP_DATASETS = ("captioned_folder", "folder", "tfds")
# Data sets of image files, whose unreadable files `data.skip_bad_examples` skips.
FILE_DATASETS = ("captioned_folder", "folder")


class DatasetInfo(NamedTuple):
    """What model initialisation needs to know about a data set."""

    example_shape: tuple[int, ...]  # shape of one `x`: (H, W, C), or (2,) for toy2d
    num_classes: int | None  # None when the model is unconditional (data.use_labels=False)
    num_train_examples: int


def check_options(data_config: ml_collections.ConfigDict) -> None:
    """The crop, caption and skipping options, each outside what is allowed (for its data
    set) a ValueError naming it; what needs the data set itself is in `build_source`."""
    name = data_config.name
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is unknown; allowed: {sorted(DATASETS)}")
    dropout = data_config.caption_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise ValueError(f"data.caption_dropout={dropout!r}; allowed: a probability in [0, 1]")
    check_templates(data_config.caption_templates)
    column = data_config.caption_column
    if not isinstance(column, str) or not column:
        raise ValueError(f"data.caption_column={column!r}; allowed: a metadata.jsonl key")
    if data_config.caption_feature and name != "tfds":
        raise ValueError(
            f"data.caption_feature={data_config.caption_feature!r} is for data.name='tfds', "
            f"not {name!r}; allowed: ''"
        )
    for option, allowed in (("random_crop", RANDOM_CROP_DATASETS),
                            ("skip_bad_examples", FILE_DATASETS)):  # fmt: skip
        value = data_config[option]
        if not isinstance(value, bool) or (value and name not in allowed):
            raise ValueError(
                f"data.{option}={value!r} with data.name={name!r}; allowed: False, or True "
                f"for data.name in {list(allowed)}"
            )


def _check_captions(data_config: ml_collections.ConfigDict, source: DataSource) -> None:
    """Templates need class labels and no captions of the data set's own; dropout captions."""
    templates, name = data_config.caption_templates, data_config.name
    if templates and source.num_classes is None:
        raise ValueError(
            f"data.caption_templates caption examples by their class, but data set {name!r} "
            "has no class labels; allowed: ()"
        )
    if templates and source.has_captions:
        raise ValueError(
            f"data.caption_templates with data set {name!r}, which has captions of its own; "
            "allowed: ()"
        )
    if data_config.caption_dropout and not (templates or source.has_captions):
        raise ValueError(
            f"data.caption_dropout={data_config.caption_dropout} but data set {name!r} has no "
            "captions (data.name='captioned_folder', data.caption_feature or "
            "data.caption_templates give them); allowed: 0"
        )


def build_source(data_config: ml_collections.ConfigDict, *, split: str) -> DataSource:
    """The `DataSource` of `split`, checked against the config's labels, flip, crop and
    caption options; unreadable files skipped with `data.skip_bad_examples`."""
    check_options(data_config)
    source = DATASETS[data_config.name](data_config, split)
    _check_captions(data_config, source)
    if data_config.skip_bad_examples:
        source = skip_unreadable(source)
    if data_config.use_labels and source.num_classes is None:
        raise ValueError(
            f"data.use_labels=True but data set {data_config.name!r} has no class labels; "
            "allowed: False"
        )
    if data_config.use_labels and data_config.num_classes != source.num_classes:
        raise ValueError(
            f"data.num_classes={data_config.num_classes} but data set {data_config.name!r} has "
            f"{source.num_classes} classes; allowed: {source.num_classes}"
        )
    if data_config.random_flip and not source.is_image:
        raise ValueError(
            f"data.random_flip=True applies to images, not to {data_config.name!r} examples of "
            f"shape {source.example_shape}; allowed: False"
        )
    return source


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Shapes and sizes of the training split, without reading any example."""
    source = build_source(data_config, split=data_config.train_split)
    num_classes = source.num_classes if data_config.use_labels else None
    return DatasetInfo(source.example_shape, num_classes, len(source))
