"""Scale-out on this machine, with real Ray: a cluster of two nodes (two `ray start` processes, token
auth on as in docker-compose.yml) that a sweep joins with --address, and a local Ray given logical GPUs
that a sweep shares out in halves. What these cannot show (real CUDA devices, a second box) is said in
docs/performance.md."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import FMC, RAY_GRACE, ROOT, free_port, ray_node, stop, wait_nodes

pytestmark = pytest.mark.slow  # real Ray and MLflow servers, minutes: `make test-fast` leaves these out

SPEC = """\
experiment: {experiment}
data: {{subset: 300, seed: 0}}
defaults:
  model: {{kind: dense, units: [32, 8]}}
  epochs: {epochs}
  kmeans: {{n_init: 1}}
  clusterers: [kmeans]
trials:
{trials}
resources: {{cpu: {cpu}}}
"""


def write(path: Path, experiment: str, n: int, epochs: int, cpu: float) -> Path:
    trials = "\n".join(f"  - {{name: t{i}, seed: {i}}}" for i in range(n))
    path.write_text(SPEC.format(experiment=experiment, epochs=epochs, trials=trials, cpu=cpu))
    return path


def children(url: str, experiment: str) -> list:
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'", max_results=100)


def max_overlap(runs: list) -> int:
    """Most child runs open at one instant (from their start and end times in MLflow)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_sweep_on_a_two_node_ray_cluster_with_token_auth(mlflow_server, tmp_path):
    """Head and a second node, each with 1 CPU, token auth on: a sweep joins with --address and its
    trials land on both nodes, each child run tagged with the node that ran it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = Path(f"/tmp/fmc-ray-{port}")  # Ray's socket paths must stay short: not under pytest's tmp_path
    head = ray_node(["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp),
                     "--ray-client-server-port", str(free_port())], env, tmp_path / "head.log")
    nodes = [head]
    try:
        time.sleep(3)
        nodes.append(ray_node(["--address", address], env, tmp_path / "node2.log"))
        wait_nodes(address, env, 2, nodes)
        # without the token the cluster turns a driver away
        intruder = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}', logging_level='ERROR')"],
            env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}, capture_output=True, text=True, timeout=120)
        assert intruder.returncode != 0
        spec = write(tmp_path / "two.yaml", "two-nodes", n=4, epochs=2, cpu=1)
        res = subprocess.run(FMC + ["sweep", str(spec), "--address", address, "--no-models"], cwd=tmp_path,
                             env={**env, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    finally:
        for proc in reversed(nodes):
            stop(proc, grace=RAY_GRACE)
    runs = children(mlflow_server, "two-nodes")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    placed = {r.data.tags["fmc.node"] for r in runs}
    assert len(placed) == 2, placed  # both nodes ran trials
    assert max_overlap(runs) <= 2  # never more trials at once than the two 1-CPU nodes hold


def test_logical_gpus_are_shared_out_in_halves(mlflow_server, tmp_path):
    """A local Ray told it has 2 GPUs and trials asking for 0.5 GPU each: at most 4 trials at once, and
    each child run records the CUDA_VISIBLE_DEVICES Ray gave it (one of the two devices)."""
    spec = write(tmp_path / "gpus.yaml", "logical-gpus", n=5, epochs=3, cpu=0.25)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_server}
    res = subprocess.run(FMC + ["sweep", str(spec), "--num-gpus", "2", "--gpu", "0.5", "--no-models"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = children(mlflow_server, "logical-gpus")
    (parent,) = MlflowClient(mlflow_server).search_runs([runs[0].info.experiment_id], "tags.`fmc.role` = 'sweep'")
    assert parent.data.params["resources.gpu"] == "0.5"
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    devices = [r.data.tags["fmc.cuda_visible_devices"] for r in runs]
    assert set(devices) <= {"0", "1"} and len(set(devices)) == 2, devices
    assert 2 <= max_overlap(runs) <= 4
