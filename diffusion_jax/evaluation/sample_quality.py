"""Sample quality in a feature space: Frechet distance, KID, Inception Score and
precision/recall of samples against a reference set, from features and logits.

Config-free: `runs/evaluate.py` hands it the features of the samples and of the reference.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.evaluation import metrics as metrics_lib

METRICS = ("frechet", "kid", "inception_score", "precision_recall")
PRECISION_RECALL_NEIGHBOURS = 3  # k of Kynkaanniemi et al. 2019


def check_enough_images(
    count: int,
    what: str,
    wanted: tuple,
    feature_dim: int | None = None,
    *,
    metrics_option: str = "eval.metrics",
) -> None:
    """Before any sampling: each metric's least number of images, of the samples or of the
    reference split (`what` names which)."""
    least_for_neighbours = PRECISION_RECALL_NEIGHBOURS + 1
    if "precision_recall" in wanted and count < least_for_neighbours:
        raise ValueError(
            f"{what}={count}, but precision/recall needs each image's "
            f"{PRECISION_RECALL_NEIGHBOURS} nearest neighbours among the others: use at least "
            f"{least_for_neighbours}, or drop 'precision_recall' from {metrics_option}"
        )
    if feature_dim is not None and "frechet" in wanted and count <= feature_dim:
        raise ValueError(
            f"{what}={count} but the Frechet distance needs more images than the {feature_dim} "
            f"feature dimensions (the covariance is singular and the estimate strongly "
            f"biased): use at least {feature_dim + 1}, customarily 10,000 or 50,000, or drop "
            f"'frechet' from {metrics_option}"
        )


def sample_metrics(
    extractor, reference: tuple, samples: tuple, *, wanted: tuple, seed: int
) -> dict:
    """The metrics named in `wanted` (`METRICS`) of samples (features, logits) against the
    reference's, in the extractor's feature space; `seed` draws KID's subsets."""
    result = {"num_samples": len(samples[0])}
    standard = extractor.frechet_name == "fid"
    if "frechet" in wanted:
        stats = [
            metrics_lib.FeatureStats(extractor.feature_dim, extractor=extractor.name).update(f)
            for f in (samples[0], reference[0])
        ]
        result[extractor.frechet_name] = metrics_lib.frechet_distance_from_stats(*stats)
    if "kid" in wanted:
        subset_size = min(1000, len(samples[0]), len(reference[0]))
        kid = metrics_lib.kernel_inception_distance(
            samples[0],
            reference[0],
            subset_size=subset_size,
            rng=np.random.default_rng(seed),
        )
        result["kid" if standard else f"kid_{extractor.name}"] = kid._asdict()
    if "inception_score" in wanted:
        score = metrics_lib.inception_score(samples[1], num_splits=min(10, len(samples[1])))
        result["inception_score" if standard else "classifier_score"] = score._asdict()
    if "precision_recall" in wanted:
        precision_recall = metrics_lib.precision_recall(
            reference[0], samples[0], k=PRECISION_RECALL_NEIGHBOURS
        )
        result.update(precision_recall._asdict())
    return result
