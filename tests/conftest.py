"""Shared fixtures: the real dataset, a real MLflow server on loopback, and helpers to run the CLI."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMC = [sys.executable, "-m", "fmnist_cluster.cli"]
# claims settle in half a second, not two: the test servers are on loopback (a request takes ms)
os.environ.setdefault("FMC_CLAIM_SETTLE_SECONDS", "0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a process group we started, by its id: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with a SQLite backend and artifact root in ``root``;
    returns once it answers."""
    # no job runner (a second process fmc never uses): the server starts faster and lighter
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, env=env, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and its own artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


# `ray start --block` takes ~30 s to stop gracefully; a test's Ray holds nothing worth that
RAY_GRACE = 3
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]


def ray_node(args: list[str], env: dict, log: Path, cpus: int = 1) -> subprocess.Popen:
    """One `ray start --block` process (a Ray node) in a process group of its own, so that the test
    stops it, and only it, by its id."""
    return subprocess.Popen(RAY + ["start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                                   "--num-gpus", "0", "--object-store-memory", str(150 * 2**20),
                                   "--dashboard-agent-listen-port", str(free_port()), *args],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_nodes(address: str, env: dict, n: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(node['Alive'] for node in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a Ray node exited while starting"
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    pytest.fail(f"the Ray cluster at {address} did not reach {n} nodes in {timeout} s")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One real Ray cluster on loopback (a head node with this machine's CPUs) for a module's sweep
    tests to join (RAY_ADDRESS), so that each sweep does not start and stop a Ray of its own, which
    costs tens of seconds each on a 2-core machine; stopped before the next module (the scale-out
    tests start clusters of their own). The interrupt test starts its own local Ray."""
    port = free_port()
    temp = Path(f"/tmp/fmc-ray-{port}")  # Ray's socket paths must stay short: not under pytest's tmp_path
    # `ray start` turns token auth on: the head, its workers and every driver share one token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **auth}
    env.pop("RAY_ADDRESS", None)
    head = ray_node(["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp),
                     "--ray-client-server-port", str(free_port())], env,
                    tmp_path_factory.mktemp("ray") / "head.log", cpus=os.cpu_count() or 2)
    try:
        wait_nodes(f"127.0.0.1:{port}", env, 1, [head])
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        stop(head, grace=RAY_GRACE)


@pytest.fixture(scope="module")
def on_shared_ray(ray_cluster):
    """The module's sweeps join the shared cluster (RAY_ADDRESS and its token in the environment they
    inherit)."""
    before = {k: os.environ.get(k) for k in ray_cluster}
    os.environ.update(ray_cluster)
    yield ray_cluster["RAY_ADDRESS"]
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


@pytest.fixture
def run_fmc(tmp_path):
    """Run the `fmc` CLI in a subprocess in ``tmp_path``; returns the CompletedProcess."""

    def run(*args, env=None, timeout=600, cwd=None):
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None) if "MLFLOW_TRACKING_URI" not in (env or {}) else None
        return subprocess.run(FMC + [str(a) for a in args], cwd=cwd or tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
