"""scikit-learn's 8x8 handwritten digits: 1,797 real images shipped with scikit-learn.

The embedded default data set: it needs no download, so tests and tutorials run offline.
Grey levels are integers 0..16; they are scaled by 255/16 onto the 0..255 range of the
other image data sets (kept in float32, as 255/16 is not an integer), so that the common
map v / 127.5 - 1 sends them to exactly g / 8 - 1 in [-1, 1].
The split is a fixed permutation (seed 0): 1,500 training images, 297 test images.
"""

import functools

import ml_collections
import numpy as np
from sklearn.datasets import load_digits

from diffusion_jax.data import image_ops
from diffusion_jax.data.caption_templates import DIGIT_NAMES
from diffusion_jax.data.sources import DataSource, check_split

NUM_TRAIN = 1500
NATIVE_SIZE = 8
_SPLIT_PERMUTATION_SEED = 0


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images [N, 8, 8, 1] in [0, 255] (float32) and labels [N] (int32)."""
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    return images, digits.target.astype(np.int32)


def split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of a split: "train" (1,500), "test" (297) or "all"."""
    check_split(split, allowed=("train", "test", "all"), dataset="digits")
    permutation = np.random.default_rng(_SPLIT_PERMUTATION_SEED).permutation(1797)
    return {
        "train": permutation[:NUM_TRAIN],
        "test": permutation[NUM_TRAIN:],
        "all": np.arange(1797),
    }[split]


class _DecodeDigit:
    """index -> {"x": [S, S, 1], "label": int32}, upsampled by nearest neighbour."""

    def __init__(self, factor: int):
        self.factor = factor

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        images, labels = _load_digits()
        image = image_ops.upsample_nearest(images[index], factor=self.factor)
        return {"x": image, "label": labels[index]}


def build_digits(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """The digits split; `data.image_size` must be a multiple of 8 (8 or 16: nearest)."""
    size = data_config.image_size
    if size % NATIVE_SIZE:
        raise ValueError(
            f"data.image_size={size} is not allowed for digits; allowed: multiples of 8 "
            "(8 is native, 16 upsamples each pixel 2x2)"
        )
    return DataSource(
        records=split_indices(split),
        decode=_DecodeDigit(size // NATIVE_SIZE),
        example_shape=(size, size, 1),
        num_classes=10,
        class_names=DIGIT_NAMES,
    )
