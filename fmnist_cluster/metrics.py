"""Clustering scores: pure functions of (labels_true, labels_pred) that return a Python float.

``acc`` is the literature's Hungarian accuracy (best one-to-one cluster -> label mapping);
``acc_majority`` is the reference study's accuracy (each cluster takes its most frequent label,
several clusters may share one), also known as purity. Always ``acc <= acc_majority``.
:func:`label_free` gives the criteria that need no labels (a silhouette on a fixed sample, the
mixture's BIC and mean log-likelihood, KMeans' inertia): what a search may select by without
looking at the labels. No Keras, no MLflow here.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix


def _contingency(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, clusters, counts) with counts of shape (n_classes, n_clusters)."""
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
        raise ValueError(f"labels must be 1-d and of equal length, got {labels_true.shape} and {labels_pred.shape}")
    if labels_true.size == 0:
        raise ValueError("labels are empty")
    classes = np.unique(labels_true)
    clusters = np.unique(labels_pred)
    return classes, clusters, contingency_matrix(labels_true, labels_pred)


def hungarian_mapping(labels_true, labels_pred) -> dict:
    """The one-to-one cluster -> label mapping that maximises matches (clusters left over map to -1)."""
    classes, clusters, counts = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = {c: -1 for c in clusters.tolist()}
    mapping.update({clusters[c].item(): classes[r].item() for r, c in zip(rows, cols)})
    return mapping


def majority_mapping(labels_true, labels_pred) -> dict:
    """Each cluster -> its most frequent true label (ties: the smallest label)."""
    classes, clusters, counts = _contingency(labels_true, labels_pred)
    return {k.item(): classes[np.argmax(counts[:, j])].item() for j, k in enumerate(clusters)}


def acc(labels_true, labels_pred) -> float:
    """Hungarian (one-to-one) clustering accuracy in [0, 1]."""
    _, _, counts = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def acc_majority(labels_true, labels_pred) -> float:
    """Majority-vote clustering accuracy (purity) in [0, 1], the reference study's "accuracy"."""
    _, _, counts = _contingency(labels_true, labels_pred)
    return float(counts.max(axis=0).sum() / counts.sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, arithmetic averaging (scikit-learn's default)."""
    _contingency(labels_true, labels_pred)
    return float(normalized_mutual_info_score(labels_true, labels_pred, average_method="arithmetic"))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index in [-0.5, 1]."""
    _contingency(labels_true, labels_pred)
    return float(adjusted_rand_score(labels_true, labels_pred))


SCORES = {"acc": acc, "acc_majority": acc_majority, "nmi": nmi, "ari": ari}
CLUSTERERS = ("kmeans", "gmm")


def score_names(clusterers=CLUSTERERS, scores=tuple(SCORES)) -> list[str]:
    """The metric names fmc logs for clusterers' scores: ``kmeans_acc``, ``kmeans_acc_majority``, ..."""
    return [f"{c}_{s}" for c in clusterers for s in scores]


def score_all(labels_true, labels_pred) -> dict[str, float]:
    """Every score above, by name."""
    return {name: fn(labels_true, labels_pred) for name, fn in SCORES.items()}


# criteria that need no labels, per clusterer, and whether larger is better
LABEL_FREE = {"kmeans": {"silhouette": "max", "inertia": "min"},
              "gmm": {"silhouette": "max", "bic": "min", "loglik": "max"}}
SILHOUETTE_SAMPLE = 2000  # images the silhouette is computed on (a fixed sample per seed)


def label_free_names() -> list[str]:
    """``kmeans_silhouette``, ``kmeans_inertia``, ``gmm_silhouette``, ``gmm_bic``, ``gmm_loglik``."""
    return [f"{c}_{k}" for c, criteria in LABEL_FREE.items() for k in criteria]


def label_free(name: str, estimator, features, labels_pred, *, seed: int = 0) -> dict[str, float]:
    """The label-free criteria of clusterer ``name`` (fitted ``estimator``) on what it clustered:
    ``silhouette`` (euclidean, on a sample of :data:`SILHOUETTE_SAMPLE` images drawn with ``seed``;
    left out when the sample holds one cluster only), ``inertia`` (KMeans), ``bic`` and ``loglik`` (the
    mixture's BIC and mean log-likelihood per image)."""
    from sklearn.metrics import silhouette_score

    features = np.asarray(features, dtype=np.float64)
    labels_pred = np.asarray(labels_pred)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(features), size=min(SILHOUETTE_SAMPLE, len(features)), replace=False)
    out = {}
    if 1 < len(np.unique(labels_pred[sample])) < len(sample):
        out["silhouette"] = float(silhouette_score(features[sample], labels_pred[sample]))
    if name == "kmeans":
        out["inertia"] = float(estimator.inertia_)
    elif name == "gmm":
        out["bic"] = float(estimator.bic(features))
        out["loglik"] = float(estimator.score(features))
    return out


def mapped_confusion(labels_true, labels_pred, *, mapping: str = "hungarian",
                     n_classes: int = 10) -> np.ndarray:
    """Confusion matrix (true label x assigned label) after mapping clusters to labels.

    ``mapping='hungarian'`` or ``'majority'``. Shape (n_classes, n_classes); under the majority
    mapping, labels that no cluster maps to have empty columns, as in the study. Clusters that the
    Hungarian mapping leaves over (more clusters than labels) are not counted.
    """
    maps = {"hungarian": hungarian_mapping, "majority": majority_mapping}
    if mapping not in maps:
        raise ValueError(f"mapping must be one of {sorted(maps)}, got {mapping!r}")
    lookup = maps[mapping](labels_true, labels_pred)
    assigned = np.array([lookup[k] for k in np.asarray(labels_pred).tolist()])
    return confusion_matrix(labels_true, assigned, labels=np.arange(n_classes))
