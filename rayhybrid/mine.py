"""Mining hard negatives for the training items (``rayhybrid mine``).

For every language ``L`` of the training part, the distinct positive passages in ``L`` are the
candidates; every item's query in ``L`` is searched against them (the evaluation's encoder and
FAISS index: :func:`rayhybrid.evaluation.encode.encode_with_ray`,
:func:`rayhybrid.evaluation.faiss_index.build_faiss_index`) and its negatives in ``L`` are the
first ``num_negatives`` candidates that

- do not belong to the query's own parallel item (a passage text that is a positive of the
  item, in any language, is never its negative: its translations are positives);
- rank in ``[range_min, range_max)`` among the candidates left (``range_min`` skips the top
  ranks, where unlabelled positives are most likely);
- score at most ``score(positive) - margin`` (absolute margin, like sentence-transformers'
  ``mine_hard_negatives(absolute_margin=...)``: a candidate as close as the positive is
  probably another positive).

These negatives serve mono steps (query and passage in ``L``) and cross steps (passage in
``L``), which take negatives in the passage language. Output: the items JSONL the loaders read
(``{id, queries, positives, negatives, article}``) and a report (negatives per query, score
distributions). Train with ``train.negatives_path=<file> train.negatives_per_query=k``: the
negatives are attached to the training items by id (:func:`attach_negatives`), so the data
source and its train/dev/test split stay what they are.

Why not sentence-transformers' own function: it mines (anchor, positive) pairs of one
language from a dataset object and knows nothing of parallel items, whose other languages must
be kept out of the negatives; the ranking rule is the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rayhybrid.config import ConfigError
from rayhybrid.datamodel import DataError, ParallelItem

if TYPE_CHECKING:
    from rayhybrid.config import Config
    from rayhybrid.corpus import TrainingData

__all__ = ["MineSettings", "attach_negatives", "mine_hard_negatives", "select_negatives"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineSettings:
    """How negatives are chosen (see the module docstring)."""

    num_negatives: int = 4
    range_min: int = 0
    range_max: int = 50
    margin: float = 0.05
    part: str = "train"

    def __post_init__(self) -> None:
        if self.num_negatives < 1 or not 0 <= self.range_min < self.range_max:
            raise ConfigError(
                f"mine: expected num_negatives >= 1 and 0 <= range_min < range_max, got "
                f"{self.num_negatives}, {self.range_min}, {self.range_max}"
            )


def select_negatives(
    ranked: Sequence[int],
    scores: Sequence[float],
    positive_score: float,
    own: set[int],
    s: MineSettings,
) -> list[int]:
    """Candidates (in rank order) kept as negatives of one query: pure, see the module rules.

    Args:
        ranked: candidate indices, best first; ``scores`` their scores.
        positive_score: the query's score with its own positive.
        own: candidates of the query's own item (never negatives, not counted in ranks).
    """
    out: list[int] = []
    rank = 0
    for cand, score in zip(ranked, scores):
        if cand < 0 or cand in own:  # FAISS pads a short result with -1
            continue
        if rank >= s.range_max:
            break
        if rank >= s.range_min and score <= positive_score - s.margin:
            out.append(int(cand))
            if len(out) == s.num_negatives:
                break
        rank += 1
    return out


def _encode(groups, cfg: Config, model_path: str, use_ray: bool) -> list[np.ndarray]:
    if use_ray:
        from rayhybrid.evaluation.encode import encode_with_ray

        embs, _ = encode_with_ray(groups, cfg.model, model_path, workers=cfg.eval.encode_workers)
        return embs
    from rayhybrid.model import encode_texts, load_biencoder

    tokenizer, model = load_biencoder(cfg.model, path=model_path)
    return [
        encode_texts(model, tokenizer, list(texts), prefix=prefix, max_length=limit)
        for texts, prefix, limit in groups
    ]


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q25", "median", "q75", "max"), (round(float(x), 4) for x in q)))


def _mine_language(
    lang: str, items: list[ParallelItem], cfg: Config, model_path: str, s: MineSettings, ray: bool
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Negatives in ``lang`` per item id, and this language's report."""
    from rayhybrid.evaluation.faiss_index import build_faiss_index

    texts: dict[str, int] = {}  # distinct candidate texts of this language
    for item in items:
        for text in item.positives.get(lang, ()):
            texts.setdefault(text, len(texts))
    queries = [i for i, item in enumerate(items) if lang in item.languages]
    cand_texts = list(texts)
    q_emb, c_emb = _encode(
        [
            (
                [items[i].queries[lang] for i in queries],
                cfg.model.query_prefix,
                cfg.data.max_query_length,
            ),
            (cand_texts, cfg.model.passage_prefix, cfg.data.max_passage_length),
        ],
        cfg,
        model_path,
        ray,
    )
    # Own candidates: any text that is a positive of the item in any language (a translation
    # identical to a passage of this language included).
    own_of = {
        i: {texts[t] for texts_l in items[i].positives.values() for t in texts_l if t in texts}
        for i in queries
    }
    most_own = max(len(v) for v in own_of.values())
    k = min(len(cand_texts), s.range_max + most_own)
    scores, ranked = build_faiss_index(c_emb, "flat").search(q_emb, k)
    out: dict[str, list[str]] = {}
    counts, pos_scores, neg_scores = [], [], []
    for row, i in enumerate(queries):
        positive = texts[items[i].positives[lang][0]]
        pos = float(q_emb[row] @ c_emb[positive])
        chosen = select_negatives(ranked[row], scores[row], pos, own_of[i], s)
        counts.append(len(chosen))
        pos_scores.append(pos)
        neg_scores += [float(q_emb[row] @ c_emb[c]) for c in chosen]
        if chosen:
            out[items[i].id] = [cand_texts[c] for c in chosen]
    report = {
        "queries": len(queries),
        "candidates": len(cand_texts),
        "negatives_per_query": {str(n): counts.count(n) for n in sorted(set(counts))},
        "queries_with_fewer": sum(n < s.num_negatives for n in counts),
        "positive_score": _quantiles(pos_scores),
        "negative_score": _quantiles(neg_scores),
    }
    return out, report


