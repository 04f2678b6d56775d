"""What ``rayhybrid tune`` leaves behind: the MLflow parent run, the results table, the plot, the best config.

The table has one row per trial, failed and early-stopped ones included, with the dev
metrics of the trial's last validation point (what ASHA judged it on), its best objective,
its MLflow run and, for a failed trial, the error.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from rayhybrid.config import Config, apply_overrides, config_to_dict, resolve_path
from rayhybrid.experiments.plots import plot_tradeoff
from rayhybrid.experiments.results import ResultsTable
from rayhybrid.tracking import (
    child_runs,
    finish_parent_run,
    mlflow_client,
    resolve_tracking_uri,
    start_parent_run,
)
from rayhybrid.tuning.space import (
    AXIS_NAMES,
    OBJECTIVE_KEY,
    dev_key,
    parse_objective,
)

__all__ = [
    "add_significance",
    "close_trial_runs",
    "collect_table",
    "finish_parent",
    "start_parent",
    "write_outputs",
]

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id.txt"
DONE_KEY = "trial_done"  # in the last result of a trial whose training returned
DEV_COLUMNS = ("mono/map_at_20", "cross/map_at_20", "multi/map_at_20", "bias/rank_distance")


def _axis_name(key: str) -> str:
    return AXIS_NAMES.get(key, key)


def _error_line(error: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) exception."""
    text = str(error)
    hits = re.findall(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    if hits:
        name, msg = hits[-1]
        return f"{name}: {msg.strip()}"
    return f"{type(error).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}"


def _trial_statuses(grid: Any) -> dict[str, str]:
    """Trial statuses as Tune saved them at the end of ``fit``.

    Read back from the experiment folder, not from the returned grid: when a sweep is
    interrupted Tune saves the state first (running trials saved as RUNNING, to be rerun
    on restore) and then stops those trials, which marks them TERMINATED in memory.
    """
    from ray.tune import ExperimentAnalysis

    try:
        saved = ExperimentAnalysis(grid.experiment_path)
    except Exception as exc:  # noqa: BLE001 - the table can do without; say so
        log.warning(f"[rayhybrid tune] could not read the saved trial statuses: {exc}")
        return {}
    return {t.trial_id: t.status for t in saved.trials}


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def collect_table(grid: Any, cfg: Config, axes: dict[str, list[Any]]) -> ResultsTable:
    """One row per trial of a Tune ``ResultGrid``, sorted by the axis values."""
    objective = parse_objective(cfg.tune.objective, cfg.eval.settings)
    statuses = _trial_statuses(grid)
    rows = []
    for result in grid:
        trial_id = result.metrics.get("trial_id") or _trial_id_from_path(result.path)
        row: dict[str, Any] = {"trial": trial_id}
        row.update({_axis_name(k): result.config.get(k) for k in axes})
        df = result.metrics_dataframe
        dev = None
        if df is not None and OBJECTIVE_KEY in df.columns:
            dev_rows = df[df[OBJECTIVE_KEY].notna()]
            if len(dev_rows):
                dev = dev_rows.iloc[-1]
                best = (
                    dev_rows[OBJECTIVE_KEY].max()
                    if objective.mode == "max"
                    else dev_rows[OBJECTIVE_KEY].min()
                )
                row["best_objective"] = float(best)
        if dev is not None:
            row["step"] = int(dev["step"]) if _num(dev.get("step")) is not None else None
            for key in DEV_COLUMNS:
                row[f"dev {key}"] = _num(dev.get(dev_key(key)))
            row["objective"] = float(dev[OBJECTIVE_KEY])
        row["status"] = _status(result, statuses.get(trial_id), row.get("step"), cfg)
        row["error"] = _error_line(result.error) if result.error is not None else ""
        row["mlflow_run_id"] = result.metrics.get("mlflow_run_id") or ""
        rows.append(row)
    axis_cols = [_axis_name(k) for k in axes]
    rows.sort(
        key=lambda r: tuple(
            (r.get(c) is None, r.get(c) if isinstance(r.get(c), (int, float)) else str(r.get(c)))
            for c in axis_cols
        )
    )
    columns = (
        ["trial"]
        + axis_cols
        + ["status", "step"]
        + [f"dev {k}" for k in DEV_COLUMNS]
        + ["objective", "best_objective", "mlflow_run_id", "error"]
    )
    title = f"tune {cfg.tune.name}: objective {objective.name} ({objective.mode}) on the dev split"
    return ResultsTable(columns=columns, rows=rows, title=title)


def add_significance(table: ResultsTable, cfg: Config, exp_dir: Path) -> None:
    """Intervals of every trial's dev figures and paired tests against the baseline trial.

    The baseline is the first trial whose alpha equals ``cfg.baseline`` (or the first trial
    with dev values). Values come from the per-query files each trial wrote at its latest
    validation point, i.e. the figures its row shows. Adds ``dev <metric> low / high / p /
    p_holm`` columns.

    Raises:
        TuneError: ``cfg.baseline`` names an alpha no trial has.
    """
    from rayhybrid.evaluation.uncertainty import Column, comparison_stats
    from rayhybrid.tuning import TuneError
    from rayhybrid.tuning.driver import baseline_alpha

    folders = {}
    for row in table.rows:
        folder = exp_dir / "train_runs" / f"{cfg.tune.name}_{row['trial']}" / "dev"
        if row.get("objective") is not None and any(folder.glob("per_query_*.tsv")):
            folders[row["trial"]] = [folder]
    if not folders:
        return
    alpha = baseline_alpha(cfg)
    if alpha is not None:
        base = next(
            (r["trial"] for r in table.rows if r.get("alpha") == alpha and r["trial"] in folders),
            None,
        )
        if base is None:
            raise TuneError(
                f"baseline = {cfg.baseline!r}: no trial with alpha {alpha:g} has "
                "dev values; alphas: " + ", ".join(f"{r.get('alpha')}" for r in table.rows)
            )
    else:
        base = next(iter(folders))
    columns = [
        Column(f"dev {k}", "", *k.split("/"), lower_is_better=k.startswith("bias"))
        for k in DEV_COLUMNS
    ]
    stats = comparison_stats(
        folders,
        columns,
        base,
        samples=cfg.eval.bootstrap_samples,
        level=cfg.eval.ci_level,
        permutations=cfg.eval.permutations,
        seed=cfg.eval.bootstrap_seed,
    )
    for row in table.rows:
        row["baseline"] = row["trial"] == base
        for col in columns:
            cell = stats.get(row["trial"], {}).get(col.name, {})
            row.update(
                {f"{col.name} {k}": cell[k] for k in ("low", "high", "p", "p_holm") if k in cell}
            )
    table.columns += ["baseline"] + [
        f"{c.name} {k}" for c in columns for k in ("low", "high", "p", "p_holm")
    ]


def display_markdown(table: ResultsTable, axes: dict[str, list[Any]], level: float) -> str:
    """The sweep as people read it: per trial its values, status, and each dev figure as
    ``value [low, high] *`` (marker against the baseline trial); run ids, raw p-values and
    interval columns stay in ``results.csv``."""
    from rayhybrid.evaluation.uncertainty import format_cell

    axis_cols = [_axis_name(k) for k in axes]
    errors = ["error"] if any(r.get("error") for r in table.rows) else []
    shown = ResultsTable(
        columns=[*axis_cols, "status", "step", *(f"dev {k}" for k in DEV_COLUMNS), "objective"]
        + errors,
        title=table.title,
    )
    for row in table.rows:
        out = {c: row.get(c) for c in (*axis_cols, "status", "step", "objective", "error")}
        if row.get("baseline"):
            out["status"] = f"{row.get('status')} (baseline)"
        for key in DEV_COLUMNS:
            col = f"dev {key}"
            if row.get(col) is None:
                continue
            if row.get(f"{col} low") is None:
                out[col] = row[col]
                continue
            cell = {"mean": row[col], "sd": float("nan")}
            cell.update({k: row.get(f"{col} {k}") for k in ("low", "high", "p_holm")})
            out[col] = format_cell({k: (float("nan") if v is None else v) for k, v in cell.items()})
        shown.add(out)
    return (
        shown.to_markdown()
        + f"\n\nCells: dev figure [{level:.0%} bootstrap interval over parallel items]; * / ** : "
        "differs from the baseline trial with Holm-corrected p < 0.05 / 0.01 (paired "
        "randomization test over items). Every number at full precision: results.csv.\n"
    )


def _trial_id_from_path(path: str | None) -> str:
    m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path or "").name)
    return m.group(1) if m else Path(path or "?").name


