"""A real evaluation: MiniLM on 4 XQuAD-R articles in 3 languages, re-checked from its files.

The job's metrics are recomputed with pytrec_eval (trec_eval) from the full-depth TREC runs
it wrote, and the rank distance from the ranks in the multilingual run file.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

LANGS = ["ar", "de", "en"]


@pytest.fixture(scope="module")
def xquad_eval(ray_local, xquad_dir, minilm_dir, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from rayhybrid.config import load_config
    from rayhybrid.corpus import load_lareqa_task, read_lareqa_folder
    from rayhybrid.evaluation.run import evaluate
    from rayhybrid.tracking import get_experiment_id

    tmp = tmp_path_factory.mktemp("xquad_eval")
    parsed = read_lareqa_folder(xquad_dir)
    task = load_lareqa_task(xquad_dir, LANGS, "xquad_r", articles=parsed.key_order[:4],
                            parsed=parsed)
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(None, [f"tracking.tracking_uri={uri}", f"eval.output_dir={tmp}/out",
                             "eval.top_k=20", "eval.full_depth_runs=true",
                             f"model.name={minilm_dir}", "eval.batch_size=64"])
    # As at the end of training: log into a run someone else opened (and will close).
    client = MlflowClient(uri)
    run_id = client.create_run(get_experiment_id(uri, "rayhybrid"), run_name="training").info.run_id
    from rayhybrid.evaluation import run as run_module

    with pytest.MonkeyPatch.context() as mp:  # exercise the gzip path of big artifacts
        mp.setattr(run_module, "_GZIP_ABOVE", 1_000_000)
        metrics = evaluate(cfg, tasks=[task], run_id=run_id)
    return {"metrics": metrics, "folder": tmp / "out" / "xquad_r", "uri": uri, "run_id": run_id,
            "task": task, "cfg": cfg}


def read_trec(path: Path, qrels: bool = False) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for line in path.read_text().splitlines():
        parts = line.split()
        if qrels:
            out[parts[0]][parts[2]] = int(parts[3])
        else:
            out[parts[0]][parts[2]] = float(parts[4])
    return out


def cell_of(setting: str, qid: str) -> str:
    lang = qid.split(":")[1]
    return f"{lang}-{qid.rsplit('@', 1)[1]}" if setting == "cross" else lang


@pytest.mark.parametrize("setting", ["mono", "cross", "multi"])
def test_metrics_match_pytrec_eval_on_the_written_runs(xquad_eval, setting):
    import pytrec_eval

    folder, metrics = xquad_eval["folder"], xquad_eval["metrics"]
    run = read_trec(folder / f"{setting}.run")
    qrels = read_trec(folder / f"{setting}.qrels", qrels=True)
    n_pool = {"mono": 1, "cross": 1, "multi": len(LANGS)}[setting]
    sizes = {lang: sum(c.lang == lang for c in xquad_eval["task"].candidates) for lang in LANGS}
    for qid, docs in list(run.items())[:50]:  # full depth: every candidate of the pool
        pool = [cell_of(setting, qid).split("-")[-1]] if n_pool == 1 else LANGS
        assert len(docs) == sum(sizes[p] for p in pool)
    assert max(len(v) for v in qrels.values()) <= 20  # so trec_eval's map_cut.20 == LAReQA AP@20
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"map", "recip_rank", "recall.1,10", "map_cut.20"})
    cells: dict[str, list[dict]] = collections.defaultdict(list)
    for qid, values in ev.evaluate(run).items():
        cells[cell_of(setting, qid)].append(values)
    assert len(cells) == (len(LANGS) * (len(LANGS) - 1) if setting == "cross" else len(LANGS))
    for name, key in (("map", "map"), ("mrr", "recip_rank"), ("r@1", "recall_1"),
                      ("r@10", "recall_10"), ("map@20", "map_cut_20")):
        per_cell = {c: float(np.mean([v[key] for v in vs])) for c, vs in cells.items()}
        for c, value in per_cell.items():
            assert metrics[f"xquad_r/{setting}/{c}/{name}"] == pytest.approx(value, abs=1e-6)
        assert metrics[f"xquad_r/{setting}/{name}"] == pytest.approx(
            float(np.mean(list(per_cell.values()))), abs=1e-6)
    assert metrics[f"xquad_r/{setting}/queries"] == sum(len(v) for v in cells.values())


def test_rank_distance_matches_ranks_in_the_multilingual_run(xquad_eval):
    folder, metrics = xquad_eval["folder"], xquad_eval["metrics"]
    qrels = read_trec(folder / "multi.qrels", qrels=True)
    rank = {}
    for line in (folder / "multi.run").read_text().splitlines():
        qid, _, doc, r, _, _ = line.split()
        if doc in qrels[qid]:
            rank[(qid, doc)] = int(r)
    per_lang: dict[str, list[int]] = collections.defaultdict(list)
    for qid, rel in qrels.items():
        best: dict[str, int] = {}
        for doc in rel:
            lang = doc.split(":")[1]
            best[lang] = min(best.get(lang, 10**9), rank[(qid, doc)])
        if len(best) >= 2:
            per_lang[qid.split(":")[1]].append(max(best.values()) - min(best.values()))
    for lang, dists in per_lang.items():
        assert metrics[f"xquad_r/bias/rank_distance/{lang}"] == pytest.approx(np.mean(dists))
    assert metrics["xquad_r/bias/rank_distance"] == pytest.approx(
        np.mean([np.mean(d) for d in per_lang.values()]))
    assert metrics["xquad_r/bias/rank_distance"] > 0
    shares = [metrics[f"xquad_r/bias/share@20/{lang}"] for lang in LANGS]
    assert sum(shares) == pytest.approx(1.0)


def test_outputs_and_mlflow_run(xquad_eval):
    from mlflow.tracking import MlflowClient

    folder, metrics = xquad_eval["folder"], xquad_eval["metrics"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["languages"] == LANGS and summary["full_depth_runs"] is True
    assert summary["cells"]["cross"]["ar-de"]["queries"] > 0
    for key in ("heatmap", "per_language", "multi_run", "cross_qrels"):
        assert Path(summary["files"][key]).stat().st_size > 0
    client = MlflowClient(xquad_eval["uri"])
    run = client.get_run(xquad_eval["run_id"])
    assert run.info.status == "RUNNING"  # not ours to close: the training job finishes it
    assert run.data.tags["rayhybrid.eval_status"] == "finished"
    logged = run.data.metrics
    for name in ("xquad_r/multi/map@20", "xquad_r/cross/ar-de/map@20", "xquad_r/mono/map",
                 "xquad_r/bias/rank_distance", "xquad_r/cross/map@20"):
        assert logged[name.replace("@", "_at_")] == pytest.approx(metrics[name])
    artifacts = {a.path for a in client.list_artifacts(xquad_eval["run_id"], "eval/xquad_r")}
    assert {"eval/xquad_r/summary.json", "eval/xquad_r/cross_heatmap.png",
            "eval/xquad_r/multi.run.gz", "eval/xquad_r/cross.qrels"} <= artifacts  # run > 1 MB
    local = client.download_artifacts(xquad_eval["run_id"], "eval/xquad_r/multi.run.gz")
    with gzip.open(local, "rt") as f:
        assert f.read() == (folder / "multi.run").read_text()


def test_in_process_dev_metrics_match_the_ray_job(xquad_eval, minilm_dir):
    from rayhybrid.evaluation.inprocess import evaluate_in_process
    from rayhybrid.model import load_biencoder

    cfg = xquad_eval["cfg"]
    tokenizer, model = load_biencoder(cfg.model, str(minilm_dir))
    dev = evaluate_in_process(model, tokenizer, xquad_eval["task"], cfg.model, top_k=20)
    for key in ("mono/map@20", "cross/map@20", "multi/map@20", "mono/map", "multi/mrr"):
        # Same search code; embeddings differ only by batch padding (~1e-7).
        assert dev[key] == pytest.approx(xquad_eval["metrics"][f"xquad_r/{key}"], abs=1e-3)
    assert dev["bias/rank_distance"] == pytest.approx(
        xquad_eval["metrics"]["xquad_r/bias/rank_distance"], rel=1e-2)


def test_cli_task_needs_data(capsys):
    from rayhybrid.cli import main

    assert main(["evaluate", "--task", "lareqa"]) == 2
    assert "--task and --data go together" in capsys.readouterr().err
