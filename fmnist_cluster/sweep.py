"""Run a sweep's trials on Ray Tune, each logged to MLflow through the ``tracking`` adapter.

The seam: the Ray trainable is a few lines around ``run_trial`` and ``TrialLogger``. The MLflow store
is the record of what finished (``fmc.trial_key``), so an interrupted sweep, run again anywhere
against the same store, runs only what is missing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_cluster.config import Sweep, Trial, TrialConfig

PROGRESS_COLUMNS = {"loss": "loss", "val_loss": "val_loss", "kmeans_acc": "km acc", "gmm_acc": "gmm acc",
                    "kmeans_nmi": "km nmi", "gmm_nmi": "gmm nmi"}


@dataclass
class TrialOutcome:
    name: str
    status: str  # FINISHED, FAILED, KILLED, SKIPPED (finished in an earlier invocation)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


@dataclass
class SweepOutcome:
    trials: list[TrialOutcome]
    interrupted: bool = False
    parent_run_id: str | None = None

    @property
    def failed(self) -> bool:
        return any(t.status == "FAILED" for t in self.trials)


def _trainable(param: dict, datasets: dict, ctx, log_models: bool) -> None:
    """Ray Tune function trainable: one trial, one child run."""
    from ray import tune

    from fmnist_cluster.trial import run_trial
    from tracking import TrialLogger

    name, config = param["trial"]["name"], TrialConfig(**param["trial"]["config"])
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))  # Ray sets it to the trial's CPUs
    data = datasets[(config.data.subset, config.data.seed)]

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        log.epoch(epoch, values)
        tune.report({**values, "epoch": epoch})

    with TrialLogger(ctx, name, config, log_models=log_models) as log:
        result = run_trial(config, data=data, threads=threads, on_epoch=on_epoch)
        log.result(result)
        from fmnist_cluster.plots import close

        close(result.figures)
    tune.report({**result.metrics, **result.timings, "run_id": log.run_id, "done": True})


FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "FMC_DATA_DIR")


def run_sweep(sweep: Sweep, trials: list[Trial], *, tracker, address: str | None = None,
              cpu: float | None = None, gpu: float | None = None, max_concurrent: int | None = None,
              data_dir: str | None = None, storage_path: str | None = None, log_models: bool = True,
              verbose: int = 1) -> SweepOutcome:
    """Run ``trials`` (those not finished yet) of ``sweep`` on Ray Tune; return what happened to each.

    The tracker must be checked and the experiment created by the caller; this opens the parent run,
    runs the trials, closes the parent (FINISHED, FAILED if a trial failed, KILLED if interrupted).
    """
    # Tune's classic reporter, so that the progress table shows our metric columns
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Under `uv run`, Ray would start workers with `uv run` in a copy of the working directory, which
    # is not a project: workers then never start. Workers use this interpreter's environment instead.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray import tune

    from fmnist_cluster.data import load_dataset

    exp_id = tracker.experiment(sweep.experiment)
    ctx = tracker.start_parent(exp_id, sweep.experiment, source=sweep.source,
                               params={"trials": len(trials), "resources.cpu": cpu or sweep.resources.cpu,
                                       "resources.gpu": gpu if gpu is not None else sweep.resources.gpu,
                                       "max_concurrent": max_concurrent or sweep.max_concurrent or "auto"})
    # Ctrl-C and SIGTERM both stop Tune cleanly: Tune handles SIGINT, so route SIGTERM to it.
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    outcome = SweepOutcome(trials=[], parent_run_id=ctx.parent_run_id)
    try:
        # One copy of each distinct dataset in Ray's object store, shared by every trial on a node.
        datasets = {}
        for t in trials:
            key = (t.config.data.subset, t.config.data.seed)
            if key not in datasets:
                datasets[key] = load_dataset(data_dir, seed=key[1], subset=key[0])
        if not ray.is_initialized():
            # Trials log to MLflow themselves: on a cluster they get this driver's MLflow credentials
            # (a local Ray's workers inherit them anyway).
            env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1,
                     configure_logging=True, logging_level="WARNING",
                     runtime_env={"env_vars": env_vars} if env_vars else None)
        resources = {"cpu": cpu or sweep.resources.cpu, "gpu": gpu if gpu is not None else sweep.resources.gpu}
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, datasets=datasets, ctx=ctx, log_models=log_models), resources)
        by_name = {t.name: t for t in trials}
        reporter = tune.CLIReporter(metric_columns=PROGRESS_COLUMNS, max_report_frequency=30,
                                    parameter_columns=[], print_intermediate_tables=True)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(
                [{"name": t.name, "config": t.config.model_dump(mode="json")} for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or sweep.max_concurrent,
                                        reuse_actors=False,
                                        trial_name_creator=lambda tr: tr.config["trial"]["name"],
                                        trial_dirname_creator=lambda tr: f"{tr.config['trial']['name']}-{tr.trial_id}"),
            run_config=tune.RunConfig(
                name=f"{sweep.experiment}-{ctx.parent_run_id[:8]}",
                storage_path=str(Path(storage_path or "ray_results").resolve()),
                failure_config=tune.FailureConfig(max_failures=0),
                progress_reporter=reporter, verbose=verbose),
        )
        grid = tuner.fit()
        for res in grid:
            name = res.config["trial"]["name"]
            m = res.metrics or {}
            if res.error is not None:
                status, error = "FAILED", _short_error(res.error)
            elif m.get("done"):
                status, error = "FINISHED", None
            else:
                status, error = "KILLED", "interrupted"
            outcome.trials.append(TrialOutcome(name, status, {k: v for k, v in m.items() if isinstance(v, float)},
                                               m.get("total_seconds"), error))
        outcome.interrupted = any(t.status == "KILLED" for t in outcome.trials)
        # trials Tune never started (interrupted before their turn)
        seen = {t.name for t in outcome.trials}
        outcome.trials += [TrialOutcome(n, "KILLED", error="not started") for n in by_name if n not in seen]
        outcome.interrupted |= len(seen) < len(by_name)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        status = "KILLED" if outcome.interrupted else ("FAILED" if outcome.failed else "FINISHED")
        rows = trial_rows(outcome)
        table = {k: [r[k] for r in rows] for k in rows[0]} if rows else None
        tracker.end_parent(ctx, status, table=table, figures=_comparison(tracker, exp_id))
    return outcome


def _comparison(tracker, experiment_id: str) -> dict[str, Any]:
    """The report's comparison chart over every finished trial of the experiment (for the parent run)."""
    from fmnist_cluster import report

    rows = report.aggregate(tracker.trial_runs(experiment_id))
    return {"comparison": report.comparison_chart(rows)} if rows else {}


def _short_error(err: BaseException) -> str:
    """The trial's own exception, not Ray's wrapper: 'FloatingPointError: training loss is nan ...'."""
    cause = getattr(err, "cause", None) or err
    name = type(cause).__name__
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    if lines and name in ("RayTaskError", "TuneError"):  # a wrapper: its last line is the trial's error
        return lines[-1].strip()
    return f"{name}: {cause}".strip().splitlines()[-1]


def trial_rows(outcome: SweepOutcome) -> list[dict[str, Any]]:
    """Rows of the final table, in trial order."""
    rows = []
    for t in outcome.trials:
        row = {"trial": t.name, "status": t.status}
        for c in ("kmeans", "gmm"):
            for s in ("acc", "acc_majority", "nmi"):
                row[f"{c}_{s}"] = t.metrics.get(f"{c}_{s}")
        row["seconds"] = t.seconds
        row["error"] = t.error
        rows.append(row)
    return rows
