"""Several language shards per Ray actor: how many actors, which languages where, exactness.

The routing (each language answered by its own searcher inside a shared actor process) is
checked against in-process searchers built from the same arrays; the placement against a
brute-force search over every split of the languages.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from rayhybrid.config import ConfigError, load_config
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.search import ShardSearcher
from rayhybrid.evaluation.shards import ActorShards, actor_count, assign_languages, cpu_nodes

# XQuAD-R's eleven languages; sizes differ so that misrouting a language shows in its results
LANGS = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
DIM = 8


def toy_shards(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shards, start = {}, 0
    for i, lang in enumerate(LANGS):
        n = 20 + 3 * i
        emb = rng.standard_normal((n, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # a copy of a row is its top hit
        shards[lang] = (emb, np.arange(start, start + n, dtype=np.int64))
        start += n
    return shards


def pids(ray, pool: ActorShards) -> dict[str, int]:
    return {lang: ray.get(actor.pid.remote()) for lang, actor in pool.actors.items()}


def dies(ray, actor, seconds: float = 60) -> bool:
    """Whether ``actor`` stops answering within ``seconds`` (ray.kill is asynchronous)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=30)
            time.sleep(0.5)
        except ray.exceptions.RayActorError:
            return True
    return False


def test_actor_count_resolves_the_knob():
    assert actor_count(11, 0, cpus=2.0, gpus=0.0) == 1  # CPU shards: one per node
    assert actor_count(11, 0, cpus=64.0, gpus=0.0, nodes=4) == 4
    assert actor_count(3, 0, cpus=64.0, gpus=0.0, nodes=8) == 3  # at most one per language
    assert actor_count(11, 0, cpus=16.0, gpus=1.0) == 1  # GPU shards: one per whole GPU
    assert actor_count(11, 0, cpus=16.0, gpus=0.5) == 1
    assert actor_count(11, 0, cpus=16.0, gpus=4.0, nodes=1) == 4
    assert actor_count(11, 1, cpus=2.0, gpus=0.0, nodes=3) == 1  # a positive value caps
    assert actor_count(11, 20, cpus=2.0, gpus=0.0) == 11
    assert actor_count(0, 0, cpus=4.0, gpus=0.0, nodes=2) == 2  # languages still to come
    # The nodes an auto-placed CPU actor goes to, from ray.nodes(): alive, at least one whole
    # CPU (a head started with --num-cpus=0 gets none), most CPUs first.
    nodes = [
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0}},
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 8.5, "GPU": 1.0}},
        {"NodeID": "c", "Alive": True, "Resources": {"CPU": 0.0}},
        {"NodeID": "d", "Alive": False, "Resources": {"CPU": 16.0}},
        {"NodeID": "e", "Alive": True, "Resources": {"memory": 1.0}},
        {"NodeID": "f", "Alive": True, "Resources": {"CPU": 4.0}},
    ]
    assert cpu_nodes(nodes) == [("a", 8), ("b", 4), ("f", 4)]


def test_negative_shard_actors_is_refused():
    with pytest.raises(ConfigError, match=r"eval.shard_actors: expected an integer >= 0.*-1"):
        load_config(None, ["eval.shard_actors=-1"])
    assert load_config(None, ["eval.shard_actors=3"]).eval.shard_actors == 3


def test_languages_are_spread_largest_first_and_round_robin_without_sizes():
    sizes = {"a": 10, "b": 9, "c": 8, "d": 3, "e": 2, "f": 1}
    groups = assign_languages(sizes, 2, sizes)
    assert groups == [["a", "d", "e", "f"], ["b", "c"]]  # loads 16 and 17
    # Independent check: no split of these languages onto two actors has a smaller maximum.
    best = min(
        max(sum(sizes[x] for x in side), sum(sizes.values()) - sum(sizes[x] for x in side))
        for r in range(len(sizes) + 1)
        for side in itertools.combinations(sizes, r)
    )
    assert max(sum(sizes[x] for x in g) for g in groups) == best == 17
    # Actors of 2 and 1 threads (nodes of different sizes): work per thread balanced, again
    # checked against every split.
    groups = assign_languages(sizes, 2, sizes, weights=[2.0, 1.0])
    assert groups == [["a", "c", "d", "f"], ["b", "e"]]  # 22 / 2 and 11 / 1
    best = min(
        max(sum(sizes[x] for x in side) / 2, sum(sizes.values()) - sum(sizes[x] for x in side))
        for r in range(len(sizes) + 1)
        for side in itertools.combinations(sizes, r)
    )
    assert max(sum(sizes[x] for x in g) / w for g, w in zip(groups, (2, 1))) == best == 11
    assert assign_languages(["en", "de", "ar", "es"], 3) == [["ar", "es"], ["de"], ["en"]]
    assert assign_languages(["en", "de"], 2, {"en": 5}) == [["de"], ["en"]]  # a size missing


