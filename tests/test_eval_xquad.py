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
    task = load_lareqa_task(
        xquad_dir, LANGS, "xquad_r", articles=parsed.key_order[:4], parsed=parsed
    )
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(
        None,
        [
            f"tracking.tracking_uri={uri}",
            f"eval.output_dir={tmp}/out",
            "eval.top_k=20",
            "eval.full_depth_runs=true",
            "eval.save_embeddings=true",
            "eval.bootstrap_samples=200",
            f"model.name={minilm_dir}",
            "eval.batch_size=64",
        ],
    )
    # As at the end of training: log into a run someone else opened (and will close).
    client = MlflowClient(uri)
    run_id = client.create_run(get_experiment_id(uri, "rayhybrid"), run_name="training").info.run_id
    from rayhybrid.evaluation import run as run_module

    with pytest.MonkeyPatch.context() as mp:  # exercise the gzip path of big artifacts
        mp.setattr(run_module, "_GZIP_ABOVE", 1_000_000)
        metrics = evaluate(cfg, tasks=[task], run_id=run_id)
    return {
        "metrics": metrics,
        "folder": tmp / "out" / "xquad_r",
        "uri": uri,
        "run_id": run_id,
        "task": task,
        "cfg": cfg,
    }


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
    for name, key in (
        ("map", "map"),
        ("mrr", "recip_rank"),
        ("r_at_1", "recall_1"),
        ("r_at_10", "recall_10"),
        ("map_at_20", "map_cut_20"),
    ):
        per_cell = {c: float(np.mean([v[key] for v in vs])) for c, vs in cells.items()}
        for c, value in per_cell.items():
            assert metrics[f"xquad_r/{setting}/{c}/{name}"] == pytest.approx(value, abs=1e-6)
        assert metrics[f"xquad_r/{setting}/{name}"] == pytest.approx(
            float(np.mean(list(per_cell.values()))), abs=1e-6
        )
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
        np.mean([np.mean(d) for d in per_lang.values()])
    )
    assert metrics["xquad_r/bias/rank_distance"] > 0
    shares = [metrics[f"xquad_r/bias/share_at_20/{lang}"] for lang in LANGS]
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
    for name in (
        "xquad_r/multi/map_at_20",
        "xquad_r/mono/map",
        "xquad_r/bias/rank_distance",
        "xquad_r/cross/map_at_20",
    ):
        assert logged[name.replace("@", "_at_")] == pytest.approx(metrics[name])
    # Per-pair values are not MLflow metrics by default (tracking.log_all_metrics); they are
    # in the returned metrics and summary.json.
    assert "xquad_r/cross/ar-de/map_at_20" not in logged
    assert "xquad_r/cross/ar-de/map_at_20" in metrics
    artifacts = {a.path for a in client.list_artifacts(xquad_eval["run_id"], "eval/xquad_r")}
    assert {
        "eval/xquad_r/summary.json",
        "eval/xquad_r/cross_heatmap.png",
        "eval/xquad_r/multi.run.gz",
        "eval/xquad_r/cross.qrels",
    } <= artifacts  # run > 1 MB
    local = client.download_artifacts(xquad_eval["run_id"], "eval/xquad_r/multi.run.gz")
    with gzip.open(local, "rt") as f:
        assert f.read() == (folder / "multi.run").read_text()


def test_in_process_dev_metrics_match_the_ray_job(xquad_eval, minilm_dir):
    from rayhybrid.evaluation.inprocess import evaluate_in_process
    from rayhybrid.model import load_biencoder

    cfg = xquad_eval["cfg"]
    tokenizer, model = load_biencoder(cfg.model, str(minilm_dir))
    dev = evaluate_in_process(model, tokenizer, xquad_eval["task"], cfg.model, top_k=20)
    for key in ("mono/map_at_20", "cross/map_at_20", "multi/map_at_20", "mono/map", "multi/mrr"):
        # Same search code; embeddings differ only by batch padding (~1e-7).
        assert dev[key] == pytest.approx(xquad_eval["metrics"][f"xquad_r/{key}"], abs=1e-3)
    assert dev["bias/rank_distance"] == pytest.approx(
        xquad_eval["metrics"]["xquad_r/bias/rank_distance"], rel=1e-2
    )


