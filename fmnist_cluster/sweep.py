"""Run a sweep's trials on Ray Tune, each logged to MLflow through the ``tracking`` adapter.

The seam: the Ray trainable is a few lines around ``run_group`` and ``TrialLogger``. Trials that differ
only in what happens after training (their epochs, clusterers, manifold) share one Ray trial and one
training (:func:`group_trials`); each still gets its own child run. The MLflow store is the record of
what finished or is running (``fmc.trial_key``), so an interrupted sweep, run again anywhere against
the same store, runs only what is missing, and two sweeps started at once never run a trial twice.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_cluster.config import Sweep, Trial, TrialConfig
from fmnist_cluster.metrics import score_names

PROGRESS_COLUMNS = {"epoch": "epoch", "loss": "loss", "val_loss": "val_loss", "scored": "scored"}


@dataclass
class TrialOutcome:
    name: str
    status: str  # FINISHED, FAILED, KILLED, SKIPPED (finished earlier, or run by another sweep)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


@dataclass
class SweepOutcome:
    trials: list[TrialOutcome]
    interrupted: bool = False
    parent_run_id: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the store refused of the parent run
    registered: str | None = None  # what became of models:/<experiment>@best

    @property
    def failed(self) -> bool:
        return any(t.status == "FAILED" for t in self.trials)


@dataclass
class SweepPlan:
    """What a sweep invocation will do with each selected trial, from the store's record."""

    todo: list[Trial]
    finished: list[Trial]  # a FINISHED run has their key (not with rerun)
    busy: dict[str, str]  # trial name -> the live sweep running it now


def plan(tracker, experiment_id: str, trials: list[Trial], *, rerun: bool = False,
         recorded: set[str] = frozenset()) -> SweepPlan:
    """Split ``trials`` by the record: finished already in the store or with a key in ``recorded``
    (records exported from another store; both skipped unless ``rerun``), running in a live sweep now
    (always left to it; expired claims are closed here) and to run."""
    done = {} if rerun else {**dict.fromkeys(recorded, "recorded"), **tracker.finished_keys(experiment_id)}
    claimed = tracker.claimed_keys(experiment_id)
    busy = {t.name: claimed[t.config.key()] for t in trials if t.config.key() in claimed and t.config.key() not in done}
    return SweepPlan(todo=[t for t in trials if t.config.key() not in done and t.name not in busy],
                     finished=[t for t in trials if t.config.key() in done], busy=busy)


def group_trials(trials: list[Trial], *, share_training: bool = True) -> list[list[Trial]]:
    """Trials that can share one training (equal ``training_key``, an autoencoder to train); raw-pixel
    trials and, without ``share_training``, every trial stand alone. Each group ends with its lead,
    the first of its longest trials in sweep order (the others are scored on the lead's training);
    groups keep the order of their first trial in the sweep."""
    groups: dict[str, list[tuple[int, Trial]]] = {}
    for i, t in enumerate(trials):
        shared = share_training and t.config.model.kind != "none"
        groups.setdefault(t.config.training_key() if shared else f"alone-{i}", []).append((i, t))
    return [[t for _, t in sorted(g, key=lambda it: (it[1].config.epochs, -it[0]))] for g in groups.values()]


