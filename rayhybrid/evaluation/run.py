"""The evaluation job: encode with Ray Data, search language shards on Ray actors, score, log.

``evaluate(cfg, model_path)`` runs every task of ``cfg.eval.tasks`` (or the given tasks) in
every setting of ``cfg.eval.settings`` and returns flat metrics named
``<task>/<setting>/<cell>/<metric>`` (DESIGN.md, "Tracking"). With ``run_id`` it logs into an
existing MLflow run (the end of training); otherwise it opens its own. A failure anywhere
stops the shard actors and marks the MLflow run FAILED with the error in the tags
``rayhybrid.eval_status`` / ``rayhybrid.eval_error``, so a half-written run says so.

Only the headline figures go to MLflow (:func:`headline_metrics`: per setting mAP, mAP@20,
R@1, R@10, nDCG@10, MRR@10, with their interval ends, and the rank distance), at the
training step the evaluated model belongs to; per-language / per-pair values and counts are
in ``summary.json``, the per-query CSV files and the heatmaps, logged as artifacts
(``tracking.log_all_metrics=true`` logs every value as before). MRR is not logged for mono /
cross, where one relevant candidate makes it equal to mAP.

One naming scheme everywhere: ``map_at_20``, ``r_at_1``, ``ndcg_at_10`` ... in the returned dict,
``summary.json``, the per-query files, MLflow, the plots and ``tune.objective`` (MLflow
rejects ``@`` in metric names; :func:`mlflow_key` still maps an old ``@`` spelling).
Artifacts go under ``eval/<task>/``; output files over 32 MiB (the cross-lingual run of a
whole corpus) are logged gzip-compressed as ``<name>.gz``.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rayhybrid.datamodel import EvalTask
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.faiss_index import IndexSpec, check_index
from rayhybrid.evaluation.metrics import BEIR_METRICS, LAREQA_METRICS, summarize
from rayhybrid.evaluation.retrieval import Retrieval, check_settings, run_settings
from rayhybrid.evaluation.uncertainty import interval_metrics, per_query_tables, write_per_query

if TYPE_CHECKING:
    from rayhybrid.config import Config, TaskConfig
    from rayhybrid.evaluation.shards import ActorShards

__all__ = [
    "candidate_texts",
    "evaluate",
    "evaluate_cli",
    "evaluate_task",
    "headline_metrics",
    "mlflow_key",
]

log = logging.getLogger(__name__)

# Output files above this size go to MLflow gzip-compressed (the plain file stays on disk).
_GZIP_ABOVE = 32 * 2**20


def mlflow_key(name: str) -> str:
    """MLflow-safe metric name (an old ``xquad_r/multi/map@20`` -> ``xquad_r/multi/map_at_20``)."""
    return name.replace("@", "_at_")


# The figures a person compares runs by; everything else is detail for the artifacts. Interval
# ends only for the mAP family, nDCG@10 and the rank distance: with R@1, R@10 and MRR@10 intervals
# too a run would carry ~70 metrics (the other interval ends are in summary.json).
_HEADLINE = re.compile(
    r"^(?P<task>[^/]+)/(?:"
    r"(?:(?:mono|cross|multi)/(?:map|map_at_20|ndcg_at_10)|bias/rank_distance)(?:/ci_low|/ci_high)?"
    r"|(?:mono|cross|multi)/(?:r_at_1|r_at_10|mrr_at_10)|multi/mrr)$"
)


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline subset of flat evaluation metrics ``<task>/<setting>/<metric>``.

    Kept: the macro figures mAP, mAP@20, R@1, R@10, nDCG@10 and MRR@10 of mono / cross /
    multi, the multilingual MRR (in mono and cross it equals mAP: one relevant candidate), the macro
    rank distance, and the ``ci_low`` / ``ci_high`` of mAP, mAP@20, nDCG@10 and the rank
    distance. Dropped: per-language and per-pair cells, counts (``queries``, ``excluded``),
    timings, the other interval ends (they stay in ``summary.json``) and NaN values.
    """
    return {k: v for k, v in metrics.items() if _HEADLINE.match(k) and not np.isnan(float(v))}


