"""Sharded exact search on Ray actors against one in-process index (same embeddings, same run).

    python benchmarks/bench_search.py                      # 1x, 4x, 16x the XQuAD-R pool
    python benchmarks/bench_search.py --scales 1 --queries 13090 --reps 5
    python benchmarks/bench_search.py --blas-only          # the OpenBLAS check alone
    python benchmarks/bench_search.py --profile --scales 1 4   # where one shard's time goes

Pool: the XQuAD-R shapes (11 language shards with the real sentence counts, 384-dim
embeddings as the MiniLM gives), filled with unit vectors drawn around per-item centres so
that every language holds a noisy copy of each item (search time does not depend on the
values). Scale s pads every shard with s-1 perturbed copies of itself. Queries: the first
``--queries`` of the XQuAD-R multilingual query set (all languages), searched against the
whole pool (the multilingual setting), top-100.

Compared, each timed ``--reps`` times interleaved (best of them reported):

- ``sharded actors``: the language shards on Ray actors (``ActorShards``, the evaluation's
  own search with the default ``eval.shard_actors``: one actor per node, every language on
  it, its threads sharing out the languages' row chunks; ``--actors N`` also times N actors,
  several languages each, searched in parallel), per-shard top-k merged on the driver;
- ``single exact``: one in-process ``ShardSearcher`` over the whole pool (the same exact
  search: float32 ``sgemm`` scores of ``search.f32_backend``, faiss heap top-k, ties by key);
- ``faiss flat``: ``faiss.IndexFlatIP`` over the whole pool (float32, its bundled OpenBLAS):
  the multilingual top-k only;
- ``faiss per language``: one ``faiss.IndexFlatIP`` per language, each searched for the
  top-k of every query, the lists merged into the multilingual top-k: what the evaluation's
  search round produces (the per-language lists are what the mono and cross-lingual settings
  read), the way a user would get it from faiss;
- ``torch f32``: float32 ``torch.matmul`` + ``torch.topk`` in blocks (MKL).

``--profile`` instead times, in this process on one thread, ``ShardSearcher.search`` of the
queries on each language shard in turn (best of ``--reps``), the shard's scores alone, and
the merge of the per-shard lists: the floor of the sharded search (two actors on two cores
cannot beat half the shards' sum), with no Ray in the way.

The OpenBLAS section runs FAISS's flat search and numpy matmuls in fresh processes under
each ``OPENBLAS_CORETYPE`` (the core type must be set before the library loads), to see
whether the libraries bundled in the faiss-cpu / numpy wheels recognise this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

DIM = 384
TOP_K = 100
CORETYPES = ("", "Haswell", "SkylakeX", "Zen")


def xquad_shapes(folder: str) -> tuple[dict[str, int], int]:
    """Sentences per language and the number of queries over all languages."""
    from rayhybrid.corpus import load_lareqa_task

    task = load_lareqa_task(folder)
    sizes = {lang: sum(c.lang == lang for c in task.candidates) for lang in task.languages}
    return sizes, len(task.queries)


def make_pool(sizes: dict[str, int], scale: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_items = max(sizes.values())
    centres = rng.standard_normal((n_items, DIM)).astype(np.float32)
    shards, offset = {}, 0
    for lang, n in sizes.items():
        base = centres[:n] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
        parts = [base] + [
            base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
            for _ in range(scale - 1)
        ]
        emb = np.concatenate(parts)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        shards[lang] = (emb, np.arange(offset, offset + len(emb), dtype=np.int64))
        offset += len(emb)
    return shards, centres


def make_queries(centres: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = centres[np.arange(n) % len(centres)] + 0.9 * rng.standard_normal((n, DIM)).astype(
        np.float32
    )
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def torch_topk(q: np.ndarray, c: np.ndarray, k: int, block: int = 2048):
    import torch

    ct = torch.from_numpy(c)
    out = []
    for i in range(0, len(q), block):
        s = torch.from_numpy(q[i : i + block]) @ ct.T
        out.append(torch.topk(s, k, dim=1))
    return out


def time_methods(methods: dict, reps: int) -> dict[str, list[float]]:
    """Every repetition's time of every method, the methods interleaved within a
    repetition (load changes hit every method alike, and repetition i of two methods forms
    a pair)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(a: list[float], b: list[float], seed: int = 0) -> dict[str, float]:
    """Median over repetitions of a[i] / b[i] with a 95 % percentile-bootstrap interval
    (2,000 resamples of the repetitions): the spread the machine's load gives a ratio."""
    r = np.asarray(a) / np.asarray(b)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, len(r), (2000, len(r)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "lo": float(lo), "hi": float(hi), "reps": len(r)}


