"""Operations on real components: a tracking server that goes away in the middle of a sweep, a store
that refuses writes (out of space), two sweeps at once against one store, a sweep driver or a trial's
worker killed, and an address that is not MLflow (a real `mlflow server` on loopback, a real local Ray).
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import FMC, ROOT, free_port, start_mlflow_server, stop
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


def test_server_restart_mid_sweep_loses_nothing_and_keeps_the_claims(server, tmp_path):
    """The server is killed for 10 s while two trials train: they keep training, buffer what they cannot
    log and deliver it when the server is back; every trial FINISHED, no epoch lost. A second sweep
    started the moment the server is back finds both trials claimed, although the outage outlasted
    FMC_CLAIM_TTL_SECONDS: a claim lives at least as long as the outage bound."""
    spec = write(tmp_path / "outage.yaml", "outage", ["a", "b"], epochs=24)
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
            assert sorted(m.step for m in history) == list(range(1, 25)), (metric, run.info.run_name)
        during += sum(down < m.timestamp < up for m in client.get_metric_history(run.info.run_id, "loss"))
        # the trial's own record of the outage: how long it waited, how many calls arrived late
        assert run.data.metrics["tracking_outage_seconds"] > 3 and run.data.metrics["tracking_late_calls"] > 0
    assert during > 0  # epochs trained while the server was down, delivered afterwards
    parent = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("fmc.role") == "sweep"]
    assert [p.info.status for p in parent] == ["FINISHED"]


def test_outage_longer_than_the_bound_fails_resumably(server, tmp_path):
    """Past FMC_TRACKING_OUTAGE_SECONDS the trial stops with an error that says so; once the server is
    back (and the dead trial's claim has expired) the same command finishes it, once."""
    spec = write(tmp_path / "bound.yaml", "bound", ["a"], epochs=40)
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
    """Two sweep files sharing their first trial, started at once against one store: both reach the
    shared trial while it runs; every trial ends FINISHED exactly once, the skipped one says why, and
    running the command again has nothing left to do."""
    a = write(tmp_path / "a.yaml", "twice", ["shared", "t2", "t3"], epochs=6, seeds=[2, 3, 4], model=DENSE)
    b = write(tmp_path / "b.yaml", "twice", ["same", "own"], epochs=6, seeds=[2, 5], model=DENSE)  # same = shared
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


def test_one_trials_failure_fails_that_trial_only(server, tmp_path):
    """Two trials fail mid-sweep, each alone: in a group sharing one training the store refuses one
    trial's figures (HTTP 500, as for a full disk): it ends FAILED at once with what the server said,
    its scores kept, and the group's lead trains on and finishes; another trial's worker process is
    killed with SIGKILL (as the out-of-memory killer does): said in one line with the likely cause.
    No run is left RUNNING, and the same command then finishes the two failed trials."""
    spec = tmp_path / "fail.yaml"
    spec.write_text(LONG.format(experiment="fail", epochs=8, model=CONV, trials=(
        "  - {name: lead}\n  - {name: short, epochs: 3}\n  - {name: victim, seed: 1, epochs: 12}")))
    client, env = MlflowClient(server["url"]), sweep_env(server["url"])
    proc = popen(spec, tmp_path, env, tmp_path / "sweep.log")
    try:
        short = wait_for(client, "fail", proc, lambda runs: next((r for r in runs if r.info.run_name == "short"), None))
        # the server's folder for the short trial's plots becomes a file: it cannot store them
        blocked = server["root"] / "artifacts" / short.info.experiment_id / short.info.run_id / "artifacts" / "plots"
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("not a folder")
        victim = wait_for(client, "fail", proc, lambda runs: next(
            (r for r in runs if r.info.run_name == "victim" and "loss" in r.data.metrics), None))
        os.kill(int(victim.data.tags["fmc.pid"]), signal.SIGKILL)  # a process this test's sweep started
        assert proc.wait(timeout=600) == 1, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        stop(proc)
    output = (tmp_path / "sweep.log").read_text()
    runs = by_name(client, "fail")
    assert [r.info.status for rs in runs.values() for r in rs].count("RUNNING") == 0
    (lead,), (refused,), (killed,) = runs["lead"], runs["short"], runs["victim"]
    assert lead.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(lead.info.run_id, "loss")] == list(range(1, 9))
    assert refused.info.status == "FAILED", refused.info.status
    assert "refused plots/" in refused.data.tags["fmc.error"] and "HTTP 500" in refused.data.tags["fmc.error"]
    assert "kmeans_acc" in refused.data.metrics  # what was recorded before the refusal stays
    assert killed.info.status == "FAILED" and "worker process died" in killed.data.tags["fmc.error"]
    said_short = [line for line in output.splitlines() if line.startswith("FAILED short:")]
    said_victim = [line for line in output.splitlines() if line.startswith("FAILED victim:")]
    assert len(said_short) == 1 and "refused plots/" in said_short[0] and "HTTP 500" in said_short[0], output[-3000:]
    assert len(said_victim) == 1 and "out-of-memory" in said_victim[0], output[-3000:]
    assert "Worker exit type" not in output.split("sweep finished")[-1]  # one line, not Ray's paragraph
    blocked.unlink()
    again = sweep(spec, tmp_path, env)
    assert again.returncode == 0 and "1 of 3 trials already finished" in again.stdout, said(again)
    for name in ("short", "victim"):
        assert sorted(r.info.status for r in by_name(client, "fail")[name]) == ["FAILED", "FINISHED"]


