"""MLflow tracking: where runs go, and what happens when the server is down.

Only rank 0 / the driver calls into this module (side effects on one process).
mlflow is imported inside the functions so that importing rayhybrid stays fast.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayhybrid.config import TrackingConfig

__all__ = ["TrackingError", "default_tracking_uri", "get_experiment_id", "log_params_flat",
           "resolve_tracking_uri"]


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached and on_unavailable is 'fail'."""


def default_tracking_uri() -> str:
    """SQLite store in the working directory; ``mlflow ui --backend-store-uri`` opens it."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _server_up(uri: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_tracking_uri(cfg: "TrackingConfig") -> str:
    """The tracking URI to use, after checking that a server URI answers.

    Order: ``cfg.tracking_uri``, then ``MLFLOW_TRACKING_URI``, then the local SQLite store.

    Raises:
        TrackingError: an http(s) server does not answer and ``cfg.on_unavailable == "fail"``.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or default_tracking_uri()
    if uri.startswith(("http://", "https://")) and not _server_up(uri):
        if cfg.on_unavailable == "fail":
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer. Start it, point "
                "tracking.tracking_uri elsewhere, or set tracking.on_unavailable=local to log to "
                f"{default_tracking_uri()} instead (nothing has been trained or written yet).")
        local = default_tracking_uri()
        print(f"[rayhybrid] MLflow server {uri} is down; logging to the local store {local} "
              "(tracking.on_unavailable=local)")
        return local
    return uri


def log_params_flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to ``a.b.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(log_params_flat(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def get_experiment_id(tracking_uri: str, name: str) -> str:
    """Id of MLflow experiment ``name`` at ``tracking_uri``, created if missing.

    For a local SQLite store the artifacts of a new experiment go to ``mlartifacts/``
    beside the database file, not to ``./mlruns`` of whatever the working directory is
    (Ray workers and drivers may run elsewhere); ``mlflow ui`` finds them there.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        location = (db.parent / "mlartifacts" / name).absolute().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process (a parallel trial) created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
