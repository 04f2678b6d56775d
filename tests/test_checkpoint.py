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


def _train_cfg(tmp_path: Path, *overrides: str):
    from rayhybrid.config import load_config

    return load_config(
        None,
        [f"train.storage_path={tmp_path / 'runs'}", "train.run_name=r1", *overrides],
    )


def test_resume_of_a_missing_run_is_an_error(tmp_path):
    from rayhybrid.train.checkpoint import prepare_run_dir

    with pytest.raises(TrainingError, match="holds no run named 'r1'"):
        prepare_run_dir(_train_cfg(tmp_path, "train.resume=true").train)
    assert not (tmp_path / "runs" / "r1").exists()


def test_overwrite_moves_the_old_run_aside_until_the_new_one_finishes(tmp_path):
    from rayhybrid.train.checkpoint import prepare_run_dir, remove_replaced, replaced_dir

    old = tmp_path / "runs" / "r1"
    old.mkdir(parents=True)
    (old / "precious.txt").write_text("old run")
    paths, resumed = prepare_run_dir(_train_cfg(tmp_path, "train.overwrite=true").train)
    assert not resumed and not any(paths.root.iterdir())
    assert (replaced_dir(paths) / "precious.txt").read_text() == "old run"
    remove_replaced(paths)
    assert not replaced_dir(paths).exists()


def test_resume_with_other_settings_is_refused_naming_the_keys(tmp_path):
    from rayhybrid.config import config_to_dict
    from rayhybrid.train.checkpoint import check_resume_config, prepare_run_dir, read_run_file

    cfg = _train_cfg(tmp_path, "batch.seed=3")
    paths, _ = prepare_run_dir(cfg.train)
    check_resume_config(paths, config_to_dict(cfg), resumed=False)
    assert read_run_file(paths)["config"]["batch"]["seed"] == 3  # stored in the run folder
    same = _train_cfg(tmp_path, "batch.seed=3", "train.resume=true", "train.max_steps=7")
    check_resume_config(paths, config_to_dict(same), resumed=True)  # train.* may change
    other = _train_cfg(tmp_path, "batch.seed=4", "train.resume=true", "data.max_query_length=17")
    with pytest.raises(TrainingError) as err:
        check_resume_config(paths, config_to_dict(other), resumed=True)
    msg = str(err.value)
    assert "batch.seed (3 -> 4)" in msg and "data.max_query_length" in msg
    named = msg.split("differ from the run's: ")[1].split("; resume")[0]
    assert [k.split(" ")[0] for k in named.split(", ")] == ["data.max_query_length", "batch.seed"]


def test_a_second_run_of_the_same_name_is_refused(tmp_path):
    import subprocess
    import sys

    from rayhybrid.train.checkpoint import RunLock

    paths = RunPaths(str(tmp_path))
    with RunLock(paths), pytest.raises(TrainingError, match="in use by a running training"):
        RunLock(paths).__enter__()
    # A lock left by a process that died is taken over.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import socket

    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    with RunLock(paths):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] != int(dead)
    assert not (tmp_path / "run.lock").exists()
