"""BEIR folders, JSONL / Parquet files and Hugging Face datasets (all written to tmp_path)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rayhybrid.config import ConfigError, DataConfig, TaskConfig
from rayhybrid.corpus import (
    load_beir_task,
    load_eval_task,
    load_hf,
    load_pairs_file,
    load_training_data,
    split_units,
    task_from_items,
)
from rayhybrid.corpus.beir import load_beir_cross_task
from rayhybrid.datamodel import DataError

ITEM_ROWS = [
    {
        "id": f"item{i}",
        "article": f"art{i // 3}",
        "queries": {"en": f"what is thing {i}?", "de": f"was ist Ding {i}?", "es": None},
        "positives": {
            "en": [f"thing {i} is a thing."],
            "de": [f"Ding {i} ist ein Ding."],
            "es": None,
        },
        "negatives": {"en": [f"thing {i + 100} is another."], "de": None, "es": None},
    }
    for i in range(12)
] + [
    {
        "id": "item-es",
        "article": "art9",
        "queries": {"en": None, "de": None, "es": "¿qué?"},
        "positives": {"en": None, "de": None, "es": ["esto."]},
        "negatives": None,
    }
]
PAIR_ROWS = [
    {
        "query": f"question {i}",
        "passage": f"Antwort {i}.",
        "query_lang": "en",
        "passage_lang": "de",
        "group": f"g{i % 4}",
        "article": None,
    }
    for i in range(8)
]


def _columns(rows: list[dict]) -> list[dict]:
    """Rows with every column present (Arrow takes its schema from the first row)."""
    keys = (
        "id",
        "article",
        "queries",
        "positives",
        "negatives",
        "query",
        "passage",
        "query_lang",
        "passage_lang",
        "group",
    )
    return [{k: r.get(k) for k in keys} for r in rows]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(
                json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False)
                + "\n"
            )
    return path


def _check_rows(items, pairs, report) -> None:
    assert [it.id for it in items] == [r["id"] for r in ITEM_ROWS]
    assert items[0].languages == ("de", "en") and items[-1].languages == ("es",)
    assert items[0].negatives == {"en": ("thing 100 is another.",)}
    assert items[4].article == "art1"
    assert len(pairs) == 8 and pairs[5].group == "g1" and pairs[5].passage_lang == "de"
    assert not report.counts


def test_jsonl_items_and_pairs(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "train.jsonl", ITEM_ROWS + PAIR_ROWS)
    _check_rows(*load_pairs_file(path, "jsonl"))
    # A pair without group gets its own id; unknown fields are reported, not dropped silently.
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"query": "q", "passage": "p", "query_lang": "en", "passage_lang": "en", "score": 3}],
    )
    _, pairs, report = load_pairs_file(path, "jsonl")
    assert pairs[0].group == "pair-0" and report.counts["ignored_field"] == 1


def test_parquet_items_and_pairs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_columns(ITEM_ROWS + PAIR_ROWS)), path)
    _check_rows(*load_pairs_file(path, "parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_pairs_file(tmp_path / "bad.parquet", "parquet")


def test_hf_save_to_disk_and_by_name(tmp_path: Path) -> None:
    import datasets

    rows = ITEM_ROWS + PAIR_ROWS
    full = _columns(rows)
    datasets.Dataset.from_list(full).save_to_disk(str(tmp_path / "flat"))
    _check_rows(*load_hf(str(tmp_path / "flat"), "train", from_disk=True))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(full)}).save_to_disk(
        str(tmp_path / "dict")
    )
    _check_rows(*load_hf(str(tmp_path / "dict"), "train", from_disk=True))
    with pytest.raises(DataError, match="dict: no split 'dev'; found train"):
        load_hf(str(tmp_path / "dict"), "dev", from_disk=True)
    # By name: datasets.load_dataset on a local folder of JSONL files (the same code path as a
    # hub name; nothing is downloaded).
    _jsonl(tmp_path / "named" / "train.jsonl", rows)
    items, pairs, _ = load_hf(
        str(tmp_path / "named"), "train", from_disk=False, cache_dir=str(tmp_path / "cache")
    )
    assert len(items) == 13 and len(pairs) == 8
    with pytest.raises(DataError, match=r"named\[test\]: cannot load the Hugging Face dataset"):
        load_hf(str(tmp_path / "named"), "test", from_disk=False, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"query": "q", "passage": "p", "query_lang": "en"', r"bad\.jsonl:3: not valid JSON"),
        (
            '{"query": "q", "passage": "p", "query_lang": "en", "passage_lang": "qq"}',
            r"bad\.jsonl:3: passage_lang: unknown language code 'qq'",
        ),
        (
            '{"query": "", "passage": "p", "query_lang": "en", "passage_lang": "en"}',
            r"bad\.jsonl:3: field 'query' is ''; expected a non-empty string",
        ),
        (
            '{"query": "q", "passage": "p", "passage_lang": "en"}',
            r"bad\.jsonl:3: missing field 'query_lang'",
        ),
        ('{"text": "q"}', r"bad\.jsonl:3: keys \['text'\]; expected a pair row"),
        ("[1, 2]", r"bad\.jsonl:3: expected a JSON object, got list"),
        (
            '{"id": "item0", "queries": {"en": "q"}, "positives": {"en": ["p"]}}',
            r"bad\.jsonl:3: item id 'item0' already used at .*bad\.jsonl:1",
        ),
        (
            '{"id": "x", "queries": {"en": "q"}, "positives": {"de": ["p"]}}',
            r"bad\.jsonl:3: item 'x' has no language with both a query and a positive",
        ),
        ('{"id": "x", "positives": {"en": ["p"]}}', r"bad\.jsonl:3: missing field 'queries'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({k: v for k, v in ITEM_ROWS[0].items() if v is not None})
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_pairs_file(path, "jsonl")


def test_pairs_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_pairs_file(tmp_path / "missing.jsonl", "jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_pairs_file(tmp_path / "empty.jsonl", "jsonl")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_pairs_file(tmp_path / "empty.jsonl", "csv")


def _beir(folder: Path, lines: dict[str, str] | None = None) -> Path:
    _jsonl(
        folder / "corpus.jsonl",
        [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"} for i in range(6)],
    )
    _jsonl(folder / "queries.jsonl", [{"_id": str(i), "text": f"query {i}"} for i in range(5)])
    qrels = [
        "query-id\tcorpus-id\tscore",
        "0\td0\t1",
        "0\td3\t2",
        "1\td1\t1",
        "2\td2\t0",
        "3\td9\t1",
        "3\td3\t1",
    ]
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    (folder / "qrels" / "train.tsv").write_text("\n".join(qrels[:4]) + "\n")
    for name, text in (lines or {}).items():
        (folder / name).write_text(text)
    return folder


def test_beir_task(tmp_path: Path) -> None:
    folder = _beir(tmp_path / "miracl-de")
    task = load_beir_task(folder, "de")
    assert task.name == "miracl-de" and len(task.candidates) == 6
    assert [q.id for q in task.queries] == ["q:de:0", "q:de:1", "q:de:2", "q:de:3"]
    assert task.qrels["q:de:0"] == {"c:de:d0": 1, "c:de:d3": 2}
    assert task.qrels["q:de:2"] == {"c:de:d2": 0}
    assert task.candidates[1].title == "T1" and task.candidates[1].id == "c:de:d1"
    assert not {q.id for q in task.queries} & {c.id for c in task.candidates}
    assert task.report.counts == {"qrels_unknown_candidate": 1, "query_without_qrels": 1}
    train = load_training_data(
        DataConfig(
            format="beir", path=str(folder), languages=("de",), split_by="group", train_fraction=1.0
        ),
        "train",
    )
    assert [(p.group, p.passage) for p in train.pairs] == [
        ("0", "T0 doc 0"),
        ("0", "T3 doc 3"),
        ("1", "T1 doc 1"),
    ]


def test_beir_training_load_shows_its_report(tmp_path: Path, caplog) -> None:
    """A qrels line naming a document outside the corpus is dropped, counted and shown for
    a training load too (issue 12)."""
    folder = _beir(tmp_path / "b")
    (folder / "qrels" / "train.tsv").write_text("0\td0\t1\n1\td7\t1\n1\td1\t1\n")
    cfg = DataConfig(format="beir", path=str(folder), languages=("de",), train_fraction=1.0)
    with caplog.at_level("INFO", logger="rayhybrid.corpus.data"):
        train = load_training_data(cfg, "train")
    assert train.report.counts["qrels_unknown_candidate"] == 1
    assert len(train.pairs) == 2
    shown = [r for r in caplog.records if "training data" in r.getMessage()]
    assert len(shown) == 1 and shown[0].levelname == "WARNING"
    assert "qrels_unknown_candidate=1" in shown[0].getMessage()
    assert "train.tsv:2: d7" in shown[0].getMessage()


def test_beir_cross_folder_task(tmp_path: Path) -> None:
    """Queries of folder A (de) against the corpus of folder B (sw), qrels naming B's docs."""
    a, b = _beir(tmp_path / "miracl-de"), _beir(tmp_path / "miracl-sw")
    _jsonl(b / "corpus.jsonl", [{"_id": f"s{i}", "text": f"hati {i}"} for i in range(3)])
    qrels = tmp_path / "de_to_sw.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n0\ts0\t1\n1\ts2\t1\n1\td1\t1\n")
    task = load_beir_cross_task(a, "de", b, "sw", name="de_sw", qrels_path=qrels)
    assert [q.id for q in task.queries] == ["q:de:0", "q:de:1"]
    assert {c.lang for c in task.candidates} == {"sw"} and len(task.candidates) == 3
    assert task.qrels == {"q:de:0": {"c:sw:s0": 1}, "q:de:1": {"c:sw:s2": 1}}
    assert task.report.counts == {"qrels_unknown_candidate": 1, "query_without_qrels": 3}
    via_cfg = load_eval_task(
        TaskConfig(
            name="de_sw",
            format="beir",
            path=str(a),
            language="de",
            corpus_path=str(b),
            corpus_language="sw",
            qrels_path=str(qrels),
            part="all",
        ),
        DataConfig(),
    )
    assert via_cfg.qrels == task.qrels
    # A's own qrels name only A's documents: this pair is not allowed by them
    with pytest.raises(DataError, match=r"test\.tsv: no judgement names a document of"):
        load_beir_cross_task(a, "de", b, "sw")


