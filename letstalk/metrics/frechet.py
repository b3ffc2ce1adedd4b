"""Fréchet distance between two sets of feature vectors (FID, FVD, E-FID all reduce to it).

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)

as in Heusel et al. (2017) and the reference implementations (TTUR, pytorch-fid): Gaussian
statistics per set, the matrix square root through `scipy.linalg.sqrtm`, computed in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_from_features"]


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: features must have shape (samples, dims), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the feature set is empty")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: features have 0 dimensions")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: {x.shape[0]} sample is too few for a covariance (need at least 2)")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return x


def gaussian_stats(features, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(samples, dims) -> mean (dims,) and covariance (dims, dims) with the unbiased (n - 1) estimator."""
    x = _features(features, name)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    A singular product (fewer samples than dimensions) gets `eps` added to both diagonals before
    the square root, as pytorch-fid does; a small imaginary part from round-off is dropped,
    a large one raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    for name, v in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if caught or not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"covariance square root has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}): the statistics are degenerate")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    if not np.isfinite(value):
        raise ValueError("the Fréchet distance is not finite: degenerate statistics")
    return max(value, 0.0)  # round-off can take identical sets a hair below zero


def frechet_distance_from_features(real, fake) -> float:
    """Fréchet distance between two feature sets of shape (samples, dims) (same dims, >= 2 samples each)."""
    mu1, s1 = gaussian_stats(real, "real features")
    mu2, s2 = gaussian_stats(fake, "generated features")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: real {mu1.shape[0]} vs generated {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)