def candidate_texts(
    task: EvalTask,
    with_context: bool = False,
    with_title: bool = True,
) -> list[str]:
    """Text encoded for each candidate, by the recipe training passages use
    (:func:`~rayhybrid.datamodel.passage_text`): the LAReQA sentence (+ its paragraph with
    ``with_context``), or a BEIR document's title + text."""
    return [c.passage(with_context, with_title) for c in task.candidates]


class _Tracker:
    """MLflow side of one evaluation (no-op when tracking is disabled).

    With ``guard`` (the end of training) every call goes through the training's
    :class:`~rayhybrid.tracking.TrackingGuard`, to the training's store: a server that is down
    costs one message, the evaluation still runs and writes its files, and its metrics wait in
    the run folder's unsent queue beside the training's. Without it (its own run) a failing
    store fails the evaluation.
    """

    def __init__(
        self, cfg: Config, run_id: str | None, model: str, step: int = 0, guard: Any = None
    ) -> None:
        self.client, self.run_id, self.own, self.guard = None, run_id, run_id is None, guard
        self.log_all, self.step = cfg.tracking.log_all_metrics, step
        if not cfg.tracking.enabled:
            return
        from rayhybrid.tracking import (
            config_params,
            create_run,
            mlflow_client,
            resolve_tracking_uri,
            run_tags,
        )

        if guard is not None and run_id is not None:
            self.client = mlflow_client(guard.tracking_uri)  # where the run is, not a fallback
            self._call("mark the evaluation running", self._status, "running")
            return
        self.guard = None
        uri = resolve_tracking_uri(cfg.tracking)
        self.client = mlflow_client(uri)
        if run_id is None:
            # A zero-shot evaluation trained nothing: only the sections it uses are its params.
            params = {
                k: v
                for k, v in config_params(cfg).items()
                if k.split(".", 1)[0] in ("eval", "model", "data")
            }
            self.run_id = create_run(
                uri,
                cfg.tracking.experiment,
                f"evaluate_{Path(model).name}",
                tags=run_tags(cfg, "evaluate", model),
                params={**params, "eval.model": model},
            )
        self._status("running")

    def _status(self, status: str) -> None:
        self.client.set_tag(self.run_id, "rayhybrid.eval_status", status)

    def _call(self, what: str, fn: Any, *args: Any, records: Sequence[dict] = ()) -> None:
        if self.guard is None:
            fn(*args)
        else:
            self.guard.call(what, fn, *args, records=records)

    def log(self, metrics: dict[str, float], folder: Path, artifact_path: str) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        chosen = (
            {k: v for k, v in metrics.items() if not np.isnan(v)}  # NaN (no cell): not logged
            if self.log_all
            else headline_metrics(metrics)
        )
        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, self.step) for k, v in chosen.items()]
        if self.guard is not None:
            self.guard.log_metrics(self.client, self.run_id, batch)  # queued if not sent
        else:
            self.client.log_batch(self.run_id, metrics=batch)  # split into requests by MLflow
        with tempfile.TemporaryDirectory() as tmp:
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                if path.stat().st_size > _GZIP_ABOVE:  # e.g. the cross run of a whole corpus
                    packed = Path(tmp) / f"{path.name}.gz"
                    with path.open("rb") as src, gzip.open(packed, "wb", compresslevel=5) as dst:
                        shutil.copyfileobj(src, dst)
                    path = packed
                self._call(
                    "log the evaluation files",
                    self.client.log_artifact,
                    self.run_id,
                    str(path),
                    artifact_path,
                )
        if self.guard is not None and not self.guard.ok:
            log.warning(
                f"[rayhybrid eval] MLflow at {self.guard.tracking_uri} did not take this "
                f"evaluation: its files are in {folder}, its metrics wait in "
                f"{self.guard.spill_path} (rayhybrid.tracking.resend_unsent logs them into run "
                f"{self.run_id} when the server is back)"
            )

    def finish(self) -> None:
        if self.client is None:
            return
        self._call("mark the evaluation finished", self._status, "finished")
        if self.own:
            self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        if self.client is None:
            return
        if self.guard is not None:
            self._call("mark the evaluation failed", self._failed, exc, False)
            return
        try:
            self._failed(exc, True)
        except Exception as log_exc:  # noqa: BLE001 - never hide the original error
            log.warning(
                f"[rayhybrid eval] could not mark MLflow run {self.run_id} FAILED: {log_exc}"
            )

    def _failed(self, exc: BaseException, terminate: bool) -> None:
        self._status("failed")
        self.client.set_tag(
            self.run_id, "rayhybrid.eval_error", f"{type(exc).__name__}: {exc}"[:4000]
        )
        if terminate:
            self.client.set_terminated(self.run_id, "FAILED")


