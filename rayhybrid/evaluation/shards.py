"""Ray actors holding the candidate language shards, several languages per actor.

The actors are thin: each holds one :class:`~rayhybrid.evaluation.search.ShardSearcher` per
language it hosts and runs :func:`~rayhybrid.evaluation.retrieval.call_shard` on the query
matrix, which the driver puts into the object store once (every actor reads the same copy).
:meth:`ActorShards.map` sends each actor one call for all its languages
(:meth:`~rayhybrid.evaluation.shard_actor.ShardActor.call_many`); an actor with several CPU
threads cuts the languages' rows into chunks that its threads share.
A failure in any actor stops all of them before the error reaches the caller, so no actor
outlives a failed evaluation.

Actors, not languages, are processes: each starts Python, torch and faiss (seconds), and a
shard search is CPU-bound, so processes beyond the CPUs only add start-up. The pool starts
``eval.shard_actors`` of them (auto: one per node, pinned there, with a worker thread per
CPU of its node; or one per GPU for GPU shards; at most one per language) and spreads the
languages over them by candidate count per thread (:func:`assign_languages`). One process
per node rather than per CPU: its threads split every language's rows evenly, where
processes split whole languages (6 + 5 of XQuAD-R's 11 on two), and the node pays one
start-up and one copy of torch and faiss.

Memory and start-up (issue 14): an evaluation job starts its actors once, empty, before it
encodes (:meth:`ActorShards.start`), so their start-up overlaps with encoding, and keeps
them for all its tasks and settings. The encoder's output blocks stay in the object store
and each actor copies its own language's rows out of them (:meth:`ActorShards.load_blocks`),
so the driver never holds the candidate matrix and an actor holds its shards plus one block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.faiss_index import openblas_env
from rayhybrid.evaluation.search import check_shard
from rayhybrid.evaluation.shard_actor import ShardActor

__all__ = ["ActorShards", "actor_count", "assign_languages", "cpu_nodes", "shard_resources"]

log = logging.getLogger(__name__)


def shard_resources(n_actors: int, cpus: float, gpus: float) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, threads) per shard actor so that all actors fit at once.

    Ray accepts fractions only below 1, so shares above one CPU are rounded down to whole CPUs.
    """
    share = cpus / max(1, n_actors)
    num_cpus = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
    num_gpus = 0.0
    if gpus > 0:
        g = gpus / max(1, n_actors)
        num_gpus = float(math.floor(g)) if g >= 1 else math.floor(g * 100) / 100
    return max(num_cpus, 0.01), num_gpus, max(1, int(num_cpus))


def cpu_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """(node id, whole CPUs) of the alive nodes of ``ray.nodes()`` that have a CPU, most
    CPUs first (then by id): where auto-placed CPU shard actors go, one per node."""
    got = [
        (str(n["NodeID"]), math.floor(float(n.get("Resources", {}).get("CPU", 0))))
        for n in nodes
        if n.get("Alive")
    ]
    return sorted(((i, c) for i, c in got if c >= 1), key=lambda x: (-x[1], x[0]))


def actor_count(n_langs: int, requested: int, cpus: float, gpus: float, nodes: int = 1) -> int:
    """How many shard actors serve ``n_langs`` languages.

    Args:
        requested: ``eval.shard_actors``; 0: one per node with CPUs (``nodes``), whose
            threads share its CPUs; or, when the shards go on GPUs, one per whole GPU.
        cpus, gpus: the cluster's (``gpus`` 0 when the shards stay on CPUs).
        nodes: the cluster's nodes with at least one CPU.

    Returns:
        The count, at most one actor per language (at least 1).
    """
    n = requested if requested > 0 else max(1, math.floor(gpus) if gpus > 0 else nodes)
    return max(1, min(n, n_langs) if n_langs else n)


def _least_loaded(
    groups: list[list[str]],
    sizes: Mapping[str, int],
    weights: Sequence[float] | None = None,
    adding: int = 0,
) -> int:
    """The group that would finish ``adding`` more candidates first: the fewest candidates per
    thread after adding them (``weights``: each group's threads; none: equal), then the fewest
    languages, then the lowest."""
    w = weights or [1.0] * len(groups)
    return min(
        range(len(groups)),
        key=lambda i: (
            (sum(sizes.get(x, 0) for x in groups[i]) + adding) / w[i],
            len(groups[i]),
            i,
        ),
    )


