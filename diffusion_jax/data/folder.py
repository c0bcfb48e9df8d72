"""A folder of PNG/JPEG images (searched recursively), e.g. your own photographs.

Images are center-cropped to a square and resized to `data.image_size` (with
`data.random_crop`, resized so that their shorter side is `data.image_size`, the pipeline
then taking a square at a random offset); colour or grey follows `data.num_channels`
(3: RGB, 1: L). With `data.use_labels`, the class of an image is its top-level subfolder,
classes numbered in sorted order of the subfolder names (the folder has labels only when
every image lies in such a subfolder). The folder is one split, named "train". Files are read
lazily; an unreadable file raises a ValueError naming it when it is reached (with
`data.skip_bad_examples`, the next image is read instead, and the skip logged and counted).
The folder may be a URL (gs://bucket/images): it is listed once, by one listing of its
objects, and each image is read whole when it is needed.

Files that are not images of the data set are skipped (so they never make a class): hidden
files and folders (names starting with ".", e.g. macOS `._name.png` AppleDouble files or
`.ipynb_checkpoints/`) and anything under `__MACOSX/`; a hidden `data.folder_path` is fine.
Other files without a PNG/JPEG suffix (notes.txt, labels.csv, but also .webp or .bmp images)
are skipped too, and counted and named in one warning of the log, once per folder.

Decoding: an EXIF Orientation tag is applied first (`PIL.ImageOps.exif_transpose`), so phone
photographs come out upright as viewers show them. 16-bit grey PNGs (PIL modes "I;16",
"I;16B", "I;16L", "I;16N", or "I" as older Pillow opens them) keep their high byte
(value >> 8, so 0..65535 -> 0..255), as Pillow itself does for 16-bit colour PNGs; other 32-bit
integer ("I") and float ("F") images raise a ValueError, as their range is unknown. Alpha is
dropped, not composited: a transparent pixel keeps whatever colour it stores (often black).
"""

import io
import os

