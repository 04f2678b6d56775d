"""XTREME-R tasks beyond LAReQA: Tatoeba and Mewsli-X loaders on fixtures in their public
formats, and their headline figures (Tatoeba accuracy, Mewsli-X mAP@20) through the real
search and metrics against values computed by hand here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rayhybrid.config import DataConfig, TaskConfig
from rayhybrid.corpus import load_eval_task
from rayhybrid.corpus.mewsli_x import load_mewsli_x_task, mention_query
from rayhybrid.corpus.tatoeba import load_tatoeba_task
from rayhybrid.datamodel import DataError, EvalTask
from rayhybrid.evaluation.metrics import LAREQA_METRICS, summarize
from rayhybrid.evaluation.retrieval import CandidateIndex, LocalShards, run_settings
from rayhybrid.evaluation.search import ShardSearcher

FIXTURES = Path(__file__).parent / "fixtures"


def _evaluate(task: EvalTask, q_emb: np.ndarray, c_emb: np.ndarray, settings) -> dict:
    """The pipeline's own search and metrics (in-process shards) on given embeddings."""
    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    pool = LocalShards(
        {
            lang: ShardSearcher(lang, c_emb[row_of_key[keys]].astype(np.float32), keys)
            for lang, keys in cands.shard_keys().items()
        }
    )
    retrieval = run_settings(pool, task, q_emb.astype(np.float32), settings, 1)
    return summarize(retrieval.blocks, cands.langs, LAREQA_METRICS, 1)[0]


def _angle(deg: float) -> np.ndarray:
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


# --- Tatoeba -------------------------------------------------------------------------------


def test_tatoeba_counts_and_relevance_from_xtreme_files():
    task = load_tatoeba_task(FIXTURES / "tatoeba", "deu")
    assert task.name == "tatoeba_de"
    assert [q.id for q in task.queries if q.lang == "de"] == [f"q:de:{i}" for i in range(4)]
    assert len(task.queries) == len(task.candidates) == 8
    # line i of one side is relevant to line i of the other side, nothing else
    for i in range(4):
        assert task.qrels[f"q:de:{i}"] == {f"c:en:{i}": 1}
        assert task.qrels[f"q:en:{i}"] == {f"c:de:{i}": 1}
    text = {c.id: c.text for c in task.candidates}
    assert text["c:de:2"] == "Er liest ein Buch." and text["c:en:2"] == "He is reading a book."
    assert task.report.summary().endswith("nothing odd")
    assert load_tatoeba_task(FIXTURES / "tatoeba", "de").qrels == task.qrels  # ISO 639-1 too


def test_xtreme_tasks_from_the_config():
    data = DataConfig()
    tat = load_eval_task(
        TaskConfig(
            name="t", format="tatoeba", path=str(FIXTURES / "tatoeba"), language="de", part="all"
        ),
        data,
    )
    assert len(tat.queries) == 8 and tat.name == "t"
    # a held-out part keeps both directions of a line together
    test = load_eval_task(
        TaskConfig(name="t", format="tatoeba", path=str(FIXTURES / "tatoeba"), language="de"),
        DataConfig(train_fraction=0.5, split_seed=None),
    )
    lines = {q.id.rsplit(":", 1)[1] for q in test.queries}
    assert len(test.queries) == 2 * len(lines) and 0 < len(lines) < 4
    mx = load_eval_task(
        TaskConfig(name="m", format="mewsli_x", path=str(FIXTURES / "mewsli_x"), part="all"), data
    )
    assert len(mx.queries) == 3
    with pytest.raises(DataError, match="needs `language`"):
        load_eval_task(TaskConfig(format="tatoeba", path=str(FIXTURES / "tatoeba")), data)


def test_tatoeba_quirks_are_reported():
    task = load_tatoeba_task(FIXTURES / "tatoeba", "fr")
    # line 3 of the French side is blank: that pair is dropped, the others keep their lines
    assert task.report.counts["blank_line"] == 1
    assert sorted(q.id for q in task.queries if q.lang == "fr") == ["q:fr:0", "q:fr:1", "q:fr:3"]
    assert task.qrels["q:fr:3"] == {"c:en:3": 1}
    assert task.report.counts["duplicate_sentence_fr"] == 1  # "Bonjour." on lines 1 and 4
    assert "duplicate_sentence_en" not in task.report.counts


