"""Faults on real components: a store that refuses writes (a full disk), a trial's worker or a sweep's
driver killed, an address that is not MLflow, answers lost on the way back (a real `mlflow server` on
loopback, a real local Ray). The helpers are test_operations'."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import time

import pytest
from mlflow import MlflowClient

from conftest import free_port, start_mlflow_server, stop
from test_operations import (CONV, DENSE, LONG, RAW, by_name, popen, said, sweep, sweep_env, training, trial_runs,
                             wait_for, write)
from tracking import claims

# real Ray and MLflow servers, minutes (`make test-fast` leaves these out); sweeps join one shared Ray
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_ray")]


def test_one_trials_failure_fails_that_trial_only(server, tmp_path):
    """Two trials fail mid-sweep, each alone: in a group sharing one training the store refuses one
    trial's figures (HTTP 500, as for a full disk): it ends FAILED at once with what the server said,
    its scores kept, and the group's lead trains on and finishes; another trial's worker process is
    killed with SIGKILL (as the out-of-memory killer does): said in one line with the likely cause.
    No run is left RUNNING, and the same command then finishes the two failed trials."""
    spec = tmp_path / "fail.yaml"
    spec.write_text(LONG.format(experiment="fail", epochs=8, model=CONV, trials=(
        "  - {name: lead}\n  - {name: short, epochs: 3}\n  - {name: victim, seed: 1, epochs: 8}")))
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
    spec = write(tmp_path / "driver.yaml", "driver", ["a"], epochs=40, model=DENSE)
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


def test_trials_starting_together_log_the_same_dataset(mlflow_server):
    """Trials that start at once log the same dataset into one experiment; the store checks, then
    inserts, so all but one of them meet its unique key: each run still gets both dataset inputs."""
    import threading
    import uuid

    from fmnist_cluster.config import TrialConfig
    from tracking.store import client
    from tracking.trial_logger import _dataset_inputs, _log_inputs

    c = client(mlflow_server)
    exp = c.create_experiment(f"datasets-{uuid.uuid4().hex[:8]}")
    inputs = _dataset_inputs(TrialConfig(data={"subset": 300, "seed": 7}))
    runs = [c.create_run(exp).info.run_id for _ in range(6)]
    barrier, errors = threading.Barrier(len(runs)), []

    def start(run_id):
        barrier.wait()
        try:
            _log_inputs(c, run_id, inputs)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=start, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for run_id in runs:
        got = {(d.dataset.name, d.dataset.digest) for d in c.get_run(run_id).inputs.dataset_inputs}
        assert got == {(i.dataset.name, i.dataset.digest) for i in inputs}


@pytest.mark.parametrize("flag, value, expected", [("--gpu", "0.5", ("no GPU is visible to", "each trial asks for 0.5 GPU")),
                                                   ("--cpu", "64", ("each trial asks for 64 CPU, but", "lower --cpu"))])
def test_a_trial_that_cannot_fit_the_cluster_is_refused_at_once(run_fmc, tmp_path, flag, value, expected):
    """A trial asking for more than Ray has would wait in Ray's scheduler for ever: exit 1, said in one
    line, and no run opened."""
    spec = write(tmp_path / "big.yaml", "too-big", ["a"], model=RAW)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_fmc("sweep", spec, flag, value, "--tracking-uri", store, "--num-gpus", "0", timeout=300)
    assert res.returncode == 1, said(res)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(part in errors[0] for part in expected), said(res)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("too-big")
    assert exp is None or not client.search_runs([exp.experiment_id])
