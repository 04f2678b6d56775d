"""The searcher of one candidate shard and the top-k merge: pure numpy / torch / FAISS, no Ray.

Scores are inner products of the embeddings (cosine similarity for L2-normalised ones).

**Exact scores.** A float32 matrix product rounds differently for different matrix shapes
(BLAS blocking), so one query/candidate pair could score a few ulp apart in a shard and in
one global index, and near-ties would then flip between the two. Scores are therefore
accumulated in float64 and rounded once to float32: the result for a pair is the same
whatever batch or shard it is computed in, and the sharded search equals the global one
bit for bit.

**Order and ties.** Candidates are ranked by score, descending; equal scores are broken by
the candidate's *key* (ascending). The caller chooses the keys; :mod:`retrieval` uses each
candidate's position in the list of all candidate ids sorted in *reverse* lexicographic
order, which is exactly how ``trec_eval`` (and ``pytrec_eval``) break ties, so those tools
recompute identical numbers from the written runs even where scores tie (duplicate
sentences do occur in XQuAD-R).

**Full-depth ranks without full rankings.** :meth:`ShardSearcher.count_before` returns, for
given (score, key) thresholds, how many of the shard's candidates rank before them. Summed
over shards it gives the exact rank of a relevant candidate in the whole multilingual pool.

**Indexes.** ``flat`` (default) is the exact search above. ``ivf`` / ``hnsw`` use a FAISS
index for the top-k only (approximate; the returned candidates are re-scored exactly);
ranks of relevant candidates stay exact (they scan the shard), so full-depth metrics do not
depend on the index. On a GPU (``device="cuda"``) the exact search runs in torch on the
GPU, and an IVF index moves to the GPU when faiss-gpu is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rayhybrid.evaluation import EvaluationError

__all__ = ["SearchResult", "ShardSearcher", "build_faiss_index", "check_shard", "exact_scores",
           "merge_topk", "topk_with_ties"]

# Elements of one score block (rows x shard size): bounds memory at ~128 MiB of float64.
_BLOCK_ELEMENTS = 1 << 24


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


def exact_scores(queries: torch.Tensor, candidates64: torch.Tensor) -> torch.Tensor:
    """Inner products accumulated in float64, rounded once to float32 (module docstring)."""
    return (queries.to(candidates64.dtype) @ candidates64.T).float()


def topk_with_ties(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row by (score descending, column ascending).

    ``torch.topk`` picks an arbitrary subset of candidates that tie with the k-th score; rows
    where such a tie crosses the cut are redone with a stable full sort.

    Returns:
        ``(values [n, k] float32, columns [n, k] int64)``, best first.
    """
    n_rows, n_cols = scores.shape
    if k >= n_cols:
        vals, cols = torch.sort(scores, dim=1, descending=True, stable=True)
        return vals.cpu().numpy(), cols.cpu().numpy().astype(np.int64)
    vals, cols = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    kth = vals[:, -1:]
    tied_past_cut = ((scores >= kth).sum(dim=1) > k).nonzero().flatten()
    for row in tied_past_cut.tolist():
        v, c = torch.sort(scores[row], descending=True, stable=True)
        vals[row], cols[row] = v[:k], c[:k]
    v, c = vals.cpu().numpy(), cols.cpu().numpy().astype(np.int64)
    order = np.lexsort((c, -v), axis=-1)  # ties inside the top-k: lower column first
    return np.take_along_axis(v, order, 1), np.take_along_axis(c, order, 1)


