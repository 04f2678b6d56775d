"""The strategy comparison of the paper: every batch strategy, one budget, one seed, zero-shot evaluation.

``rayhybrid compare --config C`` trains the configured model once per entry of
``cfg.strategies`` (``mono``, ``cross``, ``hybrid`` with ``batch.alpha``, ``hybrid(0.3)``
for another alpha, ``mixed``, ``english``) with everything else equal - steps, batch
size, learning rate, seed - evaluates each model zero-shot on ``eval.tasks`` and writes
the table (rows = strategies; mono / cross / multilingual mAP@20, nDCG@10 for BEIR tasks,
rank distance) as markdown and CSV, plus heatmaps. Every training run is a nested MLflow
run under one parent run, so the MLflow UI compares them side by side. A strategy that
fails gets a row with its error; the others still run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

from rayhybrid._io import write_json_atomic
from rayhybrid.config import (
    Config,
    ConfigError,
    Strategy,
    apply_overrides,
    config_differences,
    config_to_dict,
    parse_strategy,
    resolve_path,
)
from rayhybrid.evaluation.uncertainty import Column, comparison_stats, format_cell
from rayhybrid.experiments.plots import plot_language_matrices, plot_table_heatmap
from rayhybrid.experiments.results import ResultsTable

__all__ = [
    "StrategySpec",
    "baseline_label",
    "compare",
    "display_table",
    "parse_strategies",
    "strategy_config",
]

log = logging.getLogger(__name__)

StrategySpec = Strategy  # one row of the comparison (parsed by the config schema)


def parse_strategies(cfg: Config) -> list[Strategy]:
    """The strategies to compare: ``cfg.strategy_specs`` (validated when the config was
    built; see :func:`rayhybrid.config.parse_strategy`)."""
    return list(cfg.strategy_specs)


def strategy_config(cfg: Config, spec: StrategySpec, seed: int | None = None) -> Config:
    """``cfg`` with the strategy's batches and its own run name; budget untouched.

    With ``seed`` (a comparison over several seeds) the batch plan and dropout use that seed
    and the run name and outputs get a ``_s<seed>`` / ``seed<seed>`` suffix.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.label).strip("_")
    overrides: dict[str, Any] = {
        "batch.strategy": spec.strategy,
        "batch.alpha": spec.alpha,
        "train.run_name": f"{cfg.train.run_name}_{slug}",
        "eval.output_dir": str(Path(cfg.eval.output_dir) / "compare" / slug),
        # The comparison evaluates each model itself, once, after training.
        "eval.at_end_of_training": False,
    }
    if seed is not None:
        overrides["batch.seed"] = seed
        overrides["train.run_name"] += f"_s{seed}"
        overrides["eval.output_dir"] = str(Path(overrides["eval.output_dir"]) / f"seed{seed}")
    return apply_overrides(cfg, overrides)


def baseline_label(cfg: Config, specs: list[StrategySpec]) -> str:
    """The row the others are tested against: ``cfg.baseline`` (parsed like a strategy) or
    the first strategy.

    Raises:
        ConfigError: the baseline is not one of the compared strategies.
    """
    if cfg.baseline == "":
        return specs[0].label
    text = cfg.baseline if isinstance(cfg.baseline, str) else f"hybrid({cfg.baseline})"
    try:
        spec = parse_strategy(text, cfg.batch.alpha)
    except ConfigError as exc:
        raise ConfigError(f"baseline = {cfg.baseline!r}: {exc}") from None
    if spec.label not in [s.label for s in specs]:
        raise ConfigError(
            f"baseline = {cfg.baseline!r} is not a row of the table; expected one "
            f"of {', '.join(s.label for s in specs)}"
        )
    return spec.label


def _metric_columns(cfg: Config) -> list[Column]:
    """Per task: mono / cross / multi mAP (the paper's headline), mAP@20, nDCG@10 and MRR@10
    (every task: LAReQA relevance is binary), and the rank distance (lower is better)."""
    cols = []
    names = [
        ("mAP", "map"),
        ("mAP@20", "map_at_20"),
        ("nDCG@10", "ndcg_at_10"),
        ("MRR@10", "mrr_at_10"),
    ]
    for task in cfg.eval.tasks:
        prefix = f"{task.name} " if len(cfg.eval.tasks) > 1 else ""
        for label, metric in names:
            for setting in ("mono", "cross", "multi"):
                if setting in cfg.eval.settings:
                    cols.append(Column(f"{prefix}{setting} {label}", task.name, setting, metric))
        if "multi" in cfg.eval.settings:
            cols.append(
                Column(
                    f"{prefix}rank distance",
                    task.name,
                    "bias",
                    "rank_distance",
                    lower_is_better=True,
                )
            )
    return cols


