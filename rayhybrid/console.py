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

- lines Ray's own processes print through the driver's log forwarding: the C++ core
  worker's ``core_worker.cc ... has constructor arguments in the object store and
  max_restarts > 0`` (ERROR level, about a restart that has not happened; Ray issues 53727 /
  57733: Ray Data's and Ray Train's own actors trigger it) and the traceback Ray Train's
  ``PlacementGroupCleaner`` thread dies with when two Ray instances run on one machine
  ("Found multiple active Ray instances": it looks the cluster up without an address). Ray
  has no setting for either short of ``RAY_BACKEND_LOG_LEVEL=fatal``, which hides every C++
  error of every process, so :func:`filter_worker_logs` drops exactly these lines from what is
  forwarded; the session's worker log files keep them;
- in the Ray Train workers, INFO records of loggers other than the project's (Ray Train's
  ``Reporting training result`` lines, which its ``LoggingConfig`` misses because that logger
  is named by file path, and sentence-transformers' ``Saving model to``):
  :func:`quiet_worker`.

The same ``core_worker.cc`` line of the driver process itself (Ray Data's actor pools that
the driver executes: the materialized training stream, the evaluation encoders) is written by
C++ straight to file descriptor 2, where no Python setting reaches; :func:`drop_stderr_lines`
passes the command's file descriptor 2 through a filter for the length of the command.

