"""The results table shared by the tuning and comparison jobs.

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
        summary: the table as people read it (cells ``value [low, high] *``, bookkeeping
            columns left out), which a command prints; empty: :meth:`to_markdown`.
    """

    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    summary: str = ""

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
                writer.writerow(
                    {c: ("" if row.get(c) is None else row.get(c)) for c in self.columns}
                )
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
        return ResultsTable(
            columns=list(columns), rows=[dict(r) for r in self.rows], title=self.title
        )

    @staticmethod
    def union_columns(first: Sequence[str], rows: Iterable[dict[str, Any]]) -> list[str]:
        """``first`` followed by every other key seen in ``rows`` (first-seen order)."""
        cols = list(first)
        for row in rows:
            cols.extend(k for k in row if k not in cols)
        return cols
