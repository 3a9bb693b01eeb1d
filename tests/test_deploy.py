"""The deployment without a Docker engine: docker-compose.yml validated by docker-compose itself, its
secure defaults asserted, the Dockerfile's structure checked, and the `mlflow` and `ray-head` services'
own commands run natively on loopback against a real PostgreSQL, with a tiny sweep through them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import FMC, RAY_GRACE, ROOT, free_port, stop, wait_http

COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"POSTGRES_PASSWORD": "pg-Secret-1", "MLFLOW_TRACKING_PASSWORD": "mlflow-Secret-2",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-Secret-3", "RAY_AUTH_TOKEN": "ray-Secret-4"}
UV = [os.environ["UV"]] if os.environ.get("UV") else [shutil.which("python3") or "python3", "-m", "uv"]  # uv run sets UV
RAY_INTERNAL_PORTS = {6379, 10001, 8076, 8077, 52365}  # GCS, client server, object manager, node manager, agent


def compose_config(tmp_path: Path, env: dict[str, str], files=(COMPOSE,)) -> subprocess.CompletedProcess:
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("COMPOSE_")}
    return subprocess.run(["docker-compose", "--env-file", str(env_file), *(a for f in files for a in ("-f", str(f))),
                           "config"], capture_output=True, text=True, cwd=ROOT, env=clean, timeout=60)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    """docker-compose's own validation and interpolation of the file, with test secrets."""
    res = compose_config(tmp_path_factory.mktemp("compose"), SECRETS)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def published(service: dict) -> list[tuple[str, int]]:
    """(host ip, container port) of every published port, short or long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), int(p["target"])))
        else:
            parts = str(p).split(":")
            out.append((parts[0] if len(parts) == 3 else "", int(parts[-1].split("/")[0])))
    return out


def test_compose_file_is_valid_and_needs_its_secrets(tmp_path, resolved):
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "fmc"} <= set(resolved["services"])
    res = compose_config(tmp_path, {})  # no .env: refuses, naming the variable
    assert res.returncode != 0 and "POSTGRES_PASSWORD" in res.stderr + res.stdout


def test_secure_defaults(resolved):
    services = resolved["services"]
    ports = {name: published(s) for name, s in services.items()}
    assert ports["mlflow"] and ports["ray-head"]  # the UI and the dashboard are reachable (by tunnel)
    for name, plist in ports.items():
        for host_ip, target in plist:
            assert host_ip == "127.0.0.1", f"{name} publishes {target} beyond loopback"
            assert target not in RAY_INTERNAL_PORTS, f"{name} publishes Ray's internal port {target}"
    # no secret literal in the file: every secret is a ${VAR} from .env
    text = COMPOSE.read_text()
    for value in SECRETS.values():
        assert value not in text
    for key, value in re.findall(r"^\s*([A-Z_]*(?:PASSWORD|TOKEN|SECRET)[A-Z_]*):\s*(.+)$", text, re.M):
        assert value.strip().startswith("${"), f"{key} is set to a literal"
    assert "password1234" not in text
    # Ray: token auth on every node and driver; GPUs reserved; a large /dev/shm
    for name in ("ray-head", "ray-worker", "fmc"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]
    for name in ("ray-head", "ray-worker"):
        assert services[name]["shm_size"]
    # MLflow: basic auth, allowed hosts admit the services by name, admin password from .env
    command = services["mlflow"]["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:5000"} <= set(hosts)
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRETS["MLFLOW_TRACKING_PASSWORD"]
    # health, order, restarts, persistence, non-root
    for name in ("postgres", "mlflow", "ray-head", "ray-worker"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["fmc"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["fmc"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # the CLI's Ray driver joins the head's node: it finds the node's raylet among the processes it
    # sees and talks to it over loopback and shared memory (tests/test_deploy_engine.py runs it)
    head = services["ray-head"]
    for key in ("network_mode", "ipc", "pid"):
        assert services["fmc"].get(key) == "service:ray-head", f"fmc's {key} is not the head's"
    assert head.get("ipc") == "shareable"
    assert any(str(v).startswith("ray-tmp:/tmp/ray") for v in head["volumes"] + services["fmc"]["volumes"])
    volumes = set(resolved["volumes"])
    assert {"postgres-data", "mlflow-artifacts"} <= volumes
    assert any(v.startswith("postgres-data:") for v in map(str, services["postgres"]["volumes"])) or any(
        isinstance(v, dict) and v.get("source") == "postgres-data" for v in services["postgres"]["volumes"])
    for name in ("mlflow", "ray-head", "ray-worker", "fmc"):
        assert services[name]["user"] not in ("0", "root") and not services[name]["user"].startswith("0:")
    # secrets live in .env, which git ignores; .env.example names every required variable
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+):\?", text)):
        assert re.search(rf"^{var}=", example, re.M), f".env.example lacks {var}"


def test_gpus_come_from_the_gpu_file(tmp_path, resolved):
    """A GPU box (.env.example's COMPOSE_FILE) gives the Ray nodes the GPUs and builds the GPU image; the
    main file alone asks for no GPU (it comes up on a box without the NVIDIA runtime)."""
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    files = [ROOT / f for f in example["COMPOSE_FILE"].split(":")]
    assert files == [COMPOSE, ROOT / "docker-compose.gpu.yml"]
    res = compose_config(tmp_path, SECRETS, files)
    assert res.returncode == 0, res.stderr
    gpu_box = yaml.safe_load(res.stdout)["services"]
    for name in ("ray-head", "ray-worker"):
        devices = gpu_box[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert "resources" not in resolved["services"][name].get("deploy", {})
    assert gpu_box["ray-worker"]["deploy"]["replicas"] == 0
    for name in ("mlflow", "ray-head", "ray-worker", "fmc"):
        assert gpu_box[name]["build"]["args"]["FMC_VARIANT"] == "gpu"  # the default
    cpu = yaml.safe_load(compose_config(tmp_path, {**SECRETS, "FMC_VARIANT": "cpu"}).stdout)["services"]
    assert cpu["mlflow"]["build"]["args"]["FMC_VARIANT"] == "cpu"


def test_gpu_environment_resolves_from_the_lock(tmp_path):
    """The GPU image's environment (uv.lock's gpu extra) resolves offline, without a download: TensorFlow
    with its CUDA wheels and NVML; the CPU image's has no CUDA wheel."""
    def plan(*extra: str) -> set[str]:
        env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "env")}
        res = subprocess.run([*UV, "sync", "--frozen", "--no-dev", *extra, "--dry-run",
                              "--offline"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return {line.split()[1] for line in res.stderr.splitlines() + res.stdout.splitlines() if line.startswith(" + ")}

    gpu, cpu = plan("--extra", "gpu"), plan()
    cuda = {p for p in gpu if p.startswith("nvidia-") and "-cu12==" in p}
    assert "tensorflow==2.21.0" in gpu and any(p.startswith("nvidia-ml-py==") for p in gpu)
    assert {p.split("==")[0] for p in cuda} >= {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"}
    assert not any(p.startswith("nvidia-") for p in cpu) and "tensorflow==2.21.0" in cpu
    assert not (tmp_path / "env").exists()  # a plan, not an install


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE"}
    assert all(word in known for word, _ in ins), [w for w, _ in ins if w not in known]
    assert ins[0][0] == "FROM" and "python:3.11" in ins[0][1]
    # the install step is the README's set-up, `make setup`, from the locked environment
    setup = [i for i, (word, rest) in enumerate(ins) if word == "RUN" and "make setup" in rest]
    assert len(setup) == 1 and "make setup" in (ROOT / "README.md").read_text()
    copies = " ".join(rest for word, rest in ins[:setup[0]] if word == "COPY")
    for needed in ("pyproject.toml", "uv.lock", "Makefile"):
        assert needed in copies
    # the code comes after the dependencies' layer (a code change does not download them again), then
    # the project is installed into the same environment
    assert "fmnist_cluster" not in copies and "--no-install-project" in ins[setup[0]][1]
    later = [(word, rest) for word, rest in ins[setup[0] + 1:]]
    copied = " ".join(rest for word, rest in later if word == "COPY")
    assert "fmnist_cluster" in copied and "tracking" in copied
    assert any(word == "RUN" and "uv sync --frozen" in rest and "--inexact" in rest for word, rest in later)
    assert "--extra gpu" in ins[setup[0]][1]
    assert ("ARG", "FMC_VARIANT=gpu") in ins  # the GPU image unless told otherwise
    assert not (ROOT / "Dockerfile").read_text().startswith("# syntax=")  # a frontend fetched from a registry
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["fmc"]') in ins
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored


# ----------------------------------------------------------------------------- native smoke


def pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, "Debian's postgresql is missing: make test-deps installs it"
    return str(found[-1])


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL (Debian's binaries) on 127.0.0.1, with the compose file's role and database."""
    root = Path(tempfile.mkdtemp(prefix="fmc-pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    pwfile = root / "pw"
    pwfile.write_text("bootstrap\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")
    subprocess.run(as_user + [pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
                              f"--pwfile={pwfile}"], check=True, capture_output=True)
    proc = subprocess.Popen(as_user + [pg_bin("postgres"), "-D", str(data), "-p", str(port),
                                       "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}"],
                            stdout=open(os.devnull, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    import psycopg2

    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password="bootstrap",
                                        dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        conn.autocommit = True
        with conn.cursor() as cur:  # as the postgres image does with POSTGRES_USER/_DB/_PASSWORD
            cur.execute("CREATE ROLE mlflow LOGIN PASSWORD %s", (SECRETS["POSTGRES_PASSWORD"],))
            cur.execute("CREATE DATABASE mlflow OWNER mlflow")
        conn.close()
        yield port
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def on_loopback(value: str, ports: dict[str, int]) -> str:
    """A compose value with service addresses replaced by their native loopback ones."""
    for service, port in ports.items():
        value = re.sub(rf"\b{re.escape(service)}:\d+", f"127.0.0.1:{port}", value)
    return value


def native(argv: list[str]) -> list[str]:
    """The image's PATH puts the environment's executables first; natively, this interpreter's."""
    exe = Path(sys.executable).parent / argv[0]
    return [sys.executable if argv[0] == "python" else str(exe) if exe.exists() else argv[0], *argv[1:]]


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """Set ``--option value`` or ``--option=value`` in a command line (appended if absent)."""
    out, i, found = [], 0, False
    while i < len(argv):
        if argv[i] == option:
            out += [option, value]
            i, found = i + 2, True
            continue
        if argv[i].startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(argv[i])
        i += 1
    return out if found else out + [f"{option}={value}"]


@pytest.mark.slow
def test_native_smoke(resolved, postgres, tmp_path):
    services = resolved["services"]
    mlflow_port, gcs_port, dash_port, client_port = (free_port() for _ in range(4))
    ports = {"postgres": postgres, "mlflow": mlflow_port, "ray-head": gcs_port}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}

    # mlflow: the service's command and environment, addresses on loopback, artifacts in a folder
    svc = services["mlflow"]
    env = {**base, **{k: on_loopback(str(v), ports) for k, v in svc["environment"].items()}}
    cmd = native(svc["entrypoint"] + svc["command"] if svc.get("entrypoint") else svc["command"])
    cmd = with_option(with_option(with_option(cmd, "--host", "127.0.0.1"), "--port", str(mlflow_port)),
                      "--artifacts-destination", str(tmp_path / "artifacts"))
    cmd = with_option(cmd, "--workers", "1")
    (tmp_path / "mlflow").mkdir()
    mlflow_proc = subprocess.Popen(cmd, cwd=tmp_path / "mlflow", env={**env, "PYTHONPATH": str(ROOT)},
                                   stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
    # ray-head: the service's command with its ports moved to free ones on loopback (and a short
    # session folder: Ray's socket paths must fit in 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="fmc-ray-", dir="/tmp")
    svc = services["ray-head"]
    ray_env = {**base, **{k: str(v) for k, v in svc["environment"].items()}}
    cmd = native(svc["command"])
    for option, value in (("--port", gcs_port), ("--dashboard-host", "127.0.0.1"), ("--dashboard-port", dash_port),
                          ("--node-ip-address", "127.0.0.1"), ("--ray-client-server-port", client_port),
                          ("--num-cpus", 2), ("--temp-dir", ray_tmp)):
        cmd = with_option(cmd, option, str(value))
    ray_proc = subprocess.Popen(cmd, cwd=tmp_path, env=ray_env, stdout=open(tmp_path / "ray.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{mlflow_port}"
        wait_http(url + "/health", mlflow_proc, timeout=120)
        # the services' own healthchecks, natively
        check = native(with_option(services["ray-head"]["healthcheck"]["test"][1:], "--address",
                                   f"127.0.0.1:{gcs_port}"))
        deadline = time.time() + 120
        while subprocess.run(check, env=ray_env, capture_output=True).returncode != 0:
            assert ray_proc.poll() is None and time.time() < deadline, (tmp_path / "ray.log").read_text()[-3000:]
            time.sleep(2)

        # Ray's token auth is on: the same check without the token is refused
        refused = subprocess.run(check, env={**ray_env, "RAY_AUTH_TOKEN": "wrong-token"}, capture_output=True,
                                 text=True, timeout=60)
        assert "AuthenticationError" in refused.stderr + refused.stdout

        # basic auth is on: no credentials, no API
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert denied.value.code == 401

        # a tiny sweep from the fmc service's environment, against that server and that Ray head
        sweep = tmp_path / "tiny.yaml"
        sweep.write_text("experiment: deploy-smoke\n"
                         "data: {subset: 200, seed: 0}\n"
                         "defaults: {model: {kind: conv, filters: [8, 4, 4]}, epochs: 1, kmeans: {n_init: 1},"
                         " gmm: {n_init: 1, covariance_type: diag}}\n"
                         "trials: [{name: conv}, {name: raw, model: {kind: none}}]\n"
                         "resources: {cpu: 1}\nmax_concurrent: 2\n")
        fmc_env = {**base, **{k: on_loopback(str(v), ports) for k, v in services["fmc"]["environment"].items()}}
        fmc_env.update(FMC_STORAGE_PATH=str(tmp_path / "ray_results"), PYTHONPATH=str(ROOT))
        assert fmc_env["MLFLOW_TRACKING_URI"] == url and fmc_env["RAY_ADDRESS"] == f"127.0.0.1:{gcs_port}"
        res = subprocess.run(FMC + ["sweep", str(sweep)], cwd=tmp_path, env=fmc_env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

        # the runs arrived: through the API (with the credentials) and in PostgreSQL itself
        import psycopg2
        from mlflow import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME=fmc_env["MLFLOW_TRACKING_USERNAME"],
                          MLFLOW_TRACKING_PASSWORD=fmc_env["MLFLOW_TRACKING_PASSWORD"])
        try:
            client = MlflowClient(url)
            exp = client.get_experiment_by_name("deploy-smoke")
            runs = client.search_runs([exp.experiment_id])
        finally:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k, None)
        trials = {r.data.tags.get("fmc.trial"): r for r in runs if r.data.tags.get("fmc.trial")}
        assert set(trials) == {"conv", "raw"}
        assert all(r.info.status == "FINISHED" and "kmeans_acc" in r.data.metrics for r in trials.values())
        with psycopg2.connect(host="127.0.0.1", port=postgres, user="mlflow", dbname="mlflow",
                              password=SECRETS["POSTGRES_PASSWORD"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
            assert cur.fetchone()[0] >= 3  # two trials and the sweep's parent run
            cur.execute("SELECT username FROM users")
            assert [row[0] for row in cur.fetchall()] == ["admin"]  # the auth store shares the database
        # artifacts went through the server's proxy into its artifact store
        stored = {p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
        assert {"config.json", "kmeans_hungarian.json", "MLmodel"} <= stored
    finally:
        stop(ray_proc, grace=RAY_GRACE)
        stop(mlflow_proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_tracking_server_refuses_to_start_open(tmp_path):
    """Without its secrets the deployment's MLflow server exits 2 naming them, before anything listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    res = subprocess.run([sys.executable, "-m", "tracking.server", "--host", "127.0.0.1", "--port", str(free_port())],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT),
                                            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/m.db"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in res.stderr and "MLFLOW_FLASK_SERVER_SECRET_KEY" in res.stderr
    assert not (tmp_path / "m.db").exists()
