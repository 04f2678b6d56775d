"""Shared plumbing of the ``jobs/`` entry points.

Every job script is: parse ``--config`` and ``key=value`` overrides, load the config, connect
to Ray, call one library function, exit non-zero with the error on failure. ``ray job
submit`` marks a job FAILED exactly when its entrypoint exits non-zero, and shows what it
printed, so errors go to stderr as one readable line (plus the traceback for unexpected ones).

Connecting: inside a submitted job Ray sets ``RAY_ADDRESS`` to the cluster's GCS address and
``ray.init()`` joins that cluster. Run directly (``python jobs/train.py ...``) it joins the
cluster named by ``RAY_ADDRESS`` if set, else the latest ``ray start`` on this machine, else
starts a local Ray (Ray's own resolution order for ``ray.init()`` with no address).

Used as ``from _common import run_job`` (``python jobs/x.py`` puts ``jobs/`` on sys.path).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayhybrid.config import Config

__all__ = ["JobError", "connect", "in_submitted_job", "path_warnings", "run_job"]

# Set by Ray's job supervisor in the environment of every submitted job's entrypoint.
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class JobError(RuntimeError):
    """The job cannot start (for example Ray cannot be reached); the message says why."""


def in_submitted_job() -> bool:
    """True when this process is the entrypoint of a ``ray job submit`` job."""
    return _JOB_ENV in os.environ


def connect() -> None:
    """Connect to the Ray cluster this job should use (see the module docstring).

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
            "this script directly against that cluster")
    # A submitted job's runtime env comes from `ray job submit`; only a direct run sets one.
    runtime_env = None if in_submitted_job() else {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    try:
        ray.init(address="auto" if address else None, runtime_env=runtime_env)
    except ConnectionError as exc:
        raise JobError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {exc}") from None
    print(f"[rayhybrid job] Ray {ray.__version__}, cluster resources {ray.cluster_resources()}",
          flush=True)


def path_warnings(cfg: Config) -> list[str]:
    """Warnings about outputs that a submitted job would write into its temporary working dir.

    Ray unpacks ``--working-dir`` into a per-job temporary folder and deletes it later; a
    relative ``train.storage_path`` or the default local MLflow store would vanish with it.
    """
    if not in_submitted_job():
        return []
    out = []
    cwd = Path.cwd()
    for key, value in (("train.storage_path", cfg.train.storage_path),
                       ("eval.output_dir", cfg.eval.output_dir)):
        if not Path(os.path.expanduser(value)).is_absolute():
            out.append(f"{key}={value} is relative: inside this job it is {cwd / value}, "
                       "a temporary copy Ray deletes later; use shared storage "
                       f"({key}=/mnt/shared/...)")
    if cfg.tracking.enabled and not (cfg.tracking.tracking_uri
                                     or os.environ.get("MLFLOW_TRACKING_URI")):
        out.append(f"no MLflow tracking URI: runs go to sqlite:///{cwd / 'mlflow.db'} inside the "
                   "job's temporary working dir; set MLFLOW_TRACKING_URI (runtime_env env_vars) "
                   "or tracking.tracking_uri to a server or shared storage")
    return out


def _user_facing(exc: BaseException) -> bool:
    from rayhybrid.datamodel import DataError
    from rayhybrid.tracking import TrackingError

    # ModelError, TrainingError, EvaluationError and BatchPlanError derive from ValueError.
    return isinstance(exc, (DataError, TrackingError, JobError, ValueError, FileNotFoundError,
                            PermissionError))


def run_job(run: Callable[[Config, argparse.Namespace], int | None], description: str, *,
            default_config: str | None = None,
            add_args: Callable[[argparse.ArgumentParser], None] | None = None,
            argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the config, connect to Ray, call ``run``; return the exit status.

    Args:
        run: the job's body, ``run(cfg, args) -> exit status or None`` (None means 0).
        description: ``--help`` text (the script's docstring).
        default_config: config used when ``--config`` is omitted; None makes it required.
        add_args: adds job-specific options to the parser.
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a config error, 1 for any other error (printed to stderr).
    """
    from rayhybrid.config import ConfigError, load_config

    prog = f"jobs/{Path(sys.argv[0]).name}"
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=default_config, required=default_config is None,
                        help="YAML config file" + (f" (default {default_config})" if default_config else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Config overrides with dotted keys, e.g. train.max_steps=50.")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for warning in path_warnings(cfg):
            print(f"{prog}: warning: {warning}", file=sys.stderr, flush=True)
        connect()
        status = run(cfg, args)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure must become a non-zero exit status
        # Library errors (bad data, model, run folder, tracking server) carry a message that
        # says what to change; anything else is a bug and keeps its traceback.
        if not _user_facing(exc):
            traceback.print_exc()
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return int(status or 0)
