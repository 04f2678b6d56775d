"""rayhybrid compare: strategy parsing, then two strategies trained and evaluated for real.

The end-to-end test trains the session's tiny model for a few steps per strategy on local
Ray (Train V2), evaluates each with the Ray evaluation job on held-out XQuAD-R articles and
checks every number of the table against the nested MLflow runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rayhybrid.compare import parse_strategies, strategy_config
from rayhybrid.config import ConfigError, load_config
from rayhybrid.results import ResultsTable

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "small.yaml"


def test_strategies_are_parsed_and_share_budget_and_seed():
    cfg = load_config(SMALL, ["strategies=[mono, cross, hybrid, 'hybrid(0.25)', mixed, english, 'hybrid:0.75']"])
    specs = parse_strategies(cfg)
    assert [s.label for s in specs] == ["mono", "cross", "hybrid(0.5)", "hybrid(0.25)", "mixed", "english",
                                       "hybrid(0.75)"]
    configs = [strategy_config(cfg, s) for s in specs]
    assert [c.batch.strategy for c in configs] == ["mono", "cross", "hybrid", "hybrid", "mixed", "english",
                                                    "hybrid"]
    assert configs[3].batch.alpha == 0.25
    for c in configs:  # the same budget and seed for every strategy; own run name and outputs
        assert (c.train.max_steps, c.batch.batch_size, c.batch.seed, c.train.lr) == (
            cfg.train.max_steps, cfg.batch.batch_size, cfg.batch.seed, cfg.train.lr)
    assert len({c.train.run_name for c in configs}) == len({c.eval.output_dir for c in configs}) == 7


@pytest.mark.parametrize("strategies, fragment", [
    ("[]", "strategies is empty"),
    ("[mono, crosss]", "strategies[1] = 'crosss': expected one of"),
    ("['hybrid(1.5)']", "alpha must be in [0, 1]"),
    ("[mono, mono]", "mono is listed twice"),
    ("['hybrid(0.3']", "expected one of"),
    ("['hybrid(0.3:']", "expected one of"),
])
def test_bad_strategies_are_refused(strategies, fragment):
    with pytest.raises(ConfigError) as info:
        parse_strategies(load_config(SMALL, [f"strategies={strategies}"]))
    assert fragment in str(info.value)


def test_cli_bad_strategy_exits_before_training(tmp_path, capsys, monkeypatch):
    from rayhybrid.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", str(SMALL), "strategies=[mono, bogus]"]) == 2
    assert "strategies[1] = 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_compare_two_strategies_table_equals_mlflow(ray_local, tmp_path, tiny_model_dir, xquad_dir):
    from mlflow.tracking import MlflowClient

    from rayhybrid.compare import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    langs = "[en, de, es]"
    cfg = load_config(SMALL, [
        f"model.name={tiny_model_dir}", f"data.path={xquad_dir}", f"data.languages={langs}",
        "batch.batch_size=8", "train.max_steps=3", "train.eval_every=0", "train.log_every=1",
        "train.precision=fp32", "train.cpus_per_worker=1", f"train.storage_path={tmp_path / 'runs'}",
        "train.run_name=cmp", f"tracking.tracking_uri={uri}", f"eval.output_dir={tmp_path / 'out'}",
        f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: {langs}}}]",
        "eval.top_k=20", "strategies=[mono, cross]"])
    table = compare(cfg)

    assert table.column("strategy") == ["mono", "cross"], table.to_markdown()
    assert all(not e for e in table.column("error")), table.to_markdown()
    client = MlflowClient(uri)
    columns = {"mono mAP@20": "xquad_r/mono/map_at_20", "cross mAP@20": "xquad_r/cross/map_at_20",
               "multi mAP@20": "xquad_r/multi/map_at_20", "rank distance": "xquad_r/bias/rank_distance"}
    parents = set()
    for row in table.rows:
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.params["batch.strategy"] == row["strategy"]
        assert run.data.params["train.max_steps"] == "3" and run.data.params["batch.seed"] == "0"
        parents.add(run.data.tags.get("mlflow.parentRunId"))
        for col, key in columns.items():
            assert row[col] is not None and row[col] == run.data.metrics[key], (row["strategy"], col)
    assert len(parents) == 1 and None not in parents  # both nested under one parent run
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    assert parent.data.params["compare.strategies"] == "mono,cross"

    out = tmp_path / "out" / "compare"
    back = ResultsTable.from_csv(out / "comparison.csv")
    assert back.column("mono mAP@20") == table.column("mono mAP@20")  # full precision in the CSV
    assert "| mono |" in (out / "comparison.md").read_text()
    for png in ("comparison_heatmap.png", "cross_heatmaps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison_heatmap.png"} <= artifacts


def test_cli_exits_non_zero_when_every_strategy_fails(tmp_path, capsys, monkeypatch, xquad_dir):
    """A comparison whose every row is an error is a failed job (exit 1), not a table of blanks."""
    from mlflow.tracking import MlflowClient

    from rayhybrid.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    status = main(["compare", "--config", str(SMALL), f"data.path={xquad_dir}",
                   "data.languages=[de, es]", "strategies=[english]",
                   f"tracking.tracking_uri={uri}", f"train.storage_path={tmp_path / 'runs'}",
                   f"eval.output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "| english |" in out and "English" in out  # the row carries the plan's error
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("small").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]


def test_all_failed_needs_rows_and_an_error_in_each():
    table = ResultsTable(columns=["strategy", "error"])
    assert not table.all_failed  # an empty table is not a failure of every row
    table.add({"strategy": "mono", "error": "BatchPlanError: no English"})
    assert table.all_failed
    table.add({"strategy": "cross", "error": ""})
    assert not table.all_failed
