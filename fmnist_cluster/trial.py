"""One trial, end to end: data -> autoencoder -> latent codes -> (manifold) -> KMeans / GMM -> scores.

``run_trial(config) -> TrialResult`` is the whole science of fmc. ``run_group(configs, on_result=...)``
runs trials that differ only in what happens after training (their ``epochs``, clusterers, manifold,
evaluation split) on one training: it trains to the longest ``epochs`` and, at the end of each
shorter one, scores that trial exactly as if it had run alone. Ray Tune, MLflow and the CLI are thin
wrappers around these two; nothing here imports them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmnist_cluster import metrics
from fmnist_cluster.clustering import fit_predict
from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import Dataset, load_dataset

EpochHook = Callable[[int, dict[str, float]], None]  # (epoch starting at 1, {"loss", "val_loss", "epoch_seconds"})
EvalHook = Callable[[TrialConfig, int, dict[str, float]], None]  # (trial, epoch, {"kmeans_acc": ..})


@dataclass
class TrialResult:
    """What one trial produced.

    metrics : ``{clusterer}_{score}`` for score in acc, acc_majority, nmi, ari; ``recon_mse``;
        ``latent_dead_units``.
    timings : seconds: data, train, encode, manifold, kmeans, gmm, eval, figures, total (``{step}_seconds``).
    history : per-epoch ``loss``, ``val_loss`` and ``epoch_seconds`` (up to the trial's own epochs).
    evals : epoch -> scores of the codes at that epoch (``eval_every``), the final scores included.
    confusion : ``{clusterer}_{hungarian|majority}`` -> (10, 10) int array (true x assigned label).
    labels : clusterer -> (n_eval,) cluster of each image of the evaluation split, in the split's order.
    figures : name -> matplotlib Figure (``pca``, ``reconstructions``, ``loss``, ``clustering_vs_epoch``,
        ``confusion_{clusterer}_{mapping}``).
    models : ``autoencoder``, ``encoder`` (Keras, absent for raw pixels), ``manifold`` and the fitted
        clusterers by name. In a group these are live: log or copy them before training goes on.
    """

    config: TrialConfig
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def run_trial(config: TrialConfig, *, data: Dataset | None = None, data_dir: str | None = None,
              threads: int | None = None, on_epoch: EpochHook | None = None,
              on_eval: Callable[[int, dict[str, float]], None] | None = None,
              figures: bool = True, verbose: int | str = 0,
              checkpoint_dir: str | os.PathLike | None = None) -> TrialResult:
    """Run one trial alone.

    Parameters
    ----------
    config : the validated trial settings.
    data : an already loaded dataset matching ``config.data`` (a sweep shares one); loaded when None.
    data_dir : where to look for the IDX files when loading.
    threads : CPU threads the backend may use (a Ray trial's share); None leaves the backend's default.
    on_epoch : called after each training epoch with (epoch, {loss, val_loss, epoch_seconds}).
    on_eval : called with (epoch, scores) each time ``eval_every`` scores the codes during training.
    figures : draw the figures (PCA scatter, reconstructions, loss curves, confusion heatmaps).
    verbose : Keras' ``fit`` verbosity (1 or "auto": a progress bar; 2: one line per epoch).
    checkpoint_dir : checkpoint the training every epoch under this folder and resume from it
        (:func:`run_group`); the trial's checkpoints are removed once it has finished.
    """
    results: list[TrialResult] = []

    def keep(_config, result, error):
        if error is not None:
            raise error
        results.append(result)

    run_group([config], data=data, data_dir=data_dir, threads=threads, on_epoch=on_epoch,
              on_eval=None if on_eval is None else (lambda _c, epoch, scores: on_eval(epoch, scores)),
              on_result=keep, figures=figures, verbose=verbose, checkpoint_dir=checkpoint_dir)
    if checkpoint_dir is not None:
        from fmnist_cluster.checkpoints import TrainingCheckpoints

        TrainingCheckpoints(checkpoint_dir, config.training_key()).remove()
    return results[0]


def run_group(configs: list[TrialConfig], *, on_result: Callable[[TrialConfig, TrialResult | None,
                                                                    BaseException | None], None],
              data: Dataset | None = None, data_dir: str | None = None, threads: int | None = None,
              on_epoch: EpochHook | None = None, on_eval: EvalHook | None = None, figures: bool = True,
              verbose: int | str = 0, wanted: Callable[[TrialConfig], bool] | None = None,
              stop: Callable[[], str | None] | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = True) -> None:
    """Run trials that share their training (equal :meth:`TrialConfig.training_key`).

    The autoencoder trains once, to the largest ``epochs``; at the end of each trial's own epochs that
    trial is encoded, clustered and scored, and handed to ``on_result(config, result, None)`` before
    training goes on. A trial whose scoring fails (at its end or during ``eval_every``) is handed over
    once as ``on_result(config, None, error)`` and the others go on; an error of the training itself
    (a diverged loss) ends the group. ``wanted(config)`` False drops a trial (e.g. its logging failed);
    training stops early once no trial is left that needs more epochs. ``stop()`` (asked after every
    epoch and batch) answering ``"early"`` ends the training after that epoch and scores every open
    trial at the epoch reached (``info["stopped_early_at_epoch"]``); ``"interrupt"`` raises
    KeyboardInterrupt at the next batch.

    With ``checkpoint_dir`` the training is checkpointed after every epoch
    (:mod:`fmnist_cluster.checkpoints`) and, with ``resume``, goes on from the last checkpoint that
    no open trial has passed: the restored epochs' losses and scores are handed to ``on_epoch`` and
    ``on_eval`` again, so a new run gets the whole curve; ``info["resumed_from_epoch"]`` says where.
    The caller removes the checkpoints once its trials are recorded (``TrainingCheckpoints.remove``).
    """
    if len({c.training_key() for c in configs}) != 1:
        raise ValueError("run_group: the trials differ in their training settings: "
                         + ", ".join(sorted({c.training_key() for c in configs})))
    lead = max(configs, key=lambda c: c.epochs)
    t = time.perf_counter()
    if data is None:
        data = load_dataset(data_dir, seed=lead.data.seed, subset=lead.data.subset)
    data_seconds = time.perf_counter() - t
    if lead.model.kind != "none" or any("gmm" in c.clusterers and c.gmm.impl == "fast" for c in configs):
        from fmnist_cluster.models import configure_backend

        configure_backend(threads=threads, seed=lead.seed)  # Keras runs the training or the fast GMM
    state = _State(data=data, data_seconds=data_seconds, threads=threads, figures=figures)
    failed: set[str] = set()  # trial keys already handed over as failed

    def is_open(config: TrialConfig) -> bool:
        return config.key() not in failed and (wanted is None or wanted(config))

    def failure(config: TrialConfig, error: BaseException) -> None:
        failed.add(config.key())
        on_result(config, None, error)

    def finish(config: TrialConfig, stopped_at: int | None = None) -> None:
        if not is_open(config):
            return
        try:
            result = _evaluate(config, state)
        except Exception as error:  # noqa: BLE001 - handed to the caller, who records it for this trial
            failure(config, error)
            return
        if stopped_at is not None:
            result.info["stopped_early_at_epoch"] = stopped_at
        if state.resumed_from:
            from fmnist_cluster.machine import epoch_spans

            result.info["resumed_from_epoch"] = state.resumed_from
            result.info["trained_on"] = epoch_spans(state.epoch_cpus[:config.epochs])  # perhaps two machines
        on_result(config, result, None)

    if lead.model.kind == "none":  # raw pixels: nothing to train
        for config in configs:
            finish(config)
        return

    from fmnist_cluster.machine import cpu_id
    from fmnist_cluster.models import build_autoencoder

    state.autoencoder, state.encoder = build_autoencoder(lead.model, learning_rate=lead.learning_rate)
    checkpoints = None
    if checkpoint_dir is not None:
        from fmnist_cluster.checkpoints import TrainingCheckpoints

        checkpoints = TrainingCheckpoints(checkpoint_dir, lead.training_key())
        shortest = min((c.epochs for c in configs if is_open(c)), default=0)
        start = checkpoints.latest(shortest) if resume else None
        if start:
            _restore(checkpoints, start, state, configs, is_open, on_epoch, on_eval)
    milestones = {c.epochs for c in configs}

    def after_epoch(epoch: int, restored: bool = False) -> bool:
        """Score and finish what is due at ``epoch``; False once no open trial needs more epochs.
        ``restored``: the epoch of the checkpoint resumed from, whose scores during training are in."""
        if not restored:
            state.epoch_cpus.append(cpu_id())
        if lead.eval_every and epoch % lead.eval_every == 0 and not restored:
            t = time.perf_counter()
            done: dict[str, dict[str, float] | Exception] = {}  # trials with the same scoring settings share it
            for config in configs:
                if config.epochs > epoch and is_open(config):
                    signature = _scoring_signature(config)
                    if signature not in done:
                        try:
                            done[signature] = _score_codes(config, state, config.scored_during_training())
                        except Exception as error:  # noqa: BLE001 - fails the trials scored this way only
                            done[signature] = error
                    if isinstance(done[signature], Exception):
                        failure(config, done[signature])
                        continue
                    state.evals.setdefault(config.key(), {})[epoch] = done[signature]
                    if on_eval is not None:
                        on_eval(config, epoch, done[signature])
            state.eval_seconds += time.perf_counter() - t
        early = stop is not None and stop() == "early"
        for config in configs:
            if config.epochs == epoch:
                finish(config)
            elif early and config.epochs > epoch:
                finish(config, stopped_at=epoch)
        going_on = not early and any(config.epochs > epoch and is_open(config) for config in configs)
        if checkpoints is not None and going_on and not restored:
            checkpoints.save(epoch, state.autoencoder, {
                "history": state.history, "eval_seconds": state.eval_seconds, "epoch_cpus": state.epoch_cpus,
                "evals": {key: {str(e): s for e, s in by_epoch.items()} for key, by_epoch in state.evals.items()}},
                keep=milestones)
        return going_on

    initial_epoch = state.resumed_from or 0
    if initial_epoch and not after_epoch(initial_epoch, restored=True):  # trials that end at the checkpoint: scored now
        return
    x_fit = data.x_train if lead.fit_split == "train" else data.split("all")[0]
    held_out = (data.x_val, data.x_val) if lead.fit_split == "train" else None
    callbacks = [_epoch_callback(on_epoch, state.history, after_epoch, stop)]
    if lead.shuffle == "once":
        state.autoencoder.fit(x_fit, x_fit, validation_data=held_out, initial_epoch=initial_epoch,
                              epochs=lead.epochs, batch_size=lead.batch_size, shuffle=True, verbose=verbose,
                              callbacks=callbacks)
        return
    for epoch in range(initial_epoch, lead.epochs):  # one fit per epoch, in that epoch's order
        x_epoch = x_fit[epoch_order(lead.seed, epoch, len(x_fit))]
        state.autoencoder.fit(x_epoch, x_epoch, validation_data=held_out, initial_epoch=epoch, epochs=epoch + 1,
                              batch_size=lead.batch_size, shuffle=False, verbose=verbose, callbacks=callbacks)
        if state.autoencoder.stop_training:  # no trial left that needs more epochs
            break


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch`` (0-based) under ``shuffle: epoch``: a
    function of the seed and the epoch only, so a training resumed at any epoch sees what an
    unbroken one would."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _restore(checkpoints, epoch: int, state: _State, configs: list[TrialConfig], is_open, on_epoch: EpochHook | None,
             on_eval: EvalHook | None) -> None:
    """Load the checkpoint of ``epoch`` into ``state`` and replay its epochs and scores to the hooks."""
    from fmnist_cluster.models import encoder_of

    state.autoencoder, saved = checkpoints.load(epoch)
    state.encoder = encoder_of(state.autoencoder)
    state.history = {k: list(v) for k, v in saved["history"].items()}
    state.evals = {key: {int(e): s for e, s in by_epoch.items()} for key, by_epoch in saved["evals"].items()}
    state.eval_seconds = float(saved["eval_seconds"])
    state.epoch_cpus = list(saved.get("epoch_cpus", ["not recorded"] * epoch))[:epoch]  # older checkpoints lack it
    state.resumed_from = epoch
    for e in range(1, epoch + 1):
        if on_epoch is not None:
            on_epoch(e, {k: state.history[k][e - 1] for k in ("loss", "val_loss", "epoch_seconds") if k in state.history})
        for config in configs:
            scores = state.evals.get(config.key(), {}).get(e)
            if scores is not None and on_eval is not None and is_open(config):
                on_eval(config, e, scores)


@dataclass
class _State:
    """What the trials of a group share while it trains."""

    data: Dataset
    data_seconds: float
    threads: int | None
    figures: bool
    autoencoder: Any = None
    encoder: Any = None
    history: dict[str, list[float]] = field(default_factory=dict)
    evals: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # trial key -> epoch -> scores
    eval_seconds: float = 0.0
    resumed_from: int | None = None  # the checkpoint's epoch the training went on from
    epoch_cpus: list[str] = field(default_factory=list)  # the CPU (machine.cpu_id) of every epoch trained
    shared: dict[str, dict] = field(default_factory=dict)  # slot -> {key: (value, seconds)}: see _once


def _epoch_callback(on_epoch: EpochHook | None, history: dict[str, list[float]], after_epoch: Callable[[int], bool],
                    stop: Callable[[], str | None] | None = None):
    import keras

    class EpochCallback(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if stop is not None and stop() == "interrupt":
                raise KeyboardInterrupt("the sweep was stopped")

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            history.setdefault("epoch_seconds", []).append(time.perf_counter() - self._start)
            for key in ("loss", "val_loss"):  # no val_loss when nothing is held out (fit_split: all)
                if key in logs or key == "loss":
                    history.setdefault(key, []).append(logs.get(key, math.nan))
            if not math.isfinite(logs.get("loss", math.nan)):
                raise FloatingPointError(f"training loss is {logs.get('loss')} at epoch {epoch + 1}; the autoencoder diverged")
            if on_epoch is not None:
                on_epoch(epoch + 1, {k: history[k][-1] for k in ("loss", "val_loss", "epoch_seconds") if k in history})
            if not after_epoch(epoch + 1):
                self.model.stop_training = True  # no trial left that needs more epochs

    return EpochCallback()


def _scoring_signature(config: TrialConfig) -> str:
    """The settings that decide a trial's scores once its codes are given."""
    dump = config.model_dump(mode="json")
    return json.dumps({**{k: dump[k] for k in ("n_clusters", "kmeans", "gmm", "eval_split", "manifold", "seed")},
                       "scored": list(config.scored_during_training())}, sort_keys=True)


def _codes(config: TrialConfig, state: _State) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n_eval, latent_dim) or raw pixels (n_eval, 784), labels (n_eval,)) of the evaluation split."""
    x_eval, y_eval = state.data.split(config.eval_split)
    if state.encoder is None:
        return x_eval.reshape(len(x_eval), -1), y_eval
    return state.encoder.predict(x_eval, batch_size=1024, verbose=0), y_eval


def _cluster(config: TrialConfig, codes: np.ndarray, y_eval: np.ndarray, clusterers, state: _State,
             result: TrialResult | None = None) -> dict[str, np.ndarray]:
    """Manifold (if any) then each clusterer on ``codes``; scores into ``result.metrics`` (and timings,
    models when a result is given). Returns {clusterer: labels} and, under "features", what was clustered.
    Trials of a group clustering the same codes with the same manifold settings share one fit of it (it
    is deterministic for a seed); each reports the fit's seconds."""
    from fmnist_cluster.manifold import fit_manifold

    if config.manifold.kind == "none":
        (reducer, features), seconds = (None, codes), 0.0
    else:
        (reducer, features), seconds = _once(state, "manifold", [config.manifold.model_dump(mode="json"),
                                                                 _codes_key(config, state)],
                                             lambda: fit_manifold(config, codes, threads=state.threads))
    out = {"features": features}
    if result is not None and reducer is not None:
        result.models["manifold"] = reducer
        result.timings["manifold_seconds"] = seconds
    for name in clusterers:
        t = time.perf_counter()
        estimator, out[name] = fit_predict(name, config, features)
        if result is not None:
            result.timings[f"{name}_seconds"] = time.perf_counter() - t
            result.models[name] = estimator
            if name == "gmm" and config.gmm.components is not None:  # how many the mixture fitted (and merged)
                result.metrics["gmm_components"] = float(estimator.n_components)
            for score, value in metrics.score_all(y_eval, out[name]).items():
                result.metrics[f"{name}_{score}"] = value
            t = time.perf_counter()
            for criterion, value in metrics.label_free(name, estimator, features, out[name], seed=config.seed).items():
                result.metrics[f"{name}_{criterion}"] = value
            result.timings["label_free_seconds"] = result.timings.get("label_free_seconds", 0.0) + time.perf_counter() - t
    return out


