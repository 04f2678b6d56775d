"""Training driver: check the config, prepare the run, launch Ray Train, log to MLflow.

:func:`train` is what ``rayhybrid train``, ``jobs/train.py``, the quickstart and Tune's
driver function call. Everything that can be checked before Ray Train starts (config
values, model name, run folder, batch plan against the data) is checked here, so a bad
setting gives one clear :class:`TrainingError` / ``ConfigError`` / ``ModelError``
instead of a worker stack trace. The per-worker loop is :mod:`rayhybrid.train.worker`;
run folder and checkpoint layout are in :mod:`rayhybrid.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayhybrid.config import Config, ConfigError, config_to_dict
from rayhybrid.console import is_quiet
from rayhybrid.model import TINY, ModelError, build_tiny_model, resolve_model_path
from rayhybrid.train import TrainingError, TrainingStopped
from rayhybrid.train.checkpoint import (
    RunLock,
    RunPaths,
    check_resume_config,
    latest_checkpoint,
    prepare_run_dir,
    read_run_file,
    remove_replaced,
    write_run_file,
)
from rayhybrid.train.worker import TrainHooks

__all__ = [
    "TrainHooks",
    "TrainResult",
    "TrainingError",
    "TrainingStopped",
    "train",
    "train_and_evaluate",
]

MAX_VAL_BATCHES = 16  # validation steps: the cost stays bounded on large dev splits
MAX_TOKENIZER_TEXTS = 200_000  # texts used to train the tiny model's tokenizer


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    run_dir: Path
    model_dir: Path
    mlflow_run_id: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    # The TrackingGuard that closed the MLflow run (None without tracking): the end-of-training
    # evaluation logs through it, so a store that failed is not waited on again and the
    # evaluation's metrics join the training's in the run folder's unsent queue.
    tracking: Any = None

    def summary(self) -> str:
        m = self.metrics
        lines = [
            f"run folder:  {self.run_dir}",
            f"model:       {self.model_dir}  (transformers / sentence-transformers format)",
            f"steps:       {m.get('step')}"
            + ("  (stopped early)" if m.get("stopped_early") else "")
            + ("  (resumed)" if self.resumed else ""),
        ]
        if m.get("best_step", -1) >= 0:
            lines.append(f"best val loss: {m['best_val_loss']:.4f} at step {m['best_step']}")
        if m.get("step_time_median_s") and not math.isnan(m["step_time_median_s"]):
            lines.append(f"median step:  {m['step_time_median_s']:.3f} s")
        if self.mlflow_run_id:
            lines.append(f"MLflow run:  {self.mlflow_run_id}")
        if self.tracking is not None and not self.tracking.ok:
            lines.append(
                f"MLflow:      {self.tracking.tracking_uri} failed ({self.tracking.failure}); "
                f"metrics not sent are kept in {self.tracking.spill_path} "
                "(rayhybrid.tracking.resend_unsent logs them when the server is back)"
            )
        return "\n".join(lines)


def _training_texts(data: Any) -> list[str]:
    texts: list[str] = []
    for item in data.items:
        texts.extend(item.queries.values())
        texts.extend(v[0] for v in item.positives.values() if v)
    for p in data.pairs:
        texts.extend((p.query, p.passage))
    return texts[:MAX_TOKENIZER_TEXTS]


def _model_source(cfg: Config, paths: RunPaths, data: Any) -> str:
    """Folder or name the workers load: the run's tiny model, or the configured model (checked).

    Raises:
        ModelError: the model name is neither a local folder nor available from the hub.
    """
    if cfg.model.name == TINY:
        if not (paths.init_model / "config.json").is_file():  # a resumed run keeps its own
            build_tiny_model(
                cfg.model, _training_texts(data), paths.init_model, seed=cfg.batch.seed
            )
        return str(paths.init_model)
    target = resolve_model_path(cfg.model.name)
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(target)
        AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.name={cfg.model.name!r} is neither a local folder nor available "
            f"from the Hugging Face hub (offline, or no such model): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return target


def _start_mlflow(
    cfg: Config, paths: RunPaths, parent_run_id: str | None, resumed: bool
) -> dict | None:
    """Create (or reattach to) the run's MLflow run; log params and the resolved config."""
    if not cfg.tracking.enabled:
        return None
    import yaml

    from rayhybrid.tracking import config_params, create_run, mlflow_client, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    client = mlflow_client(uri)
    run_id = read_run_file(paths).get("mlflow_run_id") if resumed else None
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if run_id:  # params are immutable in MLflow: a resumed run keeps its first config's params
        client.update_run(run_id, status="RUNNING")
        client.log_text(run_id, config_yaml, f"config_resumed_{os.getpid()}.yaml")
    else:
        from rayhybrid.tracking import run_tags

        tags = run_tags(cfg, "train")
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = create_run(
            uri, cfg.tracking.experiment, cfg.train.run_name, tags=tags, params=config_params(cfg)
        )
        client.log_text(run_id, config_yaml, "config.yaml")
        write_run_file(paths, mlflow_run_id=run_id, tracking_uri=uri)
    return {"tracking_uri": uri, "run_id": run_id}


