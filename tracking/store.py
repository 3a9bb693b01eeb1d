"""Access to the MLflow tracking store: where it is, whether it answers, and the few calls fmc makes.

Everything here is stateless; the other tracking modules build on it. ``is_transient`` is the one
place that decides whether waiting can cure an error (the server down, restarting, overloaded) or
not (the server answered and refused: out of disk space, a bad request, no permission).
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fmnist_cluster.machine import cpu_id, cpu_model  # noqa: F401 - tagged on every run

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # next to mlflow.db for the embedded store
TRIAL_KEY = "fmc.trial_key"
PARENT_TAG = "mlflow.parentRunId"
# HTTP answers that mean "try again later"; any other answer is the server's final word
TRANSIENT_CODES = frozenset({408, 429, 502, 503, 504})


class TrackingError(Exception):
    """The tracking store is unreachable or misconfigured; the message says which and how to fix it."""


class TrackingOutage(TrackingError):
    """The tracking server stayed unreachable longer than the outage bound; the trial can be resumed."""


class TrackingRefused(TrackingError):
    """The tracking server answered and refused a call (e.g. its disk is full): waiting will not help."""


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise TrackingError(f"{name}={os.environ[name]!r} is not a number of seconds") from None


def resolve_uri(uri: str | None = None) -> str:
    """``uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``; relative SQLite paths made absolute
    (Ray trials run in other working directories)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare folder path: MLflow's file store, deprecated; be explicit
        raise TrackingError(f"tracking URI {uri!r}: use sqlite:///path/mlflow.db or http(s)://host:port")
    return uri


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str) -> Path:
    """The embedded store's artifact folder, next to its database."""
    return Path(uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR


def _quiet_env() -> None:
    # Few, quick retries inside MLflow: enough for a pooled connection the server closed (it does after
    # an error answer), short for an answer that will not change (500: ~3 s, then it is a refusal);
    # fmc's delivery buffer handles longer outages (is_transient).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # fmc prints the run itself
    os.environ.pop("MLFLOW_RUN_ID", None)  # would silently override our parent/child runs


def client(uri: str):
    _quiet_env()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def status_code(err: BaseException) -> int | None:
    """The HTTP status in an MLflow or requests error, when it carries one."""
    response = getattr(err, "response", None)
    if getattr(response, "status_code", None):
        return int(response.status_code)
    match = re.search(r"error code (\d{3})|(\d{3}) (?:Server|Client) Error|too many (\d{3}) error", str(err))
    if match:
        return int(next(g for g in match.groups() if g))
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):  # the server's JSON error ("BAD_REQUEST: ..."): its status
        return int(err.get_http_status_code())
    return None


def is_transient(err: BaseException) -> bool:
    """An error that a later attempt can cure: the server is down, restarting or overloaded, or a
    SQLite store is locked by another writer. An answer such as 500 "No space left on device" is not."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        return True  # fmc's own REST calls: no connection
    text = str(err)
    if "database is locked" in text:
        return True
    code = status_code(err)
    if code is not None:
        return code in TRANSIENT_CODES
    # MLflow wraps a failed connection as "API request to <url> failed with exception <requests error>"
    return "failed with exception" in text or "failed with timeout exception" in text


def server_message(err: BaseException, limit: int = 300) -> str:
    """What the server said, in one line: 'HTTP 400: <its message>'; for an answer without a reason
    (MLflow's artifact proxy answers a full disk with a bare 500), the status and where to look."""
    from http import HTTPStatus

    text = " ".join(str(err).split())
    code = status_code(err)
    body = None
    for pattern in (r'"message":\s*"((?:[^"\\]|\\.)*)"', r"Response (?:body|text): '?([^']*)"):
        match = re.search(pattern, text)
        if match and match.group(1).strip():
            body = match.group(1).strip()
            break
    from mlflow.exceptions import RestException

    if body is None and isinstance(err, RestException):
        body = " ".join(str(err.message).removeprefix(f"{err.error_code}: ").split()) or None
    if code is None:
        return text[:limit]
    phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else ""
    if body is None or body == phrase:
        body = (f"{phrase}, no reason given: the MLflow server's log says why (its artifact store full or "
                "read-only gives this)" if code == 500 else phrase or "no reason given")
    return f"HTTP {code}: {body}"[:limit]


def auth_headers() -> dict[str, str]:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def check_server(uri: str, timeout: float = 30.0) -> None:
    """Raise TrackingError unless the server at ``uri`` answers an authenticated MLflow API call. A
    refused connection fails at once; the timeout is for a server that is up but slow (a loaded
    machine, basic auth hashing the password), which must not be taken for a dead one, and so is a
    connection the server accepted and dropped unanswered (a worker it restarted): asked again until
    the timeout is spent."""
    base = uri.rstrip("/")
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=auth_headers())
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as response:
                    body = response.read(2000)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, urllib.error.URLError) as err:
                dropped = isinstance(getattr(err, "reason", err), (http.client.RemoteDisconnected, ConnectionResetError))
                if isinstance(err, urllib.error.HTTPError) or not dropped or time.monotonic() + 2 > deadline:
                    raise
                time.sleep(2)  # accepted and dropped: the server is there, ask again
    except urllib.error.HTTPError as err:
        body = err.read(300).decode(errors="replace")
        hint = {401: "credentials missing or wrong: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                403: "refused: not allowed for this user or host (server's --allowed-hosts?)",
                404: "no MLflow API there: is this the MLflow server's address?"}.get(err.code, "")
        raise TrackingError(f"MLflow server {uri} answered HTTP {err.code}: {hint or ' '.join(body.split())}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout:g} s"
        raise TrackingError(f"MLflow server {uri} is unreachable ({reason}); start it or fix "
                            "--tracking-uri / MLFLOW_TRACKING_URI") from None
    if not body.lstrip().startswith(b"{"):  # something answers HTTP there, but not MLflow's JSON API
        raise TrackingError(f"{uri} answers HTTP but is not an MLflow server (its answer to the MLflow API "
                            f"is not JSON: {' '.join(body[:80].decode(errors='replace').split())!r}); "
                            "fix --tracking-uri / MLFLOW_TRACKING_URI")


def answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the server answers its health check now (a local store always does)."""
    if not is_http(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError):
        return False


def git_commit() -> str | None:
    """The commit of fmc's checkout, when it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def search(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """All runs of an experiment matching ``filter_string`` (every page)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                         page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(mlflow_client, run_id: str, values: dict[str, float], step: int = 0,
                timestamp: int | None = None, *, model_id: str | None = None,
                dataset: tuple[str, str] | None = None) -> None:
    """Metrics in batches; with ``model_id`` (and ``dataset``: name, digest) they are also the
    LoggedModel's scores, on that dataset (MLflow 3's Models page)."""
    from mlflow.entities import Metric

    now = timestamp or int(time.time() * 1000)
    name, digest = dataset or (None, None)
    items = [Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
             for k, v in values.items()]
    for i in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[i:i + 1000])


def serve_ui(uri: str | None = None, *, host: str = "127.0.0.1", port: int = 0) -> subprocess.Popen:
    """Start ``mlflow ui`` on ``uri`` bound to loopback; port 0 picks a free one. Returns the process."""
    uri = resolve_uri(uri)
    if not port:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if is_local(uri):
        cmd += ["--artifacts-destination", artifact_root(uri).as_uri()]
    # fmc uses no MLflow server jobs: without the job runner the UI starts faster and lighter
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    proc.url = f"http://{host}:{port}"
    return proc