def run_scale(
    scale: int, sizes: dict[str, int], n_queries: int, reps: int, coretype: str, also: int
) -> dict:
    import faiss
    import ray

    from rayhybrid.evaluation.search import ShardSearcher, merge_topk
    from rayhybrid.evaluation.shards import ActorShards

    shards, centres = make_pool(sizes, scale)
    q = make_queries(centres, n_queries)
    all_emb = np.concatenate([e for e, _ in shards.values()])
    all_keys = np.concatenate([k for _, k in shards.values()])
    single = ShardSearcher("all", all_emb, all_keys)
    index = faiss.IndexFlatIP(DIM)
    index.add(all_emb)
    per_lang = {}
    for lang, (emb, keys) in shards.items():
        per_lang[lang] = (faiss.IndexFlatIP(DIM), keys)
        per_lang[lang][0].add(emb)

    def faiss_per_language():
        parts = []
        for idx, keys in per_lang.values():
            d, i = idx.search(q, TOP_K)
            parts.append((d, keys[i]))
        return merge_topk(parts, TOP_K)

    start = time.perf_counter()

    def start_pool(n_actors: int) -> ActorShards:
        # Started as the evaluation starts them (beside its encoders: no CPU reserved), so
        # that two pools can live side by side and be timed interleaved.
        started = ActorShards.start(list(shards), openblas_coretype=coretype, n_actors=n_actors)
        started.load_arrays(shards)
        return started

    pool = start_pool(0)
    startup = time.perf_counter() - start
    actor_blas = ray.get(next(iter(pool.actors.values())).blas.remote())
    ref = pool.put(q)
    rows = np.arange(len(q))

    def sharded(pool=pool, ref=ref):
        found = pool.map(
            "search", {lang: {"queries": ref, "rows": rows, "k": TOP_K} for lang in shards}
        )
        return merge_topk([(r.scores, r.keys) for r in found.values()], TOP_K)

    methods = {"sharded actors": sharded}
    other = start_pool(also) if also else None  # e.g. 2 on two CPUs: one actor per CPU
    if other is not None:
        methods[f"sharded, {len(other.groups())} actors"] = lambda: sharded(other, ref)
    methods |= {
        "single exact": lambda: single.search(q, TOP_K),
        "faiss flat": lambda: index.search(q, TOP_K),
        "faiss per language": faiss_per_language,
        "torch f32": lambda: torch_topk(q, all_emb, TOP_K),
    }
    exact = single.search(q, TOP_K)
    for name in [m for m in methods if m.startswith("sharded")]:
        merged = methods[name]()
        assert np.array_equal(merged[1], exact.keys), f"{name}: top-k differs from one index"
    every = time_methods(methods, reps)
    pool.close()
    if other is not None:
        other.close()
    return {
        "scale": scale,
        "pool": len(all_emb),
        "queries": len(q),
        "startup_s": startup,
        # Best of the repetitions: other processes only ever add time, so the minimum is
        # the closest to what a method itself costs.
        "times": {name: min(t) for name, t in every.items()},
        "all_times": every,
        "actor_blas": actor_blas or "(unset)",
    }


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def profile_scale(scale: int, sizes: dict[str, int], n_queries: int, reps: int) -> dict:
    """Per shard, in process, one thread: the search, the scores alone; then the merge."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    from rayhybrid.evaluation.search import ShardSearcher, exact_scores, merge_topk

    shards, centres = make_pool(sizes, scale)
    q = make_queries(centres, n_queries)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    searches, scores, parts = {}, {}, []
    with threadpool_limits(1):
        for lang, (emb, keys) in shards.items():
            shard = ShardSearcher(lang, emb, keys)
            searches[lang] = best_of(lambda shard=shard: shard.search(q, TOP_K), reps)
            scores[lang] = best_of(lambda shard=shard: exact_scores(q, shard._cand), reps)
            found = shard.search(q, TOP_K)
            parts.append((found.scores, found.keys))
        merge = best_of(lambda: merge_topk(parts, TOP_K), reps)
    return {
        "scale": scale,
        "pool": sum(len(k) for _, k in shards.values()),
        "queries": len(q),
        "search_s": searches,
        "scores_s": scores,
        "merge_s": merge,
    }


BLAS_SNIPPET = r"""
import json, os, time, numpy as np, faiss
from threadpoolctl import threadpool_info
rng = np.random.default_rng(0)
q = rng.standard_normal((%(nq)d, 384), dtype=np.float32)
c = rng.standard_normal((%(nc)d, 384), dtype=np.float32)
index = faiss.IndexFlatIP(384); index.add(c)
q64, c64 = q.astype(np.float64), c.astype(np.float64)
fns = {"faiss flat": lambda: index.search(q, 100), "numpy f32": lambda: q @ c.T,
       "numpy f64": lambda: q64 @ c64.T}