def _start_shards(cfg: Config, tasks: Sequence[EvalTask]) -> ActorShards:
    """Empty shard actors for every candidate language of ``tasks``, started now so that
    their start-up overlaps with encoding; the job's tasks and settings all use them."""
    from collections import Counter

    from rayhybrid.evaluation.shards import ActorShards

    # Candidates per language over the job's tasks (they run one after another), so that the
    # languages are spread over the actors by the search work they bring.
    sizes = Counter(c.lang for task in tasks for c in task.candidates)
    return ActorShards.start(
        sorted(sizes),
        index=IndexSpec.from_config(cfg.eval),
        openblas_coretype=cfg.eval.openblas_coretype,
        n_actors=cfg.eval.shard_actors,
        sizes=sizes,
    )


def _task_format(cfg: Config, name: str) -> str:
    return next((t.format for t in cfg.eval.tasks if t.name == name), "lareqa")


def evaluate_task(
    cfg: Config,
    task: EvalTask,
    model_path: str | None = None,
    fmt: str = "lareqa",
    pool: ActorShards | None = None,
) -> tuple[dict[str, float], dict[str, Any], Path]:
    """Evaluate one task on Ray (encode, shard actors, metrics, files).

    Args:
        pool: the job's shard actors (:meth:`ActorShards.start`); None: start them here
            (still overlapped with encoding) and stop them at the end.

    Returns:
        ``(metrics without task prefix, summary dict, output folder)``.

    Raises:
        EvaluationError: bad settings, top-k larger than a shard, a shard failure.
        ModelError: the model cannot be loaded.
    """
    from rayhybrid.evaluation.loading import encode_into_shards, save_embeddings
    from rayhybrid.model import embedding_dim

    settings = check_settings(cfg.eval.settings)
    if not task.queries or not task.candidates:
        raise EvaluationError(f"task {task.name}: no queries or no candidates to evaluate")
    sizes = {lang: sum(c.lang == lang for c in task.candidates) for lang in task.languages}
    smallest = min((n, lang) for lang, n in sizes.items() if n)
    if not cfg.eval.full_depth_runs and cfg.eval.top_k > smallest[0]:  # fail before encoding
        raise EvaluationError(
            f"eval.top_k={cfg.eval.top_k} is larger than shard {smallest[1]!r} of task {task.name} "
            f"({smallest[0]} candidates); lower eval.top_k to at most {smallest[0]}"
        )
    spec = IndexSpec.from_config(cfg.eval)  # its parameters against the shards, before encoding
    check_index(spec, sizes, embedding_dim(cfg.model, model_path))
    if pool is None:
        with _start_shards(cfg, [task]) as own:
            return evaluate_task(cfg, task, model_path, fmt, own)
    start = time.perf_counter()
    texts = candidate_texts(task, cfg.data.with_context, cfg.data.with_title)
    q_emb, encode_s, cached = encode_into_shards(cfg, task, texts, model_path, pool)
    folder = Path(cfg.eval.output_dir).expanduser() / task.name
    if cfg.eval.save_embeddings:
        save_embeddings(folder / "embeddings.npz", task, q_emb, pool)
    index = {"type": spec.kind, "params": check_index(spec, sizes, q_emb.shape[1])}
    search_start = time.perf_counter()
    retrieval = run_settings(
        pool,
        task,
        q_emb,
        settings,
        cfg.eval.top_k,
        full_depth=cfg.eval.full_depth_runs,
        progress=True,
    )
    if spec.approximate and cfg.eval.index_params.recall_queries:
        index["recall"] = _index_recall(pool, task, q_emb, cfg, settings)
    search_s = time.perf_counter() - search_start
    names = BEIR_METRICS if fmt == "beir" else LAREQA_METRICS
    cands = retrieval.candidates
    metrics, counts = summarize(retrieval.blocks, cands.langs, names, cfg.eval.top_k)
    tables = per_query_tables(retrieval.blocks, retrieval.query_ids, cands.langs, names)
    intervals = interval_metrics(
        tables,
        samples=cfg.eval.bootstrap_samples,
        level=cfg.eval.ci_level,
        seed=cfg.eval.bootstrap_seed,
    )
    for key, ci in intervals.items():  # interval ends of every macro figure, as metrics too
        metrics[f"{key}/ci_low"], metrics[f"{key}/ci_high"] = ci["low"], ci["high"]
    timing = {"encode_s": encode_s, "search_s": search_s, "total_s": time.perf_counter() - start}
    files = write_per_query(tables, folder)
    summary = _write_outputs(
        task,
        retrieval,
        metrics,
        counts,
        folder,
        model_path or cfg.model.name,
        timing,
        files,
        {
            "level": cfg.eval.ci_level,
            "resampled": "parallel items (all language versions together)",
            "samples": cfg.eval.bootstrap_samples,
            "values": intervals,
        },
        embedding_cache=cached,
        index=index,
    )
    metrics.update({f"time/{k}": v for k, v in timing.items()})
    return metrics, summary, folder


