"""Resource groups: every metric per group of languages, with bootstrap intervals.

``eval.resource_groups`` names groups of languages, e.g. MIRACL's low-resource languages by
training-set size. A query belongs to a group when its language does (the part of its cell
label before ``-``: ``sw`` in mono / multi, ``sw-en`` in cross). A group's figure of a
setting is the macro-average over the group's cells of the per-query means, exactly as
the task figures (``metrics.summarize``) but over the group's cells only, and its interval
is the percentile bootstrap over items of the same per-query values
(:func:`~rayhybrid.evaluation.uncertainty.bootstrap`).

Several tasks pool into one table per setting (MIRACL is one BEIR folder, so one task, per
language): cells are labelled by language, so the ``sw`` cell of one task and the ``sw`` cell
of another are one cell; items stay apart (query ids become ``q:<lang>:<task>/<id>``), so a
query of one task is never resampled together with a query of another.

Outputs: flat metrics ``group_<name>/<setting>/<metric>`` with ``/ci_low`` / ``/ci_high``
(MLflow takes the headline ones), ``group_<name>/<setting>/queries`` and ``/cells``, and
``resource_groups.json`` / ``resource_groups.md`` in ``eval.output_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rayhybrid.evaluation.uncertainty import PerQuery, bootstrap, read_per_query

__all__ = ["group_metrics", "group_table", "merge_tasks", "select_languages", "write_groups"]


def _query_lang(cell: str) -> str:
    return cell.split("-", 1)[0]


def merge_tasks(per_task: Mapping[str, Mapping[str, PerQuery]]) -> dict[str, PerQuery]:
    """One table per setting over several tasks' per-query tables (items kept apart)."""
    out: dict[str, PerQuery] = {}
    settings = sorted({s for tables in per_task.values() for s in tables})
    for setting in settings:
        parts = [(name, t[setting]) for name, t in per_task.items() if setting in t]
        names = [n for n in parts[0][1].values if all(n in t.values for _, t in parts)]
        qids = []
        for task, t in parts:
            for q in t.qids.tolist():
                lang, _, rest = q.split(":", 2) if q.count(":") >= 2 else ("", "", q)
                qids.append(f"q:{lang}:{task}/{rest}")
        out[setting] = PerQuery(
            setting,
            np.array(qids, dtype=object),
            np.concatenate([t.cells for _, t in parts]),
            {n: np.concatenate([t.values[n] for _, t in parts]) for n in names},
        )
    return out


def select_languages(t: PerQuery, languages: Sequence[str]) -> PerQuery | None:
    """The rows of ``t`` whose query language is in ``languages`` (None if there are none)."""
    keep = np.array([_query_lang(c) in set(languages) for c in t.cells.tolist()], dtype=bool)
    if not keep.any():
        return None
    return PerQuery(
        t.setting, t.qids[keep], t.cells[keep], {n: v[keep] for n, v in t.values.items()}
    )


def group_metrics(
    tables: Mapping[str, PerQuery],
    groups: Mapping[str, Sequence[str]],
    *,
    samples: int,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Flat figures ``group_<name>/<setting>/<metric>`` (+ ``/ci_low``, ``/ci_high``) and the
    counts ``/queries``, ``/cells`` of every group and setting (module docstring)."""
    out: dict[str, float] = {}
    for name, languages in groups.items():
        for setting, t in tables.items():
            sub = select_languages(t, languages)
            if sub is None:
                continue
            key = f"group_{name}/{setting}"
            for metric in sub.values:
                v, lo, hi = bootstrap(sub, metric, samples=samples, level=level, seed=seed)
                out[f"{key}/{metric}"], out[f"{key}/{metric}/ci_low"] = v, lo
                out[f"{key}/{metric}/ci_high"] = hi
            out[f"{key}/queries"] = float(len(set(sub.qids.tolist())))
            out[f"{key}/cells"] = float(len(set(sub.cells.tolist())))
    return out


def group_table(
    metrics: Mapping[str, float], groups: Mapping[str, Sequence[str]], names: Sequence[str]
) -> str:
    """Markdown: one row per group and setting, ``value [low, high]`` per metric."""
    lines = [
        "| group | languages | setting | queries | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for name, languages in groups.items():
        for setting in ("mono", "cross", "multi", "bias"):
            key = f"group_{name}/{setting}"
            if f"{key}/queries" not in metrics:
                continue
            cells = []
            for m in names:
                v = metrics.get(f"{key}/{m}")
                cells.append(
                    ""
                    if v is None
                    else f"{v:.3f} [{metrics[f'{key}/{m}/ci_low']:.3f}, "
                    f"{metrics[f'{key}/{m}/ci_high']:.3f}]"
                )
            lines.append(
                f"| {name} | {' '.join(languages)} | {setting} | "
                f"{int(metrics[f'{key}/queries'])} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def write_groups(
    task_folders: Mapping[str, str | Path],
    groups: Mapping[str, Sequence[str]],
    output_dir: str | Path,
    *,
    samples: int,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, float], Path]:
    """Read the tasks' per-query files, compute every group's figures, write
    ``resource_groups.json`` / ``.md`` into ``output_dir/resource_groups``.

    Returns:
        ``(flat metrics, the folder written)``.

    Raises:
        EvaluationError: a task folder without per-query files.
    """
    tables = merge_tasks({name: read_per_query(folder) for name, folder in task_folders.items()})
    metrics = group_metrics(tables, groups, samples=samples, level=level, seed=seed)
    names = [n for n in next(iter(tables.values())).values] if tables else []
    folder = Path(output_dir) / "resource_groups"
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "groups": {k: list(v) for k, v in groups.items()},
        "tasks": sorted(task_folders),
        "interval": {"level": level, "samples": samples, "resampled": "items, per task"},
        "metrics": metrics,
    }
    (folder / "resource_groups.json").write_text(json.dumps(doc, indent=1))
    (folder / "resource_groups.md").write_text(group_table(metrics, groups, names))
    return metrics, folder
