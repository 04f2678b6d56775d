"""A real MLflow server on loopback (SQLite backend, local artifact root) and what happens when it is down.

- a tiny training logs to the server; params, metric history and artifacts are read back
  through ``MlflowClient`` (artifacts travel through the server's proxy to its artifact root);
- the server down when a run starts: ``tracking.on_unavailable=fail`` stops with one clear
  message before any training; ``local`` trains and logs to ``./mlflow.db`` instead;
- the server killed while the workers train: the run still finishes, its model is on disk,
  the end-of-training evaluation runs and writes its files, the metrics MLflow did not take
  (training's and evaluation's) wait in the run folder's queue and join the run once resent,
  and the messages say what was kept where (:class:`rayhybrid.tracking.TrackingGuard`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rayhybrid.config import config_from_dict, load_config
from tests.procs import Background, free_ports, mlflow_server_cmd

pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    root: Path
    proc: Background


def start_server(root: Path, extra: Sequence[str] = ()) -> Server:
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend, artifacts proxied to root/artifacts
    (``extra``: more server options)."""
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow 3's server also starts a job runner and a pool of huey consumers, unused here.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = mlflow_server_cmd(root, port, *extra)
    proc = Background(cmd, log=root / "server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", 120, "mlflow server")
    except BaseException:
        proc.stop()
        raise
    return Server(url=url, root=root, proc=proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.proc.stop()


def tiny_overrides(root: Path, xquad_dir: Path, name: str, uri: str, *extra: str) -> list[str]:
    return [
        f"data.path={xquad_dir}",
        "data.languages=[en,de,es]",
        "data.max_query_length=24",
        "data.max_passage_length=40",
        "model.name=tiny",
        "batch.batch_size=8",
        "train.max_steps=4",
        "train.log_every=1",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        f"train.storage_path={root / 'runs'}",
        f"train.run_name={name}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=server",
        "eval.at_end_of_training=false",
        *extra,
    ]


def test_training_run_is_read_back_from_the_server(mlflow_server, ray_local, xquad_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from rayhybrid.train.driver import train_and_evaluate

    # What `rayhybrid train` runs: training, then the held-out evaluation into the same run.
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            xquad_dir,
            "to-server",
            mlflow_server.url,
            "eval.at_end_of_training=true",
            f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: [en, de]}}]",
            "eval.top_k=20",
            f"eval.output_dir={tmp_path / 'out'}",
        ),
    )
    result, evaluated = train_and_evaluate(cfg)

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "to-server"
    params = run.data.params
    assert params["model.name"] == "tiny" and params["train.max_steps"] == "4"
    assert params["batch.strategy"] == "hybrid" and "de" in params["data.languages"]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == sorted({m.step for m in losses}) and len(losses) == 4
    assert all(m.value > 0 for m in losses)
    # The end-of-training evaluation's numbers are the run's, as the summary file has them.
    summary = json.loads((tmp_path / "out" / "xquad_r" / "summary.json").read_text())
    for key in ("multi/map_at_20", "cross/map_at_20", "bias/rank_distance"):
        assert (
            run.data.metrics[f"xquad_r/{key}".replace("@", "_at_")]
            == pytest.approx(evaluated[f"xquad_r/{key}"])
            == pytest.approx(summary["metrics"][key])
        ), key
    assert run.data.tags["rayhybrid.eval_status"] == "finished"

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval"} <= top, top
    # The model is an MLflow (sentence-transformers) model of the run, stored by the server.
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id
    assert list((mlflow_server.root / "artifacts").rglob("MLmodel")), "no MLmodel on the server"
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert config_from_dict(yaml.safe_load(Path(local).read_text())) == cfg
    # The artifacts went through the server to its artifact root, not to a client-side path.
    stored = list((mlflow_server.root / "artifacts").rglob("config.yaml"))
    assert stored, "the server's --artifacts-destination holds no config.yaml"
    assert (result.model_dir / "config.json").is_file()


