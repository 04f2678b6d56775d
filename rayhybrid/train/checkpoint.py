"""The run folder, checkpoints and the training state that makes a resume exact.

A run lives in ``<train.storage_path>/<train.run_name>/``, which is also Ray Train's
experiment folder (its ``checkpoint_*`` folders and snapshot). rayhybrid adds:

- ``rayhybrid_run.json``: the MLflow run id (one MLflow run across Ray Train restarts
  and ``train.resume``), the resolved config of the run's first start (a resume whose
  data, model or batch settings differ is refused, :func:`check_resume_config`);
- ``run.lock``: held by the driver of a running run (host and pid), so a second run of the
  same name at the same time is refused;
- ``init_model/``: the tiny model and tokenizer built for this run (``model.name: tiny``);
- ``best_model/``: the exported model of the lowest validation loss so far;
- ``final_model/``: the final exported model (the best one when validation is on);
- ``mlflow_unsent.jsonl``: metrics that could not be sent when MLflow failed mid-run.

A checkpoint folder holds ``model.pt``, ``optimizer.pt``, ``scheduler.pt``,
``state.json`` (global step = the data position, best validation loss, early-stopping
counter), one ``rng_rank{r}.pt`` per worker (torch, CUDA, numpy, python RNGs, all stored
as tensors so every file loads with ``weights_only=True``) and one completion marker
``complete_rank{r}.json`` per worker, written last, with the size and SHA-256 of each file
that worker wrote. Ray Train copies the workers' files into ``checkpoint_XXXXXXXX/`` one by
one, so a folder whose files merely exist can be torn; a checkpoint is *complete* only when
every worker's marker is there and every file it lists matches (:func:`checkpoint_complete`).
A resume takes the newest complete checkpoint and restores model, optimiser, scheduler, RNG
and stream position all from that one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle  # only for its exception type: nothing is unpickled without weights_only
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayhybrid._io import write_json_atomic
from rayhybrid.train import TrainingError

if TYPE_CHECKING:
    from rayhybrid.config import TrainConfig

__all__ = [
    "RunLock",
    "RunPaths",
    "TrainState",
    "check_resume_config",
    "checkpoint_complete",
    "checkpoint_step",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_run_dir",
    "read_run_file",
    "save_checkpoint",
    "write_run_file",
]

log = logging.getLogger(__name__)

RUN_FILE = "rayhybrid_run.json"
STATE_FILE = "state.json"
RANK0_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", STATE_FILE)


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its files (see the module docstring)."""

    run_dir: str

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def init_model(self) -> Path:
        return self.root / "init_model"

    @property
    def best_model(self) -> Path:
        return self.root / "best_model"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    @property
    def mlflow_unsent(self) -> Path:
        """Metrics MLflow did not take (server down mid-run); ``resend_unsent`` logs them later."""
        return self.root / "mlflow_unsent.jsonl"