def test_a_full_artifact_store_fails_at_once_and_a_rerun_finishes(tmp_path):
    """The artifact store is out of space (a real full filesystem where this machine lets root mount
    one, else a folder the server cannot write in): the sweep says what the server answered and exits
    1 at once, not after the outage bound; once space is freed the same command finishes every trial
    once."""
    root = tmp_path / "server"
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(artifacts)],
                             capture_output=True).returncode == 0
    port = free_port()
    proc = start_mlflow_server(root, port)
    url = f"http://127.0.0.1:{port}"
    client = MlflowClient(url)
    exp = client.create_experiment("full")
    blocker = artifacts / ("filler" if mounted else exp)
    if mounted:
        subprocess.run(["dd", "if=/dev/zero", f"of={blocker}", "bs=64k", "count=1000"], capture_output=True)
    else:
        blocker.write_text("not a folder")  # where the experiment's artifacts would go
    try:
        spec = write(tmp_path / "full.yaml", "full", ["a", "b"], model=RAW)
        env = sweep_env(url)  # the default outage bound (600 s): waiting it out would time this test out
        res = sweep(spec, tmp_path, env, timeout=240)
        assert res.returncode == 1, said(res)
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "refused" in last and "HTTP 500" in last, said(res)
        blocker.unlink()  # space freed
        again = sweep(spec, tmp_path, env)
        assert again.returncode == 0, said(again)
        runs = trial_runs(client, "full")
        assert len(runs) == 2 and all([r.info.status for r in g] == ["FINISHED"] for g in runs.values())
        parents = client.search_runs([exp], "tags.`fmc.role` = 'sweep'")
        assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]  # nothing left RUNNING
    finally:
        stop(proc)
        if mounted:
            subprocess.run(["umount", str(artifacts)], capture_output=True)


def test_a_killed_driver_then_the_same_command_after_the_claim_ttl(mlflow_server, tmp_path):
    """The sweep's driver killed with SIGKILL mid-sweep (with its local Ray): its trial's run stays
    RUNNING until its claim expires; then the same command closes it KILLED and runs the trial once."""
    spec = write(tmp_path / "driver.yaml", "driver", ["a"], epochs=30, model=DENSE)
    env = sweep_env(mlflow_server, FMC_TRACKING_OUTAGE_SECONDS="4", FMC_CLAIM_TTL_SECONDS="2")
    client = MlflowClient(mlflow_server)
    proc = popen(spec, tmp_path, env, tmp_path / "sweep.log")
    try:
        wait_for(client, "driver", proc, training)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's whole process group: the box lost it
        proc.wait()
    (run,) = by_name(client, "driver")["a"]
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    time.sleep(claims.claim_ttl(4, 2) + 1)
    again = sweep(spec, tmp_path, env)
    assert again.returncode == 0, said(again)
    statuses = sorted(r.info.status for r in by_name(client, "driver")["a"])
    assert statuses == ["FINISHED", "KILLED"], statuses


def test_an_address_that_is_not_mlflow_is_refused_before_anything_starts(run_fmc, tmp_path):
    """Something answers HTTP at the tracking URI, but it is not MLflow: exit 2, said in one line."""
    (tmp_path / "index.html").write_text("<html>a web page</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = lambda *a, **kw: Quiet(*a, directory=str(tmp_path), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        spec = write(tmp_path / "web.yaml", "web", ["a"], model=RAW)
        res = run_fmc("sweep", spec, "--tracking-uri", f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
    assert res.returncode == 2, said(res)
    assert "no MLflow API there" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "ray_results").exists()


class AnswerLost:
    """A loopback proxy in front of the MLflow server that forwards every request and, for the first
    request matching each (method, path suffix) rule, drops the server's answer and says 502 instead:
    what a gateway does when the server committed a write but the answer did not come back."""

    def __init__(self, upstream: str, rules: list[tuple[str, str]]):
        import http.client
        import re
        from urllib.parse import urlparse

        target = urlparse(upstream)
        self.dropped = {rule: 0 for rule in rules}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                path = self.path.split("?")[0]
                rule = next((r for r in rules if r[0] == self.command and re.search(r[1], path)), None)
                if rule is not None and outer.dropped[rule] == 0:  # committed upstream, answer lost
                    outer.dropped[rule] += 1
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_retried_writes_whose_answer_was_lost_are_not_repeated(mlflow_server):
    """The server commits a trial's create-run and its model's finalize but the answers are lost (502):
    the retries find what was committed instead of adding an orphan run or a second model."""
    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.trial import run_trial
    from tracking import Tracker, TrialLogger

    rules = [("POST", r"/mlflow/runs/create$"), ("PATCH", r"/mlflow/logged-models/[^/]+$")]
    proxy = AnswerLost(mlflow_server, rules)
    try:
        tracker = Tracker(proxy.url)
        exp = tracker.experiment("lost-answers")
        config = TrialConfig(model={"kind": "none"}, data={"subset": 200}, clusterers=["kmeans"], kmeans={"n_init": 1})
        result = run_trial(config, figures=False)
        with TrialLogger(tracker.context(exp, None, "lost"), "t", config) as log:
            log.result(result)
    finally:
        proxy.close()
    assert proxy.dropped == {rule: 1 for rule in rules}  # both answers were lost once
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([exp])
    assert run.info.status == "FINISHED" and run.info.run_id == log.run_id
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    models = mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
    assert [(m.name, str(getattr(m.status, "value", m.status))) for m in models] == [("kmeans_clusterer", "READY")]
