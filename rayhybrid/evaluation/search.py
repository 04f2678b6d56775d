"""The searcher of one candidate shard and the top-k merge: pure numpy / torch / FAISS, no Ray.

Scores are inner products of the embeddings (cosine similarity for L2-normalised ones).

**Scores.** On the CPU a score is the float32 inner product computed by a BLAS ``sgemm``,
the kind of kernel faiss ``IndexFlatIP`` uses: about 2x faster than the float64
accumulation this replaced, half the memory. A float32 product is only worth ranking by if
a pair scores the same in every shard, batch and tile it is computed in. Whether a BLAS
gives that (each output element summed in the same order whatever the matrix shape or the
element's place in it) depends on its kernels: :func:`f32_backend` checks it once per
process (several shapes and offsets of one product, and one thread against several, must
agree bit for bit) and picks the first that passes: numpy's OpenBLAS (its AVX-512 kernels
pass; its Haswell / Zen kernels, on AVX2-only CPUs, do not), then torch's BLAS (MKL in the
x86 wheels, which passes on AVX2-only CPUs). Their ``gemv`` (a product with one row or
column) and small-matrix kernels sum in other orders, so :func:`exact_scores` pads small
products with zero rows. Where neither passes, the searcher falls back to float64-
accumulated scores rounded to float32 (``scores="float64"``). Two processes must run the
same kernels to agree (the shard actors get ``eval.openblas_coretype``; numpy picks the same
on this class of CPU by itself; MKL dispatches by CPU). Against float64 accumulation, a
float32 score differs by at most ~``d * 2**-24 * |q| |c|``, so the two orders differ only
among candidates whose scores lie that close (near-ties; tests/test_eval_search.py checks
it). On a GPU (``device="cuda"``) scores stay float64-accumulated in torch.

**Top-k.** A shard of at most ``_PARTITION_RATIO * (k + 1)`` candidates takes its top-k from
the whole score block (:func:`_select`: a partition of the values finds each row's k+1-th
largest, the columns above it are the k best, and one integer sort puts them in order);
larger shards keep the k+1 best scores of every query over the tiles in a faiss heap
(``float_minheap_array_t.addn``, the one ``IndexFlatIP`` runs on its score tiles). Either
way the k+1-th shows whether equal scores cross the cut (then that query is redone with a
full ordering), and the k kept are put in (score descending, key ascending) order.

**Order and ties.** Candidates are ranked by score, descending; equal scores are broken by
the candidate's *key* (ascending). The caller chooses the keys; :mod:`retrieval` uses each
candidate's position in the list of all candidate ids sorted in *reverse* lexicographic
order, which is exactly how ``trec_eval`` (and ``pytrec_eval``) break ties, so those tools
recompute identical numbers from the written runs even where scores tie (duplicate
sentences do occur in XQuAD-R).

**Full-depth ranks without full rankings.** :meth:`ShardSearcher.count_before` returns, for
given (score, key) thresholds, how many of the shard's candidates rank before them. Summed
over shards it gives the exact rank of a relevant candidate in the whole multilingual pool.

**Indexes.** ``flat`` (default) is the exact search above. ``ivf_flat`` / ``ivf_pq`` /
``hnsw`` / ``factory`` (:class:`~rayhybrid.evaluation.faiss_index.IndexSpec`) use a FAISS
index for the top-k only (approximate; the returned candidates are re-scored exactly);
ranks of relevant candidates stay exact (they scan the shard), so full-depth metrics do not
depend on the index. ``search(..., exact=True)`` runs the exact path on a shard that has an
approximate index: the reference its recall is measured against (:mod:`recall`). On a GPU (``device="cuda"``) the exact search runs in torch on the
GPU, and an IVF index moves to the GPU when faiss-gpu is installed.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.faiss_index import IndexSpec, build_faiss_index

log = logging.getLogger(__name__)

__all__ = [
    "SearchResult",
    "ShardSearcher",
    "check_shard",
    "exact_scores",
    "f32_backend",
    "merge_topk",
    "topk_with_ties",
]

# Elements of one score block (rows x tile columns): bounds memory at ~64 MiB of float32.
_BLOCK_ELEMENTS = 1 << 24
# Multiply-adds below which a product is padded (above OpenBLAS's small-matrix kernels).
_MIN_MNK = 1 << 21
# Rows or columns below which a product is padded (gemv, MKL's small-size kernels).
_MIN_SIDE = 16
# Score elements up to which torch computes candidates x queries and transposes (_f32_scores).
_TRANSPOSED_MAX = 1 << 22
# Columns per tile: larger shards are scored tile by tile (ShardSearcher._tiles).
_TILE = 1 << 15
# Shards of at most this many times k+1 candidates take their top-k from the whole score
# block (_select), larger ones by faiss's heap. A heap over n scores inserts ~k(1 + ln(n/k))
# times per query, and an insertion costs what scanning dozens of scores does; a partition
# is linear in n with a larger constant. Whole shard search of 2048 queries, k = 100, one
# thread (AVX2 EPYC, scores included, best of 7), partition / heap: n = 1,183: 44 / 72 ms;
# 2,366: 107 / 118; 4,732: 180 / 205; 9,464: 284 / 310; 18,928: 556 / 548.
_PARTITION_RATIO = 128


@dataclass
class SearchResult:
    """What one shard returns for a batch of queries.

    Attributes:
        scores: ``[n, k]`` float32 top-k scores, best first.
        keys: ``[n, k]`` int64 keys of the top-k candidates (-1 where an approximate index
            returned fewer than k; their score is -inf).
        rel_scores: ``[n, m]`` float32 exact scores of the requested relevant candidates
            (NaN in padding).
        rel_ranks: ``[n, m]`` int64 1-based rank of each requested candidate within this
            shard (0 in padding).
    """

    scores: np.ndarray
    keys: np.ndarray
    rel_scores: np.ndarray
    rel_ranks: np.ndarray


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    return x if len(x) >= n else np.concatenate([x, np.zeros((n - len(x), x.shape[1]), x.dtype)])


def _f32_scores(
    queries: np.ndarray, candidates: np.ndarray, backend: str, transposed: bool | None = None
) -> np.ndarray:
    """``queries @ candidates.T`` in float32 by the blocked ``sgemm`` kernels only.

    ``backend``: ``numpy`` (numpy's OpenBLAS) or ``torch`` (torch's BLAS: MKL in the x86
    wheels). A product with one row or column goes to ``gemv``, and small products go to
    "small matrix" kernels (OpenBLAS: rows x columns x dim <= 10**6; MKL: fewer than about 16
    rows or columns); both sum in other orders (module docstring). Small products are
    therefore padded with zero rows to at least ``_MIN_SIDE`` rows and columns and
    ``_MIN_MNK`` multiply-adds, and the result cut back. ``transposed`` (torch): compute
    candidates x queries and transpose; None: for products of at most ``_TRANSPOSED_MAX``.
    """
    nq, nc = len(queries), len(candidates)
    if nq == 0 or nc == 0:
        return np.zeros((nq, nc), np.float32)
    d = max(1, queries.shape[1])
    q, c = queries, candidates
    if min(nq, nc) < _MIN_SIDE or nq * nc * d <= _MIN_MNK:
        m = max(_MIN_SIDE, math.isqrt(_MIN_MNK // d) + 1)
        q, c = _pad_rows(q, m), _pad_rows(c, m)
    if backend == "torch":
        import torch

        # torch.from_numpy shares memory; a read-only array (object store) is copied first.
        tq, tc = (torch.from_numpy(x if x.flags.writeable else x.copy()) for x in (q, c))
        if transposed is None:
            transposed = len(q) * len(c) <= _TRANSPOSED_MAX
        # Candidates x queries, transposed by torch, is ~15-25 % faster with MKL on AVX2 for
        # blocks that stay in cache (2048 x 1183, one thread: ~26 vs ~32 ms; the transpose
        # ~3 ms); above _TRANSPOSED_MAX the transpose costs more than it saves. Both give
        # every pair the same bits (_shape_independent checks it).
        s = torch.mm(tc, tq.T).T.contiguous() if transposed else torch.mm(tq, tc.T)
        s = s.numpy()
    else:
        s = q @ c.T
    return s if (len(q), len(c)) == (nq, nc) else np.ascontiguousarray(s[:nq, :nc])


def exact_scores(queries: np.ndarray, candidates: Any) -> Any:
    """Scores of every query against every candidate, the same bits in any shard or batch.

    ``candidates``: a float32 numpy array (CPU: the float32 product of :func:`f32_backend`,
    or float64 accumulation rounded to float32 where no backend passes), a float64 numpy
    array (the float64 fallback: accumulated in float64, rounded once to float32), or a
    float64 CUDA tensor (GPU: a torch tensor on that device). See the module docstring.
    """
    if isinstance(candidates, np.ndarray):
        backend = f32_backend() if candidates.dtype == np.float32 else None
        if backend is not None:
            return _f32_scores(np.asarray(queries, np.float32), candidates, backend)
        c64 = np.asarray(candidates, np.float64)  # float64 shards: no copy per tile
        return (queries.astype(np.float64) @ c64.T).astype(np.float32)
    import torch

    q = torch.from_numpy(queries).to(candidates.device, torch.float64)
    return (q @ candidates.T).float()


def _one_thread(backend: str) -> Any:
    """A context in which ``backend``'s BLAS runs on one thread (shard actors often do)."""
    if backend == "torch":
        import contextlib

        import torch

        @contextlib.contextmanager
        def limit():
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(n)

        return limit()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _shape_independent(backend: str) -> bool:
    """One product of 300 queries x 700 candidates (d = 96) against the same pairs computed
    in sub-blocks of other shapes and offsets (single rows and columns, small blocks that
    :func:`_f32_scores` pads, large ones it does not), in both orientations and on one
    thread."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((300, 96)).astype(np.float32)
    c = rng.standard_normal((700, 96)).astype(np.float32)
    full = _f32_scores(q, c, backend)
    blocks = [(0, 1, 0, 700), (5, 6, 3, 4), (0, 300, 7, 8), (3, 41, 17, 150), (1, 3, 0, 2)]
    blocks += [(17, 290, 33, 680), (100, 164, 0, 700), (0, 300, 350, 700)]
    if not all(
        np.array_equal(_f32_scores(q[a:b], c[x:y], backend), full[a:b, x:y])
        for a, b, x, y in blocks
    ):
        return False
    for transposed in (False, True):  # both orientations of the torch product
        if not np.array_equal(_f32_scores(q, c, backend, transposed), full):
            return False
    with _one_thread(backend):
        return np.array_equal(_f32_scores(q, c, backend), full)


@functools.cache
def f32_backend() -> str | None:
    """The BLAS whose float32 products give a pair the same bits in any shape, or None.

    ``numpy`` (numpy's OpenBLAS; its AVX-512 kernels pass, its Haswell / Zen kernels on
    AVX2-only CPUs do not) is tried first, then ``torch`` (MKL in torch's x86 wheels, which
    passed on an AVX2-only AMD EPYC); None: neither, the searcher scores in float64. Checked
    once per process (:func:`_shape_independent`).
    """
    backend = next((b for b in ("numpy", "torch") if _shape_independent(b)), None)
    log.debug(f"[rayhybrid eval] float32 score backend of this process: {backend}")
    return backend


def _ptr(a: np.ndarray) -> Any:
    """faiss pointer to a C-contiguous array (the caller keeps the array alive)."""
    import faiss

    if not a.flags.c_contiguous:
        raise EvaluationError("internal: a score tile must be C-contiguous")
    return faiss.swig_ptr(a)


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def _gather(scores: Any, cols: np.ndarray) -> np.ndarray:
    """scores[row, cols[row, j]] for cols inside the block (others: any value, masked later)."""
    safe = np.clip(cols, 0, scores.shape[1] - 1)
    if isinstance(scores, np.ndarray):
        return np.take_along_axis(scores, safe, 1)
    import torch

    return _host(scores.gather(1, torch.from_numpy(safe).to(scores.device)))


def _stable_desc(row: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k of one row by (score descending, column ascending)."""
    if isinstance(row, np.ndarray):
        cols = np.argsort(-row, kind="stable")[:k]
        return row[cols], cols
    import torch

    v, c = torch.sort(row, descending=True, stable=True)
    return _host(v[:k]), _host(c[:k])


