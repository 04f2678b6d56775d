"""rayhybrid compare: strategy parsing, then two strategies trained and evaluated for real.

The end-to-end test trains the session's tiny model for a few steps per strategy on local
Ray (Train V2), evaluates each with the Ray evaluation job on held-out XQuAD-R articles and
checks every number of the table against the nested MLflow runs.
"""

from __future__ import annotations

import collections
import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from rayhybrid.config import ConfigError, apply_overrides, load_config
from rayhybrid.experiments.compare import parse_strategies, strategy_config
from rayhybrid.experiments.results import ResultsTable

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "small.yaml"


def test_strategies_are_parsed_and_share_budget_and_seed():
    cfg = load_config(
        SMALL, ["strategies=[mono, cross, hybrid, 'hybrid(0.25)', mixed, english, 'hybrid:0.75']"]
    )
    specs = parse_strategies(cfg)
    assert [s.label for s in specs] == [
        "mono",
        "cross",
        "hybrid(0.5)",
        "hybrid(0.25)",
        "mixed",
        "english",
        "hybrid(0.75)",
    ]
    configs = [strategy_config(cfg, s) for s in specs]
    assert [c.batch.strategy for c in configs] == [
        "mono",
        "cross",
        "hybrid",
        "hybrid",
        "mixed",
        "english",
        "hybrid",
    ]
    assert configs[3].batch.alpha == 0.25
    for c in configs:  # the same budget and seed for every strategy; own run name and outputs
        assert (c.train.max_steps, c.batch.batch_size, c.batch.seed, c.train.lr) == (
            cfg.train.max_steps,
            cfg.batch.batch_size,
            cfg.batch.seed,
            cfg.train.lr,
        )
    assert (
        len({c.train.run_name for c in configs}) == len({c.eval.output_dir for c in configs}) == 7
    )


@pytest.mark.parametrize(
    "strategies, fragment",
    [
        ("[]", "strategies is empty"),
        ("[mono, crosss]", "strategies[1] = 'crosss': expected one of"),
        ("['hybrid(1.5)']", "alpha must be in [0, 1]"),
        ("[mono, mono]", "mono is listed twice"),
        ("['hybrid(0.3']", "expected one of"),
        ("['hybrid(0.3:']", "expected one of"),
    ],
)
def test_bad_strategies_are_refused(strategies, fragment):
    with pytest.raises(ConfigError) as info:
        parse_strategies(load_config(SMALL, [f"strategies={strategies}"]))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("strategies=[mono, bogus]", "strategies[1] = 'bogus'"),
        (
            "baseline=mixed",
            "baseline = 'mixed' is not a row of the table; expected one of mono, cross",
        ),
        ("baseline=hybrid(0.3)", "baseline = 'hybrid(0.3)' is not a row"),
        ("seeds=[]", "seeds: expected at least one seed"),
        ("eval.bootstrap_samples=0", "eval.bootstrap_samples: expected an integer >= 1, got 0"),
        ("eval.bootstrap_samples=-5", "eval.bootstrap_samples: expected an integer >= 1, got -5"),
        ("eval.permutations=0", "eval.permutations: expected an integer >= 1"),
    ],
)
def test_cli_bad_compare_input_exits_before_training(
    tmp_path, capsys, monkeypatch, override, fragment
):
    from rayhybrid.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", str(SMALL), "strategies=[mono, cross]", override]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _macro_from_file(path: Path, metric: str) -> tuple[float, dict[str, dict[str, float]]]:
    """Macro figure of a per-query file recomputed with csv and plain means, plus per item
    and cell the values (for the test's own permutation test)."""
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    cells: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        cells[r["cell"]].append(float(r[metric]))
    values = {(r["qid"], r["cell"]): float(r[metric]) for r in rows}
    return statistics.mean(statistics.mean(v) for v in cells.values()), values


