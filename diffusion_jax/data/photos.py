"""Natural photographs that need no download: random square crops of the colour photographs
scikit-learn and scikit-image ship with their packages (a Chinese temple and a flower;
an astronaut, a cat, a coffee cup, a rocket, two motorcycles, a galaxy field, a retina and a
stained tissue), for autoencoders and latent diffusion on real images offline.

Each photograph is resized (bicubic, antialiased) so that its shorter side is
`SCALE_TO_CROP` x data.image_size, then a crop of data.image_size is taken at a position drawn
from the example's index (a pure function of the index, so the pipeline stays exactly
resumable). The train split is `NUM_TRAIN` crops of the eight training photographs, the test
split `NUM_TEST` crops of the two held out ("coffee", "flower"): a test score measures
photographs the model has not seen.
"""

from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np

from diffusion_jax.data.sources import DataSource, check_split

SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg",
                  "retina.jpg", "ihc.png")  # fmt: skip
TEST_PHOTOS = ("coffee.png", "flower.jpg")
NUM_TRAIN, NUM_TEST = 20_000, 1_000
SCALE_TO_CROP = 4
_CROP_SEED = 0x9807


def _package_file(package: str, name: str) -> str:
    """The path of a photograph in an installed package's data folder."""
    if package == "sklearn":
        import sklearn.datasets

        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    else:
        import skimage

        folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.name='photos': {path} is missing from {package}")
    return path


@functools.cache
def load_photo(name: str, short_side: int) -> np.ndarray:
    """The photograph `name` as uint8 [H, W, 3] with its shorter side resized to short_side."""
    from PIL import Image

    package = "sklearn" if name in SKLEARN_PHOTOS else "skimage"
    with Image.open(_package_file(package, name)) as image:
        image = image.convert("RGB")
        scale = short_side / min(image.size)
        size = (max(short_side, round(image.width * scale)),
                max(short_side, round(image.height * scale)))  # fmt: skip
        return np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC, reducing_gap=None))


def split_photos(split: str) -> tuple[str, ...]:
    check_split(split, allowed=("train", "test"), dataset="photos")
    names = SKLEARN_PHOTOS + SKIMAGE_PHOTOS
    held_out = split == "test"
    return tuple(name for name in names if (name in TEST_PHOTOS) == held_out)


class _DecodeCrop:
    """index -> {"x": [S, S, 3] uint8}: photograph index % P, at a position drawn from the
    index."""

    def __init__(self, names: tuple[str, ...], size: int):
        self.names, self.size = names, size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        photo = load_photo(self.names[index % len(self.names)], SCALE_TO_CROP * self.size)
        rng = np.random.default_rng((_CROP_SEED, int(index)))
        top = rng.integers(0, photo.shape[0] - self.size + 1)
        left = rng.integers(0, photo.shape[1] - self.size + 1)
        return {"x": photo[top : top + self.size, left : left + self.size]}


def build_photos(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """The photos split (module docstring), crops of data.image_size with 3 channels."""
    size = data_config.image_size
    if size < 8 or data_config.num_channels != 3:
        raise ValueError(
            f"data.name='photos' needs data.image_size >= 8 (got {size}) and "
            f"data.num_channels=3 (got {data_config.num_channels})"
        )
    names = split_photos(split)
    count = NUM_TRAIN if split == "train" else NUM_TEST
    return DataSource(
        records=np.arange(count),
        decode=_DecodeCrop(names, size),
        example_shape=(size, size, 3),
        num_classes=None,
    )