@dataclass
class TrainState:
    """What besides weights and optimiser a resumed run needs to continue exactly."""

    step: int = 0  # completed global steps = index of the next batch of the stream
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    world_size: int = 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        d["best_val_loss"] = math.inf if d.get("best_val_loss") is None else d["best_val_loss"]
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def prepare_run_dir(train_cfg: TrainConfig) -> tuple[RunPaths, bool]:
    """Create or reopen the run folder; return its paths and whether an earlier run is continued.

    Raises:
        TrainingError: the storage path is a URI (only local or mounted shared folders are
            supported), is not writable, or the run folder exists and neither
            ``train.resume`` nor ``train.overwrite`` says what to do with it.
    """
    from rayhybrid.config import resolve_path

    raw = train_cfg.storage_path
    if "://" in raw:
        raise TrainingError(
            f"train.storage_path={raw!r}: only local or mounted shared folders "
            "(NFS, a cluster file system) are supported, not URIs"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", train_cfg.run_name or ""):
        raise TrainingError(
            f"train.run_name={train_cfg.run_name!r}: use letters, digits, '.', '_' "
            "and '-' only (it names a folder)"
        )
    if train_cfg.resume and train_cfg.overwrite:
        raise TrainingError("train.resume and train.overwrite are both true: choose one")
    storage = Path(resolve_path(raw)).absolute()
    paths = RunPaths(str(storage / train_cfg.run_name))
    existed = paths.root.is_dir() and any(paths.root.iterdir())
    if train_cfg.resume and not existed:
        raise TrainingError(
            f"train.resume=true but {paths.root} holds no run named {train_cfg.run_name!r} to "
            "continue; drop train.resume to start it, or check train.storage_path / train.run_name"
        )
    if existed and not (train_cfg.resume or train_cfg.overwrite):
        raise TrainingError(
            f"run folder {paths.root} already exists (an earlier run named "
            f"{train_cfg.run_name!r}); nothing was changed. Set train.resume=true to continue it "
            "from its latest checkpoint, train.overwrite=true to replace it, or choose another "
            "train.run_name"
        )
    try:
        if existed and train_cfg.overwrite:
            _refuse_if_locked(paths)
            # Moved aside, not deleted: the driver removes it once the new run has finished
            # (remove_replaced); a failure of the new run leaves the old one to move back.
            aside = replaced_dir(paths)
            shutil.rmtree(aside, ignore_errors=True)
            paths.root.rename(aside)
        paths.root.mkdir(parents=True, exist_ok=True)
        probe = paths.root / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(
            f"train.storage_path={raw!r}: cannot write the run folder "
            f"{paths.root} ({exc.strerror or exc}); choose a writable folder"
        ) from None
    return paths, bool(existed and train_cfg.resume)


def replaced_dir(paths: RunPaths) -> Path:
    """Where ``train.overwrite`` moves the old run until the new one has finished."""
    return paths.root.with_name(paths.root.name + ".replaced")


def remove_replaced(paths: RunPaths) -> None:
    """Delete the run that ``train.overwrite`` moved aside (after the new run finished)."""
    shutil.rmtree(replaced_dir(paths), ignore_errors=True)


LOCK_FILE = "run.lock"
RESUME_SECTIONS = ("data", "model", "batch")  # what decides the batches and the weights


def _refuse_if_locked(paths: RunPaths) -> None:
    lock = paths.root / LOCK_FILE
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if _alive(holder):
        raise TrainingError(
            f"{paths.root} is in use by a running training (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, {lock}); wait for it to end or choose another train.run_name"
        )


def _alive(holder: dict) -> bool:
    """Whether a lock's holder may still run (a dead pid on this host frees the lock)."""
    import os
    import socket

    if holder.get("host") != socket.gethostname():
        return True  # another machine: cannot tell, so the lock holds
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class RunLock:
    """``run.lock`` in the run folder: one running training per run name.

    Created with ``O_EXCL`` (atomic on local disks and NFSv3+); a lock left by a process that
    died on this host is taken over. Used as a context manager by the training driver.
    """

    def __init__(self, paths: RunPaths):
        self.path = paths.root / LOCK_FILE
        self.paths = paths

    def __enter__(self) -> RunLock:  # noqa: PYI034 (not subclassed)
        import os
        import socket

        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _refuse_if_locked(self.paths)  # raises while the holder lives
                self.path.unlink(missing_ok=True)  # a stale lock
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            return self
        raise TrainingError(f"{self.path}: could not take the run lock; try again")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def check_resume_config(paths: RunPaths, config: dict[str, Any], resumed: bool) -> None:
    """Store the resolved config of a new run; refuse a resume whose settings differ.

    The data, model and batch sections (seeds included) decide the stream and the weights; a
    resume with any of them changed would silently train another run. A knob added to the
    schema since the run started matches while it holds its default
    (:func:`rayhybrid.config.config_differences`, which ``compare``'s reuse shares).

    Raises:
        TrainingError: naming every differing key.
    """
    from rayhybrid.config import Config, config_differences, config_to_dict

    plain = json.loads(json.dumps(config))  # tuples -> lists, as stored
    stored = read_run_file(paths).get("config")
    if not resumed or stored is None:
        if not resumed:
            write_run_file(paths, config=plain)
        return
    default = json.loads(json.dumps(config_to_dict(Config())))
    diff = [
        f"{key} ({old!r} -> {new!r})"
        for sec in RESUME_SECTIONS  # in this order: data, model, batch
        for key, old, new in config_differences(
            stored.get(sec, {}), plain[sec], default[sec], f"{sec}."
        )
    ]
    if diff:
        raise TrainingError(
            f"train.resume=true on {paths.root}, but these settings differ from the run's: "
            + ", ".join(diff)
            + "; resume with the run's own settings or start a new train.run_name"
        )


def read_run_file(paths: RunPaths) -> dict[str, Any]:
    """The run's bookkeeping (MLflow run id, ...); empty for a new run."""
    if not paths.run_file.is_file():
        return {}
    return json.loads(paths.run_file.read_text())


def write_run_file(paths: RunPaths, **values: Any) -> None:
    """Update the run's bookkeeping file (atomically: write then rename)."""
    write_json_atomic(paths.run_file, read_run_file(paths) | values, sort_keys=True)


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """Global step stored in a checkpoint folder."""
    return TrainState.from_json((Path(checkpoint_dir) / STATE_FILE).read_text()).step


def _marker(rank: int) -> str:
    return f"complete_rank{rank}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_complete(folder: str | Path) -> tuple[int | None, str]:
    """Whether a checkpoint folder is complete: ``(step, "")``, or ``(None, why not)``.

    Complete: the state file parses, and for every worker of the run that wrote it
    (``state.world_size``) the completion marker is there, was written for the same step and
    every file it lists has the recorded size and SHA-256. Nothing is unpickled here.
    """
    src = Path(folder)
    try:
        state = TrainState.from_json((src / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError) as exc:
        return None, f"no readable {STATE_FILE} ({exc})"
    for rank in range(state.world_size):
        try:
            marker = json.loads((src / _marker(rank)).read_text())
            files = marker["files"]
            if marker["step"] != state.step:
                return None, f"{_marker(rank)} is for step {marker['step']}, not {state.step}"
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"no readable completion marker {_marker(rank)}"
        for name, meta in files.items():
            f = src / name
            if not f.is_file() or f.stat().st_size != meta["size"]:
                return None, f"{name} is missing or has the wrong size"
            if _sha256(f) != meta["sha256"]:
                return None, f"{name} does not match its checksum"
    return state.step, ""


def complete_checkpoints(paths: RunPaths) -> list[tuple[int, Path]]:
    """The run folder's complete checkpoints, newest first; incomplete ones are logged."""
    found = []
    for folder in paths.root.glob("checkpoint_*"):
        step, why = checkpoint_complete(folder)
        if step is None:
            log.warning("checkpoint %s is incomplete (%s); it is not used", folder, why)
        else:
            found.append((step, folder))
    return sorted(found, key=lambda x: x[0], reverse=True)


def latest_checkpoint(paths: RunPaths) -> tuple[int, Path | None]:
    """The newest complete checkpoint folder of a run: ``(step, folder)``, or ``(0, None)``.

    Read from the folders themselves rather than from Ray Train's snapshot: a worker that dies
    right after reporting a checkpoint can leave it on storage but unregistered (the
    controller had not polled the report yet), and a resume must still continue from it.
    Complete is :func:`checkpoint_complete`: a torn newest checkpoint is passed over for the
    newest intact one.
    """
    found = complete_checkpoints(paths)
    return found[0] if found else (0, None)


# RNG states as tensors and plain values only, so torch.load(weights_only=True) reads them:
# numpy's and python's states are tuples holding arrays / long int tuples that would
# otherwise need pickle.
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate(
        (py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    rank: int,
    fault: Any = None,
) -> None:
    """Write this worker's part of a checkpoint into ``folder``, its completion marker last.

    Rank 0 writes weights, optimiser, scheduler and state (identical on every DDP rank);
    every rank writes its own RNG state, then ``complete_rank{rank}.json`` with the size and
    SHA-256 of each file it wrote. Ray Train merges the workers' folders into one.
    ``fault`` (tests only) is called after the first file, before the marker.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if rank == 0:
        inner = getattr(model, "module", model)
        torch.save(inner.state_dict(), out / "model.pt")
        if fault is not None:
            fault()
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        torch.save(scheduler.state_dict(), out / "scheduler.pt")
        (out / STATE_FILE).write_text(state.to_json())
        written += list(RANK0_FILES)
    elif fault is not None:
        fault()
    rng = f"rng_rank{rank}.pt"
    torch.save(_rng_state(), out / rng)
    written.append(rng)
    files = {n: {"size": (out / n).stat().st_size, "sha256": _sha256(out / n)} for n in written}
    write_json_atomic(out / _marker(rank), {"step": state.step, "rank": rank, "files": files})


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> TrainState:
    """Restore weights, optimiser, scheduler and this rank's RNG state; return the train state.

    The folder is checked (:func:`checkpoint_complete`) and every file is read, with
    ``weights_only=True``, before any state is applied: a bad checkpoint changes nothing.

    Raises:
        TrainingError: the folder is not a complete rayhybrid checkpoint.
    """
    src = Path(folder)
    step, why = checkpoint_complete(src)
    if step is None:
        raise TrainingError(f"{src}: not a complete rayhybrid checkpoint: {why}")
    try:
        weights = torch.load(src / "model.pt", map_location="cpu", weights_only=True)
        optim = torch.load(src / "optimizer.pt", map_location="cpu", weights_only=True)
        sched = torch.load(src / "scheduler.pt", weights_only=True)
        rng_file = src / f"rng_rank{rank}.pt"
        # absent when the run is resumed with more workers than it had
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # weights_only refuses anything but tensors and plain values (UnpicklingError)
        raise TrainingError(f"{src}: checkpoint refused ({type(exc).__name__}: {exc})") from None
    state = TrainState.from_json((src / STATE_FILE).read_text())
    inner = getattr(model, "module", model)
    inner.load_state_dict(weights)
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(sched)
    if rng is not None:
        _set_rng_state(rng)
    return state
