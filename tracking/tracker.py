"""Driver-side verbs on one tracking store: check it, create the experiment once, read what is
finished or claimed (the record that makes sweeps resumable and safe to start twice), open and close
a sweep's parent run, and read finished trial runs for reports and exports."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from typing import Any

from tracking import claims
from tracking.delivery import Delivery
from tracking.store import (PARENT_TAG, TRIAL_KEY, TrackingError, TrackingRefused, artifact_root, check_server, client,
                            cpu_id, cpu_model, env_float, git_commit, is_http, is_local, log_metrics, log_params,
                            resolve_uri, search, server_message)
from tracking.trial_logger import RunContext, run_record

TRIAL_FILTER = "tags.`fmc.role` = 'trial'"


class Tracker:
    """Driver-side verbs on one tracking store.

    The claim TTL is :func:`tracking.claims.claim_ttl` of the outage bound
    (``FMC_TRACKING_OUTAGE_SECONDS``, default 600 s), at least ``FMC_CLAIM_TTL_SECONDS``.
    """

    def __init__(self, uri: str | None = None):
        self.uri = resolve_uri(uri)
        self.outage_seconds = env_float("FMC_TRACKING_OUTAGE_SECONDS", 600.0)
        self.claim_ttl = claims.claim_ttl(self.outage_seconds, env_float("FMC_CLAIM_TTL_SECONDS", 0.0))
        self.claim_settle = env_float("FMC_CLAIM_SETTLE_SECONDS", 2.0)

    def check(self) -> None:
        """Fail with TrackingError before anything starts if the store cannot be used."""
        if is_http(self.uri):
            check_server(self.uri)
        try:
            self.client = client(self.uri)
            self.client.search_experiments(max_results=1)  # creates / migrates a SQLite store once, here
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all mean "unusable store"
            raise TrackingError(f"tracking store {self.uri} is unusable: {str(err).splitlines()[0]}") from None

    @property
    def _c(self):
        if not hasattr(self, "client"):
            self.client = client(self.uri)
        return self.client

    def context(self, experiment_id: str, parent_run_id: str | None, sweep: str, commit: str | None = None,
                rerun_since: int | None = None) -> RunContext:
        return RunContext(self.uri, experiment_id, parent_run_id, sweep, commit, self.outage_seconds,
                          self.claim_ttl, self.claim_settle, rerun_since)

    def experiment(self, name: str, *, create: bool = True) -> str | None:
        """Id of experiment ``name``, created here (on the driver, once) if missing and ``create``."""
        exp = self._c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        # an absolute artifact root next to the DB, not wherever a worker runs
        location = artifact_root(self.uri).as_uri() if is_local(self.uri) else None
        try:
            return self._c.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by another driver
            exp = self._c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def runs(self, experiment_id: str, filter_string: str = "") -> list:
        """All runs of an experiment matching ``filter_string`` (every page)."""
        return search(self._c, experiment_id, filter_string)

    def finished_keys(self, experiment_id: str) -> dict[str, str]:
        """trial key -> run id of every FINISHED trial run: the record of what a sweep need not redo."""
        runs = self.runs(experiment_id, f"attributes.status = 'FINISHED' and {TRIAL_FILTER}")
        return {r.data.tags[TRIAL_KEY]: r.info.run_id for r in runs if TRIAL_KEY in r.data.tags}

    def claimed_keys(self, experiment_id: str) -> dict[str, str]:
        """trial key -> who holds it, for trials that a live sweep is running now. RUNNING runs whose
        claim expired (their sweep died) are closed as KILLED here, so that they neither claim nor linger."""
        running = [run_record(r) for r in self.runs(experiment_id, f"attributes.status = 'RUNNING' and {TRIAL_FILTER}")]
        live, expired = claims.live_and_expired(running, ttl=self.claim_ttl, now=time.time())
        for run, why in expired:
            self._c.set_tag(run["run_id"], "fmc.error", why)
            self._c.set_terminated(run["run_id"], "KILLED")
        return live

    def start_parent(self, experiment_id: str, sweep_name: str, *, source: str, params: dict[str, Any],
                     rerun: bool = False, tags: dict[str, str] | None = None) -> RunContext:
        """Open the parent run of one sweep invocation and return the context its trials log under.
        With ``rerun`` the trials do not yield to runs finished before this one started."""
        commit = git_commit()
        tags = {"fmc.role": "sweep", "fmc.sweep": sweep_name, "fmc.host": socket.gethostname(), "fmc.cpu": cpu_model(),
                "fmc.cpu_id": cpu_id(), **({"mlflow.source.git.commit": commit} if commit else {}), **(tags or {})}
        run = self._c.create_run(experiment_id, run_name=f"{sweep_name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                 tags=tags)
        run_id = run.info.run_id
        try:
            self._c.log_text(run_id, source, "sweep.yaml")
            log_params(self._c, run_id, {**params, "rerun": rerun})
        except Exception as err:  # noqa: BLE001 - e.g. the artifact store is full: no trial could log either
            message = f"tracking store {self.uri} refused the sweep's parent run: {server_message(err)}"
            with contextlib.suppress(Exception):  # close what was opened, if the store still lets us
                self._c.set_tag(run_id, "fmc.error", message)
                self._c.set_terminated(run_id, "FAILED")
            raise TrackingRefused(message) from None
        return self.context(experiment_id, run_id, sweep_name, commit,
                            rerun_since=run.info.start_time if rerun else None)

    def end_parent(self, ctx: RunContext, status: str, *, table: dict[str, list] | None = None,
                   figures: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                   errors: dict[str, str] | None = None) -> list[str]:
        """Close the parent run (waiting out a short outage). Children still RUNNING (their process
        died) are closed: FAILED with their trial's error when ``errors`` (trial name -> one line) has
        one, else KILLED. The summary, best scores and chart are logged as far as the store lets; the
        run is closed in any case. Returns what the store refused (one line each)."""
        delivery = Delivery(self.uri, ctx.outage_seconds)
        errors = errors or {}

        def close_children():
            for run in self.runs(ctx.experiment_id, f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' "
                                                    "and attributes.status = 'RUNNING'"):
                error = errors.get(run.info.run_name)
                self._c.set_tag(run.info.run_id, "fmc.error", error or "interrupted")
                self._c.set_terminated(run.info.run_id, "FAILED" if error else "KILLED")

        parts = [("the trials left open", close_children)]
        if table:
            parts.append(("summary.json", lambda: self._c.log_table(ctx.parent_run_id, table, "summary.json")))
        if metrics:
            parts.append(("the best scores", lambda: log_metrics(self._c, ctx.parent_run_id, metrics)))
        parts += [(f"plots/{name}.png", lambda fig=fig, name=name: self._c.log_figure(
            ctx.parent_run_id, fig, f"plots/{name}.png")) for name, fig in (figures or {}).items()]
        refused = []
        for what, call in parts:
            try:
                delivery.send(what, call, wait=True)
            except TrackingRefused as err:
                refused.append(str(err))
        delivery.send("the end of the sweep's parent run",
                      lambda: self._c.set_terminated(ctx.parent_run_id, status), wait=True)
        return refused

    def register_best(self, name: str, runs: list[dict[str, Any]], metric: str, mode: str,
                      sweep_run_id: str | None = None) -> str:
        """Register the clusterer model of the best of ``runs`` (finished trial runs, as from
        :meth:`trial_runs`) by ``metric`` as a new version of registered model ``name`` and point its
        alias ``best`` at it, unless the version ``best`` points at already scores as well on the
        same metric (ties keep the older). Returns one line saying what was done."""
        import mlflow
        from mlflow.exceptions import MlflowException

        sign = 1 if mode == "max" else -1
        scored = [r for r in runs if metric in r["metrics"]]
        if not scored:
            return f"no finished trial has {metric}: nothing registered as {name}@best"
        best = max(scored, key=lambda r: (sign * r["metrics"][metric], -r["start_time"]))
        value, clusterer = best["metrics"][metric], metric.split("_", 1)[0]
        mlflow.set_tracking_uri(self.uri)
        found = mlflow.search_logged_models(
            experiment_ids=[self._c.get_run(best["run_id"]).info.experiment_id], output_format="list",
            filter_string=f"source_run_id = '{best['run_id']}' AND name = '{clusterer}_clusterer'")
        model = next((m for m in found if str(getattr(m.status, "value", m.status)) == "READY"), None)
        if model is None:
            return (f"best trial {best['name']} by {metric} has no {clusterer} model (logged with --no-models?): "
                    f"nothing registered as {name}@best")
        try:
            current = self._c.get_model_version_by_alias(name, "best")
        except MlflowException:  # no such model or alias yet
            current = None
        if current is not None and current.tags.get("fmc.metric") == metric:
            held = float(current.tags.get("fmc.value", "nan"))
            if current.run_id == best["run_id"] or not sign * value > sign * held:
                return (f"{name}@best stays version {current.version} ({current.tags.get('fmc.trial')}, {metric} "
                        f"{held:.4f}; this sweep's best: {best['name']}, {value:.4f})")
        tags = {"fmc.metric": metric, "fmc.mode": mode, "fmc.value": repr(value), "fmc.trial": best["name"],
                "fmc.trial_key": best["tags"].get(TRIAL_KEY, ""), "fmc.clusterer": clusterer}
        if sweep_run_id:
            tags["fmc.sweep_run"] = sweep_run_id
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow's own "Created version" lines: fmc says it below
            version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
        self._c.set_registered_model_alias(name, "best", version.version)
        return (f"registered {best['name']}'s {clusterer} clusterer ({metric} {value:.4f}) as {name} version "
                f"{version.version}: models:/{name}@best")

    def trial_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        """FINISHED trial runs as plain dicts {name, run_id, start_time, params, metrics, tags} for
        reports and exports."""
        runs = self.runs(experiment_id, f"attributes.status = 'FINISHED' and {TRIAL_FILTER}")
        return [{"name": r.info.run_name, "run_id": r.info.run_id, "start_time": r.info.start_time,
                 "end_time": r.info.end_time, "params": dict(r.data.params), "metrics": dict(r.data.metrics),
                 "tags": dict(r.data.tags)} for r in runs]
