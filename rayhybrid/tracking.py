"""MLflow tracking: where runs go, and what happens when the server is down.

Only rank 0 / the driver calls into this module (side effects on one process).
mlflow is imported inside the functions so that importing rayhybrid stays fast.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayhybrid.config import TrackingConfig

__all__ = ["TrackingError", "TrackingGuard", "default_tracking_uri", "get_experiment_id",
           "log_params_flat", "resend_unsent", "resolve_tracking_uri"]


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


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
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
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class TrackingGuard:
    """Runs MLflow calls so that a tracking store failing mid-run never stops or loses a run.

    The first failing call prints one line saying what failed and where the results are;
    from then on no call is attempted (each would wait through MLflow's HTTP retries,
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), and metrics that were not sent are appended to
    ``spill_path`` as JSON lines, which :func:`resend_unsent` logs once the server is back.
    Checkpoints and the exported model never depend on MLflow.

    Args:
        tracking_uri: the store the calls go to (named in the message).
        spill_path: JSON-lines file for metrics not sent; None keeps nothing.
    """

    def __init__(self, tracking_uri: str, spill_path: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self.failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def call(self, what: str, fn: Callable[..., Any], *args: Any,
             records: Sequence[dict] = (), **kwargs: Any) -> bool:
        """``fn(*args, **kwargs)``; False (and ``records`` spilled) if the store failed.

        Args:
            what: what the call does, for the message ("log step metrics").
            records: metrics the call carries, ``{"key", "value", "step", "timestamp"}``.
        """
        if self.failure is None:
            try:
                fn(*args, **kwargs)
                return True
            except Exception as exc:  # tracking must never end a training run
                first = (str(exc).strip().splitlines() or [""])[0]
                self.failure = f"{type(exc).__name__}: {first[:300]}"
                where = f"; metrics not sent go to {self.spill_path}" if self.spill_path else ""
                print(f"[rayhybrid] MLflow tracking at {self.tracking_uri} failed to {what} "
                      f"({self.failure}). The run continues and its checkpoints and model are "
                      f"written as usual{where}; no further MLflow calls are made by this process.",
                      flush=True)
        self._spill(records)
        return False

    def log_metrics(self, client: Any, run_id: str, metrics: Sequence[Any]) -> bool:
        """``client.log_batch`` of MLflow ``Metric`` objects in chunks; False if the store failed."""
        sent = True
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            chunk = list(metrics[i:i + 900])
            records = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                       for m in chunk]
            sent = self.call("log metrics", client.log_batch, run_id, metrics=chunk,
                             records=records) and sent
        return sent

    def _spill(self, records: Sequence[dict]) -> None:
        if not records or self.spill_path is None:
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)


def resend_unsent(spill_path: Path, tracking_uri: str, run_id: str) -> int:
    """Log the metrics a :class:`TrackingGuard` kept in ``spill_path`` to ``run_id``.

    Returns:
        The number of metric values sent (the file is renamed ``*.sent`` afterwards).

    Raises:
        MlflowException: the store still cannot be reached (the file is kept).
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    path = Path(spill_path)
    if not path.is_file():
        return 0
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics = [Metric(r["key"], float(r["value"]), int(r.get("timestamp") or time.time() * 1000),
                      int(r.get("step", 0))) for r in recs]
    client = MlflowClient(tracking_uri)
    for i in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    path.rename(path.with_name(path.name + ".sent"))
    return len(metrics)
