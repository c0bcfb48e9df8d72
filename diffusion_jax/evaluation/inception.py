"""The InceptionV3 of the standard FID, in Flax, and its input preprocessing.

This is the network of Heusel et al. 2017 (FID) as ported to PyTorch by `pytorch-fid`
(`pytorch_fid.inception.fid_inception_v3`): torchvision's InceptionV3 layout with the
TensorFlow 2015-12-05 graph's quirks, which differ from torchvision's own network:

- average pools inside Mixed_5b..5d, 6b..6e and 7b exclude the zero padding from the
  mean (`count_include_pad=False`, TensorFlow's "SAME" average pool);
- Mixed_7c pools its fourth branch with a 3x3 *max* pool instead of an average pool;
- the classifier has 1008 classes.

Convolutions use PyTorch's explicit symmetric padding (not TensorFlow "SAME", which pads
asymmetrically for stride 2), because the weights and the reference are pytorch-fid's.
Outputs are the pool3 features (2048-d, FID) and the logits (1008-d, Inception Score).

Preprocessing (`preprocess_images`) follows pytorch-fid applied to saved PNG files: float
images in [-1, 1] are first quantized to uint8 as an image file would store them, then
scaled to [0, 1], resized to 299x299 by bilinear interpolation without antialiasing
(`F.interpolate(..., mode="bilinear", align_corners=False)`), and mapped to [-1, 1].
See docs/evaluation.md.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# pytorch-fid's weights file names the first 8 hex digits of its SHA-256 (torch.hub style).
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
# Full float32 products: JAX's default runs float32 convolutions as one bfloat16 pass on TPUs
# (TF32 on recent GPUs), which moves pool3 features by ~0.4%, more than FID's reporting allows.
FEATURE_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, running statistics) and ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            precision=FEATURE_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooled branches (35x35 grid)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = _avg_pool_3x3_exclude_pad(x)
        branch_pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(branch_pool)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = _max_pool_3x3_stride2(x)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (17x17 grid)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = (
            dict(kernel_size=(1, 7), padding=(0, 3)),
            dict(kernel_size=(7, 1), padding=(3, 0)),
        )
        branch1x1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv(c7, **row, name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv(192, **col, name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv(c7, **col, name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv(c7, **row, name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv(c7, **col, name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv(192, **row, name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = _avg_pool_3x3_exclude_pad(x)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(branch_pool)
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
        branch_pool = _max_pool_3x3_stride2(x)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c: expanded filter banks (8x8 grid); `pool` is "avg" (7b) or "max" (7c)."""

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = (
            dict(kernel_size=(1, 3), padding=(0, 1)),
            dict(kernel_size=(3, 1), padding=(1, 0)),
        )
        branch1x1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3_2a")(branch3x3),
                BasicConv(384, **col, name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        branch3x3dbl = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
                BasicConv(384, **col, name="branch3x3dbl_3b")(branch3x3dbl),
            ],
            axis=-1,
        )
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionOutput(NamedTuple):
    pool3: jax.Array  # [B, 2048] features of the final average pool (FID)
    logits: jax.Array  # [B, 1008] classifier logits (Inception Score)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 on preprocessed images [B, 299, 299, 3] in [-1, 1].

    `logits_use_bias=False` (default) gives pool3 @ W without the fc bias, as the original
    Inception Score code does (Salimans et al. 2016, `inception_score.py` takes the
    `softmax/logits/MatMul` input; torch-fidelity calls this "logits_unbiased").
    """

    logits_use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> InceptionOutput:
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)  # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160)):
            x = InceptionC(channels_7x7, name=name)(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
        fc = nn.Dense(NUM_LOGITS, precision=FEATURE_PRECISION, name="fc")
        logits = fc(pool3)  # [B, 1008]
        if not self.logits_use_bias:
            kernel = fc.variables["params"]["kernel"]
            logits = jnp.dot(pool3, kernel, precision=FEATURE_PRECISION)
        return InceptionOutput(pool3=pool3, logits=logits)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's bilinear interpolation with align_corners=False.

    Source coordinate (i + 0.5) * in / out - 0.5, clamped below at 0; the upper neighbour
    index is clamped to in - 1. No antialiasing, also when downsampling.
    """
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), upper), frac)
    return weights


def resize_bilinear(images: jax.Array, *, size: int) -> jax.Array:
    """Resizes [B, H, W, C] to [B, size, size, C] as `F.interpolate(bilinear, False)` does."""
    rows = jnp.asarray(bilinear_resize_matrix(images.shape[1], size), images.dtype)
    cols = jnp.asarray(bilinear_resize_matrix(images.shape[2], size), images.dtype)
    images = jnp.einsum("oh,bhwc->bowc", rows, images, precision="highest")
    return jnp.einsum("pw,bowc->bopc", cols, images, precision="highest")


def quantize_to_uint8(images: jax.Array) -> jax.Array:
    """Float images in [-1, 1] to uint8 as an image file stores them; uint8 passes through.

    floor((x + 1) / 2 * 255 + 0.5) clipped to [0, 255]: the rounding of torchvision's
    `save_image`, so metrics see what a saved PNG would hold.
    """
    if images.dtype == jnp.uint8:
        return images
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images: dtype {images.dtype} not allowed; use uint8 or float in [-1, 1]")
    levels = jnp.floor((images.astype(jnp.float32) + 1.0) * 127.5 + 0.5)
    return jnp.clip(levels, 0, 255).astype(jnp.uint8)


def check_images(images: jax.Array, *, channels: tuple[int, ...]) -> None:
    """Raises ValueError unless images are [B, H, W, C] with C in `channels`."""
    if images.ndim != 4 or images.shape[-1] not in channels:
        raise ValueError(
            f"images: shape {tuple(images.shape)} not allowed; expected NHWC [B, H, W, C] "
            f"with C in {channels}"
        )


def preprocess_images(images: jax.Array) -> jax.Array:
    """uint8 or [-1, 1] float NHWC (1 or 3 channels) -> [B, 299, 299, 3] float32 in [-1, 1]."""
    check_images(images, channels=(1, 3))
    unit = quantize_to_uint8(images).astype(jnp.float32) / 255.0  # [B, H, W, C] in [0, 1]
    unit = resize_bilinear(unit, size=INCEPTION_SIZE)
    if unit.shape[-1] == 1:  # grayscale data sets are fed as three equal channels
        unit = jnp.repeat(unit, 3, axis=-1)
    return 2.0 * unit - 1.0
