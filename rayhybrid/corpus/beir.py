"""BEIR / MIRACL folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

A BEIR folder holds one language; the caller gives its tag. Ids are prefixed
(``q:{lang}:{id}``, ``c:{lang}:{id}``) so query and candidate ids never collide (BEIR's
evaluator drops a hit whose id equals the query id).
"""

from __future__ import annotations

from pathlib import Path

from rayhybrid.corpus._io import find_jsonl, read_jsonl
from rayhybrid.datamodel import (
    Candidate,
    DataError,
    EvalTask,
    LoadReport,
    Pair,
    Query,
    check_language,
    passage_text,
)

__all__ = ["load_beir_cross_task", "load_beir_pairs", "load_beir_task", "read_beir_folder"]


def _find(folder: Path, stem: str) -> Path:
    return find_jsonl(
        folder, stem, "a BEIR folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
    )


def _id(obj: dict, where: str) -> str:
    value = obj.get("_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DataError(f"{where}: field '_id' is {value!r}; expected a string id")
    return str(value)


def _read_docs(path: Path, report: LoadReport, with_title: bool) -> dict[str, tuple[str, str]]:
    """id -> (text, title) in file order."""
    out: dict[str, tuple[str, str]] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        doc_id = _id(obj, where)
        text, title = obj.get("text"), obj.get("title") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            raise DataError(
                f"{where}: field 'text' is {text!r}; expected a string "
                "(and 'title' a string if present)"
            )
        if doc_id in out:
            raise DataError(f"{where}: _id {doc_id!r} appears twice; expected unique ids")
        if not text.strip() and not (with_title and title.strip()):
            report.note("empty_text", where)
        out[doc_id] = (text, title)
    if not out:
        raise DataError(f"{path}: no rows; expected one JSON object per line")
    return out


def _read_qrels(
    path: Path,
    queries: dict,
    corpus: dict,
    report: LoadReport,
) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise DataError(
            f"{path}: qrels file not found; expected query-id<TAB>corpus-id<TAB>score lines"
        )
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if lineno == 1 and cols[:2] == ["query-id", "corpus-id"]:
                continue
            if len(cols) != 3 or not cols[2].strip().lstrip("-").isdigit():
                raise DataError(
                    f"{path}:{lineno}: {line.strip()!r}; expected "
                    "query-id<TAB>corpus-id<TAB>integer score"
                )
            qid, cid, score = cols[0], cols[1], int(cols[2])
            if qid not in queries:
                raise DataError(f"{path}:{lineno}: query-id {qid!r} is not in queries.jsonl")
            if cid not in corpus:
                report.note("qrels_unknown_candidate", f"{path}:{lineno}: {cid}")
                continue
            qrels.setdefault(qid, {})[cid] = score
    return qrels


def read_beir_folder(
    folder: str | Path, split: str = "test"
) -> tuple[
    dict[str, tuple[str, str]], dict[str, tuple[str, str]], dict[str, dict[str, int]], LoadReport
]:
    """Raw corpus, queries and qrels of a BEIR folder (unprefixed ids).

    Raises:
        DataError: missing files, malformed lines (``file:line``), duplicate ids, qrels naming
            unknown queries.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a BEIR folder")
    report = LoadReport(str(folder))
    corpus = _read_docs(_find(folder, "corpus"), report, with_title=True)
    queries = _read_docs(_find(folder, "queries"), report, with_title=False)
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv", queries, corpus, report)
    if not qrels:
        raise DataError(f"{folder / 'qrels' / f'{split}.tsv'}: no judgements")
    return corpus, queries, qrels, report


def load_beir_task(
    folder: str | Path, language: str, split: str = "test", name: str | None = None
) -> EvalTask:
    """An evaluation task from a BEIR / MIRACL folder.

    Only queries with judgements in ``qrels/<split>.tsv`` are kept (as BEIR does); the
    others are counted as ``query_without_qrels``.

    Raises:
        DataError: as :func:`read_beir_folder`, or an unknown language tag.
    """
    lang = check_language(language, f"{folder}: language tag")
    corpus, queries, qrels, report = read_beir_folder(folder, split)
    cands = [
        Candidate(f"c:{lang}:{cid}", lang, text, "", title) for cid, (text, title) in corpus.items()
    ]
    qs = []
    for qid, (text, _) in queries.items():
        if qid in qrels:
            qs.append(Query(f"q:{lang}:{qid}", lang, text))
        else:
            report.note("query_without_qrels", qid)
    rels = {
        f"q:{lang}:{qid}": {f"c:{lang}:{cid}": s for cid, s in qrels[qid].items()}
        for qid in queries
        if qid in qrels
    }
    return EvalTask(
        name=name or Path(folder).name, queries=qs, candidates=cands, qrels=rels, report=report
    )


def load_beir_cross_task(
    query_folder: str | Path,
    query_language: str,
    corpus_folder: str | Path,
    corpus_language: str,
    split: str = "test",
    name: str | None = None,
    qrels_path: str | Path | None = None,
) -> EvalTask:
    """Queries of one BEIR folder against the corpus of another (query language x corpus
    language; MIRACL is one folder per language).

    The judgements are ``qrels_path`` (default: the query folder's ``qrels/<split>.tsv``) and
    must name documents of the *corpus* folder: a line naming a document that is not there
    is dropped and counted (``qrels_unknown_candidate``), a query left without any judged
    document is dropped and counted (``query_without_qrels``). Query ids are
    ``q:{query_language}:{id}``, candidate ids ``c:{corpus_language}:{id}``, so the task's
    ``cross`` setting is the pair query_language -> corpus_language (equal languages: two
    folders of one language, ``mono``).

    Raises:
        DataError: as :func:`read_beir_folder`, an unknown language tag, or no query with a
            judged document of the corpus (the qrels do not allow this pair).
    """
    qlang = check_language(query_language, f"{query_folder}: language tag")
    clang = check_language(corpus_language, f"{corpus_folder}: corpus_language tag")
    query_folder, corpus_folder = Path(query_folder), Path(corpus_folder)
    for folder in (query_folder, corpus_folder):
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder; expected a BEIR folder")
    report = LoadReport(f"{query_folder} x {corpus_folder}")
    corpus = _read_docs(_find(corpus_folder, "corpus"), report, with_title=True)
    queries = _read_docs(_find(query_folder, "queries"), report, with_title=False)
    path = Path(qrels_path) if qrels_path else query_folder / "qrels" / f"{split}.tsv"
    qrels = _read_qrels(path, queries, corpus, report)
    for qid in queries:
        if qid not in qrels:
            report.note("query_without_qrels", qid)
    if not qrels:
        raise DataError(
            f"{path}: no judgement names a document of {corpus_folder}; expected qrels "
            "linking these queries to that corpus"
        )
    return EvalTask(
        name=name or f"{query_folder.name}_x_{corpus_folder.name}",
        queries=[Query(f"q:{qlang}:{q}", qlang, queries[q][0]) for q in queries if q in qrels],
        candidates=[
            Candidate(f"c:{clang}:{cid}", clang, text, "", title)
            for cid, (text, title) in corpus.items()
        ],
        qrels={
            f"q:{qlang}:{q}": {f"c:{clang}:{c}": s for c, s in rel.items()}
            for q, rel in qrels.items()
        },
        report=report,
    )


def load_beir_pairs(
    folder: str | Path, language: str, split: str = "train", with_title: bool = True
) -> tuple[list, list[Pair], LoadReport]:
    """Training pairs (query, judged-relevant passage) from a BEIR folder; group = query id.

    The passage text is built by :func:`~rayhybrid.datamodel.passage_text` (title + text
    with ``with_title``), the recipe the evaluation encodes candidates with.

    Returns:
        ``([], pairs, report)``, the shape of the other pair loaders.

    Raises:
        DataError: as :func:`read_beir_folder`, or no relevant judgement at all.
    """
    lang = check_language(language, f"{folder}: language tag")
    corpus, queries, qrels, report = read_beir_folder(folder, split)
    pairs = [
        Pair(
            query=queries[qid][0],
            query_lang=lang,
            passage=passage_text(corpus[cid][0], title=corpus[cid][1], with_title=with_title),
            passage_lang=lang,
            group=qid,
        )
        for qid, rel in qrels.items()
        for cid, score in rel.items()
        if score > 0
    ]
    if not pairs:
        raise DataError(f"{folder}: qrels/{split}.tsv has no positive judgement")
    return [], pairs, report