def _codes_key(config: TrialConfig, state: _State) -> list:
    """What decides the codes a trial of the group clusters: the epoch reached, the evaluation split and,
    with DEC, its settings and the number of clusters it refines towards (the rest is the training's)."""
    dec = [config.dec.model_dump(mode="json"), config.n_clusters] if config.dec.epochs else None
    return [len(state.history.get("loss", [])), config.eval_split, dec]


def _once(state: _State, slot: str, key: list, compute: Callable[[], Any]) -> tuple[Any, float]:
    """``(compute(), its seconds)``, computed once for the trials of a group that ask with an equal
    ``key`` (at one epoch, deterministic for the group's seed); only the latest is kept per ``slot``."""
    key = json.dumps(key, sort_keys=True)
    if key not in state.shared.get(slot, {}):
        t = time.perf_counter()
        value = compute()
        state.shared[slot] = {key: (value, time.perf_counter() - t)}
    return state.shared[slot][key]


def _refined(config: TrialConfig, state: _State, x_eval: np.ndarray):
    """((DEC-refined encoder, its info, its codes of ``x_eval``), seconds), once per group and epoch."""
    from fmnist_cluster.dec import refine

    def compute():
        refined, info = refine(state.encoder, x_eval, n_clusters=config.n_clusters, epochs=config.dec.epochs,
                               batch_size=config.batch_size, update_interval=config.dec.update_interval,
                               tol=config.dec.tol, learning_rate=config.dec.learning_rate, seed=config.seed)
        return refined, info, refined.predict(x_eval, batch_size=1024, verbose=0)
    return _once(state, "dec", _codes_key(config, state), compute)


