"""The driver's memory is bounded by the queries and per-row bookkeeping, not by the pool.

A real evaluation step (Ray Data encoder actors with a tiny model, real shard actors): the
candidate embeddings go from the encoders' output blocks to the language shards through the
object store. The driver's resident-memory high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before each step) is read after the step, from the task's texts
to loaded shards, for a pool and a pool four times larger with the same queries. Had the
driver gathered the candidate matrix (the design before issue 14), its peak would grow by at
least one embedding row (``4 * dim`` bytes) per added candidate; it may only grow by
bookkeeping. (``tracemalloc`` would count numpy buffers exactly, but tracing allocations
while Ray's threads run crashed the driver in ``traceback_new``.)
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from rayhybrid.datamodel import Candidate, EvalTask, Query

LANGS = ("ar", "de", "en")
DIM = 384


def synthetic_task(per_lang: int, n_queries: int) -> EvalTask:
    """Parallel one-word candidates per language; the same queries whatever the pool size."""
    cands = [
        Candidate(f"c:{lang}:{j}", lang, f"w{j % 997}") for lang in LANGS for j in range(per_lang)
    ]
    queries, qrels = [], {}
    for i in range(n_queries):
        lang = LANGS[i % len(LANGS)]
        queries.append(Query(f"q:{lang}:{i}", lang, f"w{i % 997}"))
        qrels[f"q:{lang}:{i}"] = {f"c:{m}:{i}": 1 for m in LANGS}
    return EvalTask("mem", queries, cands, qrels)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A one-layer tiny model 384 wide: one embedding row (1.5 KiB) outweighs bookkeeping."""
    from rayhybrid.config import ModelConfig
    from rayhybrid.model import build_tiny_model

    cfg = ModelConfig(
        name="tiny", pooling="mean", tiny_hidden_size=DIM, tiny_layers=1, tiny_vocab_size=1200
    )
    texts = [f"w{j}" for j in range(997)]
    return cfg, str(build_tiny_model(cfg, texts, tmp_path_factory.mktemp("wide"), seed=0))


def _status(field: str) -> int:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1]) * 1024


def driver_peak(cfg, task: EvalTask, model_dir: str, pool) -> tuple[int, int, np.ndarray]:
    """(driver RSS high-water during the step, its growth over the RSS before it, queries)."""
    from rayhybrid.evaluation.loading import encode_into_shards
    from rayhybrid.evaluation.run import candidate_texts

    texts = candidate_texts(task)  # the task's own input, not counted
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    before = _status("VmRSS:")
    q_emb, _, _ = encode_into_shards(cfg, task, texts, model_dir, pool)
    peak = _status("VmHWM:")
    return peak, peak - before, q_emb


def test_driver_peak_does_not_grow_with_the_candidate_pool(ray_local, wide_model, tmp_path):
    from rayhybrid.config import load_config
    from rayhybrid.evaluation.shards import ActorShards

    _, model_dir = wide_model
    cfg = load_config(
        None,
        [
            "tracking.enabled=false",
            "eval.cache_dir=",
            f"eval.output_dir={tmp_path}",
            "eval.batch_size=512",
            f"model.tiny_hidden_size={DIM}",
            "model.tiny_layers=1",
            "model.pooling=mean",
        ],
    )
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    n_queries, base = 300, 1000
    peaks, growths = {}, {}
    with ActorShards.start(LANGS) as pool:
        driver_peak(cfg, synthetic_task(20, 30), model_dir, pool)  # one-time imports, caches
        for scale in (1, 4):
            task = synthetic_task(base * scale, n_queries)
            peaks[scale], growths[scale], q_emb = driver_peak(cfg, task, model_dir, pool)
            assert q_emb.shape == (n_queries, DIM)
            assert pool.sizes() == {lang: base * scale for lang in LANGS}
            mem = pool.memory()
            # each actor holds its own shard: float32, or float64 where this BLAS's float32
            # products are shape-dependent (search.f32_backend)
            held = {m["shard_bytes"] for m in mem.values()}
            assert held in ({base * scale * DIM * 4}, {base * scale * DIM * 8}), held
    added = 3 * base * len(LANGS)
    growth = (growths[4] - growths[1]) / added
    print(
        f"\ndriver RSS peak {peaks[1] / 2**20:.1f} MiB (+{growths[1] / 2**20:.1f} in the step) "
        f"with {base * len(LANGS)} candidates, {peaks[4] / 2**20:.1f} MiB "
        f"(+{growths[4] / 2**20:.1f}) with {4 * base * len(LANGS)}: {growth:.0f} bytes per added "
        f"candidate (one embedding row is {4 * DIM}); peak ratio {peaks[4] / peaks[1]:.3f}"
    )
    assert peaks[4] <= 1.2 * peaks[1]
    # Gathering the candidates would cost >= 4 * DIM bytes per candidate (one float32 row).
    assert growth < DIM, f"driver grows by {growth:.0f} bytes per candidate"
