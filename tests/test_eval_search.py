"""The shard searcher, top-k merge and rank counts, checked against brute force (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayhybrid.datamodel import Candidate, EvalTask, Query
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.retrieval import CandidateIndex, LocalShards, run_settings
from rayhybrid.evaluation.search import (
    ShardSearcher,
    f32_backend,
    merge_topk,
    topk_with_ties,
)
from tests.reference import reference_scores

# The BLAS whose float32 products give a pair the same bits in any product shape (numpy's
# OpenBLAS with AVX-512 kernels; torch's MKL on AVX2-only CPUs). Where none, the searcher
# scores in float64 (its documented fallback) and so do the references.
F32 = f32_backend() is not None


def brute_order(
    q: np.ndarray, c: np.ndarray, keys: np.ndarray, f64: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ranking: one float32 product of the whole matrices (``f64``: accumulated in
    float64, rounded to float32), full lexsort by (score descending, key ascending); no
    tiles, heaps or partial sorts (independent code)."""
    if f64:
        s = (q.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    else:
        s = reference_scores(q, c)
    order = np.stack([np.lexsort((keys, -row)) for row in s])
    return np.take_along_axis(s, order, 1), keys[order]


def tied_data(seed: int = 0, n: int = 60, d: int = 8, nq: int = 12):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, d)).astype(np.float32)
    c[10] = c[3]  # exact duplicates: equal scores for every query
    c[40] = c[3]
    c[25] = c[7]
    q = rng.standard_normal((nq, d)).astype(np.float32)
    q[0] = c[3]  # this query's best candidates are the three tied copies
    keys = rng.permutation(max(1000, 2 * n))[:n].astype(np.int64)
    return q, c, keys


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_topk_with_ties_takes_lowest_columns_among_equal_scores(kind):
    s = np.array([[0.5, 0.9, 0.9, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2, 0.3]], np.float32)
    s = torch.from_numpy(s) if kind == "torch" else s  # torch: the GPU code path, run on CPU
    vals, cols = topk_with_ties(s, 2)
    assert cols.tolist() == [[1, 2], [4, 0]]
    assert np.allclose(vals, [[0.9, 0.9], [0.3, 0.2]])
    vals, cols = topk_with_ties(s, 5)  # full depth: a stable sort
    assert cols.tolist() == [[1, 2, 4, 0, 3], [4, 0, 1, 2, 3]]


@pytest.mark.parametrize("key_base", [0, 2**40])
def test_top_k_order_of_signed_zero_negative_and_infinite_scores(key_base):
    """The top-k order is (score descending, tie ascending) for every float32 value a score
    can take: negative, -0.0 against +0.0 (equal: the tie decides), -inf (approximate
    padding), heavy ties. Reference: Python's sort of (-score, tie) per row. ``key_base``
    2**40: keys beyond 32 bits (the merge's other ordering path)."""
    rng = np.random.default_rng(5)
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.25, 7.0], np.float32)
    s = rng.choice(values, size=(30, 40)).astype(np.float32)
    tie = np.stack([rng.permutation(40) for _ in range(30)]).astype(np.int64) + key_base

    def ref(row_s, row_t, k):
        return sorted(range(len(row_s)), key=lambda j: (-float(row_s[j]), int(row_t[j])))[:k]

    for k in (1, 2, 5, 39, 40):
        vals, cols = topk_with_ties(s, k)  # ties by column
        for r in range(len(s)):
            assert cols[r].tolist() == ref(s[r], np.arange(40), k), (k, r)
        assert np.array_equal(vals, np.take_along_axis(s, cols, 1))
        # merge of two sorted halves: ties by key
        halves = []
        for a, b in ((0, 20), (20, 40)):
            o = np.stack([ref(s[r, a:b], tie[r, a:b], b - a) for r in range(len(s))])
            halves.append(
                (np.take_along_axis(s[:, a:b], o, 1), np.take_along_axis(tie[:, a:b], o, 1))
            )
        got_s, got_k = merge_topk(halves, k)
        for r in range(len(s)):
            want = ref(s[r], tie[r], k)
            assert got_k[r].tolist() == tie[r, want].tolist(), (k, r)
            assert np.array_equal(got_s[r], s[r, want])


@pytest.mark.parametrize("scores", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 58, 59, 60])
def test_search_equals_brute_force_with_ties(k, scores):
    # k = 1, 2: the three tied copies of query 0's best candidate cross the cut; 60: the full
    # ordering. 60 candidates: argpartition (see the next test for the heap).
    q, c, keys = tied_data()
    used = scores if F32 else "float64"
    ref_s, ref_k = brute_order(q, c, keys, f64=used == "float64")
    shard = ShardSearcher("x", c, keys, scores=scores)
    assert shard.scores == used
    res = shard.search(q, k)
    assert np.array_equal(res.keys, ref_k[:, :k])
    assert np.array_equal(res.scores, ref_s[:, :k])


