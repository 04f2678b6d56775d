"""The Ray Train worker loop: DDP bi-encoder on the hybrid batch stream.

Runs in every Ray Train worker (``TorchTrainer(train_loop_per_worker)``), built by
:func:`rayhybrid.training.train`. Reads top to bottom: config back from the plain dict,
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
from pathlib import Path
from typing import Any, Callable

import torch

from rayhybrid.checkpointing import (RunPaths, TrainState, checkpoint_step, latest_checkpoint,
                                     load_checkpoint, save_checkpoint)
from rayhybrid.config import Config, config_from_dict
from rayhybrid.loss import gather_with_local_grad, in_batch_accuracy, info_nce
from rayhybrid.model import export_model, load_biencoder, unwrap_model

__all__ = ["build_optimizer", "build_scheduler", "train_loop_per_worker"]

log = logging.getLogger(__name__)
FINAL_METRICS = "final_metrics.json"  # rank 0's summary, read back by the driver
KEEP_STEP_TIMES = 2  # first steps excluded from the throughput figure (allocation, warm-up)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm weights do not (one ``p.dim() >= 2`` test)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int,
                    warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * max_steps`` steps, then linear decay to 0 at max_steps."""
    warmup = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Mlflow:
    """Rank 0's MLflow writer for the driver-created run; buffers and sends every flush.

    Calls go through :class:`rayhybrid.tracking.TrackingGuard`: a tracking server that dies
    mid-run costs one message and a spill file, never the training run.
    """

    def __init__(self, spec: dict | None, spill_path: Path):
        self.client = self.run_id = self.guard = None
        self.buffer: list = []
        if spec:
            from mlflow.tracking import MlflowClient

            from rayhybrid.tracking import TrackingGuard

            self.client, self.run_id = MlflowClient(spec["tracking_uri"]), spec["run_id"]
            self.guard = TrackingGuard(spec["tracking_uri"], spill_path=spill_path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            self.guard.log_metrics(self.client, self.run_id, self.buffer)
            self.buffer = []


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _validate(model, tokenizer, cfg: Config, val_batches: list, rank: int, world: int,
              device: torch.device) -> dict[str, float]:
    """Loss and in-batch accuracy of the fixed dev batches (global batches split over ranks)."""
    model.eval()
    losses, accs = [], []
    with torch.no_grad():
        for queries, passages in val_batches:
            n = len(queries) // world
            embs = []
            for texts, max_len in ((queries, cfg.data.max_query_length),
                                   (passages, cfg.data.max_passage_length)):
                tok = tokenizer(list(texts[rank * n:(rank + 1) * n]), padding=True, truncation=True,
                                max_length=max_len, return_tensors="pt").to(device)
                with _autocast(cfg, device):
                    embs.append(model(tok["input_ids"], tok["attention_mask"]).float())
            loss, _ = info_nce(*embs, tau=cfg.train.tau, rank=rank, world_size=world,
                               symmetric=cfg.train.symmetric)
            losses.append(loss.item())
            accs.append(in_batch_accuracy(*(gather_with_local_grad(e, rank, world) for e in embs)))
    model.train()
    return {"val_loss": sum(losses) / len(losses), "val_acc": sum(accs) / len(accs)}


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, made the same on every rank (collectives must match)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _inject_fault(debug: dict, rank: int, step: int) -> None:
    """Test hook (env RAYHYBRID_FAULT=rank:step:marker): die abruptly once, like a lost node."""
    spec = debug.get("fault")
    if not spec:
        return
    f_rank, f_step, marker = spec.split(":", 2)
    if rank == int(f_rank) and step == int(f_step) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        os._exit(1)


def _restore(paths: RunPaths, model, optimizer, scheduler, rank: int,
             world: int) -> tuple[TrainState | None, int]:
    """Load the newest checkpoint: Ray Train's (after a restart) or the run folder's.

    The run folder can hold a newer one than Ray Train knows: a worker that dies right
    after reporting leaves it on storage unregistered. Every rank must restore the same step.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(checkpoint.as_directory())] if checkpoint is not None else []
        newest = latest_checkpoint(paths)[1]
        folders += [newest] if newest is not None else []
        state = None
        for folder in sorted(folders, key=checkpoint_step, reverse=True):
            try:
                state = load_checkpoint(folder, model, optimizer, scheduler, rank)
                break
            except (OSError, RuntimeError, EOFError, ValueError) as exc:  # a torn copy
                log.warning("checkpoint %s unreadable (%s); trying an older one", folder, exc)
    step = -1 if state is None else state.step
    if world > 1:
        import torch.distributed as dist

        steps = [None] * world
        dist.all_gather_object(steps, step)
        if len(set(steps)) != 1:
            raise RuntimeError(f"workers restored different checkpoints (steps {steps}); "
                               f"check that {paths.root} is shared storage every node sees")
    return state, step


def _report(metrics: dict, ckpt_fn: Callable[[str], None] | None = None, step: int = 0) -> None:
    import ray.train

    if ckpt_fn is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_fn(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def _export(model, tokenizer, cfg: Config, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_model(unwrap_model(model), tokenizer, tmp, cfg.model,
                 max_seq_length=max(cfg.data.max_query_length, cfg.data.max_passage_length))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # readers never see a half-written model


def train_loop_per_worker(loop_config: dict) -> None:  # noqa: PLR0915 - one readable loop
    """Ray Train worker entry point. ``loop_config`` is built by :func:`rayhybrid.training.train`."""
    cfg = config_from_dict(loop_config["config"])
    import ray.train
    import ray.train.torch

    from rayhybrid.stream import iter_step_batches, rank_key

    paths, debug = RunPaths(**loop_config["paths"]), loop_config.get("debug", {})
    extra_fn = loop_config.get("extra_report_fn")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = cfg.train
    torch.set_num_threads(max(1, tc.threads_per_worker or int(tc.cpus_per_worker)))
    torch.manual_seed(cfg.batch.seed * 1000 + rank)  # dropout streams differ per rank, reproducibly
    device = ray.train.torch.get_device()

    tokenizer, model = load_biencoder(cfg.model, path=loop_config["model_path"])
    model.to(device)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.max_steps, tc.warmup_ratio)
    state, saved_at = _restore(paths, model, optimizer, scheduler, rank, world)
    state = state or TrainState()
    state.world_size = world  # a resume may use another number of workers
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    model.train()
    mlflow = _Mlflow(loop_config.get("mlflow") if rank == 0 else None, paths.mlflow_unsent)
    per_worker = cfg.batch.batch_size // world
    batch_log = Path(debug["batch_log"]) if debug.get("batch_log") else None
    step_times, window, last = [], [], time.perf_counter()

    def ckpt_fn(folder: str) -> None:
        save_checkpoint(folder, model, optimizer, scheduler, state, rank)

    shard = ray.train.get_dataset_shard(rank_key(rank))
    for batch in iter_step_batches(shard, per_worker, tokenizer.pad_token_id):
        step = batch["step"]
        if state.stopped_early or step >= tc.max_steps:
            break
        if step < state.step:  # a restarted worker group re-reads the stream from its start
            last = time.perf_counter()
            continue
        if step != state.step:
            raise RuntimeError(f"the stream jumped from step {state.step} to {step}: batches would "
                               "be skipped; rebuild the stream from the checkpoint's step")
        _inject_fault(debug, rank, step)
        if batch_log is not None:
            with open(batch_log / f"rank{rank}.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "pid": os.getpid(), "group": batch["group"]}) + "\n")

        with _autocast(cfg, device):
            q = model(batch["q_input_ids"].to(device), batch["q_attention_mask"].to(device))
            p = model(batch["p_input_ids"].to(device), batch["p_attention_mask"].to(device))
        loss, backward_loss = info_nce(q, p, tau=tc.tau, rank=rank, world_size=world,
                                       symmetric=tc.symmetric)
        optimizer.zero_grad(set_to_none=True)
        backward_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        state.step = step + 1

        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        step_metrics = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": float(grad_norm),
                        "train/pairs_per_s": cfg.batch.batch_size / step_times[-1],
                        "train/mode_is_mono": float(batch["mode"] in ("mono", "english"))}
        mlflow.log(step_metrics, state.step)
        window.append(step_metrics)
        report: dict[str, Any] = {}
        if state.step % max(1, tc.log_every) == 0 or state.step == tc.max_steps:
            report = {k.split("/", 1)[1]: sum(m[k] for m in window) / len(window) for k in window[0]}
            window = []
            if rank == 0:  # logging, not print: Ray Train V2 echoes worker stdout twice
                log.info("step %d/%d loss %.4f lr %.2e %.1f pairs/s", state.step, tc.max_steps,
                         report["loss"], lr, report["pairs_per_s"])
        if tc.eval_every and (state.step % tc.eval_every == 0 or state.step == tc.max_steps):
            val = _validate(model, tokenizer, cfg, loop_config["val_batches"], rank, world, device)
            improved = _agree(val["val_loss"] < state.best_val_loss, world)
            if improved:
                state.best_val_loss, state.best_step, state.bad_evals = val["val_loss"], state.step, 0
                if rank == 0:
                    _export(model, tokenizer, cfg, paths.best_model)
            else:
                state.bad_evals += 1
            patience = tc.early_stopping_patience
            state.stopped_early = bool(patience and state.bad_evals >= patience)
            val["best_val_loss"] = state.best_val_loss
            if extra_fn is not None and rank == 0:
                val.update(extra_fn(unwrap_model(model), tokenizer, cfg, state.step))
            mlflow.log({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, state.step)
            report.update(val)
        done = state.stopped_early or state.step >= tc.max_steps
        due = bool(tc.checkpoint_every and state.step % tc.checkpoint_every == 0) and not done
        if report or due:
            mlflow.flush()
            report["step"] = state.step
            _report(report, ckpt_fn if due else None, state.step)
            saved_at = state.step if due else saved_at
        if done:
            break

    # The last report carries the final checkpoint: Ray Train's Result.metrics are those of
    # the latest checkpoint, so the summary travels with it.
    timed = sorted(step_times[KEEP_STEP_TIMES:] or step_times)
    summary = {"step": state.step, "stopped_early": state.stopped_early,
               "best_val_loss": state.best_val_loss, "best_step": state.best_step,
               "step_time_median_s": timed[len(timed) // 2] if timed else float("nan"),
               "steps_this_attempt": len(step_times)}
    if rank == 0:
        mlflow.flush()
        if tc.eval_every and paths.best_model.is_dir():
            shutil.rmtree(paths.final_model, ignore_errors=True)
            shutil.copytree(paths.best_model, paths.final_model)
        else:
            _export(model, tokenizer, cfg, paths.final_model)
        if extra_fn is not None and not tc.eval_every:
            summary.update(extra_fn(unwrap_model(model), tokenizer, cfg, state.step))
        (paths.root / FINAL_METRICS).write_text(json.dumps(summary, indent=1))
    _report(summary, ckpt_fn if saved_at != state.step else None, state.step)
