"""The record type every data set builder returns, before shuffling, sharding and batching.

A `DataSource` is random access: `decode(records[i])` is example `i` of the split,
`{"x": array, "label": int32 []}` ("label" present when the data set has classes; "text", a
caption `str`, when it has captions: see `captioned_folder.py`, `tfds_sources.py`).
Images are [H, W, C] with values in [0, 255] (uint8, or float32 where the data set
has finer grey levels, e.g. digits); 2-D toy points are float32 [2] and are not rescaled.
Random access is what makes the pipeline resumable: every example is a pure function of
its index (see `pipeline.py`).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One split of a data set.

    Attributes:
      records: random-access raw records (a tfds data source, an array, a list of paths).
      decode: raw record -> {"x": [H, W, C] in [0, 255] or [2], "label": int32 []}.
        Must be picklable (module-level functions or classes) for grain worker processes.
      example_shape: shape of `x`, e.g. (32, 32, 3) or (2,); with `data.random_crop`, the
        shape after the pipeline's crop (`decode` gives [H, W, C] with min(H, W) = S).
      num_classes: number of classes, or None if the data set has no class labels.
      class_names: the name of each class ("seven", "airplane"), for templated captions;
        None where the data set names none.
      has_captions: whether each example holds a caption, "text".
    """

    records: Sequence[Any]
    decode: Callable[[Any], dict[str, np.ndarray]]
    example_shape: tuple[int, ...]
    num_classes: int | None
    class_names: tuple[str, ...] | None = None
    has_captions: bool = False

    @property
    def is_image(self) -> bool:
        return len(self.example_shape) == 3

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.decode(self.records[index])


def check_split(split: str, *, allowed: Sequence[str], dataset: str) -> None:
    """ValueError naming the split options if `split` is not one of `allowed`."""
    if split not in allowed:
        raise ValueError(
            f"split {split!r} does not exist for data set {dataset!r} "
            f"(data.train_split / data.eval_split); allowed: {list(allowed)}"
        )


class UnreadableExampleError(ValueError):
    """An example whose file cannot be decoded (a corrupt image): the message names the file.
    With `data.skip_bad_examples` such an example is replaced (`skip_unreadable`)."""


class _SkipUnreadable:
    """index -> the example at `index`, or, if its file is unreadable, the next readable one
    of the split (index + 1, index + 2, ... cyclically), each skip logged and counted."""

    def __init__(self, records: Sequence[Any], decode: Callable[[Any], dict]):
        self.records, self.decode = records, decode
        self.num_skipped = 0  # in this process (each grain worker counts its own)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        for offset in range(len(self.records)):
            try:
                return self.decode(self.records[(int(index) + offset) % len(self.records)])
            except UnreadableExampleError as error:
                self.num_skipped += 1
                logging.warning(
                    "Skipped an unreadable example (data.skip_bad_examples=True; %d skipped "
                    "in this process so far): %s",
                    self.num_skipped,
                    error,
                )
        raise ValueError(f"no example of the {len(self.records)} can be read")


def skip_unreadable(source: DataSource) -> DataSource:
    """`source` whose unreadable examples (corrupt image bytes, found only when read) are
    replaced by the next readable example in split order, so every batch stays whole and the
    stream stays a pure function of the position (exactly resumable)."""
    decode = _SkipUnreadable(source.records, source.decode)
    return dataclasses.replace(source, records=np.arange(len(source)), decode=decode)