@pytest.mark.parametrize("k", [1, 2, 3, 100])
def test_heap_search_of_a_larger_shard_equals_brute_force_with_ties(k):
    # 14,000 candidates > 128 (k+1): faiss's heap. k = 1, 2: a tie crosses the cut (the heap's
    # k+1-th equals its k-th; that query is redone in full).
    from rayhybrid.evaluation import search

    q, c, keys = tied_data(n=14000)
    assert len(c) > search._PARTITION_RATIO * (k + 1)
    shard = ShardSearcher("x", c, keys)
    assert shard._heap(len(q), k) is not None
    ref_s, ref_k = brute_order(q, c, keys, f64=shard.scores == "float64")
    res = shard.search(q, k)
    assert np.array_equal(res.keys, ref_k[:, :k])
    assert np.array_equal(res.scores, ref_s[:, :k])


def test_blas_float32_products_do_not_depend_on_shape():
    """Where the per-process check found a float32 BLAS whose products are shape-independent,
    other shapes (d = 384), single rows and columns, odd offsets and other thread counts agree
    bit for bit; where it found none, the searcher scores in float64."""
    from rayhybrid.evaluation.search import _one_thread, exact_scores

    rng = np.random.default_rng(7)
    c = rng.standard_normal((300, 384)).astype(np.float32)
    q = rng.standard_normal((40, 384)).astype(np.float32)
    backend = f32_backend()
    print(f"float32 score backend of this process: {backend}")
    if backend is None:
        print(
            "no BLAS here gives shape-independent float32 products: checking the float64 fallback"
        )
        assert ShardSearcher("x", c, np.arange(300)).scores == "float64"
        assert ShardSearcher("x", c, np.arange(300), scores="float64").scores == "float64"
        return
    full = reference_scores(q, c)  # one padded product of the picked BLAS
    # single rows / columns (gemv), small blocks (small-matrix kernels), odd offsets
    blocks = [(0, 1, 0, 300), (9, 10, 5, 6), (0, 40, 299, 300), (3, 37, 11, 290), (0, 4, 0, 8)]
    for a, b, x, y in blocks:
        assert np.array_equal(exact_scores(q[a:b], c[x:y]), full[a:b, x:y]), (a, b, x, y)
    with _one_thread(backend):  # shard actors often run one BLAS thread
        assert np.array_equal(exact_scores(q, c[17:290]), full[:, 17:290])
    # a product above search._TRANSPOSED_MAX (torch: queries x candidates) against a block of
    # it below (candidates x queries, transposed) and the reference's padded product
    from rayhybrid.evaluation import search

    big_q = rng.standard_normal((2100, 384)).astype(np.float32)
    big_c = rng.standard_normal((2048, 384)).astype(np.float32)
    assert len(big_q) * len(big_c) > search._TRANSPOSED_MAX >= 128 * len(big_c)
    big = exact_scores(big_q, big_c)
    assert np.array_equal(exact_scores(big_q[500:628], big_c), big[500:628])
    assert np.array_equal(reference_scores(big_q[:40], big_c[:300]), big[:40, :300])
    # the scores are float32 products, not float64 ones rounded (those differ in some bits)
    f64 = (q.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    assert not np.array_equal(full, f64)
    norms = np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(c, axis=1))
    assert (np.abs(full - f64) <= (384 + 2) * 2.0**-24 * norms).all()  # float32 rounding bound


