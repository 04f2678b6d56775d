"""LAReQA loaders on the real XQuAD-R files and on corrupted copies of a few of its paragraphs."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from rayhybrid.config import DataConfig, TaskConfig
from rayhybrid.corpus import (
    lareqa_article_keys,
    load_eval_task,
    load_lareqa_items,
    load_lareqa_task,
    load_training_data,
    read_lareqa_folder,
    split_units,
)
from rayhybrid.datamodel import DataError

LANGS = ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"]
CANDIDATES = {
    "ar": 1222,
    "de": 1276,
    "el": 1234,
    "en": 1180,
    "es": 1215,
    "hi": 1244,
    "ru": 1219,
    "th": 852,
    "tr": 1167,
    "vi": 1209,
    "zh": 1196,
}


@pytest.fixture(scope="module")
def parsed(xquad_dir: Path):
    return read_lareqa_folder(xquad_dir)


@pytest.fixture(scope="module")
def task(parsed):
    return load_lareqa_task(parsed.path, parsed=parsed)


@pytest.fixture(scope="module")
def items(parsed):
    return load_lareqa_items(parsed.path, parsed=parsed)


# --------------------------------------------------------------------------- real files


def test_xquad_r_counts(task) -> None:
    assert Counter(q.lang for q in task.queries) == {lang: 1190 for lang in LANGS}
    assert Counter(c.lang for c in task.candidates) == CANDIDATES
    assert len({c.id for c in task.candidates}) == len(task.candidates)
    # Query and candidate ids live in separate spaces.
    assert not {q.id for q in task.queries} & {c.id for c in task.candidates}


def test_every_question_has_one_sentence_per_language(task, items) -> None:
    lang_of = {c.id: c.lang for c in task.candidates}
    text_of = {c.id: c.text for c in task.candidates}
    for query in task.queries:
        rel = task.qrels[query.id]
        assert sorted(lang_of[c] for c in rel) == LANGS, query.id
    items_list, _ = items
    assert len(items_list) == 1190 and all(it.languages == tuple(LANGS) for it in items_list)
    assert len({it.article for it in items_list}) == 48
    # The training positive is exactly the relevant candidate's text, in every language.
    for it in items_list[::50]:
        for lang in LANGS:
            rel = [c for c in task.qrels[f"q:{lang}:{it.id}"] if lang_of[c] == lang]
            assert (text_of[rel[0]],) == it.positives[lang]


def test_quirk_report(task, items) -> None:
    counts = task.report.counts
    for kind in (
        "answer_crosses_sentence_break",
        "sentence_offsets_drift",
        "text_after_last_break",
        "duplicate_sentence_in_paragraph",
        "text_between_sentences",
        "sentence_span_realigned",
    ):
        assert counts[kind] > 0, kind
    assert counts["answer_in_gap"] == 0 and counts["partly_parallel_question"] == 0
    assert "tr.json" in task.report.examples["sentence_offsets_drift"][0]
    assert "zh.json" in task.report.examples["duplicate_sentence_in_paragraph"][0]
    assert items[1].counts == counts  # one parse, one report
    assert "answer_crosses_sentence_break=" in task.report.summary()


def test_drifted_spans_realigned(parsed) -> None:
    # tr.json, Victoria_(Australia) paragraph 3: spans drift 2 characters from the context.
    para = parsed.files["tr"].paragraphs[9][3]
    assert para.breaks[-1] == (429, 606)
    assert para.context[429:606] == para.sentences[-1]


def test_duplicate_sentences_both_candidates(task) -> None:
    zh = [c for c in task.candidates if c.id.startswith("c:zh:46:4:")]
    assert [c.text for c in zh].count("德") == 2


def test_languages_and_context(xquad_dir: Path, parsed) -> None:
    items, _ = load_lareqa_items(xquad_dir, ("de", "en"), with_context=True, parsed=parsed)
    assert {it.languages for it in items} == {("de", "en")}
    it = items[0]
    para = parsed.files["en"].paragraphs[0][0]
    assert it.positives["en"][0].endswith(" " + para.context)
    assert (
        it.positives["en"][0].startswith(para.sentences[0][:20])
        or para.context in it.positives["en"][0]
    )
    task = load_lareqa_task(xquad_dir, ("th",), name="th_only", parsed=parsed)
    assert task.languages == ["th"] and len(task.candidates) == 852
    with pytest.raises(DataError, match="unknown language code 'xx'"):
        load_lareqa_items(xquad_dir, ("xx",), parsed=parsed)


def test_splits_deterministic_disjoint(parsed) -> None:
    keys = lareqa_article_keys(parsed)
    assert len(keys) == 48 and keys[0] == "Super_Bowl_50"
    ordered = split_units(keys, 0.75, 0.1, None)
    assert ordered["train"] == set(keys[:36]) and ordered["dev"] == set(keys[36:41])
    seeded = split_units(keys, 0.75, 0.1, 7)
    assert seeded == split_units(list(keys), 0.75, 0.1, 7)
    assert seeded != split_units(keys, 0.75, 0.1, 8) and seeded != ordered
    for parts in (ordered, seeded):
        assert set().union(*parts.values()) == set(keys)
        assert sum(len(p) for p in parts.values()) == 48


def test_training_and_eval_never_share_articles(xquad_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAYHYBRID_DATA", str(xquad_dir.parent))
    data_cfg = DataConfig(split_seed=3, train_fraction=0.7, dev_fraction=0.1)
    train = load_training_data(data_cfg, "train")
    dev = load_training_data(data_cfg, "dev")
    test = load_eval_task(TaskConfig(part="test"), data_cfg)
    train_articles = {it.article for it in train.items}
    assert len(train_articles) == 34 and train.languages == tuple(LANGS)
    assert not train_articles & {it.article for it in dev.items}
    test_articles = {c.article for c in test.candidates}
    assert test_articles and not train_articles & test_articles
    train_qids = {it.id for it in train.items}
    assert not train_qids & {q.id.split(":", 2)[2] for q in test.queries}
    full = load_eval_task(TaskConfig(part="all", languages=("en",)), data_cfg)
    assert len(full.queries) == 1190
    with pytest.raises(DataError, match="no queries or candidates in part 'dev'"):
        load_eval_task(TaskConfig(part="dev"), DataConfig())  # dev_fraction 0


# --------------------------------------------------------------------------- synthetic folders


def _write(folder: Path, lang: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lang}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small(xquad_dir: Path) -> dict[str, dict]:
    """First 3 articles, 2 paragraphs each, of en/de/es (read from the real files, never committed)."""
    out = {}
    for lang in ("en", "de", "es"):
        data = json.loads((xquad_dir / f"{lang}.json").read_text(encoding="utf-8"))
        arts = data["data"][:3]
        for art in arts:
            art["paragraphs"] = art["paragraphs"][:2]
        out[lang] = {"data": arts, "version": data.get("version")}
    return out


def _folder(tmp_path: Path, small: dict, langs=("en", "de", "es")) -> tuple[Path, dict]:
    copies = {lang: copy.deepcopy(small[lang]) for lang in langs}
    for lang, data in copies.items():
        _write(tmp_path / "f", lang, data)
    return tmp_path / "f", copies


def test_partly_parallel_folder(tmp_path: Path, small) -> None:
    folder, data = _folder(tmp_path, small)
    drop_de = {qa["id"] for qa in data["de"]["data"][0]["paragraphs"][0]["qas"][:3]}
    drop_es = {qa["id"] for qa in data["es"]["data"][1]["paragraphs"][1]["qas"][:2]}
    for lang, drop in (("de", drop_de), ("es", drop_es)):
        for art in data[lang]["data"]:
            art["title"] = f"{lang}-{art['title']}"  # MLQA-R titles are translated
            for para in art["paragraphs"]:
                para["qas"] = [qa for qa in para["qas"] if qa["id"] not in drop]
        _write(folder, lang, data[lang])
    items, report = load_lareqa_items(folder)
    by_id = {it.id: it for it in items}
    n_en = sum(len(p["qas"]) for a in data["en"]["data"] for p in a["paragraphs"])
    assert len(items) == n_en
    assert all(by_id[q].languages == ("en", "es") for q in drop_de)
    assert all(by_id[q].languages == ("de", "en") for q in drop_es)
    assert report.counts["partly_parallel_question"] == len(drop_de) + len(drop_es)
    # Translated titles still give one article key per article (the English title).
    assert {it.article for it in items} == {a["title"] for a in data["en"]["data"]}
    task = load_lareqa_task(folder, name="mlqa_like")
    q = next(iter(drop_de))
    assert f"q:de:{q}" not in task.qrels
    assert sorted(c.split(":")[1] for c in task.qrels[f"q:en:{q}"]) == ["en", "es"]
    with pytest.raises(
        DataError, match=r"de\.json: question ids disagree with en\.json: 3 missing"
    ):
        load_lareqa_items(folder, require_parallel=True)
    sub = load_lareqa_task(folder, articles=[data["en"]["data"][1]["title"]])
    # One article key (the English title) in every language; the translated titles are
    # never part of a candidate.
    assert {c.article for c in sub.candidates} == {data["en"]["data"][1]["title"]}
    assert {c.lang for c in sub.candidates} == {"de", "en", "es"}
    assert not any(c.title for c in sub.candidates)


def test_answer_in_gap_goes_to_next_sentence(tmp_path: Path, small) -> None:
    folder, data = _folder(tmp_path, small, ("en",))
    para = data["en"]["data"][0]["paragraphs"][0]
    qa = para["qas"][0]
    start = qa["answers"][0]["answer_start"]
    idx = next(i for i, (b, e) in enumerate(para["sentence_breaks"]) if b <= start < e)
    ctx, spans = para["context"], para["sentence_breaks"]
    # Spans (and their sentence texts, so nothing looks drifted) now leave a gap at ``start``.
    spans[idx][0] = start + 1
    para["sentences"][idx] = ctx[start + 1 : spans[idx][1]]
    if idx:
        spans[idx - 1][1] = min(spans[idx - 1][1], start)
        para["sentences"][idx - 1] = ctx[spans[idx - 1][0] : spans[idx - 1][1]]
    _write(folder, "en", data["en"])
    task = load_lareqa_task(folder)
    assert task.report.counts["answer_in_gap"] >= 1
    assert list(task.qrels[f"q:en:{qa['id']}"]) == [f"c:en:0:0:{idx}"]


def _corrupt(tmp_path: Path, small, mutate) -> Path:
    folder, data = _folder(tmp_path, small, ("en", "de"))
    mutate(data["en"])
    _write(folder, "en", data["en"])
    return folder


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (
            lambda d: d["data"][1]["paragraphs"][0]["qas"][2].pop("question"),
            r"en\.json: data\[1\] \(Warsaw\) paragraphs\[0\] question id '\w+': missing field 'question'",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1].pop("context"),
            r"en\.json: data\[0\] .*paragraphs\[1\]: missing field 'context' \(expected the paragraph",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(
                answer_start=10**6
            ),
            (
                r"en\.json: .*question id '56beb4343aeaaa14008c925b': answer_start 1000000 lies outside "
                r"every sentence span"
            ),
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["sentence_breaks"].pop(),
            r"en\.json: .*paragraphs\[0\]: \d+ sentences but \d+ sentence_breaks",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"].append(
                d["data"][0]["paragraphs"][0]["qas"][0]
            ),
            r"question id '56beb4343aeaaa14008c925b': question id appears twice in en\.json",
        ),
    ],
)
def test_malformed_lareqa_files(tmp_path: Path, small, mutate, pattern) -> None:
    folder = _corrupt(tmp_path, small, mutate)
    with pytest.raises(DataError, match=pattern):
        load_lareqa_items(folder)


def test_answer_after_last_break_is_an_error(tmp_path: Path, small) -> None:
    def mutate(d: dict) -> None:
        para = d["data"][0]["paragraphs"][0]
        last = para["sentence_breaks"][-1]
        para["qas"][0]["answers"][0]["answer_start"] = last[1] - 2
        last[1] -= 5  # leaves trailing text after the last span, holding the answer start
        para["sentences"][-1] = para["context"][last[0] : last[1]]

    folder = _corrupt(tmp_path, small, mutate)
    with pytest.raises(DataError, match="outside every sentence span"):
        load_lareqa_task(folder)


def test_malformed_json_names_line(tmp_path: Path, small) -> None:
    folder, _ = _folder(tmp_path, small, ("en",))
    text = json.dumps(small["en"], indent=1)
    (folder / "en.json").write_text(text[: len(text) // 2] + "\n,,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"en\.json:\d+:\d+: not valid JSON"):
        load_lareqa_items(folder)


def test_folder_errors(tmp_path: Path, small) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no language files"):
        load_lareqa_items(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        load_lareqa_task(tmp_path / "missing")
    folder, _ = _folder(tmp_path, small, ("en",))
    _write(folder, "xx", small["de"])
    with pytest.raises(DataError, match=r"xx\.json: unknown language code 'xx'"):
        load_lareqa_items(folder)
    (folder / "xx.json").unlink()
    with pytest.raises(DataError, match="no file for language 'de'; found en"):
        load_lareqa_task(folder, ("de",))
    with pytest.raises(DataError, match="unknown article keys"):
        load_lareqa_task(folder, articles=["Nope"])


def test_split_by_question_keeps_train_questions_out_of_test(xquad_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAYHYBRID_DATA", str(xquad_dir.parent))
    data_cfg = DataConfig(split_by="group", split_seed=0, languages=("en", "de"))
    train = load_training_data(data_cfg, "train")
    test = load_eval_task(TaskConfig(part="test", languages=("en", "zh")), data_cfg)
    train_qids = {it.id for it in train.items}
    test_qids = {q.id.split(":", 2)[2] for q in test.queries}
    assert len(train_qids) == 893 and len(test_qids) == 297  # 0.75 * 1190 rounded half-up
    assert not train_qids & test_qids
    # The candidate pool stays whole (every sentence of every article).
    assert len(test.candidates) == 1180 + 1196 and set(test.qrels) == {q.id for q in test.queries}


# --------------------------------------------------------------------------- encoded texts


def test_candidate_texts_are_the_files_sentences(xquad_dir: Path) -> None:
    """The encoded LAReQA candidate is the file's sentence (LAReQA, XTREME-R, the paper),
    or sentence + paragraph with ``with_context``; never the article title. Recomputed
    here from the raw JSON, not through the loader's own structures."""
    from rayhybrid.evaluation.run import candidate_texts

    langs = ("de", "en", "th")
    task = load_lareqa_task(xquad_dir, langs)
    expected, expected_ctx = [], []
    for lang in sorted(langs, key=lambda x: (x != "en", x)):  # the loader's language order
        raw = json.loads((xquad_dir / f"{lang}.json").read_text(encoding="utf-8"))
        for article in raw["data"]:
            for para in article["paragraphs"]:
                expected += para["sentences"]
                expected_ctx += [f"{s} {para['context']}" for s in para["sentences"]]
    assert candidate_texts(task) == expected
    assert candidate_texts(task, with_context=True) == expected_ctx
    # with_title has nothing to add: LAReQA defines no passage title.
    assert candidate_texts(task, with_title=True) == expected
    # Training positives are built by the same recipe.
    items, _ = load_lareqa_items(xquad_dir, langs)
    cand_text = {c.id: c.text for c in task.candidates}
    items_ctx, _ = load_lareqa_items(xquad_dir, langs, with_context=True)
    ctx_of = {c.text: c.passage(with_context=True) for c in task.candidates}
    for item, item_ctx in zip(items[:200], items_ctx[:200]):
        rel = task.qrels[f"q:en:{item.id}"]
        en_sentence = next(cand_text[c] for c in rel if c.startswith("c:en:"))
        assert item.positives["en"] == (en_sentence,)
        assert item_ctx.positives["en"] == (ctx_of[en_sentence],)
