"""Ray Tune over the mixing ratio alpha (optionally learning rate and tau), scored on the dev split.

Ray Train V2 layout (DESIGN.md, "Ray versions"): every Tune trial runs a small driver
function that calls :func:`rayhybrid.train.driver.train`, which builds the ``TorchTrainer``;
Ray Tune's ``TuneReportCallback`` forwards what rank 0 reports to Tune. At every
validation point rank 0 also retrieves on the dev split (the articles after the training
ones, never the test split) and adds ``dev/...`` metrics and the objective to its report,
so ASHA can stop weak trials early.

Each trial is a nested MLflow run under one parent run. The job ends with a results table
(markdown + CSV), a plot of alpha against mono / cross / multilingual quality and rank
distance, and the best trial's config as YAML, all logged to the parent run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayhybrid._io import write_json_atomic
from rayhybrid.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_strategy,
)
from rayhybrid.tuning import TuneError
from rayhybrid.tuning.space import (
    DEV_PREFIX,
    OBJECTIVE_KEY,
    STEP_KEY,
    dev_key,
    parse_objective,
    search_axes,
)

__all__ = [
    "TIMED_OUT",
    "baseline_alpha",
    "continue_started_trial",
    "dev_per_query_dir",
    "dev_report_fn",
    "dev_task",
    "run_tune",
    "trial_config",
]

log = logging.getLogger(__name__)
TIMED_OUT = "trial timed out"  # starts the error of a trial past tune.trial_timeout_s


# --------------------------------------------------------------------------- trials


def trial_config(base: Config, params: dict[str, Any], trial_name: str, exp_dir: str) -> Config:
    """The training config of one trial: the sweep's values on top of ``base``.

    Batches are ``hybrid`` (alpha 0 is all cross-lingual, 1 all monolingual); the trial's
    Train run lives under the experiment folder so a restore finds it; the end-of-training
    test evaluation is off (tuning looks at the dev split only). Train workers get the
    trial's CPUs / GPUs.
    """
    t = base.tune
    workers = base.train.num_workers
    overrides: dict[str, Any] = {
        "batch.strategy": "hybrid",
        "train.run_name": trial_name,
        "train.storage_path": str(Path(exp_dir) / "train_runs"),
        "train.overwrite": True,
        "train.resume": False,
        "train.cpus_per_worker": t.cpus_per_trial / workers,
        "train.use_gpu": t.gpus_per_trial > 0,
        "eval.at_end_of_training": False,
    }
    overrides.update(params)
    return apply_overrides(base, overrides)


def continue_started_trial(tcfg: Config) -> Config:
    """A trial restarted after an interruption continues its own training run.

    :func:`trial_config` replaces the run folder (``train.overwrite``): right for a fresh
    trial, whose folder may hold a run of an earlier sweep's trial of this id. A trial that
    already started this sweep has written its resolved config (``rayhybrid_run.json``); it
    resumes from its newest complete checkpoint into the same MLflow run instead of starting
    again at step 0 and deleting its checkpoints.
    """
    from rayhybrid.config import resolve_path
    from rayhybrid.train.checkpoint import RunPaths

    root = Path(resolve_path(tcfg.train.storage_path)).expanduser() / tcfg.train.run_name
    if not RunPaths(str(root)).run_file.is_file():
        return tcfg
    log.info(f"[rayhybrid tune] trial {tcfg.train.run_name} continues its run in {root}")
    return apply_overrides(tcfg, {"train.resume": True, "train.overwrite": False})


def _train_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, ended with a :class:`TuneError` after ``seconds`` (0: no limit).

    A hung training (a worker stuck in a collective, a stalled stream) reports nothing, so no
    Tune stopper would ever see it; Tune has no per-trial clock. ``fn`` runs in a daemon
    thread of the trial's process and this function stops waiting for it: the trial then
    errors, and Tune ends its process, which takes its Ray Train controller and workers
    with it (actors share their owner's fate).
    """
    if not seconds:
        return fn()
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="rayhybrid-trial", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TuneError(
            f"{TIMED_OUT} after tune.trial_timeout_s={seconds:g} s (hung or too slow); its "
            "checkpoints are kept, and a restored sweep does not rerun it"
        )
    if "error" in box:
        raise box["error"]
    return box["result"]