def test_server_down_at_start_fails_before_training(ray_local, xquad_dir, tmp_path, capsys):
    from rayhybrid.cli import main

    (port,) = free_ports(1)  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    status = main(["train", *tiny_overrides(tmp_path, xquad_dir, "down", uri)])
    err = capsys.readouterr().err
    assert status == 1
    assert f"MLflow tracking server {uri} does not answer" in err, err
    assert "tracking.on_unavailable=local" in err  # the documented alternative is named
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "down"
    assert not (run_dir / "final_model").exists()
    assert not list(run_dir.glob("checkpoint*")), "a checkpoint was written before the check"


def test_server_refusing_the_host_name_fails_in_one_line(
    xquad_dir, tiny_model_dir, tmp_path, capsys
):
    """A server whose --allowed-hosts excludes the name the client uses answers /health and
    refuses every API call (HTTP 403): the pre-flight makes a real call and says so. (The
    command is an evaluation: it opens its MLflow run before starting Ray, as training does
    before its first step, so the refusal shows without a Ray start.)"""
    from rayhybrid.cli import main
    from rayhybrid.tracking import TrackingError, resolve_tracking_uri
    from tests.procs import http_ok

    server = start_server(tmp_path / "server", ["--allowed-hosts", "mlflow.internal"])
    try:
        assert http_ok(f"{server.url}/health"), "the refusing server should still answer /health"
        cfg = load_config(None, tiny_overrides(tmp_path, xquad_dir, "refused", server.url))
        with pytest.raises(TrackingError) as caught:
            resolve_tracking_uri(cfg.tracking)
        message = str(caught.value)
        host = server.url.split("//", 1)[1]
        assert server.url in message and "--allowed-hosts" in message and host in message
        assert "403" in message and "\n" not in message, message

        task = f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: [en]}}]"
        out = tmp_path / "out"
        args = ["evaluate", "--model", str(tiny_model_dir), task, f"eval.output_dir={out}"]
        status = main([*args, f"tracking.tracking_uri={server.url}"])
        err = capsys.readouterr().err
        assert status == 1
        last = err.strip().splitlines()[-1]
        assert last.startswith(
            "rayhybrid evaluate: error: TrackingError: MLflow tracking server"
        ), err
        assert "--allowed-hosts" in last and "Traceback" not in err, err
        assert not out.exists(), "the evaluation ran before the tracking check"
    finally:
        server.proc.stop()


def test_server_down_at_start_logs_locally_when_asked(
    ray_local, xquad_dir, tmp_path, capsys, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from rayhybrid.train.driver import train

    monkeypatch.chdir(tmp_path)  # the local store is ./mlflow.db of the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (port,) = free_ports(1)
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            xquad_dir,
            "fallback",
            f"http://127.0.0.1:{port}",
            "tracking.on_unavailable=local",
        ),
    )
    result = train(cfg)
    out = capsys.readouterr().out
    assert f"MLflow server http://127.0.0.1:{port} is down; logging to the local store" in out
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "tiny"
    assert "train/loss" in run.data.metrics


def test_guard_spills_metrics_while_the_server_is_down_and_resends_them(
    mlflow_server, tmp_path, monkeypatch, capsys
):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from rayhybrid.tracking import TrackingGuard, resend_unsent

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # read at each request
    live = MlflowClient(mlflow_server.url)
    run_id = live.create_run(live.create_experiment("guard")).info.run_id
    spill = tmp_path / "run" / "mlflow_unsent.jsonl"
    assert TrackingGuard(mlflow_server.url, spill).log_metrics(
        live, run_id, [Metric("train/loss", 2.0 - i / 10, 1000 + i, i) for i in range(3)]
    )
    assert not spill.exists()

    (port,) = free_ports(1)  # a server that has gone away
    dead_url = f"http://127.0.0.1:{port}"
    guard = TrackingGuard(dead_url, spill)
    dead = MlflowClient(dead_url)
    later = [Metric("train/loss", 1.0 - i / 10, 2000 + i, i) for i in range(3, 6)]
    started = time.monotonic()
    assert not guard.log_metrics(dead, run_id, later[:2]) and not guard.ok
    assert not guard.call("finish the run", dead.set_terminated, run_id)  # no new attempt
    assert not guard.log_metrics(dead, run_id, later[2:])
    assert time.monotonic() - started < 60
    out = capsys.readouterr().out
    assert out.count("MLflow tracking at") == 1 and "The run continues" in out and str(spill) in out
    assert len(spill.read_text().splitlines()) == 3

    assert resend_unsent(spill, mlflow_server.url, run_id) == 3  # the server is back
    history = live.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(6))
    assert not spill.exists() and spill.with_name(spill.name + ".sent").is_file()


