"""Checkpoint files without Ray: completion markers, torn files, RNG round trip, no pickle.

Issue 12: a checkpoint is complete only when every worker's marker (sizes + SHA-256, written
last) matches its files; every file loads with ``weights_only=True`` so a crafted pickle in a
shared run folder is refused and runs nothing; a refused checkpoint changes no state.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rayhybrid.train import TrainingError
from rayhybrid.train.checkpoint import (
    RunPaths,
    TrainState,
    checkpoint_complete,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rayhybrid.train.optim import build_optimizer, build_scheduler


def parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, 1e-2, 0.0)
    sched = build_scheduler(opt, 10, 0.1)
    loss = model(torch.randn(5, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(folder: Path, step: int, world: int = 2, seed: int = 0) -> torch.nn.Module:
    model, opt, sched = parts(seed)
    for rank in range(world):
        save_checkpoint(folder, model, opt, sched, TrainState(step=step, world_size=world), rank)
    return model


def test_complete_checkpoint_and_each_way_of_being_torn(tmp_path):
    run = RunPaths(str(tmp_path))
    save(tmp_path / "checkpoint_00000002", 2)
    save(tmp_path / "checkpoint_00000004", 4, seed=1)
    assert checkpoint_complete(tmp_path / "checkpoint_00000004") == (4, "")
    assert latest_checkpoint(run) == (4, tmp_path / "checkpoint_00000004")

    newest = tmp_path / "checkpoint_00000004"
    model = newest / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # a copy cut in half
    assert checkpoint_complete(newest)[0] is None
    assert latest_checkpoint(run) == (2, tmp_path / "checkpoint_00000002")

    model.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
    assert "checksum" in checkpoint_complete(newest)[1]
    model.write_bytes(data)
    assert checkpoint_complete(newest)[0] == 4
    (newest / "complete_rank1.json").unlink()  # rank 1's files not copied yet
    assert "complete_rank1.json" in checkpoint_complete(newest)[1]
    assert latest_checkpoint(run)[0] == 2


def test_load_restores_weights_and_every_rng_exactly(tmp_path):
    folder = tmp_path / "checkpoint_00000003"
    model, opt, sched = parts(5)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.standard_normal()  # numpy then holds a cached gaussian too
    save_checkpoint(folder, model, opt, sched, TrainState(step=3, world_size=1), 0)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())

    other, opt2, sched2 = parts(99)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = load_checkpoint(folder, other, opt2, sched2, rank=0)
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert state.step == 3 and got == expected
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    # The RNG file holds only tensors and plain values: readable without pickle's code paths.
    rng = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert set(rng) >= {"torch", "numpy", "python"}


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    folder = tmp_path / "checkpoint_00000002"
    save(folder, 2, world=1)
    pwned = tmp_path / "code_ran"
    rng = folder / "rng_rank0.pt"
    torch.save({"torch": _Payload(pwned)}, rng)  # what weights_only=False would execute
    # The attacker rewrites the marker too: the checksum alone cannot stop them.
    marker = folder / "complete_rank0.json"
    meta = json.loads(marker.read_text())
    meta["files"]["rng_rank0.pt"] = {
        "size": rng.stat().st_size,
        "sha256": hashlib.sha256(rng.read_bytes()).hexdigest(),
    }
    marker.write_text(json.dumps(meta))
    assert checkpoint_complete(folder)[0] == 2

    model, opt, sched = parts(42)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="checkpoint refused"):
        load_checkpoint(folder, model, opt, sched, rank=0)
    assert not pwned.exists(), "the crafted pickle ran code"
    torch.load(rng, weights_only=False)  # the file is a real exploit: unrestricted loading runs it
    assert pwned.exists()
    for k, v in model.state_dict().items():  # nothing was applied before the refusal
        assert torch.equal(before[k], v), k


def test_folder_without_markers_is_not_a_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint_00000001"
    folder.mkdir()
    (folder / "state.json").write_text(TrainState(step=1).to_json())
    for name in ("model.pt", "optimizer.pt", "scheduler.pt", "rng_rank0.pt"):
        (folder / name).write_bytes(b"x")
    assert latest_checkpoint(RunPaths(str(tmp_path))) == (0, None)
    model, opt, sched = parts(0)
    with pytest.raises(TrainingError, match="not a complete rayhybrid checkpoint"):
        load_checkpoint(folder, model, opt, sched, rank=0)