_RUN_RECORD = "compare_run.json"


def _fingerprint(cfg: Config) -> dict[str, Any]:
    """What decides a (strategy, seed) run's figures: the resolved config without the
    tracking section and the comparison's own bookkeeping keys."""
    plain = config_to_dict(cfg)
    for key in ("tracking", "reuse", "strategies", "seeds", "baseline", "tune"):
        plain.pop(key, None)
    return json.loads(json.dumps(plain, default=str))


def _record_path(cfg: Config) -> Path:
    """Where a finished (strategy, seed) run keeps its record: its evaluation output folder."""
    return Path(resolve_path(cfg.eval.output_dir)) / _RUN_RECORD


def _reused(cfg: Config) -> dict[str, Any] | None:
    """The record of a finished run of exactly ``cfg`` in its output folder, or None."""
    path = _record_path(cfg)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning(f"[rayhybrid compare] {path}: unreadable ({exc}); running it again")
        return None
    differ = _differences(record.get("config") or {}, _fingerprint(cfg), _fingerprint(Config()))
    if differ:
        log.info(
            f"[rayhybrid compare] {path}: written by another config ({', '.join(differ[:5])}); "
            "running it again"
        )
        return None
    return record


def _differences(old: dict, new: dict, default: dict) -> list[str]:
    """Dotted keys that differ between a stored fingerprint and the current one
    (:func:`rayhybrid.config.config_differences`: a knob added since matches at its default)."""
    return [key for key, _, _ in config_differences(old, new, default)]


def _run_one(cfg: Config, parent_run_id: str | None) -> dict[str, Any]:
    """Train and evaluate one (strategy, seed) config; returns its summary and MLflow run.

    With ``cfg.reuse`` a finished run of the same config is read back instead. The record
    (config, summary, run id, minutes) is written last and atomically, so a run stopped
    half-way is never taken for a finished one.
    """
    from rayhybrid.evaluation.run import evaluate
    from rayhybrid.train.driver import train

    if cfg.reuse and (record := _reused(cfg)) is not None:
        log.info(f"[rayhybrid compare] reusing {cfg.eval.output_dir}/{_RUN_RECORD}")
        return record
    start = time.perf_counter()
    result = train(cfg, parent_run_id=parent_run_id)
    summary = evaluate(
        cfg,
        str(result.model_dir),
        run_id=result.mlflow_run_id,
        step=int(result.metrics.get("step") or 0),
    )
    out = {
        "mlflow_run_id": result.mlflow_run_id or "",
        "summary": summary,
        "minutes": (time.perf_counter() - start) / 60.0,
    }
    write_json_atomic(_record_path(cfg), {**out, "config": _fingerprint(cfg)}, default=str)
    return out


