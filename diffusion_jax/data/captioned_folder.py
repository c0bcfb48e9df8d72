"""A folder of images with captions (`data.name = "captioned_folder"`), in the convention of
HuggingFace's imagefolder:

- `metadata.jsonl` at the top of the folder: one JSON object per line, with "file_name" (the
  image's path relative to the folder, e.g. "cats/a.png") and a caption column
  (`data.caption_column`, "text" by default); blank lines are passed over;
- or, without metadata.jsonl, `NAME.txt` beside each image `NAME.png` / `NAME.jpg`: the file's
  UTF-8 text is the caption.

Captions are stripped of surrounding whitespace. Only the top-level metadata.jsonl is read
(not metadata.csv, nor metadata files in subfolders).

Images are found, read and cropped as by the "folder" source (`folder.py`; no class labels).
Examples come in sorted order of their paths, whatever the order of metadata.jsonl.

Everything that listing and the captions can tell is checked at start-up, before any image is
read: a metadata line that is not a JSON object, lacks "file_name" or the caption column, has
a caption that is not a string, names a file that is missing, not an image or named by an
earlier line; an image that no line names, or without its .txt; an empty caption (an empty
caption file, or ""). Each is a ValueError naming the file (metadata.jsonl with its line
number) and what is allowed. With `data.skip_bad_examples`, those examples are left out
instead, and one warning gives their count and the first few problems. A corrupt image is
only found when it is read (`sources.skip_unreadable`). Captions are read with one request
each (16 at a time), which a remote folder of many images makes slow to start.
"""

import concurrent.futures
import json
import os
import posixpath

import ml_collections
from absl import logging

from diffusion_jax.data.folder import DecodeImageFile, folder_root, scan_images
from diffusion_jax.data.sources import DataSource, check_split

METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
_READ_THREADS = 16
_SHOWN_PROBLEMS = 5


class _DecodeCaptionedImage(DecodeImageFile):
    """(path, caption) -> {"x": uint8 [S, S, C] (or shorter side S), "text": str}."""

    def __call__(self, record: tuple[str, str]) -> dict:
        path, caption = record
        return {"x": self.read(path), "text": caption}


def _relative(path: os.PathLike, root: os.PathLike) -> str:
    return path.relative_to(root).as_posix()


def _read_text(path: os.PathLike) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); ValueError naming it if not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def _parse_line(line: str, where: str, column: str) -> tuple[str, str]:
    """(file_name, caption) of one metadata line; ValueError starting with `where`."""
    example = json.dumps({"file_name": "a.png", column: "a photo of a cat"})
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{where}: not JSON ({error}); allowed: one object per line, {example}"
        ) from None
    if not isinstance(entry, dict) or "file_name" not in entry:
        raise ValueError(f'{where}: no "file_name"; allowed: one object per line, {example}')
    if column not in entry:
        raise ValueError(
            f"{where}: no caption column {column!r} (data.caption_column); the line has "
            f"{sorted(entry)}"
        )
    caption = entry[column]
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption column {column!r} is {caption!r}, not a string")
    return str(entry["file_name"]), caption


def _check_caption(caption: str, where: str) -> str:
    caption = caption.strip()
    if not caption:
        raise ValueError(
            f"{where}: empty caption; allowed: non-empty text (data.caption_dropout makes "
            "the empty captions of classifier-free guidance)"
        )
    return caption