Environment settings are set only where unset (a person's own value wins) and reach the
processes of a Ray started by this command; a cluster joined from outside keeps its own.
The library itself never quiets anything unless a command asked (:data:`ENV_FLAG`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_FLAG",
    "QUIET_ENV",
    "RAY_NOISE",
    "drop_stderr_lines",
    "filter_worker_logs",
    "is_quiet",
    "quiet",
    "quiet_ray",
    "quiet_ray_data",
    "quiet_trial",
    "quiet_worker",
]

ENV_FLAG = "RAYHYBRID_CONSOLE"  # "quiet" once a command chose the quiet console

QUIET_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Ray Tune's newer console engine prints its experiment box even at verbose=0; the
    # legacy one prints nothing at verbose=0 (rayhybrid.tuning.progress prints the trials).
    "RAY_AIR_NEW_OUTPUT": "0",
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
  # "Progress bars disabled": the quiet console turned them off on purpose.
  ray.data._internal.progress:
    level: ERROR
"""

# Forwarded lines of Ray's own processes that the quiet console drops (see the module doc).
RAY_NOISE = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
    r"store and max_restarts > 0"
)
# The traceback of Ray Train's PlacementGroupCleaner thread, dropped when its last line says this.
_PG_CLEANER = "PlacementGroupCleaner"
_PG_START = "Exception in thread PlacementGroupCleanerMonitor"
_PG_CAUSE = "Found multiple active Ray instances"
_EXC_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


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
    # "Token authentication is enabled": a notice, not a problem; the setting is unchanged.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    quiet_ray_data()
    return {"logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's progress bars and execution-start echoes off in this process.

    A process that builds Ray Data pipelines (the command's driver, and a Tune trial's driver,
    which Tune starts as a worker process with a default ``DataContext``) sets this itself; the
    ``DataContext`` of a process travels to the Ray Train workers its trainer starts.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def quiet_trial(quiet: bool) -> None:
    """In a Tune trial's driver process of a quiet command: the command's console choice
    (:data:`ENV_FLAG`, read by the trainer it builds, which passes it to its workers), Ray
    Data's progress off (:func:`quiet_ray_data`), and only the project's INFO lines on the
    console (:func:`quiet_worker`). The flag comes as an argument, not from the environment:
    on a cluster joined from outside, the trial process does not inherit the command's."""
    if not quiet:
        return
    os.environ[ENV_FLAG] = "quiet"
    quiet_ray_data()
    quiet_worker(True)


def filter_worker_logs(dispatcher: Any = None) -> None:
    """Drop :data:`RAY_NOISE` (and the ``PlacementGroupCleaner`` traceback) from the worker
    lines Ray forwards to this driver; :func:`rayhybrid.cluster.ensure_ray` calls it after
    ``ray.init`` when the console is quiet. Everything else is printed as Ray prints it.

    Ray forwards worker output through one dispatcher whose printing handler is named
    ``ray_print_logs``; it offers no filter of its own, so this wraps that handler (a Ray
    without it is left as it is).

    Args:
        dispatcher: the dispatcher to filter (default: Ray's own, this process's).
    """
    if dispatcher is None:
        import ray._private.worker as ray_worker

        dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = dict(getattr(dispatcher, "handlers", ()))
    printer = handlers.get("ray_print_logs")
    if printer is None or getattr(printer, "_rayhybrid_filter", False):
        return

    held: dict[Any, list[str]] = {}  # pid -> lines of a PlacementGroupCleaner traceback

    def filtered(data: dict) -> None:
        kept = []
        pid = data.get("pid")
        for line in data.get("lines") or []:
            if data.get("actor_name") == _PG_CLEANER and (pid in held or _PG_START in line):
                # Held until its last (unindented, not "Traceback") line says what it was:
                # the known multiple-instances error is dropped, anything else printed.
                lines = held.setdefault(pid, [])
                lines.append(line)
                # The last line names the exception (a caret line of Python's traceback can
                # also arrive unindented, split off its line by the log forwarding).
                if len(lines) > 1 and _EXC_LINE.match(line):
                    del held[pid]
                    if _PG_CAUSE not in line:
                        kept.extend(lines)
                elif len(lines) > 500:  # not a traceback that ends: printed after all
                    kept.extend(held.pop(pid))
            elif not RAY_NOISE.search(line):
                kept.append(line)
        if kept:
            printer({**data, "lines": kept})

    filtered._rayhybrid_filter = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


class _ProjectInfoOnly(logging.Filter):
    """Lets through WARNING and up, and the project's own records of any level."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return record.levelno >= logging.WARNING or name.partition(".")[0] == "rayhybrid"


def quiet_worker(quiet: bool) -> None:
    """In a Ray Train worker of a quiet command, keep only the project's INFO lines on the
    console: the handlers of the root logger (which Ray Train sets up at INFO) get a filter
    that passes WARNING and up from every logger and INFO from ``rayhybrid.*``. Ray Train's
    worker log files are not touched (only stream handlers that are not file handlers get it)."""
    if not quiet:
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(
            handler, logging.FileHandler
        ):
            continue
        if not any(isinstance(f, _ProjectInfoOnly) for f in handler.filters):
            handler.addFilter(_ProjectInfoOnly())


@contextlib.contextmanager
def drop_stderr_lines(pattern: re.Pattern[str] = RAY_NOISE) -> Iterator[None]:
    """Pass this process's file descriptor 2 through a filter that drops whole lines matching
    ``pattern`` (default :data:`RAY_NOISE`), for the length of the ``with`` block.

    For what C++ code in this process writes to the descriptor directly (Ray's core worker):
    Python's logging and ``sys.stderr`` settings never see it. Everything else passes
    unchanged and at once (a partial line is passed on as it comes, unless it could be the
    start of a C++ log line). On exit the process's own output is flushed through, the
    descriptor is put back, and a process started inside the block that inherited the pipe
    keeps being filtered until it closes it. ``faulthandler``, when enabled, writes to the
    real descriptor meanwhile, so a crash report is never lost in the pipe.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
    except OSError:  # no descriptor 2 (or none left): nothing to filter
        yield
        return
    needle = pattern.pattern.encode()
    compiled = re.compile(needle)
    marker = f"\x00rayhybrid-stderr-{uuid.uuid4().hex}\n".encode()
    synced = threading.Event()

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(saved, data) :]

    def pump() -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(read_fd, 65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    full = line + b"\n"
                    if full == marker:
                        synced.set()
                    elif not compiled.search(line):
                        write(full)
                if buffer and not buffer.startswith(b"["):
                    write(buffer)
                    buffer = b""
        write(buffer)
        os.close(read_fd)

    thread = threading.Thread(target=pump, name="rayhybrid-stderr-filter", daemon=True)
    fault = faulthandler.is_enabled()
    saved_file = os.fdopen(os.dup(saved), "w")
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread.start()
    if fault:
        faulthandler.enable(file=saved_file)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(2, marker)
        synced.wait(timeout=5)
        os.dup2(saved, 2)
        if fault:
            faulthandler.enable(file=2)  # the real descriptor again
        saved_file.close()
        thread.join(timeout=0.5)  # ends now unless a child process still holds the pipe
        if not thread.is_alive():
            os.close(saved)