@pytest.mark.slow
def test_compare_two_strategies_two_seeds_table_equals_files_and_mlflow(
    ray_local, tmp_path, tiny_model_dir, xquad_dir
):
    """2 strategies x 2 seeds: every figure of the table is recomputed here from the
    per-query files (mean and sd over seeds, the paired test against the baseline, Holm,
    the markers) and from the nested MLflow runs."""
    from mlflow.tracking import MlflowClient

    from rayhybrid.experiments.compare import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    langs = "[en, de, es]"
    cfg = load_config(
        SMALL,
        [
            f"model.name={tiny_model_dir}",
            f"data.path={xquad_dir}",
            f"data.languages={langs}",
            "batch.batch_size=8",
            "train.max_steps=3",
            "train.eval_every=0",
            "train.log_every=1",
            "train.precision=fp32",
            "train.cpus_per_worker=1",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=cmp",
            f"tracking.tracking_uri={uri}",
            f"eval.output_dir={tmp_path / 'out'}",
            f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: {langs}}}]",
            "eval.top_k=20",
            "strategies=[mono, cross]",
            "seeds=[0, 1]",
            "baseline=mono",
            "eval.bootstrap_samples=300",
            "eval.permutations=2000",
        ],
    )
    table = compare(cfg)

    assert table.column("strategy") == ["mono", "cross"], table.to_markdown()
    assert all(not e for e in table.column("error")) and table.column("seeds") == [2, 2]
    client = MlflowClient(uri)
    columns = {
        "mono mAP@20": ("mono", "map_at_20"),
        "cross mAP@20": ("cross", "map_at_20"),
        "multi mAP": ("multi", "map"),
        "multi nDCG@10": ("multi", "ndcg_at_10"),
        "mono MRR@10": ("mono", "mrr_at_10"),
        "rank distance": ("bias", "rank_distance"),
    }
    parents, seed_values = set(), {}
    out = tmp_path / "out" / "compare"
    for row in table.rows:
        run_ids = row["mlflow_run_id"].split(",")
        assert len(run_ids) == 2
        for seed, run_id in zip((0, 1), run_ids):
            run = client.get_run(run_id)
            assert run.data.params["batch.strategy"] == row["strategy"]
            assert run.data.params["batch.seed"] == str(seed)
            parents.add(run.data.tags.get("mlflow.parentRunId"))
            for col, (setting, metric) in columns.items():
                folder = out / row["strategy"] / f"seed{seed}" / "xquad_r"
                value, per_row = _macro_from_file(folder / f"per_query_{setting}.tsv", metric)
                seed_values[(row["strategy"], col, seed)] = per_row
                key = (
                    "xquad_r/bias/rank_distance"
                    if setting == "bias"
                    else f"xquad_r/{setting}/{metric.replace('@', '_at_')}"
                )
                assert run.data.metrics[key] == pytest.approx(value, abs=1e-9), (row, col)
                seed_values[(row["strategy"], col, seed, "figure")] = value
        for col in columns:
            figures = [seed_values[(row["strategy"], col, s, "figure")] for s in (0, 1)]
            assert row[col] == pytest.approx(statistics.mean(figures), abs=1e-9)
            assert row[f"{col} sd"] == pytest.approx(statistics.stdev(figures), abs=1e-9)
            assert row[f"{col} low"] <= row[col] <= row[f"{col} high"]
    assert len(parents) == 1 and None not in parents  # all four nested under one parent run
    mono, cross = table.rows
    assert all(mono.get(f"{c} p") is None for c in columns)  # the baseline is not tested
    for col, (setting, metric) in columns.items():
        # The test's own paired randomization test over items on the seed-averaged rows.
        avg = {
            name: {
                k: statistics.mean(seed_values[(name, col, s)][k] for s in (0, 1))
                for k in seed_values[(name, col, 0)]
            }
            for name in ("mono", "cross")
        }
        cell_size = collections.Counter(cell for (_, cell) in avg["mono"])
        n_cells = len(cell_size)
        contrib = {name: collections.defaultdict(float) for name in avg}
        for name, vals in avg.items():
            for (qid, cell), v in vals.items():
                contrib[name][qid.split(":", 2)[2]] += v / cell_size[cell] / n_cells
        items = sorted(contrib["mono"])
        d = np.array([contrib["cross"][i] - contrib["mono"][i] for i in items])
        assert d.sum() == pytest.approx(cross[col] - mono[col], abs=1e-9)
        signs = np.random.default_rng(7).choice([-1.0, 1.0], size=(20000, len(d)))
        p_ref = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))
        assert cross[f"{col} p"] == pytest.approx(p_ref, abs=0.03), col
        assert cross[f"{col} p_holm"] == cross[f"{col} p"]  # one tested row: Holm changes nothing
        assert cross[f"{col} diff"] == pytest.approx(cross[col] - mono[col], abs=1e-9)
    markdown = (out / "comparison.md").read_text()
    assert "| mono (baseline) | 2 |" in markdown
    cross_line = next(line for line in markdown.splitlines() if line.startswith("| cross |"))
    for i, col in enumerate(table.columns[3 : 3 + 7]):
        cell = cross_line.split(" | ")[2 + i]
        p = cross.get(f"{col} p_holm")
        want = "" if p is None else ("**" if p < 0.01 else "*" if p < 0.05 else "")
        assert cell.endswith(f"] {want}" if want else "]"), (col, cell, p)
        assert f"{cross[col]:.3f}" in cell or f"{cross[col]:.0f}" in cell
    back = ResultsTable.from_csv(out / "comparison.csv")
    assert back.column("mono mAP@20") == table.column("mono mAP@20")  # full precision in the CSV
    for png in ("comparison_heatmap.png", "cross_heatmaps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    assert parent.data.params["compare.strategies"] == "mono,cross"
    assert parent.data.params["compare.seeds"] == "0,1"
    assert parent.data.metrics["compare/cross/mono_mAP_at_20_ci_low"] == cross["mono mAP@20 low"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison_heatmap.png"} <= artifacts

    # reuse=true: finished (strategy, seed) runs are read back, not trained again; a record
    # written by another config (here: its learning rate edited) is run again.
    def n_runs() -> int:
        return len(client.search_runs([parent.info.experiment_id], max_results=1000))

    before = n_runs()
    again = compare(apply_overrides(cfg, {"reuse": True}))
    assert n_runs() == before + 1  # a new parent run, no new training run
    for col in ("strategy", "mlflow_run_id", *columns, *(f"{c} sd" for c in columns)):
        assert again.column(col) == table.column(col), col  # (p: a new randomization test)
    record = out / "cross" / "seed1" / "compare_run.json"
    data = json.loads(record.read_text())
    data["config"]["train"]["lr"] *= 2
    record.write_text(json.dumps(data))
    third = compare(apply_overrides(cfg, {"reuse": True}))
    assert n_runs() == before + 3  # one more parent and the one stale run trained again
    ids = third.column("mlflow_run_id")
    assert ids[0] == table.column("mlflow_run_id")[0]
    assert ids[1].split(",")[0] == cross["mlflow_run_id"].split(",")[0]
    assert ids[1].split(",")[1] != cross["mlflow_run_id"].split(",")[1]


def test_cli_exits_non_zero_when_every_strategy_fails(tmp_path, capsys, monkeypatch, xquad_dir):
    """A comparison whose every row is an error is a failed job (exit 1), not a table of blanks."""
    from mlflow.tracking import MlflowClient

    from rayhybrid.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    status = main(
        [
            "compare",
            "--config",
            str(SMALL),
            f"data.path={xquad_dir}",
            "data.languages=[de, es]",
            "strategies=[english]",
            f"tracking.tracking_uri={uri}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"eval.output_dir={tmp_path / 'out'}",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1, out
    # The printed table (comparison.md) shows the row with the plan's error.
    assert re.search(r"\| english( \(baseline\))? \|", out) and "English" in out, out
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("small").experiment_id]
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]


def test_all_failed_needs_rows_and_an_error_in_each():
    table = ResultsTable(columns=["strategy", "error"])
    assert not table.all_failed  # an empty table is not a failure of every row
    table.add({"strategy": "mono", "error": "BatchPlanError: no English"})
    assert table.all_failed
    table.add({"strategy": "cross", "error": ""})
    assert not table.all_failed


def test_reuse_fingerprint_differences_name_the_keys():
    """A stored record matches only the config it was written by; a knob added to the schema
    since (absent from the record) matches while it holds its default."""
    from rayhybrid.config import Config
    from rayhybrid.experiments.compare import _differences, _fingerprint

    cfg = load_config(SMALL)
    default = _fingerprint(Config())
    stored = _fingerprint(cfg)
    assert _differences(stored, _fingerprint(cfg), default) == []
    changed = apply_overrides(cfg, {"train.lr": cfg.train.lr * 2, "batch.seed": 7})
    assert _differences(stored, _fingerprint(changed), default) == ["batch.seed", "train.lr"]
    older = json.loads(json.dumps(stored))
    del older["train"]["tau"]  # as if train.tau had been added after the record was written
    assert _differences(older, _fingerprint(cfg), default) == (
        [] if cfg.train.tau == Config().train.tau else ["train.tau"]
    )
    assert _differences(
        older, _fingerprint(apply_overrides(cfg, {"train.tau": 0.123})), default
    ) == ["train.tau"]
    tracking_only = apply_overrides(cfg, {"tracking.experiment": "elsewhere", "reuse": True})
    assert _differences(stored, _fingerprint(tracking_only), default) == []
    # A field added to the task type since (eval.tasks is a list of sections): equal at its
    # default, a difference named by item when set.
    no_field = json.loads(json.dumps(stored))
    del no_field["eval"]["tasks"][0]["corpus_path"]
    assert _differences(no_field, _fingerprint(cfg), default) == []
    moved = json.loads(json.dumps(stored))
    moved["eval"]["tasks"][0]["corpus_path"] = "/elsewhere"
    assert _differences(moved, _fingerprint(cfg), default) == ["eval.tasks[0].corpus_path"]


def test_a_metric_some_run_lacks_is_left_out_of_the_comparison(tmp_path, caplog):
    """Reused records written before a metric existed: that column is left out for every row
    (said in a warning), the others are computed as usual (mean over seeds by hand)."""
    from rayhybrid.evaluation.uncertainty import (
        Column,
        PerQuery,
        comparison_stats,
        write_per_query,
    )

    rng = np.random.default_rng(0)
    qids = np.array([f"q:en:{i}" for i in range(40)])
    maps = {}

    def run(name, metrics):
        values = {m: rng.random(40) for m in metrics}
        maps[name] = values["map"].mean()  # one cell: the macro figure is the plain mean
        write_per_query(
            {"mono": PerQuery("mono", qids, np.array(["en"] * 40), values)}, tmp_path / name / "t"
        )
        return tmp_path / name

    runs = {
        "old": [run("old0", ["map"]), run("old1", ["map", "ndcg_at_10"])],
        "new": [run("new0", ["map", "ndcg_at_10"])],
    }
    cols = [
        Column("mono mAP", "t", "mono", "map"),
        Column("mono nDCG@10", "t", "mono", "ndcg_at_10"),
    ]
    import logging

    logger = logging.getLogger("rayhybrid.evaluation.uncertainty")
    logger.addHandler(caplog.handler)  # the project's loggers may not propagate (setup_logging)
    try:
        stats = comparison_stats(runs, cols, "old", samples=50, permutations=50)
    finally:
        logger.removeHandler(caplog.handler)
    assert set(stats["old"]) == set(stats["new"]) == {"mono mAP"}
    assert stats["old"]["mono mAP"]["mean"] == pytest.approx((maps["old0"] + maps["old1"]) / 2)
    assert stats["new"]["mono mAP"]["mean"] == pytest.approx(maps["new0"])
    assert "mono nDCG@10: left out, 1 run(s) have no ndcg_at_10" in caplog.text