def _tatoeba_copy(tmp_path: Path, src: bytes, eng: bytes) -> Path:
    (tmp_path / "tatoeba.deu-eng.deu").write_bytes(src)
    (tmp_path / "tatoeba.deu-eng.eng").write_bytes(eng)
    return tmp_path


@pytest.mark.parametrize(
    "src, eng, pattern",
    [
        (b"a\nb\nc\n", b"x\ny\n", r"tatoeba.deu-eng.deu: 3 lines but .*tatoeba.deu-eng.eng has 2"),
        (b"a\n\xff\xfe\n", b"x\ny\n", r"tatoeba.deu-eng.deu:2: not UTF-8"),
    ],
)
def test_tatoeba_bad_files_name_file_and_line(tmp_path, src, eng, pattern):
    with pytest.raises(DataError, match=pattern):
        load_tatoeba_task(_tatoeba_copy(tmp_path, src, eng), "de")


def test_tatoeba_missing_file_and_unknown_language(tmp_path):
    (tmp_path / "tatoeba.deu-eng.deu").write_text("a\n")
    with pytest.raises(DataError, match=r"tatoeba.deu-eng.eng: file not found"):
        load_tatoeba_task(tmp_path, "de")
    with pytest.raises(DataError, match="no Tatoeba file code for 'cy'"):
        load_tatoeba_task(tmp_path, "cy")


def test_tatoeba_accuracy_both_directions_equals_hand_computed():
    """Sentences as points on a circle (angles in degrees): cosine similarity falls with
    the angle between two points, so nearest neighbours are read off by hand.

    de at 0, 40, 80, 130 in both cases.
    en at 2, 45, 120, 95: de->en: de0 -> en0 (2 deg) right, de1 -> en1 (5) right, de2 -> en3
    (15, gold en2 is 40 away) wrong, de3 -> en2 (10, gold en3 35 away) wrong: 2/4; en->de:
    en0, en1 right, en2 -> de3 (10) wrong, en3 -> de2 (15) wrong: 2/4.
    en at 2, 15, 85, 135: de->en: every de line's nearest is its own en line: 4/4; en->de:
    en1 (15) -> de0 (15 deg, gold de1 is 25 away) wrong, the others right: 3/4.
    """
    task = load_tatoeba_task(FIXTURES / "tatoeba", "de")
    idx = {q.id: n for n, q in enumerate(task.queries)}
    for en_angles, expect_de_en, expect_en_de in (
        ((2, 45, 120, 95), 0.5, 0.5),
        ((2, 15, 85, 135), 1.0, 0.75),
    ):
        angles = {"de": (0, 40, 80, 130), "en": en_angles}
        q_emb = np.zeros((len(task.queries), 2))
        for q in task.queries:
            q_emb[idx[q.id]] = _angle(angles[q.lang][int(q.id.rsplit(":", 1)[1])])
        c_emb = np.array(
            [_angle(angles[c.lang][int(c.id.rsplit(":", 1)[1])]) for c in task.candidates]
        )
        # an independent brute force: argmax of the cosine matrix per direction
        for a, b, expect in (("de", "en", expect_de_en), ("en", "de", expect_en_de)):
            sims = (
                np.array([_angle(x) for x in angles[a]])
                @ np.array([_angle(y) for y in angles[b]]).T
            )
            assert np.mean(sims.argmax(1) == np.arange(4)) == expect
        m = _evaluate(task, q_emb, c_emb, ["cross"])
        assert m["cross/de-en/r_at_1"] == pytest.approx(expect_de_en)  # XTREME's accuracy
        assert m["cross/en-de/r_at_1"] == pytest.approx(expect_en_de)
        assert m["cross/r_at_1"] == pytest.approx((expect_de_en + expect_en_de) / 2)


# --- Mewsli-X ------------------------------------------------------------------------------