def _placement() -> dict[str, str]:
    """Where this Ray trial runs: node id, host and process, and the GPUs Ray gave it."""
    import ray

    context = ray.get_runtime_context()
    tags = {"fmc.node": f"{socket.gethostname()}:{context.get_node_id()[:12]}", "fmc.pid": str(os.getpid()),
            "fmc.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    gpus = ray.get_gpu_ids()
    if gpus:
        tags["fmc.ray_gpu_ids"] = ",".join(map(str, gpus))
    return tags


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


def run_ray_trial(param: dict, *, datasets: dict, ctx, log_models: bool, report, stop, outcomes: dict[str, Any],
                  system_metrics: bool = True, board=None, base=None, space=None, search=None,
                  done: dict[str, dict[str, float]] | None = None, checkpoint_dir: str | None = None,
                  resume: bool = True) -> None:
    """One Ray trial (in :class:`fmnist_cluster.tuning.GroupTrainable`'s thread): one group of trials
    (one training), one child run per trial; or, in a search, the one trial that ``param['sample']``
    makes from ``base`` (the sweep's trial) and ``space``. ``report(result)`` goes to Tune; ``stop()``
    says whether the scheduler stopped the trial early or the sweep is ending; ``outcomes`` (name ->
    {status, key, metrics, seconds, error}) fills as trials end. A searched trial whose key is in
    ``done`` (finished earlier: key -> its scores) is not run again; its scores go to the searcher.

    One trial's failure (its scoring, its logging refused by the store) fails that trial only: its
    run ends FAILED with the error and the group trains on for the others. Only the training itself
    failing, an interrupt or the store out of reach for the outage bound end the whole group.
    With ``checkpoint_dir`` the training is checkpointed every epoch and resumes from there (see
    :func:`fmnist_cluster.trial.run_group`); the checkpoints go once every trial of the group finished.
    """
    from fmnist_cluster.plots import close
    from fmnist_cluster.trial import run_group
    from tracking import TrackingError, TrackingOutage, TrialLogger

    if "sample" in param:
        from fmnist_cluster.tuning import searched_member

        name, config = searched_member(param, base, space, search)
        if config.key() in (done or {}):  # a search run again draws it again: its scores stand
            outcomes[name] = {"status": "SKIPPED", "key": config.key(), "error": "finished earlier"}
            report({**done[config.key()], "trials": outcomes, "done": True})
            return
        group = [(name, config)]
    else:
        group = [(t["name"], TrialConfig(**t["config"])) for t in param["trial"]["members"]]
    lead = group[-1][0]  # the longest training: the others are scored on the way
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))  # Ray sets it to the trial's CPUs
    tags = {**_placement(), "fmc.trained_in": lead}
    names = {config.key(): name for name, config in group}
    loggers: dict[str, TrialLogger] = {}  # trial key -> logger of the trials still open
    for name, config in group:
        log = TrialLogger(ctx, name, config, log_models=log_models, tags=tags, system_metrics=system_metrics)
        try:
            holder = log.start(claim=True)
        except TrackingOutage:
            raise
        except TrackingError as error:  # e.g. the store refused config.json: close the run FAILED, say why
            log.finish(error)
            outcomes[name] = {"status": "FAILED", "key": config.key(), "error": _one_line(error)}
            continue
        if holder:
            outcomes[name] = {"status": "SKIPPED", "key": config.key(), "error": holder}
        else:
            loggers[config.key()] = log
    todo = [config for _, config in group if config.key() in loggers]

    def final() -> dict[str, Any]:
        """The last report: every outcome and, for a one-trial group, its scores (what a searcher reads;
        not for a trial stopped early, which a searcher counts as pruned)."""
        only = outcomes.get(group[0][0], {}) if len(group) == 1 else {}
        scores = {} if only.get("stopped_early") else (only.get("metrics") or {})
        return {**scores, "scored": len(outcomes), "trials": outcomes, "done": True}

    if not todo:
        report(final())
        return

    def fail(config: TrialConfig, error: BaseException) -> None:
        """This trial alone has failed: close its run FAILED and say so."""
        log = loggers.pop(config.key(), None)
        if log is None:
            return
        problem = log.finish(error)
        outcomes[names[config.key()]] = {"status": "FAILED", "key": config.key(),
                                         "error": _one_line(error) + (f" (and: {problem})" if problem else "")}

    def guarded(config: TrialConfig, call) -> None:
        if config.key() not in loggers:
            return
        try:
            call(loggers[config.key()])
        except TrackingOutage:
            raise  # the store is gone for every trial of the group
        except Exception as error:  # noqa: BLE001 - recorded as this trial's failure
            fail(config, error)

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        for config in todo:
            if config.epochs >= epoch:
                guarded(config, lambda log: log.epoch(epoch, values))
        report({**values, "epoch": epoch, "scored": len(outcomes), "trials": outcomes})

    def on_eval(config: TrialConfig, epoch: int, scores: dict[str, float]) -> None:
        guarded(config, lambda log: log.eval(epoch, scores))

    def on_result(config: TrialConfig, result, error) -> None:
        if error is not None:
            fail(config, error)
        elif config.key() in loggers:
            try:
                loggers[config.key()].result(result)
            except TrackingOutage:
                raise
            except Exception as error:  # noqa: BLE001 - e.g. the store refused an artifact
                fail(config, error)
            else:
                problem = loggers.pop(config.key()).finish()
                early = result.info.get("stopped_early_at_epoch")
                outcomes[names[config.key()]] = (
                    {"status": "FAILED", "key": config.key(), "error": problem} if problem else
                    {"status": "FINISHED", "key": config.key(), "seconds": result.timings.get("total_seconds"),
                     "metrics": dict(result.metrics),
                     **({"stopped_early": early, "error": f"stopped early at epoch {early}"} if early else {})})
            finally:
                close(result.figures)
        report({"scored": len(outcomes), "trials": outcomes})

    try:
        # a search may sample the data settings: a dataset the driver did not load is loaded here
        run_group(todo, data=datasets.get((todo[0].data.subset, todo[0].data.seed)), threads=threads,
                  on_epoch=on_epoch, on_eval=on_eval, on_result=on_result,
                  wanted=lambda config: config.key() in loggers, stop=stop, checkpoint_dir=checkpoint_dir,
                  resume=resume)
    except BaseException as error:  # the training failed, was stopped or lost the store: every open trial ends
        for config in list(todo):
            fail(config, error)
        if not isinstance(error, Exception) or isinstance(error, TrackingOutage):
            raise  # an interrupt, or the store gone: Tune and the driver must know
    if checkpoint_dir is not None and all(outcomes.get(name, {}).get("status") == "FINISHED" for name, _ in group):
        # (a trial the scheduler stopped early is finished too: its run stands, nothing resumes it)
        from fmnist_cluster.checkpoints import TrainingCheckpoints

        TrainingCheckpoints(checkpoint_dir, group[-1][1].training_key()).remove()  # the store has the models
    report(final())


FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "FMC_DATA_DIR",
                 "FMC_TRACKING_OUTAGE_SECONDS", "FMC_CLAIM_TTL_SECONDS", "FMC_CLAIM_SETTLE_SECONDS",
                 "TF_CPP_MIN_LOG_LEVEL", "FMC_VERBOSE", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


class ClusterError(Exception):
    """The Ray cluster cannot run a trial of this sweep (it lacks the CPUs or GPUs one trial asks for)."""


def resource_shortage(per_trial: dict[str, float], cluster: dict[str, float], address: str | None) -> str | None:
    """Why no trial could ever start on ``cluster`` (Ray's total resources), in one line; None if one can."""
    where = f"the Ray cluster at {address}" if address else "this machine's Ray"
    for kind, key in (("gpu", "GPU"), ("cpu", "CPU")):
        need, have = per_trial.get(kind) or 0, cluster.get(key, 0)
        if need > have:
            if kind == "gpu" and not have:
                return (f"no GPU is visible to {where}: each trial asks for {need:g} GPU; run with --gpu 0, "
                        "or where Ray sees the GPUs (docs/deploy.md: the first hour on a GPU box)")
            return (f"each trial asks for {need:g} {key}, but {where} has {have:g} in all: "
                    f"lower --{kind} (or resources.{kind} in the sweep file)")
    return None


