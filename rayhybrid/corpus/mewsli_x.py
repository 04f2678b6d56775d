"""Mewsli-X (XTREME-R entity retrieval) into the evaluation-task data model.

The released dataset (google-research ``dense_representations_for_entity_retrieval/mel``,
``get-mewsli-x.sh``) is a folder of JSONL files:

- ``candidate_set_entities.jsonl``: one entity per line, ``{entity_id (WikiData QID),
  title, description, description_language, description_url, sentence_spans}``. About 1M
  entities; a description's language is drawn at random among 50 languages (English for
  about a quarter), so the candidate pool is multilingual, not English only.
- ``wikinews_mentions-{dev,test}.jsonl``: one WikiNews article per line, ``{context:
  {document_id, language, text, sentence_spans: [{start, end}]}, mentions: [{example_id,
  entity_id, mention_span: {start, end, text}}]}``, in 11 languages (ar de en es fa ja pl ro
  ta tr uk). The ``*_no_text-*`` files ship with ``context.text`` empty; the script restores
  it from WikiNews dumps.

Every mention is a query in its article's language (``q:{lang}:{example_id}``): the text is
the sentence that holds the mention, with the mention in square brackets (one fixed recipe,
:func:`mention_query`; XTREME-R's own baseline marks the mention inside its context too).
Every entity is a candidate in its description language (``c:{lang}:{entity_id}``; text =
description, title = Wikipedia page title, encoded with ``data.with_title``); the one
relevant candidate of a mention is its gold entity. Evaluate the ``multi`` setting (every
query against the whole candidate set): ``multi/map_at_20`` is XTREME-R's Mewsli-X mAP@20.

Quirks reported: ``gold_not_in_candidates`` (the mention is dropped),
``mention_outside_sentences`` (the whole article is the context), ``cross_lingual_mention``
(description language differs from the article's: a count, nothing dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rayhybrid.corpus._io import find_jsonl, read_jsonl, require
from rayhybrid.datamodel import Candidate, DataError, EvalTask, LoadReport, Query, check_language

__all__ = ["load_mewsli_x_hf", "load_mewsli_x_task", "mention_query"]

MEWSLI_X_LANGUAGES = ("ar", "de", "en", "es", "fa", "ja", "pl", "ro", "ta", "tr", "uk")


def mention_query(text: str, spans: Sequence[tuple[int, int]], start: int, end: int) -> str:
    """The sentence of ``text`` holding ``[start, end)``, the mention in square brackets;
    the whole text when no sentence span holds it."""
    lo, hi = next(((a, b) for a, b in spans if a <= start and end <= b), (0, len(text)))
    return f"{text[lo:start]}[{text[start:end]}]{text[end:hi]}".strip()


def _find(folder: Path, stem: str) -> Path:
    return find_jsonl(
        folder,
        stem,
        "a Mewsli-X dataset folder (candidate_set_entities.jsonl, wikinews_mentions-<split>.jsonl)",
    )


def _int(obj: dict, key: str, where: str) -> int:
    return require(obj, key, int, where, "an integer character offset")


def _candidates(rows: Iterable[tuple[str, dict]], report: LoadReport) -> list[Candidate]:
    out: dict[str, Candidate] = {}
    for where, obj in rows:
        qid = require(obj, "entity_id", str, where, "a WikiData QID string")
        text = require(obj, "description", str, where, "the entity description text")
        lang = check_language(
            require(obj, "description_language", str, where, "an ISO 639-1 code"),
            f"{where}: description_language",
        )
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' is {type(title).__name__}, expected a string")
        if qid in out:
            raise DataError(f"{where}: entity_id {qid!r} appears twice; expected one per entity")
        if not text.strip():
            report.note("empty_description", where)
        out[qid] = Candidate(f"c:{lang}:{qid}", lang, text, "", title)
    if not out:
        raise DataError(f"{report.source}: no candidate entities")
    return list(out.values())


def _mentions(
    rows: Iterable[tuple[str, dict]], langs: set[str], report: LoadReport
) -> Iterator[tuple[str, str, str, str]]:
    """``(example_id, language, query text, entity_id)`` per mention."""
    for where, obj in rows:
        ctx = require(obj, "context", dict, where, "an object with the article")
        lang = check_language(
            require(ctx, "language", str, where, "an ISO 639-1 code"), f"{where}: context.language"
        )
        text = require(ctx, "text", str, where, "the article text")
        if not text:
            raise DataError(
                f"{where}: context.text is empty; the released wikinews_mentions_no_text "
                "files need the WikiNews text restored (run get-mewsli-x.sh)"
            )
        spans = [
            (_int(s, "start", where), _int(s, "end", where))
            for s in require(ctx, "sentence_spans", list, where, "a list of {start, end}")
        ]
        for m in require(obj, "mentions", list, where, "a list of mentions"):
            if not isinstance(m, dict):
                raise DataError(f"{where}: a mention is {type(m).__name__}; expected an object")
            ex = require(m, "example_id", str, where, "a mention id string")
            span = require(m, "mention_span", dict, where, "{start, end, text}")
            start, end = _int(span, "start", where), _int(span, "end", where)
            surface = require(span, "text", str, where, "the mention string")
            if text[start:end] != surface:
                raise DataError(
                    f"{where}: mention {ex}: context.text[{start}:{end}] is "
                    f"{text[start:end]!r}, not the mention {surface!r}; expected the text "
                    "restored by get-mewsli-x.sh"
                )
            if not any(a <= start and end <= b for a, b in spans):
                report.note("mention_outside_sentences", f"{where}: {ex}")
            if langs and lang not in langs:
                continue
            entity = require(m, "entity_id", str, where, "the gold WikiData QID")
            yield ex, lang, mention_query(text, spans, start, end), entity


def _task(
    name: str,
    candidates: list[Candidate],
    mentions: Iterable[tuple[str, str, str, str]],
    report: LoadReport,
) -> EvalTask:
    by_qid = {c.id.split(":", 2)[2]: c for c in candidates}
    queries, qrels = [], {}
    for ex, lang, text, entity in mentions:
        cand = by_qid.get(entity)
        if cand is None:
            report.note("gold_not_in_candidates", f"{ex}: {entity}")
            continue
        qid = f"q:{lang}:{ex}"
        if qid in qrels:
            raise DataError(f"{report.source}: example_id {ex!r} appears twice")
        if cand.lang != lang:
            report.note("cross_lingual_mention")
        queries.append(Query(qid, lang, text))
        qrels[qid] = {cand.id: 1}
    if not queries:
        raise DataError(f"{report.source}: no mention with its gold entity in the candidate set")
    return EvalTask(name=name, queries=queries, candidates=candidates, qrels=qrels, report=report)


def load_mewsli_x_task(
    folder: str | Path,
    split: str = "test",
    languages: Sequence[str] = (),
    name: str | None = None,
) -> EvalTask:
    """The Mewsli-X task of one split from the dataset folder (module docstring).

    Args:
        folder: the ``mewsli_x/output/dataset`` folder.
        split: ``dev`` or ``test`` (``wikinews_mentions-{split}.jsonl``).
        languages: mention languages to keep (default all 11); candidates are all kept.
        name: task name (default ``mewsli_x``).

    Raises:
        DataError: missing files, malformed lines (``file:line``), duplicate entity ids,
            empty article text (the ``no_text`` release), a mention span that does not match
            the text, or no mention left.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected the Mewsli-X dataset folder")
    for lang in languages:
        check_language(lang, "mewsli_x languages")
    cand_path = _find(folder, "candidate_set_entities")
    ment_path = _find(folder, f"wikinews_mentions-{split}")
    report = LoadReport(str(ment_path))
    candidates = _candidates(
        ((f"{cand_path}:{n}", o) for n, o in read_jsonl(cand_path)), LoadReport(str(cand_path))
    )
    rows = ((f"{ment_path}:{n}", o) for n, o in read_jsonl(ment_path))
    return _task(name or "mewsli_x", candidates, _mentions(rows, set(languages), report), report)


def _hf_rows(dataset: str, config: str | None, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets
    from datasets.exceptions import DatasetsError

    where = f"{dataset}[{split}]"
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except (DatasetsError, OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{where}: cannot load the Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    return [(f"{where} row {i}", row) for i, row in enumerate(ds)]


def load_mewsli_x_hf(
    mentions: str,
    candidates: str,
    split: str = "test",
    languages: Sequence[str] = (),
    name: str | None = None,
) -> EvalTask:
    """Mewsli-X from Hugging Face datasets whose rows have the JSONL schema above: one
    dataset (name or path) of articles with mentions, one of candidate entities (split
    ``train``). Google publishes Mewsli-X as a zip, not on the hub; this reads a copy a user
    put there (``datasets.load_dataset("json", ...)`` files work the same way).

    Raises:
        DataError: a dataset cannot be loaded, or a row is malformed (naming the row).
    """
    report = LoadReport(f"{mentions}[{split}]")
    cands = _candidates(_hf_rows(candidates, None, "train"), LoadReport(candidates))
    ments = _mentions(_hf_rows(mentions, None, split), set(languages), report)
    return _task(name or "mewsli_x", cands, ments, report)