def _finish_mlflow(
    spec: dict | None, paths: RunPaths, metrics: dict, status: str, register_as: str = ""
) -> Any:
    """Model (an MLflow sentence-transformers model, registered as ``register_as`` when given),
    final metrics, run status; a failing store costs a message, not the run.

    Returns:
        The :class:`~rayhybrid.tracking.TrackingGuard` the calls went through (None without
        tracking).
    """
    if spec is None:
        return None
    from rayhybrid.tracking import TrackingGuard, log_model, mlflow_client

    client, run_id = mlflow_client(spec["tracking_uri"]), spec["run_id"]
    guard = TrackingGuard(spec["tracking_uri"], spill_path=paths.mlflow_unsent)
    if status == "FINISHED" and paths.final_model.is_dir():
        guard.call(
            "log the model",
            log_model,
            spec["tracking_uri"],
            run_id,
            paths.final_model,
            step=int(metrics.get("step") or 0),
            registered_name=register_as,
        )
        for key in ("best_val_loss", "step_time_median_s"):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                guard.call(
                    "log final metrics",
                    client.log_metric,
                    run_id,
                    f"final/{key}",
                    float(value),
                    records=[
                        {
                            "key": f"final/{key}",
                            "value": float(value),
                            "step": metrics.get("step", 0),
                        }
                    ],
                )
    guard.call("close the run", client.set_terminated, run_id, status)
    return guard


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict]:
    """SIGTERM (``ray job stop``, a scheduler's preemption) raises ``KeyboardInterrupt``.

    ``KeyboardInterrupt`` is the one exception a signal handler can raise through a blocking
    ``ray.get`` (``TorchTrainer.fit`` waits in one): any other type comes out as a
    ``SystemError``. The dict yielded records which signal arrived. Only the main thread can
    install a handler; elsewhere (a Tune trial's driver thread) nothing changes.
    """
    received: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: Any) -> None:
        received["signal"] = signum
        # One stop is enough: a second SIGTERM must not interrupt the MLflow close. SIGKILL
        # (ray job stop after RAY_JOB_STOP_WAIT_TIME_S) still ends the process.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        # None: the previous handler was not Python's (Ray's C++ one); the default then.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _check_dev_plan(cfg: Config) -> Any:
    """The dev split, checked to fill the validation plan (before the run folder is touched).

    Raises:
        TrainingError: the dev split cannot fill one batch of the strategy.
    """
    from rayhybrid.config import BatchPlanError
    from rayhybrid.corpus import load_training_data
    from rayhybrid.stream import validation_plan

    dev = load_training_data(cfg.data, part="dev")
    try:
        validation_plan(cfg, dev, cfg.train.num_workers)
    except BatchPlanError as exc:
        raise TrainingError(
            f"validation on the dev split: {exc}; raise data.dev_fraction or set train.eval_every=0"
        ) from None
    return dev


