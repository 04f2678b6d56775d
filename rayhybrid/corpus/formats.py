"""Pairs and parallel items from JSONL, Parquet and Hugging Face datasets.

Two row shapes are accepted (they may be mixed in one source):

- pair row: ``{query, passage, query_lang, passage_lang, group?, article?}``;
- item row: ``{id, queries: {lang: text}, positives: {lang: [texts]}, negatives?: {lang:
  [texts]}, article?}``.

Arrow-backed sources (Parquet, ``datasets``) store ``queries`` / ``positives`` as structs
with every language as a field; a language an item lacks arrives as null and is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayhybrid.corpus._io import read_jsonl, require
from rayhybrid.datamodel import DataError, LoadReport, Pair, ParallelItem, check_language

__all__ = ["load_hf", "load_pairs_file", "parse_rows"]

_PAIR_KEYS = {"query", "passage", "query_lang", "passage_lang", "group", "article"}
_ITEM_KEYS = {"id", "queries", "positives", "negatives", "article"}


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {what} is {value!r}; expected a non-empty string")
    return value


def _key(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DataError(f"{where}: field {field!r} is {value!r}; expected a string or integer id")
    return str(value)


def _texts_by_lang(row: dict, field: str, where: str, required: bool) -> dict[str, tuple[str, ...]]:
    raw = row.get(field)
    if raw is None and not required:
        return {}
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: field {field!r} is {type(raw).__name__}; expected a mapping "
            "language -> list of texts"
        )
    out = {}
    for lang, texts in raw.items():
        if texts is None:  # a struct field of a language this row lacks
            continue
        check_language(lang, f"{where}: {field}")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)):
            raise DataError(
                f"{where}: {field}[{lang!r}] is {type(texts).__name__}; expected a list of texts"
            )
        out[lang] = tuple(_text(t, where, f"{field}[{lang!r}][{i}]") for i, t in enumerate(texts))
    return {k: v for k, v in out.items() if v}


def _item(row: dict, where: str, report: LoadReport) -> ParallelItem:
    item_id = _key(row.get("id"), where, "id")
    raw_q = require(row, "queries", dict, where, "a mapping language -> query text")
    queries = {}
    for lang, text in raw_q.items():
        if text is not None:
            queries[check_language(lang, f"{where}: queries")] = _text(
                text, where, f"queries[{lang!r}]"
            )
    if not queries:
        raise DataError(f"{where}: item {item_id!r} has no query; expected at least one language")
    positives = _texts_by_lang(row, "positives", where, required=True)
    negatives = _texts_by_lang(row, "negatives", where, required=False)
    for lang in sorted(set(queries) - set(positives)):
        report.note("query_without_positive", f"{where}: {lang}")
    for lang in sorted(set(positives) - set(queries)):
        report.note("positive_without_query", f"{where}: {lang}")
    if not set(queries) & set(positives):
        raise DataError(
            f"{where}: item {item_id!r} has no language with both a query and a "
            "positive; expected queries and positives in the same language(s)"
        )
    article = row.get("article")
    return ParallelItem(
        id=item_id,
        queries=queries,
        positives=positives,
        negatives=negatives,
        article="" if article is None else _key(article, where, "article"),
    )


def _pair(row: dict, where: str, n: int) -> Pair:
    query = _text(row.get("query"), where, "field 'query'")
    passage = _text(row.get("passage"), where, "field 'passage'")
    langs = []
    for field in ("query_lang", "passage_lang"):
        value = row.get(field)
        if not isinstance(value, str):
            raise DataError(f"{where}: missing field {field!r} (expected a language code)")
        langs.append(check_language(value, f"{where}: {field}"))
    group = row.get("group")
    article = row.get("article")
    return Pair(
        query=query,
        passage=passage,
        query_lang=langs[0],
        passage_lang=langs[1],
        group=f"pair-{n}" if group is None else _key(group, where, "group"),
        article="" if article is None else _key(article, where, "article"),
    )


def parse_rows(
    rows: Iterable[tuple[str, dict]],
    source: str,
) -> tuple[list[ParallelItem], list[Pair], LoadReport]:
    """Turn ``(location, row)`` pairs into items and pairs, validating every row.

    Raises:
        DataError: a row of neither shape, a missing / empty text, an unknown language,
            a duplicate item id, or no rows at all. Names the row's location.
    """
    report = LoadReport(source)
    items: list[ParallelItem] = []
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        # Arrow sources hold every column in every row: null means "not in this row".
        row = {k: v for k, v in row.items() if v is not None}
        if "queries" in row or "positives" in row:
            extra = set(row) - _ITEM_KEYS
            item = _item(row, where, report)
            if item.id in seen:
                raise DataError(
                    f"{where}: item id {item.id!r} already used at {seen[item.id]}; "
                    "expected unique ids"
                )
            seen[item.id] = where
            items.append(item)
        elif "query" in row or "passage" in row:
            extra = set(row) - _PAIR_KEYS
            pairs.append(_pair(row, where, len(pairs)))
        else:
            raise DataError(
                f"{where}: keys {sorted(row)}; expected a pair row (query, passage, "
                "query_lang, passage_lang[, group]) or an item row (id, queries, "
                "positives[, negatives, article])"
            )
        for key in sorted(extra):
            report.note("ignored_field", f"{where}: {key}")
    if not items and not pairs:
        raise DataError(f"{source}: no rows; expected pair or item rows")
    return items, pairs, report


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def load_pairs_file(
    path: str | Path,
    format: str,
) -> tuple[list[ParallelItem], list[Pair], LoadReport]:
    """Items and pairs from a JSONL or Parquet file.

    Args:
        path: the file.
        format: ``"jsonl"`` or ``"parquet"``.

    Raises:
        DataError: unreadable file, malformed line (``file:line``) or row (``file row N``).
    """
    path = Path(path)
    if format == "jsonl":
        rows: Iterable[tuple[str, dict]] = ((f"{path}:{n}", obj) for n, obj in read_jsonl(path))
    elif format == "parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: unknown format {format!r}; expected 'jsonl' or 'parquet'")
    return parse_rows(rows, str(path))


def load_hf(
    name_or_folder: str,
    split: str,
    from_disk: bool,
    cache_dir: str | None = None,
) -> tuple[list[ParallelItem], list[Pair], LoadReport]:
    """Items and pairs from a Hugging Face dataset.

    Args:
        name_or_folder: a dataset name / path for ``datasets.load_dataset``, or a folder
            written by ``save_to_disk`` when ``from_disk``.
        split: the split to read (for ``save_to_disk`` folders holding a ``DatasetDict``).
        from_disk: read with ``datasets.load_from_disk``.
        cache_dir: ``datasets`` cache folder (default: its own).

    Raises:
        DataError: the dataset or split cannot be loaded, or a row is malformed.
    """
    import datasets
    from datasets.exceptions import DatasetsError

    where = f"{name_or_folder}[{split}]"
    try:
        if from_disk:
            ds = datasets.load_from_disk(name_or_folder)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"{name_or_folder}: no split {split!r}; found " + ", ".join(sorted(ds))
                    )
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name_or_folder, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except (DatasetsError, OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{where}: cannot load the Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    return parse_rows(((f"{where} row {i}", row) for i, row in enumerate(ds)), where)