def test_server_dying_mid_run_loses_no_result(xquad_dir, tmp_path):
    """Kill the server once the workers train; training and its evaluation still finish.

    The end-of-training evaluation is on: it runs, writes its files, and its metrics wait in
    the run folder's unsent queue with the training's (issue 12). The evaluation metrics in
    the queue, and not in the run until resent, prove that the server really was gone.
    """
    from rayhybrid.train.checkpoint import checkpoint_complete

    server = start_server(tmp_path / "server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    # A dead server would otherwise hold every MLflow call for minutes of HTTP retries.
    env.update(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    out_dir = tmp_path / "out"
    overrides = tiny_overrides(
        tmp_path,
        xquad_dir,
        "dies",
        server.url,
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "eval.at_end_of_training=true",
        f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: [en, de]}}]",
        "eval.top_k=20",
        f"eval.output_dir={out_dir}",
    )
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "rayhybrid"), "train", *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    run_file = tmp_path / "runs" / "dies"
    try:
        deadline = time.monotonic() + 400
        # The workers are training once the first checkpoint is complete.
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint_complete(run_file / "checkpoint_00000004")[0] == 4:
                break
            time.sleep(0.2)
        server.proc.stop(grace=5)
        status = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.proc.stop()
    text = log.read_text()
    assert status == 0, text[-5000:]
    assert (run_file / "final_model" / "config.json").is_file()
    assert "MLflow tracking at " in text and "The run continues" in text, text[-3000:]
    unsent = run_file / "mlflow_unsent.jsonl"
    # The evaluation ran and wrote its files; the message says where its numbers were kept.
    summary = json.loads((out_dir / "xquad_r" / "summary.json").read_text())
    assert f"its files are in {out_dir / 'xquad_r'}, its metrics wait in {unsent}" in text, text[
        -3000:
    ]
    assert f"metrics not sent are kept in {unsent}" in text  # the run summary says it too
    records = [json.loads(line) for line in unsent.read_text().splitlines()]
    queued = {r["key"]: r for r in records}
    for key in ("multi/map_at_20", "cross/map_at_20", "bias/rank_distance"):
        rec = queued[f"xquad_r/{key}"]
        assert rec["value"] == pytest.approx(summary["metrics"][key]) and rec["step"] == 8, rec

    # With the server back (the same store) the queue joins the run, which then holds every
    # training step once and the evaluation's figures.
    from mlflow.tracking import MlflowClient

    from rayhybrid.tracking import resend_unsent

    run_id = json.loads((run_file / "rayhybrid_run.json").read_text())["mlflow_run_id"]
    server = start_server(tmp_path / "server")
    try:
        client = MlflowClient(server.url)
        assert "xquad_r/multi/map_at_20" not in client.get_run(run_id).data.metrics
        assert resend_unsent(unsent, server.url, run_id) == len(records)
        losses = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, 9)), losses
        logged = client.get_run(run_id).data.metrics
        assert logged["xquad_r/multi/map_at_20"] == pytest.approx(
            summary["metrics"]["multi/map_at_20"]
        )
    finally:
        server.proc.stop()
