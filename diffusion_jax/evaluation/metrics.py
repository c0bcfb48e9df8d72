"""Sample-quality metrics on feature sets, in float64 numpy on the host.

- Frechet distance (FID when the features are Inception pool3; Heusel et al. 2017, Eq. 6):
  |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), from streaming mean and covariance.
- Kernel Inception Distance (Binkowski et al. 2018, Eq. 4): unbiased MMD^2 with the cubic
  kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
- Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), over 10 splits.
- Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3): k-NN balls, k = 3.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from diffusion_jax.runtime import storage


def _as_feature_matrix(features: np.ndarray, *, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name}: shape {features.shape} not allowed; expected [N, D]")
    return features


def _check_same_dim(dim_a: int, dim_b: int, *, what: str) -> None:
    if dim_a != dim_b:
        raise ValueError(
            f"{what}: feature dimensions differ ({dim_a} vs {dim_b}); both sets must come "
            "from the same feature extractor"
        )


class FeatureStats:
    """Streaming count, mean and centred scatter matrix of features, in float64.

    Batches are merged with the pairwise update of Chan et al. (1979), which stays
    accurate where a running sum of outer products would cancel catastrophically.
    `extractor` names the feature space so that statistics from different spaces are
    never compared.
    """

    def __init__(self, dim: int, *, extractor: str = "") -> None:
        self.dim, self.extractor = int(dim), extractor
        self.count = 0
        self.mean = np.zeros(dim, np.float64)  # [D]
        self.scatter = np.zeros((dim, dim), np.float64)  # [D, D] sum of centred outer products

    def update(self, features: np.ndarray) -> FeatureStats:
        features = _as_feature_matrix(features, name="features")
        _check_same_dim(features.shape[1], self.dim, what="FeatureStats.update")
        batch_count = features.shape[0]
        if batch_count == 0:
            return self
        batch_mean = features.mean(axis=0)
        centred = features - batch_mean
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (
            self.count * batch_count / total
        )
        self.mean += delta * (batch_count / total)
        self.count = total
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (divisor N - 1, as np.cov)."""
        if self.count < 2:
            raise ValueError(f"FeatureStats: count {self.count} < 2, covariance undefined")
        return self.mean.copy(), self.scatter / (self.count - 1)

    def save_npz(self, path: str | os.PathLike) -> None:
        """Writes mu and sigma (pytorch-fid's key names) plus what resumes the stream."""
        mu, sigma = self.mean_cov()
        storage.save_npz(
            path, mu=mu, sigma=sigma, count=self.count, scatter=self.scatter,
            extractor=np.asarray(self.extractor),
        )  # fmt: skip

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> FeatureStats:
        if not storage.as_path(path).is_file():
            raise FileNotFoundError(f"feature statistics file {str(path)!r} does not exist")
        with storage.load_npz(path) as archive:
            missing = {"mu", "count", "scatter", "extractor"} - set(archive.files)
            if missing:
                raise ValueError(f"{path}: not a FeatureStats file, missing {sorted(missing)}")
            stats = cls(archive["mu"].shape[0], extractor=str(archive["extractor"]))
            stats.count = int(archive["count"])
            stats.mean = archive["mu"].astype(np.float64)
            stats.scatter = archive["scatter"].astype(np.float64)
        return stats


