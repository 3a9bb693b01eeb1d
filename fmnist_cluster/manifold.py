"""The optional manifold stage between the encoder and the clusterers: UMAP (umap-learn) or PCA
(scikit-learn), fitted on the codes being clustered. The clusterers then run on its embedding."""

from __future__ import annotations

import os

import numpy as np

from fmnist_cluster.config import TrialConfig


def make_manifold(config: TrialConfig):
    """An unfitted reducer with the trial's ``manifold`` settings, or None for ``kind: none``."""
    m = config.manifold
    if m.kind == "none":
        return None
    if m.kind == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=m.n_components, random_state=config.seed)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fmc-numba"))
    from fmnist_cluster.quiet import quiet_import

    umap = quiet_import("umap")  # umap imports TensorFlow (for its parametric variant)

    # random_state makes UMAP reproducible (same seed, same embedding); it also makes it single-threaded
    return umap.UMAP(n_components=m.n_components, n_neighbors=m.n_neighbors, min_dist=m.min_dist,
                     metric=m.metric, random_state=config.seed, n_jobs=1)


def fit_manifold(config: TrialConfig, codes: np.ndarray, *, threads: int | None = None):
    """``(reducer or None, features (n, n_components))``: the embedding the clusterers will see, or the
    codes themselves for ``kind: none``."""
    reducer = make_manifold(config)
    if reducer is None:
        return None, codes
    if threads and config.manifold.kind == "umap":
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return reducer, np.asarray(reducer.fit_transform(np.asarray(codes, dtype=np.float32)), dtype=np.float64)
