"""The record type every data set builder returns, before shuffling, sharding and batching.

A `DataSource` is random access: `decode(records[i])` is example `i` of the split,
`{"x": array, "label": int32 []}` ("label" present when the data set has classes).
Images are [H, W, C] with values in [0, 255] (uint8, or float32 where the data set
has finer grey levels, e.g. digits); 2-D toy points are float32 [2] and are not rescaled.
Random access is what makes the pipeline resumable: every example is a pure function of
its index (see `pipeline.py`).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One split of a data set.

    Attributes:
      records: random-access raw records (a tfds data source, an array, a list of paths).
      decode: raw record -> {"x": [H, W, C] in [0, 255] or [2], "label": int32 []}.
        Must be picklable (module-level functions or classes) for grain worker processes.
      example_shape: shape of `x`, e.g. (32, 32, 3) or (2,).
      num_classes: number of classes, or None if the data set has no class labels.
    """

    records: Sequence[Any]
    decode: Callable[[Any], dict[str, np.ndarray]]
    example_shape: tuple[int, ...]
    num_classes: int | None

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
