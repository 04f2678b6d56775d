"""Evaluation outputs: JSON summary, TREC run / qrels files, heatmap and bar chart.

Files per task in ``<output_dir>/<task>/``:

- ``summary.json``: every metric, per-cell query / exclusion counts, sizes, timings.
- ``<setting>.run`` / ``<setting>.qrels`` (TREC: ``qid Q0 docid rank score tag`` and
  ``qid 0 docid rel``). Query ids are the task's ids for mono and multi; for cross they are
  ``<qid>@<passage language>`` since one query is searched in every other language's pool.
  Scores are written with 9 significant digits (float32 round-trips exactly, so trec_eval
  sees the same ties). Depth: the top-k, or every candidate with ``eval.full_depth_runs``
  (then trec_eval / pytrec_eval recompute map, recall and ranks exactly).
- ``cross_heatmap.png``: mAP and mAP@20 per (query language, passage language), mono on the
  diagonal; ``per_language.png``: mono / cross / multi mAP and rank distance per language.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cross_matrix", "plot_heatmap", "plot_per_language", "trec_qid", "write_summary",
           "write_trec"]


def trec_qid(setting: str, qid: str, pool: str) -> str:
    """Query id in a TREC file of ``setting`` (cross adds the passage language)."""
    return f"{qid}@{pool}" if setting == "cross" else qid


def write_trec(blocks: list, setting: str, query_ids: list[str], cand_ids: np.ndarray,
               folder: Path, tag: str) -> tuple[Path, Path]:
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
                qrels.writelines(f"{qid} 0 {cand_ids[k]} {int(g) if float(g).is_integer() else g}\n"
                                 for k, g in zip(b.rel_keys[j].tolist(), b.rel_gains[j].tolist())
                                 if k >= 0)
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


def cross_matrix(metrics: dict[str, float], langs: list[str], name: str) -> np.ndarray:
    """[query language, passage language] matrix of ``name``: mono diagonal, cross elsewhere."""
    m = np.full((len(langs), len(langs)), np.nan)
    for i, x in enumerate(langs):
        for j, y in enumerate(langs):
            key = f"mono/{x}/{name}" if x == y else f"cross/{x}-{y}/{name}"
            m[i, j] = metrics.get(key, np.nan)
    return m


def plot_heatmap(metrics: dict[str, float], langs: list[str], path: Path, title: str,
                 names: tuple[str, ...] = ("map", "map@20")) -> Path | None:
    """Cross-lingual heatmaps (one panel per metric); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [(n, cross_matrix(metrics, langs, n)) for n in names]
    mats = [(n, m) for n, m in mats if not np.isnan(m).all()]
    if not mats:
        return None
    size = 0.55 * len(langs) + 2.5
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats), size), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats):
        im = ax.imshow(m, vmin=0.0, vmax=max(1e-9, float(np.nanmax(m))), cmap="viridis")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("passage language")
        ax.set_ylabel("query language")
        ax.set_title(name)
        if len(langs) <= 12:
            for i in range(len(langs)):
                for j in range(len(langs)):
                    if not np.isnan(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if m[i, j] < 0.6 * np.nanmax(m) else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_language(metrics: dict[str, float], langs: list[str], path: Path, title: str,
                      name: str = "map") -> Path | None:
    """Bars per language: mono, cross (mean over passage languages), multi; rank distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cross_mean(x: str) -> float:
        vals = [metrics[f"cross/{x}-{y}/{name}"] for y in langs if f"cross/{x}-{y}/{name}" in metrics]
        return float(np.mean(vals)) if vals else np.nan

    series = {"mono": [metrics.get(f"mono/{x}/{name}", np.nan) for x in langs],
              "cross": [cross_mean(x) for x in langs],
              "multi": [metrics.get(f"multi/{x}/{name}", np.nan) for x in langs]}
    series = {k: v for k, v in series.items() if not np.isnan(v).all()}
    dist = [metrics.get(f"bias/rank_distance/{x}", np.nan) for x in langs]
    if not series:
        return None
    panels = 2 if not np.isnan(dist).all() else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 0.6 * len(langs) * panels, 4), squeeze=False)
    x = np.arange(len(langs))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        axes[0, 0].bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    axes[0, 0].set_xticks(x, langs)
    axes[0, 0].set_ylabel(name)
    axes[0, 0].set_xlabel("query language")
    axes[0, 0].legend()
    if panels == 2:
        axes[0, 1].bar(x, dist, color="tab:red")
        axes[0, 1].set_xticks(x, langs)
        axes[0, 1].set_ylabel("rank distance (lower is better)")
        axes[0, 1].set_xlabel("query language")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
