"""fmc's one adapter to MLflow. The rest of fmc calls these verbs and never imports ``mlflow``.

Driver side (:class:`Tracker`): resolve and check the store, create the experiment once, find the
trials already finished or claimed by a live sweep (the record that makes sweeps resumable and safe to
start twice), open and close the sweep's parent run. Trial side (:class:`TrialLogger`, built from a
picklable :class:`RunContext`): one nested child run per trial, claimed before the trial starts,
per-epoch curves, scores, confusion matrices, figures and models, and an honest end status (FINISHED,
FAILED with the error, KILLED when interrupted).

A tracking server that goes away does not lose a trial: what cannot be logged is kept in order and
delivered when the server answers again; only an outage longer than ``RunContext.outage_seconds``
(``FMC_TRACKING_OUTAGE_SECONDS``, default 600) fails the trial, with :class:`TrackingOutage`.

Why not Ray's MLflow integration: it cannot nest runs, logs artifacts from the driver only, leaves
crashed runs FINISHED and duplicates runs after a restore.
"""

from __future__ import annotations

import base64
import collections
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # next to mlflow.db for the embedded store
TRIAL_KEY = "fmc.trial_key"
PARENT_TAG = "mlflow.parentRunId"
HEARTBEAT = "fmc.heartbeat"  # unix seconds, refreshed while a trial runs: a claim without it expires
CLAIM = "fmc.claim"  # pending, then won (the trial runs) on the child run that claims a trial key
SCORE_METRICS = [f"{c}_{s}" for c in ("kmeans", "gmm") for s in ("acc", "acc_majority", "nmi", "ari")]


class TrackingError(Exception):
    """The tracking store is unreachable or misconfigured; the message says which and how to fix it."""


class TrackingOutage(TrackingError):
    """The tracking server stayed unreachable longer than the outage bound; the trial can be resumed."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise TrackingError(f"{name}={os.environ[name]!r} is not a number of seconds") from None


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
    # MLflow's own retries first (a few seconds); fmc's buffer takes over for longer outages.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # fmc prints the run itself
    os.environ.pop("MLFLOW_RUN_ID", None)  # would silently override our parent/child runs


def _client(uri: str):
    _quiet_env()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def is_transient(err: BaseException) -> bool:
    """An error that a later attempt can cure: the server is down, restarting or overloaded, or a
    SQLite store is locked by another writer."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(err)
    return (text.startswith("API request to") and "failed with" in text) or "database is locked" in text \
        or any(f"{code} Server Error" in text or f"status code {code}" in text for code in (502, 503, 504))


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


