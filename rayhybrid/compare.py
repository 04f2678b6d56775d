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

import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from rayhybrid.config import Config, ConfigError, config_to_dict, resolve_path
from rayhybrid.results import ResultsTable, plot_heatmap

__all__ = ["StrategySpec", "compare", "parse_strategies", "strategy_config"]

_PLAIN = ("mono", "cross", "mixed", "english", "hybrid")
_LOWER_IS_BETTER = ("rank_distance",)


class StrategySpec(NamedTuple):
    """One row of the comparison; the label names the table row and the MLflow run."""

    label: str
    strategy: str
    alpha: float


def parse_strategies(cfg: Config) -> list[StrategySpec]:
    """The strategies to compare, validated.

    Raises:
        ConfigError: an empty list, an unknown name, alpha outside [0, 1], or a duplicate.
    """
    if not cfg.strategies:
        raise ConfigError("strategies is empty: nothing to compare; e.g. strategies=[mono,cross,hybrid]")
    specs, seen = [], set()
    for i, text in enumerate(cfg.strategies):
        # hybrid(0.25) or hybrid:0.25 (the form that needs no quotes in YAML lists)
        m = re.fullmatch(r"\s*hybrid\s*(?:\(\s*([-+0-9.eE]+)\s*\)|:\s*([-+0-9.eE]+))\s*", text)
        if m:
            try:
                alpha = float(m.group(1) or m.group(2))
            except ValueError:
                alpha = float("nan")
            if not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"strategies[{i}] = {text!r}: alpha must be in [0, 1]")
            spec = StrategySpec(f"hybrid({alpha:g})", "hybrid", alpha)
        elif text.strip() in _PLAIN:
            name = text.strip()
            alpha = cfg.batch.alpha
            if name == "hybrid" and not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"batch.alpha = {alpha}: must be in [0, 1]")
            spec = StrategySpec(f"hybrid({alpha:g})" if name == "hybrid" else name, name, alpha)
        else:
            raise ConfigError(f"strategies[{i}] = {text!r}: expected one of {', '.join(_PLAIN)} "
                              "or hybrid(<alpha>)")
        if spec.label in seen:
            raise ConfigError(f"strategies[{i}] = {text!r}: {spec.label} is listed twice")
        seen.add(spec.label)
        specs.append(spec)
    return specs


def strategy_config(cfg: Config, spec: StrategySpec) -> Config:
    """``cfg`` with the strategy's batches and its own run name; budget and seed untouched."""
    from rayhybrid.tuning_space import apply_overrides

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.label).strip("_")
    return apply_overrides(cfg, {
        "batch.strategy": spec.strategy,
        "batch.alpha": spec.alpha,
        "train.run_name": f"{cfg.train.run_name}_{slug}",
        "eval.output_dir": str(Path(cfg.eval.output_dir) / "compare" / slug),
        # The comparison evaluates each model itself, once, after training.
        "eval.at_end_of_training": False,
    })


def _metric_columns(cfg: Config) -> list[tuple[str, str]]:
    """(column, summary key) pairs: per task mono / cross / multi mAP@20, nDCG@10, rank distance."""
    cols = []
    for task in cfg.eval.tasks:
        prefix = f"{task.name} " if len(cfg.eval.tasks) > 1 else ""
        for setting in ("mono", "cross", "multi"):
            if setting in cfg.eval.settings:
                cols.append((f"{prefix}{setting} mAP@20", f"{task.name}/{setting}/map@20"))
        if task.format == "beir":
            for setting in ("mono", "cross", "multi"):
                if setting in cfg.eval.settings:
                    cols.append((f"{prefix}{setting} nDCG@10", f"{task.name}/{setting}/ndcg@10"))
        if "multi" in cfg.eval.settings:
            cols.append((f"{prefix}rank distance", f"{task.name}/bias/rank_distance"))
    return cols


def _run_one(cfg: Config, spec: StrategySpec, parent_run_id: str | None) -> dict[str, Any]:
    """Train and evaluate one strategy; returns its row (metric columns keyed by summary key)."""
    from rayhybrid.evaluation.run import evaluate
    from rayhybrid.training import train

    scfg = strategy_config(cfg, spec)
    start = time.perf_counter()
    result = train(scfg, parent_run_id=parent_run_id)
    summary = evaluate(scfg, str(result.model_dir), run_id=result.mlflow_run_id)
    return {"mlflow_run_id": result.mlflow_run_id or "", "summary": summary,
            "minutes": (time.perf_counter() - start) / 60.0}