def _score_codes(config: TrialConfig, state: _State, clusterers) -> dict[str, float]:
    """Scores of the current codes (during training): {clusterer}_{score} for ``clusterers``."""
    codes, y_eval = _codes(config, state)
    labels = _cluster(config, codes, y_eval, clusterers, state)
    return {f"{name}_{score}": value for name in clusterers
            for score, value in metrics.score_all(y_eval, labels[name]).items()}


def _evaluate(config: TrialConfig, state: _State) -> TrialResult:
    """The finished trial: its slice of the training history, codes, clusters, scores and figures."""
    t_eval = time.perf_counter()
    result = TrialResult(config=config)
    data = state.data
    result.history = {k: v[:config.epochs] for k, v in state.history.items()}
    result.timings["data_seconds"] = state.data_seconds
    x_eval, y_eval = data.split(config.eval_split)
    n_train, n_val = len(data.y_train), len(data.y_val)
    if config.fit_split == "all":  # every image trained on, none held out (counted, not concatenated again)
        n_train, n_val = n_train + n_val + len(data.y_test), 0
    result.info.update(data_source=data.source, n_train=n_train, n_val=n_val, n_eval=len(y_eval))

    recon = None
    if state.autoencoder is not None:
        result.models.update(autoencoder=state.autoencoder, encoder=state.encoder)
        result.timings["train_seconds"] = float(sum(result.history["epoch_seconds"]))
        t = time.perf_counter()
        recon = state.autoencoder.predict(data.x_test, batch_size=1024, verbose=0)  # (n_test, 28, 28, 1)
        result.metrics["recon_mse"] = float(np.mean((recon - data.x_test) ** 2))
        codes, _ = _codes(config, state)  # (n_eval, latent_dim)
        result.timings["encode_seconds"] = time.perf_counter() - t
        if config.dec.epochs:  # the encoder refined on the images it clusters; its codes are clustered
            (refined, info, codes), seconds = _refined(config, state, x_eval)
            result.metrics.update(info)
            result.models["encoder"] = refined
            result.timings["dec_seconds"] = seconds
        result.info["latent_dim"] = int(codes.shape[1])
        # ReLU units that are zero (constant) on every image clustered: features the clusterers cannot use
        result.metrics["latent_dead_units"] = float((np.ptp(codes, axis=0) == 0).sum())
    else:
        codes, _ = _codes(config, state)

    labels = _cluster(config, codes, y_eval, config.clusterers, state, result)
    features = labels.pop("features")
    result.labels = dict(labels)
    for name in config.clusterers:
        for mapping in ("hungarian", "majority"):
            result.confusion[f"{name}_{mapping}"] = metrics.mapped_confusion(
                y_eval, labels[name], mapping=mapping, n_classes=config.n_clusters)

    if config.eval_every:
        result.evals = {**state.evals.get(config.key(), {}),
                        min(config.epochs, len(state.history.get("loss", [])) or config.epochs): {k: v for k, v in result.metrics.items()
                                        if k.split("_", 1)[0] in config.scored_during_training()}}
        result.timings["eval_seconds"] = state.eval_seconds
    if state.figures:
        t = time.perf_counter()
        result.figures = draw_figures(result, features, y_eval, labels, data, recon)
        result.timings["figures_seconds"] = time.perf_counter() - t
    result.timings["total_seconds"] = (state.data_seconds + result.timings.get("train_seconds", 0.0)
                                       + result.timings.get("eval_seconds", 0.0) + time.perf_counter() - t_eval)
    return result


