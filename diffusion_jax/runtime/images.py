"""Pictures of samples: image grids, scatter plots of 2-D points, PNG files (local or in an
object store: each PNG is encoded in memory and written whole)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from etils import epath
from PIL import Image

from diffusion_jax.runtime import storage


def image_grid(images: np.ndarray, *, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 image with 1px borders, each image enlarged
    `scale` times by pixel repetition (to look at 8x8 digits)."""
    pixels = np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, channels = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = 1 + row * (height + 1), 1 + column * (width + 1)
        grid[top : top + height, left : left + width] = pixels[index]
    return grid


def scatter_image(
    points: np.ndarray, *, size: int = 256, extent: float = 3.0, reference: np.ndarray | None = None
) -> np.ndarray:
    """2-D points [N, 2] drawn as a uint8 RGB image [size, size, 3] of [-extent, extent]^2.

    Samples are black, `reference` points (the data) light grey underneath.
    """
    image = np.full((size, size, 3), 255, np.uint8)
    for cloud, colour in ((reference, 200), (points, 0)):
        if cloud is None:
            continue
        pixel = np.floor((np.asarray(cloud) + extent) / (2 * extent) * size).astype(int)
        inside = np.all((pixel >= 0) & (pixel < size), axis=1)
        columns, rows = pixel[inside, 0], size - 1 - pixel[inside, 1]  # y axis points up
        image[rows, columns] = colour
    return image


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 image [H, W, C] (C = 1 or 3) as PNG."""
    image = np.asarray(image)
    encoded = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(encoded, format="PNG")
    storage.write_bytes(path, encoded.getvalue())


def write_samples(
    directory: str | os.PathLike, name: str, samples: np.ndarray, *, reference=None
) -> epath.Path:
    """`name`.png: an image grid (images) or a scatter plot (2-D points); returns its path."""
    directory = storage.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2:
        picture = scatter_image(samples, reference=reference)
    else:
        # Small images are enlarged to at least 32 pixels, to be seen in an image viewer.
        picture = image_grid(samples, scale=max(1, -(-32 // samples.shape[1])))
    path = directory / f"{name}.png"
    write_png(path, picture)
    return path