def test_float32_and_float64_orders_differ_only_among_near_ties():
    """Where the float32 ranking differs from the float64-accumulated one, the candidates
    involved score within the float32 rounding bound d * 2**-24 * |q| |c| of each other."""
    rng = np.random.default_rng(11)
    d = 384
    c = rng.standard_normal((4000, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c[2000:] = c[:2000] + 1e-4 * rng.standard_normal((2000, d)).astype(np.float32)  # near-ties
    q = rng.standard_normal((30, d)).astype(np.float32)
    keys = np.arange(len(c))
    res = ShardSearcher("x", c, keys).search(q, 500)
    exact = q.astype(np.float64) @ c.astype(np.float64).T
    bound = d * 2.0**-24 * np.linalg.norm(q, axis=1).max() * np.linalg.norm(c, axis=1).max()
    swapped = 0
    for i in range(len(q)):
        got = exact[i, res.keys[i]]  # float64 scores in float32 order
        worse = np.flatnonzero(np.diff(got) > 0)  # a later candidate scores higher in float64
        swapped += len(worse)
        assert (got[worse + 1] - got[worse] <= 2 * bound).all()
        # and the float64 top-500 set differs only by candidates at the float32 cut
        ref = np.argsort(-exact[i], kind="stable")[:500]
        extra = np.setdiff1d(ref, res.keys[i])
        assert (exact[i, extra] <= got.min() + 2 * bound).all()
    print(f"adjacent float32/float64 order swaps among near-ties: {swapped}")


def test_relevant_ranks_and_counts_match_brute_force():
    q, c, keys = tied_data()
    ref_s, ref_k = brute_order(q, c, keys, f64=not F32)
    shard = ShardSearcher("x", c, keys)
    rel = np.stack([keys[[3, 10, 25]], keys[[40, 7, 0]]] * 6)  # includes tied candidates
    res = shard.search(q, 5, rel_keys=rel)
    for i in range(len(q)):
        for j, key in enumerate(rel[i]):
            rank = int(np.flatnonzero(ref_k[i] == key)[0]) + 1
            assert res.rel_ranks[i, j] == rank
            assert res.rel_scores[i, j] == ref_s[i, rank - 1]
    # counts against thresholds from "another shard": key 500 sits between shard keys
    thr = np.full((len(q), 2), np.inf, np.float32)
    thr[:, 0] = ref_s[:, 4]
    tkeys = np.full((len(q), 2), -1, np.int64)
    tkeys[:, 0] = 500
    counts = shard.count_before(q, thr, tkeys)
    for i in range(len(q)):
        s = ref_s[i]
        expect = int((s > thr[i, 0]).sum() + ((s == thr[i, 0]) & (ref_k[i] < 500)).sum())
        assert counts[i, 0] == expect
    assert (counts[:, 1] == 0).all()  # padding counts nothing


def test_merged_shards_equal_one_global_search():
    q, c, keys = tied_data(seed=1, n=90)
    parts = np.array_split(np.arange(len(c)), 3)
    shards = [ShardSearcher(f"s{i}", c[p], keys[p]) for i, p in enumerate(parts)]
    for k in (1, 7, 30):
        merged = merge_topk([(r.scores, r.keys) for r in (s.search(q, k) for s in shards)], k)
        glob = ShardSearcher("all", c, keys).search(q, k)
        assert np.array_equal(merged[1], glob.keys)
        assert np.array_equal(merged[0], glob.scores)


def test_merge_topk_orders_heavy_ties_by_key():
    """Sorted per-shard lists with many equal scores (within a list, across lists, across the
    cut) merge into the first k of one full lexsort by (score descending, key ascending):
    faiss's merge breaks ties by shard, so those queries must be redone."""
    rng = np.random.default_rng(11)
    for n_shards, width in ((2, 1), (3, 4), (5, 7)):
        keys = rng.permutation(10_000)[: n_shards * width].reshape(n_shards, width)
        parts = []
        for shard_keys in keys:
            s = rng.integers(0, 4, (40, width)).astype(np.float32)  # four values: ties
            kk = np.broadcast_to(shard_keys, s.shape)
            order = np.stack([np.lexsort((kr, -sr)) for sr, kr in zip(s, kk)])
            parts.append((np.take_along_axis(s, order, 1), np.take_along_axis(kk, order, 1)))
        all_s = np.concatenate([p[0] for p in parts], 1)
        all_k = np.concatenate([p[1] for p in parts], 1)
        ref = np.stack([np.lexsort((kr, -sr)) for sr, kr in zip(all_s, all_k)])
        for k in range(1, n_shards * width + 1):
            got_s, got_k = merge_topk(parts, k)
            assert np.array_equal(got_k, np.take_along_axis(all_k, ref[:, :k], 1)), (width, k)
            assert np.array_equal(got_s, np.take_along_axis(all_s, ref[:, :k], 1))


@pytest.mark.parametrize("scores", ["float32", "float64"])
def test_scores_do_not_depend_on_shard_or_batch_shape(scores):
    rng = np.random.default_rng(3)
    c = rng.standard_normal((500, 96)).astype(np.float32)
    q = rng.standard_normal((300, 96)).astype(np.float32)
    full = ShardSearcher("all", c, scores=scores).search(q, 500)
    lookup = {int(k): s for k, s in zip(full.keys[7], full.scores[7])}
    for sl, cols in ((slice(7, 9), slice(123, 170)), (slice(7, 8), slice(0, 500))):
        keys = np.arange(500)[cols]
        part = ShardSearcher("part", c[cols], keys, scores=scores).search(q[sl], len(keys))
        assert all(lookup[int(k)] == s for k, s in zip(part.keys[0], part.scores[0]))
    one = ShardSearcher("one", c[42:43], np.array([42]), scores=scores).search(q[7:8], 1)
    assert one.scores[0, 0] == lookup[42]  # a shard of one candidate, one query


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_rescore_exactly_and_keep_exact_ranks(index):
    rng = np.random.default_rng(5)
    c = rng.standard_normal((400, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)  # cosine: a near-copy is the best match
    q = c[:20] + 0.01 * rng.standard_normal((20, 16)).astype(np.float32)
    flat = ShardSearcher("flat", c)
    approx = ShardSearcher("approx", c, index=index)
    rel = np.arange(20)[:, None]
    a, f = approx.search(q, 10, rel), flat.search(q, 10, rel)
    assert (a.keys[:, 0] == np.arange(20)).all()  # near-copies are found first
    hit = a.keys >= 0
    exact = {(i, int(k)): s for i in range(20) for k, s in zip(f.keys[i], f.scores[i])}
    assert all(
        exact.get((i, int(a.keys[i, j])), a.scores[i, j]) == a.scores[i, j]
        for i, j in zip(*np.nonzero(hit))
    )
    assert np.array_equal(a.rel_ranks, f.rel_ranks)  # ranks never depend on the index


def test_bad_shard_inputs_raise_clear_errors():
    with pytest.raises(EvaluationError, match="shard 'de' is empty"):
        ShardSearcher("de", np.zeros((0, 8), np.float32))
    shard = ShardSearcher("de", np.eye(4, 8, dtype=np.float32))
    with pytest.raises(EvaluationError, match="dimension 6 but the shard's index has dimension 8"):
        shard.search(np.ones((2, 6), np.float32), 1)
    with pytest.raises(EvaluationError, match="holds 4 candidates but top-k 5"):
        shard.search(np.ones((2, 8), np.float32), 5)
    with pytest.raises(EvaluationError, match="key 99 is not in this shard"):
        shard.search(np.ones((1, 8), np.float32), 1, rel_keys=np.array([[99]]))
    with pytest.raises(EvaluationError, match="NaN or inf"):
        ShardSearcher("en", np.full((2, 3), np.nan, np.float32))
    with pytest.raises(EvaluationError, match="distinct keys"):
        ShardSearcher("en", np.ones((2, 3), np.float32), np.array([1, 1]))


def small_task() -> EvalTask:
    cands = [Candidate(f"c:{lang}:{j}", lang, "") for lang in ("de", "en") for j in range(5)]
    queries = [Query("q:en:0", "en", ""), Query("q:de:0", "de", "")]
    qrels = {"q:en:0": {"c:en:0": 1, "c:de:0": 1}, "q:de:0": {"c:de:1": 1}}
    return EvalTask("t", queries, cands, qrels)


def test_run_settings_rejects_top_k_above_smallest_shard_and_dim_mismatch():
    task = small_task()
    ci = CandidateIndex.from_task(task)
    emb = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    pool = LocalShards(
        {lang: ShardSearcher(lang, emb[k], k) for lang, k in ci.shard_keys().items()}
    )
    with pytest.raises(
        EvaluationError, match="eval.top_k=6 is larger than shard 'de' .5 candidates"
    ):
        run_settings(pool, task, emb[:2], top_k=6)
    with pytest.raises(EvaluationError, match="dimension 3 but shard 'de' has dimension 4"):
        run_settings(pool, task, emb[:2, :3], top_k=2)
    with pytest.raises(EvaluationError, match="unknown setting 'multilingual'"):
        run_settings(pool, task, emb[:2], settings=("multilingual",))


def test_gpu_search_equals_cpu(gpu):
    q, c, keys = tied_data(seed=4, n=300, nq=40)
    rel = np.stack([keys[[3, 10, 40]]] * len(q))
    cpu = ShardSearcher("cpu", c, keys).search(q, 20, rel)
    cuda = ShardSearcher("cuda", c, keys, device="cuda").search(q, 20, rel)
    assert np.array_equal(cpu.keys, cuda.keys)
    assert np.allclose(cpu.scores, cuda.scores, atol=1e-6)
    assert np.array_equal(cpu.rel_ranks, cuda.rel_ranks)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_tiled_scoring_gives_identical_results(index):
    q, c, keys = tied_data(seed=6, n=100)
    rel = np.stack([keys[[3, 10, 99]], keys[[40, 7, 0]]] * 6)
    whole = ShardSearcher("whole", c, keys, index=index)
    tiled = ShardSearcher("tiled", c, keys, index=index, tile=7)  # 15 tiles, one of 2 columns
    for k in (1, 9, 100):
        a, b = whole.search(q, k, rel), tiled.search(q, k, rel)
        for name in ("keys", "scores", "rel_scores", "rel_ranks"):
            assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), (k, name)
    thr = whole.search(q, 30).scores[:, [4, 29]]
    tkeys = np.tile(keys[[5, 77]], (len(q), 1))
    assert np.array_equal(whole.count_before(q, thr, tkeys), tiled.count_before(q, thr, tkeys))