def mine_hard_negatives(
    cfg: Config,
    model_path: str,
    out: str | Path,
    settings: MineSettings = MineSettings(),
    *,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Mine negatives for the items of ``cfg.data`` (part ``settings.part``); write ``out``
    (items JSONL) and ``out`` + ``.report.json``; return the report.

    Args:
        cfg: config (``data``: the corpus and split; ``model``: prefixes and pooling).
        model_path: the encoder that ranks (a folder or name).
        use_ray: encode with the Ray Data encoder actors (the CLI); False: in this process.

    Raises:
        DataError: the data has no parallel items (pair rows cannot carry negatives), or the
            data cannot be loaded.
    """
    from rayhybrid.corpus import load_training_data

    data = load_training_data(cfg.data, part=settings.part)
    if use_ray:  # after the data loaded: a bad path fails before Ray starts
        from rayhybrid.cluster import ensure_ray

        ensure_ray()
    if not data.items:
        raise DataError(
            f"{cfg.data.path}: mining needs parallel items (item rows); pair rows carry no "
            "negatives in the items format"
        )
    items = list(data.items)
    langs = sorted({lang for item in items for lang in item.languages})
    mined: dict[str, dict[str, list[str]]] = {}
    report: dict[str, Any] = {"settings": settings.__dict__, "model": model_path, "languages": {}}
    for lang in langs:
        per_item, report["languages"][lang] = _mine_language(
            lang, items, cfg, model_path, settings, use_ray
        )
        for item_id, negs in per_item.items():
            mined.setdefault(item_id, {})[lang] = negs
        log.info("mine %s: %s", lang, report["languages"][lang]["negatives_per_query"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for item in items:
            row = {
                "id": item.id,
                "queries": item.queries,
                "positives": {k: list(v) for k, v in item.positives.items()},
                "negatives": mined.get(item.id, {}),
                "article": item.article,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a reader never sees half a file
    report["items"] = len(items)
    report["items_without_negatives"] = sum(item.id not in mined for item in items)
    Path(str(out) + ".report.json").write_text(json.dumps(report, indent=1))
    return report


def attach_negatives(data: TrainingData, path: str | Path) -> TrainingData:
    """The training data with the negatives of a mined file (``train.negatives_path``), by id.

    Raises:
        DataError: the file is malformed, or names ids (or positives) the training data does
            not have: a file mined from another corpus or split.
    """
    from rayhybrid.corpus.formats import load_pairs_file

    mined_items, _, _ = load_pairs_file(path, "jsonl")
    by_id = {item.id: item for item in data.items}
    unknown = [m.id for m in mined_items if m.id not in by_id]
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} of {len(mined_items)} item ids are not in the training "
            f"data (e.g. {', '.join(map(repr, unknown[:3]))}); expected a file mined from this "
            "corpus and split (rayhybrid mine with this config)"
        )
    negatives = {}
    for m in mined_items:
        item = by_id[m.id]
        for lang, texts in m.positives.items():
            if lang in item.positives and texts[:1] != item.positives[lang][:1]:
                raise DataError(
                    f"{path}: item {m.id!r} has another positive in {lang!r} than the training "
                    "data; expected a file mined from this corpus"
                )
        negatives[m.id] = m.negatives
    items = [
        replace(item, negatives={**item.negatives, **negatives[item.id]})
        if item.id in negatives
        else item
        for item in data.items
    ]
    return replace(data, items=items)
