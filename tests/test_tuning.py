"""rayhybrid tune: search-space errors before anything starts, then real sweeps on local Ray.

The sweeps train the session's tiny model for a handful of steps with real Ray Tune, Ray
Train (Train V2) and a real MLflow store under tmp_path.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rayhybrid.cli import main
from rayhybrid.config import ConfigError, load_config
from rayhybrid.results import ResultsTable, plot_tradeoff
from rayhybrid.tuning_space import (
    TuneError,
    apply_overrides,
    param_space,
    parse_objective,
    search_axes,
)

REPO = Path(__file__).resolve().parents[1]
TUNE_SMALL = REPO / "configs" / "tune_small.yaml"


def small(*overrides: str):
    return load_config(TUNE_SMALL, list(overrides))


# --------------------------------------------------------------------------- bad input, no Ray


@pytest.mark.parametrize("override, fragment", [
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
    ("tune.objective=cross/ndcg@5", "expected mean_<metric>"),
    ("tune.max_concurrent=0", "tune.max_concurrent = 0"),
    ("tune.gpus_per_trial=0.5", "tune.gpus_per_trial = 0.5"),
])
def test_bad_search_space_is_refused_with_the_key(override, fragment):
    with pytest.raises(TuneError) as info:
        search_axes(small(override))
    assert fragment in str(info.value)


def test_extra_grid_values_are_type_checked_up_front():
    with pytest.raises(ConfigError, match="batch.batch_size: expected int"):
        search_axes(small("tune.extra_grid=['batch.batch_size=[16, big]']"))
    with pytest.raises(ConfigError, match="unknown key batch.batch_sise"):
        search_axes(small("tune.extra_grid=['batch.batch_sise=[16]']"))


def test_axes_and_grid_space():
    cfg = small("tune.alphas=[0.0, 1.0]", "tune.lrs=[1e-5, 1e-4]",
                "tune.extra_grid=['batch.batch_size=[16, 32]']")
    axes = search_axes(cfg)
    assert axes == {"batch.alpha": [0.0, 1.0], "train.lr": [1e-5, 1e-4], "batch.batch_size": [16, 32]}
    space, alg, n = param_space(cfg, axes)
    assert alg is None and n == 1
    assert space["batch.alpha"] == {"grid_search": [0.0, 1.0]}
    rnd, alg, n = param_space(apply_overrides(cfg, {"tune.search": "random", "tune.num_samples": 3}), axes)
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
    obj = parse_objective("mean_map@20")
    assert obj.keys == ("mono/map@20", "cross/map@20", "multi/map@20") and obj.mode == "max"
    assert obj.value({"mono/map@20": 0.3, "cross/map@20": 0.2, "multi/map@20": 0.1}) == pytest.approx(0.2)
    assert parse_objective("bias/rank_distance").mode == "min"
    assert parse_objective("mean_map@20", ("mono",)).keys == ("mono/map@20",)
    with pytest.raises(TuneError, match="needs dev metric"):
        obj.value({"mono/map@20": 0.3})


def test_cli_refuses_bad_space_before_starting_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = main(["tune", "--config", str(TUNE_SMALL), "tune.alphas=[0.2, 7]",
                   f"tune.storage_path={tmp_path / 'tune'}"])
    assert status == 1
    assert "tune.alphas[1] = 7.0 is outside [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_tradeoff_plot_and_table_round_trip(tmp_path):
    table = ResultsTable(columns=["trial", "alpha", "dev mono/map@20", "dev bias/rank_distance", "error"])
    for i, a in enumerate((0.0, 0.5, 1.0)):
        table.add({"trial": f"t{i}", "alpha": a, "dev mono/map@20": 0.1 + a / 10,
                   "dev bias/rank_distance": 300.0 - 50 * a, "error": ""})
    table.add({"trial": "t3", "alpha": 0.25, "error": "ModelError: no such model"})
    back = ResultsTable.from_csv(table.to_csv(tmp_path / "t.csv"))
    assert back.column("alpha") == [0.0, 0.5, 1.0, 0.25]
    assert back.column("dev mono/map@20")[:3] == table.column("dev mono/map@20")[:3]
    assert "ModelError: no such model" in table.to_markdown()
    png = plot_tradeoff(table, "alpha", {"mono": "dev mono/map@20"}, "dev bias/rank_distance",
                        tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
