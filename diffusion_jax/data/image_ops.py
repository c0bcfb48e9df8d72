"""Per-example image operations on uint8 arrays [H, W, C], done on the host with PIL/NumPy.

Resizing uses PIL's filters, which widen their support when shrinking and so
anti-alias, like `tf.image.resize(..., antialias=True)` in score_sde's pipeline.
"""

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def center_crop(image: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """The central `height` x `width` window of `image` [H, W, C]."""
    image_height, image_width = image.shape[:2]
    if height > image_height or width > image_width:
        raise ValueError(
            f"cannot crop {height}x{width} from an image of {image_height}x{image_width}"
        )
    top = (image_height - height) // 2
    left = (image_width - width) // 2
    return image[top : top + height, left : left + width]


def resize(image: np.ndarray, *, size: int, method: str = "bicubic") -> np.ndarray:
    """Resizes uint8 `image` [H, W, C] to [size, size, C] (anti-aliased when shrinking)."""
    if image.shape[:2] == (size, size):
        return image
    if method not in _RESAMPLE:
        raise ValueError(f"unknown resize method {method!r}; allowed: {sorted(_RESAMPLE)}")
    channels = image.shape[2]
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil_image.resize((size, size), resample=_RESAMPLE[method]))
    return resized.reshape(size, size, channels)


def center_crop_and_resize(
    image: np.ndarray, *, size: int, crop: int | None = None, method: str = "bicubic"
) -> np.ndarray:
    """Central square crop of side `crop` (default: the shorter side), resized to `size`."""
    side = min(image.shape[:2]) if crop is None else crop
    return resize(center_crop(image, height=side, width=side), size=size, method=method)


def resize_shorter_side(image: np.ndarray, *, size: int, method: str = "bicubic") -> np.ndarray:
    """Resizes uint8 `image` [H, W, C] so that its shorter side is `size`, keeping its aspect
    ratio (the longer side rounded), as torchvision's `Resize(size)`; for random crops."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_height, new_width) == (height, width):
        return image
    channels = image.shape[2]
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil_image.resize((new_width, new_height), resample=_RESAMPLE[method]))
    return resized.reshape(new_height, new_width, channels)


def random_square_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square window of side min(H, W) of `image` [H, W, C] at a uniformly drawn offset
    along its longer side (the whole image when it is square)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return image[top : top + side, left : left + side]


def pad_to_size(image: np.ndarray, *, size: int) -> np.ndarray:
    """Zero-pads `image` [H, W, C] symmetrically to [size, size, C] (black border)."""
    height, width = image.shape[:2]
    if height > size or width > size:
        raise ValueError(f"cannot pad an image of {height}x{width} to {size}x{size}")
    top, left = (size - height) // 2, (size - width) // 2
    padding = ((top, size - height - top), (left, size - width - left), (0, 0))
    return np.pad(image, padding)


def upsample_nearest(image: np.ndarray, *, factor: int) -> np.ndarray:
    """Repeats each pixel of `image` [H, W, C] `factor` x `factor` times (exact, no filtering)."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
