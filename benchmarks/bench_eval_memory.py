"""Peak driver and shard memory of the evaluation against the candidate pool size.

    python benchmarks/bench_eval_memory.py                    # 1x, 4x, 16x XQuAD-R and 1 M
    python benchmarks/bench_eval_memory.py --scales 1 4 --no-million --startup 3

Pools have the XQuAD-R shape (its 11 languages and sentence counts, times the scale; its
13,090 queries whatever the scale) and a synthetic 1 M-candidate pool over the same
languages. Embeddings are 384-dim (as MiniLM gives) and made by ``SyntheticEncoder`` in the
Ray Data ``map_batches`` actor pool instead of a model (a million texts through even a tiny
model take too long on two cores): the texts, blocks, object store, shard actors and the
driver's bookkeeping are the evaluation's own (:func:`~rayhybrid.evaluation.loading.encode_into_shards`).

Per pool, two paths on the same Ray:

- ``store`` (now): candidate blocks stay in the object store, each shard actor reads its rows;
- ``driver`` (before issue 14): the driver gathers every embedding (``encode_with_ray``
  without ``keep``), slices the shards and puts each into the object store
  (``ActorShards(shards)``); not run at 1 M (it needs several GB in the driver).

Reported: the driver's RSS before the step and its peak RSS during the step (VmHWM, reset
through ``/proc/self/clear_refs`` before each step; ``tracemalloc`` crashed the driver in
``traceback_new`` while Ray's threads ran), the largest shard actor's peak RSS (each pool
gets fresh actors), the bytes one shard holds and the bytes the largest actor holds (its
languages together). ``--startup N``: N interleaved repetitions of a small evaluation step
(XQuAD-R 1x) per ``--actors`` setting (``eval.shard_actors``: 11 is one actor per language,
2 one per CPU on two cores, 0 the default: one per node), timing (1) ``cold``: from
``ActorShards.start`` until every shard is loaded from already-encoded blocks (the whole
start-up, nothing overlapped); (2) ``reload``:
the same load again into the now-running actors (what reading the blocks costs); (3)
``after encoding``: actors started before a fresh encoding, from its end until every shard
is loaded (what an evaluation waits for beyond encoding).

    python benchmarks/bench_eval_memory.py --scales --no-million --startup 3 --actors 11 2 0
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

DIM = 384


class SyntheticEncoder:
    """``map_batches`` class with the encoder's contract: unit vectors from the row number."""

    def __init__(self, model_cfg: dict, model_path: str | None, threads: int) -> None:
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["row"]
        emb = np.random.default_rng(int(rows[0])).standard_normal((len(rows), DIM))
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        return {"row": rows, "emb": emb}


def make_task(sizes: dict[str, int], scale: int, n_queries: int):
    from rayhybrid.datamodel import Candidate, EvalTask, Query

    langs = sorted(sizes)
    cands = [
        Candidate(f"c:{lang}:{j}", lang, f"w{j % 9973}")
        for lang in langs
        for j in range(sizes[lang] * scale)
    ]
    queries = [
        Query(f"q:{langs[i % len(langs)]}:{i}", langs[i % len(langs)], f"q{i}")
        for i in range(n_queries)
    ]
    qrels = {q.id: {f"c:{q.lang}:{i % sizes[q.lang]}": 1} for i, q in enumerate(queries)}
    return EvalTask("mem", queries, cands, qrels)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_store(cfg, task, langs):
    from rayhybrid.evaluation import encode
    from rayhybrid.evaluation.loading import encode_into_shards
    from rayhybrid.evaluation.run import candidate_texts
    from rayhybrid.evaluation.shards import ActorShards

    texts = candidate_texts(task)
    pool = ActorShards.start(langs)
    real = encode.encode_with_ray
    encode.encode_with_ray = lambda *a, **k: real(*a, encoder=SyntheticEncoder, **k)
    try:
        return _measure(lambda: encode_into_shards(cfg, task, texts, None, pool), pool)
    finally:
        encode.encode_with_ray = real


def step_driver(cfg, task, langs):
    """The path before issue 14 (run.py then): gather, slice, ActorShards(shards)."""
    from rayhybrid.evaluation.encode import encode_with_ray
    from rayhybrid.evaluation.retrieval import CandidateIndex
    from rayhybrid.evaluation.run import candidate_texts
    from rayhybrid.evaluation.shards import ActorShards

    texts = candidate_texts(task)
    holder = {}

    def run():
        (q_emb, c_emb), _ = encode_with_ray(
            [([q.text for q in task.queries], "", 64), (texts, "", 256)],
            cfg.model,
            batch_size=cfg.eval.batch_size,
            encoder=SyntheticEncoder,
        )
        cands = CandidateIndex.from_task(task)
        row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
        shards = {lang: (c_emb[row_of_key[k]], k) for lang, k in cands.shard_keys().items()}
        holder["pool"] = ActorShards(shards)
        return q_emb

    out = _measure(run, None, holder)
    return out


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _measure(fn, pool, holder=None):
    gc.collect()
    reset = _reset_hwm()
    before = _rss()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    pool = pool or holder["pool"]
    try:
        mem = pool.memory()
    finally:
        pool.close()
    return {
        "driver_rss_before": before,
        "driver_rss_peak": _hwm() if reset else None,
        "shard_rss_peak_max": max(m["peak_rss"] for m in mem.values()),
        "shard_bytes_max": max(m["shard_bytes"] for m in mem.values()),
        "actor_bytes_max": max(m["actor_bytes"] for m in mem.values()),
        "shard_actors": len({m["actor"] for m in mem.values()}),
        "seconds": seconds,
    }


