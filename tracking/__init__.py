"""fmc's one adapter to MLflow. The rest of fmc calls these verbs and never imports ``mlflow``.

Driver side (:class:`Tracker`): resolve and check the store, create the experiment once, find the
trials already finished (the record that makes sweeps resumable), open and close the sweep's parent
run. Trial side (:class:`TrialLogger`, built from a picklable :class:`RunContext`): one nested child
run per trial, per-epoch curves, scores, confusion matrices, figures and models, and an honest end
status (FINISHED, FAILED with the error, KILLED when interrupted).

Why not Ray's MLflow integration: it cannot nest runs, logs artifacts from the driver only, leaves
crashed runs FINISHED and duplicates runs after a restore.
"""

from __future__ import annotations

import base64
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # next to mlflow.db for the embedded store
TRIAL_KEY = "fmc.trial_key"
PARENT_TAG = "mlflow.parentRunId"
SCORE_METRICS = [f"{c}_{s}" for c in ("kmeans", "gmm") for s in ("acc", "acc_majority", "nmi", "ari")]


class TrackingError(Exception):
    """The tracking store is unreachable or misconfigured; the message says which and how to fix it."""


def resolve_uri(uri: str | None = None) -> str:
    """``uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``; relative SQLite paths made absolute
    (Ray trials run in other working directories)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare folder path: MLflow's file store, deprecated; be explicit
        raise TrackingError(f"tracking URI {uri!r}: use sqlite:///path/mlflow.db or http(s)://host:port")
    return uri


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _quiet_env() -> None:
    # Fail fast instead of MLflow's minutes of retries when a server is down; keep logs readable.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.pop("MLFLOW_RUN_ID", None)  # would silently override our parent/child runs


def _client(uri: str):
    _quiet_env()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the server at ``uri`` answers an authenticated API call."""
    base = uri.rstrip("/")
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        body = err.read(300).decode(errors="replace")
        hint = {401: "credentials missing or wrong: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                403: "refused: not allowed for this user or host (server's --allowed-hosts?)"}.get(err.code, "")
        raise TrackingError(f"MLflow server {uri} answered HTTP {err.code}: {hint or body}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow server {uri} is unreachable ({reason}); start it or fix "
                            "--tracking-uri / MLFLOW_TRACKING_URI") from None


def git_commit() -> str | None:
    """The commit of fmc's checkout, when it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


@dataclass(frozen=True)
class RunContext:
    """What a trial needs to log into its sweep's parent run; small and picklable (sent to Ray workers)."""

    uri: str
    experiment_id: str
    parent_run_id: str | None
    sweep: str
    commit: str | None = None


class Tracker:
    """Driver-side verbs on one tracking store."""

    def __init__(self, uri: str | None = None):
        self.uri = resolve_uri(uri)

    def check(self) -> None:
        """Fail with TrackingError before anything starts if the store cannot be used."""
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        try:
            self.client = _client(self.uri)
            self.client.search_experiments(max_results=1)  # creates / migrates a SQLite store once, here
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all mean "unusable store"
            raise TrackingError(f"tracking store {self.uri} is unusable: {str(err).splitlines()[0]}") from None

    @property
    def _c(self):
        if not hasattr(self, "client"):
            self.client = _client(self.uri)
        return self.client

    def experiment(self, name: str, *, create: bool = True) -> str | None:
        """Id of experiment ``name``, created here (on the driver, once) if missing and ``create``."""
        exp = self._c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        location = None
        if _is_local(self.uri):  # an absolute artifact root next to the DB, not wherever a worker runs
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR).as_uri()
        try:
            return self._c.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by another driver
            exp = self._c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def runs(self, experiment_id: str, filter_string: str = "") -> list:
        """All runs of an experiment matching ``filter_string`` (every page)."""
        runs, token = [], None
        while True:
            page = self._c.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                       page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def finished_keys(self, experiment_id: str) -> dict[str, str]:
        """trial key -> run id of every FINISHED trial run: the record of what a sweep need not redo."""
        runs = self.runs(experiment_id, "attributes.status = 'FINISHED' and tags.`fmc.role` = 'trial'")
        return {r.data.tags[TRIAL_KEY]: r.info.run_id for r in runs if TRIAL_KEY in r.data.tags}

    def start_parent(self, experiment_id: str, sweep_name: str, *, source: str, params: dict[str, Any]) -> RunContext:
        """Open the parent run of one sweep invocation and return the context its trials log under."""
        commit = git_commit()
        tags = {"fmc.role": "sweep", "fmc.sweep": sweep_name, "fmc.host": socket.gethostname(),
                **({"mlflow.source.git.commit": commit} if commit else {})}
        run = self._c.create_run(experiment_id, run_name=f"{sweep_name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                 tags=tags)
        run_id = run.info.run_id
        self._c.log_text(run_id, source, "sweep.yaml")
        _log_params(self._c, run_id, params)
        return RunContext(self.uri, experiment_id, run_id, sweep_name, commit)

    def end_parent(self, ctx: RunContext, status: str, *, table: dict[str, list] | None = None,
                   figures: dict[str, Any] | None = None) -> None:
        """Close the parent run; children still RUNNING (their process was killed) become KILLED."""
        for run in self.runs(ctx.experiment_id, f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' "
                                                "and attributes.status = 'RUNNING'"):
            self._c.set_tag(run.info.run_id, "fmc.error", "interrupted")
            self._c.set_terminated(run.info.run_id, "KILLED")
        if table:
            self._c.log_table(ctx.parent_run_id, table, "summary.json")
        for name, fig in (figures or {}).items():
            self._c.log_figure(ctx.parent_run_id, fig, f"plots/{name}.png")
        self._c.set_terminated(ctx.parent_run_id, status)

    def trial_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        """FINISHED trial runs as plain dicts {name, params, metrics, tags} for reports."""
        runs = self.runs(experiment_id, "attributes.status = 'FINISHED' and tags.`fmc.role` = 'trial'")
        return [{"name": r.info.run_name, "run_id": r.info.run_id, "params": dict(r.data.params),
                 "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in runs]


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def _log_metrics(client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


class TrialLogger:
    """One trial's child run. Use as a context manager around the trial::

        with TrialLogger(ctx, name, config) as log:
            result = run_trial(config, on_epoch=log.epoch)
            log.result(result)

    Leaving by an exception ends the run FAILED (KILLED for an interrupt) with the error as tag
    ``fmc.error`` and the traceback as ``error/traceback.txt``, then re-raises.
    """

    def __init__(self, ctx: RunContext, name: str, config, *, log_models: bool = True):
        self.ctx, self.name, self.config, self.log_models = ctx, name, config, log_models
        self.client = _client(ctx.uri)
        self.run_id: str | None = None

    def __enter__(self) -> TrialLogger:
        tags = {"fmc.role": "trial", "fmc.trial": self.name, "fmc.sweep": self.ctx.sweep,
                TRIAL_KEY: self.config.key(), "fmc.keras_backend": _backend(self.config),
                "fmc.host": socket.gethostname(), "fmc.python": platform.python_version(),
                "fmc.model": self.config.model.label()}
        if self.ctx.parent_run_id:
            tags[PARENT_TAG] = self.ctx.parent_run_id
        if self.ctx.commit:
            tags["mlflow.source.git.commit"] = self.ctx.commit
        run = self.client.create_run(self.ctx.experiment_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        _log_params(self.client, self.run_id, self.config.flat())
        self.client.log_dict(self.run_id, self.config.model_dump(mode="json"), "config.json")
        return self

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Per-epoch curves (step = epoch): loss, val_loss, epoch_seconds."""
        _log_metrics(self.client, self.run_id, values, step=epoch)

    def result(self, result) -> None:
        """Scores, timings, confusion matrices, figures and models of a finished trial."""
        t = time.perf_counter()
        rid = self.run_id
        _log_metrics(self.client, rid, {**result.metrics, **result.timings})
        self.client.log_dict(rid, {"info": result.info, "history": result.history}, "trial.json")
        for key, matrix in result.confusion.items():
            self.client.log_dict(rid, {"rows": "true label", "columns": "assigned label",
                                       "matrix": matrix.tolist()}, f"confusion/{key}.json")
        for key, fig in result.figures.items():
            folder = "confusion" if key.startswith("confusion_") else "plots"
            self.client.log_figure(rid, fig, f"{folder}/{key.removeprefix('confusion_')}.png")
        if self.log_models:
            self._log_models(result)
        self.client.log_metric(rid, "logging_seconds", time.perf_counter() - t)

    def _log_models(self, result) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.ctx.uri)
        reqs = _requirements(result.config)
        code = str(Path(__file__).with_name("pyfunc_model.py"))
        with mlflow.start_run(run_id=self.run_id), tempfile.TemporaryDirectory() as tmp:
            artifacts = {}
            if "autoencoder" in result.models:
                import mlflow.keras

                mlflow.keras.log_model(result.models["autoencoder"], name="autoencoder", pip_requirements=reqs)
                artifacts["encoder"] = os.path.join(tmp, "encoder.keras")
                result.models["encoder"].save(artifacts["encoder"])
            for name in result.config.clusterers:
                import skops.io

                path = os.path.join(tmp, f"{name}.skops")  # skops: no arbitrary unpickling on load
                skops.io.dump(result.models[name], path)
                mlflow.pyfunc.log_model(name=f"{name}_clusterer", python_model=code,
                                        artifacts={**artifacts, "clusterer": path}, pip_requirements=reqs,
                                        tags={"fmc.trial": self.name, "fmc.clusterer": name})

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is None:
            return False
        if exc_type is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return False
        interrupted = issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        try:
            message = f"{exc_type.__name__}: {exc}"
            self.client.set_tag(self.run_id, "fmc.error", message[:4000])
            self.client.log_text(self.run_id, "".join(traceback.format_exception(exc_type, exc, tb)),
                                 "error/traceback.txt")
        finally:
            self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")
        return False


def _backend(config) -> str:
    """Keras' backend for trials that train; 'none' for raw pixels (no Keras import for those)."""
    if config.model.kind == "none":
        return "none"
    import keras

    return keras.backend.backend()


def _requirements(config) -> list[str]:
    """Pinned requirements of the logged models (explicit: MLflow's inference loads the model again)."""
    from importlib.metadata import version

    pkgs = ["mlflow", "scikit-learn", "skops", "numpy", "pandas"]
    backend = _backend(config)
    if backend != "none":
        pkgs += ["keras", {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}[backend]]
    return [f"{p}=={version(p)}" for p in pkgs]


def serve_ui(uri: str | None = None, *, host: str = "127.0.0.1", port: int = 0) -> subprocess.Popen:
    """Start ``mlflow ui`` on ``uri`` bound to loopback; port 0 picks a free one. Returns the process."""
    uri = resolve_uri(uri)
    if not port:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if _is_local(uri):
        cmd += ["--artifacts-destination", (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR).as_uri()]
    proc = subprocess.Popen(cmd)
    proc.url = f"http://{host}:{port}"
    return proc
