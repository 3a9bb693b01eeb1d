"""The ``fmc`` command line: thin wrappers over run_trial, run_sweep, the report and the tracking adapter."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fmc: Fashion-MNIST clustering studies as tracked Ray Tune sweeps.")
out = Console(width=None if sys.stdout.isatty() else 160)  # no truncated columns in logs
err = Console(stderr=True)

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", envvar="FMC_DATA_DIR",
                                                  help="Folder of the four Fashion-MNIST IDX .gz files.")]
TrackingUri = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")]
CheckpointDir = Annotated[Optional[Path], typer.Option(
    envvar="FMC_CHECKPOINT_DIR", help="Folder of the training checkpoints (fmc sweep: default "
    "<storage path>/fmc-checkpoints; fmc run: none unless given). A training cut off goes on from there.")]
SystemMetrics = Annotated[bool, typer.Option(
    help="Log each trial's CPU, memory, disk, network (and GPU) use as MLflow system metrics "
         "(every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10).")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an actionable error (no traceback) and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _tracker(uri: str | None):
    from tracking import Tracker, TrackingError

    try:
        tracker = Tracker(uri)
        tracker.check()
    except TrackingError as e:
        raise fail(str(e)) from None
    return tracker


def _set_verbose(verbose: bool) -> None:
    """--verbose: let the backends (TensorFlow's C++ core, Ray's workers) print their own lines."""
    import os

    if verbose:
        os.environ["FMC_VERBOSE"] = "1"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in text.replace(" ", "").split(",") if v]


@app.command()
def data(data_dir: DataDir = None) -> None:
    """Say where the Fashion-MNIST files were found and verify them (shapes, labels, checksums)."""
    from fmnist_cluster.data import DataError, find_data_dir, load_dataset

    try:
        source, folder = find_data_dir(data_dir)
        ds = load_dataset(folder)
    except DataError as e:
        raise fail(str(e)) from None
    out.print(f"Fashion-MNIST from {source}: {folder}")
    for name in ("train", "val", "test"):
        x, y = getattr(ds, f"x_{name}"), getattr(ds, f"y_{name}")
        counts = ", ".join(str(int((y == k).sum())) for k in range(10))
        out.print(f"  {name:5s} {x.shape} {x.dtype} in [{x.min():.0f}, {x.max():.0f}]; per class: {counts}")
    out.print("verified: IDX headers, sizes, SHA-256 of the decoded files, labels 0..9")


@app.command()
def run(
    spec: Annotated[Optional[Path], typer.Argument(help="Sweep file to take a trial from (with --trial).")] = None,
    trial: Annotated[Optional[str], typer.Option(help="Name of the trial in SPEC.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="conv, dense or none (raw pixels).")] = None,
    filters: Annotated[Optional[str], typer.Option(help="Conv filters, e.g. 64,32,16,7.")] = None,
    units: Annotated[Optional[str], typer.Option(help="Dense units, e.g. 128,64,32.")] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    learning_rate: Optional[float] = None,
    seed: Optional[int] = None,
    clusterers: Annotated[Optional[str], typer.Option(help="kmeans,gmm or one of them.")] = None,
    eval_split: Annotated[Optional[str], typer.Option(help="test, train (60k) or all (70k).")] = None,
    fit_split: Annotated[Optional[str], typer.Option(
        help="Images the autoencoder trains on: train (48k, the study's) or all (70k, N2D's; no val_loss).")] = None,
    shuffle: Annotated[Optional[str], typer.Option(
        help="Training order: once (one permutation, the same every epoch; the default) or epoch (a new one "
             "every epoch).")] = None,
    subset: Annotated[Optional[int], typer.Option(help="Images per split for a quick run.")] = None,
    data_seed: Optional[int] = None,
    kmeans_n_init: Optional[int] = None,
    gmm_n_init: Optional[int] = None,
    covariance_type: Optional[str] = None,
    gmm_impl: Annotated[Optional[str], typer.Option(help="sklearn (reference) or fast.")] = None,
    gmm_components: Annotated[Optional[int], typer.Option(
        help="Mixture components to fit, merged into the clusters by an entropy criterion (default: one each).")] = None,
    manifold: Annotated[Optional[str], typer.Option(help="none, umap or pca: a stage before the clusterers.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Score the codes every N epochs while training.")] = None,
    dec_epochs: Annotated[Optional[int], typer.Option(
        help="Refine the encoder with DEC for at most N epochs after training (0: off).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment (default: the sweep's, else fmc-run).")] = "",
    track: Annotated[bool, typer.Option(help="Log the trial to MLflow.")] = True,
    tracking_uri: TrackingUri = None,
    data_dir: DataDir = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the backend.")] = None,
    system_metrics: SystemMetrics = True,
    checkpoint_dir: CheckpointDir = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the backends' own log lines.")] = False,
) -> None:
    """Run one trial without Ray: from flags, or trial NAME of a sweep file with flags on top."""
    _set_verbose(verbose)
    from fmnist_cluster.config import SpecError, TrialConfig, deep_merge, load_sweep

    base: dict = {}
    if spec is not None:
        if trial is None:
            raise fail(f"{spec}: name the trial to run with --trial")
        try:
            sweep = load_sweep(spec)
        except SpecError as e:
            raise fail(str(e)) from None
        trials = {t.name: t for t in sweep.expand()}
        if trial not in trials:
            raise fail(f"{spec}: no trial named {trial!r}; trials are: {', '.join(trials)}")
        base = trials[trial].config.model_dump(mode="json", exclude_none=True)
        experiment = experiment or sweep.experiment
    elif trial is not None:
        raise fail("--trial needs a sweep file: fmc run SPEC --trial NAME")
    overrides: dict = {"model": {}, "data": {}, "kmeans": {}, "gmm": {}, "dec": {}}
    for key, value in {"kind": kind, "filters": _ints(filters), "units": _ints(units)}.items():
        if value is not None:
            overrides["model"][key] = value
    if manifold is not None:
        overrides["manifold"] = {"kind": manifold}
    for key, value in {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                       "seed": seed, "eval_split": eval_split, "fit_split": fit_split, "shuffle": shuffle,
                       "eval_every": eval_every,
                       "clusterers": clusterers.split(",") if clusterers else None}.items():
        if value is not None:
            overrides[key] = value
    for section, key, value in [("data", "subset", subset), ("data", "seed", data_seed),
                                ("kmeans", "n_init", kmeans_n_init), ("gmm", "n_init", gmm_n_init),
                                ("gmm", "covariance_type", covariance_type), ("gmm", "impl", gmm_impl),
                                ("gmm", "components", gmm_components), ("dec", "epochs", dec_epochs)]:
        if value is not None:
            overrides[section][key] = value
    merged = deep_merge(base, {k: v for k, v in overrides.items() if v != {}})
    if "filters" in overrides["model"] and "kind" not in overrides["model"]:
        merged["model"]["kind"] = "conv"
    try:
        config = TrialConfig(**merged)
    except ValidationError as e:
        from fmnist_cluster.config import _errors, _fmt_path

        problems = "; ".join(f"{_fmt_path(loc) if loc else 'trial'}: {msg}" for loc, msg in _errors(e))
        raise fail(f"invalid trial settings: {problems}") from None
    name = trial or f"{config.model.label()}-e{config.epochs}-seed{config.seed}"
    _run_one(config, name, experiment or "fmc-run", track=track, tracking_uri=tracking_uri,
             data_dir=data_dir, threads=threads, system_metrics=system_metrics, checkpoint_dir=checkpoint_dir)


def _run_one(config, name: str, experiment: str, *, track: bool, tracking_uri, data_dir, threads,
             system_metrics: bool = True, checkpoint_dir: Path | None = None) -> None:
    from fmnist_cluster.checkpoints import CheckpointError
    from fmnist_cluster.data import DataError, load_dataset
    from fmnist_cluster.trial import run_trial
    from tracking import TrackingError

    try:
        data = load_dataset(data_dir, seed=config.data.seed, subset=config.data.subset)
    except DataError as e:
        raise fail(str(e)) from None
    out.print(f"trial [bold]{name}[/] key {config.key()}; data {data.source}; "
              f"{len(data.y_train)}/{len(data.y_val)}/{len(data.y_test)} train/val/test images")
    logger = None
    if track:
        from tracking import TrialLogger

        tracker = _tracker(tracking_uri)
        logger = TrialLogger(tracker.context(tracker.experiment(experiment), None, experiment), name, config,
                             system_metrics=system_metrics)
    progress = "auto" if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in logs
    try:
        if logger:
            with logger:
                result = run_trial(config, data=data, threads=threads, on_epoch=logger.epoch, on_eval=logger.eval,
                                   verbose=progress, checkpoint_dir=checkpoint_dir)
                logger.result(result)
        else:
            result = run_trial(config, data=data, threads=threads, verbose=progress, checkpoint_dir=checkpoint_dir)
    except (FloatingPointError, ValueError, CheckpointError) as e:
        raise fail(f"trial {name} failed: {e}", 1) from None
    except TrackingError as e:
        raise fail(f"trial {name}: {e}", 1) from None
    print_results(name, result)
    if result.info.get("resumed_from_epoch"):
        out.print(f"the training went on from its checkpoint of epoch {result.info['resumed_from_epoch']} "
                  f"in {checkpoint_dir}")
    if logger:
        out.print(f"logged to {logger.ctx.uri}, experiment {experiment!r}, run {logger.run_id}")


def print_results(name: str, result) -> None:
    from fmnist_cluster.metrics import SCORES
    table = Table(title=f"{name}: {result.config.model.label()}, {result.config.epochs} epochs, "
                        f"scored on {result.config.eval_split} ({result.info['n_eval']} images)")
    table.add_column("clusterer")
    for s in (*SCORES, "seconds"):
        table.add_column(s, justify="right")
    for c in result.config.clusterers:
        table.add_row(c, *(f"{result.metrics[f'{c}_{s}']:.4f}" for s in SCORES), f"{result.timings[f'{c}_seconds']:.1f}")
    out.print(table)
    extras = {k: v for k, v in result.timings.items() if k not in ("kmeans_seconds", "gmm_seconds")}
    if "recon_mse" in result.metrics:
        out.print(f"test reconstruction MSE {result.metrics['recon_mse']:.5f}")
    if "dec_iterations" in result.metrics:
        m = result.metrics
        out.print(f"DEC: {m['dec_iterations']:.0f} iterations ({m['dec_epochs']:.1f} epochs), "
                  f"{100 * m['dec_changed']:.2f} % of the images changed cluster at the last target update")
    out.print("timings: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}s" for k, v in extras.items()))


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="Sweep file (see sweeps/).")],
    dry_run: Annotated[bool, typer.Option(help="Print the expanded trials and resources; run nothing.")] = False,
    max_concurrent: Annotated[Optional[int], typer.Option(help="Trials at once (overrides the file).")] = None,
    cpu: Annotated[Optional[float], typer.Option(help="CPUs per trial (overrides the file).")] = None,
    gpu: Annotated[Optional[float], typer.Option(help="GPUs per trial, fractions allowed (overrides).")] = None,
    address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS",
                                                   help="Ray cluster to join; default a local Ray.")] = None,
    rerun: Annotated[bool, typer.Option(
        help="Run the selected trials again, each in a new run, even if they finished (old runs stay).")] = False,
    only: Annotated[Optional[str], typer.Option(
        "--trials", help="Only the trials whose names match these comma-separated patterns, e.g. 'case1-*,raw-*'.")] = None,
    skip_recorded: Annotated[Optional[Path], typer.Option(
        help="Also skip trials whose key has a record in this file (fmc export): resume on an empty store.")] = None,
    models: Annotated[bool, typer.Option(help="Log the models (autoencoder, pyfunc clusterers).")] = True,
    system_metrics: SystemMetrics = True,
    tracking_uri: TrackingUri = None,
    data_dir: DataDir = None,
    storage_path: Annotated[Optional[str], typer.Option(
        envvar="FMC_STORAGE_PATH", help="Ray Tune's results folder (default ./ray_results).")] = None,
    share_training: Annotated[bool, typer.Option(
        help="Train once for trials that differ only in epochs, clusterers or manifold.")] = True,
    checkpoints: Annotated[bool, typer.Option(
        help="Checkpoint each training every epoch; a trial run again goes on from its last one.")] = True,
    checkpoint_dir: CheckpointDir = None,
    num_gpus: Annotated[Optional[int], typer.Option(
        help="GPUs of a local Ray (default: detected); logical ones work for scheduling.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the trials' and backends' own output.")] = False,
) -> None:
    """Run every trial of a sweep file on Ray Tune, logging each to MLflow; skip trials already finished."""
    _set_verbose(verbose)
    from fmnist_cluster.config import SpecError, load_sweep

    where = (checkpoint_dir or Path(storage_path or "ray_results") / "fmc-checkpoints") if checkpoints else None
    try:
        spec_ = load_sweep(spec)
    except SpecError as e:
        raise fail(str(e)) from None
    for name, value in (("--max-concurrent", max_concurrent), ("--cpu", cpu)):
        if value is not None and value <= 0:
            raise fail(f"{name} must be positive, got {value}")
    if gpu is not None and gpu < 0:
        raise fail(f"--gpu must be >= 0, got {gpu}")
    trials = spec_.expand()
    if only is not None:
        if spec_.search is not None:
            raise fail(f"--trials: {spec} is a search (its trials are drawn as it runs); run it whole")
        trials = _select(trials, only, spec)
    res = spec_.per_trial(cpu, gpu)
    if dry_run and spec_.search is not None:
        _print_search(spec, spec_, trials[0], res, max_concurrent)
        return
    if dry_run:
        table = Table(title=f"{spec}: experiment {spec_.experiment!r}, {len(trials)} trials, "
                            f"{res['cpu']:g} CPU + {res['gpu']:g} GPU each, "
                            f"max concurrent {max_concurrent or spec_.max_concurrent or 'auto'}")
        from fmnist_cluster.sweep import group_trials

        groups = group_trials(trials, share_training=share_training)
        trained_in = {t.name: g[-1].name for g in groups for t in g}
        table.caption = (f"{len(groups)} Ray trials: trials that differ only after training share one "
                         "(--no-share-training: one each)")
        for col in ("trial", "model", "epochs", "seed", "clusterers", "manifold", "fit", "eval", "subset",
                    "trained in", "key"):
            table.add_column(col)
        for t in trials:
            c = t.config
            table.add_row(t.name, c.model.label(), str(c.epochs), str(c.seed), ",".join(c.clusterers),
                          c.manifold.kind, c.fit_split, c.eval_split, str(c.data.subset or "all"), trained_in[t.name],
                          c.key())
        out.print(table)
        return
    from fmnist_cluster.data import DataError, find_data_dir

    try:
        find_data_dir(data_dir)
    except DataError as e:
        raise fail(str(e)) from None
    from fmnist_cluster.sweep import ClusterError, TrialOutcome, plan, run_sweep, trial_rows

    from tracking import TrackingError

    recorded: set[str] = set()
    if skip_recorded is not None and not skip_recorded.exists():
        # the first chunk of a long run: the same command as the later ones, before anything was exported
        out.print(f"no records at {skip_recorded} yet: --skip-recorded skips nothing "
                  "(fmc export creates the file)", soft_wrap=True)
        skip_recorded = None
    if skip_recorded is not None:
        from fmnist_cluster.records import RecordError, recorded_keys

        try:
            recorded = recorded_keys(skip_recorded)
        except RecordError as e:
            raise fail(str(e)) from None
    tracker = _tracker(tracking_uri)
    if spec_.search is not None:
        _search(spec, spec_, trials, tracker, skip_recorded, rerun=rerun, address=address, cpu=cpu, gpu=gpu,
                max_concurrent=max_concurrent, data_dir=data_dir, storage_path=storage_path, models=models,
                num_gpus=num_gpus, verbose=verbose, system_metrics=system_metrics, checkpoint_dir=where)
        return
    planned = plan(tracker, tracker.experiment(spec_.experiment), trials, rerun=rerun, recorded=recorded)
    for name, who in planned.busy.items():
        out.print(f"skipping {name}: another sweep is running it ({who})", soft_wrap=True)
    if not planned.todo:
        out.print(f"all {len(trials)} trials of {spec_.experiment!r} already finished"
                  f"{' or running elsewhere' if planned.busy else ''} in {tracker.uri}"
                  f"{f' or recorded in {skip_recorded}' if recorded else ''}; nothing to do"
                  f"{'' if planned.busy else ' (--rerun runs them again)'}", soft_wrap=True)
        return
    if planned.finished:
        where = f"{tracker.uri}" + (f" or recorded in {skip_recorded}" if recorded else "")
        out.print(f"{len(planned.finished)} of {len(trials)} trials already finished in {where}; "
                  f"running the other {len(planned.todo)}", soft_wrap=True)
    start = time.perf_counter()
    try:
        outcome = run_sweep(spec_, planned.todo, tracker=tracker, address=address, cpu=cpu, gpu=gpu,
                            max_concurrent=max_concurrent, data_dir=str(data_dir) if data_dir else None,
                            storage_path=storage_path, log_models=models, share_training=share_training,
                            num_gpus=num_gpus, verbose=2 if verbose else 1, rerun=rerun,
                            system_metrics=system_metrics, checkpoint_dir=where)
    except (TrackingError, ClusterError) as e:
        raise fail(f"{e}", 1) from None
    outcome.trials += [TrialOutcome(t.name, "SKIPPED", error="recorded in " + str(skip_recorded)
                                    if t.config.key() in recorded else "finished earlier") for t in planned.finished]
    outcome.trials += [TrialOutcome(name, "SKIPPED", error=f"running in another sweep: {who}")
                       for name, who in planned.busy.items()]
    _print_outcome(trial_rows(outcome), time.perf_counter() - start, interrupted=outcome.interrupted)
    _after_sweep(spec, spec_, tracker, outcome)


def _after_sweep(spec: Path, spec_, tracker, outcome) -> None:
    """Where the sweep landed, what the registry did, warnings; the exit code."""
    out.print(f"MLflow: {tracker.uri}, experiment {spec_.experiment!r}, parent run {outcome.parent_run_id}")
    if outcome.registered:
        out.print(f"Model registry: {outcome.registered}", highlight=False, soft_wrap=True)
    for warning in outcome.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if outcome.interrupted:
        raise fail(f"interrupted; run `fmc sweep {spec}` again to finish the remaining trials", 130)
    if outcome.failed:
        raise typer.Exit(1)


def _print_search(spec: Path, spec_, base, res: dict, max_concurrent: int | None) -> None:
    """What a searched sweep will sample (its trials are drawn as it runs)."""
    search = spec_.search
    table = Table(title=f"{spec}: experiment {spec_.experiment!r}, {search.algorithm} search, "
                        f"{search.num_samples} trials around {base.name!r} ({base.config.model.label()}, "
                        f"{base.config.epochs} epochs), {search.mode} {search.metric} "
                        f"({'supervised: uses the labels' if search.supervised else 'label-free'}), "
                        f"{res['cpu']:g} CPU + {res['gpu']:g} GPU each, "
                        f"max concurrent {max_concurrent or spec_.max_concurrent or 'auto'}")
    table.add_column("setting")
    table.add_column("distribution")
    table.add_column(f"in {base.name}")
    flat = base.config.flat()
    for key, dist in spec_.space.items():
        kind, args = next(iter(dist.items()))
        table.add_row(key, f"{kind} {args}", str(flat.get(key, "")))
    if spec_.scheduler is not None:
        sch = spec_.scheduler
        table.caption = (f"early stopping: {sch.kind} on {sch.metric} ({sch.mode}), grace period {sch.grace_period} "
                         f"epochs, rungs to {sch.max_t or base.config.epochs}, reduction factor {sch.reduction_factor:g}")
    out.print(table)


def _search(spec: Path, spec_, trials: list, tracker, skip_recorded: Path | None, *, rerun: bool, **options) -> None:
    """Run a searched sweep: Ray Tune draws the trials; samples finished earlier (in the store, or
    recorded in ``skip_recorded``) are drawn again but not run again."""
    from fmnist_cluster.records import RecordError, recorded_scores
    from fmnist_cluster.sweep import ClusterError, run_sweep, trial_rows

    from tracking import TrackingError

    done = {}
    if skip_recorded is not None and not rerun:
        try:
            done = recorded_scores(skip_recorded)
        except RecordError as e:
            raise fail(str(e)) from None
    start = time.perf_counter()
    data_dir = options.pop("data_dir")
    try:
        outcome = run_sweep(spec_, trials, tracker=tracker, rerun=rerun, done=done,
                            data_dir=str(data_dir) if data_dir else None, log_models=options.pop("models"),
                            verbose=2 if options.pop("verbose") else 1, **options)
    except (TrackingError, ClusterError) as e:
        raise fail(f"{e}", 1) from None
    _print_outcome(trial_rows(outcome, extra=(spec_.search.metric,)), time.perf_counter() - start,
                   interrupted=outcome.interrupted)
    _after_sweep(spec, spec_, tracker, outcome)


def _select(trials: list, patterns: str, spec: Path) -> list:
    """The trials whose names match one of the comma-separated shell-style patterns."""
    from fnmatch import fnmatchcase

    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unmatched = [p for p in wanted if not any(fnmatchcase(t.name, p) for t in trials)]
    if not wanted or unmatched:
        raise fail(f"--trials {patterns!r}: {', '.join(unmatched) or 'no pattern'} matches no trial of {spec}; "
                   f"trials are: {', '.join(t.name for t in trials)}")
    return [t for t in trials if any(fnmatchcase(t.name, p) for p in wanted)]


def _print_outcome(rows: list[dict], seconds: float, *, interrupted: bool = False) -> None:
    """The final table, one line per trial (long errors cut there), then each failed trial's error in
    full on one line of its own."""
    from fmnist_cluster.metrics import score_names

    table = Table(title=f"sweep {'interrupted after' if interrupted else 'finished in'} {seconds:.0f}s")
    keys = [k for k in rows[0] if k not in ("seconds", "error")] if rows else \
        ["trial", "status"] + score_names(scores=("acc", "acc_majority", "nmi"))
    for k in keys + ["seconds"]:
        table.add_column(k.replace("_acc_majority", " acc_maj").replace("kmeans", "km").replace("_silhouette", " silh"),
                         no_wrap=True,
                         justify="right" if k not in ("trial", "status") else "left")
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=48)
    colour = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "SKIPPED": "dim"}
    for r in rows:
        cells = [r["trial"], f"[{colour[r['status']]}]{r['status']}[/]"]
        cells += ["-" if r[k] is None else f"{r[k]:.4f}" for k in keys[2:]]
        cells += ["-" if r["seconds"] is None else f"{r['seconds']:.0f}", r["error"] or ""]
        table.add_row(*cells)
    out.print(table)
    for r in rows:
        if r["status"] == "FAILED" and r["error"]:
            out.print(f"[red]FAILED[/] {r['trial']}: {r['error']}", soft_wrap=True, highlight=False)


@app.command()
def export(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment (the sweep's name).")],
    out_path: Annotated[Path, typer.Option("--out", help="JSON-lines file to append to, e.g. results/X.jsonl.")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Append one record per finished trial run (config, scores, timings, tags, confusion matrices,
    per-epoch history) that the file lacks: results that outlive the MLflow store."""
    from fmnist_cluster.records import RecordError, append_records, read_records
    from tracking.export import trial_records

    tracker = _tracker(tracking_uri)
    exp_id = tracker.experiment(experiment, create=False)
    if exp_id is None:
        raise fail(f"no experiment named {experiment!r} in {tracker.uri}")
    try:
        have = {r["run_id"] for r in read_records(out_path)} if out_path.exists() else set()
        added = append_records(out_path, trial_records(tracker, exp_id, skip=have))
    except RecordError as e:
        raise fail(str(e)) from None
    out.print(f"{added} new record(s) appended to {out_path} ({len(have) + added} in all) from experiment "
              f"{experiment!r} in {tracker.uri}")


