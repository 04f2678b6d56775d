"""The run folder, checkpoints and the training state that makes a resume exact.

A run lives in ``<train.storage_path>/<train.run_name>/``, which is also Ray Train's
experiment folder (its ``checkpoint_*`` folders and snapshot). rayhybrid adds:

- ``rayhybrid_run.json``: the MLflow run id (one MLflow run across Ray Train restarts
  and ``train.resume``), the resolved config;
- ``init_model/``: the tiny model and tokenizer built for this run (``model.name: tiny``);
- ``best_model/``: the exported model of the lowest validation loss so far;
- ``final_model/``: the final exported model (the best one when validation is on);
- ``mlflow_unsent.jsonl``: metrics that could not be sent when MLflow failed mid-run.

A checkpoint folder holds ``model.pt``, ``optimizer.pt``, ``scheduler.pt``,
``state.json`` (global step = the data position, best validation loss, early-stopping
counter) and one ``rng_rank{r}.pt`` per worker (torch, CUDA, numpy, python RNGs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayhybrid.train import TrainingError

if TYPE_CHECKING:
    from rayhybrid.config import TrainConfig

__all__ = [
    "RunPaths",
    "TrainState",
    "checkpoint_step",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_run_dir",
    "read_run_file",
    "save_checkpoint",
    "write_run_file",
]

RUN_FILE = "rayhybrid_run.json"
STATE_FILE = "state.json"


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
    if existed and not (train_cfg.resume or train_cfg.overwrite):
        raise TrainingError(
            f"run folder {paths.root} already exists (an earlier run named "
            f"{train_cfg.run_name!r}); nothing was changed. Set train.resume=true to continue it "
            "from its latest checkpoint, train.overwrite=true to replace it, or choose another "
            "train.run_name"
        )
    try:
        if existed and train_cfg.overwrite:
            shutil.rmtree(paths.root)
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


def read_run_file(paths: RunPaths) -> dict[str, Any]:
    """The run's bookkeeping (MLflow run id, ...); empty for a new run."""
    if not paths.run_file.is_file():
        return {}
    return json.loads(paths.run_file.read_text())


def write_run_file(paths: RunPaths, **values: Any) -> None:
    """Update the run's bookkeeping file (atomically: write then rename)."""
    data = read_run_file(paths) | values
    tmp = paths.run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(paths.run_file)


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """Global step stored in a checkpoint folder."""
    return TrainState.from_json((Path(checkpoint_dir) / STATE_FILE).read_text()).step


def latest_checkpoint(paths: RunPaths) -> tuple[int, Path | None]:
    """The newest complete checkpoint folder of a run: ``(step, folder)``, or ``(0, None)``.

    Read from the folders themselves rather than from Ray Train's snapshot: a worker that dies
    right after reporting a checkpoint can leave it on storage but unregistered (the
    controller had not polled the report yet), and a resume must still continue from it.
    Complete means the state file, weights, optimiser, scheduler and every worker's RNG file.
    """
    best: tuple[int, Path | None] = (0, None)
    for folder in paths.root.glob("checkpoint_*"):
        try:
            state = TrainState.from_json((folder / STATE_FILE).read_text())
        except (OSError, ValueError, TypeError):
            continue
        needed = [
            "model.pt",
            "optimizer.pt",
            "scheduler.pt",
            *(f"rng_rank{r}.pt" for r in range(state.world_size)),
        ]
        if all((folder / n).is_file() for n in needed) and state.step > best[0]:
            best = (state.step, folder)
    return best


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    rank: int,
) -> None:
    """Write this worker's part of a checkpoint into ``folder``.

    Rank 0 writes weights, optimiser, scheduler and state (identical on every DDP rank);
    every rank writes its own RNG state. Ray Train merges the workers' folders into one.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        inner = getattr(model, "module", model)
        torch.save(inner.state_dict(), out / "model.pt")
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        torch.save(scheduler.state_dict(), out / "scheduler.pt")
        (out / STATE_FILE).write_text(state.to_json())
    torch.save(_rng_state(), out / f"rng_rank{rank}.pt")


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> TrainState:
    """Restore weights, optimiser, scheduler and this rank's RNG state; return the train state.

    Raises:
        TrainingError: the folder is not a rayhybrid checkpoint.
    """
    src = Path(folder)
    if not (src / STATE_FILE).is_file():
        raise TrainingError(f"{src}: not a rayhybrid checkpoint (no {STATE_FILE})")
    inner = getattr(model, "module", model)
    inner.load_state_dict(torch.load(src / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(
        torch.load(src / "optimizer.pt", map_location="cpu", weights_only=True)
    )
    scheduler.load_state_dict(torch.load(src / "scheduler.pt", weights_only=True))
    rng = src / f"rng_rank{rank}.pt"
    if rng.is_file():  # absent when the run is resumed with more workers than it had
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState.from_json((src / STATE_FILE).read_text())
