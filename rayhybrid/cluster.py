"""Connecting to Ray: the one :func:`ensure_ray` of the CLI, the jobs, Tune and the library.

Nothing connects at import time; the functions that need Ray (training, evaluation, the
sweep) call :func:`ensure_ray` first, so a bad config or search space fails before Ray starts.

Where it connects: inside a submitted job Ray sets ``RAY_ADDRESS`` to the cluster's GCS
address and ``ray.init()`` joins that cluster. Run directly (``rayhybrid train``, ``python
jobs/train.py ...``) it joins the cluster named by ``RAY_ADDRESS`` if set, else the latest
``ray start`` on this machine, else starts a local Ray (Ray's own resolution order for
``ray.init()`` with no address). A Ray it starts or joins itself gets :data:`RAY_ENV`; a
submitted job's runtime env comes from ``ray job submit`` (``jobs/runtime_env.yaml``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayhybrid.config import Config

__all__ = ["RAY_ENV", "JobError", "ensure_ray", "in_submitted_job", "path_warnings"]

log = logging.getLogger(__name__)

# Environment of every Ray worker a direct run starts: one fast tokenizer per worker, no
# tokenizer thread pool fighting the worker's torch threads (DESIGN.md, "known pitfalls").
RAY_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Set by Ray's job supervisor in the environment of every submitted job's entrypoint.
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class JobError(RuntimeError):
    """The job cannot start (for example Ray cannot be reached); the message says why."""


def in_submitted_job() -> bool:
    """True when this process is the entrypoint of a ``ray job submit`` job."""
    return _JOB_ENV in os.environ


def ensure_ray(**init_kwargs: Any) -> None:
    """Connect to the Ray cluster this process should use (see the module docstring), once.

    Args:
        init_kwargs: more ``ray.init`` arguments for a Ray started here (tests: ``num_cpus``).

    Raises:
        JobError: ``RAY_ADDRESS`` holds a dashboard URL (that address is for ``ray job
            submit``, not for a driver), or the cluster it names does not answer.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise JobError(
            f"RAY_ADDRESS={address} is a dashboard (Jobs API) address: use it with `ray job "
            "submit`, or unset it / set it to the cluster's GCS address (host:6379) to run "
            "this script directly against that cluster"
        )
    # A submitted job's runtime env comes from `ray job submit`; only a direct run sets one.
    runtime_env = None if in_submitted_job() else {"env_vars": dict(RAY_ENV)}
    from rayhybrid.console import filter_worker_logs, is_quiet, quiet_ray

    quiet = quiet_ray()  # Ray's own lines filtered unless the command runs with --verbose
    try:
        ray.init(
            address="auto" if address else None,
            runtime_env=runtime_env,
            **{**quiet, **init_kwargs},
        )
    except ConnectionError as exc:
        raise JobError(
            f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {exc}"
        ) from None
    if is_quiet():
        filter_worker_logs()
    # Which cluster, so a job's log shows whether it joined the cluster or started its own Ray.
    ctx = ray.get_runtime_context()
    log.info(
        f"[rayhybrid job] Ray {ray.__version__}, GCS {ctx.gcs_address}, node {ctx.get_node_id()}, "
        f"cluster resources {ray.cluster_resources()}"
    )


def path_warnings(cfg: Config) -> list[str]:
    """Warnings about outputs that a submitted job would write into its temporary working dir.

    Ray unpacks ``--working-dir`` into a per-job temporary folder and deletes it later; a
    relative ``train.storage_path`` or the default local MLflow store would vanish with it.
    """
    if not in_submitted_job():
        return []
    out = []
    cwd = Path.cwd()
    for key, value in (
        ("train.storage_path", cfg.train.storage_path),
        ("eval.output_dir", cfg.eval.output_dir),
    ):
        if not Path(os.path.expanduser(value)).is_absolute():
            out.append(
                f"{key}={value} is relative: inside this job it is {cwd / value}, "
                "a temporary copy Ray deletes later; use shared storage "
                f"({key}=/mnt/shared/...)"
            )
    if cfg.tracking.enabled and not (
        cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    ):
        out.append(
            f"no MLflow tracking URI: runs go to sqlite:///{cwd / 'mlflow.db'} inside the "
            "job's temporary working dir; set MLFLOW_TRACKING_URI (runtime_env env_vars) "
            "or tracking.tracking_uri to a server or shared storage"
        )
    return out