def draw_figures(result: TrialResult, features, y_eval, labels, data: Dataset, recon) -> dict[str, Any]:
    from fmnist_cluster import plots

    config = result.config
    arch = config.model.label()
    what = "codes" if config.manifold.kind == "none" else f"{config.manifold.kind} embedding"
    figs = {"pca": plots.pca_scatter(features, y_eval, labels, seed=config.seed,
                                     title=f"{arch}: PCA of the {config.eval_split} {what}")}
    if recon is not None:
        figs["reconstructions"] = plots.reconstructions(data.x_test, recon, title=f"{arch}: test reconstructions")
        figs["loss"] = plots.loss_curves(result.history, title=f"{arch}: reconstruction loss")
    if result.evals:
        figs["clustering_vs_epoch"] = plots.scores_vs_epoch(result.evals, title=f"{arch}: clustering during training")
    for name in labels:
        for mapping in ("hungarian", "majority"):
            acc_key = "acc" if mapping == "hungarian" else "acc_majority"
            figs[f"confusion_{name}_{mapping}"] = plots.confusion_heatmap(
                result.confusion[f"{name}_{mapping}"],
                title=f"{arch} {name}, {mapping} mapping: {acc_key} = {result.metrics[f'{name}_{acc_key}']:.4f}")
    return figs
