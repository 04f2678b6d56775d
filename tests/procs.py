"""Real background servers for tests (a `ray start` head node, `mlflow server`).

Each server runs in its own process group (``start_new_session``) so that stopping it ends
exactly the processes the test started, children included, and nothing else on the machine
(never ``ray stop``, which would also kill the session's local Ray).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

__all__ = [
    "BIN",
    "Background",
    "cli_env",
    "free_ports",
    "http_ok",
    "mlflow_server_cmd",
    "pids_with",
    "run_cli",
]

BIN = Path(sys.executable).parent  # the venv's console scripts: rayhybrid, mlflow, ray


def cli_env(data_root: Path, drop: Sequence[str] = ("MLFLOW_", "RAY_ADDRESS")) -> dict[str, str]:
    """The environment a person's shell gives the ``rayhybrid`` console script: this one
    without the variables starting with ``drop`` (the suite's own tracking and Ray), offline,
    the data under ``data_root``, the venv's scripts first on ``PATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
    env.update(
        RAYHYBRID_DATA=str(data_root),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def run_cli(
    args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """``rayhybrid <args>`` as a subprocess, its output captured as text (not checked)."""
    return subprocess.run(
        [str(BIN / "rayhybrid"), *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def mlflow_server_cmd(root: Path, port: int, *extra: str) -> list[str]:
    """``mlflow server`` on loopback ``port``, one worker, its SQLite store and artifacts
    under ``root``; ``extra`` options appended (``--app-name basic-auth``, ...)."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (sockets held until all are chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def http_ok(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    """True when ``url`` answers 200."""
    try:
        req = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pids_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (e.g. a test's unique temp dir)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in cmdline and state != "Z":
            out.append(int(entry.name))
    return out


class Background:
    """A command running in its own session, its output in ``log``; ``stop()`` ends its group."""

    def __init__(
        self,
        cmd: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.cmd = list(cmd)
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        self.pgid = self.proc.pid  # a new session's leader: its pid is the group id

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_http(
        self, url: str, timeout: float, what: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Wait until ``url`` answers 200.

        Raises:
            RuntimeError: the process exited first or ``timeout`` passed; with its output.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with {self.proc.returncode} before {url} "
                    f"answered:\n{self.output()[-4000:]}"
                )
            if http_ok(url, headers=headers):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"{what}: {url} did not answer in {timeout:.0f}s:\n{self.output()[-4000:]}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process (it shuts its children down), then SIGKILL what is left of its group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        self._log_file.close()

    def alive_in_group(self) -> list[int]:
        """Pids still in this process group (for a test that checks clean shutdown)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) == self.pgid:
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                        out.append(int(entry.name))
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
        return out