def compare(cfg: Config) -> ResultsTable:
    """Train and evaluate every strategy of ``cfg.strategies`` once per seed of
    ``cfg.seeds``; return the comparison table.

    Each metric column holds the mean over seeds; beside it (``<column> sd``, ``... low``,
    ``... high``, ``... p``, ``... p_holm``) the sd over seeds, the 95 % item-bootstrap
    interval of the seed-averaged figure and the paired randomization test against the
    baseline row (Holm-corrected across rows), all recomputable from the per-query files.
    Outputs go to ``<eval.output_dir>/compare/``: ``comparison.md`` (cells ``mean ± sd [low,
    high] *``), ``comparison.csv`` (every number at full precision),
    ``comparison_heatmap.png`` and ``cross_heatmaps.png``, all logged to the parent MLflow run.

    Raises:
        ConfigError: invalid strategies or baseline (before anything starts).
    """
    from rayhybrid.tracking import finish_parent_run, start_parent_run

    specs = parse_strategies(cfg)
    baseline = baseline_label(cfg, specs)
    seeds: list[int | None] = list(cfg.seeds) if cfg.seeds else [None]  # None: batch.seed
    for spec in specs:  # type-check every strategy's config before the first run starts
        for seed in seeds:
            strategy_config(cfg, spec, seed)
    columns = _metric_columns(cfg)
    parent = start_parent_run(
        cfg,
        f"compare_{cfg.train.run_name}",
        {"rayhybrid.job": "compare"},
        {
            "compare.strategies": ",".join(s.label for s in specs),
            "compare.seeds": ",".join(str(s) for s in cfg.seeds or (cfg.batch.seed,)),
            "compare.baseline": baseline,
        },
    )
    extra = [f"{c.name} {k}" for c in columns for k in _STAT_COLUMNS]
    table = ResultsTable(
        columns=["strategy", "alpha", "seeds"]
        + [c.name for c in columns]
        + ["minutes", "mlflow_run_id", "error"]
        + extra,
        title=_title(cfg),
    )
    summaries: dict[str, list[dict[str, float]]] = {}  # strategy -> one summary per seed
    folders: dict[str, list[Path]] = {}
    n_runs = len(specs) * len(seeds)
    for i, spec in enumerate(specs):
        row: dict[str, Any] = {
            "strategy": spec.label,
            "alpha": spec.alpha if spec.strategy == "hybrid" else None,
        }
        ids, errors, minutes = [], [], 0.0
        for j, seed in enumerate(seeds):
            scfg = strategy_config(cfg, spec, seed)
            log.info(
                f"[rayhybrid compare] {i * len(seeds) + j + 1}/{n_runs}: {spec.label}"
                + ("" if seed is None else f" seed {seed}")
            )
            try:
                out = _run_one(scfg, parent)
            except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                msg = str(exc).strip()
                errors.append(f"{type(exc).__name__}: {msg.splitlines()[-1] if msg else ''}")
                log.warning(f"[rayhybrid compare] {spec.label} failed: {errors[-1]}")
                continue
            summaries.setdefault(spec.label, []).append(out["summary"])
            folders.setdefault(spec.label, []).append(Path(resolve_path(scfg.eval.output_dir)))
            ids.append(out["mlflow_run_id"])
            minutes += out["minutes"]
        row.update(
            seeds=len(ids), minutes=minutes, mlflow_run_id=",".join(ids), error="; ".join(errors)
        )
        table.add(row)
    _fill_statistics(cfg, table, columns, folders, baseline)
    paths = _write_outputs(cfg, table, columns, summaries, baseline)
    finish_parent_run(
        cfg,
        parent,
        paths,
        failed=sum(1 for r in table.rows if r.get("error")),
        total=len(table),
        metrics=_interval_metrics(table, columns),
    )
    log.info(f"[rayhybrid compare] table and heatmaps in {paths['markdown'].parent}")
    table.summary = paths["markdown"].read_text()
    return table


_STAT_COLUMNS = ("sd", "low", "high", "diff", "diff_low", "diff_high", "p", "p_holm")


def _fill_statistics(
    cfg: Config,
    table: ResultsTable,
    columns: list[Column],
    folders: dict[str, list[Path]],
    baseline: str,
) -> None:
    """Mean over seeds, sd, intervals and tests into each row (from the per-query files)."""
    if not folders:
        return
    if baseline not in folders:  # the baseline failed: intervals, but nothing to test against
        log.warning(f"[rayhybrid compare] baseline {baseline} has no result: no significance tests")
    stats = comparison_stats(
        folders,
        columns,
        baseline if baseline in folders else next(iter(folders)),
        samples=cfg.eval.bootstrap_samples,
        level=cfg.eval.ci_level,
        permutations=cfg.eval.permutations,
        seed=cfg.eval.bootstrap_seed,
    )
    for col in columns:  # left out (a run lacks it): no per-run figure either, for any row
        if not any(col.name in cells for cells in stats.values()):
            for row in table.rows:
                row[col.name] = None
    for row in table.rows:
        for col in columns:
            cell = stats.get(row["strategy"], {}).get(col.name)
            if not cell:
                continue
            if baseline not in folders:
                cell = {k: v for k, v in cell.items() if not k.startswith(("diff", "p"))}
            row[col.name] = cell["mean"]
            row.update({f"{col.name} {k}": cell[k] for k in _STAT_COLUMNS if k in cell})


def _interval_metrics(table: ResultsTable, columns: list[Column]) -> dict[str, float]:
    """Parent-run metrics: every row's figure and its interval ends (MLflow-safe names)."""
    out = {}
    for row in table.rows:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", row["strategy"]).strip("_")
        for col in columns:
            key = col.name.replace(" ", "_").replace("@", "_at_")
            for suffix, name in (
                ("", col.name),
                ("_ci_low", f"{col.name} low"),
                ("_ci_high", f"{col.name} high"),
            ):
                value = row.get(name)
                if isinstance(value, float) and not math.isnan(value):
                    out[f"compare/{slug}/{key}{suffix}"] = value
    return out


