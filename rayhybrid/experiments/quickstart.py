"""The one-command quickstart: train, evaluate, log to MLflow, print what happened.

``rayhybrid quickstart`` (and ``make quickstart``, ``jobs/quickstart.py``) runs
``configs/quickstart.yaml``: the pip-installed English MiniLM is evaluated zero-shot on the
held-out XQuAD-R articles (the baseline), fine-tuned with hybrid batches on the training
articles, and evaluated again. Both evaluations and the training go to MLflow (the local
SQLite store ``./mlflow.db`` by default). It ends with a before / after table and the
command that opens the MLflow UI. Offline; a few minutes on a 2-core laptop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayhybrid.config import Config

__all__ = ["default_config_path", "format_table", "quickstart", "ui_command"]

log = logging.getLogger(__name__)

CONFIG_NAME = "quickstart.yaml"  # in configs/
SETTINGS = (("mono", "mono X→X"), ("cross", "cross X→Y"), ("multi", "multi X→all"))
METRICS = (("map", "mAP"), ("map_at_20", "mAP@20"), ("r_at_1", "R@1"))


def default_config_path() -> Path:
    """``configs/quickstart.yaml`` of the working directory, else of the source checkout.

    Raises:
        FileNotFoundError: neither exists (pass ``--config``).
    """
    from rayhybrid.config import shipped_config

    return shipped_config(CONFIG_NAME)


def ui_command(tracking_uri: str) -> str:
    """The command (or address) that shows ``tracking_uri`` in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (the MLflow server's UI)"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(task: str, after: dict[str, float], before: dict[str, float] | None = None) -> str:
    """Markdown table of mono / cross / multi metrics and rank distance, before -> after."""
    head = ["setting", "metric"] + (["pretrained", "fine-tuned", "change"] if before else ["value"])
    rows = []

    def row(setting: str, label: str, key: str, digits: int = 3) -> None:
        a = after.get(f"{task}/{key}")
        if before is None:
            rows.append([setting, label, _fmt(a, digits)])
            return
        b = before.get(f"{task}/{key}")
        change = a - b if a is not None and b is not None else None
        rows.append(
            [
                setting,
                label,
                _fmt(b, digits),
                _fmt(a, digits),
                "–" if change is None else f"{change:+.{digits}f}",
            ]
        )

    for setting, name in SETTINGS:
        for key, label in METRICS:
            if f"{task}/{setting}/{key}" in after:
                row(name, label, f"{setting}/{key}")
    if f"{task}/bias/rank_distance" in after:
        row("language bias", "rank distance (lower is better)", "bias/rank_distance", 1)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _with_output(cfg: Config, sub: str) -> Config:
    out = str(Path(cfg.eval.output_dir) / sub)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, output_dir=out))


def quickstart(cfg: Config, *, baseline: bool = True) -> int:
    """Evaluate the starting model, fine-tune it, evaluate again, print a summary.

    Args:
        cfg: the quickstart config (``configs/quickstart.yaml`` plus overrides).
        baseline: also evaluate the model before training (the "pretrained" column).

    Returns:
        0 (errors are raised).

    Raises:
        ConfigError, DataError, ModelError, TrainingError, EvaluationError, TrackingError:
            from training and evaluation, with messages naming what to change.
    """
    from rayhybrid.evaluation.run import evaluate
    from rayhybrid.tracking import resolve_tracking_uri
    from rayhybrid.train.driver import train

    start = time.perf_counter()
    # Resolve once up front: a server that is down fails (or falls back) before any work,
    # and every step logs to the same store even if a fallback happened.
    uri = resolve_tracking_uri(cfg.tracking) if cfg.tracking.enabled else ""
    if uri:
        cfg = dataclasses.replace(
            cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri, on_unavailable="fail")
        )
    tasks = ", ".join(f"{t.name} ({t.part} part)" for t in cfg.eval.tasks)
    log.info(
        f"[rayhybrid quickstart] model {cfg.model.name}, {cfg.batch.strategy} batches "
        f"(alpha={cfg.batch.alpha}), {cfg.train.max_steps} steps of {cfg.batch.batch_size} pairs; "
        f"evaluation on {tasks}; MLflow {uri or 'disabled'}"
    )

    before = None
    if baseline and cfg.model.name == "tiny":
        # The tiny model is built (tokenizer trained, weights drawn) inside the training run.
        log.info("[rayhybrid quickstart] model 'tiny' has no pretrained state: no baseline")
        baseline = False
    if baseline:
        log.info("[rayhybrid quickstart] 1/3 zero-shot evaluation of the pretrained model")
        before = evaluate(_with_output(cfg, "pretrained"))
    log.info("[rayhybrid quickstart] 2/3 fine-tuning")
    result = train(cfg)
    log.info(result.summary())
    log.info("[rayhybrid quickstart] 3/3 evaluation of the fine-tuned model")
    after = evaluate(
        _with_output(cfg, "finetuned"),
        str(result.model_dir),
        run_id=result.mlflow_run_id,
        step=int(result.metrics.get("step") or 0),  # logged at the step the model belongs to
    )

    lines = ["", f"rayhybrid quickstart finished in {time.perf_counter() - start:.0f} s", ""]
    for task in cfg.eval.tasks:
        lines += [
            f"{task.name}, held-out {task.part} part (macro averages over languages / pairs):",
            format_table(task.name, after, before),
            "",
        ]
    lines.append(f"model:    {result.model_dir}")
    lines.append(f"outputs:  {Path(cfg.eval.output_dir).resolve()}/{{pretrained,finetuned}}")
    if uri:
        lines.append(
            f"MLflow:   experiment {cfg.tracking.experiment!r}, training run "
            f"{result.mlflow_run_id} (fine-tuned metrics logged into it)"
        )
        lines.append(f"MLflow UI: {ui_command(uri)}")
    log.info("\n".join(lines))
    return 0