def _write_outputs(
    task: EvalTask,
    retrieval: Retrieval,
    metrics: dict[str, float],
    counts: dict,
    folder: Path,
    model: str,
    timing: dict[str, float],
    files: dict[str, str],
    intervals: dict[str, Any],
    embedding_cache: dict[str, str] | None = None,
    index: dict[str, Any] | None = None,
) -> dict:
    from rayhybrid.evaluation.outputs import cross_matrix, write_summary, write_trec
    from rayhybrid.experiments.plots import plot_language_matrices, plot_per_language

    tag = f"rayhybrid_{Path(model).name}"
    for setting, blocks in retrieval.blocks.items():
        run_path, qrels_path = write_trec(
            blocks, setting, retrieval.query_ids, retrieval.candidates.ids, folder, tag
        )
        files[f"{setting}_run"], files[f"{setting}_qrels"] = str(run_path), str(qrels_path)
    langs = task.languages
    title = f"{task.name}: {Path(model).name}"
    matrices = {name: cross_matrix(metrics, langs, name) for name in ("map", "map_at_20")}
    for key, path in (
        (
            "heatmap",
            plot_language_matrices(matrices, langs, folder / "cross_heatmap.png", title=title),
        ),
        ("per_language", plot_per_language(metrics, langs, folder / "per_language.png", title)),
    ):
        if path is not None:
            files[key] = str(path)
    summary = {
        "task": task.name,
        "model": _model_reference(model, folder),
        "settings": list(retrieval.blocks),
        "top_k": retrieval.top_k,
        "full_depth_runs": retrieval.full_depth,
        "languages": langs,
        "queries": {lang: sum(q.lang == lang for q in task.queries) for lang in langs},
        "candidates": {lang: sum(c.lang == lang for c in task.candidates) for lang in langs},
        "metrics": metrics,
        "intervals": intervals,
        "cells": counts,
        "timing_s": timing,
        "embedding_cache": embedding_cache or {},
        "index": index or {"type": "flat"},
        "files": files,
        "load_report": task.report.summary(),
    }
    write_summary(summary, folder / "summary.json")
    return summary


