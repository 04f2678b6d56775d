"""FAISS indexes for a shard, and the OpenBLAS kernels their processes should use.

FAISS serves the approximate indexes of ``eval.index`` (``ivf_flat``, ``ivf_pq``, ``hnsw``, or
any ``faiss.index_factory`` string) and the ``faiss flat`` baselines of the benchmarks; the
exact default search is in :mod:`search`. Every index is built by ``faiss.index_factory`` from
an :class:`IndexSpec`; IVF and PQ are trained on a seeded sample of the shard.
:func:`check_index` runs before anything is encoded (sizes; the dimension where the model's
config gives it) so that a bad combination fails in one line, not after an hour of encoding.
Importing this module does not import faiss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import numpy as np

from rayhybrid.config import IndexParams
from rayhybrid.evaluation import EvaluationError

__all__ = [
    "INDEX_KINDS",
    "IndexSpec",
    "best_openblas_coretype",
    "build_faiss_index",
    "check_index",
    "openblas_env",
]

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw", "factory")


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


class IndexSpec:
    """Which FAISS index a shard builds (``eval.index``) and its parameters
    (``eval.index_params``, a :class:`~rayhybrid.config.IndexParams`).

    ``IndexSpec(kind, params)``, or ``IndexSpec(kind, nlist=16, ...)`` with the fields of
    :class:`~rayhybrid.config.IndexParams` as keywords. Zero means "choose from the shard":
    see :meth:`resolve`. ``kind`` ``ivf`` is the old spelling of ``ivf_flat``.

    Raises:
        EvaluationError: unknown kind.
        ConfigError: a parameter out of range (checked by IndexParams).
    """

    def __init__(self, kind: str = "flat", params: IndexParams | None = None, **options: Any):
        kind = "ivf_flat" if kind == "ivf" else kind  # old configs: IVF meant IVF-Flat
        if kind not in INDEX_KINDS:
            raise EvaluationError(
                f"eval.index: unknown index {kind!r}; expected one of {', '.join(INDEX_KINDS)}"
            )
        self.kind = kind
        self.params = dataclasses.replace(params or IndexParams(), **options)

    def __repr__(self) -> str:
        return f"IndexSpec({self.kind!r}, {self.params!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexSpec) and (self.kind, self.params) == (
            other.kind,
            other.params,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.params))

    @classmethod
    def from_config(cls, eval_cfg: Any) -> IndexSpec:
        """The spec of an :class:`~rayhybrid.config.EvalConfig` (``index`` and ``index_params``)."""
        return cls(eval_cfg.index, eval_cfg.index_params)

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    @property
    def ivf(self) -> bool:
        return self.kind in ("ivf_flat", "ivf_pq") or (
            self.kind == "factory" and re.match(r"\s*IVF\d", self.params.factory) is not None
        )

    def resolve(self, n: int, d: int) -> dict[str, Any]:
        """The parameters a shard of ``n`` vectors of dimension ``d`` gets.

        ``nlist`` 0: ~4 sqrt(n) lists, at most n / 39 (FAISS wants >= 39 training points per
        list); ``nprobe`` 0: a quarter of the lists (favouring recall); ``pq_m`` 0: the largest
        divisor of d not above d / 8 (8 dimensions per byte-sized code); ``train_sample`` 0:
        every vector up to 40 per list (IVF) or 40 per PQ centroid, whichever is more.
        """
        p = self.params
        out: dict[str, Any] = {"index": self.kind}
        if self.kind in ("ivf_flat", "ivf_pq"):
            nlist = p.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
            out.update(nlist=nlist, nprobe=min(nlist, p.nprobe or max(1, nlist // 4)))
        if self.kind == "ivf_pq":
            out.update(pq_m=p.pq_m or _divisor_at_most(d, max(1, d // 8)), pq_nbits=p.pq_nbits)
        if self.kind == "hnsw":
            out.update(hnsw_m=p.hnsw_m, ef_construction=p.ef_construction, ef_search=p.ef_search)
        if self.kind == "factory":
            lists = re.match(r"\s*IVF(\d+)", p.factory)
            if lists:
                out["nlist"] = int(lists.group(1))
            if p.nprobe:
                out["nprobe"] = p.nprobe
            # Whatever the string trains (lists, PQ / SQ codebooks): enough for 256 centroids.
            out["train_sample"] = min(n, p.train_sample or max(40 * out.get("nlist", 1), 10_240))
        elif self.ivf:
            need = max(40 * out["nlist"], 40 * 2 ** out.get("pq_nbits", 0))
            out["train_sample"] = min(n, p.train_sample or need)
        out["factory"] = self.factory_string(out)
        return out

    def factory_string(self, resolved: dict[str, Any]) -> str:
        """The ``faiss.index_factory`` string of resolved parameters."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf_flat":
            return f"IVF{resolved['nlist']},Flat"
        if self.kind == "ivf_pq":
            return f"IVF{resolved['nlist']},PQ{resolved['pq_m']}x{resolved['pq_nbits']}"
        if self.kind == "hnsw":
            return f"HNSW{resolved['hnsw_m']},Flat"
        return self.params.factory


def _divisor_at_most(n: int, m: int) -> int:
    return max(k for k in range(1, min(n, m) + 1) if n % k == 0)


