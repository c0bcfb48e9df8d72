"""Pluggable feature extractors: the FID InceptionV3 and a digits classifier.

An extractor maps images (uint8, or float in [-1, 1], NHWC) to features [B, D] and, where
it has a classifier head, logits. Metrics only see features, so any extractor gives a
Frechet distance, KID and precision/recall *in its own feature space*; `frechet_name`
says what its Frechet distance is called ("fid" only for the standard Inception weights).

The digits classifier gives the offline digits data set a real quality metric: a small
CNN trained here on the digits training split (Frechet distance in its 64-d
penultimate space: "fd_digits", not FID).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from diffusion_jax.data import digits as digits_data
from diffusion_jax.evaluation import inception, inception_weights
from diffusion_jax.evaluation.metrics import FeatureStats
from diffusion_jax.runtime import storage


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # identifies the feature space, stored with cached statistics
    frechet_name: str  # what its Frechet distance is reported as
    feature_dim: int

    def __call__(self, images: jax.Array) -> np.ndarray:
        """[B, H, W, C] uint8 or [-1, 1] float -> features [B, feature_dim] float32."""
        ...

    def features_and_logits(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]: ...


def _apply_in_chunks(apply_fn, images: jax.Array, *, chunk_size: int):
    """Runs `apply_fn` on fixed-size chunks (last one padded) so it compiles once."""
    images = jnp.asarray(images)
    outputs = []
    for start in range(0, images.shape[0], chunk_size):
        chunk = images[start : start + chunk_size]
        valid = chunk.shape[0]
        if valid < chunk_size:
            pad = jnp.zeros((chunk_size - valid, *chunk.shape[1:]), chunk.dtype)
            chunk = jnp.concatenate([chunk, pad])
        outputs.append(jax.tree.map(lambda out, n=valid: np.asarray(out[:n]), apply_fn(chunk)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


@jax.jit
def _inception_apply(variables: Mapping, images: jax.Array) -> inception.InceptionOutput:
    return inception.FIDInceptionV3().apply(variables, inception.preprocess_images(images))


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionExtractor:
    """pool3 features (2048-d) and 1008 logits of the FID InceptionV3."""

    variables: Mapping
    name: str = "inception_v3_fid"
    frechet_name: str = "fid"
    feature_dim: int = inception.NUM_FEATURES
    chunk_size: int = 100

    def features_and_logits(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        inception.check_images(jnp.asarray(images), channels=(1, 3))
        apply_fn = functools.partial(_inception_apply, self.variables)
        output = _apply_in_chunks(apply_fn, images, chunk_size=self.chunk_size)
        return output.pool3, output.logits

    def __call__(self, images: jax.Array) -> np.ndarray:
        return self.features_and_logits(images)[0]


def load_inception_extractor(
    path: str | os.PathLike, *, require_standard_weights: bool = True, chunk_size: int = 100
) -> InceptionExtractor:
    """The Inception extractor from converted weights (see docs/evaluation.md).

    Weights not converted from pytorch-fid's file raise ValueError unless
    `require_standard_weights=False`; their feature space is then named
    "inception_v3_nonstandard" and their Frechet distance "fd_inception_nonstandard".
    """
    variables, info = inception_weights.load_inception_variables(path)
    if info.is_standard_fid_weights:
        return InceptionExtractor(variables, chunk_size=chunk_size)
    if require_standard_weights:
        raise ValueError(
            f"{info.path}: converted from a file with SHA-256 {info.source_sha256}, not "
            f"pytorch-fid's ({inception.FID_WEIGHTS_SHA256_PREFIX}...): its scores are not "
            "FID. Pass require_standard_weights=False to use it anyway."
        )
    return InceptionExtractor(
        variables,
        name="inception_v3_nonstandard",
        frechet_name="fd_inception_nonstandard",
        chunk_size=chunk_size,
    )


class DigitsClassifier(nn.Module):
    """MLP on 8x8 digits in [-1, 1]: features are the penultimate pre-activations."""

    feature_dim: int = 64
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.relu(nn.Dense(self.hidden_dim)(x.reshape(x.shape[0], -1)))  # [B, 256]
        features = nn.Dense(self.feature_dim)(x)  # [B, D]
        logits = nn.Dense(10)(nn.relu(features))  # [B, 10]
        return features, logits


def preprocess_digits(images: jax.Array) -> jax.Array:
    """uint8 or [-1, 1] float [B, 8k, 8k, 1] -> [B, 8, 8, 1] float32 in [-1, 1].

    Quantized to uint8 first (as a saved image), then average-pooled by k, which undoes
    the data module's nearest-neighbour upsampling exactly.
    """
    inception.check_images(images, channels=(1,))
    height, width = images.shape[1:3]
    if height != width or height % digits_data.NATIVE_SIZE:
        raise ValueError(
            f"images: spatial size {height}x{width} not allowed for the digits classifier; "
            "allowed: square, a multiple of 8"
        )
    unit = inception.quantize_to_uint8(images).astype(jnp.float32) / 127.5 - 1.0
    factor = height // digits_data.NATIVE_SIZE
    return nn.avg_pool(unit, (factor, factor), strides=(factor, factor))


@functools.partial(jax.jit, static_argnames="feature_dim")
def _digits_apply(params: Mapping, images: jax.Array, *, feature_dim: int):
    return DigitsClassifier(feature_dim).apply({"params": params}, preprocess_digits(images))


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsExtractor:
    """Penultimate features and logits of the project's digits classifier."""

    params: Mapping
    name: str = "digits_classifier"
    frechet_name: str = "fd_digits"
    chunk_size: int = 512

    @property
    def feature_dim(self) -> int:
        return int(self.params["Dense_1"]["kernel"].shape[1])

    def features_and_logits(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        images = jnp.asarray(images)
        inception.check_images(images, channels=(1,))
        apply_fn = functools.partial(_digits_apply, self.params, feature_dim=self.feature_dim)
        return _apply_in_chunks(apply_fn, images, chunk_size=self.chunk_size)

    def __call__(self, images: jax.Array) -> np.ndarray:
        return self.features_and_logits(images)[0]


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 8, 8, 1] float32 in [-1, 1] (g / 8 - 1) and labels [N] of a digits split.

    The split is the data module's (`diffusion_jax.data.digits.split_indices`).
    """
    indices = digits_data.split_indices(split)
    data = load_digits()
    images = (data.images[indices] / 8.0 - 1.0).astype(np.float32)[..., None]
    return images, data.target[indices].astype(np.int32)


class TrainedDigitsClassifier(NamedTuple):
    params: Mapping
    test_accuracy: float


def _classification_accuracy(params: Mapping, images: np.ndarray, labels: np.ndarray) -> float:
    _, logits = DigitsExtractor(params).features_and_logits(images)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def train_digits_classifier(
    *,
    seed: int = 0,
    num_steps: int = 600,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    feature_dim: int = 64,
) -> TrainedDigitsClassifier:
    """Trains the digits classifier with Adam on the training split (a few seconds on CPU)."""
    train_images, train_labels = map(jnp.asarray, digits_split("train"))
    model = DigitsClassifier(feature_dim)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, train_images[:1])["params"]
    optimizer = optax.adamw(learning_rate, weight_decay=1e-4)

    def loss_fn(params, images, labels):
        _, logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(carry, step):
        params, opt_state = carry
        batch = jax.random.choice(
            jax.random.fold_in(data_key, step), len(train_labels), (batch_size,), replace=False
        )
        grads = jax.grad(loss_fn)(params, train_images[batch], train_labels[batch])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def train(params):
        carry = (params, optimizer.init(params))
        return jax.lax.scan(train_step, carry, jnp.arange(num_steps))[0][0]

    params = train(params)
    test_accuracy = _classification_accuracy(params, *digits_split("test"))
    return TrainedDigitsClassifier(jax.device_get(params), test_accuracy)


def save_digits_classifier(path: str | os.PathLike, trained: TrainedDigitsClassifier) -> None:
    """Write atomically (a temporary file, then a rename; in an object store, one upload), so
    that the processes of a multi-host evaluation, which all train the same classifier, never
    leave a torn file."""
    flat = inception_weights.flatten_variables({"params": trained.params})
    storage.save_npz(path, **flat, test_accuracy=np.asarray(trained.test_accuracy))


def load_digits_classifier(path: str | os.PathLike) -> TrainedDigitsClassifier:
    if not storage.as_path(path).is_file():
        raise FileNotFoundError(f"digits classifier file {str(path)!r} does not exist")
    with storage.load_npz(path) as archive:
        flat = {name: archive[name] for name in archive.files if name.startswith("params/")}
        if "test_accuracy" not in archive.files or not flat:
            raise ValueError(f"{path}: not a digits classifier file (no params/test_accuracy)")
        test_accuracy = float(archive["test_accuracy"])
    return TrainedDigitsClassifier(
        inception_weights.unflatten_variables(flat)["params"], test_accuracy
    )


def digits_extractor(*, cache_path: str | os.PathLike | None = None, seed: int = 0):
    """The digits extractor, trained once and cached at `cache_path` (.npz) when given."""
    if cache_path is not None and storage.as_path(cache_path).is_file():
        trained = load_digits_classifier(cache_path)
    else:
        trained = train_digits_classifier(seed=seed)
        if cache_path is not None:
            save_digits_classifier(cache_path, trained)
    return DigitsExtractor(trained.params)


class CollectedFeatures(NamedTuple):
    stats: FeatureStats
    features: np.ndarray  # [N, D] float32, for KID and precision/recall
    logits: np.ndarray  # [N, num_classes] float32, for the Inception Score


def collect_features(
    extractor: FeatureExtractor, batches: Iterable, *, max_samples: int | None = None
) -> CollectedFeatures:
    """Features, logits and streaming statistics of image batches (arrays or {"x": ...})."""
    stats = FeatureStats(extractor.feature_dim, extractor=extractor.name)
    features, logits, count = [], [], 0
    for batch in batches:
        images = batch["x"] if isinstance(batch, Mapping) else batch
        if max_samples is not None:
            images = images[: max_samples - count]
        batch_features, batch_logits = extractor.features_and_logits(images)
        stats.update(batch_features)
        features.append(batch_features)
        logits.append(batch_logits)
        count += len(batch_features)
        if max_samples is not None and count >= max_samples:
            break
    if not features:
        raise ValueError("batches: no images were given")
    return CollectedFeatures(stats, np.concatenate(features), np.concatenate(logits))


def cached_reference_stats(
    extractor: FeatureExtractor, batches: Iterable, *, cache_path: str | os.PathLike
) -> FeatureStats:
    """Statistics of a data set split, computed once and cached as an .npz file."""
    if storage.as_path(cache_path).is_file():
        stats = FeatureStats.load_npz(cache_path)
        if stats.extractor != extractor.name or stats.dim != extractor.feature_dim:
            raise ValueError(
                f"{cache_path}: cached statistics are for extractor {stats.extractor!r} "
                f"({stats.dim}-d), not {extractor.name!r} ({extractor.feature_dim}-d); "
                "delete the file or pass another cache_path"
            )
        return stats
    stats = collect_features(extractor, batches).stats
    stats.save_npz(cache_path)
    return stats