if %(torch)d:
    import torch
    qt, ct = torch.from_numpy(q), torch.from_numpy(c)
    fns.update({"torch f32": lambda: qt @ ct.T, "torch f64": lambda: qt.double() @ ct.double().T})
t = {k: [] for k in fns}
for _ in range(%(reps)d):
    for k, f in fns.items():
        s = time.perf_counter(); f(); t[k].append(time.perf_counter() - s)
arch = {i["filepath"].split("/")[-1]: i.get("architecture") for i in threadpool_info()
        if i.get("internal_api") == "openblas"}
print(json.dumps({"times": {k: min(v) for k, v in t.items()}, "arch": arch}))
"""


def blas_check(nq: int, nc: int, reps: int) -> list[dict]:
    rows = []
    for core in CORETYPES:
        env = dict(os.environ)
        env.pop("OPENBLAS_CORETYPE", None)
        if core:
            env["OPENBLAS_CORETYPE"] = core
        code = BLAS_SNIPPET % {"nq": nq, "nc": nc, "reps": reps, "torch": int(core == "")}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        rows.append(
            {"coretype": core or "(auto)", **json.loads(out.stdout.strip().splitlines()[-1])}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=os.environ.get("RAYHYBRID_DATA", "../shared/data") + "/xquad-r"
    )
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--queries", type=int, default=2048, help="Queries per search (default 2048)."
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--blas-only", action="store_true")
    parser.add_argument("--no-blas", action="store_true")
    parser.add_argument("--json", default="", help="Also write the timings to this file.")
    parser.add_argument(
        "--profile", action="store_true", help="Per-shard times in this process, one thread."
    )
    parser.add_argument(
        "--actors",
        type=int,
        default=0,
        help="Also time the shards on this many actors (eval.shard_actors=N; the default "
        "pool is one actor per node, its threads sharing the CPUs; 2 on two CPUs: one "
        "single-threaded actor per CPU, the default before).",
    )
    parser.add_argument(
        "--actor-coretype",
        default="auto",
        help="eval.openblas_coretype of the shard actors (default auto; '' inherits).",
    )
    args = parser.parse_args(argv)
    sizes, total_queries = xquad_shapes(args.data)
    pool1x = sum(sizes.values())
    print(
        f"XQuAD-R: {len(sizes)} shards, {pool1x} candidates, {total_queries} queries; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.profile:
        print(f"\nIn process, one thread: {args.queries} queries, top-{TOP_K}, best of {args.reps}")
        print("| pool | shards' search, sum | per shard | scores alone, sum | merge |")
        print("|---|---|---|---|---|")
        rows = []
        for scale in args.scales:
            r = profile_scale(scale, sizes, args.queries, args.reps)
            rows.append(r)
            each = sorted(r["search_s"].values())
            print(
                f"| {r['pool']} ({scale}x) | {sum(each) * 1e3:.0f} ms | "
                f"{each[0] * 1e3:.0f}-{each[-1] * 1e3:.0f} ms | "
                f"{sum(r['scores_s'].values()) * 1e3:.0f} ms | {r['merge_s'] * 1e3:.1f} ms |",
                flush=True,
            )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"load_end": os.getloadavg(), "profile": rows}, f, indent=1)
        return 0
    if not args.no_blas:
        print(f"\nBLAS check: {args.queries} x {pool1x} x {DIM} products (best of {args.reps})")
        print(
            "| OPENBLAS_CORETYPE | OpenBLAS says | faiss flat s | numpy f32 s | numpy f64 s | torch f32 s | torch f64 s |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in blas_check(args.queries, pool1x, args.reps):
            t = r["times"]
            cells = [
                f"{t[k]:.3f}" if k in t else ""
                for k in ("faiss flat", "numpy f32", "numpy f64", "torch f32", "torch f64")
            ]
            arch = ", ".join(f"{k.split('-')[0]}: {v}" for k, v in r["arch"].items())
            print(f"| {r['coretype']} | {arch} | " + " | ".join(cells) + " |", flush=True)
        if args.blas_only:
            return 0
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = [
        run_scale(
            s,
            sizes,
            min(args.queries, total_queries),
            args.reps,
            args.actor_coretype,
            args.actors,
        )
        for s in args.scales
    ]
    ray.shutdown()
    base = results[0]
    print(
        f"\nMultilingual top-{TOP_K} of {base['queries']} queries (best of {args.reps}; "
        "ms/query = time / queries). OPENBLAS_CORETYPE: this process "
        f"{os.environ.get('OPENBLAS_CORETYPE') or '(unset)'}, shard actors {base['actor_blas']}"
    )
    print(
        "| pool | method | s | queries/s | ms/query | vs single exact | ms/query vs first scale |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for name, t in r["times"].items():
            ratio = t / r["times"]["single exact"]
            growth = t / base["times"][name]
            print(
                f"| {r['pool']} ({r['scale']}x) | {name} | {t:.3f} | {r['queries'] / t:.0f} | "
                f"{1000 * t / r['queries']:.3f} | {ratio:.2f}x | {growth:.2f}x |",
                flush=True,
            )
        print(
            f"| {r['pool']} ({r['scale']}x) | (actor start-up, once) | {r['startup_s']:.2f} | | | | |"
        )
    print(
        "\nRatios: of the best times, and the median of the repetitions' paired ratios "
        "[95 % bootstrap interval]"
    )
    print("| pool | method | / faiss flat, best | paired | / faiss per language, best | paired |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t, every = r["times"], r["all_times"]
        r["ratios"] = {}
        for name in [m for m in t if m.startswith("sharded")]:
            cells = []
            for base_name in ("faiss flat", "faiss per language"):
                p = paired_ratio(every[name], every[base_name])
                r["ratios"][f"{name} / {base_name}"] = {"best": t[name] / t[base_name], **p}
                cells.append(
                    f"{t[name] / t[base_name]:.2f}x | {p['median']:.2f}x "
                    f"[{p['lo']:.2f}, {p['hi']:.2f}]"
                )
            print(f"| {r['pool']} ({r['scale']}x) | {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"load_end": os.getloadavg(), "results": results}, f, indent=1)
    print(
        f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the CPUs: "
        "compare rows of one run, not runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