def test_eleven_languages_share_the_cpus_actors_with_exact_results(ray_local):
    shards = toy_shards()
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((7, DIM)).astype(np.float32)
    queries[3] = shards["en"][0][4]  # an exact hit in en
    local = {lang: ShardSearcher(lang, emb, keys) for lang, (emb, keys) in shards.items()}
    rows = np.arange(len(queries))
    for n_actors, expected in ((0, 1), (2, 2)):  # auto: one per node (the test cluster: one)
        with ActorShards(shards, n_actors=n_actors) as pool:
            by_lang = pids(ray_local, pool)
            assert len(set(by_lang.values())) == expected == len(pool.groups())
            workers = {
                ray_local.get(a.__ray_call__.remote(lambda self: self.workers))
                for a in pool.actors.values()
            }
            assert workers == {2 // expected}  # the node's 2 CPUs: threads of one, or one each
            assert sorted(itertools.chain(*pool.groups())) == sorted(LANGS)
            for group in pool.groups():  # the languages of one actor share its process
                assert len({by_lang[lang] for lang in group}) == 1
            ref = pool.put(queries)
            found = pool.map(
                "search", {lang: {"queries": ref, "rows": rows, "k": 5} for lang in LANGS}
            )
            thr = np.stack([np.full(len(queries), 0.5, np.float32)], axis=1)
            tkeys = np.zeros((len(queries), 1), np.int64)
            counts = pool.map(
                "count_before",
                {
                    lang: {"queries": ref, "rows": rows, "thresholds": thr, "threshold_keys": tkeys}
                    for lang in LANGS
                },
            )
            assert pool.sizes() == {lang: len(keys) for lang, (_, keys) in shards.items()}
        for lang in LANGS:
            want = local[lang].search(queries, k=5)
            assert np.array_equal(found[lang].scores, want.scores), lang
            assert np.array_equal(found[lang].keys, want.keys), lang
            assert np.isin(found[lang].keys, shards[lang][1]).all(), lang  # its own shard
            assert np.array_equal(counts[lang], local[lang].count_before(queries, thr, tkeys))
        assert found["en"].keys[3][0] == shards["en"][1][4]


def test_a_later_language_joins_the_least_loaded_actor(ray_local):
    shards = toy_shards(seed=2)
    first = LANGS[:-1]
    with ActorShards.start(first, n_actors=2) as pool:  # names only: round-robin, sorted
        assert pool.groups() == [list(first[0::2]), list(first[1::2])]
        pool.load_arrays(shards)  # zh is new: it goes where the fewest candidates are
        loads = [sum(len(shards[x][1]) for x in g if x != "zh") for g in pool.groups()]
        assert "zh" in pool.groups()[int(np.argmin(loads))]
        by_lang = pids(ray_local, pool)
        assert len(set(by_lang.values())) == 2
        mem = pool.memory()
        assert set(mem) == set(LANGS)
        for lang, m in mem.items():
            n = len(shards[lang][1])  # float32, or float64 where the BLAS fails the check
            assert m["shard_bytes"] in (n * DIM * 4, n * DIM * 8), lang
            same = [x for x in LANGS if by_lang[x] == by_lang[lang]]
            assert m["actor_bytes"] == sum(mem[x]["shard_bytes"] for x in same)
            assert m["peak_rss"] == mem[same[0]]["peak_rss"] > 0


def test_a_failing_language_in_a_shared_actor_stops_every_actor(ray_local):
    shards = toy_shards(seed=3)
    pool = ActorShards(shards, n_actors=2)
    victim = next(g for g in pool.groups() if len(g) > 1)[-1]  # shares its actor
    actors = {ray_local.get(a.pid.remote()): a for a in pool.actors.values()}
    assert len(actors) == 2
    ref = pool.put(np.ones((2, DIM), np.float32))
    too_deep = len(shards[victim][1]) + 1
    calls = {lang: {"queries": ref, "rows": np.arange(2), "k": 3} for lang in LANGS}
    calls[victim]["k"] = too_deep
    with pytest.raises(
        EvaluationError,
        match=rf"shard '{victim}' failed during search: EvaluationError: .*top-k {too_deep}.*"
        "all 2 shard actors were stopped",
    ):
        pool.map("search", calls)
    assert pool.actors == {}
    assert all(dies(ray_local, a) for a in actors.values()), "an actor outlived the failure"
    with pytest.raises(EvaluationError, match="already stopped"):
        pool.map("search", calls)


def test_worker_threads_cut_calls_into_row_chunks_without_changing_results():
    from rayhybrid.evaluation.shard_actor import ShardActor

    shards = toy_shards(seed=5)
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((700, DIM)).astype(np.float32)
    rows = np.sort(rng.choice(700, 650, replace=False))  # not every row, not in one run
    threaded, plain = ShardActor("cpu", 2), ShardActor("cpu", 1)
    assert (threaded.workers, plain.workers) == (2, 1)
    for actor in (threaded, plain):
        for lang, (emb, keys) in shards.items():
            actor.load_array(lang, emb, keys, "flat")
    calls, counts = [], []
    for lang, (_, keys) in shards.items():
        # row-aligned arguments differ row by row: a chunk paired with another chunk's
        # arguments gives other ranks and counts
        rel = rng.choice(keys, (len(rows), 3))
        rel[rng.random(rel.shape) < 0.3] = -1
        calls.append((lang, rows, {"k": 7, "rel_keys": rel}))
        thr = rng.uniform(-0.5, 0.5, (len(rows), 2)).astype(np.float32)
        counts.append((lang, rows, {"thresholds": thr, "threshold_keys": rel[:, :2]}))
    found = threaded.call_many("search", queries, calls)
    assert threaded.last_chunks > len(calls)  # 11 x 650 rows on 2 threads: cut in chunks
    for (lang, _, kw), got, want in zip(calls, found, plain.call_many("search", queries, calls)):
        direct = ShardSearcher(lang, *shards[lang]).search(queries[rows], **kw)
        for field in ("scores", "keys", "rel_scores", "rel_ranks"):
            for other in (want, direct):
                assert np.array_equal(getattr(got, field), getattr(other, field), equal_nan=True)
    before = threaded.call_many("count_before", queries, counts)
    assert threaded.last_chunks > len(counts)
    for got, want in zip(before, plain.call_many("count_before", queries, counts)):
        assert np.array_equal(got, want)
    bad = [(lang, rows, {"k": 7}) for lang in LANGS[:3]] + [("zh", rows, {"k": 10_000})]
    with pytest.raises(EvaluationError, match="top-k 10000") as err:
        threaded.call_many("search", queries, bad)
    assert err.value.shard == "zh"  # the driver names the shard from this tag


MULTI_NODE = """
import json, sys
import numpy as np, ray
from ray.cluster_utils import Cluster

from rayhybrid.evaluation.search import ShardSearcher
from rayhybrid.evaluation.shards import ActorShards

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=2)
cluster.add_node(num_cpus=0)  # no CPU: gets no shard actor
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
rng = np.random.default_rng(7)
langs = ["ar", "de", "en", "es", "ru", "zh"]  # equal sizes: the 2-thread node takes 4 of them
shards = {x: (rng.standard_normal((40, 8)).astype(np.float32), np.arange(40) + 100 * i)
          for i, x in enumerate(langs)}
queries = rng.standard_normal((300, 8)).astype(np.float32)
with ActorShards.start(langs, sizes={x: 40 for x in langs}) as pool:
    pool.load_arrays(shards)
    where = {x: ray.get(a.__ray_call__.remote(
        lambda self: [ray.get_runtime_context().get_node_id(), self.workers]))
        for x, a in pool.actors.items()}
    ref, rows = pool.put(queries), np.arange(300)
    got = pool.map("search", {x: {"queries": ref, "rows": rows, "k": 9} for x in langs})
want = {x: ShardSearcher(x, *shards[x]).search(queries, k=9) for x in langs}
exact = all(np.array_equal(got[x].keys, want[x].keys)
            and np.array_equal(got[x].scores, want[x].scores) for x in langs)
cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
print("RESULT " + json.dumps({"where": where, "cpus": cpus, "exact": exact}))
ray.shutdown()
cluster.shutdown()
"""


def test_auto_places_one_actor_per_node_with_a_thread_per_cpu(tmp_path):
    """A real three-node local cluster (ray.cluster_utils: one raylet per node) of 1, 2 and 0
    CPUs: the auto setting starts one actor on each node with CPUs, pinned there, with as
    many worker threads as the node has CPUs, and spreads the languages by threads."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "multi_node.py"
    script.write_text(MULTI_NODE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's Ray
    out = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert sorted(got["cpus"].values()) == [0, 1, 2]
    nodes = {node for node, _ in got["where"].values()}
    assert nodes == {n for n, c in got["cpus"].items() if c > 0}  # every CPU node, one actor
    for node, workers in got["where"].values():
        assert workers == got["cpus"][node]  # a thread per CPU of its node
    on_two = [x for x, (node, _) in got["where"].items() if got["cpus"][node] == 2]
    assert len(on_two) == 4  # six equal languages over 2 + 1 threads
    assert got["exact"]
