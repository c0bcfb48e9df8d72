"""2-D toy distributions, for watching a diffusion model learn a density in the plane.

Each split is a fixed, finite set of `data.toy_num_points` points drawn once from a
fixed seed (train: 0, test: 1), so a toy data set behaves like any other: epochs,
shuffling, sharding and exact resumption all work unchanged.

- "swiss_roll": t ~ U(1.5 pi, 4.5 pi), x = (t cos t, t sin t) / 5, plus N(0, 0.1^2 I).
  The noise-free curve has radius t / 5 in [0.94, 2.83].
- "eight_gaussians": equal mixture of N(mu_k, 0.1^2 I), mu_k = 2 (cos k pi/4, sin k pi/4).
- "checkerboard": uniform on the 8 unit squares of [-2, 2]^2 with floor(x) + floor(y) even.
"""

from collections.abc import Callable

import ml_collections
import numpy as np

from diffusion_jax.data.sources import DataSource, check_split

SWISS_ROLL_NOISE = 0.1
EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.1
_SPLIT_SEEDS = {"train": 0, "test": 1}


def swiss_roll(rng: np.random.Generator, num_points: int) -> np.ndarray:
    """[N, 2] points on the 2-D swiss roll with isotropic Gaussian noise."""
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(num_points))
    curve = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.0
    return curve + SWISS_ROLL_NOISE * rng.standard_normal((num_points, 2))


def eight_gaussians(rng: np.random.Generator, num_points: int) -> np.ndarray:
    """[N, 2] points from 8 equally weighted Gaussians evenly spaced on a circle of radius 2."""
    angles = rng.integers(0, 8, num_points) * (np.pi / 4.0)
    centers = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return centers + EIGHT_GAUSSIANS_STD * rng.standard_normal((num_points, 2))


def checkerboard(rng: np.random.Generator, num_points: int) -> np.ndarray:
    """[N, 2] points uniform on the dark squares (floor(x) + floor(y) even) of [-2, 2]^2."""
    column = rng.integers(-2, 2, num_points)  # floor(x)
    row = 2 * rng.integers(-1, 1, num_points) + (column % 2)  # floor(y), same parity
    corners = np.stack([column, row], axis=-1)
    return corners + rng.random((num_points, 2))


TOY_DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "swiss_roll": swiss_roll,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


def _point_example(point: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": point}


def build_toy2d(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
    """The fixed point set of `data.toy_distribution` for `split` ("train" or "test")."""
    name = data_config.toy_distribution
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(
            f"data.toy_distribution={name!r} is not known; allowed: {sorted(TOY_DISTRIBUTIONS)}"
        )
    if data_config.toy_num_points < 1:
        raise ValueError(f"data.toy_num_points must be positive, got {data_config.toy_num_points}")
    check_split(split, allowed=tuple(_SPLIT_SEEDS), dataset="toy2d")
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    points = TOY_DISTRIBUTIONS[name](rng, data_config.toy_num_points).astype(np.float32)
    return DataSource(records=points, decode=_point_example, example_shape=(2,), num_classes=None)
