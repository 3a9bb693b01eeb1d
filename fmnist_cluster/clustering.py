"""The study's clusterers (scikit-learn, or fmc's fast Gaussian mixture), fitted on latent codes or raw pixels."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from fmnist_cluster.config import TrialConfig


def make_clusterer(name: str, config: TrialConfig, components: int | None = None):
    """An unfitted scikit-learn estimator with the trial's settings (the study's by default);
    ``components``: the mixture's size when ``gmm.components`` lists several."""
    if name == "kmeans":
        return KMeans(n_clusters=config.n_clusters, init="k-means++", n_init=config.kmeans.n_init,
                      max_iter=config.kmeans.max_iter, random_state=config.seed)
    if name == "gmm":
        size = components or config.gmm.components or config.n_clusters
        settings = dict(n_components=size, covariance_type=config.gmm.covariance_type,
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
    if name == "gmm" and isinstance(config.gmm.components, tuple):  # BIC chooses the mixture's size
        fits = [_fitted(make_clusterer(name, config, components=k), codes) for k in config.gmm.components]
        estimator = min(fits, key=lambda est: (est.bic(codes), est.n_components))
        labels = estimator.predict(codes)
    else:
        estimator = make_clusterer(name, config)
        labels = estimator.fit_predict(codes)
        if hasattr(estimator, "to_sklearn"):
            estimator = estimator.to_sklearn()
    if name == "gmm" and estimator.n_components > config.n_clusters:
        # the fitted mixture keeps its components; which cluster each joins rides along (skops writes it)
        proba = estimator.predict_proba(codes)
        estimator.fmc_merged_into_ = entropy_merge(proba, config.n_clusters)
        labels = summed(proba, estimator.fmc_merged_into_).argmax(axis=1)
    return estimator, labels.astype(np.int64)


def _fitted(estimator, codes: np.ndarray):
    estimator.fit(codes)
    return estimator.to_sklearn() if hasattr(estimator, "to_sklearn") else estimator


def entropy_merge(proba: np.ndarray, n_clusters: int) -> np.ndarray:
    """Merge mixture components into ``n_clusters`` clusters, two at a time, by the entropy criterion of
    Baudry, Raftery, Celeux, Lo and Gottardo (2010, "Combining mixture components for clustering"):
    each step joins the two clusters whose union lowers the entropy of the posterior assignments
    ``proba`` (n, K) the most, i.e. the two the mixture tells apart the least. Labels are not used.

    Returns (K,): the cluster (0..n_clusters-1) of each component, numbered by its first component.
    """
    groups = [[k] for k in range(proba.shape[1])]
    cols = [np.asarray(proba[:, k], dtype=np.float64) for k in range(proba.shape[1])]

    def plogp(t):
        return np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)

    while len(groups) > n_clusters:
        own = [plogp(c).sum() for c in cols]
        best, pair = -np.inf, None
        for a in range(len(cols)):
            for b in range(a + 1, len(cols)):
                gain = plogp(cols[a] + cols[b]).sum() - own[a] - own[b]  # entropy before minus after
                if gain > best:
                    best, pair = gain, (a, b)
        a, b = pair
        groups[a] += groups.pop(b)
        cols[a] = cols[a] + cols.pop(b)
    into = np.empty(proba.shape[1], dtype=np.int64)
    for cluster, members in enumerate(sorted(groups, key=min)):
        into[members] = cluster
    return into


def summed(proba: np.ndarray, into: np.ndarray) -> np.ndarray:
    """(n, n_clusters) posterior of each merged cluster: the sum over its components (``into``: the
    cluster of each component). The served model (tracking/pyfunc_model.py) does the same."""
    out = np.zeros((len(proba), int(into.max()) + 1))
    np.add.at(out.T, into, proba.T)
    return out