def dev_task(cfg: Config) -> Any:
    """The dev split of the training corpus as an evaluation task (never the test split).

    A LAReQA source loads through the task loader (every sentence of a paragraph is a
    candidate); other sources become a task of their dev items / pairs.

    Raises:
        DataError: the dev split is empty or the source is malformed.
    """
    from rayhybrid.config import TaskConfig
    from rayhybrid.corpus import load_eval_task, load_training_data, task_from_items

    fmt = cfg.data.format
    if fmt == "lareqa":
        task_cfg = TaskConfig(
            name="dev", format=fmt, path=cfg.data.path, languages=cfg.data.languages, part="dev"
        )
        return load_eval_task(task_cfg, cfg.data)
    data = load_training_data(cfg.data, part="dev")
    return task_from_items("dev", data.items, data.pairs, cfg.data.languages)


def dev_per_query_dir(cfg: Config) -> Path:
    """Where a trial keeps the per-query dev values of its latest validation point (the
    values its table row shows), for the paired tests between trials."""
    from rayhybrid.config import resolve_path

    return Path(resolve_path(cfg.train.storage_path)).expanduser() / cfg.train.run_name / "dev"


def dev_report_fn(cfg: Config) -> Callable[..., dict[str, float]]:
    """The hook rank 0 calls at every validation point (``train(extra_report_fn=...)``).

    Called as ``fn(model, tokenizer, cfg, step)`` by the training loop.

    It retrieves on the dev split with the model being trained and returns ``dev/...``
    metrics, the objective and the step, which go into that ``ray.train.report`` and
    from there to Tune (and to the trial's MLflow run).
    """
    cfg_dict = config_to_dict(cfg)
    state: dict[str, Any] = {}

    def report(model: Any, tokenizer: Any, _cfg: Any, step: int) -> dict[str, float]:
        from rayhybrid.evaluation.inprocess import evaluate_in_process

        c = config_from_dict(cfg_dict)
        if "task" not in state:  # loaded once per worker, on the first validation point
            state["task"] = dev_task(c)
        was_training = model.training
        try:
            dev = evaluate_in_process(
                model,
                tokenizer,
                state["task"],
                c.model,
                c.eval.settings,
                20,
                max_query_length=c.data.max_query_length,
                max_passage_length=c.data.max_passage_length,
                with_context=c.data.with_context,
                with_title=c.data.with_title,
                per_query_dir=dev_per_query_dir(c),
            )
        finally:
            model.train(was_training)  # encoding switches to eval mode; training needs dropout back
        objective = parse_objective(c.tune.objective, c.eval.settings)
        # Macro averages and bias only (``setting/metric``); per-language cells stay out of the
        # Tune results (110 cross-lingual pairs x every metric would bury the objective).
        out = {
            dev_key(k): float(v)
            for k, v in dev.items()
            if k.count("/") == 1
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
        }
        out[OBJECTIVE_KEY] = objective.value(dev)
        # ASHA's clock. Left out at the last step: ASHA stops every trial that reaches its
        # max_t, which would kill the trial before it exports its model and closes its run.
        if step < c.train.max_steps:
            out[STEP_KEY] = float(step)
        return out

    return report


# --------------------------------------------------------------------------- the job


# The trial driver only waits on its TorchTrainer, whose workers reserve the trial's CPUs;
# Tune needs a non-empty bundle, so the driver asks for a token amount of memory, no CPU.
_DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