@pytest.mark.parametrize(
    "files, pattern",
    [
        (
            {"corpus.jsonl": '{"_id": "d0", "text": "x"}\n{"_id": "d0", "text": "y"}\n'},
            r"corpus\.jsonl:2: _id 'd0' appears twice",
        ),
        (
            {"queries.jsonl": '{"_id": "0", "text": "q"}\n{"_id": "1" "text": "q"}\n'},
            r"queries\.jsonl:2: not valid JSON",
        ),
        (
            {"qrels/test.tsv": "query-id\tcorpus-id\tscore\n0\td0\n"},
            r"test\.tsv:2: '0\\td0'; expected query-id<TAB>corpus-id<TAB>integer score",
        ),
        (
            {"qrels/test.tsv": "0\td0\t1\n7\td0\t1\n"},
            r"test\.tsv:2: query-id '7' is not in queries",
        ),
        (
            {"corpus.jsonl": '{"_id": "d0", "title": "t"}\n'},
            r"corpus\.jsonl:1: field 'text' is None",
        ),
    ],
)
def test_beir_errors(tmp_path: Path, files: dict[str, str], pattern: str) -> None:
    folder = _beir(tmp_path / "b", files)
    with pytest.raises(DataError, match=pattern):
        load_beir_task(folder, "de")