def train(
    cfg: Config,
    *,
    callbacks: Sequence[Any] = (),
    parent_run_id: str | None = None,
    extra_report_fn: Callable[..., dict] | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Fine-tune the configured bi-encoder with Ray Train on the hybrid batch stream.

    Args:
        cfg: the whole config (data, batch, model, train, tracking sections are used).
        callbacks: Ray Train ``UserCallback`` objects for ``RunConfig(callbacks=...)``.
        parent_run_id: make the MLflow run a child of this run (Tune trials).
        extra_report_fn: ``fn(model, tokenizer, cfg, step) -> dict`` of extra metrics run on
            rank 0 at every validation (or at the end without validation); the values go to
            ``ray.train.report`` and MLflow. Must be picklable.
        hooks: test hooks (fault injection, batch log); None in normal use.

    Returns:
        :class:`TrainResult` with the run folder, the exported model and the final metrics.

    Raises:
        ConfigError: bad training, batch or data settings (checked before Ray starts).
        TrainingError: unusable run folder, too small a dev split, or the run failed.
        ModelError: the model cannot be found.
        DataError: the training data cannot be read.
    """
    # Not a schema rule: tune refuses the same setting with its own TuneError first.
    if cfg.train.eval_every and cfg.data.dev_fraction <= 0:
        raise ConfigError("train.eval_every > 0 needs a dev split: set data.dev_fraction > 0")
    from rayhybrid.batching import BatchPlan, units_from
    from rayhybrid.corpus import load_training_data

    data = load_training_data(cfg.data, part="train")
    nw = cfg.train.num_workers
    BatchPlan(
        cfg.batch, units_from(data.items, data.pairs, cfg.data.languages), nw
    )  # BatchPlanError
    dev = _check_dev_plan(cfg) if cfg.train.eval_every else None
    # A bad model name fails before the run folder is touched; the tiny model lives in it.
    model_path = None if cfg.model.name == TINY else _model_source(cfg, RunPaths(""), data)
    paths, resumed = prepare_run_dir(cfg.train)
    with RunLock(paths):
        check_resume_config(paths, config_to_dict(cfg), resumed)
        result = _train_locked(
            cfg,
            data,
            dev,
            model_path,
            paths,
            resumed,
            hooks,
            parent_run_id,
            extra_report_fn,
            callbacks,
        )
    remove_replaced(paths)  # the run train.overwrite replaced, now that this one finished
    return result


def _train_locked(
    cfg: Config,
    data,
    dev,
    model_path: str | None,
    paths: RunPaths,
    resumed: bool,
    hooks: TrainHooks | None,
    parent_run_id: str | None,
    extra_report_fn,
    callbacks,
) -> TrainResult:
    """:func:`train` once the run folder is ready and locked.

    Raises:
        TrainingStopped: SIGTERM / Ctrl-C; the MLflow run is closed KILLED (with its end time)
            first, then the lock is released; checkpoints already complete are kept.
    """
    nw = cfg.train.num_workers
    model_path = model_path or _model_source(cfg, paths, data)
    from rayhybrid.stream import validation_batches

    # The validation steps of the dev plan, tokenized as the stream tokenizes training steps.
    val_batches = (
        [] if dev is None else validation_batches(cfg, dev, model_path, nw, MAX_VAL_BATCHES)
    )
    hooks = hooks or TrainHooks()
    if hooks.batch_log:
        Path(hooks.batch_log).mkdir(parents=True, exist_ok=True)

    from rayhybrid.cluster import ensure_ray

    ensure_ray()
    # After ray.init, which installs Ray's own SIGTERM handler (it aborts the process).
    with _stop_signals() as received:
        return _run(
            cfg,
            data,
            model_path,
            paths,
            resumed,
            parent_run_id,
            received,
            {
                "val_batches": val_batches,
                "hooks": hooks,
                "extra_report_fn": extra_report_fn,
            },
            callbacks,
        )


def _run(
    cfg: Config,
    data,
    model_path: str,
    paths: RunPaths,
    resumed: bool,
    parent_run_id,
    received: dict,
    extra: dict,
    callbacks,
) -> TrainResult:
    """The stream, the MLflow run and the fit; a stop signal closes the MLflow run KILLED."""
    from rayhybrid.stream import build_train_datasets

    nw = cfg.train.num_workers
    start = latest_checkpoint(paths)[0] if resumed else 0  # the workers restore the same one
    datasets = build_train_datasets(cfg, data, model_path, nw, start_step=start)
    mlflow_spec = _start_mlflow(cfg, paths, parent_run_id, resumed)
    loop_config = {
        "config": config_to_dict(cfg),
        "paths": {"run_dir": paths.run_dir},
        "model_path": model_path,
        "mlflow": mlflow_spec,
        "quiet": is_quiet(),  # the workers' console follows the command's (rayhybrid.console)
        **extra,
    }
    try:
        return _fit(cfg, paths, resumed, datasets, loop_config, callbacks)
    except KeyboardInterrupt:
        # Close the run first: `ray job stop` allows RAY_JOB_STOP_WAIT_TIME_S (3 s) before
        # SIGKILL. A checkpoint being written when the signal came has no completion marker
        # and is passed over by the resume.
        _finish_mlflow(mlflow_spec, paths, {}, "KILLED")
        signum = received.get("signal", signal.SIGINT)
        raise TrainingStopped(
            f"training run {paths.root} stopped by {signal.Signals(signum).name}"
            + ("; its MLflow run is marked KILLED" if mlflow_spec else "")
            + ". Complete checkpoints are kept: continue with train.resume=true (from the "
            "newest complete one)",
            signum,
        ) from None


def _fit(
    cfg: Config,
    paths: RunPaths,
    resumed: bool,
    datasets: dict,
    loop_config: dict,
    callbacks: Sequence[Any],
) -> TrainResult:
    """Run the ``TorchTrainer`` over ``datasets``, close the MLflow run; the run's result."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayhybrid.stream import train_data_config
    from rayhybrid.train.worker import FINAL_METRICS, train_loop_per_worker

    nw, mlflow_spec = cfg.train.num_workers, loop_config["mlflow"]
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=nw, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=str(paths.root.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            # Our own step lines say what happens; Ray Train's per-report INFO lines double them.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=train_data_config(),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        _finish_mlflow(mlflow_spec, paths, {}, "FAILED")
        raise TrainingError(
            f"training run {paths.root} failed: {_first_line(exc)} (checkpoints "
            "kept; continue with train.resume=true)"
        ) from exc
    metrics = dict(result.metrics or {})
    final = paths.root / FINAL_METRICS
    if final.is_file():
        metrics.update(json.loads(final.read_text()))
    guard = _finish_mlflow(mlflow_spec, paths, metrics, "FINISHED", cfg.tracking.register_model)
    return TrainResult(
        run_dir=paths.root,
        model_dir=paths.final_model,
        mlflow_run_id=mlflow_spec["run_id"] if mlflow_spec else None,
        metrics=metrics,
        resumed=resumed,
        tracking=guard,
    )


def train_and_evaluate(cfg: Config) -> tuple[TrainResult, dict[str, float]]:
    """``rayhybrid train`` / ``jobs/train.py``: train, then evaluate the final model.

    With ``eval.at_end_of_training`` and at least one ``eval.tasks`` entry, the tasks are
    loaded before training starts (a missing or malformed task folder fails in seconds, not
    after the run), and the exported model is evaluated into the training's MLflow run, so
    one run holds the training curves and the mono / cross / multilingual metrics.

    Returns:
        The training result and the flat evaluation metrics (empty when not evaluated).

    Raises:
        Everything :func:`train` and :func:`rayhybrid.evaluation.evaluate` raise.
    """
    tasks = None
    if cfg.eval.at_end_of_training and cfg.eval.tasks:
        from rayhybrid.corpus import load_eval_task

        tasks = [load_eval_task(t, cfg.data) for t in cfg.eval.tasks]
    result = train(cfg)
    if tasks is None:
        return result, {}
    from rayhybrid.evaluation.run import evaluate

    step = int(result.metrics.get("step") or 0)  # the eval metrics belong to the last step
    # Into the training's run on the training's store, through the guard that closed it: a
    # server that went down is not swapped for another store (where the run does not exist),
    # and the evaluation still runs, writes its files and queues its metrics.
    return result, evaluate(
        cfg,
        str(result.model_dir),
        tasks=tasks,
        run_id=result.mlflow_run_id,
        step=step,
        tracking=result.tracking,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln and not ln.startswith(" ")]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:500]
