"""Tatoeba bitext retrieval (XTREME / XTREME-R) into the evaluation-task data model.

XTREME's download script writes, per language, two line-aligned UTF-8 files in one folder:
``tatoeba.{xxx}-eng.{xxx}`` (the sentences in language ``xxx``, an ISO 639-3 code such as
``deu``, ``cmn``, ``pes``) and ``tatoeba.{xxx}-eng.eng`` (their English translations), one
sentence per line, line ``i`` of one file translating line ``i`` of the other. The same data
is on the Hugging Face hub as ``xtreme``, configs ``tatoeba.{xxx}``, split ``validation``,
rows ``{source_sentence, target_sentence, source_lang, target_lang}`` (source ``xxx``,
target English).

One task per language pair (each English side is its own pool of ~1000 sentences, so the
English files of two languages must not be merged into one shard): queries are every
sentence of both sides (``q:{lang}:{i}``, ``q:en:{i}``), candidates the same sentences
(``c:{lang}:{i}``, ``c:en:{i}``), and query ``i`` of one side is relevant to exactly line
``i`` of the other side. Evaluated in the ``cross`` setting this gives both directions:
``cross/{lang}-en/r_at_1`` is XTREME's Tatoeba accuracy (nearest English neighbour is the
gold translation; XTREME reports this direction), ``cross/en-{lang}/r_at_1`` the reverse
one (LASER reports the mean of the two error rates). A query has no relevant candidate in
its own language, so ``mono`` has nothing to score.

Quirks, reported in the load report rather than hidden: a sentence that occurs on several
lines of one side (``duplicate_sentence_<lang>``; identical texts tie, and only the gold
line counts as correct, as in XTREME), blank lines (``blank_line``: the pair is dropped, the
other line numbers keep their pairing), and a leading byte-order mark (``bom``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rayhybrid.datamodel import Candidate, DataError, EvalTask, LoadReport, Query, check_language

__all__ = ["ISO3_TO_ISO1", "load_tatoeba_hf", "load_tatoeba_task", "tatoeba_files"]

# XTREME / XTREME-R Tatoeba language codes (ISO 639-3, as in the file names) -> ISO 639-1.
ISO3_TO_ISO1 = {
    "afr": "af",
    "ara": "ar",
    "aze": "az",
    "ben": "bn",
    "bul": "bg",
    "cmn": "zh",
    "deu": "de",
    "ell": "el",
    "est": "et",
    "eus": "eu",
    "fin": "fi",
    "fra": "fr",
    "guj": "gu",
    "heb": "he",
    "hin": "hi",
    "hun": "hu",
    "ind": "id",
    "ita": "it",
    "jav": "jv",
    "jpn": "ja",
    "kat": "ka",
    "kaz": "kk",
    "kor": "ko",
    "lit": "lt",
    "mal": "ml",
    "mar": "mr",
    "nld": "nl",
    "pan": "pa",
    "pes": "fa",
    "pol": "pl",
    "por": "pt",
    "ron": "ro",
    "rus": "ru",
    "spa": "es",
    "swh": "sw",
    "tam": "ta",
    "tel": "te",
    "tgl": "tl",
    "tha": "th",
    "tur": "tr",
    "ukr": "uk",
    "urd": "ur",
    "vie": "vi",
    "yor": "yo",
}
_ISO1_TO_ISO3 = {v: k for k, v in ISO3_TO_ISO1.items()}


def _iso3(language: str, where: str) -> tuple[str, str]:
    """``(iso3, iso1)`` for a language given either way."""
    if language in ISO3_TO_ISO1:
        return language, ISO3_TO_ISO1[language]
    check_language(language, where)
    if language not in _ISO1_TO_ISO3:
        raise DataError(
            f"{where}: no Tatoeba file code for {language!r}; expected one of "
            + ", ".join(sorted(_ISO1_TO_ISO3))
        )
    return _ISO1_TO_ISO3[language], language


def tatoeba_files(folder: str | Path, language: str) -> tuple[Path, Path]:
    """The ``(xxx side, English side)`` files of one language in an XTREME tatoeba folder.

    Raises:
        DataError: not a folder, unknown language, or a missing file.
    """
    folder = Path(folder)
    iso3, _ = _iso3(language, f"{folder}: tatoeba language")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected XTREME's tatoeba folder")
    src, eng = folder / f"tatoeba.{iso3}-eng.{iso3}", folder / f"tatoeba.{iso3}-eng.eng"
    for path in (src, eng):
        if not path.is_file():
            raise DataError(
                f"{path}: file not found; expected tatoeba.{iso3}-eng.{iso3} and "
                f"tatoeba.{iso3}-eng.eng (one sentence per line, line-aligned)"
            )
    return src, eng


def _read_lines(path: Path, report: LoadReport) -> list[str]:
    out = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} "
                    "of the line)"
                ) from None
            if lineno == 1 and line.startswith("\ufeff"):
                report.note("bom", str(path))
                line = line[1:]
            out.append(line.rstrip("\r\n").strip())
    return out


def _task(
    name: str, lang: str, src: list[str], eng: list[str], where: list[str], report: LoadReport
) -> EvalTask:
    queries, candidates, qrels = [], [], {}
    for i, (s, e) in enumerate(zip(src, eng)):
        if not s or not e:
            report.note("blank_line", where[i])
            continue
        for a, b, text in ((lang, "en", s), ("en", lang, e)):
            queries.append(Query(f"q:{a}:{i}", a, text))
            candidates.append(Candidate(f"c:{a}:{i}", a, text))
            qrels[f"q:{a}:{i}"] = {f"c:{b}:{i}": 1}
    for side, texts in ((lang, src), ("en", eng)):
        for text, n in Counter(t for t in texts if t).items():
            for _ in range(n - 1):
                report.note(f"duplicate_sentence_{side}", text[:60])
    if not queries:
        raise DataError(f"{report.source}: no sentence pairs")
    return EvalTask(name=name, queries=queries, candidates=candidates, qrels=qrels, report=report)


def load_tatoeba_task(folder: str | Path, language: str, name: str | None = None) -> EvalTask:
    """The Tatoeba task of one language from XTREME's files (module docstring).

    Args:
        folder: the folder holding ``tatoeba.{xxx}-eng.{xxx}`` and ``tatoeba.{xxx}-eng.eng``.
        language: ISO 639-1 (``de``) or the file's ISO 639-3 code (``deu``).
        name: task name (default ``tatoeba_{lang}``).

    Raises:
        DataError: a missing file, a line that is not UTF-8 (``file:line``), or sides of
            different lengths (naming both files and their line counts).
    """
    src_path, eng_path = tatoeba_files(folder, language)
    _, lang = _iso3(language, str(folder))
    report = LoadReport(str(src_path))
    src, eng = _read_lines(src_path, report), _read_lines(eng_path, report)
    if len(src) != len(eng):
        raise DataError(
            f"{src_path}: {len(src)} lines but {eng_path} has {len(eng)}; expected "
            "line-aligned files (line i of one translates line i of the other)"
        )
    where = [f"{src_path}:{i + 1}" for i in range(len(src))]
    return _task(name or f"tatoeba_{lang}", lang, src, eng, where, report)


def load_tatoeba_hf(
    language: str,
    dataset: str = "xtreme",
    split: str = "validation",
    name: str | None = None,
    cache_dir: str | None = None,
) -> EvalTask:
    """The Tatoeba task of one language from the Hugging Face ``xtreme`` dataset
    (config ``tatoeba.{xxx}``; rows ``source_sentence`` / ``target_sentence``).

    Raises:
        DataError: the dataset cannot be loaded (offline, unknown config) or a row lacks
            its sentences (naming the row).
    """
    import datasets
    from datasets.exceptions import DatasetsError

    iso3, lang = _iso3(language, f"{dataset}: tatoeba language")
    where = f"{dataset}/tatoeba.{iso3}[{split}]"
    try:
        ds = datasets.load_dataset(dataset, f"tatoeba.{iso3}", split=split, cache_dir=cache_dir)
    except (DatasetsError, OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{where}: cannot load the Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    src, eng, rows = [], [], []
    for i, row in enumerate(ds):
        s, e = row.get("source_sentence"), row.get("target_sentence")
        if not isinstance(s, str) or not isinstance(e, str):
            raise DataError(
                f"{where} row {i}: expected string fields 'source_sentence' and 'target_sentence'"
            )
        src.append(s.strip())
        eng.append(e.strip())
        rows.append(f"{where} row {i}")
    return _task(name or f"tatoeba_{lang}", lang, src, eng, rows, LoadReport(where))