def assign_languages(
    langs: Sequence[str],
    n_actors: int,
    sizes: Mapping[str, int] | None = None,
    weights: Sequence[float] | None = None,
) -> list[list[str]]:
    """The languages of each of ``n_actors`` actors.

    With every language's candidate count in ``sizes``: largest first onto the actor that
    would finish it first (fewest candidates per thread after adding it, ``weights``: each
    actor's threads, equal when None; ties: fewer languages, then the lower actor), which
    balances the search work; otherwise round-robin in sorted order.
    """
    groups: list[list[str]] = [[] for _ in range(max(1, n_actors))]
    ordered = sorted(set(langs))
    if sizes is None or any(lang not in sizes for lang in ordered):
        for i, lang in enumerate(ordered):
            groups[i % len(groups)].append(lang)
        return groups
    for lang in sorted(ordered, key=lambda x: (-sizes[x], x)):
        groups[_least_loaded(groups, sizes, weights, sizes[lang])].append(lang)
    return groups


class ActorShards:
    """A :class:`~rayhybrid.evaluation.retrieval.ShardPool` of Ray actors hosting the languages.

    ``ActorShards(shards)`` starts the actors for the languages of ``shards`` and loads those
    arrays (each through the object store). :meth:`start` starts empty actors instead,
    once per evaluation job and while the encoders run, and ``load_*`` gives them each
    task's shards; the pool then answers for the languages of the last load. ``actors``:
    language -> its actor's handle (several languages share one).

    Args:
        shards: language -> (embeddings [n, d], keys [n]); None: start nothing yet.
        index: ``flat`` / ``ivf`` / ``hnsw``.
        use_gpu: place shards on GPUs (fractions of one when there are more actors than GPUs);
            None: when the cluster has GPUs.
        openblas_coretype: ``OPENBLAS_CORETYPE`` of the actor processes (``auto``: the best
            kernels for this CPU; empty: inherit), see :func:`~rayhybrid.evaluation.faiss_index.openblas_env`.
        languages: languages to host besides those of ``shards``.
        idle: started beside the encoders (:meth:`start`).
        n_actors: ``eval.shard_actors`` (0: auto, see :func:`actor_count`).
        sizes: candidates per language where known (balances the languages over the actors).

    Raises:
        EvaluationError: a shard fails to build (empty, non-finite, ...); the actors already
            started are stopped first.
    """

    def __init__(
        self,
        shards: dict[str, tuple[np.ndarray, np.ndarray]] | None,
        index: str = "flat",
        use_gpu: bool | None = None,
        openblas_coretype: str = "auto",
        *,
        languages: Sequence[str] = (),
        idle: bool = False,
        n_actors: int = 0,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        import ray

        if shards is not None and not shards:
            raise EvaluationError("no candidate shards to start: the task has no candidates")
        for lang, (emb, keys) in (shards or {}).items():  # fail before any actor starts
            check_shard(lang, emb, keys)
        langs = sorted(set(languages) | set(shards or {}))
        known = {**(sizes or {}), **{lang: len(keys) for lang, (_, keys) in (shards or {}).items()}}
        res = ray.cluster_resources()
        cpus = float(res.get("CPU", 1.0))
        gpus = float(res.get("GPU", 0.0)) if use_gpu or use_gpu is None else 0.0
        # Auto on CPUs: one actor per node, its worker threads sharing the node's CPUs. One
        # process per node splits each language's rows evenly over the threads; one process
        # per CPU splits whole languages (6 + 5 of XQuAD-R's 11) and each process pays its own
        # start-up and memory (README, 4x pool on two cores: one actor with 2 threads
        # 1.26-1.44x the time of faiss flat in three runs, two actors 1.74-1.87x).
        nodes = cpu_nodes(ray.nodes()) if n_actors == 0 and gpus == 0 else []
        count = actor_count(len(langs), n_actors, cpus, gpus, max(1, len(nodes)))
        num_cpus, num_gpus, threads = shard_resources(count, cpus, gpus)
        env = openblas_env(openblas_coretype)
        # Idle actors started beside the encoder pool reserve no CPU: the encoders take every
        # CPU and a reservation would starve them; the shards compute only once encoding is
        # done. Pinning (auto) or SPREAD (N actors) still places them across the nodes.
        base = {
            "num_gpus": num_gpus,
            "max_restarts": 0,
            "runtime_env": {"env_vars": env} if env else None,
        }
        self._options: list[dict[str, Any]] = []  # per actor: its Ray options
        self._threads: list[int] = []  # per actor: its worker threads (its share of the work)
        for slot in range(count):
            if nodes:  # pinned to its node, with that node's CPUs
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                node, node_cpus = nodes[slot]
                where = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
                reserve, n_threads = float(node_cpus), node_cpus
            else:
                where = {"scheduling_strategy": "SPREAD"} if idle else {}
                reserve, n_threads = num_cpus, threads
            self._options.append({**base, "num_cpus": 0.0 if idle else reserve, **where})
            self._threads.append(n_threads)
        self._device, self.index = "cuda" if num_gpus > 0 else "cpu", index
        self._ray, self._remote = ray, ray.remote(ShardActor)
        self._groups = assign_languages(langs, count, known if langs else None, self._threads)
        self._sizes = dict(known)  # candidates per language, for placing later languages
        self._handles: list[Any] = [None] * count  # one per actor; None: not started (yet)
        self.actors: dict[str, Any] = {}
        self._info: dict[str, tuple[int, int]] = {}
        actors = f"{count} shard actor{'s' if count > 1 else ''}" + (
            " (one per node)" if nodes else ""
        )
        log.info(
            f"[rayhybrid eval] {actors} for {len(langs)} languages "
            f"(threads {self._threads}): {self._groups}"
        )
        if num_gpus == 0 or not idle:  # GPU shards wait for the encoders to free the GPUs
            self._ensure(langs)
        if shards:
            self.load_arrays(shards)

    @classmethod
    def start(
        cls,
        languages: Sequence[str],
        index: str = "flat",
        use_gpu: bool | None = None,
        openblas_coretype: str = "auto",
        *,
        n_actors: int = 0,
        sizes: Mapping[str, int] | None = None,
    ) -> ActorShards:
        """Start empty shard actors for ``languages`` without waiting for them, so that their
        start-up (a process, torch and faiss imports) overlaps with encoding; ``sizes``:
        candidates per language where known, so that the actors get balanced shares."""
        return cls(
            None,
            index,
            use_gpu,
            openblas_coretype,
            languages=languages,
            idle=True,
            n_actors=n_actors,
            sizes=sizes,
        )

    def groups(self) -> list[list[str]]:
        """The languages of each actor (started or not)."""
        return [list(g) for g in self._groups]

    def _ensure(self, langs: Sequence[str], sizes: Mapping[str, int] | None = None) -> None:
        """Give each new language of ``langs`` to the actor with the fewest candidates (then
        the fewest languages) and start the actors of ``langs`` that are not running."""
        self._sizes.update(sizes or {})
        for lang in langs:
            if not any(lang in g for g in self._groups):
                more = self._sizes.get(lang, 0)
                self._groups[_least_loaded(self._groups, self._sizes, self._threads, more)].append(
                    lang
                )
        for slot, group in enumerate(self._groups):
            if self._handles[slot] is None and any(lang in group for lang in langs):
                self._handles[slot] = self._remote.options(**self._options[slot]).remote(
                    self._device, self._threads[slot]
                )
            if self._handles[slot] is not None:
                self.actors.update({lang: self._handles[slot] for lang in group})

    def _load(self, refs: dict[str, Any], what: str) -> dict[str, tuple[int, int] | None]:
        out = self._gather(refs, what)
        self._info = {lang: info for lang, info in out.items() if info is not None}
        self._sizes.update({lang: size for lang, (size, _) in self._info.items()})
        return out

    def load_arrays(self, shards: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Load in-memory shards (each put into the object store once).

        Raises:
            EvaluationError: a shard is empty or fails to build (all actors are stopped).
        """
        for lang, (emb, keys) in shards.items():
            check_shard(lang, emb, keys)
        self._ensure(list(shards), {lang: len(keys) for lang, (_, keys) in shards.items()})
        put = self._ray.put
        self._load(
            {
                lang: self.actors[lang].load_array.remote(
                    lang, put(np.asarray(emb, np.float32)), np.asarray(keys, np.int64), self.index
                )
                for lang, (emb, keys) in shards.items()
            },
            "start",
        )

    def load_blocks(
        self,
        blocks: list[Any],
        rows: dict[str, np.ndarray],
        keys: dict[str, np.ndarray],
        save_to: dict[str, str] | None = None,
        note: dict | None = None,
    ) -> None:
        """Each shard reads its rows out of the encoder's output ``blocks`` itself (the
        candidate matrix never passes through the driver); ``save_to``: cache entries to
        write, per language.

        Raises:
            EvaluationError: a shard fails to build (all actors are stopped).
        """
        self._ensure(list(rows), {lang: len(r) for lang, r in rows.items()})
        self._load(
            {
                lang: self.actors[lang].load_blocks.remote(
                    lang,
                    blocks,
                    rows[lang],
                    keys[lang],
                    self.index,
                    (save_to or {}).get(lang),
                    note,
                )
                for lang in rows
            },
            "start",
        )

    def load_files(self, paths: dict[str, str], keys: dict[str, np.ndarray]) -> bool:
        """Each shard loads its embedding-cache entry; False when any entry is unusable
        (then nothing is loaded: the caller encodes)."""
        self._ensure(list(paths), {lang: len(keys[lang]) for lang in paths})
        got = self._load(
            {
                lang: self.actors[lang].load_file.remote(lang, path, keys[lang], self.index)
                for lang, path in paths.items()
            },
            "start",
        )
        if any(v is None for v in got.values()):
            self._info = {}
            return False
        return True

    def embeddings(self, lang: str) -> np.ndarray:
        """One shard's embeddings in key order (one shard at a time in the driver)."""
        return self._gather({lang: self.actors[lang].embeddings.remote(lang)}, "embeddings")[lang]

    def memory(self) -> dict[str, dict[str, int]]:
        """Per language: its actor's peak resident memory (``peak_rss``; languages of one
        actor repeat it), its shard's bytes (``shard_bytes``), all shards of its actor
        (``actor_bytes``) and the actor's number (``actor``)."""
        live = [(i, g) for i, g in enumerate(self._groups) if self._handles[i] is not None and g]
        got = self._gather({g[0]: self._handles[i].memory.remote() for i, g in live}, "memory")
        out = {}
        for i, group in live:
            mem = got[group[0]]
            for lang in group:
                out[lang] = {
                    "peak_rss": mem["peak_rss"],
                    "shard_bytes": mem["shards"].get(lang, 0),
                    "actor_bytes": sum(mem["shards"].values()),
                    "actor": i,
                }
        return out

    def sizes(self) -> dict[str, int]:
        return {lang: size for lang, (size, _) in self._info.items()}

    def dims(self) -> dict[str, int]:
        return {lang: dim for lang, (_, dim) in self._info.items()}

    def put(self, array: np.ndarray) -> Any:
        return self._ray.put(array)

    def map(self, method: str, calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Call ``method`` on every listed shard; results keyed by language.

        Every call is submitted before the first result is awaited, so the actors run in
        parallel (the languages of one actor one after another).

        Raises:
            EvaluationError: a shard raised or its actor died; every actor is stopped first.
        """
        if not self.actors:
            raise EvaluationError("the shard actors were already stopped")
        # One Ray call per actor (and query matrix) for all its languages: a call costs
        # several ms of scheduling and result transfer, and the actor spreads the languages'
        # rows over its threads (ShardActor.call_many).
        slot_of = {lang: i for i, group in enumerate(self._groups) for lang in group}
        batches: dict[tuple[int, int], list[str]] = {}
        for lang, kw in calls.items():
            if lang not in self.actors:
                raise EvaluationError(f"shard {lang!r} holds no candidates (nothing loaded)")
            batches.setdefault((slot_of[lang], id(kw["queries"])), []).append(lang)
        refs = {}
        for (slot, _), langs in batches.items():
            queries = calls[langs[0]]["queries"]
            items = [
                (
                    lang,
                    calls[lang]["rows"],
                    {k: v for k, v in calls[lang].items() if k not in ("queries", "rows")},
                )
                for lang in langs
            ]
            refs[langs[0]] = self._handles[slot].call_many.remote(method, queries, items)
        got = self._gather(refs, method, {langs[0]: langs for langs in batches.values()})
        by_lang = {lang: r for langs in batches.values() for lang, r in zip(langs, got[langs[0]])}
        return {lang: by_lang[lang] for lang in calls}

    def _gather(
        self, refs: dict[str, Any], what: str, served: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        """``ray.get`` of each ref (labelled by a language); on a failure every actor is
        stopped and the failing shard named: the one the exception names (``.shard``, see
        :meth:`ShardActor.call_many`), else the first of the languages the ref served."""
        ray = self._ray
        out = {}
        try:
            for lang, ref in refs.items():
                out[lang] = ray.get(ref)
        except Exception as exc:
            label = next(lang for lang in refs if lang not in out)
            started = sum(h is not None for h in self._handles)
            self.close()
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
            failed = getattr(cause, "shard", None) or (served or {}).get(label, [label])[0]
            if isinstance(cause, ray.exceptions.RayActorError):
                msg = f"the actor of shard {failed!r} died during {what}"
            else:
                msg = (
                    f"shard {failed!r} failed during {what}: {type(cause).__name__}: "
                    f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                )
            raise EvaluationError(msg + f"; all {started} shard actors were stopped") from exc
        return out

    def close(self) -> None:
        """Kill every shard actor (idempotent)."""
        for actor in self._handles:
            if actor is None:
                continue
            try:
                self._ray.kill(actor)
            except Exception as exc:  # noqa: BLE001 - a dead actor is what we want anyway
                log.warning(f"[rayhybrid eval] stopping a shard actor: {exc}")
        self._handles = [None] * len(self._handles)
        self.actors = {}

    def __enter__(self) -> ActorShards:  # noqa: PYI034 - no subclasses
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