def _sort_keys(vals: np.ndarray, tie: np.ndarray) -> np.ndarray | None:
    """uint64 keys whose ascending order is (value descending, tie ascending), or None.

    The float32 bits are mapped to an int32 of the same order (negative floats: every bit
    but the sign flipped), and that int sits above the tie value in one integer: one sort
    of integers replaces the two stable argsorts of a (value, tie) ordering. None where the
    values are not float32, hold a NaN, or a tie value is outside [0, 2**32).
    """
    tie = np.asarray(tie)
    if vals.dtype != np.float32 or tie.size == 0 or np.isnan(vals).any():
        return None
    if tie.min() < 0 or tie.max() > 0xFFFFFFFF:
        return None
    bits = (vals + np.float32(0)).view(np.int32)  # + 0: -0.0 becomes +0.0 (equal scores)
    mono = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)  # int order = float order
    high = (0x7FFFFFFF - mono).astype(np.uint64) << np.uint64(32)  # larger score: smaller key
    return high | tie.astype(np.uint64)


def _order_rows(vals: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Per row, the order by (value descending, tie ascending); equal pairs keep their order.

    One stable argsort of :func:`_sort_keys`; two stable argsorts (by tie, then by value)
    where those keys cannot be built.
    """
    keys = _sort_keys(vals, tie)
    if keys is not None:
        return np.argsort(keys, axis=1, kind="stable")
    by_tie = np.argsort(tie, axis=1, kind="stable")
    by_val = np.argsort(-np.take_along_axis(vals, by_tie, 1), axis=1, kind="stable")
    return np.take_along_axis(by_tie, by_val, 1)


def _row_take(vals: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``vals[r, cols[r, j]]``: ``np.take_along_axis`` as one flat ``np.take`` where ``vals``
    is C-contiguous (2048 x 100 of 2048 x 1,183: ~0.6 vs ~1.5 ms here; take_along_axis
    builds a broadcast index per axis)."""
    if not vals.flags.c_contiguous or vals.ndim != 2:
        return np.take_along_axis(vals, cols, 1)
    offsets = np.arange(len(vals), dtype=np.int64)[:, None] * vals.shape[1]
    return np.take(vals.reshape(-1), cols + offsets)


def _columns_in_order(vals: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """``cols`` (the columns of each row's k best) by (score descending, column ascending):
    the tie value is the column, so the sorted keys carry the answer in their low bits.
    None where :func:`_sort_keys` cannot build the keys."""
    keys = _sort_keys(_row_take(vals, cols), cols)
    if keys is None:
        return None
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _above_cut(vals: np.ndarray, k: int) -> np.ndarray | None:
    """Per row, the columns of the k values above the row's k+1-th largest, in column order;
    None where a tie crosses the cut in some row (then fewer than k are above it).

    A partition of the values finds the k+1-th largest (about half the time of an
    argpartition, which moves the indices too), and one pass over the rows picks the
    columns above it. No row has more than k above its k+1-th largest, so all rows have
    exactly k when the whole matrix has rows x k.
    """
    rows, n = vals.shape
    cut = np.partition(vals, n - k - 1, axis=1)[:, n - k - 1 : n - k]
    flat = np.flatnonzero(vals > cut)
    if len(flat) != rows * k:
        return None
    return flat.reshape(rows, k) - (np.arange(rows, dtype=np.int64) * n)[:, None]


def _select(vals: np.ndarray, tie: np.ndarray | None, k: int) -> np.ndarray:
    """Per row, the indices of the k best entries by (value descending, tie ascending).

    ``tie`` None means the column index: float32 rows take their k columns from
    :func:`_above_cut` unless a tie crosses the cut in one of them. Otherwise
    ``argpartition`` around the k+1-th largest value puts the k best (as values) after it,
    but picks an arbitrary subset of entries that tie with the k-th; a tie crosses the cut
    exactly where the k-th and k+1-th values are equal, and those rows are redone with a
    full ordering (rare: exact duplicates).
    """
    n = vals.shape[1]
    columns = tie is None
    if columns:
        tie = np.broadcast_to(np.arange(n), vals.shape)
    if k >= n:
        return _order_rows(vals, tie)
    if columns and vals.dtype == np.float32:
        cols = _above_cut(vals, k)
        ordered = None if cols is None else _columns_in_order(vals, cols)
        if ordered is not None:
            return ordered
    part = np.argpartition(vals, n - k - 1, axis=1)
    idx = part[:, n - k :]
    top = np.take_along_axis(vals, idx, 1)
    nxt = np.take_along_axis(vals, part[:, n - k - 1 : n - k], 1)[:, 0]
    for row in np.flatnonzero(top.min(axis=1) == nxt).tolist():
        idx[row] = _order_rows(vals[row : row + 1], tie[row : row + 1])[0, :k]
        top[row] = vals[row, idx[row]]
    ordered = _columns_in_order(vals, idx) if columns else None
    if ordered is not None:
        return ordered
    sub = _order_rows(top, np.take_along_axis(tie, idx, 1))
    return np.take_along_axis(idx, sub, 1)


def topk_with_ties(scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row by (score descending, column ascending).

    ``scores``: a numpy array (CPU) or torch tensor (GPU); ties with the k-th score are
    resolved by column, never by the partial sort's whim.

    Returns:
        ``(values [n, k] float32, columns [n, k] int64)``, best first.
    """
    k = min(k, scores.shape[1])
    if isinstance(scores, np.ndarray):
        cols = _select(scores, None, k).astype(np.int64)
        return _row_take(scores, cols), cols
    import torch

    if k == scores.shape[1]:  # the whole ranking: one stable sort
        cols = _host(torch.sort(scores, dim=1, descending=True, stable=True)[1]).astype(np.int64)
        return np.take_along_axis(_host(scores), cols, 1), cols
    v, c = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    n_ge = _host((scores >= v[:, -1:]).sum(dim=1))
    vals, cols = _host(v), _host(c).astype(np.int64)
    for row in np.flatnonzero(n_ge > k).tolist():
        vals[row], cols[row] = _stable_desc(scores[row], k)
    order = _order_rows(vals, cols)
    return np.take_along_axis(vals, order, 1), np.take_along_axis(cols, order, 1)


def _count_before(scores: Any, thr: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Per (row, j): #columns with score > thr[row, j], plus ties at columns < boundary[row, j].

    numpy on CPU, torch on GPU (same operators on both).
    """
    if isinstance(scores, np.ndarray):
        s, t, b = scores, thr, boundary
        col, out = np.arange(s.shape[1]), np.zeros(thr.shape, np.int64)
    else:
        import torch

        s = scores
        t, b = (torch.from_numpy(np.ascontiguousarray(x)).to(s.device) for x in (thr, boundary))
        col = torch.arange(s.shape[1], device=s.device)
        out = torch.zeros(thr.shape, dtype=torch.int64, device=s.device)
    numpy = isinstance(s, np.ndarray)
    for j in range(thr.shape[1]):  # one pass per threshold column keeps memory at [rows, n]
        tj = t[:, j : j + 1]
        out[:, j] = np.count_nonzero(s > tj, axis=1) if numpy else (s > tj).sum(1)
        eq = s == tj
        if bool(eq.any()):
            out[:, j] += (eq & (col[None, :] < b[:, j : j + 1])).sum(1)
    return _host(out)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into one top-k by (score descending, key ascending).

    Args:
        parts: per shard ``(scores [n, k_i], keys [n, k_i])`` for the same n queries, each
            row best first (as :meth:`ShardSearcher.search` returns them).
        k: depth of the merged list (at most the sum of the k_i).

    Returns:
        ``(scores [n, k], keys [n, k])``. Equal to one exact search over the union of the
        shards when every shard returned its own exact top-k (k_i >= k or its whole shard).
    """
    if not parts:
        raise EvaluationError("merge_topk: no shard results to merge")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    k = min(k, scores.shape[1])
    width = {p[0].shape[1] for p in parts}
    padded = any((p[1] < 0).any() for p in parts)  # approximate lists pad with -1 keys
    if len(parts) == 1 or len(width) > 1 or k > min(width) or k == 0 or padded:
        keys = np.concatenate([p[1] for p in parts], axis=1)
        order = _select(scores, keys, k)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
    # Lists of one width, each best first: faiss merges them with a heap over the shards
    # (~6x faster than selecting from the concatenation). It breaks a tie by shard, not by
    # key, so a query with equal scores among its k merged, or a tie across the cut (more
    # than k scores >= its k-th), is redone by (score, key) from the concatenation.
    import faiss

    vals, found = faiss.merge_knn_results(
        np.stack([np.asarray(p[0], np.float32) for p in parts]),
        np.stack([np.asarray(p[1], np.int64) for p in parts]),
        keep_max=True,
    )
    vals, found = vals[:, :k], found[:, :k]
    tied = (vals[:, 1:] == vals[:, :-1]).any(axis=1)
    tied |= np.count_nonzero(scores >= vals[:, -1:], axis=1) > k
    rows = np.flatnonzero(tied)
    if len(rows):
        keys = np.concatenate([p[1][rows] for p in parts], axis=1)
        order = _select(scores[rows], keys, k)
        vals[rows] = np.take_along_axis(scores[rows], order, 1)
        found[rows] = np.take_along_axis(keys, order, 1)
    return vals, found


def check_shard(
    name: str, embeddings: np.ndarray, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one shard's embeddings and keys; returns them as float32 / int64 arrays.

    Raises:
        EvaluationError: empty shard, not a 2-D finite array, keys of the wrong length or
            not distinct.
    """
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise EvaluationError(
            f"shard {name!r} is empty: expected a [n, dim] array of candidate "
            f"embeddings with n >= 1, got shape {tuple(emb.shape)} (no "
            "candidates in this language?)"
        )
    if not np.isfinite(emb).all():
        raise EvaluationError(f"shard {name!r}: embeddings contain NaN or inf")
    keys = np.arange(len(emb), dtype=np.int64) if keys is None else np.asarray(keys, np.int64)
    if keys.shape != (len(emb),) or len(np.unique(keys)) != len(keys):
        raise EvaluationError(
            f"shard {name!r}: expected {len(emb)} distinct keys, got shape "
            f"{keys.shape} with {len(np.unique(keys))} distinct"
        )
    return emb, keys


class ShardSearcher:
    """The candidates of one shard (one language) and their search index.

    Args:
        name: shard name used in error messages (the language).
        embeddings: ``[n, d]`` candidate embeddings (n >= 1, finite).
        keys: ``[n]`` distinct int tie-break keys (default ``0..n-1``); results name
            candidates by key. Stored sorted by key so column order is tie order.
        index: ``flat`` (exact), or an approximate FAISS index for the top-k: an
            :class:`~rayhybrid.evaluation.faiss_index.IndexSpec`, or its kind (``ivf_flat``,
            ``ivf_pq``, ``hnsw``; ``ivf`` = ``ivf_flat``) with ``index_options`` as its fields.
        device: ``cpu`` or ``cuda``.
        tile: candidates scored at once (larger shards go tile by tile; same results).
        scores: ``float32`` (CPU default: ``sgemm``, where :func:`f32_backend` finds one) or
            ``float64`` (accumulated in float64, rounded to float32; always on a GPU).

    Raises:
        EvaluationError: empty shard, not a 2-D finite array, keys of the wrong length or
            not distinct; index parameters the shard cannot satisfy.
    """

    def __init__(
        self,
        name: str,
        embeddings: np.ndarray,
        keys: np.ndarray | None = None,
        *,
        index: str | IndexSpec = "flat",
        device: str = "cpu",
        tile: int = _TILE,
        scores: str = "float32",
        **index_options: Any,
    ) -> None:
        emb, keys = check_shard(name, embeddings, keys)
        if scores not in ("float32", "float64"):
            raise EvaluationError(
                f"shard {name!r}: scores must be float32 or float64, got {scores!r}"
            )
        spec = index if isinstance(index, IndexSpec) else IndexSpec(index, **index_options)
        order = np.argsort(keys, kind="stable")
        self.name, self.keys, self.kind, self.device = name, keys[order], spec.kind, device
        self.tile = max(1, int(tile))
        emb = emb[order]
        if device != "cpu":
            import torch

            self.scores = "float64"
            self._cand: Any = torch.from_numpy(emb).to(device=device, dtype=torch.float64)
        else:
            f32 = scores == "float32" and f32_backend() is not None
            self.scores = "float32" if f32 else "float64"
            # float32: the candidates as they are (half the memory of the float64 copy).
            self._cand = emb if f32 else emb.astype(np.float64)
        self._faiss = None
        if spec.approximate:
            self._faiss = build_faiss_index(emb, spec, use_gpu=device != "cpu", name=name)

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        return int(self._cand.shape[1])

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        q = q if q.flags.writeable and q.flags.c_contiguous else np.array(q, order="C")
        if q.ndim != 2 or q.shape[1] != self.dim:
            got = q.shape[1] if q.ndim == 2 else tuple(q.shape)
            raise EvaluationError(
                f"shard {self.name!r}: query embeddings have dimension {got} but the shard's index "
                f"has dimension {self.dim} (queries and candidates encoded with different models?)"
            )
        return q

    def _blocks(self, n: int):
        """Row blocks of the query matrix: one block x one tile stays within _BLOCK_ELEMENTS."""
        step = max(1, min(4096, _BLOCK_ELEMENTS // min(self.size, self.tile)))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def _tiles(self) -> list[tuple[int, int]]:
        """Column tiles: a large shard is scored tile by tile, so that a row block stays
        large and the candidate matrix is streamed from memory a few times, not once per
        handful of rows."""
        return [(a, min(a + self.tile, self.size)) for a in range(0, self.size, self.tile)]

    def _scores(self, q: np.ndarray, start: int = 0, stop: int | None = None) -> Any:
        return exact_scores(q, self._cand[start:stop])

    def _boundary(self, keys: np.ndarray) -> np.ndarray:
        """Per key: how many shard candidates have a smaller key (they win a tie against it)."""
        return np.searchsorted(self.keys, keys, side="left")

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Column of each key in this shard (-1 padding stays -1).

        Raises:
            EvaluationError: a key is not in this shard.
        """
        keys = np.asarray(keys, np.int64)
        pos = np.searchsorted(self.keys, keys).clip(0, self.size - 1)
        bad = (keys >= 0) & (self.keys[pos] != keys)
        if bad.any():
            raise EvaluationError(
                f"shard {self.name!r}: candidate key {int(keys[bad][0])} is not in this shard"
            )
        return np.where(keys >= 0, pos, -1)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        rel_keys: np.ndarray | None = None,
        exact: bool = False,
    ) -> SearchResult:
        """Top-k of every query in this shard, and the exact score / in-shard rank of given keys.

        Args:
            queries: ``[n, d]`` query embeddings.
            k: depth, 1 <= k <= shard size (use ``k = size`` for the full ranking).
            rel_keys: ``[n, m]`` keys (in this shard; -1 pads) whose score and rank to report.
            exact: the exact top-k even where the shard has an approximate index.

        Raises:
            EvaluationError: wrong query dimension, k out of range, unknown key.
        """
        q = self._queries(queries)
        if not 1 <= k <= self.size:
            raise EvaluationError(
                f"shard {self.name!r} holds {self.size} candidates but top-k {k} was requested; "
                f"lower eval.top_k to at most {self.size} (or evaluate a larger task part)"
            )
        rel_keys = (
            np.full((len(q), 0), -1, np.int64)
            if rel_keys is None
            else np.asarray(rel_keys, np.int64)
        )
        rel_pos = self.positions(rel_keys)
        out = SearchResult(
            np.empty((len(q), k), np.float32),
            np.empty((len(q), k), np.int64),
            np.full(rel_pos.shape, np.nan, np.float32),
            np.zeros(rel_pos.shape, np.int64),
        )
        for sl in self._blocks(len(q)):
            out.scores[sl], cols, out.rel_scores[sl], out.rel_ranks[sl] = self._search_block(
                q[sl], k, rel_pos[sl], exact
            )
            out.keys[sl] = np.where(cols >= 0, self.keys[cols.clip(0)], -1)
        return out

    def _search_block(
        self, q: np.ndarray, k: int, pos: np.ndarray, exact: bool = False
    ) -> tuple[np.ndarray, ...]:
        """One row block, tile by tile: top-k, and scores / in-shard ranks at columns ``pos``."""
        tiles = self._tiles()
        index = None if exact else self._faiss
        heap = self._heap(len(q), k) if index is None else None
        approx = None
        if index is not None and k < self.size:
            approx = index.search(q, k)[1].astype(np.int64)
            approx_scores = np.full(approx.shape, -np.inf, np.float32)
        parts = []
        thr = np.full(pos.shape, np.inf, np.float32)
        ranks = np.zeros(pos.shape, np.int64)
        for a, b in tiles:
            s = self._scores(q, a, b)
            if heap is not None:
                heap[0].addn(b - a, _ptr(s), a)
            elif approx is None:
                v, c = topk_with_ties(s, min(k, b - a))
                parts.append((v, c + a))
            else:
                inside = (approx >= a) & (approx < b)
                approx_scores = np.where(inside, _gather(s, approx - a), approx_scores)
            inside = (pos >= a) & (pos < b)
            thr = np.where(inside, _gather(s, pos - a), thr).astype(np.float32)
            if len(tiles) == 1 and pos.shape[1]:
                ranks = _count_before(s, thr, pos)
        if len(tiles) > 1 and pos.shape[1]:  # thresholds complete only now: a second pass
            ranks = self._count_tiles(q, thr, pos)
        if heap is not None:
            vals, cols = self._heap_result(q, k, *heap)
        elif approx is None:
            # columns: lower column wins a tie, as in a tile; one tile is already in order
            vals, cols = parts[0] if len(parts) == 1 else merge_topk(parts, k)
        else:
            order = _order_rows(
                approx_scores, np.where(approx >= 0, approx, np.iinfo(np.int64).max)
            )
            vals, cols = (np.take_along_axis(x, order, 1) for x in (approx_scores, approx))
        valid = pos >= 0
        return vals, cols, np.where(valid, thr, np.nan), np.where(valid, ranks + 1, 0)

    def _heap(self, n: int, k: int) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """A faiss heap of the k+1 best per query (CPU, large shards); else None."""
        if self.device != "cpu" or self.size <= _PARTITION_RATIO * (k + 1):
            return None
        import faiss

        vals = np.empty((n, k + 1), np.float32)
        cols = np.empty((n, k + 1), np.int64)
        heap = faiss.float_minheap_array_t()  # a min-heap keeps the largest scores
        heap.k, heap.nh = k + 1, n
        heap.val, heap.ids = faiss.swig_ptr(vals), faiss.swig_ptr(cols)
        heap.heapify()
        return heap, vals, cols

    def _heap_result(
        self, q: np.ndarray, k: int, heap: Any, vals: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by (score descending, column ascending) from the k+1 best of the heap.

        Where the k-th and k+1-th scores differ, the k best are exactly the heap's first k
        (whichever equal scores the heap kept below the cut); where they are equal, a tie
        crosses the cut and that query is redone over the whole shard (exact duplicates).
        """
        heap.reorder()  # score descending; equal scores in no particular order
        tied = np.flatnonzero((vals[:, 1:] == vals[:, :-1]).any(axis=1))
        if len(tied):  # only rows with equal scores need the (score, column) ordering
            order = _order_rows(vals[tied], cols[tied])
            vals[tied] = np.take_along_axis(vals[tied], order, 1)
            cols[tied] = np.take_along_axis(cols[tied], order, 1)
        crossing = np.flatnonzero(vals[:, k - 1] == vals[:, k])
        vals, cols = vals[:, :k].copy(), cols[:, :k].copy()
        for row in crossing.tolist():
            parts = []
            for a, b in self._tiles():
                v, c = topk_with_ties(self._scores(q[row : row + 1], a, b), min(k, b - a))
                parts.append((v, c + a))
            vals[row], cols[row] = (x[0] for x in merge_topk(parts, k))
        return vals, cols

    def _count_tiles(self, q: np.ndarray, thr: np.ndarray, bound: np.ndarray) -> np.ndarray:
        """Candidates before each threshold, summed over tiles (``bound``: global columns)."""
        total = np.zeros(thr.shape, np.int64)
        for a, b in self._tiles():
            total += _count_before(self._scores(q, a, b), thr, np.clip(bound - a, 0, b - a))
        return total

    def count_before(
        self, queries: np.ndarray, thresholds: np.ndarray, threshold_keys: np.ndarray
    ) -> np.ndarray:
        """How many of this shard's candidates rank before each (score, key) threshold.

        A candidate ranks before ``(t, key)`` when its score is > t, or equal to t with a
        smaller key. Padding: threshold +inf (counts 0).

        Args:
            queries: ``[n, d]``.
            thresholds: ``[n, m]`` float32 scores (of relevant candidates, from any shard).
            threshold_keys: ``[n, m]`` int64 keys of those candidates.

        Returns:
            ``[n, m]`` int64 counts.

        Raises:
            EvaluationError: wrong query dimension or threshold shapes.
        """
        q = self._queries(queries)
        thr = np.asarray(thresholds, np.float32)
        tkeys = np.asarray(threshold_keys, np.int64)
        if thr.shape != tkeys.shape or thr.ndim != 2 or thr.shape[0] != len(q):
            raise EvaluationError(
                f"shard {self.name!r}: thresholds {thr.shape} and keys "
                f"{tkeys.shape} must both be [{len(q)}, m]"
            )
        out = np.zeros(thr.shape, np.int64)
        if thr.shape[1] == 0:
            return out
        bound = self._boundary(tkeys)
        for sl in self._blocks(len(q)):
            out[sl] = self._count_tiles(q[sl], thr[sl], bound[sl])
        return out
