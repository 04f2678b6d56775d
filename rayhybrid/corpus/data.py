"""Config-driven entry points: training data and evaluation tasks from the config sections.

Training data and evaluation tasks are split with the same function and the same
``data.train_fraction`` / ``data.dev_fraction`` / ``data.split_seed``, so the test part of
a corpus is never trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from rayhybrid.config import DataConfig, TaskConfig, resolve_path
from rayhybrid.corpus.lareqa import (
    lareqa_split_units,
    load_lareqa_items,
    load_lareqa_task,
    read_lareqa_folder,
)
from rayhybrid.corpus.splits import split_units
from rayhybrid.datamodel import (
    Candidate,
    DataError,
    EvalTask,
    LoadReport,
    Pair,
    ParallelItem,
    Query,
    check_language,
)

__all__ = ["TrainingData", "load_eval_task", "load_training_data", "task_from_items"]

_PARTS = ("train", "dev", "test", "all")

log = logging.getLogger(__name__)


def _show_report(what: str, report: LoadReport) -> None:
    """Print what a load found odd (a warning when anything was dropped or odd): the counts
    and one example on the console, every example at DEBUG level (one line each)."""
    level = logging.WARNING if report.counts else logging.INFO
    first = next(((k, v[0]) for k, v in sorted(report.examples.items()) if v), None)
    example = ""
    if first is not None:
        text = f"{first[0]}: {first[1]}"
        text = text if len(text) <= 200 else text[:197] + "..."
        example = f" (e.g. {text}; every example at log level DEBUG)"
    log.log(level, f"[rayhybrid data] {what}: {report.summary()}{example}")
    for kind, examples in sorted(report.examples.items()):
        for ex in examples:
            log.debug(f"[rayhybrid data] {what}: {kind}: {ex}")


@dataclass
class TrainingData:
    """What the batch stream consumes: parallel items and/or loose pairs."""

    items: list[ParallelItem]
    pairs: list[Pair]
    report: LoadReport
    languages: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.languages:
            langs = {lang for it in self.items for lang in it.languages}
            langs |= {x for p in self.pairs for x in (p.query_lang, p.passage_lang)}
            self.languages = tuple(sorted(langs))


def _unit(article: str, group: str, split_by: str) -> str:
    # Sources without articles (plain pairs) fall back to their group.
    return article if split_by == "article" and article else group


def _restrict_item(item: ParallelItem, langs: set[str]) -> ParallelItem | None:
    keep = set(item.languages) & langs
    if not keep:
        return None
    return replace(
        item,
        queries={k: v for k, v in item.queries.items() if k in keep},
        positives={k: v for k, v in item.positives.items() if k in keep},
        negatives={k: v for k, v in item.negatives.items() if k in keep},
    )


def _load_source(
    data_cfg: DataConfig,
) -> tuple[list[ParallelItem], list[Pair], LoadReport, list[str] | None]:
    """Read the configured source; the last element is the LAReQA split units (or None)."""
    path = resolve_path(data_cfg.path)
    fmt = data_cfg.format
    if fmt == "lareqa":
        parsed = read_lareqa_folder(path)
        items, report = load_lareqa_items(
            path, data_cfg.languages, data_cfg.with_context, parsed=parsed
        )
        return items, [], report, lareqa_split_units(parsed, data_cfg.split_by)
    if fmt in ("jsonl", "parquet"):
        from rayhybrid.corpus.formats import load_pairs_file

        return (*load_pairs_file(path, fmt), None)
    if fmt in ("hf", "hf_disk"):
        from rayhybrid.corpus.formats import load_hf

        return (*load_hf(path, data_cfg.hf_split, from_disk=fmt == "hf_disk"), None)
    if fmt == "beir":
        from rayhybrid.corpus.beir import load_beir_pairs

        if len(data_cfg.languages) != 1:
            raise DataError(
                f"data.languages: a beir training folder needs exactly one language "
                f"tag, got {list(data_cfg.languages)}"
            )
        return (
            *load_beir_pairs(path, data_cfg.languages[0], data_cfg.hf_split, data_cfg.with_title),
            None,
        )
    raise DataError(
        f"data.format: unknown format {fmt!r}; expected lareqa, beir, jsonl, parquet, hf or hf_disk"
    )


def _part_units(
    units: Sequence[str], part: str, train_fraction: float, dev_fraction: float, seed: int | None
) -> set[str] | None:
    if part not in _PARTS:
        raise DataError(f"part: expected one of {', '.join(_PARTS)}, got {part!r}")
    if part == "all":
        return None
    return split_units(units, train_fraction, dev_fraction, seed)[part]


def load_training_data(data_cfg: DataConfig, part: str = "train") -> TrainingData:
    """Load the configured training source, keep its languages and one split part.

    Args:
        data_cfg: the ``data`` config section (format, path, languages, split).
        part: ``train``, ``dev``, ``test`` or ``all``.

    Raises:
        DataError: the source is malformed, a language is unknown, or nothing is left.
        ConfigError: split fractions outside [0, 1].
    """
    for lang in data_cfg.languages:
        check_language(lang, "data.languages")
    items, pairs, report, lareqa_units = _load_source(data_cfg)
    units = (
        lareqa_units
        if lareqa_units is not None
        else (
            [_unit(i.article, i.id, data_cfg.split_by) for i in items]
            + [_unit(p.article, p.group, data_cfg.split_by) for p in pairs]
        )
    )
    keep = _part_units(
        units, part, data_cfg.train_fraction, data_cfg.dev_fraction, data_cfg.split_seed
    )
    if keep is not None:
        items = [i for i in items if _unit(i.article, i.id, data_cfg.split_by) in keep]
        pairs = [p for p in pairs if _unit(p.article, p.group, data_cfg.split_by) in keep]
    if data_cfg.languages:
        langs = set(data_cfg.languages)
        items = [r for r in (_restrict_item(i, langs) for i in items) if r is not None]
        pairs = [p for p in pairs if p.query_lang in langs and p.passage_lang in langs]
    if not items and not pairs:
        raise DataError(
            f"{data_cfg.path}: no training data left for part {part!r} and languages "
            f"{list(data_cfg.languages) or 'all'} (check data.train_fraction / "
            "data.dev_fraction / data.languages)"
        )
    _show_report(f"training data ({part})", report)
    return TrainingData(items=items, pairs=pairs, report=report)


def task_from_items(
    name: str,
    items: Iterable[ParallelItem],
    pairs: Iterable[Pair] = (),
    languages: Sequence[str] = (),
    report: LoadReport | None = None,
) -> EvalTask:
    """An evaluation task from items / pairs: each distinct (language, passage) is a candidate.

    A query is relevant to every positive of its item (or pair group) in every language.
    Query ids are ``q:{lang}:{item or group}``; candidate ids ``c:{lang}:{n}``.
    """
    langs = set(languages)
    cand_ids: dict[tuple[str, str], str] = {}
    candidates: list[Candidate] = []
    group_cands: dict[str, set[str]] = {}
    group_queries: dict[str, dict[str, str]] = {}

    def add_candidate(group: str, lang: str, text: str) -> None:
        if langs and lang not in langs:
            return
        if (lang, text) not in cand_ids:
            cand_ids[(lang, text)] = f"c:{lang}:{len(candidates)}"
            candidates.append(Candidate(cand_ids[(lang, text)], lang, text))
        group_cands.setdefault(group, set()).add(cand_ids[(lang, text)])

    for item in items:
        for lang, texts in item.positives.items():
            for text in texts:
                add_candidate(item.id, lang, text)
        group_queries.setdefault(item.id, {}).update(item.queries)
    for p in pairs:
        add_candidate(p.group, p.passage_lang, p.passage)
        group_queries.setdefault(p.group, {}).setdefault(p.query_lang, p.query)
    queries, qrels = [], {}
    for group, per_lang in group_queries.items():
        for lang, text in per_lang.items():
            if (langs and lang not in langs) or not group_cands.get(group):
                continue
            qid = f"q:{lang}:{group}"
            queries.append(Query(qid, lang, text))
            qrels[qid] = {c: 1 for c in sorted(group_cands[group])}
    return EvalTask(
        name=name,
        queries=queries,
        candidates=candidates,
        qrels=qrels,
        report=report or LoadReport(name),
    )


def _keep_queries(task: EvalTask, keep: set[str]) -> None:
    """Keep the queries whose source id (after ``q:{lang}:``) is in ``keep``."""
    task.queries = [q for q in task.queries if q.id.split(":", 2)[2] in keep]
    task.qrels = {q.id: task.qrels[q.id] for q in task.queries}


def _load_xtreme_or_beir(task_cfg: TaskConfig, path: str) -> EvalTask:
    """The loaders of the formats that need no training-split bookkeeping of their own."""
    if task_cfg.format == "beir":
        from rayhybrid.corpus.beir import load_beir_cross_task, load_beir_task

        if task_cfg.corpus_path:
            return load_beir_cross_task(
                path,
                task_cfg.language,
                resolve_path(task_cfg.corpus_path),
                task_cfg.corpus_language,
                task_cfg.qrels_split,
                task_cfg.name,
                qrels_path=resolve_path(task_cfg.qrels_path) if task_cfg.qrels_path else None,
            )
        return load_beir_task(path, task_cfg.language, task_cfg.qrels_split, task_cfg.name)
    if task_cfg.format in ("tatoeba", "tatoeba_hf"):
        from rayhybrid.corpus.tatoeba import load_tatoeba_hf, load_tatoeba_task

        if not task_cfg.language:
            raise DataError(
                f"task {task_cfg.name}: format {task_cfg.format} needs `language` (the "
                "non-English side, e.g. de); configure one task per language"
            )
        if task_cfg.format == "tatoeba_hf":
            return load_tatoeba_hf(task_cfg.language, path, name=task_cfg.name)
        return load_tatoeba_task(path, task_cfg.language, task_cfg.name)
    from rayhybrid.corpus.mewsli_x import load_mewsli_x_task

    return load_mewsli_x_task(path, task_cfg.qrels_split, task_cfg.languages, task_cfg.name)


def load_eval_task(task_cfg: TaskConfig, data_cfg: DataConfig) -> EvalTask:
    """Load one configured evaluation task, restricted to ``task_cfg.part``.

    The part is taken with the training split settings of ``data_cfg`` (``data.split_by``
    units: articles or question ids for LAReQA, query ids for BEIR), so a task on
    the training corpus evaluates only what training never saw. ``part: all`` uses
    everything (e.g. zero-shot on a corpus not used for training).

    Raises:
        DataError: malformed source, unknown language, or an empty selected part.
    """
    path = resolve_path(task_cfg.path)
    split = (data_cfg.train_fraction, data_cfg.dev_fraction, data_cfg.split_seed)
    if task_cfg.format == "lareqa":
        parsed = read_lareqa_folder(path)
        keep = _part_units(lareqa_split_units(parsed, data_cfg.split_by), task_cfg.part, *split)
        by_article = data_cfg.split_by == "article"
        task = load_lareqa_task(
            path,
            task_cfg.languages,
            task_cfg.name,
            parsed=parsed,
            articles=keep if by_article else None,
        )
        if keep is not None and not by_article:  # split by question: drop the other queries
            _keep_queries(task, keep)
    elif task_cfg.format in ("beir", "tatoeba", "tatoeba_hf", "mewsli_x"):
        task = _load_xtreme_or_beir(task_cfg, path)
        # Split units: query ids (BEIR, Mewsli-X mentions) or Tatoeba line numbers (both
        # directions of a line together).
        units = list(dict.fromkeys(q.id.split(":", 2)[2] for q in task.queries))
        keep = _part_units(units, task_cfg.part, *split)
        if keep is not None:
            _keep_queries(task, keep)
    elif task_cfg.format in ("hf", "hf_disk"):
        from rayhybrid.corpus.formats import load_hf

        items, pairs, report = load_hf(path, data_cfg.hf_split, task_cfg.format == "hf_disk")
        units = [_unit(i.article, i.id, data_cfg.split_by) for i in items] + [
            _unit(p.article, p.group, data_cfg.split_by) for p in pairs
        ]
        keep = _part_units(units, task_cfg.part, *split)
        if keep is not None:
            items = [i for i in items if _unit(i.article, i.id, data_cfg.split_by) in keep]
            pairs = [p for p in pairs if _unit(p.article, p.group, data_cfg.split_by) in keep]
        task = task_from_items(task_cfg.name, items, pairs, task_cfg.languages, report)
    else:
        raise DataError(
            f"task {task_cfg.name}: unknown format {task_cfg.format!r}; expected "
            "lareqa, beir, hf, hf_disk, tatoeba, tatoeba_hf or mewsli_x"
        )
    if not task.queries or not task.candidates:
        raise DataError(
            f"task {task_cfg.name} ({path}): no queries or candidates in part "
            f"{task_cfg.part!r} (check data.train_fraction / data.dev_fraction / "
            "task languages)"
        )
    _show_report(f"task {task_cfg.name}", task.report)
    return task
