"""The protected MLflow server of docker/README.md, started for real on loopback (one start).

`mlflow server --app-name basic-auth --allowed-hosts ...` (MLflow's own basic-auth app, which
needs Flask-WTF: ``mlflow[auth]`` in the dev extra):

- an API request without credentials, or with a wrong password, is refused (401), and one with
  a Host header the server was not told about is refused (403) even with good credentials;
- a user created through the auth app's API, given to the project's tracking as
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (what a job's runtime env carries),
  logs a run with params, metrics and an artifact, read back through the server;
- the same tracking code without credentials cannot create a run.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Background, free_ports, mlflow_server_cmd

ALIAS = "mlflow.internal"  # a cluster name for the server, as in docker/cluster.yaml

pytestmark = pytest.mark.slow


@dataclass
class AuthServer:
    url: str
    port: int
    admin: tuple[str, str]
    root: Path


def _need_flask_wtf() -> None:
    if importlib.util.find_spec("flask_wtf") is not None:
        return
    why = (
        "MLflow's basic-auth app needs Flask-WTF, not installed here "
        "(pip install 'mlflow[auth]', part of the dev extra)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI installs the dev extra, so this is a broken install")
    pytest.skip(why)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> AuthServer:
    _need_flask_wtf()
    root = tmp_path_factory.mktemp("mlflow_auth")
    (port,) = free_ports(1)
    admin = ("admin", secrets.token_urlsafe(16))
    # The auth app's own settings file: users in their own database, and no access for a
    # user who has not been granted it (MLflow's shipped default is READ for everyone).
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],  # read once, when the user store is created
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),  # CSRF key of the auth app
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    cmd = mlflow_server_cmd(
        root,
        port,
        "--app-name",
        "basic-auth",
        "--allowed-hosts",
        f"127.0.0.1:{port},{ALIAS}:{port}",
    )
    proc = Background(cmd, log=root / "server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", 180, "mlflow server --app-name basic-auth")
        yield AuthServer(url=url, port=port, admin=admin, root=root)
    finally:
        proc.stop()


def _get(url: str, user: tuple[str, str] | None = None, host: str | None = None) -> int:
    """Status of a plain GET (urllib, no MLflow client in between)."""
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    if host is not None:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_requests_without_credentials_or_from_unknown_hosts_are_refused(auth_server):
    api = f"{auth_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 401
    assert _get(api, (auth_server.admin[0], "not-the-password")) == 401
    assert _get(api, auth_server.admin) == 200
    # --allowed-hosts: the names the cluster uses pass, any other Host header is refused.
    assert _get(api, auth_server.admin, host=f"{ALIAS}:{auth_server.port}") == 200
    assert _get(api, auth_server.admin, host=f"evil.example:{auth_server.port}") == 403


def test_the_projects_tracking_logs_a_run_with_credentials(auth_server, tmp_path, monkeypatch):
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    from rayhybrid import tracking
    from rayhybrid.config import load_config

    # The admin creates the user a job runs as (the auth app's REST API, through its client).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin[1])
    user = ("rayhybrid-job", secrets.token_urlsafe(16))
    get_app_client("basic-auth", tracking_uri=auth_server.url).create_user(*user)

    cfg = load_config(
        None,
        [f"tracking.tracking_uri={auth_server.url}", "tracking.experiment=protected"],
    )
    # Without credentials the project's tracking cannot create anything.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(Exception, match="401|not authenticated|Unauthorized"):
        tracking.start_parent_run(cfg, "no-credentials", tags={})

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    run_id = tracking.start_parent_run(cfg, "with-credentials", tags={"job": "auth-test"})
    assert run_id
    report = tmp_path / "report.txt"
    report.write_text("logged through the protected server\n")
    tracking.finish_parent_run(cfg, run_id, {"report": report}, failed=0, total=2)

    # Read back as the admin through a client of its own: the run is on the server.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin[1])
    run = MlflowClient(tracking_uri=auth_server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["job"] == "auth-test"
    assert run.data.metrics["runs/total"] == 2.0 and run.data.metrics["runs/failed"] == 0.0
    assert run.data.params["tracking.experiment"] == "protected"
    names = [a.path for a in MlflowClient(tracking_uri=auth_server.url).list_artifacts(run_id)]
    assert names == ["report.txt"]
    stored = list((auth_server.root / "artifacts").rglob("report.txt"))
    assert len(stored) == 1 and stored[0].read_text() == report.read_text()
