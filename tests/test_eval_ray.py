"""Shard actors on a real local Ray: exactness, partly parallel data, failures, MLflow status."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rayhybrid.datamodel import Candidate, DataError, EvalTask, Query
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.metrics import LAREQA_METRICS, summarize
from rayhybrid.evaluation.retrieval import CandidateIndex, run_settings
from rayhybrid.evaluation.shards import ActorShards
from tests.reference import reference_scores

LANGS = ("ar", "de", "en")


def make_task(seed: int = 0, per_lang: int = 40, d: int = 16):
    """A parallel task of random unit vectors with exact ties across shards."""
    rng = np.random.default_rng(seed)
    cands = [Candidate(f"c:{lang}:{j:03d}", lang, "") for lang in LANGS for j in range(per_lang)]
    c_emb = rng.standard_normal((len(cands), d)).astype(np.float32)
    c_emb /= np.linalg.norm(c_emb, axis=1, keepdims=True)
    c_emb[per_lang + 5] = c_emb[5]  # de:005 == ar:005, en:005 too: ties across shards
    c_emb[2 * per_lang + 5] = c_emb[5]
    queries, qrels = [], {}
    for lang in LANGS:
        for j in range(12):
            queries.append(Query(f"q:{lang}:{j}", lang, ""))
            qrels[f"q:{lang}:{j}"] = {f"c:{m}:{j:03d}": 1 for m in LANGS}
    rows = [LANGS.index(q.lang) * per_lang + int(q.id.split(":")[2]) for q in queries]
    q_emb = c_emb[rows] + 0.8 * rng.standard_normal((len(queries), d)).astype(np.float32)
    q_emb[0] = c_emb[5]  # q:ar:0 scores the three tied copies highest
    return EvalTask("toy", queries, cands, qrels), q_emb.astype(np.float32), c_emb


def shards_of(task: EvalTask, c_emb: np.ndarray) -> dict:
    ci = CandidateIndex.from_task(task)
    row = np.argsort([ci.key_of[c.id] for c in task.candidates])
    return {lang: (c_emb[row[keys]], keys) for lang, keys in ci.shard_keys().items()}


def brute(task: EvalTask, q_emb: np.ndarray, c_emb: np.ndarray, pool_langs) -> tuple:
    """Independent reference: whole ranking per query over the candidates of ``pool_langs``."""
    ids = np.array([c.id for c in task.candidates if c.lang in pool_langs])
    emb = c_emb[[i for i, c in enumerate(task.candidates) if c.lang in pool_langs]]
    s = reference_scores(q_emb, emb)
    # trec_eval order: score descending, then candidate id descending
    order = [
        sorted(range(len(ids)), key=lambda j, r=r: (-r[j], tuple(-ord(ch) for ch in ids[j])))
        for r in s
    ]
    return [ids[o] for o in order], [r[o] for r, o in zip(s, order)]


def wait_for_cpus(ray, total: float = 2.0, timeout: float = 30.0) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= total - 1e-6:
            return free
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0.0)


def test_sharded_multilingual_topk_equals_one_global_search(ray_local):
    task, q_emb, c_emb = make_task()
    with ActorShards(shards_of(task, c_emb)) as pool:
        got = run_settings(pool, task, q_emb, ("mono", "cross", "multi"), top_k=10)
    ids, scores = brute(task, q_emb, c_emb, LANGS)
    ci = got.candidates
    for block in got.blocks["multi"]:
        for j, row in enumerate(block.rows):
            assert list(ci.ids[block.top_keys[j]]) == list(ids[row][:10])
            assert np.array_equal(block.top_scores[j], scores[row][:10])
            # exact full-depth ranks of every relevant candidate, from counts alone
            for key, rank in zip(block.rel_keys[j], block.rel_ranks[j]):
                assert list(ids[row]).index(ci.ids[key]) + 1 == rank
    first = got.blocks["multi"][0]
    assert first.qlang == "ar" and list(ci.ids[first.top_keys[0][:3]]) == [
        "c:en:005",
        "c:de:005",
        "c:ar:005",
    ]  # the tie, in trec_eval order
    for block in got.blocks["cross"]:
        ids_y, _ = brute(task, q_emb, c_emb, (block.pool,))
        for j, row in enumerate(block.rows):
            assert list(ci.ids[block.top_keys[j]]) == list(ids_y[row][:10])
    assert wait_for_cpus(ray_local) == 2.0  # the context manager stopped every actor


def test_partly_parallel_data_counts_exclusions(ray_local):
    rng = np.random.default_rng(1)
    cands = [
        Candidate(f"c:{lang}:{j}", lang, "")
        for lang, n in (("ar", 6), ("de", 8), ("en", 7))
        for j in range(n)
    ]
    queries = [
        Query("q:en:a", "en", ""),
        Query("q:de:b", "de", ""),
        Query("q:ar:c", "ar", ""),
        Query("q:en:z", "en", ""),
    ]
    qrels = {
        "q:en:a": {"c:en:0": 1, "c:de:0": 1, "c:de:1": 1},  # two relevant in de, none in ar
        "q:de:b": {"c:de:2": 1},  # one language only: no rank distance
        "q:ar:c": {"c:ar:0": 1, "c:en:1": 1},  # a question that exists only in ar
        "q:en:z": {"c:missing:9": 1},
    }  # no relevant candidate anywhere
    task = EvalTask("partial", queries, cands, qrels)
    c_emb = rng.standard_normal((len(cands), 8)).astype(np.float32)
    q_emb = rng.standard_normal((4, 8)).astype(np.float32)
    with ActorShards(shards_of(task, c_emb)) as pool:
        got = run_settings(pool, task, q_emb, top_k=3)
    metrics, counts = summarize(got.blocks, got.candidates.langs, LAREQA_METRICS, 3)
    assert counts["mono"]["en"] == {"queries": 1, "excluded": 1}  # q:en:z
    assert counts["mono"]["ar"] == {"queries": 1, "excluded": 0}
    assert counts["cross"]["en-ar"] == {"queries": 0, "excluded": 2}
    assert counts["cross"]["en-de"] == {"queries": 1, "excluded": 1}
    assert counts["cross"]["ar-en"] == {"queries": 1, "excluded": 0}
    assert counts["multi"]["en"] == {"queries": 1, "excluded": 1}
    assert metrics["multi/excluded"] == 1 and metrics["bias/excluded"] == 1  # q:de:b
    assert counts["cross"]["de-ar"] == {"queries": 0, "excluded": 1}
    assert "cross/en-ar/map" not in metrics  # a cell without queries has no metric
    # q:en:a in en->de: two relevant, AP from the brute-force ranking
    ids, _ = brute(task, q_emb, c_emb, ("de",))
    r = sorted(list(ids[0]).index(c) + 1 for c in ("c:de:0", "c:de:1"))
    assert metrics["cross/en-de/map"] == pytest.approx((1 / r[0] + 2 / r[1]) / 2)
    ids, _ = brute(task, q_emb, c_emb, LANGS)
    ranks = {c: list(ids[0]).index(c) + 1 for c in ("c:en:0", "c:de:0", "c:de:1")}
    best_de = min(ranks["c:de:0"], ranks["c:de:1"])
    assert metrics["bias/rank_distance/en"] == abs(ranks["c:en:0"] - best_de)


def test_empty_shard_fails_before_any_actor_starts(ray_local):
    emb = np.ones((3, 4), np.float32)
    with pytest.raises(EvaluationError, match="shard 'de' is empty"):
        ActorShards({"en": (emb, np.arange(3)), "de": (np.zeros((0, 4), np.float32), np.arange(0))})
    assert wait_for_cpus(ray_local) == 2.0


def test_one_dead_actor_stops_all_the_others(ray_local):
    task, q_emb, c_emb = make_task(seed=2)
    pool = ActorShards(shards_of(task, c_emb), n_actors=2)
    assert pool.groups() == [["ar", "en"], ["de"]]  # equal sizes: largest first, by name
    survivors = {k: v for k, v in pool.actors.items() if k != "de"}
    ray_local.kill(pool.actors["de"])
    with pytest.raises(
        EvaluationError, match="shard 'de' died during search; all 2 shard actors were stopped"
    ):  # three languages on two actors: de alone on one
        run_settings(pool, task, q_emb, top_k=5)
    for actor in survivors.values():  # ray.kill is asynchronous: the actor dies within seconds
        deadline, died = time.monotonic() + 60, False
        while not died and time.monotonic() < deadline:
            try:
                ray_local.get(actor.pid.remote(), timeout=30)
                time.sleep(0.5)
            except ray_local.exceptions.RayActorError:
                died = True
        assert died, "a surviving shard actor still answers 60 s after the failure"
    assert pool.actors == {}
    assert wait_for_cpus(ray_local) == 2.0


def test_shard_error_inside_an_actor_names_the_shard(ray_local):
    task, q_emb, c_emb = make_task(seed=3)
    with ActorShards(shards_of(task, c_emb)) as pool:
        ref = pool.put(q_emb)
        with pytest.raises(
            EvaluationError, match="shard 'ar' failed during search: EvaluationError: .*top-k 41"
        ):
            pool.map("search", {"ar": {"queries": ref, "rows": np.arange(3), "k": 41}})
        assert pool.actors == {}


def _mlflow_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("case", ["missing_files", "top_k_too_large"])
def test_failed_evaluation_marks_the_mlflow_run_failed(ray_local, tmp_path, minilm_dir, case):
    from rayhybrid.config import load_config
    from rayhybrid.evaluation.run import evaluate

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "empty").mkdir()
    overrides = [
        f"tracking.tracking_uri={uri}",
        f"eval.output_dir={tmp_path}/out",
        f"model.name={minilm_dir}",
    ]
    if case == "missing_files":
        task_list = f"eval.tasks=[{{name: x, path: {tmp_path}/empty, part: all}}]"
        cfg = load_config(None, [*overrides, task_list])
        with pytest.raises(DataError, match="empty"):
            evaluate(cfg)
    else:
        task, _, _ = make_task()
        cfg = load_config(None, overrides + ["eval.top_k=41"])
        with pytest.raises(EvaluationError, match="eval.top_k=41 is larger than shard 'ar'"):
            evaluate(cfg, tasks=[task])
    run = _mlflow_run(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["rayhybrid.eval_status"] == "failed"
    assert ("DataError" if case == "missing_files" else "top_k=41") in run.data.tags[
        "rayhybrid.eval_error"
    ]
    assert wait_for_cpus(ray_local) == 2.0