@app.command()
def report(
    experiment: Annotated[Optional[str], typer.Argument(help="MLflow experiment (the sweep's name).")] = None,
    format: Annotated[str, typer.Option("--format", help="table, markdown or csv.")] = "table",
    chart: Annotated[Optional[Path], typer.Option(help="Where to write the comparison PNG.")] = None,
    records: Annotated[Optional[list[Path]], typer.Option(
        "--from", help="Report from records files (fmc export; repeat to pool several) instead of MLflow.")] = None,
    criteria: Annotated[bool, typer.Option(
        "--criteria", help="Also rank the label-free criteria: Spearman's ρ of each with acc and NMI over the runs.")] = False,
    compare: Annotated[Optional[str], typer.Option(
        "--compare", help="A,B: case B against case A seed by seed (e.g. case5,case6: do more epochs help?).")] = None,
    by: Annotated[Optional[str], typer.Option(
        "--by", help="Split the rows by a run tag too, e.g. fmc.cpu_id (the CPU a trial ran on) or fmc.trained_on; "
                     "runs without it form a '-' row.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Study-style tables (mean ± std over seeds, beside the study's figures) and a comparison chart."""
    from fmnist_cluster import report as rep

    if format not in ("table", "markdown", "csv"):
        raise fail(f"--format must be table, markdown or csv, got {format!r}")
    if (experiment is None) == (not records):
        raise fail("name an EXPERIMENT in MLflow or a records file with --from, not both")
    if records:
        from fmnist_cluster.records import RecordError, read_records

        try:
            runs = [run for path in records for run in read_records(path)]
        except RecordError as e:
            raise fail(str(e)) from None
        experiment = "+".join(path.stem for path in records)
    else:
        tracker = _tracker(tracking_uri)
        exp_id = tracker.experiment(experiment, create=False)
        if exp_id is None:
            raise fail(f"no experiment named {experiment!r} in {tracker.uri}")
        runs = tracker.trial_runs(exp_id)
    rows = rep.aggregate(runs, by)
    if not rows:
        raise fail(f"{experiment!r} has no finished trial runs yet")
    compared = None if compare is None else _comparison_rows(rep, runs, compare)  # refused before any table
    if format == "markdown":
        sys.stdout.write(rep.to_markdown(rows))
    elif format == "csv":
        sys.stdout.write(rep.to_csv(rows))
    else:
        table = Table(title=f"{experiment}: scores in %, mean ± std over seeds; study: its figure (Δ points, "
                            "whether within fmc's range)")
        for header, _ in rep.columns(rows):
            table.add_column(header, justify="left" if header in ("case", "model", "split", "manifold") else "right")
        for cells in rep.display_rows(rows):
            table.add_row(*cells)
        out.print(table)
        if any(r["eval_split"] == "all" for r in rows):
            anchors = Table(title="published label-free results on all 70,000 images")
            for header in ("method", "acc", "nmi", "source"):
                anchors.add_column(header)
            for cells in rep.anchor_rows():
                anchors.add_row(*cells)
            out.print(anchors)
    if criteria:
        _print_criteria(rep, runs, format)
    if compared is not None:
        _print_comparison(*compared, format)
    path = chart or Path(f"{experiment}-report.png")
    rep.comparison_chart(rows).savefig(path, dpi=120)
    err.print(f"chart written to {path}")


def _print_criteria(rep, runs: list, format: str) -> None:
    """The label-free criteria's rank correlations with the labels' scores, after the report's table."""
    rows = rep.criteria(runs)
    _print_extra("label-free criteria against the labels' scores: Spearman's ρ over the runs",
                 rep.CRITERIA_HEADERS, rep.criteria_rows(rows), format, csv_rows=rows)


def _comparison_rows(rep, runs: list, cases: str) -> tuple[list[str], list[dict]]:
    """(the two case names, rep.compare's rows) of ``--compare A,B``; a clear refusal when it cannot be."""
    names = [c.strip() for c in cases.split(",")]
    if len(names) != 2 or not all(names):
        raise fail(f"--compare takes two case names, A,B, got {cases!r}")
    rows = rep.compare(runs, *names)
    if not rows:
        known = sorted({rep.case_name(r["tags"].get("fmc.trial", r["name"])) for r in runs})
        raise fail(f"--compare {cases}: no seed has runs of both cases; cases are: {', '.join(known)}")
    return names, rows


def _print_comparison(names: list[str], rows: list[dict], format: str) -> None:
    """Case B against case A, seed by seed, after the report's table."""
    from fmnist_cluster.report import LABEL

    headers = ("score", "seeds", f"{names[1]} - {names[0]} per seed (points)", "mean ± std", "every seed the same way")
    cells = [[f"{LABEL[r['metric'].split('_', 1)[0]]} {r['metric'].split('_', 1)[1]}", ",".join(map(str, r["seeds"])),
              " ".join(f"{d:+.2f}" for d in r["diffs"]),
              f"{r['mean']:+.2f}" + ("" if r["std"] is None else f" ± {r['std']:.2f}"), "yes" if r["same_sign"] else "no"]
             for r in rows]
    _print_extra(f"{names[1]} against {names[0]}, seed by seed", headers, cells, format, csv_rows=rows)


def _print_extra(title: str, headers, cells: list[list[str]], format: str, csv_rows: list[dict]) -> None:
    """One more table after the report's: a rich table, markdown (cells), or CSV (the raw rows)."""
    if format == "csv":
        import csv

        sys.stdout.write("\n")
        writer = csv.DictWriter(sys.stdout, fieldnames=list(csv_rows[0]) if csv_rows else list(headers))
        writer.writeheader()
        writer.writerows(csv_rows)
    elif format == "markdown":
        from fmnist_cluster.report import markdown_table

        sys.stdout.write(f"\n{title[0].upper()}{title[1:]}:\n\n" + markdown_table(headers, cells))
    else:
        table = Table(title=title)
        for header in headers:
            table.add_column(header)
        for row in cells:
            table.add_row(*row)
        out.print(table)


@app.command()
def ui(tracking_uri: TrackingUri = None,
       port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 0) -> None:
    """Start the MLflow UI on the store (loopback only) and print its URL; Ctrl-C stops it."""
    from tracking import resolve_uri, serve_ui

    proc = serve_ui(resolve_uri(tracking_uri), port=port)
    out.print(f"MLflow UI for {resolve_uri(tracking_uri)} at {proc.url} (Ctrl-C to stop)")
    try:
        sys.exit(proc.wait())
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    app()
