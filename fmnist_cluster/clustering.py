"""The study's clusterers (scikit-learn, or fmc's fast Gaussian mixture), fitted on latent codes or raw pixels."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from fmnist_cluster.config import TrialConfig


def make_clusterer(name: str, config: TrialConfig):
    """An unfitted scikit-learn estimator with the trial's settings (the study's by default)."""
    if name == "kmeans":
        return KMeans(n_clusters=config.n_clusters, init="k-means++", n_init=config.kmeans.n_init,
                      max_iter=config.kmeans.max_iter, random_state=config.seed)
    if name == "gmm":
        settings = dict(n_components=config.n_clusters, covariance_type=config.gmm.covariance_type,
                        n_init=config.gmm.n_init, max_iter=config.gmm.max_iter, random_state=config.seed)
        if config.gmm.impl == "fast":
            from fmnist_cluster.fast_gmm import FastGaussianMixture

            return FastGaussianMixture(**settings)
        return GaussianMixture(**settings)
    raise ValueError(f"unknown clusterer {name!r}; expected kmeans or gmm")


def fit_predict(name: str, config: TrialConfig, codes: np.ndarray):
    """Fit clusterer ``name`` on ``codes`` (n, d) and return ``(estimator, labels (n,))``.

    The estimator is always a scikit-learn one (the fast mixture hands back its fitted equivalent).
    """
    codes = np.asarray(codes, dtype=np.float64)  # scikit-learn's GMM is float64 inside anyway
    if not np.isfinite(codes).all():
        raise FloatingPointError(f"{name}: the latent codes contain NaN or inf; the autoencoder diverged")
    estimator = make_clusterer(name, config)
    labels = estimator.fit_predict(codes)
    if hasattr(estimator, "to_sklearn"):
        estimator = estimator.to_sklearn()
    return estimator, labels.astype(np.int64)
