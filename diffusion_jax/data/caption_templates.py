"""Captions of labelled data made from templates, for text-to-image training on class data:
`data.caption_templates = ("a handwritten digit {name}", "the number {label}")` captions a
digits seven as "a handwritten digit seven" or "the number 7".

`{name}` is the class name of the data set (digits and mnist: "zero" ... "nine"; cifar10:
"airplane" ... "truck"; other TFDS data sets: their ClassLabel names, or "0", "1", ... where
they have none; an image folder: the subfolder's name), `{label}` the class index. Each time
an example is met (each position n of the stream, so afresh every epoch) one template is drawn
uniformly by a Philox generator keyed by (the stream's seed, n): the captions are a pure
function of the position, and a resumed iterator repeats them exactly.
"""

import string
from collections.abc import Sequence

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# CIFAR-10's classes in label order (batches.meta.txt; TFDS has them only in prepared data)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")  # fmt: skip
PLACEHOLDERS = ("name", "label")


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """`templates` as a tuple, after checking each is a non-empty string whose only
    placeholders are {name} and {label}; ValueError naming `data.caption_templates`."""
    for template in templates:
        if not isinstance(template, str) or not template.strip():
            raise ValueError(
                f"data.caption_templates holds {template!r}; allowed: non-empty strings"
            )
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as error:
            raise ValueError(f"data.caption_templates: {template!r}: {error}") from None
        fields = [field for _, field, _, _ in parsed if field is not None]
        unknown = sorted(set(fields) - set(PLACEHOLDERS))
        if unknown or "" in fields:
            raise ValueError(
                f"data.caption_templates: {template!r} has placeholders {unknown or ['{}']}; "
                f"allowed: {['{' + name + '}' for name in PLACEHOLDERS]}"
            )
    return tuple(templates)


def class_names_or_numbers(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    """The data set's class names, or "0", "1", ... where it names none."""
    if class_names is None:
        return tuple(str(label) for label in range(num_classes))
    return tuple(class_names)


class TemplateCaption:
    """(example with "label", rng) -> the example with "text": a template drawn by `rng`,
    filled with the class's name and index (a grain `random_map` transform)."""

    def __init__(self, templates: Sequence[str], class_names: Sequence[str]):
        self.templates, self.class_names = tuple(templates), tuple(class_names)

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        label = int(example["label"])
        template = self.templates[int(rng.integers(len(self.templates)))]
        return {**example, "text": template.format(name=self.class_names[label], label=label)}