def test_beir_folder_errors(tmp_path: Path) -> None:
    folder = _beir(tmp_path / "b")
    with pytest.raises(DataError, match="language tag: unknown language code 'german'"):
        load_beir_task(folder, "german")
    with pytest.raises(DataError, match=r"qrels/dev\.tsv: qrels file not found"):
        load_beir_task(folder, "de", split="dev")
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="no corpus.jsonl"):
        load_beir_task(folder, "de")


def test_training_split_by_group_and_languages(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "train.jsonl", ITEM_ROWS + PAIR_ROWS)
    cfg = DataConfig(
        format="jsonl",
        path=str(path),
        split_by="group",
        train_fraction=0.5,
        dev_fraction=0.25,
        split_seed=1,
    )
    parts = {p: load_training_data(cfg, p) for p in ("train", "dev", "test")}
    everything = load_training_data(cfg, "all")
    groups = {p: {i.id for i in d.items} | {x.group for x in d.pairs} for p, d in parts.items()}
    assert not groups["train"] & groups["dev"] and not groups["train"] & groups["test"]
    assert set().union(*groups.values()) == {i.id for i in everything.items} | {
        x.group for x in everything.pairs
    }
    assert groups == {
        p: {i.id for i in d.items} | {x.group for x in d.pairs}
        for p, d in ((p, load_training_data(cfg, p)) for p in groups)
    }
    de_only = load_training_data(
        DataConfig(format="jsonl", path=str(path), languages=("de",), train_fraction=1.0), "train"
    )
    assert de_only.languages == ("de",) and not de_only.pairs and len(de_only.items) == 12
    by_article = load_training_data(
        DataConfig(format="jsonl", path=str(path), train_fraction=0.3), "train"
    )
    # Units: art0..art3, art9, then the groups of article-less pairs; 0.3 of 9 is 3.
    assert {i.article for i in by_article.items} == {"art0", "art1", "art2"}
    with pytest.raises(DataError, match="unknown language code 'xx'"):
        load_training_data(DataConfig(format="jsonl", path=str(path), languages=("xx",)))
    with pytest.raises(ConfigError, match="train_fraction"):
        split_units(["a"], 1.5, 0.0, None)
    with pytest.raises(DataError, match="part: expected one of"):
        load_training_data(cfg, "valid")


