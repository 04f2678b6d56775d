"""What a command prints: the project's progress lines, and Ray's internals only when asked.

By default a command (:func:`rayhybrid.cli.execute`) calls :func:`quiet` before anything
starts Ray: Ray's internal warnings and progress echoes are filtered through Ray's own
settings, so the console shows the project's lines (``[rayhybrid ...]``, the step lines, the
evaluation headline). ``--verbose`` leaves every one of them at Ray's default. What is
filtered, and by which setting:

- Ray Data's progress echoes, ``Starting execution`` / ``Execution plan`` and ``execution
  finished`` lines on the console: ``DataContext.enable_progress_bars`` and
  ``print_on_execution_start`` off, and a Ray Data logging config
  (``RAY_DATA_LOGGING_CONFIG``) whose console handler shows WARNING and up; the session's
  ``ray-data.log`` still gets everything;
- the ``ray`` logger's INFO lines (``Started a local Ray instance``) and the token-auth
  notice (Ray's authentication stays as configured; only the notice is hidden);
- deprecation warnings of Ray, transformers and the workers (``PYTHONWARNINGS``), Hugging
  Face progress bars (``HF_HUB_DISABLE_PROGRESS_BARS``) and MLflow's INFO lines.

Not filtered: the C++ core worker's ``core_worker.cc ... has constructor arguments in the
object store and max_restarts > 0`` (ERROR level; Ray issues 53727 / 57733: Ray Data's and
Ray Train's own actors trigger it). Ray's only switch for it, ``RAY_BACKEND_LOG_LEVEL=fatal``,
hides every C++ error of every process and makes each new worker print a "Set ray log level"
line of its own; set it yourself if you prefer that trade.

Environment settings are set only where unset (a person's own value wins) and reach the
processes of a Ray started by this command; a cluster joined from outside keeps its own.
The library itself never quiets anything unless a command asked (:data:`ENV_FLAG`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV_FLAG", "QUIET_ENV", "is_quiet", "quiet", "quiet_ray"]

ENV_FLAG = "RAYHYBRID_CONSOLE"  # "quiet" once a command chose the quiet console

QUIET_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}

# Ray Data's own default logging config (ray/data/_internal/logging.py) with the console
# handler raised to WARNING: the per-session ray-data.log keeps every record.
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray:
    format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"
filters:
  console_filter:
    (): ray.data._internal.logging.HiddenRecordFilter
handlers:
  file:
    class: ray.data._internal.logging.SessionFileHandler
    formatter: ray
    filename: ray-data.log
  console:
    class: ray._private.log.PlainRayHandler
    formatter: ray
    level: WARNING
    filters: [console_filter]
loggers:
  ray.data:
    level: DEBUG
    handlers: [file, console]
    propagate: false
"""


def is_quiet() -> bool:
    """True when a command asked for the quiet console (and no ``--verbose``)."""
    return os.environ.get(ENV_FLAG) == "quiet"


def _ray_data_config() -> Path:
    """The quiet Ray Data logging config, written once per user (atomically: workers read it)."""
    folder = Path(tempfile.gettempdir()) / f"rayhybrid-{os.getuid()}"
    path = folder / "ray_data_logging.yaml"
    if not path.is_file() or path.read_text() != _RAY_DATA_LOGGING:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(_RAY_DATA_LOGGING)
        tmp.replace(path)
    return path


def quiet(verbose: bool = False) -> Callable[[], None]:
    """Choose the console of this command: quiet (default) or everything (``verbose``).

    Call before anything imports Ray, transformers or MLflow: most of the settings are read
    at import or when Ray starts.

    Returns:
        A function that puts the environment variables and the ``mlflow`` logger level back
        as they were (for a command run inside a longer-lived process, such as a test; a Ray
        already started keeps its settings, and the process's warning filters stay).
    """
    before = {k: os.environ.get(k) for k in (ENV_FLAG, "RAY_DATA_LOGGING_CONFIG", *QUIET_ENV)}
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_level = mlflow_logger.level

    def restore() -> None:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow_logger.setLevel(mlflow_level)

    if verbose:
        os.environ[ENV_FLAG] = "verbose"
        return restore
    os.environ[ENV_FLAG] = "quiet"
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(_ray_data_config()))
    except OSError:  # no writable temp dir: Ray Data keeps its console lines
        pass
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return restore


def quiet_ray() -> dict[str, Any]:
    """Ray's Python-side settings of the quiet console; :func:`rayhybrid.cluster.ensure_ray`
    calls it before ``ray.init``. Nothing unless a command chose the quiet console.

    Returns:
        ``ray.init`` arguments: ``logging_level`` WARNING (the ``ray`` logger, which
        ``ray.init`` sets up: "Started a local Ray instance" is one of its INFO lines).
    """
    if not is_quiet():
        return {}
    import ray.data

    # "Token authentication is enabled": a notice, not a problem; the setting is unchanged.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return {"logging_level": logging.WARNING}
