"""Per-query values, item-clustered bootstrap intervals and paired tests between runs.

A figure without an interval is not a result (DESIGN.md, "Uncertainty"). Everything here
works on the per-query values of one setting (:class:`PerQuery`): one row per (query, cell),
where a cell is X->X (mono), X->Y (cross) or X->all (multi), plus the rank distance of each
multilingual query (setting ``bias``, cell = query language).

- The reported figure is the macro average over cells of the per-cell means (the
  ``summarize`` definition). It is linear in per-row values once the cell sizes are fixed, so
  it is the *sum of per-item contributions* ``u_i = sum_c (1/C) (1/n_c) sum_{j in i, c} x_j``.
- **Intervals**: 95 % percentile bootstrap that resamples parallel *items* (all language
  versions of a question together: they share content and are not independent), recomputing
  the macro average (cells re-weighted by the resample) each time. No kept library does a
  cluster bootstrap of a macro-over-cells mean, so it is written here (vectorised: a resample
  is a vector of item counts, the cell sums are one matrix product).
- **Paired tests**: ranx's Fisher randomization test on the per-item contributions of two
  runs over the same items (swapping the two runs' values of an item keeps its cluster
  together); Holm's step-down correction across rows (:func:`holm`).

The item id of a query ``q:<lang>:<id>`` is ``<id>`` (LAReQA question id, BEIR query id).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError

__all__ = [
    "Column",
    "PerQuery",
    "bootstrap",
    "comparison_stats",
    "format_cell",
    "holm",
    "item_of",
    "marker",
    "mean_table",
    "paired_test",
    "per_query_tables",
    "read_per_query",
    "write_per_query",
]

log = logging.getLogger(__name__)

AGGREGATES = ("macro", "micro", "median")


def item_of(query_id: str) -> str:
    """Parallel item (cluster) of a query id ``q:<lang>:<id>``: ``<id>``."""
    parts = query_id.split(":", 2)
    return parts[2] if len(parts) == 3 else query_id


@dataclass
class PerQuery:
    """Per-query values of one setting: one row per (query, cell)."""

    setting: str
    qids: np.ndarray  # [n] query id of each row
    cells: np.ndarray  # [n] cell label (``ar``, ``ar-de``)
    values: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [n] (NaN = none)

    @property
    def items(self) -> np.ndarray:
        return np.array([item_of(q) for q in self.qids.tolist()], dtype=object)

    def aggregate(self, metric: str, how: str = "macro") -> float:
        """The reported figure: macro over cells of cell means, micro mean, or median."""
        x = self.values[metric]
        ok = ~np.isnan(x)
        if not ok.any():
            return float("nan")
        if how == "micro":
            return float(x[ok].mean())
        if how == "median":
            return float(np.median(x[ok]))
        cells = self.cells[ok]
        return float(np.mean([x[ok][cells == c].mean() for c in sorted(set(cells.tolist()))]))


def per_query_tables(
    blocks: dict[str, list],
    query_ids: Sequence[str],
    langs_of_key: np.ndarray,
    names: Sequence[str],
) -> dict[str, PerQuery]:
    """Per-query values of every metric for every setting (and ``bias``: rank distance).

    Args:
        blocks: setting -> blocks (:class:`~rayhybrid.evaluation.retrieval.Block`).
        query_ids: query index -> id.
        langs_of_key: candidate key -> language.
        names: metric names (:mod:`~rayhybrid.evaluation.metrics`).
    """
    from rayhybrid.evaluation.metrics import per_query, rank_distances

    qids = np.asarray(query_ids, dtype=object)
    out: dict[str, PerQuery] = {}
    for setting, cells in blocks.items():
        rows, labels, vals = [], [], {n: [] for n in names}
        for b in cells:
            if not len(b.rows):
                continue
            rows.append(qids[b.rows])
            labels.append(np.full(len(b.rows), b.label, dtype=object))
            for name, v in per_query(b.rel_ranks, b.rel_gains, names).items():
                vals[name].append(v)
        if rows:
            out[setting] = PerQuery(
                setting,
                np.concatenate(rows),
                np.concatenate(labels),
                {n: np.concatenate(v) for n, v in vals.items()},
            )
    if "multi" in blocks and any(len(b.rows) for b in blocks["multi"]):
        bl = [b for b in blocks["multi"] if len(b.rows)]
        dist = [rank_distances(b.rel_ranks, langs_of_key[np.clip(b.rel_keys, 0, None)]) for b in bl]
        out["bias"] = PerQuery(
            "bias",
            np.concatenate([qids[b.rows] for b in bl]),
            np.concatenate([np.full(len(b.rows), b.qlang, dtype=object) for b in bl]),
            {"rank_distance": np.concatenate(dist)},
        )
    return out


# --------------------------------------------------------------------------- files


def write_per_query(tables: dict[str, PerQuery], folder: str | Path) -> dict[str, str]:
    """One TSV per setting, ``per_query_<setting>.tsv`` (qid, item, cell, metrics...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for setting, t in tables.items():
        path = folder / f"per_query_{setting}.tsv"
        names = list(t.values)
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["qid", "item", "cell", *names])
            for j, (q, c) in enumerate(zip(t.qids.tolist(), t.cells.tolist())):
                w.writerow([q, item_of(q), c, *(repr(float(t.values[n][j])) for n in names)])
        files[f"per_query_{setting}"] = str(path)
    return files


