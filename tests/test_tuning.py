"""rayhybrid tune: search-space errors before anything starts, then real sweeps on local Ray.

The sweeps train the session's tiny model for a handful of steps with real Ray Tune, Ray
Train (Train V2) and a real MLflow store under tmp_path.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from ray.tune import Callback

from rayhybrid.cli import main
from rayhybrid.config import ConfigError, apply_overrides, load_config
from rayhybrid.experiments.plots import plot_tradeoff
from rayhybrid.experiments.results import ResultsTable
from rayhybrid.tuning import TuneError
from rayhybrid.tuning.space import (
    param_space,
    parse_objective,
    search_axes,
)

REPO = Path(__file__).resolve().parents[1]
TUNE_SMALL = REPO / "configs" / "tune_small.yaml"


def small(*overrides: str):
    return load_config(TUNE_SMALL, list(overrides))


# --------------------------------------------------------------------------- bad input, no Ray


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("tune.alphas=[]", "tune.alphas is empty"),
        ("tune.alphas=[0.5, 1.2]", "tune.alphas[1] = 1.2 is outside [0, 1]"),
        ("tune.alphas=[-0.1]", "tune.alphas[0] = -0.1 is outside [0, 1]"),
        ("tune.alphas=[.nan]", "tune.alphas[0] = nan: expected a finite number"),
        ("tune.alphas=[0.5, 0.5]", "tune.alphas lists 0.5 twice"),
        ("tune.lrs=[0.0]", "tune.lrs[0] = 0.0 is outside (0, 1]"),
        ("tune.taus=[-1.0]", "tune.taus[0] = -1.0 is outside (0, inf]"),
        ("tune.extra_grid=['batch.batch_size=[]']", "empty list, the search space has no trial"),
        ("tune.extra_grid=['batch.batch_size 16']", "expected 'key=[v1, v2, ...]'"),
        ("tune.extra_grid=['batch.alpha=[0.1]']", "batch.alpha is set by the sweep itself"),
        ("data.dev_fraction=0.0", "data.dev_fraction is 0"),
        ("train.eval_every=0", "train.eval_every = 0"),
        ("tune.objective=mean_accuracy", "unknown metric 'accuracy'"),
        ("tune.objective=cross/ndcg_at_5", "expected mean_<metric>"),
        ("tune.max_concurrent=0", "tune.max_concurrent = 0"),
        ("tune.gpus_per_trial=0.5", "tune.gpus_per_trial = 0.5"),
    ],
)
def test_bad_search_space_is_refused_with_the_key(override, fragment):
    with pytest.raises(TuneError) as info:
        search_axes(small(override))
    assert fragment in str(info.value)


SPACES = sorted((REPO / "configs" / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_every_shipped_search_space_is_valid(space):
    """Each search space of configs/spaces/, over the tune config, passes the full validation."""
    cfg = load_config(TUNE_SMALL, layers=[space])
    axes = search_axes(cfg)
    assert axes["batch.alpha"] == list(cfg.tune.alphas)
    param_space(cfg, axes)


def test_space_then_overrides_on_the_command_line():
    from rayhybrid.cli import _load, build_parser

    args = build_parser().parse_args(
        ["tune", "--config", str(TUNE_SMALL), "--space", "alpha_lr", "tune.lrs=[2e-5, 5e-5]"]
    )
    cfg = _load(args)
    assert cfg.tune.alphas == (0.0, 0.25, 0.5, 0.75, 1.0)  # from the space
    assert cfg.tune.lrs == (2e-5, 5e-5)  # the command line wins
    with pytest.raises(ConfigError, match="--space nope"):
        _load(build_parser().parse_args(["tune", "--space", "nope"]))


def test_extra_grid_values_are_type_checked_up_front():
    with pytest.raises(ConfigError, match="batch.batch_size: expected int"):
        search_axes(small("tune.extra_grid=['batch.batch_size=[16, big]']"))
    with pytest.raises(ConfigError, match="unknown key batch.batch_sise"):
        search_axes(small("tune.extra_grid=['batch.batch_sise=[16]']"))


def test_axes_and_grid_space():
    cfg = small(
        "tune.alphas=[0.0, 1.0]",
        "tune.lrs=[1e-5, 1e-4]",
        "tune.extra_grid=['batch.batch_size=[16, 32]']",
    )
    axes = search_axes(cfg)
    assert axes == {
        "batch.alpha": [0.0, 1.0],
        "train.lr": [1e-5, 1e-4],
        "batch.batch_size": [16, 32],
    }
    space, alg, n = param_space(cfg, axes)
    assert alg is None and n == 1
    assert space["batch.alpha"] == {"grid_search": [0.0, 1.0]}
    rnd, alg, n = param_space(
        apply_overrides(cfg, {"tune.search": "random", "tune.num_samples": 3}), axes
    )
    assert alg is None and n == 3
    assert (rnd["batch.alpha"].lower, rnd["batch.alpha"].upper) == (0.0, 1.0)


def test_optuna_search_without_optuna_says_how_to_get_it():
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401
    except ImportError:
        cfg = small("tune.search=optuna")
        with pytest.raises(TuneError, match="pip install optuna"):
            param_space(cfg, search_axes(cfg))
    else:
        pytest.skip("optuna is installed here: the missing-optuna message cannot be shown")


def test_objective_parsing():
    obj = parse_objective("mean_map_at_20")
    assert (
        obj.keys == ("mono/map_at_20", "cross/map_at_20", "multi/map_at_20") and obj.mode == "max"
    )
    assert obj.value(
        {"mono/map_at_20": 0.3, "cross/map_at_20": 0.2, "multi/map_at_20": 0.1}
    ) == pytest.approx(0.2)
    assert parse_objective("bias/rank_distance").mode == "min"
    assert parse_objective("mean_map@20", ("mono",)).keys == ("mono/map_at_20",)
    with pytest.raises(TuneError, match="needs dev metric"):
        obj.value({"mono/map_at_20": 0.3})


def test_cli_refuses_bad_space_before_starting_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = main(
        [
            "tune",
            "--config",
            str(TUNE_SMALL),
            "tune.alphas=[0.2, 7]",
            f"tune.storage_path={tmp_path / 'tune'}",
        ]
    )
    assert status == 1
    assert "tune.alphas[1] = 7.0 is outside [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_baseline_not_in_the_sweep_is_refused_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = main(
        [
            "tune",
            "--config",
            str(TUNE_SMALL),
            "tune.alphas=[0.0, 0.5]",
            "baseline=0.3",
            f"tune.storage_path={tmp_path / 'tune'}",
        ]
    )
    assert status == 1
    assert "baseline = 0.3 is not a row of the sweep" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_tradeoff_plot_and_table_round_trip(tmp_path):
    table = ResultsTable(
        columns=["trial", "alpha", "dev mono/map_at_20", "dev bias/rank_distance", "error"]
    )
    for i, a in enumerate((0.0, 0.5, 1.0)):
        table.add(
            {
                "trial": f"t{i}",
                "alpha": a,
                "dev mono/map_at_20": 0.1 + a / 10,
                "dev bias/rank_distance": 300.0 - 50 * a,
                "error": "",
            }
        )
    table.add({"trial": "t3", "alpha": 0.25, "error": "ModelError: no such model"})
    back = ResultsTable.from_csv(table.to_csv(tmp_path / "t.csv"))
    assert back.column("alpha") == [0.0, 0.5, 1.0, 0.25]
    assert back.column("dev mono/map_at_20")[:3] == table.column("dev mono/map_at_20")[:3]
    assert "ModelError: no such model" in table.to_markdown()
    for row in table.rows[:3]:  # interval ends draw error bars
        row["dev mono/map_at_20 low"], row["dev mono/map_at_20 high"] = (
            row["dev mono/map_at_20"] - 0.01,
            row["dev mono/map_at_20"] + 0.02,
        )
    png = plot_tradeoff(
        table, "alpha", {"mono": "dev mono/map_at_20"}, "dev bias/rank_distance", tmp_path / "p.png"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- real sweeps


class InterruptAfterFirstTrial(Callback):
    """When the first trial completes, send this process SIGUSR1.

    Ray Tune handles SIGUSR1 exactly like Ctrl-C: it stops the sweep and saves the
    experiment state. The marker file makes it fire once, also after the restore (Tune
    restores its callbacks with the rest of the run config).
    """

    def __init__(self, marker: Path):
        self.path = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.path):
            Path(self.path).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def sweep_config(tmp_path: Path, model_dir: Path, data_dir: Path, *extra: str):
    return small(
        f"model.name={model_dir}",
        f"data.path={data_dir}",
        "data.languages=[en, de, es]",
        "batch.batch_size=8",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.log_every=2",
        "train.precision=fp32",
        "train.num_workers=1",
        f"tune.storage_path={tmp_path / 'tune'}",
        "tune.cpus_per_trial=1",
        "tune.max_concurrent=2",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"eval.output_dir={tmp_path / 'out'}",
        *extra,
    )


def children_of(cfg, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )


def parent_id(cfg) -> str:
    from rayhybrid.tuning.report import PARENT_RUN_FILE

    return (Path(cfg.tune.storage_path) / cfg.tune.name / PARENT_RUN_FILE).read_text().strip()


@pytest.mark.slow
def test_alpha_sweep_end_to_end_interrupted_and_restored(
    ray_local, tmp_path, tiny_model_dir, xquad_dir
):
    import yaml
    from mlflow.tracking import MlflowClient

    from rayhybrid.tuning.driver import run_tune

    cfg = sweep_config(
        tmp_path,
        tiny_model_dir,
        xquad_dir,
        "tune.alphas=[0.0, 0.5, 1.0]",
        "tune.name=sweep",
        "baseline=0.5",
        "eval.bootstrap_samples=200",
    )
    marker = tmp_path / "interrupted"
    first = run_tune(cfg, callbacks=[InterruptAfterFirstTrial(marker)])
    assert marker.exists(), "the sweep ended without being interrupted"
    done_before = {r["trial"] for r in first.rows if r["status"] == "finished"}
    assert done_before and len(done_before) < 3, first.to_markdown()

    # A new sweep of the same name is refused; tune.resume=true continues it.
    with pytest.raises(TuneError, match="tune.resume=true"):
        run_tune(cfg)
    # What the finished trials wrote: a rerun of their training would rewrite these files.
    # (A trial still running at the interruption may have written some too; it is rerun.)
    written = {
        p: p.stat().st_mtime_ns
        for pattern in ("**/final_model/model.safetensors", "**/trial_results/*.json")
        for p in tmp_path.glob(pattern)
        if any(f"sweep_{trial}" in str(p) for trial in done_before)
    }
    assert len(written) == 2 * len(done_before), sorted(map(str, written))
    table = run_tune(apply_overrides(cfg, {"tune.resume": True}))
    assert {p: p.stat().st_mtime_ns for p in written} == written, "a finished trial was rerun"

    assert len(table) == 3 and table.column("alpha") == [0.0, 0.5, 1.0], table.to_markdown()
    assert table.column("status") == ["finished"] * 3, table.to_markdown()
    parent = parent_id(cfg)
    runs = children_of(cfg, parent)
    for row in table.rows:
        mine = [r for r in runs if r.info.run_name == f"sweep_{row['trial']}"]
        finished = [r for r in mine if r.info.status == "FINISHED"]
        assert len(finished) == 1, (row, [r.info.status for r in mine])
        run = finished[0]
        assert run.info.run_id == row["mlflow_run_id"]
        assert float(run.data.params["batch.alpha"]) == row["alpha"]
        assert run.data.params["batch.strategy"] == "hybrid"
        # Its dev metrics are in the nested run, and the table shows the same numbers.
        metrics = run.data.metrics
        assert metrics["val/dev/objective"] == pytest.approx(row["objective"], rel=1e-9)
        assert metrics["val/dev/multi/map_at_20"] == pytest.approx(
            row["dev multi/map_at_20"], rel=1e-9
        )
        assert 0.0 <= row["dev mono/map_at_20"] <= 1.0 and row["dev bias/rank_distance"] >= 0
        if row["trial"] in done_before:  # finished before the interruption: never rerun
            assert len(mine) == 1
    # Intervals and paired tests against the baseline alpha, from each trial's per-query
    # dev file: its macro figure (recomputed here with plain means) is the row's figure.
    assert [r["baseline"] for r in table.rows] == [False, True, False]
    for row in table.rows:
        folder = Path(cfg.tune.storage_path) / "sweep" / "train_runs" / f"sweep_{row['trial']}"
        lines = (folder / "dev" / "per_query_multi.tsv").read_text().splitlines()
        head = lines[0].split("\t")
        cells: dict[str, list[float]] = {}
        for line in lines[1:]:
            f = dict(zip(head, line.split("\t")))
            cells.setdefault(f["cell"], []).append(float(f["map_at_20"]))
        macro = sum(sum(v) / len(v) for v in cells.values()) / len(cells)
        assert macro == pytest.approx(row["dev multi/map_at_20"], abs=1e-9)
        for col in ("dev mono/map_at_20", "dev multi/map_at_20", "dev bias/rank_distance"):
            assert row[f"{col} low"] <= row[col] <= row[f"{col} high"], (row, col)
            if row["baseline"]:
                assert row.get(f"{col} p") is None
            else:
                assert 0.0 <= row[f"{col} p"] <= row[f"{col} p_holm"] <= 1.0
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(parent).info.status == "FINISHED"
    out = Path(cfg.eval.output_dir) / "tune_sweep"
    assert (out / "alpha_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert len(ResultsTable.from_csv(out / "results.csv")) == 3
    # What the command prints: one line per trial, figures with their interval and marker.
    summary = (out / "summary.md").read_text()
    assert summary.startswith("**tune sweep") and table.summary == summary
    lines = [line for line in summary.splitlines() if re.match(r"\| [01]\.\d{3} \|", line)]
    assert len(lines) == 3 and "(baseline)" in lines[1], summary
    assert "mlflow_run_id" not in summary, summary
    for row, line in zip(table.rows, lines):
        low, high = row["dev multi/map_at_20 low"], row["dev multi/map_at_20 high"]
        cell = f"{row['dev multi/map_at_20']:.3f} [{low:.3f}, {high:.3f}]"
        assert cell in line, (cell, line)
    best = max(table.rows, key=lambda r: r["objective"])
    assert yaml.safe_load((out / "best_config.yaml").read_text())["batch"]["alpha"] == best["alpha"]
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "results.md", "alpha_tradeoff.png", "best_config.yaml"} <= artifacts


@pytest.mark.slow
def test_failed_trial_is_in_the_table_and_the_others_finish(
    ray_local, tmp_path, tiny_model_dir, xquad_dir
):
    from mlflow.tracking import MlflowClient

    from rayhybrid.tuning.driver import run_tune

    missing = tmp_path / "no_such_model"
    cfg = sweep_config(
        tmp_path,
        tiny_model_dir,
        xquad_dir,
        "tune.alphas=[0.5]",
        "tune.name=fails",
        f"tune.extra_grid=['model.name=[{tiny_model_dir}, {missing}]']",
        "tune.scheduler=none",
    )
    table = run_tune(cfg)
    assert len(table) == 2, table.to_markdown()
    by_model = {r["model.name"]: r for r in table.rows}
    ok, bad = by_model[str(tiny_model_dir)], by_model[str(missing)]
    assert ok["status"] == "finished" and ok["objective"] is not None and not ok["error"]
    assert bad["status"] == "error" and "ModelError" in bad["error"], bad
    assert bad.get("objective") is None
    assert "ModelError" in table.to_markdown()
    parent = parent_id(cfg)
    statuses = {r.info.run_name: r.info.status for r in children_of(cfg, parent)}
    assert statuses == {f"fails_{ok['trial']}": "FINISHED"}  # the failed trial never started a run
    metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(parent).data.metrics
    assert metrics["runs/failed"] == 1 and metrics["runs/total"] == 2


# --------------------------------------------------------------------------- restore, time budget


def test_a_restored_trial_continues_its_run_and_keeps_its_checkpoints(tmp_path):
    """Issue 12: a trial restarted by Tuner.restore resumes its run folder (not step 0)."""
    import torch

    from rayhybrid.config import config_to_dict
    from rayhybrid.train.checkpoint import (
        TrainState,
        check_resume_config,
        latest_checkpoint,
        prepare_run_dir,
        save_checkpoint,
    )
    from rayhybrid.train.optim import build_optimizer, build_scheduler
    from rayhybrid.tuning.driver import continue_started_trial, trial_config

    base = small("model.name=tiny", f"tune.storage_path={tmp_path}")
    tcfg = trial_config(base, {"batch.alpha": 0.5}, "sweep_00000_00000", str(tmp_path / "sweep"))
    assert continue_started_trial(tcfg) == tcfg  # nothing started yet: a fresh run
    assert tcfg.train.overwrite and not tcfg.train.resume

    # The trial's first attempt: run folder, stored config, a checkpoint at step 4.
    paths, _ = prepare_run_dir(tcfg.train)
    check_resume_config(paths, config_to_dict(tcfg), resumed=False)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, 1e-2, 0.0)
    sched = build_scheduler(opt, 10, 0.1)
    save_checkpoint(
        paths.root / "checkpoint_00000004", model, opt, sched, TrainState(step=4), rank=0
    )

    again = continue_started_trial(tcfg)  # the restored trial
    assert again.train.resume and not again.train.overwrite
    reopened, resumed = prepare_run_dir(again.train)
    assert resumed and reopened.root == paths.root
    check_resume_config(reopened, config_to_dict(again), resumed=True)  # same settings
    assert latest_checkpoint(reopened) == (4, paths.root / "checkpoint_00000004")
    # Before: overwrite moved the run aside, and the trial began again at step 0.
    assert not list(tmp_path.rglob("*.replaced"))


def test_trial_time_budget_ends_a_hung_trial_marked_in_the_table(ray_local, tmp_path):
    """Issue 12: tune.trial_timeout_s; a real Tune trial that hangs is ended and marked."""
    import time

    from ray import tune

    from rayhybrid.tuning.driver import _train_within
    from rayhybrid.tuning.report import _status

    assert _train_within(0, lambda: 7) == 7 and _train_within(30, lambda: 8) == 8
    with pytest.raises(ZeroDivisionError):
        _train_within(30, lambda: 1 / 0)  # the training's own error, not a timeout

    def hung(config):
        _train_within(config["budget"], lambda: time.sleep(600))

    started = time.monotonic()
    grid = tune.Tuner(
        tune.with_resources(hung, {"cpu": 0, "memory": 2**20}),
        param_space={"budget": 2.0},
        run_config=tune.RunConfig(name="hung", storage_path=str(tmp_path)),
    ).fit()
    assert time.monotonic() - started < 300, "the budget did not end the trial"
    result = grid[0]
    assert result.error is not None and "tune.trial_timeout_s=2 s" in str(result.error)
    assert _status(result, "ERROR", None, small()) == "timed out"
    with pytest.raises(TuneError, match="tune.trial_timeout_s = -1.0"):
        search_axes(small("tune.trial_timeout_s=-1"))