def run_sweep(sweep: Sweep, trials: list[Trial], *, tracker, address: str | None = None,
              cpu: float | None = None, gpu: float | None = None, max_concurrent: int | None = None,
              data_dir: str | None = None, storage_path: str | None = None, log_models: bool = True,
              share_training: bool = True, num_gpus: int | None = None, verbose: int = 1,
              rerun: bool = False, system_metrics: bool = True,
              done: dict[str, dict[str, float]] | None = None, checkpoint_dir: str | None = None) -> SweepOutcome:
    """Run ``trials`` (the ``todo`` of :func:`plan`) of ``sweep`` on Ray Tune; return what happened to each.

    The tracker must be checked by the caller; this opens the parent run, runs the trials, closes the
    parent (FINISHED, FAILED if a trial failed, KILLED if interrupted). ``num_gpus`` sets the GPUs of a
    local Ray (default: those it detects). With ``rerun`` every trial gets a new run even where one
    finished earlier (a trial another sweep is running now is still left to it). A search
    (``sweep.search``) samples ``sweep.space`` around ``trials[0]``; samples whose key has a finished
    run, or is in ``done`` (key -> scores, from records), are not run again. ``checkpoint_dir``: where
    the trainings are checkpointed every epoch (None: not at all); an interrupted training goes on from
    its checkpoint when its trial runs again (not with ``rerun``, which trains anew).
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
    searching = sweep.search is not None
    groups = [trials] if searching else group_trials(trials, share_training=share_training)
    resources = sweep.per_trial(cpu, gpu)
    params = {"trials": sweep.search.num_samples if searching else len(trials),
              "ray_trials": sweep.search.num_samples if searching else len(groups),
              "share_training": share_training, "resources.cpu": resources["cpu"],
              "resources.gpu": resources["gpu"], "max_concurrent": max_concurrent or sweep.max_concurrent or "auto"}
    tags = {}
    if searching:
        params.update({f"search.{k}": v for k, v in sweep.search.model_dump().items()})
        tags["fmc.selection"] = "supervised" if sweep.search.supervised else "label-free"
    if sweep.scheduler is not None:
        params.update({f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items() if v is not None})
    if not ray.is_initialized():
        # Trials log to MLflow themselves: on a cluster they get this driver's MLflow credentials
        # (a local Ray's workers inherit them anyway).
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1,
                 configure_logging=True, logging_level="WARNING" if verbose > 1 else "ERROR",
                 num_gpus=num_gpus if not address else None,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
    short = resource_shortage(resources, ray.cluster_resources(), address)
    if short:  # Tune would wait for the resources for ever
        raise ClusterError(short)
    ctx = tracker.start_parent(exp_id, sweep.experiment, source=sweep.source, params=params, rerun=rerun, tags=tags)
    # Ctrl-C and SIGTERM both stop Tune cleanly: Tune handles SIGINT, so route SIGTERM to it.
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    outcome = SweepOutcome(trials=[], parent_run_id=ctx.parent_run_id)
    keys = {t.config.key() for t in trials}  # of the trials this sweep ran (a search adds its samples)
    try:
        # One copy of each distinct dataset in Ray's object store, shared by every trial on a node.
        datasets = {}
        for t in trials:
            key = (t.config.data.subset, t.config.data.seed)
            if key not in datasets:
                datasets[key] = load_dataset(data_dir, seed=key[1], subset=key[0])
        # the epochs' reports carry the scheduler's loss, the last one the search's metric
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        from fmnist_cluster import tuning

        board = tuning.StopBoard.remote() if sweep.scheduler is not None else None  # only a scheduler writes on it
        extra = {}
        if searching:
            if not rerun:  # a search run again draws its samples again: those finished keep their runs
                done = {**(done or {}), **{r["tags"]["fmc.trial_key"]: r["metrics"] for r in tracker.trial_runs(exp_id)}}
            extra = {"base": (trials[0].name, trials[0].config), "space": sweep.space, "search": sweep.search,
                     "done": done or {}}
        trainable = tune.with_resources(
            tune.with_parameters(tuning.GroupTrainable, datasets=datasets, ctx=ctx, log_models=log_models,
                                 system_metrics=system_metrics, board=board, resume=not rerun,
                                 checkpoint_dir=None if checkpoint_dir is None else str(Path(checkpoint_dir).resolve()),
                                 **extra), resources)
        limit = max_concurrent or sweep.max_concurrent
        if searching:
            param_space = {"sample": tuning.search_space(sweep.space, sweep.search)}
            search_alg = tuning.search_algorithm(sweep.search, limit)

            def ray_name(tr) -> str:
                try:
                    return tuning.searched_member(tr.config, extra["base"], sweep.space, sweep.search)[0]
                except ValueError:  # an invalid combination: the trial itself says why
                    return f"{trials[0].name}-{tr.trial_id}"
            ray_folder = ray_name
            columns = tuning.columns(sweep.space, sweep.search)
        else:
            param_space = {"trial": tune.grid_search([
                {"name": _group_name(g), "members": [{"name": t.name, "config": t.config.model_dump(mode="json")}
                                                     for t in g]} for g in groups])}
            search_alg = None

            def ray_name(tr) -> str:
                return tr.config["trial"]["name"]

            def ray_folder(tr) -> str:  # the lead's name, without '+N'
                return tr.config["trial"]["members"][-1]["name"]
            columns = {"trial/name": "trial"}
        # the status table shows each Ray trial's name (its longest trial, '+N' scored on the way)
        reporter = tune.CLIReporter(metric_columns=PROGRESS_COLUMNS, max_report_frequency=30,
                                    parameter_columns=columns, print_intermediate_tables=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=limit, reuse_actors=False, search_alg=search_alg,
                                        num_samples=sweep.search.num_samples if searching else 1,
                                        scheduler=tuning.scheduler(sweep.scheduler, board,
                                                                   max(t.config.epochs for t in trials)),
                                        trial_name_creator=ray_name,
                                        trial_dirname_creator=lambda tr: f"{ray_folder(tr)}-{tr.trial_id}"),
            run_config=tune.RunConfig(
                name=f"{sweep.experiment}-{ctx.parent_run_id[:8]}",
                storage_path=str(Path(storage_path or "ray_results").resolve()),
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),  # the store keeps the models
                progress_reporter=reporter, verbose=verbose),
        )
        grid = tuner.fit()
        # outcomes of trials that ended after their last report
        late = ray.get(board.all_outcomes.remote()) if board is not None else {}
        seen = set()
        for res in grid:
            if not res.config:  # a Ray trial interrupted before it started has no config: 'not started' below
                continue
            trial_id = (res.metrics or {}).get("trial_id")
            reported = {**((res.metrics or {}).get("trials") or {}), **late.get(trial_id, {})}
            members = ([m["name"] for m in res.config["trial"]["members"]] if "trial" in res.config
                       else list(reported) or [ray_name(_Named(res.config, trial_id))])
            for name in members:
                seen.add(name)
                if name in reported:
                    r = reported[name]
                    keys.add(r.get("key", ""))
                    outcome.trials.append(TrialOutcome(name, r["status"], r.get("metrics") or {}, r.get("seconds"),
                                                       r.get("error")))
                elif res.error is not None:
                    outcome.trials.append(TrialOutcome(name, "FAILED", error=_short_error(res.error)))
                else:
                    outcome.trials.append(TrialOutcome(name, "KILLED", error="interrupted"))
        # trials Tune never started (interrupted before their turn)
        if not searching:
            outcome.trials += [TrialOutcome(t.name, "KILLED", error="not started") for t in trials if t.name not in seen]
        outcome.interrupted = any(t.status == "KILLED" for t in outcome.trials)
        order = {t.name: i for i, t in enumerate(trials)}
        outcome.trials.sort(key=lambda t: order.get(t.name, len(order)))
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        status = "KILLED" if outcome.interrupted else ("FAILED" if outcome.failed else "FINISHED")
        rows = trial_rows(outcome)
        table = {k: [r[k] for r in rows] for k in rows[0]} if rows else None
        try:
            runs = [r for r in tracker.trial_runs(exp_id) if r["tags"].get("fmc.trial_key") in keys]
        except Exception:  # noqa: BLE001 - the store is down: close the parent without the summary figures
            runs = []
        errors = {t.name: t.error for t in outcome.trials if t.status == "FAILED" and t.error}
        if runs and log_models and not outcome.interrupted:  # the best clusterer as models:/<experiment>@best
            try:
                trained = [r for r in runs if r["tags"].get("fmc.stopped_early") != "true"] or runs
                outcome.registered = tracker.register_best(sweep.experiment, trained, sweep.select.metric,
                                                           sweep.select.mode, ctx.parent_run_id)
            except Exception as error:  # noqa: BLE001 - the registry refused: the sweep's results stand
                outcome.warnings.append(f"registering the best model: {' '.join(str(error).split())[:300]}")
        outcome.warnings += tracker.end_parent(ctx, status, table=table, figures=_comparison(runs),
                                               metrics=best_scores(runs), errors=errors)
    return outcome


@dataclass
class _Named:
    """What ``trial_name_creator`` reads of a Ray trial, for a result whose trial is gone."""

    config: dict
    trial_id: str | None


def _group_name(group: list[Trial]) -> str:
    """Ray trial name of a group: its longest trial, '+N' when it scores N shorter ones on the way."""
    return group[-1].name + (f"+{len(group) - 1}" if len(group) > 1 else "")


def best_scores(runs: list[dict[str, Any]]) -> dict[str, float]:
    """``best_{clusterer}_{score}`` over finished trial runs: the sweep's best, for sorting sweeps in MLflow."""
    best: dict[str, float] = {}
    for run in runs:
        for name in score_names():
            value = run["metrics"].get(name)
            if value is not None:
                best[f"best_{name}"] = max(value, best.get(f"best_{name}", value))
    return best