def _status(result: Any, tune_status: str | None, step: int | None, cfg: Config) -> str:
    if result.error is not None:
        from rayhybrid.tuning.driver import TIMED_OUT

        return "timed out" if TIMED_OUT in str(result.error) else "error"
    if tune_status not in (None, "TERMINATED"):
        return f"unfinished ({tune_status.lower()})"
    if not result.metrics.get(DONE_KEY) and step is not None:
        return f"stopped at step {step}"  # by ASHA: Tune ended it before the driver returned
    if step is None:
        return "no dev report"
    if step < cfg.train.max_steps:
        return f"stopped at step {step}"  # early stopping on the validation loss
    return "finished"


def best_row(table: ResultsTable, cfg: Config) -> dict[str, Any] | None:
    """The trial with the best final objective among those with one (None if none)."""
    objective = parse_objective(cfg.tune.objective, cfg.eval.settings)
    scored = [r for r in table.rows if r.get("objective") is not None and not r.get("error")]
    if not scored:
        return None
    pick = max if objective.mode == "max" else min
    return pick(scored, key=lambda r: r["objective"])


def write_outputs(table: ResultsTable, cfg: Config, axes: dict[str, list[Any]]) -> dict[str, Path]:
    """Write table (md + csv), the alpha trade-off plot and the best config YAML.

    Files go to ``<eval.output_dir>/tune_<tune.name>/``; returns their paths by kind.
    """
    out = Path(resolve_path(cfg.eval.output_dir)).expanduser() / f"tune_{cfg.tune.name}"
    paths = dict(table.write(out, "results"))
    table.summary = display_markdown(table, axes, cfg.eval.ci_level)
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(table.summary)
    plotted = [r for r in table.rows if r.get("objective") is not None]
    if plotted:
        quality = {k: f"dev {k}" for k in ("mono/map_at_20", "cross/map_at_20", "multi/map_at_20")}
        group = [_axis_name(k) for k in axes if k != "batch.alpha"]
        paths["plot"] = plot_tradeoff(
            ResultsTable(table.columns, plotted),
            "alpha",
            quality,
            "dev bias/rank_distance",
            out / "alpha_tradeoff.png",
            group_by=group,
            title=table.title,
        )
    best = best_row(table, cfg)
    if best is not None:
        params = {k: best[_axis_name(k)] for k in axes}
        best_cfg = apply_overrides(
            cfg, {"batch.strategy": "hybrid", "tune.resume": False, **params}
        )
        path = out / "best_config.yaml"
        header = (
            f"# Best trial {best['trial']} of tune {cfg.tune.name}: {cfg.tune.objective} = "
            f"{best['objective']:.4f} on the dev split\n"
        )
        path.write_text(header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
        paths["best_config"] = path
    return paths


# --------------------------------------------------------------------------- MLflow parent


def start_parent(
    cfg: Config, exp_dir: Path, axes: dict[str, list[Any]], restoring: bool
) -> str | None:
    """Create (or, on restore, reopen) the sweep's parent MLflow run; returns its id.

    The id is kept in the experiment folder so that a restored sweep nests its remaining
    trials under the same parent.

    Raises:
        TrackingError: the tracking server is down and ``tracking.on_unavailable`` is fail.
    """
    if not cfg.tracking.enabled:
        return None
    marker = exp_dir / PARENT_RUN_FILE
    if restoring and marker.is_file():
        run_id = marker.read_text().strip()
        mlflow_client(resolve_tracking_uri(cfg.tracking)).update_run(run_id, status="RUNNING")
        return run_id
    run_id = start_parent_run(
        cfg,
        f"tune_{cfg.tune.name}",
        {"rayhybrid.job": "tune", "rayhybrid.tune.name": cfg.tune.name},
        {f"sweep.{_axis_name(k)}": str(v) for k, v in axes.items()},
    )
    exp_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(run_id))
    return run_id


