"""Approximate indexes against exact search at 1 M candidates: build time, queries/s, memory, recall.

    nice -n 10 python benchmarks/bench_ann.py                       # 1 M x 384, 1000 queries
    python benchmarks/bench_ann.py --n 100000 --queries 200         # a quick look

Pool: ``--n`` unit vectors of dimension ``--dim`` (384, MiniLM's) drawn around ``--centres``
random centres (a clustered pool, so that IVF lists mean something; noise 1.0 per dimension
against centres of norm ~sqrt(d), then normalised); queries drawn the same way from another
seed. Every index is built by rayhybrid's own
:func:`~rayhybrid.evaluation.faiss_index.build_faiss_index` from an
:class:`~rayhybrid.evaluation.faiss_index.IndexSpec` (faiss ``index_factory``, trained on a
seeded sample); ``flat`` is faiss ``IndexFlatIP`` in the same run, and its top-k is the exact
reference of every recall figure (recall@k = |approximate top-k ∩ exact top-k| / k, the
definition of :mod:`rayhybrid.evaluation.recall`).

Reported per index: build seconds (train + add), queries/s of ``index.search`` for all queries
at once with top-``--k`` (faiss's OpenMP threads = ``--threads``), index memory (the size of
``faiss.serialize_index``: the vectors, codes, lists and graph), recall@10 and recall@k.
Indexes are built one at a time and freed, so peak memory is about the pool plus one index
plus its serialized copy (~4.5 GB at 1 M x 384 float32). Prints a Markdown table and writes
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import numpy as np


def clustered(n: int, dim: int, centres: np.ndarray, seed: int, chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors, each a random centre plus N(0, 1) noise per dimension, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centres[rng.integers(0, len(centres), b - a)]
        x = x + rng.standard_normal((b - a, dim), dtype=np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(
    name: str, index, queries: np.ndarray, k: int, exact: np.ndarray | None, build_s: float
):
    import faiss

    from rayhybrid.evaluation.recall import overlap

    t = time.perf_counter()
    _, keys = index.search(queries, k)
    search_s = time.perf_counter() - t
    mem = int(faiss.serialize_index(index).nbytes)
    truth = keys if exact is None else exact
    row = {
        "index": name,
        "build_s": round(build_s, 2),
        "queries_per_s": round(len(queries) / search_s, 1),
        "memory_mb": round(mem / 2**20, 1),
        "recall_at_10": float((overlap(keys[:, :10], truth[:, :10]) / 10).mean()),
        f"recall_at_{k}": float((overlap(keys, truth) / k).mean()),
    }
    print(json.dumps(row), flush=True)
    return row, keys


def main() -> None:
    import faiss

    from rayhybrid.evaluation.faiss_index import IndexSpec, build_faiss_index

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--train-sample", type=int, default=65_536)
    ap.add_argument("--pq-m", type=int, default=48)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--only", default="flat,ivf_flat,ivf_pq,hnsw")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    t = time.perf_counter()
    pool = clustered(args.n, args.dim, centres, seed=1)
    queries = clustered(args.queries, args.dim, centres, seed=2)
    print(f"pool {pool.shape} made in {time.perf_counter() - t:.1f}s", flush=True)
    common = {"seed": 0, "train_sample": args.train_sample}
    specs = {
        "flat": IndexSpec("flat"),
        "ivf_flat": IndexSpec("ivf_flat", nlist=args.nlist, nprobe=args.nprobe, **common),
        "ivf_pq": IndexSpec(
            "ivf_pq", nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, pq_nbits=8, **common
        ),
        "hnsw": IndexSpec(
            "hnsw",
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
            ef_search=args.ef_search,
        ),
    }
    rows, exact = [], None
    for name in ["flat"] + [s for s in args.only.split(",") if s != "flat"]:
        t = time.perf_counter()
        index = build_faiss_index(pool, specs[name])
        build_s = time.perf_counter() - t
        row, keys = measure(name, index, queries, args.k, exact, build_s)
        row["factory"] = specs[name].resolve(args.n, args.dim)["factory"]
        if name == "flat":
            exact = keys
        rows.append(row)
        del index
        gc.collect()
    k = args.k
    print(
        f"\n{args.n:,} candidates x {args.dim}, {args.queries} queries, top-{k}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}, "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print(f"| index | faiss factory | build s | queries/s | memory MB | recall@10 | recall@{k} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['index']} | `{r['factory']}` | {r['build_s']:.1f} | {r['queries_per_s']:.0f} | "
            f"{r['memory_mb']:.0f} | {r['recall_at_10']:.4f} | {r[f'recall_at_{k}']:.4f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
