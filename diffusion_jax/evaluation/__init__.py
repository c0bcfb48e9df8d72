"""Sample-quality evaluation: feature extractors (FID InceptionV3, digits classifier) and
float64 metrics on their features (Frechet distance, KID, IS, precision/recall).

See docs/evaluation.md for the weights, their conversion and the image preprocessing.
"""

from diffusion_jax.evaluation.features import (
    CollectedFeatures,
    DigitsExtractor,
    FeatureExtractor,
    InceptionExtractor,
    cached_reference_stats,
    collect_features,
    digits_extractor,
    load_inception_extractor,
    train_digits_classifier,
)
from diffusion_jax.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "CollectedFeatures",
    "DigitsExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionExtractor",
    "cached_reference_stats",
    "collect_features",
    "digits_extractor",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_score",
    "kernel_inception_distance",
    "load_inception_extractor",
    "precision_recall",
    "train_digits_classifier",
]
