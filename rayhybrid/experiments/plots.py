"""Every plot rayhybrid draws: one owner of matplotlib.

- :func:`plot_language_matrices`: query language x passage language matrices (an
  evaluation's ``cross_heatmap.png``: mAP and mAP@20 of one model; a comparison's
  ``cross_heatmaps.png``: cross-lingual mAP@20 of every strategy on one scale).
- :func:`plot_per_language`: mono / cross / multi per query language and the rank distance
  (an evaluation's ``per_language.png``).
- :func:`plot_table_heatmap`: a results table, rows x metrics (``comparison_heatmap.png``).
- :func:`plot_tradeoff`: quality and rank distance against alpha (``alpha_tradeoff.png``).

matplotlib is imported inside the functions (headless ``Agg``), so importing rayhybrid stays
fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rayhybrid.experiments.results import ResultsTable

__all__ = ["plot_language_matrices", "plot_per_language", "plot_table_heatmap", "plot_tradeoff"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int, **kwargs: Any) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **kwargs)
    plt.close(fig)
    return path


def plot_language_matrices(
    panels: Mapping[str, np.ndarray],
    langs: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    shared_scale: bool = False,
    colorbar_label: str = "",
) -> Path | None:
    """[query language, passage language] matrices side by side, one panel each.

    Args:
        panels: panel title -> matrix (NaN: no value); all-NaN panels are left out.
        langs: the languages of the rows and columns.
        path: PNG to write.
        title: figure title (per-panel scales only).
        shared_scale: one colour scale and colour bar for every panel, the panel titles with
            the matrix mean (comparing models); else each panel its own scale and colour bar
            and, up to 12 languages, the values in the cells (one model, several metrics).
        colorbar_label: label of the shared colour bar.

    Returns:
        ``path``, or None when there is nothing to plot.
    """
    panels = {name: m for name, m in panels.items() if not np.isnan(m).all()}
    if not panels or not langs:
        return None
    plt = _pyplot()
    n = len(panels)
    small = {"fontsize": 6} if shared_scale else {}
    label = {"fontsize": 7} if shared_scale else {}
    if shared_scale:
        fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.4), squeeze=False)
        top = max(1e-9, float(np.nanmax([np.nanmax(m) for m in panels.values()])))
    else:
        size = 0.55 * len(langs) + 2.5
        fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels.items()):
        vmax = top if shared_scale else max(1e-9, float(np.nanmax(m)))
        im = ax.imshow(m, vmin=0.0, vmax=vmax, cmap="viridis")
        ax.set_xticks(
            range(len(langs)), langs, **small, **({"rotation": 90} if shared_scale else {})
        )
        ax.set_yticks(range(len(langs)), langs, **small)
        ax.set_xlabel("passage language", **label)
        ax.set_ylabel("query language", **label)
        if shared_scale:
            ax.set_title(f"{name}: mean {np.nanmean(m):.3f}", fontsize=8)
            continue
        ax.set_title(name)
        if len(langs) <= 12:
            for i in range(len(langs)):
                for j in range(len(langs)):
                    if not np.isnan(m[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{m[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if m[i, j] < 0.6 * np.nanmax(m) else "black",
                        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if shared_scale:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=colorbar_label)
        return _save(fig, path, dpi=110, bbox_inches="tight")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_per_language(
    metrics: dict[str, float], langs: list[str], path: Path, title: str, name: str = "map"
) -> Path | None:
    """Bars per language: mono, cross (mean over passage languages), multi; rank distance."""

    def cross_mean(x: str) -> float:
        vals = [
            metrics[f"cross/{x}-{y}/{name}"] for y in langs if f"cross/{x}-{y}/{name}" in metrics
        ]
        return float(np.mean(vals)) if vals else np.nan

    series = {
        "mono": [metrics.get(f"mono/{x}/{name}", np.nan) for x in langs],
        "cross": [cross_mean(x) for x in langs],
        "multi": [metrics.get(f"multi/{x}/{name}", np.nan) for x in langs],
    }
    series = {k: v for k, v in series.items() if not np.isnan(v).all()}
    dist = [metrics.get(f"bias/rank_distance/{x}", np.nan) for x in langs]
    if not series:
        return None
    plt = _pyplot()
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
    return _save(fig, path, dpi=110)


def _ys(rows: Sequence[dict[str, Any]], col: str) -> list[float]:
    return [float("nan") if r.get(col) is None else r[col] for r in rows]


def _yerr(rows: Sequence[dict[str, Any]], col: str) -> list[list[float]] | None:
    """Asymmetric error bars from ``<col> low`` / ``<col> high`` (None when absent)."""
    if not any(r.get(f"{col} low") is not None for r in rows):
        return None
    ys = _ys(rows, col)
    return [
        [
            y - (r.get(f"{col} low") if r.get(f"{col} low") is not None else y)
            for y, r in zip(ys, rows)
        ],
        [
            (r.get(f"{col} high") if r.get(f"{col} high") is not None else y) - y
            for y, r in zip(ys, rows)
        ],
    ]


def plot_tradeoff(
    table: ResultsTable,
    x: str,
    quality: dict[str, str],
    bias: str | None,
    path: str | Path,
    *,
    group_by: Sequence[str] = (),
    title: str = "",
) -> Path:
    """Two panels against ``x``: quality metrics (left) and rank distance (right), with
    error bars where the rows carry ``<column> low`` / ``<column> high`` interval ends.

    Args:
        table: rows holding ``x``, the quality columns and ``bias``.
        x: the column on the x axis (alpha).
        quality: legend label -> column, e.g. ``{"mono/map_at_20": "dev mono/map_at_20"}``.
        bias: the rank distance column (None: one panel).
        path: PNG to write.
        group_by: further axis columns (lr, tau); one line per combination.
        title: figure title.
    """
    plt = _pyplot()

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table.rows:
        groups.setdefault(tuple(row.get(g) for g in group_by), []).append(row)
    ncols = 2 if bias else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    markers = "osd^v<>"
    for gi, (key, rows) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        rows = sorted(rows, key=lambda r: r[x])
        xs = [r[x] for r in rows]
        suffix = (
            ""
            if not group_by
            else " (" + ", ".join(f"{g}={v}" for g, v in zip(group_by, key)) + ")"
        )
        for qi, (label, col) in enumerate(quality.items()):
            axes[0][0].errorbar(
                xs,
                _ys(rows, col),
                yerr=_yerr(rows, col),
                marker=markers[qi % len(markers)],
                capsize=3,
                linestyle=["-", "--", ":", "-."][gi % 4],
                color=f"C{qi}",
                label=label + suffix,
            )
        if bias:
            axes[0][1].errorbar(
                xs,
                _ys(rows, bias),
                yerr=_yerr(rows, bias),
                marker="o",
                capsize=3,
                linestyle=["-", "--", ":", "-."][gi % 4],
                color="C3",
                label="rank distance" + suffix,
            )
    panels = [
        ("mAP@20", "retrieval quality (higher is better)"),
        ("rank distance", "language bias (lower is better)"),
    ][:ncols]
    for ax, (ylabel, panel_title) in zip(axes[0], panels):
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def plot_table_heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    lower_is_better: Sequence[bool] = (),
) -> Path:
    """A table as a heatmap (rows: runs, columns: metrics), the values written in each cell.

    Colours are scaled per column (so mAP and rank distance share one figure); columns
    flagged in ``lower_is_better`` use the reversed scale, so greener is always better.
    """
    plt = _pyplot()

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix])
    shade = np.full_like(values, 0.5)
    for j in range(values.shape[1]):
        col = values[:, j]
        lo, hi = (
            np.nanmin(col) if np.isfinite(col).any() else 0,
            np.nanmax(col) if np.isfinite(col).any() else 1,
        )
        scaled = (col - lo) / (hi - lo) if hi > lo else np.full_like(col, 0.5)
        flip = j < len(lower_is_better) and lower_is_better[j]
        shade[:, j] = 1 - scaled if flip else scaled
    fig, ax = plt.subplots(figsize=(1.4 + 1.25 * len(col_labels), 0.9 + 0.5 * len(row_labels)))
    ax.imshow(shade, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(
                j,
                i,
                "" if np.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"),
                ha="center",
                va="center",
                fontsize=7,
            )
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=120)