def _clip_rounding_noise(eigvals: np.ndarray) -> np.ndarray:
    """Zeroes eigenvalues below what float64 can resolve (|lambda| <= D eps lambda_max).

    A rank-deficient PSD matrix has rounding-noise eigenvalues of order eps lambda_max;
    their square roots (order sqrt(eps)) would otherwise bias tr(sqrt(.)) upwards.
    """
    tolerance = eigvals.shape[0] * np.finfo(np.float64).eps * max(float(eigvals.max()), 0.0)
    return np.where(eigvals > tolerance, eigvals, 0.0)


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((C1 C2)^(1/2)) for symmetric PSD C1, C2, without a non-symmetric sqrtm.

    C1 C2 is similar to S C2 S with S = C1^(1/2) (symmetric PSD), so its eigenvalues are
    those of S C2 S, real and >= 0: the trace is the sum of their square roots. Negative
    and rounding-noise eigenvalues are set to 0, so singular covariances are fine.
    """
    eigvals1, eigvecs1 = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigvecs1 * np.sqrt(_clip_rounding_noise(eigvals1))) @ eigvecs1.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(_clip_rounding_noise(eigvals)).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, C1) and N(mu2, C2) (Eq. 6 of Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    _check_same_dim(mu1.shape[-1], mu2.shape[-1], what="frechet_distance")
    dim = mu1.shape[-1]
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name}: shape {cov.shape} not allowed; expected ({dim}, {dim})")
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    trace_term = float(np.trace(cov1) + np.trace(cov2)) - 2.0 * trace_sqrt_product(cov1, cov2)
    return mean_term + trace_term


def frechet_distance_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """Frechet distance between two feature sets' statistics, after sanity checks.

    Raises ValueError when the feature spaces differ, or when a set has no more samples
    than dimensions: its covariance then has rank < D and the distance is strongly biased.
    """
    _check_same_dim(stats1.dim, stats2.dim, what="frechet_distance_from_stats")
    if stats1.extractor and stats2.extractor and stats1.extractor != stats2.extractor:
        raise ValueError(
            f"feature statistics come from different extractors: {stats1.extractor!r} vs "
            f"{stats2.extractor!r}"
        )
    for index, stats in enumerate((stats1, stats2), start=1):
        if stats.count <= stats.dim:
            raise ValueError(
                f"stats{index}: {stats.count} samples for {stats.dim}-d features: the "
                f"covariance has rank <= {stats.count - 1} < {stats.dim}, so the Frechet "
                f"distance is strongly biased. Use at least {stats.dim + 1} samples (FID is "
                "customarily reported on 10,000 or 50,000; it is biased upwards for small N)."
            )
    return frechet_distance(*stats1.mean_cov(), *stats2.mean_cov())


class MeanStd(NamedTuple):
    mean: float
    std: float


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic kernel (diagonals of k(x, x), k(y, y) excluded)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    rng: np.random.Generator,
) -> MeanStd:
    """KID: mean and std of unbiased MMD^2 over subsets drawn without replacement."""
    features1 = _as_feature_matrix(features1, name="features1")
    features2 = _as_feature_matrix(features2, name="features2")
    _check_same_dim(features1.shape[1], features2.shape[1], what="kernel_inception_distance")
    smallest = min(features1.shape[0], features2.shape[0])
    if not 2 <= subset_size <= smallest:
        raise ValueError(
            f"subset_size {subset_size} not allowed: must be in [2, {smallest}] (the smaller "
            "set's size)"
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets {num_subsets} not allowed; must be >= 1")
    values = [
        mmd2_unbiased(
            features1[rng.choice(features1.shape[0], subset_size, replace=False)],
            features2[rng.choice(features2.shape[0], subset_size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return MeanStd(float(np.mean(values)), float(np.std(values)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, *, num_splits: int = 10) -> MeanStd:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the split's mean prediction.

    Splits are consecutive blocks, as in Salimans et al.'s code; returns mean and std
    over splits.
    """
    logits = _as_feature_matrix(logits, name="logits")
    count = logits.shape[0]
    if not 1 <= num_splits <= count:
        raise ValueError(f"num_splits {num_splits} not allowed; must be in [1, {count}]")
    log_probs = _log_softmax(logits)  # [N, C]
    scores = []
    for split in range(num_splits):
        part = log_probs[split * count // num_splits : (split + 1) * count // num_splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))  # [C]
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)  # [n]
        scores.append(np.exp(kl.mean()))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def _knn_radii_squared(features: np.ndarray, *, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour other than itself."""
    radii = []
    for start in range(0, features.shape[0], batch_size):
        dist = _squared_distances(features[start : start + batch_size], features)
        radii.append(np.partition(dist, k, axis=1)[:, k])  # index 0 is the point itself
    return np.concatenate(radii)


def _fraction_in_manifold(
    queries: np.ndarray, support: np.ndarray, radii_sq: np.ndarray, *, batch_size: int
) -> float:
    inside = [
        (_squared_distances(queries[start : start + batch_size], support) <= radii_sq).any(1)
        for start in range(0, queries.shape[0], batch_size)
    ]
    return float(np.concatenate(inside).mean())


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch_size: int = 1024
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3).

    The manifold of a set is the union of balls around its points, each with radius the
    distance to its k-th nearest neighbour in the set. Precision: fraction of fake samples
    inside the real manifold; recall: fraction of real samples inside the fake manifold.
    """
    real = _as_feature_matrix(real, name="real")
    fake = _as_feature_matrix(fake, name="fake")
    _check_same_dim(real.shape[1], fake.shape[1], what="precision_recall")
    smallest = min(real.shape[0], fake.shape[0])
    if not 1 <= k < smallest:
        raise ValueError(f"k {k} not allowed; must be in [1, {smallest - 1}]")
    real_radii = _knn_radii_squared(real, k=k, batch_size=batch_size)
    fake_radii = _knn_radii_squared(fake, k=k, batch_size=batch_size)
    precision = _fraction_in_manifold(fake, real, real_radii, batch_size=batch_size)
    recall = _fraction_in_manifold(real, fake, fake_radii, batch_size=batch_size)
    return PrecisionRecall(precision, recall)