def _count_before(scores: torch.Tensor, thr: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Per (row, j): #columns with score > thr[row, j], plus ties at columns < boundary[row, j]."""
    n_cols = scores.shape[1]
    col = torch.arange(n_cols, device=scores.device)
    out = torch.zeros(thr.shape, dtype=torch.int64, device=scores.device)
    for j in range(thr.shape[1]):  # one pass per threshold column keeps memory at [rows, n]
        t = thr[:, j:j + 1]
        out[:, j] = (scores > t).sum(dim=1)
        eq = scores == t
        if bool(eq.any()):
            out[:, j] += (eq & (col[None, :] < boundary[:, j:j + 1])).sum(dim=1)
    return out


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into one top-k by (score descending, key ascending).

    Args:
        parts: per shard ``(scores [n, k_i], keys [n, k_i])`` for the same n queries.
        k: depth of the merged list (at most the sum of the k_i).

    Returns:
        ``(scores [n, k], keys [n, k])``. Equal to one exact search over the union of the
        shards when every shard returned its own exact top-k (k_i >= k or its whole shard).
    """
    if not parts:
        raise EvaluationError("merge_topk: no shard results to merge")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    keys = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((keys, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def build_faiss_index(emb: np.ndarray, kind: str, *, nlist: int | None = None,
                      nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                      use_gpu: bool = False):
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
    if use_gpu and kind != "hnsw" and hasattr(faiss, "StandardGpuResources") \
            and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def check_shard(name: str, embeddings: np.ndarray, keys: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Validate one shard's embeddings and keys; returns them as float32 / int64 arrays.

    Raises:
        EvaluationError: empty shard, not a 2-D finite array, keys of the wrong length or
            not distinct.
    """
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise EvaluationError(f"shard {name!r} is empty: expected a [n, dim] array of candidate "
                              f"embeddings with n >= 1, got shape {tuple(emb.shape)} (no "
                              "candidates in this language?)")
    if not np.isfinite(emb).all():
        raise EvaluationError(f"shard {name!r}: embeddings contain NaN or inf")
    keys = np.arange(len(emb), dtype=np.int64) if keys is None else np.asarray(keys, np.int64)
    if keys.shape != (len(emb),) or len(np.unique(keys)) != len(keys):
        raise EvaluationError(f"shard {name!r}: expected {len(emb)} distinct keys, got shape "
                              f"{keys.shape} with {len(np.unique(keys))} distinct")
    return emb, keys


class ShardSearcher:
    """The candidates of one shard (one language) and their search index.

    Args:
        name: shard name used in error messages (the language).
        embeddings: ``[n, d]`` candidate embeddings (n >= 1, finite).
        keys: ``[n]`` distinct int tie-break keys (default ``0..n-1``); results name
            candidates by key. Stored sorted by key so column order is tie order.
        index: ``flat`` (exact), ``ivf`` or ``hnsw`` (FAISS, approximate top-k).
        device: ``cpu`` or ``cuda``.

    Raises:
        EvaluationError: empty shard, not a 2-D finite array, keys of the wrong length or
            not distinct.
    """

    def __init__(self, name: str, embeddings: np.ndarray, keys: np.ndarray | None = None, *,
                 index: str = "flat", device: str = "cpu", **index_options) -> None:
        emb, keys = check_shard(name, embeddings, keys)
        order = np.argsort(keys, kind="stable")
        self.name, self.keys, self.kind, self.device = name, keys[order], index, device
        emb = emb[order]
        self._cand64 = torch.from_numpy(emb).to(device=device, dtype=torch.float64)
        self._faiss = None
        if index != "flat":
            self._faiss = build_faiss_index(emb, index, use_gpu=device != "cpu", **index_options)

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        return int(self._cand64.shape[1])

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        q = q if q.flags.writeable and q.flags.c_contiguous else np.array(q, order="C")
        if q.ndim != 2 or q.shape[1] != self.dim:
            got = q.shape[1] if q.ndim == 2 else tuple(q.shape)
            raise EvaluationError(
                f"shard {self.name!r}: query embeddings have dimension {got} but the shard's index "
                f"has dimension {self.dim} (queries and candidates encoded with different models?)")
        return q

    def _blocks(self, n: int):
        step = max(1, min(4096, _BLOCK_ELEMENTS // self.size))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def _scores(self, q: np.ndarray) -> torch.Tensor:
        return exact_scores(torch.from_numpy(q).to(self.device), self._cand64)

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
            raise EvaluationError(f"shard {self.name!r}: candidate key {int(keys[bad][0])} is not "
                                  "in this shard")
        return np.where(keys >= 0, pos, -1)

    def search(self, queries: np.ndarray, k: int, rel_keys: np.ndarray | None = None) -> SearchResult:
        """Top-k of every query in this shard, and the exact score / in-shard rank of given keys.

        Args:
            queries: ``[n, d]`` query embeddings.
            k: depth, 1 <= k <= shard size (use ``k = size`` for the full ranking).
            rel_keys: ``[n, m]`` keys (in this shard; -1 pads) whose score and rank to report.

        Raises:
            EvaluationError: wrong query dimension, k out of range, unknown key.
        """
        q = self._queries(queries)
        if not 1 <= k <= self.size:
            raise EvaluationError(
                f"shard {self.name!r} holds {self.size} candidates but top-k {k} was requested; "
                f"lower eval.top_k to at most {self.size} (or evaluate a larger task part)")
        rel_keys = np.full((len(q), 0), -1, np.int64) if rel_keys is None else np.asarray(rel_keys, np.int64)
        rel_pos = self.positions(rel_keys)
        out = SearchResult(np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64),
                           np.full(rel_pos.shape, np.nan, np.float32), np.zeros(rel_pos.shape, np.int64))
        for sl in self._blocks(len(q)):
            s = self._scores(q[sl])
            if self._faiss is None or k == self.size:
                out.scores[sl], cols = topk_with_ties(s, k)
            else:
                out.scores[sl], cols = self._approx_topk(q[sl], s, k)
            out.keys[sl] = np.where(cols >= 0, self.keys[cols.clip(0)], -1)
            if rel_pos.shape[1]:
                pos = torch.from_numpy(rel_pos[sl]).to(s.device)
                thr = torch.where(pos >= 0, s.gather(1, pos.clamp(min=0)), torch.inf)
                ranks = 1 + _count_before(s, thr, pos)
                out.rel_scores[sl] = torch.where(pos >= 0, thr, torch.nan).cpu().numpy()
                out.rel_ranks[sl] = torch.where(pos >= 0, ranks, 0).cpu().numpy()
        return out

    def _approx_topk(self, q: np.ndarray, s: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, cols = self._faiss.search(q, k)
        cols = torch.from_numpy(cols.astype(np.int64)).to(s.device)
        vals = torch.where(cols >= 0, s.gather(1, cols.clamp(min=0)), -torch.inf)
        v, c = vals.cpu().numpy(), cols.cpu().numpy()
        order = np.lexsort((np.where(c >= 0, c, np.iinfo(np.int64).max), -v), axis=-1)
        return np.take_along_axis(v, order, 1), np.take_along_axis(c, order, 1)

    def count_before(self, queries: np.ndarray, thresholds: np.ndarray,
                     threshold_keys: np.ndarray) -> np.ndarray:
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
        # Copies: arrays from Ray's object store are read-only, torch wants writable memory.
        thr = np.array(thresholds, np.float32)
        tkeys = np.array(threshold_keys, np.int64)
        if thr.shape != tkeys.shape or thr.ndim != 2 or thr.shape[0] != len(q):
            raise EvaluationError(f"shard {self.name!r}: thresholds {thr.shape} and keys "
                                  f"{tkeys.shape} must both be [{len(q)}, m]")
        out = np.zeros(thr.shape, np.int64)
        if thr.shape[1] == 0:
            return out
        bound = self._boundary(tkeys)
        for sl in self._blocks(len(q)):
            s = self._scores(q[sl])
            t = torch.from_numpy(thr[sl]).to(s.device)
            b = torch.from_numpy(bound[sl]).to(s.device)
            out[sl] = _count_before(s, t, b).cpu().numpy()
        return out
