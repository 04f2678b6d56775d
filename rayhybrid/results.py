"""A small results table shared by the tuning and comparison jobs.

Rows are plain dicts; the column order is fixed at construction. The table prints
as markdown (what the CLI shows and the README quotes), writes and reads CSV, and
keeps numbers at full precision: rounding happens only when formatting, so a test
can compare every cell with what MLflow holds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ResultsTable"]


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        # Rank distances are in the tens to thousands: one decimal is plenty there.
        return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.1f}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _parse(text: str) -> Any:
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class ResultsTable:
    """Rows of results with a fixed column order.

    Attributes:
        columns: column names, in display order.
        rows: one dict per row; missing keys print as empty cells.
        title: printed above the markdown table when set.
    """

    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""

    def add(self, row: dict[str, Any]) -> None:
        """Append a row; keys outside :attr:`columns` are kept but not printed.

        Raises:
            ValueError: the row has none of the table's columns.
        """
        if not set(row) & set(self.columns):
            raise ValueError(f"row {row!r} has none of the columns {self.columns}")
        self.rows.append(dict(row))

    def column(self, name: str) -> list[Any]:
        """The values of one column, in row order (None where a row lacks it)."""
        return [r.get(name) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def all_failed(self) -> bool:
        """True when the table has rows and every one carries an error (jobs then exit 1)."""
        return bool(self.rows) and all(r.get("error") for r in self.rows)

    def to_markdown(self, digits: int = 3) -> str:
        """GitHub markdown, floats rounded to ``digits`` places (rank distances to 0.1)."""
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in self.columns) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write every column at full precision; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in self.columns})
        return path

    @classmethod
    def from_csv(cls, path: str | Path, title: str = "") -> ResultsTable:
        """Read a table written by :meth:`to_csv` (numbers come back as int / float).

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [{k: _parse(v) for k, v in r.items()} for r in reader]
            return cls(columns=list(reader.fieldnames or []), rows=rows, title=title)

    def write(self, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Write ``<stem>.md`` and ``<stem>.csv`` under ``out_dir``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / f"{stem}.md"
        md.write_text(self.to_markdown() + "\n")
        return {"markdown": md, "csv": self.to_csv(out / f"{stem}.csv")}

    def select(self, columns: Sequence[str]) -> ResultsTable:
        """A table with only ``columns`` (in that order), same rows."""
        return ResultsTable(columns=list(columns), rows=[dict(r) for r in self.rows], title=self.title)

    @staticmethod
    def union_columns(first: Sequence[str], rows: Iterable[dict[str, Any]]) -> list[str]:
        """``first`` followed by every other key seen in ``rows`` (first-seen order)."""
        cols = list(first)
        for row in rows:
            cols.extend(k for k in row if k not in cols)
        return cols


# --------------------------------------------------------------------------- plots


def _ys(rows: Sequence[dict[str, Any]], col: str) -> list[float]:
    return [float("nan") if r.get(col) is None else r[col] for r in rows]


def _yerr(rows: Sequence[dict[str, Any]], col: str) -> list[list[float]] | None:
    """Asymmetric error bars from ``<col> low`` / ``<col> high`` (None when absent)."""
    if not any(r.get(f"{col} low") is not None for r in rows):
        return None
    ys = _ys(rows, col)
    return [[y - (r.get(f"{col} low") if r.get(f"{col} low") is not None else y)
             for y, r in zip(ys, rows)],
            [(r.get(f"{col} high") if r.get(f"{col} high") is not None else y) - y
             for y, r in zip(ys, rows)]]


def plot_tradeoff(table: ResultsTable, x: str, quality: dict[str, str], bias: str | None,
                  path: str | Path, *, group_by: Sequence[str] = (), title: str = "") -> Path:
    """Two panels against ``x``: quality metrics (left) and rank distance (right), with
    error bars where the rows carry ``<column> low`` / ``<column> high`` interval ends.

    Args:
        table: rows holding ``x``, the quality columns and ``bias``.
        x: the column on the x axis (alpha).
        quality: legend label -> column, e.g. ``{"mono/map@20": "dev mono/map@20"}``.
        bias: the rank distance column (None: one panel).
        path: PNG to write.
        group_by: further axis columns (lr, tau); one line per combination.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table.rows:
        groups.setdefault(tuple(row.get(g) for g in group_by), []).append(row)
    ncols = 2 if bias else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    markers = "osd^v<>"
    for gi, (key, rows) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        rows = sorted(rows, key=lambda r: r[x])
        xs = [r[x] for r in rows]
        suffix = "" if not group_by else " (" + ", ".join(f"{g}={v}" for g, v in zip(group_by, key)) + ")"
        for qi, (label, col) in enumerate(quality.items()):
            axes[0][0].errorbar(xs, _ys(rows, col), yerr=_yerr(rows, col),
                                marker=markers[qi % len(markers)], capsize=3,
                                linestyle=["-", "--", ":", "-."][gi % 4], color=f"C{qi}",
                                label=label + suffix)
        if bias:
            axes[0][1].errorbar(xs, _ys(rows, bias), yerr=_yerr(rows, bias), marker="o",
                                capsize=3, linestyle=["-", "--", ":", "-."][gi % 4], color="C3",
                                label="rank distance" + suffix)
    axes[0][0].set_xlabel(x)
    axes[0][0].set_ylabel("mAP@20")
    axes[0][0].set_title("retrieval quality (higher is better)")
    axes[0][0].legend(fontsize=7)
    axes[0][0].grid(alpha=0.3)
    if bias:
        axes[0][1].set_xlabel(x)
        axes[0][1].set_ylabel("rank distance")
        axes[0][1].set_title("language bias (lower is better)")
        axes[0][1].legend(fontsize=7)
        axes[0][1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
                 col_labels: Sequence[str], path: str | Path, *, title: str = "",
                 lower_is_better: Sequence[bool] = ()) -> Path:
    """A heatmap with the values written in each cell.

    Colours are scaled per column (so mAP and rank distance share one figure); columns
    flagged in ``lower_is_better`` use the reversed scale, so greener is always better.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix])
    shade = np.full_like(values, 0.5)
    for j in range(values.shape[1]):
        col = values[:, j]
        lo, hi = np.nanmin(col) if np.isfinite(col).any() else 0, np.nanmax(col) if np.isfinite(col).any() else 1
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
            ax.text(j, i, "" if np.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"),
                    ha="center", va="center", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
