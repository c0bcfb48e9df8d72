"""--mode eval of a text-conditional model on labelled data: how often a classifier labels
samples of a class's prompt as that class, at each guidance scale.

For K classes, sample n is drawn with the prompt `eval.prompt_template` filled with class
n % K ("the number 7" for k = 7), `eval.num_samples` of them per guidance scale w of
`eval.guidance_scales` (the guided prediction eps("") + w (eps(prompt) - eps("")), Ho &
Salimans 2022, Eq. 6; w = 1 is the conditional model alone), and classified by
`eval.prompt_classifier` (the digits classifier of `evaluation.features`, trained on the
digits training split). The report holds each scale's accuracy and per-class accuracy. The
sampling and the classifier are handed in (`runs.evaluate`), so this module only chooses
the prompts and counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import ml_collections
import numpy as np

from diffusion_jax.runs import text_conditioning

CLASSIFIERS = ("digits",)


def check_options(config: ml_collections.ConfigDict) -> None:
    """The `eval.prompt_*` options of a text-conditional model; errors name the key."""
    evaluation = config.eval
    if not evaluation.guidance_scales:
        return
    if not text_conditioning.uses_text(config):
        raise ValueError(
            f"eval.guidance_scales={tuple(evaluation.guidance_scales)} measures a "
            f"text-conditional model, not model.name={config.model.name!r}; allowed: ()"
        )
    if evaluation.prompt_classifier not in CLASSIFIERS:
        raise ValueError(
            f"eval.prompt_classifier={evaluation.prompt_classifier!r}; allowed: {CLASSIFIERS}"
        )
    if evaluation.prompt_classifier == "digits" and config.data.name != "digits":
        raise ValueError(
            f"eval.prompt_classifier='digits' classifies digits, not data.name="
            f"{config.data.name!r}; allowed: eval.guidance_scales=() for other data"
        )
    try:
        evaluation.prompt_template.format(name="name", label=0)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"eval.prompt_template={evaluation.prompt_template!r}: {error!r}; allowed: a "
            "string with the placeholders {name} and {label} only"
        ) from None


def class_prompts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`eval.prompt_template` filled with each class's name and index, in label order."""
    names = text_conditioning.class_names(config)
    template = config.eval.prompt_template
    return tuple(template.format(name=name, label=label) for label, name in enumerate(names))


def with_prompts(config, prompts, guidance_scale: float) -> ml_collections.ConfigDict:
    """A copy of the config that samples `prompts` in turn at `guidance_scale`."""
    variant = copy.deepcopy(config)
    variant.sampling.prompts = tuple(prompts)
    variant.sampling.guidance_scale = float(guidance_scale)
    return variant


def accuracy_of(predicted: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """(accuracy, per-class accuracy) of predictions [N] of samples whose class is n % K."""
    labels = np.arange(len(predicted)) % num_classes
    correct = predicted == labels
    per_class = [float(np.mean(correct[labels == k])) for k in range(num_classes)]
    return float(np.mean(correct)), per_class


def prompt_accuracy(
    config: ml_collections.ConfigDict,
    draw: Callable[[ml_collections.ConfigDict, dict], object],
    classify: Callable[[object], np.ndarray],
    settings: list[dict],
) -> list[dict]:
    """[{sampler setting, "guidance_scale", "accuracy", "per_class_accuracy"}, ...] for each
    sampler setting x `eval.guidance_scales`: `draw(variant_config, setting)` samples
    `eval.num_samples` images, `classify(images) -> logits [N, K]`."""
    prompts = class_prompts(config)
    count = config.eval.num_samples
    results = []
    for setting in settings:
        for scale in config.eval.guidance_scales:
            logits = classify(draw(with_prompts(config, prompts, scale), setting))[:count]
            accuracy, per_class = accuracy_of(np.argmax(logits, axis=-1), len(prompts))
            results.append({**setting, "prompt_template": config.eval.prompt_template,
                            "guidance_scale": float(scale), "accuracy": accuracy,
                            "per_class_accuracy": per_class})  # fmt: skip
    return results
