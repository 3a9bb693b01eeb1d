"""One trial's child run: claimed before the trial starts, kept alive by a heartbeat, filled with
per-epoch curves, scores, confusion matrices, figures and models, and ended honestly (FINISHED, FAILED
with the error, KILLED when interrupted).

Every call goes through the trial's :class:`~tracking.delivery.Delivery` (in order, through outages).
Writes that a retry could repeat are idempotent: the run is created with a unique ``fmc.attempt`` tag
and looked up by it before a retry creates another; a model already READY in the run is not logged
again, a half-logged one is deleted and logged again.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tracking import claims
from tracking.delivery import Contact, Delivery
from tracking.store import (PARENT_TAG, TRIAL_KEY, TrackingError, TrackingOutage, TrackingRefused, auth_headers,
                            client, cpu_id, cpu_model, is_http, log_metrics, log_params, search)


@dataclass(frozen=True)
class RunContext:
    """What a trial needs to log into its sweep's parent run; small and picklable (sent to Ray workers).

    outage_seconds : how long a trial waits for an unreachable server before it stops for good.
    claim_ttl : a RUNNING trial run whose heartbeat is older than this no longer claims its trial
        (``claims.claim_ttl``: longer than the outage bound by construction).
    claim_settle : seconds between writing a claim and reading the others (longer than a request takes).
    rerun_since : with ``fmc sweep --rerun``, the parent run's start (ms): finished runs older than it
        do not hold their trial.
    """

    uri: str
    experiment_id: str
    parent_run_id: str | None
    sweep: str
    commit: str | None = None
    outage_seconds: float = 600.0
    claim_ttl: float = 690.0
    claim_settle: float = 2.0
    rerun_since: int | None = None

    @property
    def heartbeat_every(self) -> float:
        return claims.heartbeat_every(self.outage_seconds)


def run_record(run) -> dict:
    """The plain record ``tracking.claims`` decides over."""
    return {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
            "tags": dict(run.data.tags)}


class TrialLogger:
    """One trial's child run. Use as a context manager around the trial::

        with TrialLogger(ctx, name, config) as log:
            result = run_trial(config, on_epoch=log.epoch)
            log.result(result)

    or call ``start()`` and ``finish(error)`` yourself (a sweep runs several trials on one training).
    Leaving by an exception ends the run FAILED (KILLED for an interrupt) with the error as tag
    ``fmc.error`` and the traceback as ``error/traceback.txt``, then re-raises.
    """

    def __init__(self, ctx: RunContext, name: str, config, *, log_models: bool = True,
                 tags: dict[str, str] | None = None, system_metrics: bool = True):
        self.ctx, self.name, self.config, self.log_models = ctx, name, config, log_models
        self.extra_tags = tags or {}
        self.client = client(ctx.uri)
        self.contact = Contact(ctx.outage_seconds)
        self.delivery = Delivery(ctx.uri, ctx.outage_seconds, contact=self.contact)
        self.run_id: str | None = None
        self.start_time: int | None = None
        self.finished = False
        self._heartbeat: claims.Heartbeat | None = None
        self.system_metrics = system_metrics
        self._monitor = None

    # ------------------------------------------------------------------ start: run and claim
    def start(self, *, claim: bool = False) -> str | None:
        """Create the child run and start its heartbeat. With ``claim``, first make sure no other sweep
        runs or ran this trial: returns who does (and leaves no run behind) when one does, else None."""
        attempt = uuid.uuid4().hex
        tags = {"fmc.role": "trial", "fmc.trial": self.name, "fmc.sweep": self.ctx.sweep,
                TRIAL_KEY: self.config.key(), "fmc.keras_backend": _backend(self.config),
                "fmc.host": socket.gethostname(), "fmc.python": platform.python_version(), "fmc.cpu": cpu_model(),
                "fmc.cpu_id": cpu_id(), "fmc.model": self.config.model.label(), "fmc.attempt": attempt,
                claims.HEARTBEAT: str(int(time.time())), **self.extra_tags}
        if claim:
            tags[claims.CLAIM] = "pending"
        if self.ctx.parent_run_id:
            tags[PARENT_TAG] = self.ctx.parent_run_id
        if self.ctx.commit:
            tags["mlflow.source.git.commit"] = self.ctx.commit

        def create() -> tuple[str, int]:
            # a create_run whose answer was lost (502/504) may have been committed: find it, do not add
            # one. The create itself goes once per attempt (MLflow's own retries would repeat the POST).
            found = search(self.client, self.ctx.experiment_id, f"tags.`fmc.attempt` = '{attempt}'")
            if found:
                return found[0].info.run_id, found[0].info.start_time
            return _create_run_once(self.ctx.uri, self.ctx.experiment_id, self.name, tags)

        self.run_id, self.start_time = self.delivery.send("the trial's run", create, wait=True)
        run_id = self.run_id
        if claim:
            who = self.delivery.send("the trial's claim", self._claim, wait=True)
            if who:
                self.delivery.send("withdrawing the claim", lambda: self.client.delete_run(run_id), wait=True)
                self.run_id, self.finished = None, True
                return who
        self._heartbeat = claims.Heartbeat(self.heartbeat, self.ctx.heartbeat_every).start()
        if self.system_metrics:
            self._monitor = _system_monitor(self.ctx.uri, self.run_id)
        rid = self.run_id
        self.delivery.send("params", lambda: log_params(self.client, rid, self.config.flat()), wait=True)
        self.delivery.send("config.json", lambda: self.client.log_dict(
            rid, self.config.model_dump(mode="json"), "config.json"), wait=True)
        inputs = _dataset_inputs(self.config)
        try:
            self.delivery.send("datasets", lambda: _log_inputs(self.client, rid, inputs), wait=True)
        except TrackingRefused as err:  # what the trial read is a label on its run, not a reason to fail it
            print(f"fmc: trial {self.name}: {err}", file=sys.stderr, flush=True)
        return None

    def _claim(self) -> str | None:
        time.sleep(self.ctx.claim_settle)
        runs = [run_record(r) for r in search(self.client, self.ctx.experiment_id,
                                              f"tags.`{TRIAL_KEY}` = '{self.config.key()}'")
                if r.info.status in ("RUNNING", "FINISHED")]
        mine = {"run_id": self.run_id, "status": "RUNNING", "start_time": self.start_time, "tags": {}}
        who = claims.holder(mine, runs, ttl=self.ctx.claim_ttl, now=time.time(), rerun_since=self.ctx.rerun_since)
        if who is None:
            self.client.set_tag(self.run_id, claims.CLAIM, "won")
        return who

    def __enter__(self) -> TrialLogger:
        try:
            self.start()
        except BaseException as error:  # a run created but not filled in is closed, not left RUNNING
            self.finish(error)
            raise
        return self

    # ------------------------------------------------------------------ during the trial
    def heartbeat(self) -> None:
        """Refresh the claim (called every ``heartbeat_every`` seconds by the heartbeat thread); never
        raises. Its answers feed the trial's contact with the store: no answer for the outage bound
        and the trial stops writing (its claim may expire after that)."""
        if not self.run_id or self.finished:
            return
        try:
            _set_tag_now(self.ctx.uri, self.run_id, claims.HEARTBEAT, str(int(time.time())),
                         timeout=max(1.0, min(10.0, self.ctx.heartbeat_every)))
            self.contact.ok()
        except Exception:  # noqa: BLE001 - the store is away: the contact counts it
            self.contact.failed()

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Per-epoch curves (step = epoch): loss, val_loss, epoch_seconds. Kept for later during an outage."""
        rid, stamp = self.run_id, int(time.time() * 1000)
        self.delivery.send(f"epoch {epoch}", lambda: log_metrics(self.client, rid, values, step=epoch, timestamp=stamp))

    def eval(self, epoch: int, scores: dict[str, float]) -> None:
        """Clustering scores of the codes during training (step = epoch)."""
        rid, stamp = self.run_id, int(time.time() * 1000)
        self.delivery.send(f"scores at epoch {epoch}",
                           lambda: log_metrics(self.client, rid, scores, step=epoch, timestamp=stamp))

    def result(self, result) -> None:
        """Scores, timings, confusion matrices, figures and models of a finished trial. The final
        scores are logged at step = epochs, after any ``eval_every`` scores, so they are the latest.
        A part the store refuses does not stop the others; the first refusal is raised at the end.
        The scores go after the models: each clusterer's are its LoggedModel's too (on the images it
        clustered), so that MLflow's Models page sorts and compares models by score."""
        t = time.perf_counter()
        rid, c = self.run_id, self.client
        parts = [("trial.json", lambda: c.log_dict(rid, {"info": result.info, "history": result.history,
                                                         "evals": result.evals}, "trial.json")),
                 ("labels.json", lambda: c.log_dict(rid, {"split": result.config.eval_split, **{
                     name: labels.tolist() for name, labels in result.labels.items()}}, "labels.json"))]
        for key, matrix in result.confusion.items():
            body = {"rows": "true label", "columns": "assigned label", "matrix": matrix.tolist()}
            parts.append((f"confusion/{key}.json",
                          lambda body=body, key=key: c.log_dict(rid, body, f"confusion/{key}.json")))
        for key, fig in result.figures.items():
            path = f"{'confusion' if key.startswith('confusion_') else 'plots'}/{key.removeprefix('confusion_')}.png"
            parts.append((path, lambda fig=fig, path=path: c.log_figure(rid, fig, path)))
        if result.info.get("stopped_early_at_epoch"):  # the scheduler stopped it: scored at the epoch reached
            reached = str(result.info["stopped_early_at_epoch"])
            parts.insert(0, ("the early stop", lambda: [c.set_tag(rid, "fmc.stopped_early", "true"),
                                                        c.set_tag(rid, "fmc.epochs_trained", reached)]))
        if result.info.get("resumed_from_epoch"):  # the training went on from a checkpoint of an earlier run
            resumed, spans = str(result.info["resumed_from_epoch"]), result.info.get("trained_on", "")
            parts.insert(0, ("the resume", lambda: [c.set_tag(rid, "fmc.resumed_from_epoch", resumed),  # and which
                                                    c.set_tag(rid, "fmc.trained_on", spans)]))  # CPU trained what
        refused = None
        with tempfile.TemporaryDirectory(prefix="fmc-models-") as folder:
            if self.log_models:
                parts += self._model_parts(result, folder)
            parts.append(("scores", lambda: self._log_scores(result)))
            for what, call in parts:
                try:
                    self.delivery.send(what, call, wait=True)
                except TrackingOutage:
                    raise
                except TrackingError as err:
                    refused = refused or err
        seconds = time.perf_counter() - t
        self.delivery.send("logging_seconds", lambda: c.log_metric(rid, "logging_seconds", seconds), wait=True)
        if refused is not None:
            raise refused

    def _model_parts(self, result, folder: str) -> list:
        """[(what, call)] per model: the Keras autoencoder and one pyfunc "encoder [+ manifold] + clusterer"
        per clusterer; each call logs its model once, however often it is retried."""
        import logging

        import mlflow

        from fmnist_cluster.quiet import verbose

        # MLflow warns on every model about what fmc decides on purpose (no signature: 28x28 and 784-pixel
        # inputs both work; no pip in a uv environment)
        logging.getLogger("mlflow").setLevel(logging.WARNING if verbose() else logging.ERROR)
        mlflow.set_tracking_uri(self.ctx.uri)
        reqs = _requirements(result.config)
        code = str(Path(__file__).with_name("pyfunc_model.py"))
        artifacts = {}
        if "autoencoder" in result.models:
            artifacts["encoder"] = os.path.join(folder, "encoder.keras")
            result.models["encoder"].save(artifacts["encoder"])
        if "manifold" in result.models:
            artifacts["manifold"] = _save_manifold(result.models["manifold"], folder)

        def once(name, log):
            def call():
                if self._model_logged(name):
                    return
                mlflow.start_run(run_id=self.run_id)
                try:
                    log()
                finally:  # the run stays RUNNING: its end (and end status) is finish()'s to write
                    mlflow.end_run("RUNNING")
            return f"model {name}", call

        def autoencoder():
            import mlflow.keras

            mlflow.keras.log_model(result.models["autoencoder"], name="autoencoder", pip_requirements=reqs)

        def pyfunc(clusterer):
            import skops.io

            path = os.path.join(folder, f"{clusterer}.skops")  # skops: no arbitrary unpickling on load
            skops.io.dump(result.models[clusterer], path)
            mlflow.pyfunc.log_model(name=f"{clusterer}_clusterer", python_model=code,
                                    artifacts={**artifacts, "clusterer": path}, pip_requirements=reqs,
                                    tags={"fmc.trial": self.name, "fmc.clusterer": clusterer})

        parts = [once("autoencoder", autoencoder)] if "autoencoder" in result.models else []
        return parts + [once(f"{c}_clusterer", lambda c=c: pyfunc(c)) for c in result.config.clusterers]

    def _log_scores(self, result) -> None:
        """The final scores and timings at step = epochs (after any ``eval_every`` scores: the latest).
        A clusterer whose model was logged gets its scores as that LoggedModel's metrics, on the
        evaluation dataset (the same values land in the run); the rest are the run's alone."""
        evaluated = _dataset_inputs(result.config)[-1].dataset
        step, rest = result.info.get("stopped_early_at_epoch", result.config.epochs), {**result.metrics, **result.timings}
        for clusterer in result.config.clusterers:
            model = self._ready_model(f"{clusterer}_clusterer") if self.log_models else None
            if model is None:
                continue
            scores = {k: rest.pop(k) for k in list(rest) if k.startswith(f"{clusterer}_") and k in result.metrics}
            log_metrics(self.client, self.run_id, scores, step=step, model_id=model.model_id,
                        dataset=(evaluated.name, evaluated.digest))
        log_metrics(self.client, self.run_id, rest, step=step)

    def _logged_models(self, name: str) -> list:
        import mlflow

        return mlflow.search_logged_models(experiment_ids=[self.ctx.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{self.run_id}' AND name = '{name}'")

    def _ready_model(self, name: str):
        return next((m for m in self._logged_models(name) if str(getattr(m.status, "value", m.status)) == "READY"),
                    None)

    def _model_logged(self, name: str) -> bool:
        """Whether the run has model ``name`` READY; a PENDING or FAILED one (a retried, half-done
        upload) is deleted so that it is logged again once."""
        found = self._logged_models(name)
        if any(str(getattr(m.status, "value", m.status)) == "READY" for m in found):
            return True
        for m in found:
            self.client.delete_logged_model(m.model_id)
        return False

    # ------------------------------------------------------------------ end
    def finish(self, error: BaseException | None = None, tb=None) -> str | None:
        """Deliver what is buffered and end the run: FINISHED, or FAILED / KILLED with the error.
        Never raises: returns None when the run ended as asked, else one line saying what went wrong
        (the store gone, a refusal, or the claim lost to another sweep)."""
        if self.finished or self.run_id is None:
            return None
        self.finished = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._monitor is not None:  # its last samples go before the run ends
            self._monitor.finish()
        if error is None:
            try:
                return self._finish_ok()
            except TrackingOutage as err:
                return str(err)
            except TrackingError as err:
                error = err  # recorded below as the trial's failure
        return self._finish_failed(error, tb)

    def _finish_ok(self) -> str | None:
        rid = self.run_id
        self.delivery.drain()
        if self.delivery.delivered_late:  # what an outage cost this trial, on its own record
            late = {"tracking_outage_seconds": self.delivery.outage_seconds_total,
                    "tracking_late_calls": self.delivery.delivered_late}
            self.delivery.send("outage figures", lambda: log_metrics(self.client, rid, late), wait=True)
        # the claim must still be ours: a run that another sweep closed (its claim expired) stays closed
        status = self.delivery.send("the run's status", lambda: self.client.get_run(rid).info.status, wait=True)
        if status != "RUNNING":
            return f"run {rid[:8]} was closed as {status} by another sweep while this trial ran; not finished here"
        self.delivery.send("the end of the run", lambda: self.client.set_terminated(rid, "FINISHED"), wait=True)
        return None

    def _finish_failed(self, error: BaseException, tb) -> str | None:
        if isinstance(error, TrackingOutage):  # the store is gone: nothing more can be recorded
            return str(error)
        rid = self.run_id
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        message = f"{type(error).__name__}: {error}"
        text = "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))
        problems = []
        steps = [("what was queued", None),  # the epochs and scores buffered so far are kept
                 ("the error", lambda: self.client.set_tag(rid, "fmc.error", message[:4000])),
                 ("error/traceback.txt", lambda: self.client.log_text(rid, text, "error/traceback.txt")),
                 ("the end of the run", lambda: self.client.set_terminated(rid, "KILLED" if interrupted else "FAILED"))]
        for what, call in steps:
            try:
                if call is None:
                    self.delivery.drain()
                else:
                    self.delivery.send(what, call, wait=True)
            except TrackingOutage as err:
                return str(err)
            except TrackingError as err:
                problems.append(str(err))
        if problems:
            print(f"fmc: trial {self.name}: " + "; ".join(problems), file=sys.stderr, flush=True)
        return "; ".join(problems) or None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish(exc, tb)
        return False


def _system_monitor(uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU where NVML sees one) for the run, as
    ``system/*`` metrics every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default), from a
    thread of its own; None where it cannot start. Its samples are what this trial's process sees on
    its node (tag ``fmc.node``): trials that share a node share its figures."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from fmnist_cluster.quiet import verbose

    logging.getLogger("mlflow.system_metrics").setLevel(logging.INFO if verbose() else logging.ERROR)
    try:
        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    except Exception:  # noqa: BLE001 - no psutil, an NVML error: the trial runs without them
        return None
    monitor.start()
    return monitor


def _log_inputs(mlflow_client, run_id: str, inputs: list) -> None:
    """``log_inputs``, again after a moment when a concurrent trial inserted the same dataset first (the
    store checks, then inserts: two trials starting together race on its unique key)."""
    for attempt in range(4):
        try:
            mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as err:  # noqa: BLE001 - only the insert race is retried
            text = str(err)
            if attempt == 3 or not ("UNIQUE constraint failed: datasets" in text or
                                    ("duplicate key" in text and "datasets" in text)):
                raise
            time.sleep(0.5 * (attempt + 1))


def _dataset_inputs(config) -> list:
    """The trial's training and scoring images as MLflow dataset inputs (the runs table's Dataset column)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from fmnist_cluster.data import DOWNLOAD_URL, dataset_inputs

    return [DatasetInput(Dataset(d["name"], d["digest"], "http", json.dumps({"url": DOWNLOAD_URL}),
                                 profile=json.dumps({**d["profile"], "split": d["split"]})),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
            for d in dataset_inputs(config.data.seed, config.data.subset, config.eval_split, config.fit_split)]


def _post_once(uri: str, endpoint: str, body: dict, *, timeout: float) -> dict:
    """One POST to the MLflow REST API, without retries; the answer's JSON."""
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:  # worded as MLflow words it, for is_transient and server_message
        body = err.read().decode(errors="replace")[:1000]
        raise RuntimeError(f"API request to endpoint /api/2.0/mlflow/{endpoint} failed with error code "
                           f"{err.code} != 200. Response body: '{body}'") from None


def _create_run_once(uri: str, experiment_id: str, name: str, tags: dict[str, str]) -> tuple[str, int]:
    """A new run, asked for once: (run id, start time)."""
    if not is_http(uri):
        run = client(uri).create_run(experiment_id, run_name=name, tags=tags)
        return run.info.run_id, run.info.start_time
    info = _post_once(uri, "runs/create", {
        "experiment_id": experiment_id, "run_name": name, "start_time": int(time.time() * 1000),
        "user_id": tags.get("mlflow.user", "unknown"),
        "tags": [{"key": k, "value": v} for k, v in tags.items()]}, timeout=60)["run"]["info"]
    return info["run_id"], int(info["start_time"])


def _set_tag_now(uri: str, run_id: str, key: str, value: str, *, timeout: float) -> None:
    """One tag, now, with a short timeout and no retries (heartbeats must not hang behind a dead server)."""
    if not is_http(uri):
        client(uri).set_tag(run_id, key, value)
        return
    _post_once(uri, "runs/set-tag", {"run_id": run_id, "key": key, "value": value}, timeout=timeout)


def _save_manifold(reducer, folder: str) -> str:
    """A fitted manifold stage as a file for the served model: scikit-learn's PCA with skops; UMAP,
    whose state holds numba structures that skops cannot write, with joblib (a pickle: load only
    models from a store you trust)."""
    if type(reducer).__module__.startswith("sklearn"):
        import skops.io

        path = os.path.join(folder, "manifold.skops")
        skops.io.dump(reducer, path)
    else:
        import joblib

        path = os.path.join(folder, "manifold.joblib")
        joblib.dump(reducer, path)
    return path


def _backend(config) -> str:
    """Keras' backend for trials that train; 'none' for raw pixels (no Keras import for those)."""
    if config.model.kind == "none":
        return "none"
    from fmnist_cluster.quiet import quiet_import

    return quiet_import("keras").backend.backend()


def _requirements(config) -> list[str]:
    """Pinned requirements of the logged models (explicit: MLflow's inference loads the model again)."""
    from importlib.metadata import version

    pkgs = ["mlflow", "scikit-learn", "skops", "numpy", "pandas"]
    backend = _backend(config)
    if backend != "none":
        pkgs += ["keras", {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}[backend]]
    if config.manifold.kind == "umap":
        pkgs += ["umap-learn", "joblib", "numba"]
    return [f"{p}=={version(p)}" for p in pkgs]
