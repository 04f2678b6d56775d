"""Throughput of the tokenized hybrid batch stream against a raw tokenizer loop (same run).

    python benchmarks/bench_stream.py     # XQuAD-R train part, Ray with 2 CPUs, 2000 steps x 32, 3 runs
    python benchmarks/bench_stream.py --steps 500 --workers 1 --repeat 1 --breakdown

Stream: ``build_train_datasets`` (plan, text lookup, validation and tokenization in Ray
Data, materialized, cut per rank) then ``iter_step_batches`` over every rank (padded
torch tensors), timed end to end from a running Ray. Baseline: the same planned texts
(collected beforehand, not timed) tokenized step by step in this process with the same
tokenizer, prefixes and max lengths, padded to tensors: what a trainer without Ray
Data would do. Both figures are pairs per second; the ratio is stream / baseline, the
two alternated ``--repeat`` times (median reported) so other load on the machine hits both.
``--breakdown`` also times the parts (planning, tokenizer calls, Ray overhead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def planned_texts(cfg, units, plan, steps: int) -> list[tuple[list[str], list[str]]]:
    out = []
    for g in range(steps):
        rows = plan.step(g)
        texts = [units[r.unit].texts(r.query_lang, r.passage_lang) for r in rows]
        out.append(
            (
                [cfg.model.query_prefix + q for q, _ in texts],
                [cfg.model.passage_prefix + p for _, p in texts],
            )
        )
    return out


def raw_loop(tokenizer, cfg, batches) -> int:
    n = 0
    for queries, passages in batches:
        q = tokenizer(
            queries,
            padding=True,
            truncation=True,
            max_length=cfg.data.max_query_length,
            return_tensors="pt",
        )
        p = tokenizer(
            passages,
            padding=True,
            truncation=True,
            max_length=cfg.data.max_passage_length,
            return_tensors="pt",
        )
        n += q["input_ids"].shape[0]
        assert p["input_ids"].shape[0] == q["input_ids"].shape[0]
    return n


def stream_loop(
    cfg, data, tok_path: str, workers: int, steps: int, pad: int
) -> tuple[int, float, float]:
    from rayhybrid.stream import build_train_datasets, iter_step_batches, rank_key

    t0 = time.perf_counter()
    datasets = build_train_datasets(cfg, data, tok_path, workers, 0, steps, materialize=True)
    t1 = time.perf_counter()
    n = 0
    for r in range(workers):
        for batch in iter_step_batches(datasets[rank_key(r)], cfg.batch.batch_size // workers, pad):
            n += batch["q_input_ids"].shape[0]
    t2 = time.perf_counter()
    global LAST_STATS
    LAST_STATS = datasets[rank_key(0)].stats()
    return n, t1 - t0, t2 - t1


LAST_STATS = ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--steps", type=int, default=2000, help="global steps in the stream (default 2000)"
    )
    ap.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    ap.add_argument("--workers", type=int, default=2, help="per-rank datasets to build (default 2)")
    ap.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...) (default 2)")
    ap.add_argument(
        "--data", default=None, help="XQuAD-R folder (default: data.path of the config)"
    )
    ap.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="nice value of Ray's worker processes (Ray's own default is 15; 0 gives "
        "the stream the same CPU priority as the baseline on a busy machine)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="alternating raw / stream runs (default 3)"
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="also time planning and tokenizer calls"
    )
    args = ap.parse_args(argv)

    import ray
    from transformers import AutoTokenizer

    from rayhybrid.batching import BatchPlan, units_from
    from rayhybrid.config import load_config
    from rayhybrid.corpus import load_training_data
    from rayhybrid.model import resolve_model_path

    overrides = [f"batch.batch_size={args.batch_size}", "batch.strategy=hybrid", "batch.alpha=0.5"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(None, overrides)
    data = load_training_data(cfg.data, part="train")
    tok_path = resolve_model_path(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    units = units_from(data.items, data.pairs, cfg.data.languages)
    plan = BatchPlan(cfg.batch, units, args.workers)
    batches = planned_texts(cfg, units, plan, args.steps)
    pairs = args.steps * args.batch_size
    print(
        f"XQuAD-R train: {len(units)} units, {args.steps} steps x {args.batch_size} = {pairs} pairs, "
        f"tokenizer {cfg.model.name}, max lengths {cfg.data.max_query_length}/"
        f"{cfg.data.max_passage_length}, {args.workers} rank datasets, Ray num_cpus={args.cpus}, "
        f"Ray worker niceness {args.ray_niceness}"
    )

    raw_loop(tokenizer, cfg, batches[:20])  # warm the tokenizer
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by the raylet at start
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ratios, stream_s = [], 0.0
    # Alternate the two so that load from other processes hits both alike.
    for rep in range(args.repeat):
        t = time.perf_counter()
        n_raw = raw_loop(tokenizer, cfg, batches)
        raw_s = time.perf_counter() - t
        n_stream, build_s, iter_s = stream_loop(
            cfg, data, tok_path, args.workers, args.steps, tokenizer.pad_token_id
        )
        assert n_stream == n_raw == pairs, (n_stream, n_raw, pairs)
        stream_s = build_s + iter_s
        raw_rate, stream_rate = pairs / raw_s, pairs / stream_s
        ratios.append(stream_rate / raw_rate)
        print(
            f"[{rep + 1}/{args.repeat}] raw tokenizer loop {raw_rate:7.0f} pairs/s ({raw_s:.1f} s) | "
            f"ray data stream {stream_rate:7.0f} pairs/s ({stream_s:.1f} s: build+tokenize "
            f"{build_s:.1f} s, iterate+pad {iter_s:.1f} s) | ratio {ratios[-1]:.2f} | load "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
    print(
        f"ratio stream / raw: median {statistics.median(ratios):.2f} over {len(ratios)} runs "
        "(goal >= 0.7)"
    )

    if args.breakdown:
        t = time.perf_counter()
        fresh = BatchPlan(cfg.batch, units, args.workers)
        planned_texts(cfg, units, fresh, args.steps)
        plan_s = time.perf_counter() - t
        flat_q = [q for qs, _ in batches for q in qs]
        flat_p = [p for _, ps in batches for p in ps]
        t = time.perf_counter()
        for i in range(0, len(flat_q), 2048):  # the stream's block size, no padding
            tokenizer(flat_q[i : i + 2048], truncation=True, max_length=cfg.data.max_query_length)
            tokenizer(flat_p[i : i + 2048], truncation=True, max_length=cfg.data.max_passage_length)
        tok_s = time.perf_counter() - t
        print(
            f"breakdown: plan + text lookup {plan_s:.2f} s (one process), tokenizer calls "
            f"{tok_s:.2f} s (one process, 2048 rows per call), stream wall {stream_s:.2f} s"
        )
        print(
            "Ray Data stats of the last stream (map op = plan + texts + tokenizer in the actors):"
        )
        for line in LAST_STATS.splitlines():
            if (
                line.startswith("Operator")
                or "Remote wall time" in line
                or "Remote cpu time" in line
            ):
                print("  " + line.strip())
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
