"""FAISS indexes for a shard, and the OpenBLAS kernels their processes should use.

FAISS serves the approximate ``ivf`` / ``hnsw`` options (and the ``faiss flat`` baseline of
benchmarks/bench_search.py); the exact default search is in :mod:`search`. Importing this
module does not import faiss.
"""

from __future__ import annotations

import math

import numpy as np

from rayhybrid.evaluation import EvaluationError

__all__ = ["best_openblas_coretype", "build_faiss_index", "openblas_env"]


def best_openblas_coretype() -> str | None:
    """The fastest OpenBLAS kernels this CPU runs, from its flags (None if unknown).

    SkylakeX kernels need AVX-512 F/BW/DQ/VL, Haswell kernels AVX2 + FMA.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(
                next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
            )
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def openblas_env(setting: str) -> dict[str, str]:
    """Environment for a process that should use the given OpenBLAS core type.

    OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it loads (numpy's at process start), so
    this goes into the environment of *new* processes (Ray actors' ``runtime_env``).
    The OpenBLAS 0.3.15 in the faiss-cpu wheel does not know AMD Zen 4/5 and falls back to
    "Barcelona" (SSE-era) kernels; forcing Haswell is the usual workaround, but on an
    AVX-512 CPU the SkylakeX kernels are faster still (benchmarks/bench_search.py).

    Args:
        setting: ``auto`` (:func:`best_openblas_coretype`), empty (inherit), or a core type.
    """
    core = best_openblas_coretype() if setting == "auto" else setting
    return {"OPENBLAS_CORETYPE": core} if core else {}


def build_faiss_index(
    emb: np.ndarray,
    kind: str,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    use_gpu: bool = False,
):
    """A FAISS inner-product index over ``emb`` (``flat``, ``ivf`` or ``hnsw``).

    IVF: ``nlist`` defaults to ~4 sqrt(n) lists (at most n / 39), ``nprobe`` to a quarter of them (favouring
    recall; the top-k is re-scored exactly anyway). HNSW: ``M = hnsw_m``, ``efSearch``.

    Raises:
        EvaluationError: unknown kind.
    """
    import faiss

    n, d = emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        # FAISS wants >= 39 training points per list; 4 sqrt(n) lists otherwise.
        nlist = max(1, min(n // 39, nlist or int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = max(1, min(nlist, nprobe or nlist // 4))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise EvaluationError(f"eval.index: unknown index {kind!r}; expected flat, ivf or hnsw")
    index.add(emb)
    # HNSW has no GPU implementation in FAISS; flat / IVF move over when faiss-gpu is there.
    if (
        use_gpu
        and kind != "hnsw"
        and hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
    ):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index
