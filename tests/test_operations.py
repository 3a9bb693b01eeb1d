"""Operations on real components: a tracking server that goes away in the middle of a sweep, and two
sweeps started at once against one store (a real `mlflow server` on loopback, a real local Ray)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import FMC, ROOT, free_port, start_mlflow_server, stop

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


def write(path, experiment: str, names: list[str], epochs: int = 3, seeds: list[int] | None = None,
          model: str = CONV):
    trials = "\n".join(f"  - {{name: {n}, seed: {s}}}" for n, s in zip(names, seeds or range(len(names))))
    path.write_text(LONG.format(experiment=experiment, epochs=epochs, trials=trials, model=model))
    return path


def sweep_env(url: str, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url, **extra}


def trial_runs(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'", max_results=1000):
        out.setdefault(r.data.tags["fmc.trial_key"], []).append(r)
    return out


def wait_for_loss(client: MlflowClient, experiment: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before training"
        exp = client.get_experiment_by_name(experiment)
        if exp and any("loss" in r.data.metrics for r in client.search_runs([exp.experiment_id])):
            return
        time.sleep(1)
    pytest.fail(f"no trial trained an epoch within {timeout} s")


@pytest.fixture
def server(tmp_path):
    """A server of this test's own, which the test may stop and start again on the same port and store."""
    root = tmp_path / "server"
    root.mkdir()
    box = {"port": free_port(), "root": root}
    box["proc"] = start_mlflow_server(root, box["port"])
    box["url"] = f"http://127.0.0.1:{box['port']}"
    yield box
    stop(box["proc"])


def test_server_restart_mid_sweep_loses_nothing(server, tmp_path):
    """The server is killed for 12 s while two trials train: they keep training, buffer what they
    cannot log and deliver it when the server is back; every trial FINISHED, no epoch lost."""
    spec = write(tmp_path / "outage.yaml", "outage", ["a", "b"], epochs=30)
    client = MlflowClient(server["url"])
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=sweep_env(server["url"]),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_loss(client, "outage", proc)
        stop(server["proc"])
        down = time.time() * 1000
        time.sleep(12)
        up = time.time() * 1000
        server["proc"] = start_mlflow_server(server["root"], server["port"])  # same port, same store
        assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    runs = trial_runs(client, "outage")
    assert len(runs) == 2
    during = 0
    for (run,) in runs.values():
        assert run.info.status == "FINISHED" and "kmeans_acc" in run.data.metrics
        for metric in ("loss", "val_loss", "epoch_seconds"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, 31)), (metric, run.info.run_name)
        during += sum(down < m.timestamp < up for m in client.get_metric_history(run.info.run_id, "loss"))
        # the trial's own record of the outage: how long it waited, how many calls arrived late
        assert run.data.metrics["tracking_outage_seconds"] > 5 and run.data.metrics["tracking_late_calls"] > 0
    assert during > 0  # epochs trained while the server was down, delivered afterwards
    parent = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("fmc.role") == "sweep"]
    assert [p.info.status for p in parent] == ["FINISHED"]


def test_outage_longer_than_the_bound_fails_resumably(server, tmp_path):
    """Past FMC_TRACKING_OUTAGE_SECONDS the trial stops with an error that says so; once the server is
    back (and the dead trial's claim has expired) the same command finishes it, once."""
    spec = write(tmp_path / "bound.yaml", "bound", ["a"], epochs=40)
    env = sweep_env(server["url"], FMC_TRACKING_OUTAGE_SECONDS="6", FMC_CLAIM_TTL_SECONDS="8")
    client = MlflowClient(server["url"])
    proc = subprocess.Popen(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_loss(client, "bound", proc)
        stop(server["proc"])
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-4000:]
    last = output.strip().splitlines()[-1]  # fmc's own last word, after whatever Ray printed
    assert last.startswith("error:") and "unreachable for more than 6 s" in last, output[-4000:]
    server["proc"] = start_mlflow_server(server["root"], server["port"])
    time.sleep(9)  # the stopped trial's run is still RUNNING: its claim expires after the TTL
    again = subprocess.run(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ((key, runs),) = trial_runs(client, "bound").items()
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "KILLED"], statuses
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert "claim expired" in killed.data.tags["fmc.error"]


def test_two_sweeps_at_once_run_each_trial_once(mlflow_server, tmp_path):
    """The same sweep started twice, and a second file sharing one trial with it, all at once against
    one store: every trial ends FINISHED exactly once, the skipped ones say why, and a final run of
    the command has nothing left to do."""
    a = write(tmp_path / "a.yaml", "twice", ["t1", "t2", "t3", "t4"], epochs=1, seeds=[1, 2, 3, 4], model=DENSE)
    b = write(tmp_path / "b.yaml", "twice", ["shared", "own"], epochs=1, seeds=[2, 5], model=DENSE)  # shared = t2
    env = sweep_env(mlflow_server)
    procs = []
    for i, spec in enumerate((a, a, b)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        procs.append(subprocess.Popen(FMC + ["sweep", str(spec), "--no-models", "--max-concurrent", "1"],
                                      cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(o[-3000:] for o in outputs)
    runs = trial_runs(MlflowClient(mlflow_server), "twice")
    assert len(runs) == 5  # t1..t4 and 'own'; 'shared' has t2's key
    for key, group in runs.items():
        finished = [r for r in group if r.info.status == "FINISHED"]
        assert len(finished) == 1, [(r.info.run_name, r.info.status) for r in group]
    said = "\n".join(outputs)
    assert "SKIPPED" in said and ("claimed" in said or "finished already" in said or "another sweep" in said)
    last = subprocess.run(FMC + ["sweep", str(a)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0 and "all 4 trials of 'twice' already finished" in last.stdout


def test_a_dead_sweeps_claim_expires_and_a_live_one_holds(mlflow_server, tmp_path):
    """A RUNNING trial run whose heartbeat stopped long ago (its sweep died) does not block the trial:
    the sweep closes it as KILLED and runs the trial. One with a fresh heartbeat is left to its sweep."""
    from fmnist_cluster.config import load_sweep

    spec = write(tmp_path / "claims.yaml", "claims", ["dead", "live"], epochs=1, model=DENSE)
    trials = {t.name: t.config for t in load_sweep(spec).expand()}
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("claims")
    ids = {}
    for name, age in (("dead", 3600), ("live", 0)):
        run = client.create_run(exp, run_name=name, tags={
            "fmc.role": "trial", "fmc.trial": name, "fmc.trial_key": trials[name].key(), "fmc.claim": "won",
            "fmc.sweep": "elsewhere", "fmc.host": "other-box", "fmc.heartbeat": str(int(time.time() - age))})
        ids[name] = run.info.run_id
    res = subprocess.run(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=sweep_env(mlflow_server),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "skipping live: another sweep is running it" in res.stdout and "other-box" in res.stdout
    dead = client.get_run(ids["dead"])
    assert dead.info.status == "KILLED" and "claim expired" in dead.data.tags["fmc.error"]
    assert client.get_run(ids["live"]).info.status == "RUNNING"
    runs = trial_runs(client, "claims")
    assert [r.info.status for r in runs[trials["dead"].key()] if r.info.run_id != ids["dead"]] == ["FINISHED"]
    assert len(runs[trials["live"].key()]) == 1
