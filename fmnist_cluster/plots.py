"""Figures of one trial (matplotlib, headless). Each function returns a Figure; callers save or log it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: trials run on servers and in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from fmnist_cluster.data import CLASS_NAMES  # noqa: E402


def pca_scatter(codes: np.ndarray, labels_true: np.ndarray, labels_pred: dict[str, np.ndarray], *,
                title: str = "", max_points: int = 5000, seed: int = 0) -> Figure:
    """2-component PCA of ``codes`` (n, d), coloured by true labels and by each clusterer's clusters."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(codes))[:max_points]
    xy = PCA(n_components=2, random_state=seed).fit_transform(codes[idx])
    panels = [("true labels", labels_true)] + list(labels_pred.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels[idx], cmap="tab10", s=3, vmin=0, vmax=9)
        ax.set(title=name, xlabel="PC 1", ylabel="PC 2")
    handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(k))) for k in range(10)]
    fig.legend(handles, CLASS_NAMES, loc="lower center", ncol=10, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def reconstructions(images: np.ndarray, recon: np.ndarray, *, n: int = 10, title: str = "") -> Figure:
    """Top row: test images (n, 28, 28, 1); bottom row: their reconstructions."""
    n = min(n, len(images))
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
    for j in range(n):
        for row, arr in enumerate((images, recon)):
            axes[row, j].imshow(arr[j].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            axes[row, j].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curves(history: dict[str, list[float]], *, title: str = "") -> Figure:
    """Train and validation MSE per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("loss", "val_loss"):
        values = history.get(key) or []
        ax.plot(range(1, len(values) + 1), values, marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="MSE", title=title or "reconstruction loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig


def scores_vs_epoch(evals: dict[int, dict[str, float]], *, title: str = "") -> Figure:
    """Clustering scores of the codes against training epochs: {epoch: {"kmeans_acc": .., ...}}."""
    epochs = sorted(evals)
    names = sorted({k for scores in evals.values() for k in scores
                    if k.endswith(("_acc", "_acc_majority", "_nmi"))})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(e, evals[e][name]) for e in epochs if name in evals[e]]
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="score", title=title or "clustering during training")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def confusion_heatmap(matrix: np.ndarray, *, title: str = "", xlabel: str = "assigned label") -> Figure:
    """Heatmap of a (10, 10) confusion matrix with counts written in the cells."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > matrix.max() / 2 else "black")
    ticks = np.arange(len(matrix))
    ax.set_xticks(ticks, [CLASS_NAMES[k] for k in ticks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(ticks, [CLASS_NAMES[k] for k in ticks], fontsize=7)
    ax.set(xlabel=xlabel, ylabel="true label", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def close(figures: dict[str, Figure]) -> None:
    """Free the figures' memory (pyplot keeps every open figure alive)."""
    for fig in figures.values():
        plt.close(fig)