def cpu_model() -> str:
    """The CPU a trial runs on ('AMD EPYC', 'Intel(R) Xeon(R) Platinum 8370C CPU @ 2.80GHz'): the same
    code and seed train differently on different CPU kinds, so every run records its own."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
    """What a trial needs to log into its sweep's parent run; small and picklable (sent to Ray workers).

    outage_seconds : how long a trial waits for an unreachable server before it fails.
    claim_ttl : a RUNNING trial run whose heartbeat is older than this no longer claims its trial.
    claim_settle : seconds between writing a claim and reading the others (longer than a request takes).
    """

    uri: str
    experiment_id: str
    parent_run_id: str | None
    sweep: str
    commit: str | None = None
    outage_seconds: float = 600.0
    claim_ttl: float = 300.0
    claim_settle: float = 2.0


class Delivery:
    """Calls to the tracking store, in order, that survive an outage.

    ``send(call)`` runs what is queued, then ``call``; when the store is unreachable the calls stay
    queued (training goes on) and are retried at a later ``send``, once a quick probe of the server
    (``/health``, at most every ``retry_every`` seconds) answers: a trial does not pay MLflow's own
    retries at every epoch of an outage. ``send(call, wait=True)`` and ``drain()`` block until
    everything is delivered, and raise :class:`TrackingOutage` once the store has been unreachable
    for ``outage_seconds``.
    """

    def __init__(self, uri: str, outage_seconds: float, retry_every: float = 5.0):
        self.uri, self.outage_seconds, self.retry_every = uri, outage_seconds, retry_every
        self.queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self.down_since: float | None = None
        self.last_probe = 0.0
        self.delivered_late = 0  # calls that went through only after an outage
        self.outage_seconds_total = 0.0

    def send(self, what: str, call: Callable[[], Any], *, wait: bool = False) -> Any:
        self.queue.append((what, call))
        return self._run(wait)

    def drain(self) -> None:
        self._run(True)

    def _run(self, wait: bool) -> Any:
        value = None
        while self.queue:
            what, call = self.queue[0]
            if self.down_since is not None and not self._may_try():
                if time.monotonic() - self.down_since > self.outage_seconds:
                    raise self._outage(what)
                if not wait:
                    return None  # keep buffering; training goes on
                time.sleep(1.0)
                continue
            try:
                value = call()
            except Exception as err:  # noqa: BLE001 - sorted by is_transient below
                if not is_transient(err):
                    raise
                if self.down_since is None:
                    self.down_since = self.last_probe = time.monotonic()
                    print(f"fmc: tracking store {self.uri} unreachable ({str(err).splitlines()[0][:200]}); "
                          f"buffering, will retry for {self.outage_seconds:.0f} s", file=sys.stderr, flush=True)
                if time.monotonic() - self.down_since > self.outage_seconds:
                    raise self._outage(what) from None
                if not wait:
                    return None
                continue
            self.queue.popleft()
            if self.down_since is not None:
                self.delivered_late += 1
                if not self.queue:
                    lasted = time.monotonic() - self.down_since
                    print(f"fmc: tracking store {self.uri} reachable again after {lasted:.0f} s; "
                          "buffered calls delivered", file=sys.stderr, flush=True)
                    self.outage_seconds_total += lasted
                    self.down_since = None
        return value

    def _may_try(self) -> bool:
        """During an outage: probe the server at most every ``retry_every`` seconds; the calls are tried
        again (with MLflow's own retries) only once it answers."""
        now = time.monotonic()
        if now - self.last_probe < self.retry_every:
            return False
        self.last_probe = now
        return self._answers()

    def _answers(self) -> bool:
        """Whether the server answers its health check now (a local store always does)."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def _outage(self, what: str) -> TrackingOutage:
        return TrackingOutage(
            f"MLflow tracking store {self.uri} unreachable for more than {self.outage_seconds:.0f} s "
            f"(FMC_TRACKING_OUTAGE_SECONDS) while logging {what}; fmc stopped waiting. Run the same "
            "`fmc sweep` again when the server is back: finished trials are kept.")


class Tracker:
    """Driver-side verbs on one tracking store."""

    def __init__(self, uri: str | None = None):
        self.uri = resolve_uri(uri)
        self.outage_seconds = _env_float("FMC_TRACKING_OUTAGE_SECONDS", 600.0)
        self.claim_ttl = _env_float("FMC_CLAIM_TTL_SECONDS", 300.0)
        self.claim_settle = _env_float("FMC_CLAIM_SETTLE_SECONDS", 2.0)

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

    def context(self, experiment_id: str, parent_run_id: str | None, sweep: str, commit: str | None = None) -> RunContext:
        return RunContext(self.uri, experiment_id, parent_run_id, sweep, commit, self.outage_seconds,
                          self.claim_ttl, self.claim_settle)

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
        return _search(self._c, experiment_id, filter_string)

    def finished_keys(self, experiment_id: str) -> dict[str, str]:
        """trial key -> run id of every FINISHED trial run: the record of what a sweep need not redo."""
        runs = self.runs(experiment_id, "attributes.status = 'FINISHED' and tags.`fmc.role` = 'trial'")
        return {r.data.tags[TRIAL_KEY]: r.info.run_id for r in runs if TRIAL_KEY in r.data.tags}

    def claimed_keys(self, experiment_id: str) -> dict[str, str]:
        """trial key -> who holds it, for trials that a live sweep is running now (a RUNNING trial run
        whose heartbeat is fresh). RUNNING runs whose heartbeat expired (their sweep died) are closed
        as KILLED here, so that they neither claim nor linger."""
        claimed = {}
        for run in self.runs(experiment_id, "attributes.status = 'RUNNING' and tags.`fmc.role` = 'trial'"):
            tags = run.data.tags
            age = heartbeat_age(tags)
            if age is not None and age <= self.claim_ttl:
                claimed[tags.get(TRIAL_KEY, "")] = (f"run {run.info.run_id[:8]} of sweep {tags.get('fmc.sweep')!r} on "
                                                    f"{tags.get('fmc.host', '?')}, heartbeat {age:.0f} s ago")
            else:
                self._c.set_tag(run.info.run_id, "fmc.error", "claim expired: no heartbeat for "
                                f"{'ever' if age is None else f'{age:.0f} s'} (its sweep stopped)")
                self._c.set_terminated(run.info.run_id, "KILLED")
        return claimed

    def start_parent(self, experiment_id: str, sweep_name: str, *, source: str, params: dict[str, Any]) -> RunContext:
        """Open the parent run of one sweep invocation and return the context its trials log under."""
        commit = git_commit()
        tags = {"fmc.role": "sweep", "fmc.sweep": sweep_name, "fmc.host": socket.gethostname(), "fmc.cpu": cpu_model(),
                **({"mlflow.source.git.commit": commit} if commit else {})}
        run = self._c.create_run(experiment_id, run_name=f"{sweep_name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                 tags=tags)
        run_id = run.info.run_id
        self._c.log_text(run_id, source, "sweep.yaml")
        _log_params(self._c, run_id, params)
        return self.context(experiment_id, run_id, sweep_name, commit)

    def end_parent(self, ctx: RunContext, status: str, *, table: dict[str, list] | None = None,
                   figures: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> None:
        """Close the parent run (waiting out a short outage); children still RUNNING (their process was
        killed) become KILLED."""
        delivery = Delivery(self.uri, ctx.outage_seconds)

        def close():
            for run in self.runs(ctx.experiment_id, f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' "
                                                    "and attributes.status = 'RUNNING'"):
                self._c.set_tag(run.info.run_id, "fmc.error", "interrupted")
                self._c.set_terminated(run.info.run_id, "KILLED")
            if table:
                self._c.log_table(ctx.parent_run_id, table, "summary.json")
            if metrics:
                _log_metrics(self._c, ctx.parent_run_id, metrics)
            for name, fig in (figures or {}).items():
                self._c.log_figure(ctx.parent_run_id, fig, f"plots/{name}.png")
            self._c.set_terminated(ctx.parent_run_id, status)

        delivery.send("the sweep's parent run", close, wait=True)

    def trial_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        """FINISHED trial runs as plain dicts {name, params, metrics, tags} for reports."""
        runs = self.runs(experiment_id, "attributes.status = 'FINISHED' and tags.`fmc.role` = 'trial'")
        return [{"name": r.info.run_name, "run_id": r.info.run_id, "params": dict(r.data.params),
                 "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in runs]


def _search(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def heartbeat_age(tags: dict[str, str]) -> float | None:
    """Seconds since a trial run's last heartbeat; None when it has none."""
    try:
        return max(0.0, time.time() - float(tags[HEARTBEAT]))
    except (KeyError, ValueError):
        return None


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def _log_metrics(client, run_id: str, values: dict[str, float], step: int = 0, timestamp: int | None = None) -> None:
    from mlflow.entities import Metric

    now = timestamp or int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


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
                 tags: dict[str, str] | None = None):
        self.ctx, self.name, self.config, self.log_models = ctx, name, config, log_models
        self.extra_tags = tags or {}
        self.client = _client(ctx.uri)
        self.delivery = Delivery(ctx.uri, ctx.outage_seconds)
        self.run_id: str | None = None
        self.finished = False

    # ------------------------------------------------------------------ start: run and claim
    def start(self, *, claim: bool = False) -> str | None:
        """Create the child run. With ``claim``, first make sure no other sweep runs or ran this trial:
        returns why not (and leaves no run behind) when one does, else None."""
        tags = {"fmc.role": "trial", "fmc.trial": self.name, "fmc.sweep": self.ctx.sweep,
                TRIAL_KEY: self.config.key(), "fmc.keras_backend": _backend(self.config),
                "fmc.host": socket.gethostname(), "fmc.python": platform.python_version(), "fmc.cpu": cpu_model(),
                "fmc.model": self.config.model.label(), HEARTBEAT: str(int(time.time())), **self.extra_tags}
        if claim:
            tags[CLAIM] = "pending"
        if self.ctx.parent_run_id:
            tags[PARENT_TAG] = self.ctx.parent_run_id
        if self.ctx.commit:
            tags["mlflow.source.git.commit"] = self.ctx.commit
        run = self.delivery.send("the trial's run", lambda: self.client.create_run(
            self.ctx.experiment_id, run_name=self.name, tags=tags), wait=True)
        self.run_id = run.info.run_id
        if claim:
            holder = self.delivery.send("the trial's claim", self._claim, wait=True)
            if holder:
                self.delivery.send("withdrawing the claim", lambda: self.client.delete_run(self.run_id), wait=True)
                self.run_id, self.finished = None, True
                return holder
        rid = self.run_id
        self.delivery.send("params", lambda: _log_params(self.client, rid, self.config.flat()), wait=True)
        self.delivery.send("config.json", lambda: self.client.log_dict(
            rid, self.config.model_dump(mode="json"), "config.json"), wait=True)
        return None

    def _claim(self) -> str | None:
        """Who holds this trial if not us. Claims are child runs with the trial key: a FINISHED one or
        a won one holds it; among pending ones the earliest (start time, run id) wins. Both sides of a
        race read both claims (``claim_settle`` apart), so exactly one of them wins."""
        time.sleep(self.ctx.claim_settle)
        key = self.config.key()
        runs = [r for r in _search(self.client, self.ctx.experiment_id, f"tags.`{TRIAL_KEY}` = '{key}'")
                if r.info.status in ("RUNNING", "FINISHED")]
        mine = next((r for r in runs if r.info.run_id == self.run_id), None)
        others = []
        for r in runs:
            if r.info.run_id == self.run_id:
                continue
            if r.info.status == "FINISHED":
                return f"finished already in run {r.info.run_id[:8]} (sweep {r.data.tags.get('fmc.sweep')!r})"
            age = heartbeat_age(r.data.tags)
            if r.info.status == "RUNNING" and age is not None and age <= self.ctx.claim_ttl:
                others.append(r)
        for r in others:
            if r.data.tags.get(CLAIM, "won") == "won":
                return (f"claimed by run {r.info.run_id[:8]} of sweep {r.data.tags.get('fmc.sweep')!r} on "
                        f"{r.data.tags.get('fmc.host', '?')}")
        order = sorted(others + ([mine] if mine else []), key=lambda r: (r.info.start_time, r.info.run_id))
        if mine is not None and order[0].info.run_id != self.run_id:
            return f"claimed at the same moment by run {order[0].info.run_id[:8]} on {order[0].data.tags.get('fmc.host', '?')}"
        self.client.set_tag(self.run_id, CLAIM, "won")
        return None

    def __enter__(self) -> TrialLogger:
        self.start()
        return self

    # ------------------------------------------------------------------ during the trial
    def heartbeat(self) -> None:
        """Refresh the claim (called every few seconds by :class:`Heartbeat`); never raises."""
        if self.run_id and not self.finished:
            try:
                _client(self.ctx.uri).set_tag(self.run_id, HEARTBEAT, str(int(time.time())))
            except Exception:  # noqa: BLE001 - an outage: the next beat tries again
                pass

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Per-epoch curves (step = epoch): loss, val_loss, epoch_seconds. Kept for later during an outage."""
        rid, stamp = self.run_id, int(time.time() * 1000)
        self.delivery.send(f"epoch {epoch}", lambda: _log_metrics(self.client, rid, values, step=epoch, timestamp=stamp))

    def eval(self, epoch: int, scores: dict[str, float]) -> None:
        """Clustering scores of the codes during training (step = epoch)."""
        rid, stamp = self.run_id, int(time.time() * 1000)
        self.delivery.send(f"scores at epoch {epoch}",
                           lambda: _log_metrics(self.client, rid, scores, step=epoch, timestamp=stamp))

    def result(self, result) -> None:
        """Scores, timings, confusion matrices, figures and models of a finished trial. The final
        scores are logged at step = epochs, after any ``eval_every`` scores, so they are the latest."""
        t = time.perf_counter()
        rid, c, send = self.run_id, self.client, self.delivery.send
        step = result.config.epochs
        send("scores", lambda: _log_metrics(c, rid, {**result.metrics, **result.timings}, step=step), wait=True)
        send("trial.json", lambda: c.log_dict(rid, {"info": result.info, "history": result.history,
                                                    "evals": result.evals}, "trial.json"), wait=True)
        for key, matrix in result.confusion.items():
            body = {"rows": "true label", "columns": "assigned label", "matrix": matrix.tolist()}
            send(f"confusion/{key}.json", lambda body=body, key=key: c.log_dict(rid, body, f"confusion/{key}.json"),
                 wait=True)
        for key, fig in result.figures.items():
            path = f"{'confusion' if key.startswith('confusion_') else 'plots'}/{key.removeprefix('confusion_')}.png"
            send(path, lambda fig=fig, path=path: c.log_figure(rid, fig, path), wait=True)
        if self.log_models:
            send("models", lambda: self._log_models(result), wait=True)
        seconds = time.perf_counter() - t
        send("logging_seconds", lambda: c.log_metric(rid, "logging_seconds", seconds), wait=True)

    def _log_models(self, result) -> None:
        import logging

        import mlflow

        from fmnist_cluster.quiet import verbose

        # MLflow warns on every model about what fmc decides on purpose (no signature: 28x28 and 784-pixel
        # inputs both work; no pip in a uv environment)
        logging.getLogger("mlflow").setLevel(logging.WARNING if verbose() else logging.ERROR)
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
            if "manifold" in result.models:
                artifacts["manifold"] = _save_manifold(result.models["manifold"], tmp)
            for name in result.config.clusterers:
                import skops.io

                path = os.path.join(tmp, f"{name}.skops")  # skops: no arbitrary unpickling on load
                skops.io.dump(result.models[name], path)
                mlflow.pyfunc.log_model(name=f"{name}_clusterer", python_model=code,
                                        artifacts={**artifacts, "clusterer": path}, pip_requirements=reqs,
                                        tags={"fmc.trial": self.name, "fmc.clusterer": name})

    # ------------------------------------------------------------------ end
    def finish(self, error: BaseException | None = None, tb=None) -> None:
        """Deliver what is buffered and end the run: FINISHED, or FAILED / KILLED with the error."""
        if self.finished or self.run_id is None:
            return
        self.finished = True
        rid = self.run_id
        if error is None:
            self.delivery.drain()
            if self.delivery.delivered_late:  # what an outage cost this trial, on its own record
                late = {"tracking_outage_seconds": self.delivery.outage_seconds_total,
                        "tracking_late_calls": self.delivery.delivered_late}
                self.delivery.send("outage figures", lambda: _log_metrics(self.client, rid, late), wait=True)
            self.delivery.send("the end of the run", lambda: self.client.set_terminated(rid, "FINISHED"), wait=True)
            return
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        message = f"{type(error).__name__}: {error}"
        text = "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))
        if isinstance(error, TrackingOutage):  # the store is gone: nothing more can be recorded
            return
        try:
            self.delivery.drain()
            self.delivery.send("the error", lambda: (self.client.set_tag(rid, "fmc.error", message[:4000]),
                                                     self.client.log_text(rid, text, "error/traceback.txt")), wait=True)
        finally:
            self.delivery.send("the end of the run", lambda: self.client.set_terminated(
                rid, "KILLED" if interrupted else "FAILED"), wait=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish(exc, tb)
        return False


class Heartbeat:
    """A thread that refreshes the claims of running trials every ``every`` seconds."""

    def __init__(self, loggers: list[TrialLogger], every: float = 30.0):
        self.loggers, self.every = loggers, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fmc-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            for log in self.loggers:
                log.heartbeat()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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
        pkgs += ["umap-learn", "joblib"]
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
