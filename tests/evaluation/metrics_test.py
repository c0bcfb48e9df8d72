"""Tests of the metrics against scipy, closed forms and the estimators' defining properties."""

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import metrics


def _random_covariance(rng, dim, *, rank=None):
    factor = rng.normal(size=(dim, rank or 2 * dim))
    return factor @ factor.T / factor.shape[1]


def _scipy_frechet(mu1, cov1, mu2, cov2):
    """The textbook formula with scipy's general (non-symmetric) matrix square root."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2.0 * covmean)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 64):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        cov1, cov2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
        ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
        reference = _scipy_frechet(mu1, cov1, mu2, cov2)
        assert abs(ours - reference) / abs(reference) < 1e-6


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.1, 0.5])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    for rank in (3, 40):  # rank 3 of 32 dims: singular, where a plain sqrtm struggles
        cov = _random_covariance(rng, 32, rank=rank)
        mu = rng.normal(size=32)
        assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-9 * np.trace(cov)


def test_feature_stats_streaming_equals_numpy_and_is_stable():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(1000, 8)) * 0.01 + 1e6  # large offset: naive sums would cancel
    stats = metrics.FeatureStats(8)
    for chunk in np.array_split(features, [1, 7, 300, 301, 999]):
        stats.update(chunk)
    mean, cov = stats.mean_cov()
    assert stats.count == 1000
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-14)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False), rtol=1e-6, atol=1e-12)


def test_feature_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    stats = metrics.FeatureStats(4, extractor="some_space").update(rng.normal(size=(50, 4)))
    stats.save_npz(tmp_path / "ref.npz")
    loaded = metrics.FeatureStats.load_npz(tmp_path / "ref.npz")
    assert (loaded.count, loaded.extractor) == (50, "some_space")
    for got, want in zip(loaded.mean_cov(), stats.mean_cov(), strict=True):
        np.testing.assert_array_equal(got, want)
    with np.load(tmp_path / "ref.npz") as archive:  # pytorch-fid's key names
        np.testing.assert_array_equal(archive["sigma"], stats.mean_cov()[1])
    loaded.update(rng.normal(size=(10, 4)))  # the stream resumes
    assert loaded.count == 60


def test_frechet_from_stats_bad_input():
    rng = np.random.default_rng(4)
    small = metrics.FeatureStats(16).update(rng.normal(size=(10, 16)))
    large = metrics.FeatureStats(16).update(rng.normal(size=(100, 16)))
    with pytest.raises(ValueError, match="biased.*at least 17 samples"):
        metrics.frechet_distance_from_stats(small, large)
    other_dim = metrics.FeatureStats(8).update(rng.normal(size=(100, 8)))
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance_from_stats(large, other_dim)
    a = metrics.FeatureStats(16, extractor="inception_v3_fid").update(rng.normal(size=(30, 16)))
    b = metrics.FeatureStats(16, extractor="digits_classifier").update(rng.normal(size=(30, 16)))
    with pytest.raises(ValueError, match="different extractors"):
        metrics.frechet_distance_from_stats(a, b)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        metrics.FeatureStats.load_npz("nowhere.npz")


def test_mmd2_unbiased_matches_explicit_sums():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.3

    def kernel(a, b):
        return (a @ b / 3 + 1.0) ** 3

    xx = sum(kernel(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(kernel(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(kernel(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_for_one_distribution():
    """Mean over many independent pairs of same-distribution sets is ~0; the V-statistic is not."""
    rng = np.random.default_rng(6)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
        unbiased.append(
            metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=20, rng=rng).mean
        )
        k = metrics._polynomial_kernel  # diagonal included: biased upwards
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    standard_error = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * standard_error
    assert np.mean(biased) > 10 * standard_error
    shifted = metrics.kernel_inception_distance(
        rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 1.0, subset_size=100, rng=rng
    )
    assert shifted.mean > 10 * shifted.std / np.sqrt(100)


def test_kid_bad_input():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 4))
    with pytest.raises(ValueError, match="subset_size 1000"):
        metrics.kernel_inception_distance(x, x, rng=rng)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.kernel_inception_distance(x, x[:, :3], subset_size=10, rng=rng)


def test_inception_score_closed_forms():
    assert metrics.inception_score(np.zeros((100, 1008))).mean == pytest.approx(1.0, abs=1e-12)
    # Confident, evenly spread predictions over C classes in every split: IS = C.
    confident = np.full((100, 5), -1e3)
    confident[np.arange(100), np.arange(100) % 5] = 0.0
    score = metrics.inception_score(confident, num_splits=10)
    assert score.mean == pytest.approx(5.0, rel=1e-9) and score.std < 1e-9
    with pytest.raises(ValueError, match="num_splits 10"):
        metrics.inception_score(np.zeros((5, 3)))


def test_precision_recall_properties():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(400, 2))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Mode dropping: fake covers one of two real modes -> precision ~1, recall ~1/2.
    modes = np.where(np.arange(400)[:, None] < 200, -10.0, 10.0)
    two_modes = rng.normal(size=(400, 2)) + modes
    one_mode = rng.normal(size=(400, 2)) + 10.0
    precision, recall = metrics.precision_recall(two_modes, one_mode, batch_size=64)
    assert precision > 0.95 and 0.4 < recall < 0.55


def test_precision_recall_by_hand():
    # Real 0, 1, 2, 10 on a line, k=1: radii 1, 1, 1, 8. Fake 2.5 (in), 5 (out), 20 (out).
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[2.5], [5.0], [20.0]])
    # Fake radii (k=1): 2.5, 2.5, 15 -> real points within: 0? |0-2.5|=2.5 yes; 1, 2 yes;
    # 10: |10-20|=10 <= 15 yes. Recall 1; precision: 2.5 in, 5 (dist 3 to 2, radius 1;
    # dist 5 to 10, radius 8 -> in), 20 out -> 2/3.
    got = metrics.precision_recall(real, fake, k=1)
    assert got.precision == pytest.approx(2 / 3) and got.recall == 1.0
    with pytest.raises(ValueError, match="k 3 not allowed"):
        metrics.precision_recall(real[:3], fake)