def display_table(table: ResultsTable, columns: list[Column], baseline: str) -> ResultsTable:
    """The table as people read it: ``mean ± sd [low, high] marker`` per cell; a metric
    column no row has (left out by the statistics) and an error column without errors are not
    shown (the CSV keeps every column)."""
    columns = [c for c in columns if any(row.get(c.name) is not None for row in table.rows)]
    errors = ["error"] if any(row.get("error") for row in table.rows) else []
    shown = ResultsTable(
        columns=["strategy", "seeds"] + [c.name for c in columns] + errors, title=table.title
    )
    for row in table.rows:
        out = {
            "strategy": row["strategy"] + (" (baseline)" if row["strategy"] == baseline else ""),
            "seeds": row.get("seeds"),
            "error": row.get("error") or "",
        }
        for col in columns:
            if row.get(col.name) is None:
                continue
            cell = {
                "mean": row[col.name],
                **{k: row.get(f"{col.name} {k}") for k in ("sd", "low", "high", "p_holm")},
            }
            cell = {k: (float("nan") if v is None else v) for k, v in cell.items()}
            out[col.name] = format_cell(cell)
        shown.add(out)
    return shown


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _title(cfg: Config) -> str:
    tasks = ", ".join(f"{t.name} ({t.part})" for t in cfg.eval.tasks)
    seeds = cfg.seeds or (cfg.batch.seed,)
    return (
        f"{cfg.model.name}, {cfg.train.max_steps} steps x batch {cfg.batch.batch_size}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; zero-shot on "
        f"{tasks}"
    )


def _write_outputs(
    cfg: Config,
    table: ResultsTable,
    columns: list[Column],
    summaries: dict[str, list[dict[str, float]]],
    baseline: str,
) -> dict[str, Path]:
    out = Path(resolve_path(cfg.eval.output_dir)).expanduser() / "compare"
    paths = dict(table.write(out, "comparison"))
    level = f"{cfg.eval.ci_level:.0%}"
    paths["markdown"].write_text(
        display_table(table, columns, baseline).to_markdown() + "\n\n"
        f"Cells: mean over seeds ± sd over seeds (when more than one) [{level} bootstrap interval "
        "over parallel items of the seed-averaged figure]; * / ** : differs from the baseline "
        "row with Holm-corrected p < 0.05 / 0.01 (paired randomization test over items).\n"
    )
    ok = [r for r in table.rows if r.get("seeds")]
    if ok:
        shown = [c for c in columns if any(r.get(c.name) is not None for r in ok)]
        names = [c.name for c in shown]
        paths["heatmap"] = plot_table_heatmap(
            [[r.get(c) for c in names] for r in ok],
            [r["strategy"] for r in ok],
            names,
            out / "comparison_heatmap.png",
            title=table.title,
            lower_is_better=[c.lower_is_better for c in shown],
        )
        cross = _cross_heatmaps(cfg, summaries, out / "cross_heatmaps.png")
        if cross is not None:
            paths["cross_heatmaps"] = cross
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    paths["config"] = out / "config.yaml"
    return paths


def _cross_heatmaps(
    cfg: Config, per_seed: dict[str, list[dict[str, float]]], path: Path
) -> Path | None:
    """One X->Y mAP@20 matrix per strategy (first task), from ``<task>/cross/<x>-<y>/map_at_20``,
    each cell the mean over the strategy's seeds."""
    from rayhybrid.evaluation.outputs import cross_matrix

    if not cfg.eval.tasks or not per_seed:
        return None
    task = cfg.eval.tasks[0].name
    pattern = re.compile(rf"^{re.escape(task)}/cross/([a-z]+)-([a-z]+)/map_at_20$")
    summaries = {
        label: {
            k: sum(r[k] for r in runs) / len(runs)
            for k in set.intersection(*(set(r) for r in runs))
            if pattern.match(k)
        }
        for label, runs in per_seed.items()
        if runs
    }
    langs = sorted(
        {x for s in summaries.values() for k in s if (m := pattern.match(k)) for x in m.groups()}
    )
    panels = {
        label: cross_matrix(
            {k.removeprefix(f"{task}/"): v for k, v in s.items()},
            langs,
            "map_at_20",
            diagonal=False,
        )
        for label, s in summaries.items()
    }
    return plot_language_matrices(
        panels, langs, path, shared_scale=True, colorbar_label="cross-lingual mAP@20"
    )
