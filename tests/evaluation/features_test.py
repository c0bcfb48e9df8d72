"""Tests of the feature extractors: the digits classifier separates classes and its
Frechet distance ranks data far above noise; caching and the extractor interface."""

import numpy as np
import pytest

from diffusion_jax.evaluation import features, metrics


@pytest.fixture(scope="module")
def trained():
    return features.train_digits_classifier(seed=0)


def _stats(features_array):
    return metrics.FeatureStats(features_array.shape[1]).update(features_array)


def test_digits_classifier_separates_the_classes(trained):
    print(f"digits classifier test accuracy {trained.test_accuracy:.4f}")
    assert trained.test_accuracy > 0.95


def test_digits_frechet_train_vs_test_far_below_data_vs_noise(trained):
    extractor = features.DigitsExtractor(trained.params)
    train_images, _ = features.digits_split("train")
    test_images, _ = features.digits_split("test")
    noise = np.random.default_rng(0).uniform(-1, 1, size=test_images.shape).astype(np.float32)
    train_stats = _stats(extractor(train_images))
    train_vs_test = metrics.frechet_distance_from_stats(train_stats, _stats(extractor(test_images)))
    train_vs_noise = metrics.frechet_distance_from_stats(train_stats, _stats(extractor(noise)))
    print(f"fd_digits train vs test {train_vs_test:.3f}, train vs noise {train_vs_noise:.3f}")
    assert train_vs_test < 0.1 * train_vs_noise


def test_digits_extractor_interface_upsampled_input_and_single_compile(trained):
    extractor = features.DigitsExtractor(trained.params, chunk_size=64)
    assert isinstance(extractor, features.FeatureExtractor)
    assert (extractor.name, extractor.frechet_name, extractor.feature_dim) == (
        "digits_classifier",
        "fd_digits",
        64,
    )
    images, _ = features.digits_split("test")
    compiled_before = features._digits_apply._cache_size()
    feats, logits = extractor.features_and_logits(images[:100])  # two chunks, one padded
    assert feats.shape == (100, 64) and logits.shape == (100, 10)
    np.testing.assert_allclose(extractor(images[:5]), feats[:5], rtol=1e-6, atol=1e-6)
    assert features._digits_apply._cache_size() - compiled_before == 1
    upsampled = images[:5].repeat(2, axis=1).repeat(2, axis=2)  # the data module at 16x16
    np.testing.assert_allclose(extractor(upsampled), feats[:5], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="C in \\(1,\\)"):
        extractor(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="12x12 not allowed"):
        extractor(np.zeros((2, 12, 12, 1), np.float32))


def test_classifier_cache_and_reference_stats_cache(trained, tmp_path):
    features.save_digits_classifier(tmp_path / "clf.npz", trained)
    loaded = features.load_digits_classifier(tmp_path / "clf.npz")
    assert loaded.test_accuracy == trained.test_accuracy
    extractor = features.digits_extractor(cache_path=tmp_path / "clf.npz")
    images, _ = features.digits_split("test")
    np.testing.assert_array_equal(
        extractor(images), features.DigitsExtractor(trained.params)(images)
    )
    batches = [{"x": images[i : i + 100]} for i in range(0, len(images), 100)]
    cache = tmp_path / "digits_test_stats.npz"
    computed = features.cached_reference_stats(extractor, batches, cache_path=cache)
    reloaded = features.cached_reference_stats(extractor, [], cache_path=cache)
    assert computed.count == reloaded.count == 297
    np.testing.assert_array_equal(computed.mean_cov()[1], reloaded.mean_cov()[1])
    collected = features.collect_features(extractor, batches, max_samples=150)
    assert collected.features.shape == (150, 64) and collected.stats.count == 150
    other = features.DigitsExtractor(trained.params, name="another_space")
    with pytest.raises(ValueError, match="'digits_classifier'.*not 'another_space'"):
        features.cached_reference_stats(other, batches, cache_path=cache)
    other_suffix = tmp_path / "digits_test.stats"  # np.savez(path) would write .stats.npz
    features.cached_reference_stats(extractor, batches, cache_path=other_suffix)
    assert other_suffix.is_file() and not (tmp_path / "digits_test.stats.npz").exists()
    cached = features.cached_reference_stats(extractor, [], cache_path=other_suffix)
    assert cached.count == 297
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        features.load_digits_classifier(tmp_path / "nothing.npz")