def startup(cfg, sizes, n_queries, reps: int, actors: list[int]) -> dict[str, list[float]]:
    """Start-up seconds per ``eval.shard_actors`` setting, interleaved (see the module doc)."""
    from rayhybrid.evaluation import encode
    from rayhybrid.evaluation.retrieval import CandidateIndex
    from rayhybrid.evaluation.run import candidate_texts
    from rayhybrid.evaluation.shards import ActorShards

    task = make_task(sizes, 1, n_queries)
    texts = candidate_texts(task)
    groups = [([q.text for q in task.queries], "", 64), (texts, "", 256)]
    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    keys = cands.shard_keys()
    langs = sorted(sizes)

    def encoded():
        return encode.encode_with_ray(
            groups, cfg.model, encoder=SyntheticEncoder, keep=[False, True]
        )[0][1]

    def load(pool, stored) -> float:
        t = time.perf_counter()
        pool.load_blocks(
            stored.blocks, {lang: stored.offset + row_of_key[k] for lang, k in keys.items()}, keys
        )
        return time.perf_counter() - t

    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for n in actors:
            name = f"shard_actors={n}"
            stored = encoded()
            t = time.perf_counter()
            with ActorShards.start(langs, n_actors=n, sizes=sizes) as pool:
                load(pool, stored)
                out.setdefault(f"{name}: cold", []).append(time.perf_counter() - t)
                out.setdefault(f"{name}: reload", []).append(load(pool, stored))
                out[f"{name}: actors"] = [len(pool.groups())]
            del stored
            with ActorShards.start(langs, n_actors=n, sizes=sizes) as pool:
                t = time.perf_counter()
                stored = encoded()
                out.setdefault(f"{name}: encoding", []).append(time.perf_counter() - t)
                out.setdefault(f"{name}: after encoding", []).append(load(pool, stored))
            del stored
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--no-million", action="store_true")
    ap.add_argument("--startup", type=int, default=3, help="interleaved start-up repetitions")
    ap.add_argument(
        "--actors",
        type=int,
        nargs="+",
        default=[11, 0],
        help="eval.shard_actors settings the start-up compares (0: auto)",
    )
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--data", default=os.environ.get("RAYHYBRID_DATA", "../shared/data") + "/xquad-r"
    )
    args = ap.parse_args()

    from rayhybrid.cluster import ensure_ray
    from rayhybrid.config import load_config
    from rayhybrid.corpus import load_lareqa_task

    ensure_ray(include_dashboard=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    xq = load_lareqa_task(args.data)
    sizes = {lang: sum(c.lang == lang for c in xq.candidates) for lang in xq.languages}
    n_queries = len(xq.queries)
    cfg = load_config(None, ["tracking.enabled=false", "eval.cache_dir=", "eval.batch_size=512"])
    langs = sorted(sizes)
    result: dict = {"rows": []}
    rows = result["rows"]
    step_store(cfg, make_task({lang: 20 for lang in langs}, 1, 50), langs)  # imports, caches
    if args.startup:  # first, so that a run cut short still has it
        result["startup"] = startup(cfg, sizes, n_queries, args.startup, args.actors)
        for k, v in result["startup"].items():
            print(
                f"start-up {k}: "
                + ", ".join(f"{x:.2f}" for x in v)
                + f" (min {min(v):.2f}, median {float(np.median(v)):.2f})"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    pools = [(f"{s}x XQuAD-R", sizes, s) for s in args.scales]
    if not args.no_million:
        per = {lang: -(-1_000_000 // len(langs)) for lang in langs}
        pools.append(("1 M synthetic", per, 1))
    for name, shape, scale in pools:
        task = make_task(shape, scale, n_queries)
        n = len(task.candidates)
        for path, fn in (("store", step_store), ("driver", step_driver)):
            if path == "driver" and n > 300_000:
                continue
            r = fn(cfg, task, langs)
            r.update(pool=name, candidates=n, path=path)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
        del task
        gc.collect()
    mib = 2**20
    print(
        "\n| pool | candidates | path | driver RSS before | driver RSS peak | shard actors "
        "| largest shard actor RSS peak | one shard holds | largest actor holds | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = r["driver_rss_peak"]
        rss = (
            f"{peak / mib:.0f} MiB (+{(peak - r['driver_rss_before']) / mib:.0f})"
            if peak
            else "n/a"
        )
        print(
            f"| {r['pool']} | {r['candidates']:,} | {r['path']} | "
            f"{r['driver_rss_before'] / mib:.0f} MiB | {rss} | {r['shard_actors']} | "
            f"{r['shard_rss_peak_max'] / mib:.0f} MiB | {r['shard_bytes_max'] / mib:.1f} MiB | "
            f"{r['actor_bytes_max'] / mib:.1f} MiB | {r['seconds']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