def _comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's comparison chart over the sweep's finished trials (for the parent run)."""
    from fmnist_cluster import report

    rows = report.aggregate(runs)
    return {"comparison": report.comparison_chart(rows)} if rows else {}


def _short_error(err: BaseException) -> str:
    """The trial's own exception in one line, not Ray's wrapper: 'FloatingPointError: training loss is
    nan ...'; for a worker process that died (Ray's paragraph on dead actors), what happened and why."""
    cause = getattr(err, "cause", None) or err
    name = type(cause).__name__
    text = str(cause)
    if name in ("ActorDiedError", "WorkerCrashedError") or "actor died unexpectedly" in text or "worker died" in text:
        exit_detail = next((ln.split("Worker exit detail:", 1)[1].strip() for ln in text.splitlines()
                            if "Worker exit detail:" in ln), "")
        return ("the trial's worker process died (killed by a signal, most likely the out-of-memory killer, "
                "or crashed)" + (f": {exit_detail.rstrip('.')}" if exit_detail else ""))[:300]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and name in ("RayTaskError", "TuneError"):  # a wrapper: its last line is the trial's error
        return lines[-1].strip()
    return f"{name}: {cause}".strip().splitlines()[-1]


def trial_rows(outcome: SweepOutcome, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the final table, in trial order (``extra``: more metrics, e.g. a search's objective)."""
    rows = []
    for t in outcome.trials:
        row = {"trial": t.name, "status": t.status}
        for name in score_names(scores=("acc", "acc_majority", "nmi")) + [m for m in extra if m not in row]:
            row[name] = t.metrics.get(name)
        row["seconds"] = t.seconds
        row["error"] = t.error
        rows.append(row)
    return rows