import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_jax.data import image_ops
from diffusion_jax.data.sources import DataSource, UnreadableExampleError, check_split
from diffusion_jax.runtime import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PIL_MODES = {1: "L", 3: "RGB"}
# PIL modes of 16-bit unsigned grey images.
_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _is_skipped(relative: os.PathLike) -> bool:
    """Whether a path below the folder is hidden (".name", e.g. "._x.png") or in __MACOSX/."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def _parts(path) -> tuple[str, ...]:
    """The sort key of a path: its components in order, as pathlib sorts local paths."""
    return path.parts


def _scan(root: os.PathLike) -> tuple[list[os.PathLike], list[os.PathLike]]:
    """(PNG/JPEG files, other files) under `root`, recursively, sorted; hidden ones and
    `__MACOSX/` in neither."""
    images, others = [], []
    for path in storage.list_files(root):
        if not _is_skipped(path.relative_to(root)):
            (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return sorted(images, key=_parts), sorted(others, key=_parts)


def list_images(root: os.PathLike) -> list[os.PathLike]:
    """All PNG/JPEG files under `root`, recursively, in sorted (deterministic) order.

    Hidden files and folders and `__MACOSX/` are skipped (see the module docstring).
    """
    return _scan(root)[0]


_REPORTED_FOLDERS: set[str] = set()  # each folder's ignored files are logged once


def _report_ignored(root: os.PathLike, others: list[os.PathLike], *, shown: int = 5) -> None:
    if not others or str(root) in _REPORTED_FOLDERS:
        return
    _REPORTED_FOLDERS.add(str(root))
    names = [str(path.relative_to(root)) for path in others[:shown]]
    more = f", ... ({len(others) - shown} more)" if len(others) > shown else ""
    logging.warning(
        "Ignored %d file%s that %s not images (%s) in %s: %s%s",
        len(others),
        "" if len(others) == 1 else "s",
        "is" if len(others) == 1 else "are",
        "/".join(IMAGE_SUFFIXES),
        root,
        ", ".join(names),
        more,
    )


def _to_8_bits(pil_image: Image.Image, *, file_format: str | None) -> Image.Image:
    """`pil_image` with 16-bit grey made 8-bit "L" by value >> 8; other 8-bit modes unchanged.

    Mode "I" is 16-bit grey only when read from a PNG (older Pillow); otherwise, and for mode
    "F", the range is unknown: ValueError naming the mode (`read_image` adds the file).
    """
    mode = pil_image.mode
    if mode not in _UINT16_MODES and mode not in ("I", "F"):
        return pil_image
    values = np.asarray(pil_image)
    is_uint16 = mode in _UINT16_MODES or (
        mode == "I" and file_format == "PNG" and values.min() >= 0 and values.max() <= 65535
    )
    if not is_uint16:
        raise ValueError(
            f"PIL mode {mode!r} has no known range to rescale to 8 bits; allowed: 8-bit "
            f"images and 16-bit grey PNGs (modes {', '.join(_UINT16_MODES)})"
        )
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))


def read_image(
    path: str | os.PathLike, *, size: int, num_channels: int, random_crop: bool = False
) -> np.ndarray:
    """uint8 [size, size, C] from an image file, center-cropped and resized (with
    `random_crop`: [H, W, C], resized so that min(H, W) = size, for the pipeline to crop);
    an `UnreadableExampleError` (a ValueError) naming the file if it cannot be decoded.

    EXIF orientation is applied, 16-bit grey is reduced to its high byte, alpha is dropped.
    """
    try:
        with Image.open(io.BytesIO(storage.as_path(path).read_bytes())) as pil_image:
            file_format = pil_image.format
            upright = ImageOps.exif_transpose(pil_image)
            eight_bits = _to_8_bits(upright, file_format=file_format)
            image = np.asarray(eight_bits.convert(_PIL_MODES[num_channels]))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UnreadableExampleError(f"cannot read image file {path}: {error}") from error
    image = image.reshape(image.shape[0], image.shape[1], num_channels)
    if random_crop:
        return image_ops.resize_shorter_side(image, size=size)
    return image_ops.center_crop_and_resize(image, size=size)


class DecodeImageFile:
    """(path, label) -> {"x": uint8 [S, S, C] (or shorter side S), "label": int32}."""

    def __init__(self, *, size: int, num_channels: int, random_crop: bool = False):
        self.size, self.num_channels, self.random_crop = size, num_channels, random_crop

    def read(self, path: str) -> np.ndarray:
        return read_image(
            path, size=self.size, num_channels=self.num_channels, random_crop=self.random_crop
        )

    def __call__(self, record: tuple[str, int | None]) -> dict[str, np.ndarray]:
        path, label = record
        image = self.read(path)
        if label is None:
            return {"x": image}
        return {"x": image, "label": np.int32(label)}


def folder_root(data_config: ml_collections.ConfigDict, *, dataset: str) -> os.PathLike:
    """`data.folder_path` as a path, after checking it is a directory and the channels."""
    if data_config.folder_path is None or not storage.as_path(data_config.folder_path).is_dir():
        raise FileNotFoundError(f"data.folder_path={data_config.folder_path!r} is not a directory")
    if data_config.num_channels not in _PIL_MODES:
        raise ValueError(
            f"data.num_channels={data_config.num_channels} is not allowed for {dataset} data "
            f"sets; allowed: {sorted(_PIL_MODES)}"
        )
    return storage.as_path(data_config.folder_path)


def scan_images(
    root: os.PathLike, *, ignored=lambda path: False
) -> tuple[list[os.PathLike], list[os.PathLike]]:
    """(images, other files) under `root`, sorted, from one listing; the other files, but
    those `ignored`, named in one warning; a ValueError if there are no images."""
    paths, others = _scan(root)
    _report_ignored(root, [path for path in others if not ignored(path)])
    if not paths:
        raise ValueError(
            f"data.folder_path={str(root)!r} holds no {IMAGE_SUFFIXES} files "
            "(hidden ones and __MACOSX/ are skipped)"
        )
    return paths, others


def build_folder(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """The images under `data.folder_path`, labelled by subfolder when all are in one."""
    check_split(split, allowed=("train",), dataset="folder")
    root = folder_root(data_config, dataset="folder")
    paths, _ = scan_images(root)
    # Labels exist when every image lies in a top-level subfolder (its class).
    relative_parts = [path.relative_to(root).parts for path in paths]
    has_labels = all(len(parts) > 1 for parts in relative_parts)
    class_names = sorted({parts[0] for parts in relative_parts}) if has_labels else []
    class_index = {name: index for index, name in enumerate(class_names)}
    records = [
        (str(path), class_index[parts[0]] if has_labels else None)
        for path, parts in zip(paths, relative_parts, strict=True)
    ]
    size = data_config.image_size
    decode = DecodeImageFile(
        size=size, num_channels=data_config.num_channels, random_crop=data_config.random_crop
    )
    num_classes = len(class_names) if has_labels else None
    names = tuple(class_names) if has_labels else None
    return DataSource(records, decode, (size, size, data_config.num_channels), num_classes, names)