def test_eval_tasks_from_beir_and_hf(tmp_path: Path) -> None:
    import datasets

    folder = _beir(tmp_path / "b")
    data_cfg = DataConfig(train_fraction=0.5, split_seed=None)
    test = load_eval_task(
        TaskConfig(name="b", format="beir", path=str(folder), language="de", part="test"), data_cfg
    )
    assert [q.id for q in test.queries] == ["q:de:2", "q:de:3"] and len(test.candidates) == 6
    assert set(test.qrels) == {"q:de:2", "q:de:3"}
    datasets.Dataset.from_list(
        [
            {k: r.get(k) for k in ("id", "article", "queries", "positives", "negatives")}
            for r in ITEM_ROWS
        ]
    ).save_to_disk(str(tmp_path / "hf"))
    task = load_eval_task(
        TaskConfig(name="h", format="hf_disk", path=str(tmp_path / "hf"), part="all"), data_cfg
    )
    assert len(task.queries) == 25 and len(task.candidates) == 25
    assert task.qrels["q:en:item0"] == task.qrels["q:de:item0"]
    assert len(task.qrels["q:en:item0"]) == 2


def test_task_from_pairs() -> None:
    from rayhybrid.datamodel import Pair

    pairs = [
        Pair("q a", "p a", "en", "de", "g1"),
        Pair("q a", "p b", "en", "en", "g1"),
        Pair("q c", "p c", "de", "de", "g2"),
    ]
    task = task_from_items("pairs", [], pairs, languages=("de",))
    assert [q.id for q in task.queries] == ["q:de:g2"]
    assert {c.text for c in task.candidates} == {"p a", "p c"}
    assert [task.qrels["q:de:g2"]] == [{"c:de:1": 1}]


def test_beir_passages_are_title_and_text(tmp_path: Path) -> None:
    """BEIR encodes ``title + " " + text``; the knob turns it off; training pairs and
    evaluation candidates share the recipe. Expected texts come from the raw file."""
    from rayhybrid.evaluation.run import candidate_texts

    folder = _beir(tmp_path / "miracl-de")
    raw = {
        row["_id"]: row
        for row in map(json.loads, (folder / "corpus.jsonl").read_text().splitlines())
    }
    task = load_beir_task(folder, "de")
    assert candidate_texts(task) == [f"{r['title']} {r['text']}" for r in raw.values()]
    assert candidate_texts(task, with_title=False) == [r["text"] for r in raw.values()]
    cfg = DataConfig(
        format="beir", path=str(folder), languages=("de",), split_by="group", train_fraction=1.0
    )
    pairs = load_training_data(cfg, "train").pairs
    assert [p.passage for p in pairs] == ["T0 doc 0", "T3 doc 3", "T1 doc 1"]
    pairs = load_training_data(replace(cfg, with_title=False), "train").pairs
    assert [p.passage for p in pairs] == ["doc 0", "doc 3", "doc 1"]