def _model_reference(model: str, folder: Path) -> str:
    """A local model folder relative to ``folder`` (where summary.json lies), so the record
    still points at the model after the run and output folders move or are copied to another
    machine; a hub name as given."""
    import os

    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    return os.path.relpath(path.resolve(), Path(folder).resolve())


def evaluate(
    cfg: Config,
    model_path: str | None = None,
    tasks: Sequence[EvalTask] | None = None,
    run_id: str | None = None,
    step: int = 0,
    tracking: Any = None,
) -> dict[str, float]:
    """Evaluate a model on every configured task; log to MLflow.

    Args:
        cfg: the config (``eval``, ``model``, ``data`` max lengths, ``tracking``).
        model_path: model folder or name (default ``cfg.model.name``).
        tasks: already loaded tasks (default: load ``cfg.eval.tasks``).
        run_id: log into this existing MLflow run (e.g. the training run) instead of a new one.
        step: the training step the model belongs to (MLflow step of the logged metrics).
        tracking: with ``run_id``, the training's :class:`~rayhybrid.tracking.TrackingGuard`:
            MLflow calls go through it to the training's store, and a failing store queues
            the metrics in its unsent file instead of failing the evaluation.

    Returns:
        Flat metrics ``<task>/<setting>/<cell>/<metric>``, ``<task>/<setting>/<metric>``
        (macro-averages), ``<task>/bias/...``, counts and timings.

    Raises:
        EvaluationError, DataError, ModelError: bad input (the MLflow run is marked FAILED).
    """
    from rayhybrid.cluster import ensure_ray
    from rayhybrid.corpus import load_eval_task

    model = model_path or cfg.model.name
    tracker = _Tracker(cfg, run_id, model, step, guard=tracking)
    out: dict[str, float] = {}
    folders: dict[str, Path] = {}
    try:
        ensure_ray()
        pending = (
            list(tasks)
            if tasks is not None
            else [load_eval_task(t, cfg.data) for t in cfg.eval.tasks]
        )
        with _start_shards(cfg, pending) as pool:  # once per job, before the first encoding
            for task in pending:
                log.info(
                    f"[rayhybrid eval] task {task.name}: {len(task.queries)} queries, "
                    f"{len(task.candidates)} candidates, languages {task.languages}"
                )
                metrics, summary, folder = evaluate_task(
                    cfg, task, model_path, _task_format(cfg, task.name), pool
                )
                flat = {f"{task.name}/{k}": v for k, v in metrics.items()}
                tracker.log(flat, folder, f"eval/{task.name}")
                out.update(flat)
                folders[task.name] = folder
                log.info(_headline(task.name, metrics, folder, summary.get("index")))
        if cfg.eval.resource_groups:  # every metric per language group, over all tasks
            from rayhybrid.evaluation.groups import write_groups

            flat, gfolder = write_groups(
                folders,
                {g.name: g.languages for g in cfg.eval.resource_groups},
                Path(cfg.eval.output_dir).expanduser(),
                samples=cfg.eval.bootstrap_samples,
                level=cfg.eval.ci_level,
                seed=cfg.eval.bootstrap_seed,
            )
            tracker.log(flat, gfolder, "eval/resource_groups")
            out.update(flat)
            log.info(f"[rayhybrid eval] resource groups: {gfolder / 'resource_groups.md'}")
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish()
    return out


