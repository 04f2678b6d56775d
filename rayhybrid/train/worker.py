"""The Ray Train worker loop: DDP bi-encoder on the hybrid batch stream.

Runs in every Ray Train worker (``TorchTrainer(train_loop_per_worker)``), built by
:func:`rayhybrid.train.driver.train`. Reads top to bottom: config back from the plain dict,
model + optimiser + schedule, restore from Ray Train's checkpoint, then one optimisation
step per global step of the stream, with validation, checkpoints and MLflow logging
(rank 0) at their intervals. Side effects (exports, MLflow) happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rayhybrid._io import write_json_atomic
from rayhybrid.config import Config, config_from_dict
from rayhybrid.console import quiet_worker
from rayhybrid.loss import gather_with_local_grad, in_batch_accuracy, info_nce
from rayhybrid.model import (
    enable_gradient_checkpointing,
    export_model,
    freeze_embeddings,
    load_biencoder,
    unwrap_model,
)
from rayhybrid.tracking import StepLogger
from rayhybrid.train import TrainingError
from rayhybrid.train.checkpoint import (
    RunPaths,
    TrainState,
    checkpoint_complete,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rayhybrid.train.optim import build_optimizer, build_scheduler
from rayhybrid.train.precision import autocast, resolve_precision
from rayhybrid.train.step import forward_backward

__all__ = ["FINAL_METRICS", "TrainHooks", "train_loop_per_worker"]

log = logging.getLogger(__name__)
FINAL_METRICS = "final_metrics.json"  # rank 0's summary, read back by the driver
KEEP_STEP_TIMES = 2  # first steps excluded from the throughput figure (allocation, warm-up)


@dataclass(frozen=True)
class TrainHooks:
    """Test hooks of a training run (``train(hooks=...)``); never needed in normal use.

    Attributes:
        fault: ``rank:step:marker``: that rank dies abruptly (``os._exit``) at that step,
            once (the marker file says it happened), like a lost node.
        batch_log: folder where every rank appends ``{step, pid, group}`` per step.
        save_fault: ``rank:step:marker``: that rank dies abruptly inside the saving of the
            checkpoint of that step (after its first file, before its completion marker), once.
    """

    fault: str = ""
    batch_log: str = ""
    save_fault: str = ""


def _validate(
    model,
    cfg: Config,
    val_batches: list[dict],
    rank: int,
    world: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Loss and in-batch accuracy of this rank's share of the fixed validation steps."""
    model.eval()
    losses, accs = [], []
    with torch.no_grad():
        for batch in val_batches:
            embs = []
            for side in ("q", "p"):
                with autocast(precision, device):
                    embs.append(
                        model(
                            batch[f"{side}_input_ids"].to(device),
                            batch[f"{side}_attention_mask"].to(device),
                        ).float()
                    )
            keys = batch.get("p_key")  # false negatives by text masked as in training
            loss, _ = info_nce(
                *embs,
                tau=cfg.train.tau,
                rank=rank,
                world_size=world,
                symmetric=cfg.train.symmetric,
                passage_keys=None if keys is None else keys.to(device),
            )
            losses.append(loss.item())
            accs.append(in_batch_accuracy(*(gather_with_local_grad(e, rank, world) for e in embs)))
    model.train()
    return {"val_loss": sum(losses) / len(losses), "val_acc": sum(accs) / len(accs)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _agree(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's decision, made the same on every rank (collectives must match)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=device)  # NCCL takes device tensors only
    dist.broadcast(t, src=0)
    return bool(t.item())


def _inject_fault(hooks: TrainHooks, rank: int, step: int, spec: str | None = None) -> None:
    """:attr:`TrainHooks.fault` (or ``spec``): die abruptly once, like a lost node."""
    spec = hooks.fault if spec is None else spec
    if not spec:
        return
    f_rank, f_step, marker = spec.split(":", 2)
    if rank == int(f_rank) and step == int(f_step) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        os._exit(1)


def _restore(
    paths: RunPaths, model, optimizer, scheduler, rank: int, world: int
) -> tuple[TrainState | None, int]:
    """Load the newest checkpoint: Ray Train's (after a restart) or the run folder's.

    The run folder can hold a newer one than Ray Train knows: a worker that dies right
    after reporting leaves it on storage unregistered. Every rank must restore the same step.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        # Every complete checkpoint, newest first: a torn newest one falls back to the
        # intact one before it, and model, optimiser, RNG and step all come from the one loaded.
        folders = [folder for _, folder in complete_checkpoints(paths)]
        if checkpoint is not None:
            ray_dir = Path(stack.enter_context(checkpoint.as_directory()))
            ray_step = checkpoint_complete(ray_dir)[0]
            if ray_step is not None and not any(ray_dir.resolve() == f.resolve() for f in folders):
                folders.append(ray_dir)
                folders.sort(key=lambda f: checkpoint_complete(f)[0] or 0, reverse=True)
        state = None
        for folder in folders:
            try:
                state = load_checkpoint(folder, model, optimizer, scheduler, rank)
                break
            except (OSError, TrainingError) as exc:  # nothing was applied
                log.warning("checkpoint %s unreadable (%s); trying an older one", folder, exc)
    step = -1 if state is None else state.step
    if world > 1:
        import torch.distributed as dist

        steps = [None] * world
        dist.all_gather_object(steps, step)
        if len(set(steps)) != 1:
            raise RuntimeError(
                f"workers restored different checkpoints (steps {steps}); "
                f"check that {paths.root} is shared storage every node sees"
            )
    return state, step


def _report(metrics: dict, ckpt_fn: Callable[[str], None] | None = None, step: int = 0) -> None:
    import ray.train

    if ckpt_fn is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_fn(tmp)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def _export(model, tokenizer, cfg: Config, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_model(
        unwrap_model(model),
        tokenizer,
        tmp,
        cfg.model,
        max_seq_length=max(cfg.data.max_query_length, cfg.data.max_passage_length),
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # readers never see a half-written model


class _Worker:
    """One Ray Train worker's model, optimiser, schedule, train state and side channels."""

    def __init__(self, loop_config: dict):
        import ray.train
        import ray.train.torch

        quiet_worker(loop_config.get("quiet", False))
        self.cfg = cfg = config_from_dict(loop_config["config"])  # plain dict back to the schema
        self.paths = RunPaths(**loop_config["paths"])
        self.hooks: TrainHooks = loop_config.get("hooks") or TrainHooks()
        self.extra_fn = loop_config.get("extra_report_fn")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        val = loop_config["val_batches"]  # per rank (the driver planned for num_workers ranks)
        self.val_batches = val[self.rank] if val else []
        tc = cfg.train
        torch.set_num_threads(max(1, tc.threads_per_worker or int(tc.cpus_per_worker)))
        torch.manual_seed(cfg.batch.seed * 1000 + self.rank)  # per-rank dropout, reproducible
        self.device = ray.train.torch.get_device()
        self.tokenizer, model = load_biencoder(cfg.model, path=loop_config["model_path"])
        model.to(self.device)
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.model.freeze_embeddings:  # before the optimiser and DDP see the parameters
            freeze_embeddings(model)
        self.optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, tc.max_steps, tc.warmup_ratio)
        state, self.saved_at = _restore(
            self.paths, model, self.optimizer, self.scheduler, self.rank, self.world
        )
        self.state = state or TrainState()
        self.state.world_size = self.world  # a resume may use another number of workers
        self.model = ray.train.torch.prepare_model(model)  # DDP when world > 1
        self.model.train()
        self.mlflow = StepLogger(
            loop_config.get("mlflow") if self.rank == 0 else None, self.paths.mlflow_unsent
        )
        self.precision = resolve_precision(tc.precision, self.device.type)
        if self.rank == 0:
            log.info(
                "precision %s (train.precision=%s) on %s", self.precision, tc.precision, self.device
            )
            self.mlflow.tag("train.precision_used", self.precision)
        log_dir = self.hooks.batch_log
        self.batch_log = Path(log_dir) / f"rank{self.rank}.jsonl" if log_dir else None
        self.step_times: list[float] = []
        self.false_negatives = 0  # pairs masked as false negatives by text, this attempt
        self.step_cpu: list[float] = []  # process CPU time per step: robust to a busy machine
        self.window: list[dict] = []
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def batches(self):
        import ray.train

        from rayhybrid.stream import iter_step_batches, rank_key

        shard = ray.train.get_dataset_shard(rank_key(self.rank))
        # A restarted worker group re-reads the stream from where the driver built it: skip to
        # the restored step.
        yield from iter_step_batches(
            shard,
            self.cfg.batch.per_worker(self.world),
            self.tokenizer.pad_token_id,
            start_step=self.state.step,
        )

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on this worker's share of a global batch; its metrics."""
        tc, dev = self.cfg.train, self.device
        if batch["step"] != self.state.step:
            raise RuntimeError(
                f"the stream jumped from step {self.state.step} to {batch['step']}: "
                "batches would be skipped; rebuild it from the checkpoint's step"
            )
        _inject_fault(self.hooks, self.rank, batch["step"])
        if self.batch_log is not None:
            with open(self.batch_log, "a") as fh:
                fh.write(
                    json.dumps({"step": batch["step"], "pid": os.getpid(), "group": batch["group"]})
                    + "\n"
                )
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(  # plain, or cached InfoNCE with train.mini_batch_size
            self.model,
            batch,
            tau=tc.tau,
            symmetric=tc.symmetric,
            rank=self.rank,
            world_size=self.world,
            device=dev,
            precision=self.precision,
            mini_batch_size=tc.mini_batch_size,
        )
        self.false_negatives += out.false_negatives
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tc.grad_clip or float("inf")
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.state.step = batch["step"] + 1
        now, cpu = time.perf_counter(), time.process_time()
        self.step_times.append(now - self.last)
        self.step_cpu.append(cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu
        metrics = {
            "train/loss": out.loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/pairs_per_s": self.cfg.batch.batch_size / self.step_times[-1],
            "train/mode_is_mono": float(batch["mode"] in ("mono", "english")),
            "train/false_negatives": float(out.false_negatives),
        }
        self.mlflow.log(metrics, self.state.step)
        self.window.append(metrics)
        return metrics

    def window_report(self) -> dict[str, float]:
        """Means of the step metrics since the last report (``loss``, ``lr``, ``pairs_per_s``...)."""
        w, self.window = self.window, []
        out = {k.split("/", 1)[1]: sum(m[k] for m in w) / len(w) for k in w[0]} if w else {}
        if self.rank == 0 and out:  # logging, not print: Ray Train V2 echoes worker stdout twice
            log.info(
                "step %d/%d loss %.4f lr %.2e %.1f pairs/s",
                self.state.step,
                self.cfg.train.max_steps,
                out["loss"],
                out["lr"],
                out["pairs_per_s"],
            )
        return out

    def validation_point(self) -> dict[str, float]:
        """Validation loss/accuracy, best-model export, early-stopping bookkeeping, extra metrics."""
        st, tc = self.state, self.cfg.train
        val = _validate(
            self.model,
            self.cfg,
            self.val_batches,
            self.rank,
            self.world,
            self.device,
            self.precision,
        )
        if _agree(val["val_loss"] < st.best_val_loss, self.world, self.device):
            st.best_val_loss, st.best_step, st.bad_evals = val["val_loss"], st.step, 0
            if self.rank == 0:
                _export(self.model, self.tokenizer, self.cfg, self.paths.best_model)
        else:
            st.bad_evals += 1
        st.stopped_early = bool(
            tc.early_stopping_patience and st.bad_evals >= tc.early_stopping_patience
        )
        val["best_val_loss"] = st.best_val_loss
        if self.extra_fn is not None and self.rank == 0:
            val.update(self.extra_fn(unwrap_model(self.model), self.tokenizer, self.cfg, st.step))
        self.mlflow.log({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, st.step)
        return val

    def report(self, metrics: dict, checkpoint: bool) -> None:
        self.mlflow.flush()
        metrics["step"] = self.state.step

        def write(folder: str) -> None:
            step = self.state.step
            save_checkpoint(
                folder,
                self.model,
                self.optimizer,
                self.scheduler,
                self.state,
                self.rank,
                fault=(
                    (lambda: _inject_fault(self.hooks, self.rank, step, self.hooks.save_fault))
                    if self.hooks.save_fault
                    else None
                ),
            )

        _report(metrics, write if checkpoint else None, self.state.step)
        self.saved_at = self.state.step if checkpoint else self.saved_at

    def finish(self) -> None:
        """Export the final model (the best one under validation) and report the last checkpoint.

        Ray Train's ``Result.metrics`` are those of the latest checkpoint, so the summary
        travels with it (and in ``final_metrics.json`` for the driver).
        """
        st, tc = self.state, self.cfg.train
        summary = {
            "step": st.step,
            "stopped_early": st.stopped_early,
            "best_val_loss": st.best_val_loss,
            "best_step": st.best_step,
            "step_time_median_s": _median(self.step_times[KEEP_STEP_TIMES:] or self.step_times),
            "step_cpu_median_s": _median(self.step_cpu[KEEP_STEP_TIMES:] or self.step_cpu),
            "steps_this_attempt": len(self.step_times),
            "false_negatives_masked": self.false_negatives,
        }
        if self.rank == 0:
            self.mlflow.flush()
            if tc.eval_every and self.paths.best_model.is_dir():
                shutil.rmtree(self.paths.final_model, ignore_errors=True)
                shutil.copytree(self.paths.best_model, self.paths.final_model)
            else:
                _export(self.model, self.tokenizer, self.cfg, self.paths.final_model)
            if self.extra_fn is not None and not tc.eval_every:
                summary.update(
                    self.extra_fn(unwrap_model(self.model), self.tokenizer, self.cfg, st.step)
                )
            write_json_atomic(self.paths.root / FINAL_METRICS, summary)
        self.report(summary, checkpoint=self.saved_at != st.step)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker entry point. ``loop_config`` is built by :func:`rayhybrid.train.driver.train`.

    Every rank takes the same decisions at the same steps (reports are barriers).
    """
    w = _Worker(loop_config)
    tc, st = w.cfg.train, w.state
    for batch in w.batches():
        if st.stopped_early or batch["step"] >= tc.max_steps:
            break
        w.train_step(batch)
        last = st.step >= tc.max_steps
        report = w.window_report() if st.step % tc.log_every == 0 or last else {}
        if tc.eval_every and (st.step % tc.eval_every == 0 or last):
            report.update(w.validation_point())
        done = st.stopped_early or last
        due = bool(tc.checkpoint_every and st.step % tc.checkpoint_every == 0) and not done
        if report or due:
            w.report(report, checkpoint=due)
        if done:
            break
    w.finish()