def compare(cfg: Config) -> ResultsTable:
    """Train and evaluate every strategy of ``cfg.strategies``; return the comparison table.

    Outputs go to ``<eval.output_dir>/compare/``: ``comparison.md``, ``comparison.csv``,
    ``comparison_heatmap.png`` (strategies x metrics) and ``cross_heatmaps.png`` (X->Y
    mAP@20 per strategy), all logged to the parent MLflow run.

    Raises:
        ConfigError: invalid strategies (before anything starts).
    """
    from rayhybrid.results import finish_parent_run, start_parent_run

    specs = parse_strategies(cfg)
    for spec in specs:  # type-check every strategy's config before the first run starts
        strategy_config(cfg, spec)
    columns = _metric_columns(cfg)
    parent = start_parent_run(cfg, f"compare_{cfg.train.run_name}", {"rayhybrid.job": "compare"},
                              {"compare.strategies": ",".join(s.label for s in specs)})
    table = ResultsTable(columns=["strategy", "alpha"] + [c for c, _ in columns]
                         + ["minutes", "mlflow_run_id", "error"],
                         title=_title(cfg))
    summaries: dict[str, dict[str, float]] = {}
    for i, spec in enumerate(specs):
        print(f"[rayhybrid compare] {i + 1}/{len(specs)}: {spec.label}", flush=True)
        row: dict[str, Any] = {"strategy": spec.label,
                               "alpha": spec.alpha if spec.strategy == "hybrid" else None}
        try:
            out = _run_one(cfg, spec, parent)
        except Exception as exc:  # noqa: BLE001 - one failed strategy must not lose the others
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            print(f"[rayhybrid compare] {spec.label} failed: {row['error']}", flush=True)
        else:
            summaries[spec.label] = out["summary"]
            row.update({col: _float(out["summary"].get(key)) for col, key in columns})
            row.update(minutes=out["minutes"], mlflow_run_id=out["mlflow_run_id"], error="")
        table.add(row)
    paths = _write_outputs(cfg, table, columns, summaries)
    finish_parent_run(cfg, parent, paths, failed=sum(1 for r in table.rows if r.get("error")),
                      total=len(table))
    print(f"[rayhybrid compare] table and heatmaps in {paths['markdown'].parent}", flush=True)
    return table


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _title(cfg: Config) -> str:
    tasks = ", ".join(f"{t.name} ({t.part})" for t in cfg.eval.tasks)
    return (f"{cfg.model.name}, {cfg.train.max_steps} steps x batch {cfg.batch.batch_size}, "
            f"seed {cfg.batch.seed}; zero-shot on {tasks}")


def _write_outputs(cfg: Config, table: ResultsTable, columns: list[tuple[str, str]],
                   summaries: dict[str, dict[str, float]]) -> dict[str, Path]:
    out = Path(resolve_path(cfg.eval.output_dir)).expanduser() / "compare"
    paths = dict(table.write(out, "comparison"))
    ok = [r for r in table.rows if not r.get("error")]
    if ok:
        names = [c for c, _ in columns]
        paths["heatmap"] = plot_heatmap(
            [[r.get(c) for c in names] for r in ok], [r["strategy"] for r in ok], names,
            out / "comparison_heatmap.png", title=table.title,
            lower_is_better=[c.endswith(_LOWER_IS_BETTER) for c in names])
        cross = _cross_heatmaps(cfg, summaries, out / "cross_heatmaps.png")
        if cross is not None:
            paths["cross_heatmaps"] = cross
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    paths["config"] = out / "config.yaml"
    return paths


def _cross_heatmaps(cfg: Config, summaries: dict[str, dict[str, float]], path: Path) -> Path | None:
    """One X->Y mAP@20 matrix per strategy (first task), from ``<task>/cross/<x>-<y>/map@20``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not cfg.eval.tasks or not summaries:
        return None
    task = cfg.eval.tasks[0].name
    pattern = re.compile(rf"^{re.escape(task)}/cross/([a-z]+)-([a-z]+)/map@20$")
    per = {label: {m.groups(): v for k, v in s.items() if (m := pattern.match(k))}
           for label, s in summaries.items()}
    langs = sorted({x for cells in per.values() for pair in cells for x in pair})
    if not langs:
        return None
    fig, axes = plt.subplots(1, len(per), figsize=(3.3 * len(per), 3.4), squeeze=False)
    for ax, (label, cells) in zip(axes[0], per.items()):
        mat = np.full((len(langs), len(langs)), np.nan)
        for (x, y), v in cells.items():
            mat[langs.index(x), langs.index(y)] = v
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax([
            v for c in per.values() for v in c.values()])))
        ax.set_title(f"{label}: mean {np.nanmean(mat):.3f}", fontsize=8)
        ax.set_xticks(range(len(langs)), langs, fontsize=6, rotation=90)
        ax.set_yticks(range(len(langs)), langs, fontsize=6)
        ax.set_xlabel("passage language", fontsize=7)
        ax.set_ylabel("query language", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cross-lingual mAP@20")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