def _trial_driver(
    params: dict[str, Any],
    *,
    base: dict,
    parent_run_id: str | None,
    exp_dir: str,
    quiet: bool = False,
) -> dict[str, Any]:
    """One Tune trial: train with the trial's values, reporting dev metrics to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayhybrid.console import quiet_trial
    from rayhybrid.train.driver import train

    quiet_trial(quiet)  # the command's console choice, in this process and the trainer's

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = config_from_dict(base)
    tcfg = trial_config(cfg, params, f"{cfg.tune.name}_{trial_id}", exp_dir)
    # A sweep interrupted after this trial's training returned but before Tune recorded it
    # restarts the trial on restore; its training is done, so hand back what it gave.
    done_file = Path(exp_dir) / "trial_results" / f"{tcfg.train.run_name}.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
    tcfg = continue_started_trial(tcfg)
    result = _train_within(
        tcfg.tune.trial_timeout_s,
        lambda: train(
            tcfg,
            callbacks=[TuneReportCallback()],
            parent_run_id=parent_run_id,
            extra_report_fn=dev_report_fn(tcfg),
        ),
    )
    # The returned dict is the trial's last result: the final dev metrics (for search
    # algorithms, which read the last result) without ASHA's clock, and the MLflow run.
    final = {
        "mlflow_run_id": result.mlflow_run_id or "",
        "run_dir": str(result.run_dir),
        "step": result.metrics.get("step"),
        "trial_done": 1,
    }
    if result.mlflow_run_id:
        from rayhybrid.tracking import mlflow_client, resolve_tracking_uri

        logged = mlflow_client(resolve_tracking_uri(tcfg.tracking)).get_run(result.mlflow_run_id)
        final.update(
            {
                k.removeprefix("val/"): v
                for k, v in logged.data.metrics.items()
                if k.startswith("val/" + DEV_PREFIX) and k != "val/" + STEP_KEY
            }
        )
    done_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(done_file, final)  # read back as "this trial is done": never half
    return final


def _exp_dir(cfg: Config) -> Path:
    from rayhybrid.config import resolve_path

    return Path(resolve_path(cfg.tune.storage_path)).expanduser().resolve() / cfg.tune.name


def _check_restore(cfg: Config, exp_dir: Path) -> bool:
    """True when the sweep continues an earlier one.

    Raises:
        TuneError: ``tune.resume`` without a restorable sweep, or a new sweep over an old one.
    """
    from ray import tune

    exists = exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))
    if cfg.tune.resume and not exists:
        raise TuneError(
            f"tune.resume = true but {exp_dir} holds no sweep to restore; drop "
            "tune.resume to start one"
        )
    if not cfg.tune.resume and exp_dir.exists() and any(exp_dir.iterdir()):
        raise TuneError(
            f"{exp_dir} already holds a sweep named {cfg.tune.name!r}: continue it "
            "with tune.resume=true, or choose another tune.name / tune.storage_path"
        )
    return cfg.tune.resume


def baseline_alpha(cfg: Config) -> float | None:
    """The alpha of ``cfg.baseline`` (``0.5`` or ``hybrid(0.5)``); None when unset.

    Raises:
        TuneError: not a number.
    """
    if cfg.baseline == "":
        return None
    text = str(cfg.baseline).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:  # hybrid(0.5) / hybrid:0.5, parsed as a strategy entry is
        spec = parse_strategy(text, cfg.batch.alpha, "baseline")
    except ConfigError:
        spec = None
    if spec is None or spec.strategy != "hybrid" or text == "hybrid":
        raise TuneError(
            f"baseline = {cfg.baseline!r}: tune compares trials by alpha; expected "
            "an alpha such as 0.5"
        )
    return spec.alpha


def _check_baseline(cfg: Config, axes: dict[str, list[Any]]) -> None:
    """``baseline`` must be an alpha of the sweep (before any trial starts).

    Raises:
        TuneError: not a number, or not among the swept alphas.
    """
    alpha = baseline_alpha(cfg)
    if alpha is None:
        return
    alphas = axes.get("batch.alpha", [cfg.batch.alpha])
    if cfg.tune.search == "grid" and alpha not in alphas:
        raise TuneError(
            f"baseline = {cfg.baseline!r} is not a row of the sweep; expected one "
            f"of the alphas {alphas}"
        )


def _scheduler(cfg: Config) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if cfg.tune.scheduler == "none":
        return FIFOScheduler()
    objective = parse_objective(cfg.tune.objective, cfg.eval.settings)
    max_t = cfg.train.max_steps
    # Time is the training step of the dev report; the first cut comes after two validations.
    grace = min(max_t, 2 * cfg.train.eval_every)
    return AsyncHyperBandScheduler(
        time_attr=STEP_KEY,
        metric=OBJECTIVE_KEY,
        mode=objective.mode,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=2,
    )


def run_tune(cfg: Config, *, callbacks: Any = ()) -> Any:
    """Run (or continue) the sweep; return the results table.

    Args:
        cfg: the config; ``cfg.tune`` holds the space, objective, scheduler and resources.
        callbacks: extra Ray Tune callbacks (progress, notifications). Tune saves them with
            the sweep: a restored sweep uses the ones it started with.

    Returns:
        :class:`rayhybrid.experiments.results.ResultsTable` with one row per trial (failed ones too).

    Raises:
        TuneError: invalid space or setup (before anything starts).
        ConfigError: an extra grid value has the wrong type.
    """
    import os

    from ray import tune

    from rayhybrid.cluster import ensure_ray
    from rayhybrid.console import is_quiet
    from rayhybrid.tuning.progress import trial_lines_callback
    from rayhybrid.tuning.report import (
        add_significance,
        close_trial_runs,
        collect_table,
        finish_parent,
        start_parent,
        write_outputs,
    )
    from rayhybrid.tuning.space import param_space

    axes = search_axes(cfg)
    _check_baseline(cfg, axes)
    space, search_alg, num_samples = param_space(cfg, axes)
    exp_dir = _exp_dir(cfg)
    ensure_ray()
    restoring = _check_restore(cfg, exp_dir)
    parent_run_id = start_parent(cfg, exp_dir, axes, restoring)
    # Reports between validation points carry no dev metric; Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial_driver,
            base=config_to_dict(cfg),
            parent_run_id=parent_run_id,
            exp_dir=str(exp_dir),
            quiet=is_quiet(),
        ),
        _DRIVER_RESOURCES,
    )
    # Quiet console: the project's trial lines instead of Tune's status tables (verbose=0).
    quiet = is_quiet()
    callbacks = [
        *callbacks,
        trial_lines_callback(
            math.prod(len(v) for v in axes.values()) if cfg.tune.search == "grid" else num_samples
        ),
    ]
    if restoring:
        log.info(
            f"[rayhybrid tune] restoring {exp_dir}: finished trials are kept, unfinished ones rerun"
        )
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            param_space=space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(cfg),
                search_alg=search_alg,
                num_samples=num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=cfg.tune.name,
                storage_path=str(exp_dir.parent),
                callbacks=list(callbacks),
                verbose=0 if quiet else None,
            ),
        )
    grid = tuner.fit()
    table = collect_table(grid, cfg, axes)
    add_significance(table, cfg, exp_dir)
    close_trial_runs(cfg, parent_run_id, table)
    paths = write_outputs(table, cfg, axes)
    finish_parent(cfg, parent_run_id, table, paths)
    if any(str(r.get("status", "")).startswith("unfinished") for r in table.rows):
        log.warning(
            f"[rayhybrid tune] the sweep was interrupted; continue it with the same command and "
            f"tune.resume=true (finished trials are kept): {exp_dir}"
        )
    log.info(f"[rayhybrid tune] table, plot and best config in {paths['markdown'].parent}")
    return table