def read_per_query(folder: str | Path) -> dict[str, PerQuery]:
    """Read back the files of :func:`write_per_query`.

    Raises:
        EvaluationError: no per-query files in ``folder``, or a malformed line.
    """
    folder = Path(folder)
    paths = sorted(folder.glob("per_query_*.tsv"))
    if not paths:
        raise EvaluationError(
            f"{folder}: no per_query_<setting>.tsv files (an evaluation output folder was expected)"
        )
    out = {}
    for path in paths:
        with path.open(encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        head, body = rows[0], rows[1:]
        if head[:3] != ["qid", "item", "cell"]:
            raise EvaluationError(f"{path}:1: expected the header qid, item, cell, <metrics>")
        try:
            vals = {n: np.array([float(r[3 + i]) for r in body]) for i, n in enumerate(head[3:])}
        except (ValueError, IndexError) as exc:
            raise EvaluationError(f"{path}: malformed value ({exc}); expected numbers") from None
        setting = path.stem[len("per_query_") :]
        out[setting] = PerQuery(
            setting,
            np.array([r[0] for r in body], dtype=object),
            np.array([r[2] for r in body], dtype=object),
            vals,
        )
    return out


# --------------------------------------------------------------------------- bootstrap


def _design(
    t: PerQuery,
    metric: str,
    items: list[str] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items, then per (item, cell) sums S and counts N of the metric's non-NaN values, and
    per row the item index and value (for medians)."""
    x = t.values[metric]
    ok = ~np.isnan(x)
    row_items = t.items[ok]
    items = items if items is not None else sorted(set(row_items.tolist()))
    item_idx = {it: i for i, it in enumerate(items)}
    cells = sorted(set(t.cells[ok].tolist()))
    cell_idx = {c: i for i, c in enumerate(cells)}
    ii = np.array([item_idx[i] for i in row_items.tolist()], dtype=np.int64)
    cc = np.array([cell_idx[c] for c in t.cells[ok].tolist()], dtype=np.int64)
    s = np.zeros((len(items), len(cells)))
    n = np.zeros((len(items), len(cells)))
    np.add.at(s, (ii, cc), x[ok])
    np.add.at(n, (ii, cc), 1.0)
    return items, s, n, ii, x[ok]


def _resampled(
    s: np.ndarray, n: np.ndarray, ii: np.ndarray, xs: np.ndarray, w: np.ndarray, how: str
) -> np.ndarray:
    """The aggregate under item weights ``w`` ([B, items]) -> [B]."""
    if how == "macro":
        num, den = w @ s, w @ n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(den > 0, num / den, np.nan), axis=1)
    if how == "micro":
        return (w @ s.sum(1)) / (w @ n.sum(1))
    order = np.argsort(xs, kind="stable")  # weighted median: first value past half the weight
    cum = np.cumsum(w[:, ii[order]], axis=1)
    pos = (cum < cum[:, -1:] / 2.0).sum(axis=1)
    return xs[order][np.minimum(pos, len(xs) - 1)]


def _weights(n_items: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=samples).astype(float)


def bootstrap(
    t: PerQuery,
    metric: str,
    how: str = "macro",
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    other: PerQuery | None = None,
) -> tuple[float, float, float]:
    """Point value and percentile interval of an aggregate, resampling items.

    With ``other`` it is the interval of the paired difference ``t - other`` (both runs
    resampled with the same items).

    Returns:
        ``(value, low, high)``.

    Raises:
        EvaluationError: ``samples`` < 1, ``level`` outside (0, 1), an unknown aggregate,
            or runs that do not hold the same items.
    """
    if samples < 1:
        raise EvaluationError(f"bootstrap samples must be >= 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"bootstrap level must be in (0, 1), got {level}")
    if how not in AGGREGATES:
        raise EvaluationError(f"unknown aggregate {how!r}; expected one of {AGGREGATES}")
    items, s, n, ii, xs = _design(t, metric)
    if not items:
        return float("nan"), float("nan"), float("nan")
    w = _weights(len(items), samples, seed)
    est = t.aggregate(metric, how)  # the reported figure (np.median: the mean of the middle two)
    boot = _resampled(s, n, ii, xs, w, how)
    if other is not None:
        if set(other.items[~np.isnan(other.values[metric])].tolist()) != set(items):
            raise EvaluationError(
                f"{t.setting}/{metric}: the two runs hold different items; "
                "a paired interval needs the same queries"
            )
        _, s2, n2, ii2, xs2 = _design(other, metric, items)
        est -= other.aggregate(metric, how)
        boot = boot - _resampled(s2, n2, ii2, xs2, w, how)
    lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return float(est), float(lo), float(hi)


def item_contributions(
    t: PerQuery,
    metric: str,
    items: list[str] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Per item its share ``u_i`` of the macro average (so that ``sum(u) == macro``)."""
    items, s, n, _, _ = _design(t, metric, items)
    size = n.sum(0)
    present = size > 0
    return items, (s[:, present] / size[present]).sum(1) / max(int(present.sum()), 1)


def paired_test(
    a: PerQuery, b: PerQuery, metric: str, *, permutations: int = 1000, seed: int = 42
) -> float:
    """Two-sided p-value of the macro difference between two runs over the same items.

    Fisher's randomization test of ranx on per-item contributions, scaled by the number of
    items so that their mean is the macro average: swapping the runs' values of an item
    swaps all its language versions together. Identical runs give p = 1.

    Raises:
        EvaluationError: the runs hold different items or cells.
    """
    from ranx.statistical_tests import fisher_randomization_test

    items_a, _, n_a, _, _ = _design(a, metric)
    items_b, _, n_b, _, _ = _design(b, metric)
    if items_a != items_b or n_a.shape != n_b.shape or not np.array_equal(n_a, n_b):
        raise EvaluationError(
            f"{a.setting}/{metric}: the two runs hold different queries; a "
            "paired test needs the same task (same queries and cells)"
        )
    _, ua = item_contributions(a, metric, items_a)
    _, ub = item_contributions(b, metric, items_a)
    if np.array_equal(ua, ub):
        return 1.0
    k = len(items_a)
    p, _ = fisher_randomization_test(ua * k, ub * k, permutations, 0.05, seed)
    return float(p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN), in the input order."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def interval_metrics(
    tables: dict[str, PerQuery], *, samples: int, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Intervals of every macro metric and the rank distance (macro, micro, median).

    Returns:
        flat ``<setting>/<metric>`` -> ``{"value", "low", "high"}``; the rank distance as
        ``bias/rank_distance`` (macro), ``bias/rank_distance_micro`` and ``_median``.
    """
    out: dict[str, Any] = {}
    for setting, t in tables.items():
        for metric in t.values:
            hows = AGGREGATES if setting == "bias" else ("macro",)
            for how in hows:
                v, lo, hi = bootstrap(t, metric, how, samples=samples, level=level, seed=seed)
                suffix = "" if how == "macro" else f"_{how}"
                out[f"{setting}/{metric}{suffix}"] = {"value": v, "low": lo, "high": hi}
    return out


# --------------------------------------------------------------------------- comparison tables


@dataclass(frozen=True)
class Column:
    """A table column: a macro figure of one task's setting (``bias`` for rank distance)."""

    name: str  # e.g. "mono mAP@20"
    task: str
    setting: str
    metric: str
    lower_is_better: bool = False


def mean_table(tables: Sequence[PerQuery]) -> PerQuery:
    """Per-row means over runs (seeds) of the same task, rows aligned by (query, cell).

    Macro, micro figures are linear in the rows, so the figure of the mean table is the mean
    of the runs' figures; its bootstrap interval is that of the seed-averaged figure.

    Raises:
        EvaluationError: the runs hold different (query, cell) rows.
    """
    first = tables[0]
    if len(tables) == 1:
        return first
    keys = list(zip(first.qids.tolist(), first.cells.tolist()))
    values = {m: np.zeros(len(keys)) for m in first.values}
    for t in tables:
        pos = {k: i for i, k in enumerate(zip(t.qids.tolist(), t.cells.tolist()))}
        if set(pos) != set(keys):
            raise EvaluationError(
                f"{t.setting}: runs of one row hold different queries; seeds "
                "must be evaluated on the same task"
            )
        order = np.array([pos[k] for k in keys])
        for m in values:
            values[m] += t.values[m][order] / len(tables)
    return PerQuery(first.setting, first.qids, first.cells, values)


def comparison_stats(
    runs: dict[str, Sequence[str | Path]],
    columns: Sequence[Column],
    baseline: str,
    *,
    samples: int,
    level: float = 0.95,
    permutations: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Statistics of every row and column of a comparison table.

    Args:
        runs: row label -> evaluation output folders, one per seed (each holding
            ``<task>/per_query_<setting>.tsv``).
        columns: the figures to report.
        baseline: the row every other row is tested against.
        samples, level: bootstrap resamples and confidence level.
        permutations: paired randomization test swaps.
        seed: bootstrap / permutation seed.

    Returns:
        label -> column name -> ``mean`` (over seeds), ``sd`` (over seeds, NaN for one seed),
        ``low`` / ``high`` (item bootstrap of the seed-averaged figure), ``seeds``, and for
        rows other than the baseline ``diff`` / ``diff_low`` / ``diff_high`` (paired
        bootstrap), ``p`` (randomization test over items) and ``p_holm`` (Holm-corrected
        across the rows of the column).

    Raises:
        EvaluationError: the baseline is not a row, or runs disagree on their queries.
    """
    if baseline not in runs:
        raise EvaluationError(
            f"baseline {baseline!r} is not a row of the table; rows: " + ", ".join(runs)
        )
    cache: dict[Path, dict[str, PerQuery]] = {}

    def tables(folder: Path) -> dict[str, PerQuery]:  # a failed run wrote none: no tables
        if folder not in cache:
            cache[folder] = read_per_query(folder) if any(folder.glob("per_query_*.tsv")) else {}
        return cache[folder]

    out: dict[str, dict[str, dict[str, float]]] = {label: {} for label in runs}
    for col in columns:
        # A figure is compared only where every run has it: records written before a metric
        # existed (reused by `compare reuse=true`) leave its column out, said once.
        lacking = [
            str(f)
            for folders in runs.values()
            for f in folders
            if col.setting in tables(Path(f) / col.task)
            and col.metric not in tables(Path(f) / col.task)[col.setting].values
        ]
        if lacking:
            log.warning(
                f"[rayhybrid compare] {col.name}: left out, {len(lacking)} run(s) have no "
                f"{col.metric} in their per-query files (written before it existed), e.g. "
                f"{lacking[0]}"
            )
            continue
        means: dict[str, PerQuery] = {}
        for label, folders in runs.items():
            tabs = [
                t[col.setting]
                for t in (tables(Path(f) / col.task) for f in folders)
                if col.setting in t
            ]
            if not tabs:
                continue
            figures = [t.aggregate(col.metric) for t in tabs]
            means[label] = mean_table(tabs)
            _, low, high = bootstrap(
                means[label], col.metric, samples=samples, level=level, seed=seed
            )
            out[label][col.name] = {
                "mean": float(np.mean(figures)),
                "seeds": len(figures),
                "sd": float(np.std(figures, ddof=1)) if len(figures) > 1 else float("nan"),
                "low": low,
                "high": high,
            }
        others = [label for label in means if label != baseline]
        if baseline not in means:
            continue
        pvals = []
        for label in others:
            _, dlo, dhi = bootstrap(
                means[label],
                col.metric,
                samples=samples,
                level=level,
                seed=seed,
                other=means[baseline],
            )
            stats = out[label][col.name]
            stats.update(
                diff=stats["mean"] - out[baseline][col.name]["mean"],
                diff_low=dlo,
                diff_high=dhi,
                p=paired_test(
                    means[label], means[baseline], col.metric, permutations=permutations, seed=seed
                ),
            )
            pvals.append(stats["p"])
        for label, p_adj in zip(others, holm(pvals)):
            out[label][col.name]["p_holm"] = p_adj
    return out


def marker(stats: dict[str, float]) -> str:
    """Significance marker of a cell: ``**`` (Holm p < 0.01), ``*`` (< 0.05), else empty."""
    p = stats.get("p_holm", float("nan"))
    return "" if math.isnan(p) else ("**" if p < 0.01 else "*" if p < 0.05 else "")


def format_cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    """``0.397 ± 0.004 [0.371, 0.420] *``: mean over seeds, sd over seeds (when more than
    one), item-bootstrap interval and the significance marker against the baseline."""
    if not stats:
        return ""
    big = abs(stats["mean"]) >= 10
    f = (lambda v: f"{v:.0f}") if big else (lambda v: f"{v:.{digits}f}")
    text = f(stats["mean"])
    if not math.isnan(stats.get("sd", float("nan"))):
        text += f" ± {f(stats['sd'])}"
    text += f" [{f(stats['low'])}, {f(stats['high'])}]"
    mark = marker(stats)
    return f"{text} {mark}" if mark else text
