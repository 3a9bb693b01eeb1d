"""Operations on real components: a tracking server that goes away in the middle of a sweep, claims
when two sweeps run at once against one store, a dead sweep's claim (a real `mlflow server` on
loopback, a real Ray). The sweep helpers here serve test_faults too."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import FMC, ROOT, start_mlflow_server, stop
from tracking import claims

# real Ray and MLflow servers, minutes (`make test-fast` leaves these out); sweeps join one shared Ray
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_ray")]

LONG = """\
experiment: {experiment}
data: {{subset: 1000, seed: 0}}
defaults:
  model: {model}
  epochs: {epochs}
  kmeans: {{n_init: 1}}
  clusterers: [kmeans]
trials:
{trials}
resources: {{cpu: 1}}
max_concurrent: 2
"""


CONV = "{kind: conv, filters: [8, 4, 4]}"  # slow enough per epoch to train through an outage
DENSE = "{kind: dense, units: [32, 8]}"  # for tests about who runs a trial, not how long it takes
RAW = "{kind: none}"  # nothing to train: for tests about the store alone


def write(path, experiment: str, names: list[str], epochs: int = 3, seeds: list[int] | None = None,
          model: str = CONV, extra: dict[str, str] | None = None):
    trials = "\n".join(f"  - {{name: {n}, seed: {s}{(', ' + extra[n]) if extra and n in extra else ''}}}"
                       for n, s in zip(names, seeds or range(len(names))))
    path.write_text(LONG.format(experiment=experiment, epochs=epochs, trials=trials, model=model))
    return path


def sweep_env(url: str, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url, **extra}


def sweep(spec, cwd, env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(FMC + ["sweep", str(spec), "--no-models", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def said(res) -> str:
    return res.stdout[-3000:] + res.stderr[-3000:]


def trial_runs(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'", max_results=1000):
        out.setdefault(r.data.tags["fmc.trial_key"], []).append(r)
    return out


def by_name(client: MlflowClient, experiment: str) -> dict[str, list]:
    return {rs[0].info.run_name: rs for rs in trial_runs(client, experiment).values()}


def wait_for(client: MlflowClient, experiment: str, proc: subprocess.Popen, found, timeout: float = 300):
    """Poll the experiment's runs until ``found(runs)`` returns something; return it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended too early"
        exp = client.get_experiment_by_name(experiment)
        hit = exp and found(client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'"))
        if hit:
            return hit
        time.sleep(0.2)
    pytest.fail(f"nothing happened within {timeout} s")


def training(runs):
    return next((r for r in runs if "loss" in r.data.metrics), None)


def popen(spec, cwd, env, log: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(FMC + ["sweep", str(spec), "--no-models", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_server_restart_mid_sweep_loses_nothing_and_keeps_the_claims(server, tmp_path):
    """The server is killed for 10 s while two trials train: they keep training, buffer what they cannot
    log and deliver it when the server is back; every trial FINISHED, no epoch lost. A second sweep
    started the moment the server is back finds both trials claimed, although the outage outlasted
    FMC_CLAIM_TTL_SECONDS: a claim lives at least as long as the outage bound."""
    spec = write(tmp_path / "outage.yaml", "outage", ["a", "b"], epochs=20)
    env = sweep_env(server["url"], FMC_CLAIM_TTL_SECONDS="3", FMC_TRACKING_OUTAGE_SECONDS="180")
    client = MlflowClient(server["url"])
    proc = popen(spec, tmp_path, env, tmp_path / "sweep.log")
    try:
        wait_for(client, "outage", proc, training)
        stop(server["proc"])
        down = time.time() * 1000
        time.sleep(10)
        up = time.time() * 1000
        server["proc"] = start_mlflow_server(server["root"], server["port"])  # same port, same store
        second = sweep(spec, tmp_path, env)  # at once: the first sweep's heartbeats are 10+ s old
        assert second.returncode == 0, said(second)
        assert second.stdout.count("another sweep is running it") == 2 and "nothing to do" in second.stdout
        assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        stop(proc)
    runs = trial_runs(client, "outage")
    assert len(runs) == 2
    during = 0
    for group in runs.values():
        assert [r.info.status for r in group] == ["FINISHED"]  # one run per trial, nothing killed or rerun
        run = group[0]
        assert "kmeans_acc" in run.data.metrics
        for metric in ("loss", "val_loss", "epoch_seconds"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, 21)), (metric, run.info.run_name)
        during += sum(down < m.timestamp < up for m in client.get_metric_history(run.info.run_id, "loss"))
        # the trial's own record of the outage: how long it waited, how many calls arrived late
        assert run.data.metrics["tracking_outage_seconds"] > 3 and run.data.metrics["tracking_late_calls"] > 0
    assert during > 0  # epochs trained while the server was down, delivered afterwards
    parent = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("fmc.role") == "sweep"]
    assert [p.info.status for p in parent] == ["FINISHED"]


def test_outage_longer_than_the_bound_fails_resumably(server, tmp_path):
    """Past FMC_TRACKING_OUTAGE_SECONDS the trial stops with an error that says so; once the server is
    back (and the dead trial's claim has expired) the same command finishes it, once."""
    spec = write(tmp_path / "bound.yaml", "bound", ["a"], epochs=16)
    env = sweep_env(server["url"], FMC_TRACKING_OUTAGE_SECONDS="6", FMC_CLAIM_TTL_SECONDS="2")
    client = MlflowClient(server["url"])
    proc = subprocess.Popen(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(client, "bound", proc, training)
        stop(server["proc"])
        output, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 1, output[-4000:]
    last = output.strip().splitlines()[-1]  # fmc's own last word, after whatever Ray printed
    assert last.startswith("error:") and "unreachable for more than 6 s" in last, output[-4000:]
    server["proc"] = start_mlflow_server(server["root"], server["port"])
    time.sleep(claims.claim_ttl(6, 2) + 1)  # the stopped trial's run is still RUNNING: its claim expires
    again = sweep(spec, tmp_path, env)
    assert again.returncode == 0, said(again)
    ((key, runs),) = trial_runs(client, "bound").items()
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "KILLED"], statuses
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert "claim expired" in killed.data.tags["fmc.error"]


def test_concurrent_claims_on_one_trial_exactly_one_wins(mlflow_server):
    """Three claims on one trial written at the same moment (as three sweeps on three boxes would):
    exactly one wins, the others leave no run behind. A finished run then holds the trial, except for
    a rerun started after it."""
    from fmnist_cluster.config import TrialConfig
    from tracking import Tracker, TrialLogger

    tracker = Tracker(mlflow_server)
    exp = tracker.experiment("race")
    config = TrialConfig(model={"kind": "none"}, data={"subset": 200})
    ctx = tracker.context(exp, None, "race")
    loggers = [TrialLogger(ctx, "t", config, log_models=False) for _ in range(3)]
    barrier, results = threading.Barrier(3), [None] * 3

    def claim(i):
        barrier.wait()
        results[i] = loggers[i].start(claim=True)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results.count(None) == 1, results
    assert all("claimed" in r for r in results if r is not None)
    winner = loggers[results.index(None)]
    client = MlflowClient(mlflow_server)
    assert [r.info.run_id for r in client.search_runs([exp])] == [winner.run_id]  # the losers withdrew
    assert winner.finish() is None
    late = TrialLogger(ctx, "t", config, log_models=False)
    assert "finished already" in late.start(claim=True)
    rerun = TrialLogger(tracker.context(exp, None, "race", rerun_since=int(time.time() * 1000)), "t", config,
                        log_models=False)
    assert rerun.start(claim=True) is None and rerun.finish() is None


def test_two_sweeps_at_once_run_each_trial_once(mlflow_server, tmp_path):
    """Two sweep files sharing their first trial, started at once against one store: every trial ends
    FINISHED exactly once, the shared one is skipped by one sweep, which says why, and running the
    command again has nothing left to do."""
    # raw pixels: nothing to train, so the test is about who runs what (the race itself is forced in
    # test_concurrent_claims_on_one_trial_exactly_one_wins)
    a = write(tmp_path / "a.yaml", "twice", ["shared", "t2", "t3"], seeds=[2, 3, 4], model=RAW)
    b = write(tmp_path / "b.yaml", "twice", ["same", "own"], seeds=[2, 5], model=RAW)  # same = shared
    env = sweep_env(mlflow_server)
    procs = []
    for i, spec in enumerate((a, b)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        procs.append(subprocess.Popen(FMC + ["sweep", str(spec), "--no-models", "--max-concurrent", "1"],
                                      cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    runs = trial_runs(MlflowClient(mlflow_server), "twice")
    assert len(runs) == 4  # shared (= same), t2, t3, own
    for key, group in runs.items():
        finished = [r for r in group if r.info.status == "FINISHED"]
        assert len(finished) == 1, [(r.info.run_name, r.info.status) for r in group]
    skipped = [line for o in outputs for line in o.splitlines() if "SKIPPED" in line]
    assert len(skipped) == 1 and ("shared" in skipped[0] or "same" in skipped[0]), skipped
    last = subprocess.run(FMC + ["sweep", str(a)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0 and "all 3 trials of 'twice' already finished" in last.stdout


def test_a_dead_sweeps_claim_expires_and_a_live_one_holds(mlflow_server, tmp_path):
    """A RUNNING trial run whose heartbeat stopped long ago (its sweep died) does not block the trial:
    the sweep closes it as KILLED and runs the trial. One with a fresh heartbeat is left to its sweep."""
    from fmnist_cluster.config import load_sweep

    spec = write(tmp_path / "claims.yaml", "claims", ["dead", "live"], epochs=1, model=RAW)
    trials = {t.name: t.config for t in load_sweep(spec).expand()}
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("claims")
    ids = {}
    for name, age in (("dead", 3600), ("live", 0)):
        run = client.create_run(exp, run_name=name, tags={
            "fmc.role": "trial", "fmc.trial": name, "fmc.trial_key": trials[name].key(), "fmc.claim": "won",
            "fmc.sweep": "elsewhere", "fmc.host": "other-box", "fmc.heartbeat": str(int(time.time() - age))})
        ids[name] = run.info.run_id
    res = sweep(spec, tmp_path, sweep_env(mlflow_server))
    assert res.returncode == 0, said(res)
    assert "skipping live: another sweep is running it" in res.stdout and "other-box" in res.stdout
    dead = client.get_run(ids["dead"])
    assert dead.info.status == "KILLED" and "claim expired" in dead.data.tags["fmc.error"]
    assert client.get_run(ids["live"]).info.status == "RUNNING"
    runs = trial_runs(client, "claims")
    assert [r.info.status for r in runs[trials["dead"].key()] if r.info.run_id != ids["dead"]] == ["FINISHED"]
    assert len(runs[trials["live"].key()]) == 1
