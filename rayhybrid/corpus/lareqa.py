"""LAReQA folders (XQuAD-R, MLQA-R): one SQuAD-style ``<lang>.json`` per language.

Each paragraph carries ``sentences`` and ``sentence_breaks`` (``[begin, end)`` character
spans in ``context``). A question's answer sentence in a language is the sentence whose
span contains the answer start of that language's version of the question; versions are
matched across languages by question ``id``.

Quirks of the real files are loaded, not dropped, and counted in the :class:`LoadReport`:

- ``answer_crosses_sentence_break``: the answer text runs past the end of its sentence
  (the sentence holding the answer *start* is used, as LAReQA defines it);
- ``sentence_offsets_drift``: ``context[begin:end]`` differs from ``sentences[i]``; the
  ``sentences`` text is the candidate, and the span is moved onto that text when it occurs
  nearby (``sentence_span_realigned``), since answer starts are offsets into ``context``;
- ``text_between_sentences`` / ``text_before_first_break`` / ``text_after_last_break``:
  non-blank context text that no sentence span covers (bullets, a drifted tail);
- ``duplicate_sentence_in_paragraph``: both copies stay candidates (the one holding the
  answer is the relevant one);
- ``answer_in_gap``: an answer start between two spans goes to the next sentence;
- ``answer_text_mismatch``: ``context[start:start+len(text)]`` is not the answer text;
- ``multiple_answers``: the first answer is used;
- ``partly_parallel_question``: a question id missing from some loaded language files.

Articles are grouped across languages by the question ids they share, so an article key
(the title in the first language, English preferred) names the same article in every
language, also in MLQA-R where titles are translated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rayhybrid.corpus._lareqa_file import LangFile, parse_file
from rayhybrid.datamodel import (
    Candidate,
    DataError,
    EvalTask,
    LoadReport,
    ParallelItem,
    Query,
    check_language,
    passage_text,
)

__all__ = [
    "LareqaFolder",
    "lareqa_article_keys",
    "lareqa_split_units",
    "load_lareqa_items",
    "load_lareqa_task",
    "read_lareqa_folder",
]


@dataclass
class LareqaFolder:
    """A parsed LAReQA folder: per-language files and the cross-language article keys."""

    path: Path
    files: dict[str, LangFile]  # language -> parsed file, in language priority order
    article_keys: dict[tuple[str, int], str]  # (language, article index) -> article key
    key_order: list[str]  # article keys in file order (the order of a seed=None split)


# --------------------------------------------------------------------------- folder


def _language_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a LAReQA folder with <lang>.json files")
    files = {p.stem: p for p in sorted(folder.glob("*.json"))}
    if not files:
        raise DataError(f"{folder}: no language files; expected <lang>.json files such as en.json")
    for lang, p in files.items():
        check_language(lang, str(p))
    # English first (it names the articles), then alphabetical.
    return dict(sorted(files.items(), key=lambda kv: (kv[0] != "en", kv[0])))


def _article_keys(files: dict[str, LangFile]) -> tuple[dict[tuple[str, int], str], list[str]]:
    """Group (language, article) nodes that share a question id; name groups by first title."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_node: dict[str, tuple[str, int]] = {}
    for lang, lf in files.items():
        for ai in range(len(lf.titles)):
            find((lang, ai))
        for qid, q in lf.questions.items():
            node = (lang, q.article)
            other = first_node.setdefault(qid, node)
            ra, rb = find(node), find(other)
            if ra != rb:
                # The earlier node (priority language, lower index) stays the root.
                ra, rb = sorted((ra, rb), key=lambda n: (list(files).index(n[0]), n[1]))
                parent[rb] = ra
    keys: dict[tuple[str, int], str] = {}
    root_key: dict[tuple[str, int], str] = {}
    used: set[str] = set()
    order: list[str] = []
    for lang, lf in files.items():
        for ai in range(len(lf.titles)):
            root = find((lang, ai))
            if root not in root_key:
                key, n = files[root[0]].titles[root[1]], 1
                while key in used:  # two different articles with one title
                    n += 1
                    key = f"{files[root[0]].titles[root[1]]}#{n}"
                used.add(key)
                root_key[root] = key
                order.append(key)
            keys[(lang, ai)] = root_key[root]
    return keys, order


def read_lareqa_folder(folder: str | Path) -> LareqaFolder:
    """Parse every ``<lang>.json`` of a LAReQA folder.

    All language files are read (not only the requested ones) so that article keys, and
    hence train/test splits, do not depend on which languages a caller selects.

    Raises:
        DataError: no language files, an unknown language code, or a malformed file.
    """
    folder = Path(folder)
    paths = _language_files(folder)
    files = {lang: parse_file(p, lang) for lang, p in paths.items()}
    keys, order = _article_keys(files)
    return LareqaFolder(folder, files, keys, order)


def lareqa_split_units(parsed: LareqaFolder, split_by: str) -> list[str]:
    """Units of a LAReQA split in file order: article keys, or question ids (``group``).

    Both come from every file of the folder, so training and evaluation split alike
    whatever languages each selects.
    """
    return list(parsed.key_order) if split_by == "article" else _question_order(parsed.files)


def lareqa_article_keys(folder: str | Path | LareqaFolder) -> list[str]:
    """Article keys of a LAReQA folder in file order (the units of its train/test split)."""
    parsed = folder if isinstance(folder, LareqaFolder) else read_lareqa_folder(folder)
    return list(parsed.key_order)