def test_cli_task_needs_data(capsys):
    from rayhybrid.cli import main

    assert main(["evaluate", "--task", "lareqa"]) == 2
    assert "--task and --data go together" in capsys.readouterr().err


# --------------------------------------------------------------------------- first principles


def _raw_lareqa(xquad_dir: Path, langs: list[str], n_articles: int):
    """Candidates (id -> (lang, sentence)) and qrels from the raw JSON, by the LAReQA definition:
    every sentence is a candidate; a question's relevant candidate in each language is the
    sentence whose break span [begin, end) holds that language's answer start."""
    cands, answer = {}, collections.defaultdict(dict)
    for lang in langs:
        data = json.loads((xquad_dir / f"{lang}.json").read_text(encoding="utf-8"))["data"]
        for ai, article in enumerate(data[:n_articles]):
            for pi, para in enumerate(article["paragraphs"]):
                for si, sent in enumerate(para["sentences"]):
                    cands[f"c:{lang}:{ai}:{pi}:{si}"] = (lang, sent)
                for qa in para["qas"]:
                    start = qa["answers"][0]["answer_start"]
                    si = next(
                        i for i, (b, e) in enumerate(para["sentence_breaks"]) if b <= start < e
                    )
                    # Surrounding whitespace of a question is not part of it (the loader strips).
                    answer[qa["id"]][lang] = (qa["question"].strip(), f"c:{lang}:{ai}:{pi}:{si}")
    queries = {
        f"q:{lang}:{qid}": (lang, text)
        for qid, per in answer.items()
        for lang, (text, _) in per.items()
    }
    qrels = {
        f"q:{lang}:{qid}": {c for _, c in per.values()}
        for qid, per in answer.items()
        for lang in per
    }
    return cands, queries, qrels


def _brute_force(
    q: np.ndarray, c: np.ndarray, cand_ids: list[str], rel: set[str], langs: set[str]
) -> list[tuple[int, str]]:
    """(1-based rank, id) of the relevant candidates, best first, after a full sort of the pool
    of ``langs`` by score (float64 products rounded to float32: the shards score in float32,
    whose order differs from this one only among near-ties, none here), ties by candidate id
    in reverse lexicographic order (trec_eval)."""
    scores = (c.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)
    ranked = sorted(
        (i for i, cid in enumerate(cand_ids) if cid.split(":")[1] in langs),
        key=lambda i: cand_ids[i],
        reverse=True,
    )
    ranked.sort(key=lambda i: -float(scores[i]))  # stable: equal scores keep the id order
    return [(r + 1, cand_ids[i]) for r, i in enumerate(ranked) if cand_ids[i] in rel]


def _ap(ranks: list[int], k: int | None = None) -> float:
    hits = [(i + 1) / r for i, r in enumerate(ranks) if k is None or r <= k]
    return sum(hits) / (len(ranks) if k is None else min(len(ranks), k))


