"""The deployment's tracking server: ``python -m tracking.server [mlflow server options]``.

Runs ``mlflow server`` (this interpreter's) with the basic-auth app's user store in the same database
as the runs (``MLFLOW_BACKEND_STORE_URI``; MLflow keeps the two apart by table), so that users and
permissions survive a restart like the runs do. Everything secret comes from the environment:

- ``MLFLOW_BACKEND_STORE_URI``: where runs (and users) live, e.g. ``postgresql://...``;
- ``MLFLOW_AUTH_ADMIN_PASSWORD``: the admin's password on the first start (MLflow has no default);
- ``MLFLOW_FLASK_SERVER_SECRET_KEY``: the key that signs the UI's forms.

It refuses to start, with a message saying which variable is missing, rather than start open.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def auth_config(database_uri: str, folder: str) -> Path:
    """Write the basic-auth app's configuration file; returns its path."""
    path = Path(folder) / "basic_auth.ini"
    path.write_text("[mlflow]\n"
                    "default_permission = READ\n"
                    f"database_uri = {database_uri.replace('%', '%%')}\n"
                    f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    path.chmod(0o600)
    return path


def main(argv: list[str]) -> int:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        print(f"tracking.server: set {', '.join(missing)} (in .env for docker compose; see .env.example)",
              file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="fmc-mlflow-auth-")
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(os.environ["MLFLOW_BACKEND_STORE_URI"], folder))
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