def _metadata_captions(
    root: os.PathLike, images: list[os.PathLike], column: str
) -> tuple[dict[str, str], list[str]]:
    """{relative path: caption} of the images metadata.jsonl names, and the problems."""
    metadata_path = root / METADATA_FILE
    image_names = {_relative(path, root) for path in images}
    captions, lines, problems = {}, {}, []
    for number, line in enumerate(_read_text(metadata_path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata_path} line {number}"
        try:
            file_name, caption = _parse_line(line, where, column)
            name = posixpath.normpath(file_name)
            if name in lines:
                raise ValueError(f"{where}: file_name {file_name!r} is also on line {lines[name]}")
            if name not in image_names:
                raise ValueError(
                    f"{where}: file_name {file_name!r} is not an image of {root}; allowed: the "
                    "path of a .png/.jpg/.jpeg file relative to the folder (not hidden)"
                )
            lines[name] = number
            captions[name] = _check_caption(caption, f"{where} ({file_name!r})")
        except ValueError as error:
            problems.append(str(error))
    for name in sorted(image_names - set(lines)):
        problems.append(f"{root / name} has no caption: no line of {metadata_path} names it")
    return captions, problems


def _caption_file(path: os.PathLike) -> os.PathLike:
    return path.with_suffix(CAPTION_SUFFIX)


def _caption_file_captions(
    root: os.PathLike, images: list[os.PathLike], others: list[os.PathLike]
) -> tuple[dict[str, str], list[str]]:
    """{relative path: caption} of the images with a non-empty NAME.txt, and the problems."""
    existing = {_relative(path, root) for path in others}
    problems, captioned = [], []
    for image in images:
        if _relative(_caption_file(image), root) in existing:
            captioned.append(image)
        else:
            problems.append(
                f"{image} has no caption: {_caption_file(image)} does not exist; allowed: a "
                f"caption file NAME{CAPTION_SUFFIX} beside each image, or a {METADATA_FILE}"
            )
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        texts = list(pool.map(lambda image: _read_text(_caption_file(image)), captioned))
    captions = {}
    for image, text in zip(captioned, texts, strict=True):
        try:
            captions[_relative(image, root)] = _check_caption(text, str(_caption_file(image)))
        except ValueError as error:
            problems.append(str(error))
    return captions, problems


_REPORTED_FOLDERS: set[str] = set()  # each folder's left-out examples are logged once


def _report(problems: list[str], *, skip: bool, root: os.PathLike, kept: int) -> None:
    """Raise the first problem (saying how many more), or with `skip` log them in one line,
    once per folder (a run builds its source more than once)."""
    if not problems or (skip and str(root) in _REPORTED_FOLDERS):
        return
    more = len(problems) - 1
    if not skip:
        others = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise ValueError(f"{problems[0]}{others}; data.skip_bad_examples=True leaves them out")
    _REPORTED_FOLDERS.add(str(root))
    shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + ("; ..." if more >= _SHOWN_PROBLEMS else "")
    logging.warning(
        "%s: %d problem%s, their images left out (data.skip_bad_examples=True), %d captioned "
        "image%s kept: %s",
        root,
        len(problems),
        "s" * (len(problems) > 1),
        kept,
        "s" * (kept != 1),
        shown,
    )


def build_captioned_folder(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """The captioned images under `data.folder_path` (module docstring), {"x", "text"}."""
    check_split(split, allowed=("train",), dataset="captioned_folder")
    root = folder_root(data_config, dataset="captioned_folder")
    has_metadata = (root / METADATA_FILE).is_file()
    if has_metadata:  # the files that are not images but are read are not reported as ignored
        read = lambda path: _relative(path, root) == METADATA_FILE
    else:
        read = lambda path: path.suffix == CAPTION_SUFFIX
    images, others = scan_images(root, ignored=read)
    if has_metadata:
        captions, problems = _metadata_captions(root, images, data_config.caption_column)
    else:
        captions, problems = _caption_file_captions(root, images, others)
    records = [(str(path), captions[_relative(path, root)]) for path in images
               if _relative(path, root) in captions]  # fmt: skip
    _report(problems, skip=data_config.skip_bad_examples, root=root, kept=len(records))
    if not records:
        raise ValueError(f"data.folder_path={str(root)!r}: no image has a usable caption")
    size, channels = data_config.image_size, data_config.num_channels
    decode = _DecodeCaptionedImage(
        size=size, num_channels=channels, random_crop=data_config.random_crop
    )
    return DataSource(records, decode, (size, size, channels), None, has_captions=True)