def test_ray_path_equals_brute_force_from_the_raw_files(xquad_eval, xquad_dir):
    """Encoding actors, language shards, merge and rank counting against a plain evaluation
    written here from the definitions: raw JSON, full sort, ranks, AP, rank distance."""
    cands, queries, qrels = _raw_lareqa(xquad_dir, LANGS, 4)
    task = xquad_eval["task"]
    assert {c.id: (c.lang, c.text) for c in task.candidates} == cands
    assert {q.id: (q.lang, q.text) for q in task.queries} == queries
    assert {k: set(v) for k, v in task.qrels.items()} == qrels
    emb = np.load(xquad_eval["folder"] / "embeddings.npz", allow_pickle=False)
    q_row = {qid: i for i, qid in enumerate(emb["query_ids"].tolist())}
    cand_ids = emb["candidate_ids"].tolist()
    assert set(cand_ids) == set(cands)
    per_cell: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    distances: dict[str, list[float]] = collections.defaultdict(list)
    for qid, (qlang, _) in queries.items():
        qv = emb["queries"][q_row[qid]]
        for pool in [*LANGS, "all"]:
            langs = set(LANGS) if pool == "all" else {pool}
            found = _brute_force(qv, emb["candidates"], cand_ids, qrels[qid], langs)
            ranks = [r for r, _ in found]
            cell = (
                ("multi", qlang)
                if pool == "all"
                else (("mono", qlang) if pool == qlang else ("cross", f"{qlang}-{pool}"))
            )
            per_cell[cell].append(
                {
                    "map": _ap(ranks),
                    "map_at_20": _ap(ranks, 20),
                    "mrr": 1 / ranks[0],
                    "r_at_1": sum(r <= 1 for r in ranks) / len(ranks),
                    "r_at_10": sum(r <= 10 for r in ranks) / len(ranks),
                }
            )
            if pool == "all":  # rank distance: worst minus best of the per-language best ranks
                best: dict[str, int] = {}
                for r, cid in found:
                    best.setdefault(cid.split(":")[1], r)
                distances[qlang].append(max(best.values()) - min(best.values()))
    metrics = xquad_eval["metrics"]
    for setting in ("mono", "cross", "multi"):
        cells = {cell: vals for (s, cell), vals in per_cell.items() if s == setting}
        for name in ("map", "map_at_20", "mrr", "r_at_1", "r_at_10"):
            means = {cell: float(np.mean([v[name] for v in vals])) for cell, vals in cells.items()}
            for cell, value in means.items():
                assert abs(metrics[f"xquad_r/{setting}/{cell}/{name}"] - value) < 1e-9
            assert abs(metrics[f"xquad_r/{setting}/{name}"] - np.mean(list(means.values()))) < 1e-9
    macro = np.mean([np.mean(d) for d in distances.values()])
    pooled = [d for ds in distances.values() for d in ds]
    assert abs(metrics["xquad_r/bias/rank_distance"] - macro) < 1e-9
    assert abs(metrics["xquad_r/bias/rank_distance_micro"] - np.mean(pooled)) < 1e-9
    assert abs(metrics["xquad_r/bias/rank_distance_median"] - np.median(pooled)) < 1e-9
    # The per-query file holds the same values, cell by cell.
    rows = (xquad_eval["folder"] / "per_query_multi.tsv").read_text().splitlines()
    head = rows[0].split("\t")
    got: dict[str, list[float]] = collections.defaultdict(list)
    for line in rows[1:]:
        f = dict(zip(head, line.split("\t")))
        got[f["cell"]].append(float(f["map"]))
    assert set(got) == set(LANGS)
    for cell, vals in got.items():
        assert sorted(vals) == pytest.approx(
            sorted(v["map"] for v in per_cell[("multi", cell)]), abs=1e-12
        )


# --------------------------------------------------------------------------- uncertainty


def _tables_from(task, q_emb: np.ndarray, c_emb: np.ndarray):
    from rayhybrid.evaluation.metrics import LAREQA_METRICS
    from rayhybrid.evaluation.retrieval import CandidateIndex, LocalShards, run_settings
    from rayhybrid.evaluation.search import ShardSearcher
    from rayhybrid.evaluation.uncertainty import per_query_tables

    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    pool = LocalShards(
        {
            lang: ShardSearcher(lang, c_emb[row_of_key[keys]], keys)
            for lang, keys in cands.shard_keys().items()
        }
    )
    retrieval = run_settings(pool, task, q_emb, top_k=20)
    return per_query_tables(retrieval.blocks, retrieval.query_ids, cands.langs, LAREQA_METRICS)


