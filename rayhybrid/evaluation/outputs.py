"""Evaluation outputs: JSON summary, TREC run / qrels files, the matrices the plots show.

Files per task in ``<output_dir>/<task>/``:

- ``summary.json``: every metric, per-cell query / exclusion counts, sizes, timings.
- ``<setting>.run`` / ``<setting>.qrels`` (TREC: ``qid Q0 docid rank score tag`` and
  ``qid 0 docid rel``). Query ids are the task's ids for mono and multi; for cross they are
  ``<qid>@<passage language>`` since one query is searched in every other language's pool.
  Scores are written with 9 significant digits (float32 round-trips exactly, so trec_eval
  sees the same ties). Depth: the top-k, or every candidate with ``eval.full_depth_runs``
  (then trec_eval / pytrec_eval recompute map, recall and ranks exactly).
- ``cross_heatmap.png``: mAP and mAP@20 per (query language, passage language), mono on the
  diagonal; ``per_language.png``: mono / cross / multi mAP and rank distance per language
  (drawn by :mod:`rayhybrid.experiments.plots`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cross_matrix", "trec_qid", "write_summary", "write_trec"]


def trec_qid(setting: str, qid: str, pool: str) -> str:
    """Query id in a TREC file of ``setting`` (cross adds the passage language)."""
    return f"{qid}@{pool}" if setting == "cross" else qid


def write_trec(
    blocks: list, setting: str, query_ids: list[str], cand_ids: np.ndarray, folder: Path, tag: str
) -> tuple[Path, Path]:
    """Write ``<setting>.run`` and ``<setting>.qrels`` for the blocks of one setting.

    Returns:
        ``(run path, qrels path)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    run_path, qrels_path = folder / f"{setting}.run", folder / f"{setting}.qrels"
    with run_path.open("w") as run, qrels_path.open("w") as qrels:
        for b in blocks:
            for j, row in enumerate(b.rows.tolist()):
                qid = trec_qid(setting, query_ids[row], b.pool)
                lines = []
                rank = 0
                for key, score in zip(b.top_keys[j].tolist(), b.top_scores[j].tolist()):
                    if key < 0:
                        continue
                    rank += 1
                    lines.append(f"{qid} Q0 {cand_ids[key]} {rank} {score:.9g} {tag}\n")
                run.writelines(lines)
                qrels.writelines(
                    f"{qid} 0 {cand_ids[k]} {int(g) if float(g).is_integer() else g}\n"
                    for k, g in zip(b.rel_keys[j].tolist(), b.rel_gains[j].tolist())
                    if k >= 0
                )
    return run_path, qrels_path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def write_summary(summary: dict[str, Any], path: Path) -> Path:
    """Write the summary as indented JSON (NaN becomes null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(summary), indent=2, sort_keys=False) + "\n")
    return path


def cross_matrix(
    metrics: dict[str, float], langs: list[str], name: str, diagonal: bool = True
) -> np.ndarray:
    """[query language, passage language] matrix of ``name``: cross off the diagonal, mono on
    it (``diagonal=False``: NaN there)."""
    m = np.full((len(langs), len(langs)), np.nan)
    for i, x in enumerate(langs):
        for j, y in enumerate(langs):
            if x == y and not diagonal:
                continue
            key = f"mono/{x}/{name}" if x == y else f"cross/{x}-{y}/{name}"
            m[i, j] = metrics.get(key, np.nan)
    return m
