"""The deployment on a real Docker engine: the project's Dockerfile built and its docker-compose.yml
brought up as users get them, on a dockerd this test starts (its own data root and socket under a
temporary folder) and stops.

No image registry is reachable here, so the two base images are stand-ins built from Debian's packages
and tagged as the names the files use: ``python:3.11-slim-bookworm`` (Debian's Python 3.11, pip, no
EXTERNALLY-MANAGED marker, as the official image) and ``postgres:17-bookworm`` (Debian's PostgreSQL
with the official image's contract, tests/engine/postgres-entrypoint.sh). Both trust the CAs this
machine trusts (its package registry goes through them).

A test override puts every service on the host network, bound to loopback on free ports (no bridge
network: nothing talks to private address ranges); it changes addresses, ports and healthchecks only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ROOT, free_port
from test_deploy import SECRETS, compose_config, with_option

# the first test also waits for the base images, the image build and the stack's start (~5 min alone)
pytestmark = [pytest.mark.slow, pytest.mark.engine, pytest.mark.timeout(2400)]
PROJECT = "fmcengine"
MIRROR = "http://deb.debian.org/debian"
CA_HOOK = ('for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && '
           'cp "$c" "$1"/usr/local/share/ca-certificates/; done; chroot "$1" update-ca-certificates >/dev/null')
# name -> (Debian packages, mmdebstrap hooks, docker import changes)
BASE_IMAGES = {
    "python:3.11-slim-bookworm": (
        "python3,python3-venv,python3-pip,python-is-python3,make,ca-certificates",
        ['rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED', CA_HOOK],
        ['ENV LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt', 'CMD ["python3"]']),
    "postgres:17-bookworm": (
        "postgresql,ca-certificates",
        [f"copy-in {ROOT / 'tests/engine/postgres-entrypoint.sh'} /usr/local/bin", CA_HOOK],
        ["ENV PGDATA=/var/lib/postgresql/data LANG=C.UTF-8",
         'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]', 'CMD ["postgres"]']),
}
TINY_SWEEP = ("experiment: deploy-engine\n"
              "data: {subset: 200, seed: 0}\n"
              "defaults: {model: {kind: conv, filters: [8, 4, 4]}, epochs: 1, kmeans: {n_init: 1},"
              " gmm: {n_init: 1, covariance_type: diag}}\n"
              "trials: [{name: conv}, {name: raw, model: {kind: none}}]\n"
              "resources: {cpu: 1}\nmax_concurrent: 2\n")
TIMINGS: dict[str, float] = {}


def run(argv: list[str], env: dict, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(argv[:6])} ... exited {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def timed(name: str, argv: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    res = run(argv, env, **kw)
    TIMINGS[name] = round(time.perf_counter() - start, 1)
    return res


@pytest.fixture(scope="module")
def engine():
    """A dockerd of this test's own; its environment (DOCKER_HOST) for the docker tools."""
    if os.geteuid() != 0:
        pytest.fail("the engine test starts dockerd, which needs root (CI runs as root)")
    for tool in ("dockerd", "docker", "docker-compose", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing: make test-deps installs docker.io, docker-compose, mmdebstrap"
    root = Path(tempfile.mkdtemp(prefix="fmc-engine-", dir="/tmp"))  # short: socket paths must fit
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "w")
    proc = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false",
                             f"--data-root={root / 'data'}", f"--exec-root={root / 'exec'}",
                             f"--pidfile={root / 'docker.pid'}", f"--host=unix://{sock}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))},
           "DOCKER_HOST": f"unix://{sock}"}
    try:
        deadline = time.time() + 90
        while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, (root / "dockerd.log").read_text()[-3000:]
            time.sleep(1)
        yield {"env": env, "root": root}
    finally:
        proc.send_signal(signal.SIGTERM)  # dockerd stops its containers, then itself
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
        for target in sorted((m for m in mounts.split() if m.startswith(str(root))), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base_images(engine):
    """The two base images, built offline from Debian's packages (both at once) and imported."""
    env, root = engine["env"], engine["root"]
    start = time.perf_counter()
    procs = {}
    for i, (name, (packages, hooks, _)) in enumerate(BASE_IMAGES.items()):
        argv = ["mmdebstrap", "--quiet", "--variant=apt", f"--include={packages}"]
        argv += [f"--customize-hook={hook}" for hook in hooks]
        argv += ["bookworm", str(root / f"base{i}.tar"), MIRROR]
        procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for i, (name, proc) in enumerate(procs.items()):
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"mmdebstrap for {name}:\n{out[-3000:]}"
        changes = [a for change in BASE_IMAGES[name][2] for a in ("--change", change)]
        run(["docker", "import", *changes, str(root / f"base{i}.tar"), name], env)
        (root / f"base{i}.tar").unlink()
    TIMINGS["base images"] = round(time.perf_counter() - start, 1)


def override(resolved: dict, ports: dict[str, int], sweeps: Path) -> dict:
    """Every service on the host network, on loopback, on the free ``ports``; nothing else changed."""
    services = resolved["services"]
    pg, ml, gcs = ports["postgres"], ports["mlflow"], ports["gcs"]
    build = {"network": "host"}  # the build's RUN steps reach the registries through the host
    mlflow_cmd = services["mlflow"]["command"]
    for option, value in (("--host", "127.0.0.1"), ("--port", str(ml))):
        mlflow_cmd = with_option(mlflow_cmd, option, value)
    hosts = mlflow_cmd[mlflow_cmd.index("--allowed-hosts") + 1]
    mlflow_cmd = with_option(mlflow_cmd, "--allowed-hosts", f"{hosts},127.0.0.1:{ml}")
    ray_cmd = services["ray-head"]["command"]
    for option, value in (("--port", gcs), ("--node-ip-address", "127.0.0.1"), ("--dashboard-host", "127.0.0.1"),
                          ("--dashboard-port", ports["dashboard"]), ("--ray-client-server-port", ports["client"]),
                          ("--dashboard-agent-listen-port", ports["agent"]), ("--num-cpus", 2),
                          # workers' ports apart from those of the local Rays other tests start
                          ("--min-worker-port", 20000), ("--max-worker-port", 20499)):
        ray_cmd = with_option(ray_cmd, option, str(value))
    store = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:5432/", f"@127.0.0.1:{pg}/")
    return {"version": resolved.get("version", "3.9"), "services": {
        "postgres": {"network_mode": "host", "command": ["postgres", "-c", "listen_addresses=127.0.0.1", "-c", f"port={pg}"],
                     "healthcheck": {"test": ["CMD", "pg_isready", "-h", "127.0.0.1", "-p", str(pg), "-U", "mlflow",
                                              "-d", "mlflow"], "interval": "3s"}},
        "mlflow": {"network_mode": "host", "build": build, "command": mlflow_cmd,
                   "environment": {"MLFLOW_BACKEND_STORE_URI": store},
                   "healthcheck": {"test": ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen("
                                            f"'http://127.0.0.1:{ml}/health', timeout=5)"], "interval": "3s"}},
        # the project's timings: a `ray health-check` every 3 s would take most of a 2-core box
        "ray-head": {"network_mode": "host", "build": build, "command": ray_cmd,
                     "healthcheck": {"test": ["CMD", "ray", "health-check", "--address", f"127.0.0.1:{gcs}"]}},
        "ray-worker": {"network_mode": "host", "build": build},
        "fmc": {"network_mode": "host", "build": build,
                "environment": {"RAY_ADDRESS": f"127.0.0.1:{gcs}", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml}"},
                "volumes": [f"{sweeps}:/opt/fmc/test-sweeps:ro"]},
    }}


@pytest.fixture(scope="module")
def stack(engine, base_images, tmp_path_factory):
    """The image built (the CPU variant) and the stack up and healthy; its docker-compose command line."""
    env, tmp = engine["env"], tmp_path_factory.mktemp("stack")
    settings = {**SECRETS, "FMC_VARIANT": "cpu", "RAY_SHM_SIZE": "2gb"}
    resolved = yaml.safe_load(compose_config(tmp, settings).stdout)
    ports = {k: free_port() for k in ("postgres", "mlflow", "gcs", "dashboard", "client", "agent")}
    (tmp / "sweeps").mkdir()
    (tmp / "sweeps" / "tiny.yaml").write_text(TINY_SWEEP)
    (tmp / "override.yml").write_text(yaml.safe_dump(override(resolved, ports, tmp / "sweeps")))
    # docker-compose's own merge of the project's file and the override; host networking has no use for
    # published ports (and refuses them), and an override can only add to a list: they are dropped here
    res = compose_config(tmp, settings, (ROOT / "docker-compose.yml", tmp / "override.yml"))
    assert res.returncode == 0, res.stderr
    merged = yaml.safe_load(res.stdout)
    for service in merged["services"].values():
        assert service["network_mode"] == "host"
        service.pop("ports", None)
    (tmp / "stack.yml").write_text(yaml.safe_dump(merged))
    compose = ["docker-compose", "-p", PROJECT, "--project-directory", str(ROOT), "-f", str(tmp / "stack.yml")]
    timed("image build", compose + ["build"], env, timeout=1800)
    up(compose, env)
    try:
        yield {"compose": compose, "env": env, "ports": ports, "url": f"http://127.0.0.1:{ports['mlflow']}"}
    finally:
        run(compose + ["down", "-v", "--remove-orphans"], env, check=False, timeout=300)
        print("engine test timings (s):", json.dumps(TIMINGS))


def up(compose: list[str], env: dict) -> None:
    """``up -d``, then wait for every started service's healthcheck."""
    start = time.perf_counter()
    run(compose + ["up", "-d"], env, timeout=900)
    deadline = time.time() + 600
    for service in ("postgres", "mlflow", "ray-head"):
        cid = run(compose + ["ps", "-q", service], env).stdout.strip()
        while True:
            state = json.loads(run(["docker", "inspect", "-f", "{{json .State}}", cid], env).stdout)
            if state.get("Health", {}).get("Status") == "healthy":
                break
            if not state["Running"] or time.time() > deadline:
                logs = run(["docker", "logs", "--tail", "60", cid], env, check=False)
                pytest.fail(f"{service} is not healthy ({state.get('Health', {}).get('Status')}):\n"
                            f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            time.sleep(2)
    TIMINGS.setdefault("up", round(time.perf_counter() - start, 1))


def client(stack, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_TRACKING_PASSWORD"])
    return MlflowClient(stack["url"])


def trial_runs(stack, monkeypatch) -> dict:
    c = client(stack, monkeypatch)
    exp = c.get_experiment_by_name("deploy-engine")
    return {r.data.tags["fmc.trial"]: r for r in c.search_runs([exp.experiment_id]) if "fmc.trial" in r.data.tags}


def test_sweep_through_the_stack(stack, monkeypatch):
    compose, env = stack["compose"], stack["env"]
    res = timed("sweep", compose + ["run", "--rm", "-T", "fmc", "sweep", "/opt/fmc/test-sweeps/tiny.yaml"], env,
                timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    trials = trial_runs(stack, monkeypatch)
    assert set(trials) == {"conv", "raw"}
    assert all(r.info.status == "FINISHED" and "kmeans_acc" in r.data.metrics for r in trials.values())
    # the artifacts went through MLflow's proxy into the artifact volume, and come back
    stored = {a.path for a in client(stack, monkeypatch).list_artifacts(trials["conv"].info.run_id)}
    assert "config.json" in stored
    # the trials ran on a Ray node of the stack, each tagged with it
    assert all(r.data.tags.get("fmc.node") for r in trials.values())
    # an anonymous API call is refused
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(stack["url"] + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert denied.value.code == 401

    # the study-style table through the stack
    res = timed("report", compose + ["run", "--rm", "-T", "fmc", "report", "deploy-engine"], env, timeout=600)
    assert "conv" in res.stdout and "raw" in res.stdout and "kmeans" in res.stdout.lower()


def test_ray_refuses_a_wrong_token(stack):
    compose, env = stack["compose"], stack["env"]
    check = ["ray", "health-check", "--address", f"127.0.0.1:{stack['ports']['gcs']}"]
    assert run(compose + ["exec", "-T", "ray-head", *check], env, timeout=120, check=False).returncode == 0
    refused = run(compose + ["exec", "-T", "-e", "RAY_AUTH_TOKEN=wrong-token", "ray-head", *check], env,
                  timeout=120, check=False)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr


def container_pids(stack, service: str) -> list[tuple[int, int]]:
    """(host pid, uid) of a service's processes: its main process and all it started (not the
    healthchecks that docker execs beside them, which run as the image's user: root in postgres's)."""
    compose, env = stack["compose"], stack["env"]
    cid = run(compose + ["ps", "-q", service], env).stdout.strip()
    main = psutil.Process(int(run(["docker", "inspect", "-f", "{{.State.Pid}}", cid], env).stdout))
    return [(p.pid, p.uids().real) for p in [main, *main.children(recursive=True)]]


def test_users_and_listeners(stack):
    pids = {}
    for service in ("mlflow", "ray-head", "postgres"):
        procs = container_pids(stack, service)
        assert procs, service
        uids = {uid for _, uid in procs}
        if service == "postgres":  # the official image's contract: the postgres user, never root
            assert 0 not in uids, f"postgres runs processes as root: {procs}"
        else:
            assert uids == {1000}, f"{service} runs processes as {uids}, not only the image's user 1000"
        pids.update({pid: service for pid, _ in procs})
    listening = [(pids[c.pid], c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert {s for s, _, _ in listening} == {"mlflow", "ray-head", "postgres"}
    beyond = [(s, pid, a) for s, pid, a in listening if not ipaddress.ip_address(a.ip).is_loopback
              and not (a.ip.startswith("::ffff:") and ipaddress.ip_address(a.ip[7:]).is_loopback)]
    # Every address the stack's settings choose is on loopback: PostgreSQL, the MLflow server, Ray's
    # dashboard and dashboard agent. Ray 2.60 binds its gRPC servers beyond the node address it is given
    # (the GCS, the raylet and the object manager on every interface, the runtime-env agent and the Ray
    # Client server on the machine's address; no setting narrows them); those are Ray's processes,
    # guarded by its token, and on the deployment's bridge network they stay inside the compose network
    # (docs/deploy.md). Anything else beyond loopback fails.
    chosen = {stack["ports"][k] for k in ("postgres", "mlflow", "dashboard", "agent")}
    ray_own = ("raylet", "gcs_server", "ray::RuntimeEnv", "ray.util.client.server")
    offending = []
    for service, pid, addr in beyond:
        proc = " ".join([psutil.Process(pid).name(), *psutil.Process(pid).cmdline()[:3]])
        if service != "ray-head" or addr.port in chosen or not any(name in proc for name in ray_own):
            offending.append((service, proc[:60], f"{addr.ip}:{addr.port}"))
    assert not offending, f"listening beyond loopback: {offending}"
    print("Ray's own listeners beyond loopback:", sorted({(psutil.Process(p).name(), f"{a.ip}:{a.port}")
                                                          for _, p, a in beyond}))


def test_no_gpu_is_said_in_one_line(stack, monkeypatch):
    """--gpu on a stack whose Ray has no GPUs fails at once, saying so, and records nothing."""
    compose, env = stack["compose"], stack["env"]
    before = len(client(stack, monkeypatch).search_runs(
        [e.experiment_id for e in client(stack, monkeypatch).search_experiments()]))
    res = timed("--gpu refused", compose + ["run", "--rm", "-T", "fmc", "sweep", "/opt/fmc/test-sweeps/tiny.yaml",
                                            "--gpu", "0.5", "--rerun"], env, timeout=300, check=False)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no GPU is visible" in errors[0] and "0.5 GPU" in errors[0], res.stderr[-3000:]
    after = len(client(stack, monkeypatch).search_runs(
        [e.experiment_id for e in client(stack, monkeypatch).search_experiments()]))
    assert after == before


def test_down_and_up_keep_the_runs(stack, monkeypatch):
    compose, env = stack["compose"], stack["env"]
    before = {name: r.info.run_id for name, r in trial_runs(stack, monkeypatch).items()}
    assert before, "no runs to keep: the sweep test did not run first"
    start = time.perf_counter()
    run(compose + ["down"], env, timeout=300)
    up(compose, env)
    TIMINGS["down + up"] = round(time.perf_counter() - start, 1)
    after = trial_runs(stack, monkeypatch)
    assert {name: r.info.run_id for name, r in after.items()} == before
    assert "config.json" in {a.path for a in client(stack, monkeypatch).list_artifacts(before["conv"])}