def _select(
    parsed: LareqaFolder,
    languages: Sequence[str],
    require_parallel: bool,
) -> tuple[dict[str, LangFile], LoadReport]:
    for lang in languages:
        check_language(lang, f"{parsed.path}: requested languages")
        if lang not in parsed.files:
            raise DataError(
                f"{parsed.path}: no file for language {lang!r}; found "
                + ", ".join(sorted(parsed.files))
            )
    files = {k: v for k, v in parsed.files.items() if not languages or k in languages}
    report = LoadReport(str(parsed.path))
    for lf in files.values():
        report.merge(lf.report)
    ref = next(iter(files.values()))
    all_ids = set().union(*(lf.questions for lf in files.values()))
    for lang, lf in files.items():
        if require_parallel and set(lf.questions) != set(ref.questions):
            missing = sorted(set(ref.questions) - set(lf.questions))
            extra = sorted(set(lf.questions) - set(ref.questions))
            raise DataError(
                f"{lf.path}: question ids disagree with {ref.path.name}: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]}); expected the same "
                "ids in every language file (require_parallel=True)"
            )
    for qid in sorted(all_ids):
        have = [lang for lang, lf in files.items() if qid in lf.questions]
        if len(have) < len(files):
            report.note("partly_parallel_question", f"{qid} only in {','.join(have)}")
    return files, report


def _question_order(files: dict[str, LangFile]) -> list[str]:
    """Question ids in file order: the first language's, then ids only found in later files."""
    seen: dict[str, None] = {}
    for lf in files.values():
        for qid in lf.questions:
            seen.setdefault(qid, None)
    return list(seen)


def load_lareqa_items(
    folder: str | Path,
    languages: Sequence[str] = (),
    with_context: bool = False,
    require_parallel: bool = False,
    parsed: LareqaFolder | None = None,
) -> tuple[list[ParallelItem], LoadReport]:
    """Parallel training items: one per question id, the answer sentence as its positive.

    Args:
        folder: the LAReQA folder (``<lang>.json`` files).
        languages: languages to load; empty means every file in the folder.
        with_context: positive = answer sentence + " " + its paragraph.
        require_parallel: every language file must hold the same question ids.
        parsed: an already parsed folder (skips re-reading the files).

    Returns:
        The items (in file order) and the load report with the quirks found.

    Raises:
        DataError: malformed files, unknown or missing languages, non-parallel ids when
            ``require_parallel``.
    """
    parsed = parsed or read_lareqa_folder(folder)
    files, report = _select(parsed, languages, require_parallel)
    items = []
    for qid in _question_order(files):
        queries: dict[str, str] = {}
        positives: dict[str, tuple[str, ...]] = {}
        article = ""
        for lang, lf in files.items():
            q = lf.questions.get(qid)
            if q is None:
                continue
            para = lf.paragraphs[q.article][q.paragraph]
            sent = para.sentences[q.sentence]
            queries[lang] = q.text
            positives[lang] = (passage_text(sent, para.context, with_context=with_context),)
            article = article or parsed.article_keys[(lang, q.article)]
        items.append(ParallelItem(id=qid, queries=queries, positives=positives, article=article))
    return items, report


def load_lareqa_task(
    folder: str | Path,
    languages: Sequence[str] = (),
    name: str = "xquad_r",
    articles: Iterable[str] | None = None,
    require_parallel: bool = False,
    parsed: LareqaFolder | None = None,
) -> EvalTask:
    """Evaluation task: every sentence a candidate, relevance across all loaded languages.

    Query ids are ``q:{lang}:{qid}``, candidate ids ``c:{lang}:{article}:{para}:{sent}``
    (indices in that language's file). A query's relevant candidates are, in each loaded
    language holding that question id, the sentence containing its answer start.

    Args:
        folder: the LAReQA folder.
        languages: languages of queries and candidates; empty means all files.
        name: task name (metric key prefix).
        articles: keep only these article keys (see :func:`lareqa_article_keys`).
        require_parallel: every language file must hold the same question ids.
        parsed: an already parsed folder.

    Raises:
        DataError: as :func:`load_lareqa_items`, or ``articles`` naming unknown keys.
    """
    parsed = parsed or read_lareqa_folder(folder)
    files, report = _select(parsed, languages, require_parallel)
    keep = None if articles is None else set(articles)
    if keep is not None and keep - set(parsed.key_order):
        unknown = sorted(keep - set(parsed.key_order))
        raise DataError(
            f"{parsed.path}: unknown article keys {unknown[:3]}; expected keys from "
            "lareqa_article_keys()"
        )
    candidates: list[Candidate] = []
    for lang, lf in files.items():
        for ai, paras in enumerate(lf.paragraphs):
            article = parsed.article_keys[(lang, ai)]
            if keep is not None and article not in keep:
                continue
            for para in paras:
                # The candidate is the sentence (its paragraph as context), never the title:
                # XQuAD-R titles are English in every language (a cross-lingual leak).
                candidates.extend(
                    Candidate(
                        f"c:{lang}:{ai}:{para.index}:{si}",
                        lang,
                        sent,
                        para.context,
                        article=article,
                    )
                    for si, sent in enumerate(para.sentences)
                )
    queries: list[Query] = []
    qrels: dict[str, dict[str, int]] = {}
    for lang, lf in files.items():
        for qid, q in lf.questions.items():
            if keep is not None and parsed.article_keys[(lang, q.article)] not in keep:
                continue
            query_id = f"q:{lang}:{qid}"
            queries.append(Query(query_id, lang, q.text))
            rel = {}
            for lang2, lf2 in files.items():
                q2 = lf2.questions.get(qid)
                if q2 is not None:
                    rel[f"c:{lang2}:{q2.article}:{q2.paragraph}:{q2.sentence}"] = 1
            qrels[query_id] = rel
    return EvalTask(name=name, queries=queries, candidates=candidates, qrels=qrels, report=report)
