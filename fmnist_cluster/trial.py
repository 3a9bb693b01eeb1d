"""One trial, end to end: data -> autoencoder -> latent codes -> KMeans / GMM -> scores and figures.

``run_trial(config) -> TrialResult`` is the whole science of fmc. Ray Tune, MLflow and the CLI are thin
wrappers around it; nothing here imports them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmnist_cluster import metrics
from fmnist_cluster.clustering import fit_predict
from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import Dataset, load_dataset

EpochHook = Callable[[int, dict[str, float]], None]  # (epoch starting at 1, {"loss": .., "val_loss": ..})


@dataclass
class TrialResult:
    """What one trial produced.

    metrics : ``{clusterer}_{score}`` for score in acc, acc_majority, nmi, ari; and ``recon_mse``.
    timings : seconds: data, train, encode, kmeans, gmm, figures, total (``{step}_seconds``).
    history : per-epoch ``loss``, ``val_loss`` and ``epoch_seconds``.
    confusion : ``{clusterer}_{hungarian|majority}`` -> (10, 10) int array (true x assigned label).
    figures : name -> matplotlib Figure (``pca``, ``reconstructions``, ``loss``, ``confusion_{clusterer}``).
    models : ``autoencoder``, ``encoder`` (Keras, absent for raw pixels) and fitted clusterers by name.
    """

    config: TrialConfig
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _epoch_callback(on_epoch: EpochHook | None, history: dict[str, list[float]]):
    import keras

    class EpochCallback(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            history.setdefault("epoch_seconds", []).append(time.perf_counter() - self._start)
            for key in ("loss", "val_loss"):
                history.setdefault(key, []).append(logs.get(key, math.nan))
            if not math.isfinite(logs.get("loss", math.nan)):
                raise FloatingPointError(f"training loss is {logs.get('loss')} at epoch {epoch + 1}; the autoencoder diverged")
            if on_epoch is not None:
                on_epoch(epoch + 1, {k: history[k][-1] for k in ("loss", "val_loss", "epoch_seconds")})

    return EpochCallback()


def run_trial(config: TrialConfig, *, data: Dataset | None = None, data_dir: str | None = None,
              threads: int | None = None, on_epoch: EpochHook | None = None,
              figures: bool = True, verbose: int | str = 0) -> TrialResult:
    """Run one trial.

    Parameters
    ----------
    config : the validated trial settings.
    data : an already loaded dataset matching ``config.data`` (a sweep shares one); loaded when None.
    data_dir : where to look for the IDX files when loading.
    threads : CPU threads the backend may use (a Ray trial's share); None leaves the backend's default.
    on_epoch : called after each training epoch with (epoch, {loss, val_loss, epoch_seconds}).
    figures : draw the figures (PCA scatter, reconstructions, loss curves, confusion heatmaps).
    verbose : Keras' ``fit`` verbosity ("auto" shows its progress bar).
    """
    result = TrialResult(config=config)
    t_total = time.perf_counter()

    t = time.perf_counter()
    if data is None:
        data = load_dataset(data_dir, seed=config.data.seed, subset=config.data.subset)
    x_eval, y_eval = data.split(config.eval_split)
    result.timings["data_seconds"] = time.perf_counter() - t
    result.info.update(data_source=data.source, n_train=len(data.y_train), n_val=len(data.y_val),
                       n_eval=len(y_eval))

    recon = None
    if config.model.kind != "none" or ("gmm" in config.clusterers and config.gmm.impl == "fast"):
        from fmnist_cluster.models import configure_backend

        configure_backend(threads=threads, seed=config.seed)  # Keras runs the training or the fast GMM
    if config.model.kind == "none":
        codes = x_eval.reshape(len(x_eval), -1)  # raw pixels (n, 784)
    else:
        from fmnist_cluster.models import build_autoencoder

        autoencoder, encoder = build_autoencoder(config.model, learning_rate=config.learning_rate)
        result.models.update(autoencoder=autoencoder, encoder=encoder)
        t = time.perf_counter()
        autoencoder.fit(data.x_train, data.x_train, validation_data=(data.x_val, data.x_val),
                        epochs=config.epochs, batch_size=config.batch_size, shuffle=True, verbose=verbose,
                        callbacks=[_epoch_callback(on_epoch, result.history)])
        result.timings["train_seconds"] = time.perf_counter() - t

        t = time.perf_counter()
        recon = autoencoder.predict(data.x_test, batch_size=1024, verbose=0)  # (n_test, 28, 28, 1)
        result.metrics["recon_mse"] = float(np.mean((recon - data.x_test) ** 2))
        codes = encoder.predict(x_eval, batch_size=1024, verbose=0)  # (n_eval, latent_dim)
        result.timings["encode_seconds"] = time.perf_counter() - t
        result.info["latent_dim"] = int(codes.shape[1])
        # ReLU units that are zero (constant) on every image clustered: features the clusterers cannot use
        result.metrics["latent_dead_units"] = float((np.ptp(codes, axis=0) == 0).sum())

    labels = {}
    for name in config.clusterers:
        t = time.perf_counter()
        estimator, labels[name] = fit_predict(name, config, codes)
        result.timings[f"{name}_seconds"] = time.perf_counter() - t
        result.models[name] = estimator
        for score, value in metrics.score_all(y_eval, labels[name]).items():
            result.metrics[f"{name}_{score}"] = value
        for mapping in ("hungarian", "majority"):
            result.confusion[f"{name}_{mapping}"] = metrics.mapped_confusion(
                y_eval, labels[name], mapping=mapping, n_classes=config.n_clusters)

    if figures:
        t = time.perf_counter()
        result.figures = draw_figures(result, codes, y_eval, labels, data, recon)
        result.timings["figures_seconds"] = time.perf_counter() - t
    result.timings["total_seconds"] = time.perf_counter() - t_total
    return result


def draw_figures(result: TrialResult, codes, y_eval, labels, data: Dataset, recon) -> dict[str, Any]:
    from fmnist_cluster import plots

    config = result.config
    arch = config.model.label()
    figs = {"pca": plots.pca_scatter(codes, y_eval, labels, seed=config.seed,
                                     title=f"{arch}: PCA of {config.eval_split} codes")}
    if recon is not None:
        figs["reconstructions"] = plots.reconstructions(data.x_test, recon, title=f"{arch}: test reconstructions")
        figs["loss"] = plots.loss_curves(result.history, title=f"{arch}: reconstruction loss")
    for name in labels:
        for mapping in ("hungarian", "majority"):
            acc_key = "acc" if mapping == "hungarian" else "acc_majority"
            figs[f"confusion_{name}_{mapping}"] = plots.confusion_heatmap(
                result.confusion[f"{name}_{mapping}"],
                title=f"{arch} {name}, {mapping} mapping: {acc_key} = {result.metrics[f'{name}_{acc_key}']:.4f}")
    return figs