def check_index(spec: IndexSpec, sizes: dict[str, int], dim: int | None) -> dict[str, dict]:
    """Check that every shard can build ``spec``, before anything is encoded.

    Args:
        spec: the index.
        sizes: candidates per shard (language).
        dim: embedding dimension, None where not known yet (then only size checks run).

    Returns:
        Per shard, the resolved parameters (:meth:`IndexSpec.resolve`); ``{}`` for ``flat``.

    Raises:
        EvaluationError: one line naming the knob and shard: more IVF lists than the shard
            has vectors, fewer than 39 training points per list, fewer training points than
            PQ centroids, ``pq_m`` not dividing the dimension, a factory string FAISS cannot
            build.
    """
    if not spec.approximate:
        return {}
    out = {}
    for lang, n in sorted(sizes.items(), key=lambda kv: kv[1]):  # the smallest shard first
        if n == 0:  # an empty shard has its own error (search.check_shard)
            continue
        r = spec.resolve(n, dim or 8)
        where = f"shard {lang!r} ({n} candidates)"
        if spec.ivf and "nlist" in r:
            if r["nlist"] > n:
                raise EvaluationError(
                    f"eval.index_params.nlist={r['nlist']} is more IVF lists than {where} has "
                    f"vectors; lower nlist to at most {max(1, n // 39)} (FAISS needs >= 39 "
                    "training points per list), or 0 to choose it from the shard"
                )
            if r["train_sample"] < 39 * r["nlist"] and n >= 39:
                raise EvaluationError(
                    f"eval.index_params: {r['train_sample']} training points for "
                    f"nlist={r['nlist']} lists in {where} is {r['train_sample'] / r['nlist']:.1f} "
                    f"per list; FAISS needs >= 39 training points per list: lower nlist to at most "
                    f"{max(1, r['train_sample'] // 39)} or raise eval.index_params.train_sample"
                )
        if "pq_nbits" in r and r["train_sample"] < 2 ** r["pq_nbits"]:
            raise EvaluationError(
                f"eval.index_params.pq_nbits={r['pq_nbits']} needs >= {2 ** r['pq_nbits']} "
                f"training points for its PQ centroids but {where} gives {r['train_sample']}; "
                "lower pq_nbits or raise train_sample"
            )
        if dim is not None:
            if "pq_m" in r and dim % r["pq_m"]:
                raise EvaluationError(
                    f"eval.index_params.pq_m={r['pq_m']} does not divide the embedding dimension "
                    f"{dim}; expected a divisor of {dim} such as {_divisor_at_most(dim, r['pq_m'])}"
                )
            _faiss_index(r["factory"], dim)
        out[lang] = r
    return out


def _faiss_index(factory: str, dim: int) -> Any:
    """``faiss.index_factory`` for inner product; FAISS's refusal as one line."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        line = next((t for t in text if "failed" in t or "could not" in t), text[0] if text else "")
        # FAISS's "Error in <function> at <file>:<line>: Error: '<check>' failed: <reason>"
        reason = line.split("failed: ", 1)[1] if "failed: " in line else line.rsplit(": ", 1)[-1]
        raise EvaluationError(
            f"eval.index: FAISS cannot build index {factory!r} for dimension {dim}: {reason}"
        ) from None


def build_faiss_index(
    emb: np.ndarray,
    spec: IndexSpec | str = "flat",
    *,
    use_gpu: bool = False,
    name: str = "shard",
    **options: Any,
) -> Any:
    """A FAISS inner-product index over ``emb``.

    Args:
        emb: ``[n, d]`` float32 vectors.
        spec: an :class:`IndexSpec`, or its ``kind`` with ``options`` as its fields
            (``build_faiss_index(x, "ivf_flat", nlist=16)``).
        use_gpu: move the index to GPU 0 where faiss-gpu is installed and sees a GPU (FAISS
            has no GPU HNSW: that stays on the CPU, as does an index the GPU cannot hold).
        name: the shard, for error messages.

    Raises:
        EvaluationError: unknown kind, or parameters the shard cannot satisfy
            (:func:`check_index`).
    """
    import faiss

    spec = spec if isinstance(spec, IndexSpec) else IndexSpec(spec, **options)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if not spec.approximate:
        index = faiss.IndexFlatIP(d)
        index.add(emb)
        return _to_gpu(index) if use_gpu else index
    r = check_index(spec, {name: n}, d)[name]
    index = _faiss_index(r["factory"], d)
    ivf = faiss.try_extract_index_ivf(index)
    base = faiss.downcast_index(index)
    if ivf is not None:
        ivf.cp.seed = spec.params.seed  # k-means initialisation (its sample is ours, below)
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.seed = spec.params.seed
    if hasattr(base, "hnsw"):
        base.hnsw.efConstruction = spec.params.ef_construction
    if not index.is_trained:
        rows = np.random.default_rng(spec.params.seed).choice(n, r["train_sample"], replace=False)
        index.train(emb[np.sort(rows)])  # sorted: the sample, not its order, is random
    index.add(emb)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, r.get("nprobe") or max(1, ivf.nlist // 4))
    if hasattr(base, "hnsw"):
        base.hnsw.efSearch = spec.params.ef_search
    return _to_gpu(index) if use_gpu and not hasattr(base, "hnsw") else index


def _to_gpu(index: Any) -> Any:
    """The index on GPU 0 where faiss-gpu and a GPU are there; else (with a warning on a
    refusal, e.g. a PQ code size the GPU kernels lack) the CPU index itself."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError as exc:
        log.warning(f"[rayhybrid eval] FAISS index stays on the CPU: {str(exc).splitlines()[0]}")
        return index
