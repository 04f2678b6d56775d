"""Query language x corpus language for BEIR folders, and the resource-group table: the
pipeline's search and metrics on hand-made embeddings, figures checked against values
worked out by hand here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rayhybrid.config import ConfigError, config_from_dict
from rayhybrid.corpus.beir import load_beir_cross_task, load_beir_task
from rayhybrid.datamodel import EvalTask
from rayhybrid.evaluation.groups import write_groups
from rayhybrid.evaluation.metrics import BEIR_METRICS, summarize
from rayhybrid.evaluation.retrieval import CandidateIndex, LocalShards, run_settings
from rayhybrid.evaluation.search import ShardSearcher
from rayhybrid.evaluation.uncertainty import per_query_tables, write_per_query


def _folder(root: Path, lang: str, n_docs: int, qrels: list[tuple[int, int, int]]) -> Path:
    """A MIRACL-like BEIR folder: docs {lang}{i}, queries 0..; qrels (query, doc, grade)."""
    folder = root / f"miracl-{lang}"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"{lang}{i}", "title": "", "text": f"{lang} doc {i}"} for i in range(n_docs)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    n_q = max(q for q, _, _ in qrels) + 1
    queries = [{"_id": str(q), "text": f"{lang} query {q}"} for q in range(n_q)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = [f"{q}\t{lang}{d}\t{g}" for q, d, g in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _run(task: EvalTask, weights: dict[str, list[float]], setting: str, out: Path) -> dict:
    """Candidates are unit vectors (the doc number after the language), each query a mix of
    them: its ranking is the order of its weights. Writes the per-query files to ``out``."""
    cands = CandidateIndex.from_task(task)
    c_emb = np.eye(8)[[int(c.id.rsplit(":", 1)[1][2:]) for c in task.candidates]]
    q_emb = np.array([weights[q.id] + [0.0] * (8 - len(weights[q.id])) for q in task.queries])
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    pool = LocalShards(
        {
            lang: ShardSearcher(lang, c_emb[row_of_key[keys]].astype(np.float32), keys)
            for lang, keys in cands.shard_keys().items()
        }
    )
    retrieval = run_settings(pool, task, q_emb.astype(np.float32), [setting], 1)
    write_per_query(
        per_query_tables(retrieval.blocks, retrieval.query_ids, cands.langs, BEIR_METRICS), out
    )
    return summarize(retrieval.blocks, cands.langs, BEIR_METRICS, 1)[0]


def test_cross_folder_evaluation_and_resource_groups(tmp_path):
    en = _folder(tmp_path, "en", 3, [(0, 0, 1), (1, 2, 1)])
    sw = _folder(tmp_path, "sw", 3, [(0, 1, 1), (1, 0, 1), (1, 2, 1)])
    yo = _folder(tmp_path, "yo", 2, [(0, 1, 1)])
    sw_en = tmp_path / "sw_en.tsv"  # Swahili queries judged against the English corpus
    sw_en.write_text("0\ten1\t1\n1\ten0\t1\n1\tsw2\t1\n")
    tasks = {
        "miracl_en": load_beir_task(en, "en", name="miracl_en"),
        "miracl_sw": load_beir_task(sw, "sw", name="miracl_sw"),
        "miracl_yo": load_beir_task(yo, "yo", name="miracl_yo"),
        "sw_x_en": load_beir_cross_task(sw, "sw", en, "en", name="sw_x_en", qrels_path=sw_en),
    }
    assert tasks["sw_x_en"].report.counts["qrels_unknown_candidate"] == 1  # sw2 is not in en
    weights = {
        # en: q0 -> en0 first (rank 1); q1 -> en0, en2: its relevant en2 at rank 2
        "miracl_en": {"q:en:0": [1, 0.5, 0.2], "q:en:1": [0.9, 0.1, 0.5]},
        # sw: q0 -> sw1 rank 1; q1 -> sw2, sw1, sw0: relevant sw2, sw0 at ranks 1 and 3
        "miracl_sw": {"q:sw:0": [0.2, 1, 0.1], "q:sw:1": [0.1, 0.3, 0.9]},
        # yo: q0 -> yo0, yo1: relevant yo1 at rank 2
        "miracl_yo": {"q:yo:0": [1, 0.2]},
        # sw->en: q0 -> en2, en0, en1: relevant en1 at rank 3; q1 -> en0 at rank 1
        "sw_x_en": {"q:sw:0": [0.3, 0.1, 0.9], "q:sw:1": [1, 0, 0]},
    }
    folders, figures = {}, {}
    for name, task in tasks.items():
        folders[name] = tmp_path / "out" / name
        setting = "cross" if name == "sw_x_en" else "mono"
        figures[name] = _run(task, weights[name], setting, folders[name])
    # the cross-folder task is one cross cell, sw -> en
    ap = {"en": (1 + 1 / 2) / 2, "sw": (1 + (1 + 2 / 3) / 2) / 2, "yo": 1 / 2}
    assert figures["sw_x_en"]["cross/sw-en/map"] == pytest.approx((1 / 3 + 1) / 2)
    assert figures["sw_x_en"]["cross/sw-en/mrr_at_10"] == pytest.approx((1 / 3 + 1) / 2)
    assert figures["sw_x_en"]["cross/sw-en/ndcg_at_10"] == pytest.approx((1 / np.log2(4) + 1) / 2)
    for lang, value in ap.items():
        assert figures[f"miracl_{lang}"][f"mono/{lang}/map"] == pytest.approx(value)

    groups = {"low": ("sw", "yo"), "high": ("en",)}
    m, folder = write_groups(folders, groups, tmp_path / "out", samples=200, seed=1)
    assert m["group_low/mono/map"] == pytest.approx((ap["sw"] + ap["yo"]) / 2)
    assert m["group_high/mono/map"] == pytest.approx(ap["en"])
    assert m["group_low/cross/map"] == pytest.approx((1 / 3 + 1) / 2)  # the sw -> en cell
    assert "group_high/cross/map" not in m  # no English query was run against another corpus
    ndcg_sw1 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))  # relevant at ranks 1 and 3
    assert m["group_low/mono/ndcg_at_10"] == pytest.approx(
        ((1 + ndcg_sw1) / 2 + 1 / np.log2(3)) / 2
    )
    assert m["group_low/mono/mrr_at_10"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["group_low/mono/queries"] == 3 and m["group_low/mono/cells"] == 2
    for key, value in m.items():
        if key.endswith(("/queries", "/cells", "/ci_low", "/ci_high")):
            continue
        assert m[f"{key}/ci_low"] <= value + 1e-12 <= m[f"{key}/ci_high"] + 2e-12, key
    # the low group's queries differ in AP, so resampling them gives an interval, not a point
    assert m["group_low/mono/map/ci_low"] < m["group_low/mono/map/ci_high"]
    table = (folder / "resource_groups.md").read_text()
    assert "| low | sw yo | mono | 3 | " in table and "| high | en | mono | 2 | " in table
    saved = json.loads((folder / "resource_groups.json").read_text())
    assert saved["metrics"]["group_low/mono/map"] == m["group_low/mono/map"]


def test_resource_groups_config():
    cfg = config_from_dict(
        {"eval": {"resource_groups": [{"name": "low", "languages": ["sw", "yo"]}]}}
    )
    assert cfg.eval.resource_groups[0].languages == ("sw", "yo")
    with pytest.raises(ConfigError, match="names must be unique"):
        config_from_dict(
            {
                "eval": {
                    "resource_groups": [
                        {"name": "a", "languages": ["sw"]},
                        {"name": "a", "languages": ["yo"]},
                    ]
                }
            }
        )
    with pytest.raises(ConfigError, match="languages is empty"):
        config_from_dict({"eval": {"resource_groups": [{"name": "a"}]}})