def close_trial_runs(cfg: Config, parent_run_id: str | None, table: ResultsTable) -> None:
    """Match trials to their nested MLflow runs; close runs that Tune stopped as KILLED.

    A trial that ASHA stopped (or an interrupted one) was killed mid-run, so its MLflow run
    still says RUNNING. The run is named ``<tune.name>_<trial id>``; a restored trial has
    one killed run and one finished run of the same name, the table keeps the latest.
    """
    if parent_run_id is None:
        return
    client = mlflow_client(resolve_tracking_uri(cfg.tracking))
    by_name: dict[str, Any] = {}
    for run in child_runs(client, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
        by_name[run.info.run_name] = run
    for row in table.rows:
        run = by_name.get(f"{cfg.tune.name}_{row['trial']}")
        if run is not None and not row.get("mlflow_run_id"):
            row["mlflow_run_id"] = run.info.run_id


def finish_parent(
    cfg: Config, run_id: str | None, table: ResultsTable, paths: dict[str, Path]
) -> None:
    """Log the table, plot and best config to the parent run and close it."""
    best = best_row(table, cfg)
    failed = sum(1 for r in table.rows if r.get("status") in ("error", "timed out"))
    unfinished = any(str(r.get("status", "")).startswith("unfinished") for r in table.rows)
    finish_parent_run(
        cfg,
        run_id,
        paths,
        failed=failed,
        total=len(table),
        metrics={"best/objective": best["objective"]} if best else None,
        status="KILLED" if unfinished else None,
    )
