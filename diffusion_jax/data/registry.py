"""Data set names typed in configs (`data.name`) -> the builder of their `DataSource`.

Adding a data set is one entry in `DATASETS`: a function
`(data_config, split) -> DataSource`.
"""

from collections.abc import Callable
from typing import NamedTuple

import ml_collections

from diffusion_jax.data.digits import build_digits
from diffusion_jax.data.folder import build_folder
from diffusion_jax.data.photos import build_photos
from diffusion_jax.data.sources import DataSource
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
    "photos": build_photos,
}


class DatasetInfo(NamedTuple):
    """What model initialisation needs to know about a data set."""

    example_shape: tuple[int, ...]  # shape of one `x`: (H, W, C), or (2,) for toy2d
    num_classes: int | None  # None when the model is unconditional (data.use_labels=False)
    num_train_examples: int


def build_source(data_config: ml_collections.ConfigDict, *, split: str) -> DataSource:
    """The `DataSource` of `split`, checked against the config's labels and flip options."""
    if data_config.name not in DATASETS:
        raise ValueError(f"data.name={data_config.name!r} is unknown; allowed: {sorted(DATASETS)}")
    source = DATASETS[data_config.name](data_config, split)
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