def test_mewsli_x_counts_relevance_and_queries():
    task = load_mewsli_x_task(FIXTURES / "mewsli_x")
    assert task.name == "mewsli_x"
    assert sorted(c.id for c in task.candidates) == sorted(
        ["c:en:Q1757", "c:de:Q64", "c:en:Q33", "c:es:Q2807", "c:fr:Q90"]
    )
    # four mentions, one of them (m-de-2) links to an entity outside the candidate set
    assert sorted(task.qrels) == ["q:de:m-de-1", "q:en:m-en-1", "q:en:m-en-2"]
    assert task.qrels["q:en:m-en-1"] == {"c:en:Q1757": 1}
    assert task.qrels["q:de:m-de-1"] == {"c:de:Q64": 1}
    assert task.report.counts["gold_not_in_candidates"] == 1
    text = {q.id: q.text for q in task.queries}
    # the mention's own sentence (the second "Helsinki"), mention in brackets
    assert text["q:en:m-en-1"] == "Buses stopped in [Helsinki] on Monday."
    assert text["q:de:m-de-1"] == "In [Berlin] wird gewählt."
    berlin = next(c for c in task.candidates if c.id == "c:de:Q64")
    assert (berlin.title, berlin.text) == ("Berlin", "Berlin ist die Hauptstadt Deutschlands.")
    only_de = load_mewsli_x_task(FIXTURES / "mewsli_x", languages=["de"])
    assert [q.id for q in only_de.queries] == ["q:de:m-de-1"]
    assert len(only_de.candidates) == 5  # the candidate set is never filtered


def test_mention_query_falls_back_to_the_whole_text():
    assert mention_query("ab cd", [(0, 2)], 3, 5) == "ab [cd]"


def _mewsli_copy(tmp_path: Path, edit) -> Path:
    shutil.copytree(FIXTURES / "mewsli_x", tmp_path / "m")
    path = tmp_path / "m" / "wikinews_mentions-test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "m"


def test_mewsli_x_bad_files_name_file_and_line(tmp_path):
    def no_text(rows):
        rows[1]["context"]["text"] = ""

    with pytest.raises(DataError, match=r"wikinews_mentions-test.jsonl:2: context.text is empty"):
        load_mewsli_x_task(_mewsli_copy(tmp_path / "a", no_text))

    def shifted(rows):
        rows[0]["mentions"][1]["mention_span"]["start"] += 1

    with pytest.raises(DataError, match=r"-test.jsonl:1: mention m-en-2: context.text\[65:71\]"):
        load_mewsli_x_task(_mewsli_copy(tmp_path / "b", shifted))

    def no_entity(rows):
        del rows[1]["mentions"][0]["entity_id"]

    with pytest.raises(DataError, match=r"-test.jsonl:2: missing field 'entity_id'"):
        load_mewsli_x_task(_mewsli_copy(tmp_path / "c", no_entity))

    folder = _mewsli_copy(tmp_path / "d", lambda rows: None)
    cand = folder / "candidate_set_entities.jsonl"
    cand.write_text(
        cand.read_text() + '{"entity_id": "Q64", "description": "x", '
        '"description_language": "de"}\n'
    )
    with pytest.raises(DataError, match=r"candidate_set_entities.jsonl:6: entity_id 'Q64' appears"):
        load_mewsli_x_task(folder)
    with pytest.raises(DataError, match=r"no wikinews_mentions-dev.jsonl"):
        load_mewsli_x_task(folder, split="dev")


def test_mewsli_x_map_at_20_equals_hand_computed():
    """Candidates as unit vectors e0..e4 (file order); each query a mix, so its ranking is
    the order of its weights. Gold ranks: m-en-1 -> 1, m-en-2 -> 2, m-de-1 -> 3.
    mAP@20 with one relevant entity = 1/rank: en (1 + 1/2) / 2 = 0.75, de 1/3; the
    macro over mention languages (0.75 + 1/3) / 2."""
    task = load_mewsli_x_task(FIXTURES / "mewsli_x")
    order = ["Q1757", "Q64", "Q33", "Q2807", "Q90"]
    c_emb = np.eye(5)[[order.index(c.id.rsplit(":", 1)[1]) for c in task.candidates]]
    weights = {
        "q:en:m-en-1": [1.0, 0.5, 0.0, 0.0, 0.0],  # gold Q1757 (e0) first
        "q:en:m-en-2": [0.9, 0.2, 0.5, 0.0, 0.0],  # gold Q33 (e2) second after e0
        "q:de:m-de-1": [0.1, 0.3, 0.2, 0.8, 0.4],  # gold Q64 (e1) third after e3, e4
    }
    q_emb = np.array([weights[q.id] for q in task.queries])
    m = _evaluate(task, q_emb, c_emb, ["multi"])
    assert m["multi/en/map_at_20"] == pytest.approx(0.75)
    assert m["multi/de/map_at_20"] == pytest.approx(1 / 3)
    assert m["multi/map_at_20"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert m["multi/en/mrr_at_10"] == pytest.approx(0.75)  # one relevant: equal to mAP@20