def _index_recall(
    pool: Any, task: EvalTask, q_emb: np.ndarray, cfg: Config, settings: Sequence[str]
) -> dict[str, Any]:
    """recall@top_k of the approximate index against exact search (:mod:`recall`)."""
    from rayhybrid.evaluation.recall import measure_recall

    p = cfg.eval.index_params
    report = measure_recall(
        pool,
        q_emb,
        [q.lang for q in task.queries],
        cfg.eval.top_k,
        p.recall_queries,
        p.seed,
        settings,
    )
    report["query_ids"] = [task.queries[i].id for i in report.pop("rows")]
    return report


def _headline(
    name: str, metrics: dict[str, float], folder: Path, index: dict[str, Any] | None = None
) -> str:
    lines = [f"[rayhybrid eval] {name}: outputs in {folder}"]
    if index and "recall" in index:  # what the approximate top-k cost
        r = index["recall"]
        lines.append(
            f"  index {index['type']}: recall@{r['k']} against exact search "
            + " ".join(f"{s} {v:.4f}" for s, v in r["recall_at_k"].items())
            + f" ({r['queries']} sampled queries; metrics use exact ranks)"
        )
    for setting in ("mono", "cross", "multi"):
        if f"{setting}/map" in metrics:
            lines.append(
                f"  {setting:5s} mAP {metrics[f'{setting}/map']:.4f}  mAP@20 "
                f"{metrics[f'{setting}/map_at_20']:.4f}  R@1 {metrics[f'{setting}/r_at_1']:.4f}  "
                f"R@10 {metrics[f'{setting}/r_at_10']:.4f}  MRR {metrics[f'{setting}/mrr']:.4f}"
                + "".join(
                    f"  {label} {metrics[f'{setting}/{key}']:.4f}"
                    for key, label in (("ndcg_at_10", "nDCG@10"), ("mrr_at_10", "MRR@10"))
                    if f"{setting}/{key}" in metrics
                )
            )
    if "bias/rank_distance" in metrics:
        lines.append(
            f"  rank distance {metrics['bias/rank_distance']:.1f} (macro), "
            f"{metrics['bias/rank_distance_micro']:.1f} (micro), "
            f"{metrics['bias/rank_distance_median']:.1f} (median)"
        )
    return "\n".join(lines)


def _cli_tasks(cfg: Config, task: str | None, data: str | None) -> tuple[TaskConfig, ...]:
    from rayhybrid.config import ConfigError, TaskConfig

    if task is None and data is None:
        return cfg.eval.tasks
    if task is None or data is None:
        raise ConfigError("--task and --data go together (or configure eval.tasks instead)")
    if task not in ("lareqa", "beir"):
        raise ConfigError(f"--task: expected lareqa or beir, got {task!r}")
    base = cfg.eval.tasks[0] if cfg.eval.tasks else TaskConfig()
    name = Path(data.rstrip("/")).name.lower().replace("-", "_") or "task"
    if task == "beir" and not base.language:
        raise ConfigError(
            "--task beir needs the folder's language: add eval.tasks=[{language: xx}] "
            "or configure eval.tasks"
        )
    # A folder named on the command line is evaluated whole (zero-shot); held-out parts of a
    # training corpus are configured in eval.tasks (part: test / dev).
    return (
        TaskConfig(
            name=name,
            format=task,
            path=data,
            languages=base.languages,
            part="all",
            language=base.language,
            qrels_split=base.qrels_split,
        ),
    )


def evaluate_cli(
    cfg: Config, model: str | None = None, task: str | None = None, data: str | None = None
) -> int:
    """``rayhybrid evaluate``: evaluate ``model`` (default model.name) on ``--task/--data``
    (the whole folder) or on ``eval.tasks``. Returns the exit status.

    Raises:
        ConfigError: --task without --data, unknown task format.
        EvaluationError, DataError, ModelError: bad input.
    """
    import dataclasses

    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, tasks=_cli_tasks(cfg, task, data))
    )
    metrics = evaluate(cfg, model)
    return 0 if metrics else 1