def test_paired_test_and_interval_tell_a_real_difference_from_none(xquad_eval):
    """The model against a copy whose candidate embeddings are shuffled (a broken model by
    construction): significant, interval of the difference away from zero. The model against
    itself: p = 1 and an interval that holds zero."""
    from rayhybrid.evaluation.uncertainty import bootstrap, paired_test, read_per_query

    emb = np.load(xquad_eval["folder"] / "embeddings.npz", allow_pickle=False)
    task = xquad_eval["task"]
    model = read_per_query(xquad_eval["folder"])
    shuffled = _tables_from(
        task, emb["queries"], np.random.default_rng(0).permutation(emb["candidates"])
    )
    again = _tables_from(task, emb["queries"], emb["candidates"])
    for setting, metric in (("mono", "map_at_20"), ("multi", "map"), ("bias", "rank_distance")):
        assert again[setting].aggregate(metric) == pytest.approx(model[setting].aggregate(metric))
        if setting != "bias":  # a broken model ranks badly, not necessarily with more bias
            p = paired_test(model[setting], shuffled[setting], metric, permutations=500)
            diff, lo, hi = bootstrap(model[setting], metric, samples=300, other=shuffled[setting])
            assert p < 0.01 and lo > 0, (setting, metric, p, diff, lo, hi)
        assert paired_test(model[setting], again[setting], metric) == 1.0
        d0, lo0, hi0 = bootstrap(model[setting], metric, samples=300, other=again[setting])
        assert d0 == 0.0 and lo0 <= 0.0 <= hi0


def test_bootstrap_interval_resamples_items(xquad_eval):
    """The interval of the library against a plain loop written here: resample question ids
    with replacement, recompute the macro average over cells; ends agree to within the
    Monte-Carlo error of 2,000 resamples."""
    import csv

    from rayhybrid.evaluation.uncertainty import bootstrap, read_per_query

    rows = list(
        csv.DictReader((xquad_eval["folder"] / "per_query_mono.tsv").open(), delimiter="\t")
    )
    items = sorted({r["qid"].split(":", 2)[2] for r in rows})
    by_item = collections.defaultdict(list)
    for r in rows:
        by_item[r["qid"].split(":", 2)[2]].append((r["cell"], float(r["map_at_20"])))
    rng = np.random.default_rng(123)
    boot = []
    for _ in range(2000):
        cells = collections.defaultdict(list)
        for it in rng.choice(items, len(items)):
            for cell, v in by_item[it]:
                cells[cell].append(v)
        boot.append(np.mean([np.mean(v) for v in cells.values()]))
    ref_lo, ref_hi = np.percentile(boot, [2.5, 97.5])
    value, lo, hi = bootstrap(
        read_per_query(xquad_eval["folder"])["mono"], "map_at_20", samples=2000
    )
    assert value == pytest.approx(xquad_eval["metrics"]["xquad_r/mono/map_at_20"], abs=1e-12)
    width = ref_hi - ref_lo
    assert width > 0 and abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width
    # The job's own interval ends are metrics too (200 resamples in this fixture).
    m = xquad_eval["metrics"]
    assert m["xquad_r/mono/map_at_20/ci_low"] < value < m["xquad_r/mono/map_at_20/ci_high"]
    assert (
        m["xquad_r/bias/rank_distance_median/ci_low"]
        <= m["xquad_r/bias/rank_distance_median"]
        <= m["xquad_r/bias/rank_distance_median/ci_high"]
    )


def test_holm_and_bad_bootstrap_input():
    from rayhybrid.evaluation import EvaluationError
    from rayhybrid.evaluation.uncertainty import PerQuery, bootstrap, holm

    # Holm by hand: sorted p 0.01, 0.02, 0.04 times 3, 2, 1, made monotone.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, float("nan")])[0] == 0.5
    t = PerQuery(
        "mono",
        np.array(["q:en:a"], dtype=object),
        np.array(["en"], dtype=object),
        {"map": np.array([1.0])},
    )
    with pytest.raises(EvaluationError, match="samples must be >= 1"):
        bootstrap(t, "map", samples=0)
