"""The batch plan: which pairs form each global batch (DESIGN.md, 'Batch strategies').

Pure Python, no Ray. A *unit* is something that can fill one slot of a batch:

- a :class:`~rayhybrid.datamodel.ParallelItem` can serve any (query language,
  passage language) pair among its languages;
- a :class:`~rayhybrid.datamodel.Pair` serves exactly its own (query_lang, passage_lang).

For every global step the plan draws the step's mode and languages from an RNG
seeded by ``(seed, epoch, step)``, then fills the slots with units taken in the
order of a per-epoch seeded permutation (the per-epoch shuffle), never putting
one group twice into a global batch (a second copy of a parallel item in another
language would be a false negative). The plan is a pure function of
``(seed, epoch, step)``: every Ray Train worker and every resumed run computes
the same rows without talking to anyone.

Worker ``r`` of ``W`` gets slots ``[r*b, (r+1)*b)`` of each step, ``b = batch_size // W``
(:meth:`~rayhybrid.config.BatchConfig.per_worker`). The ranges of the batch settings are the
schema's (:class:`~rayhybrid.config.BatchConfig`); what is checked here is what the data can
supply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rayhybrid.config import BatchPlanError
from rayhybrid.datamodel import DataError, Pair, ParallelItem

if TYPE_CHECKING:
    from rayhybrid.config import BatchConfig

__all__ = ["BatchPlan", "BatchPlanError", "PlanRow", "Unit", "check_negatives", "units_from"]

Key = tuple[str, str]  # (query language, passage language)

MODES = ("mono", "cross", "mixed", "english")
_EPOCH_TAG, _STEP_TAG = 1, 2  # separate RNG streams for the shuffle and the per-step draws


class PlanRow(NamedTuple):
    """One planned pair: global ``step``, ``slot`` in the global batch and what fills it."""

    step: int
    slot: int
    mode: str
    group: str
    query_lang: str
    passage_lang: str
    unit: int


@dataclass(frozen=True)
class Unit:
    """A slot filler: a parallel item or a pair, with the (query, passage) languages it serves."""

    source: ParallelItem | Pair
    group: str
    languages: tuple[str, ...]  # item: its languages; pair: (query_lang, passage_lang)

    def serves(self) -> list[Key]:
        if isinstance(self.source, Pair):
            return [(self.source.query_lang, self.source.passage_lang)]
        return [(q, p) for q in self.languages for p in self.languages]

    def texts(self, query_lang: str, passage_lang: str) -> tuple[str, str]:
        """(query text, passage text) of this unit in the given languages."""
        src = self.source
        if isinstance(src, Pair):
            return src.query, src.passage
        return src.queries[query_lang], src.positives[passage_lang][0]

    def negatives(self, passage_lang: str, k: int, epoch: int) -> list[str]:
        """``k`` hard negatives in ``passage_lang``: the unit's negatives in that language,
        rotated by ``epoch`` (every one is used over the epochs; repeated when fewer than
        ``k``), so a step's negatives are a pure function of the plan's (seed, epoch, step).

        Raises:
            DataError: the unit has no negatives in ``passage_lang``.
        """
        src = self.source
        negs = () if isinstance(src, Pair) else src.negatives.get(passage_lang, ())
        if not negs:
            raise DataError(
                f"group {self.group!r}: no hard negatives in language {passage_lang!r}; "
                "train.negatives_per_query > 0 needs them (see rayhybrid mine)"
            )
        start = epoch * k % len(negs)
        return [negs[(start + j) % len(negs)] for j in range(k)]


def check_negatives(units: Sequence[Unit], k: int) -> None:
    """Every unit has hard negatives in every language it can serve as a passage language.

    Checked in the driver before training (``train.negatives_per_query = k > 0``).

    Raises:
        DataError: naming the first units (group, language) without negatives and how many.
    """
    if k <= 0:
        return
    missing = []
    for unit in units:
        if isinstance(unit.source, Pair):
            missing.append(f"{unit.group} (a pair row: pairs carry no negatives)")
            continue
        missing += [
            f"{unit.group}/{lang}" for lang in unit.languages if not unit.source.negatives.get(lang)
        ]
    if missing:
        raise DataError(
            f"train.negatives_per_query={k} but {len(missing)} unit language(s) have no hard "
            f"negatives, e.g. {', '.join(missing[:3])}; expected item rows with 'negatives' "
            "in every training language (write them with rayhybrid mine) or negatives_per_query=0"
        )


def units_from(
    items: Sequence[ParallelItem] = (), pairs: Sequence[Pair] = (), languages: Sequence[str] = ()
) -> list[Unit]:
    """Units of the training data, restricted to ``languages`` when given (empty: all)."""
    keep = set(languages)
    units = []
    for item in items:
        langs = tuple(lang for lang in item.languages if not keep or lang in keep)
        if langs:
            units.append(Unit(item, item.id, langs))
    for pair in pairs:
        if not keep or (pair.query_lang in keep and pair.passage_lang in keep):
            units.append(Unit(pair, pair.group, (pair.query_lang, pair.passage_lang)))
    return units


class BatchPlan:
    """Seeded, epoch-aware plan of global batches.

    Args:
        cfg: the ``batch`` section of the config.
        units: slot fillers (see :func:`units_from`).
        num_workers: Ray Train workers; ``cfg.batch_size`` must divide by it.

    Raises:
        BatchPlanError: a cross-lingual strategy on data with a single language; a batch size that a language (or the data) cannot fill
            without repeating a group; the english strategy without English pairs;
            a batch size that does not divide by the number of workers.
    """

    def __init__(self, cfg: BatchConfig, units: Sequence[Unit], num_workers: int = 1):
        self.cfg = cfg
        self.units = list(units)
        self.num_workers = num_workers
        self._groups = [u.group for u in self.units]
        index: dict[Key, list[int]] = {}
        for i, unit in enumerate(self.units):
            for key in unit.serves():
                index.setdefault(key, []).append(i)
        self._index = {k: np.asarray(v, dtype=np.int64) for k, v in index.items()}
        self.mono_keys = sorted(k for k in self._index if k[0] == k[1])
        self.cross_keys = sorted(k for k in self._index if k[0] != k[1])
        self._validate()
        self.mono_weights = self._weights(self.mono_keys)
        self.cross_weights = self._weights(self.cross_keys)
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, len(self.units) // cfg.batch_size)
        self._cache: OrderedDict[int, list[list[PlanRow]]] = OrderedDict()

    # ------------------------------------------------------------------ validation

    def _distinct_groups(self, keys: Sequence[Key]) -> int:
        idx = [self._index[k] for k in keys if k in self._index]
        if not idx:
            return 0
        return len({self._groups[i] for i in np.unique(np.concatenate(idx))})

    def _validate(self) -> None:
        cfg, bs = self.cfg, self.cfg.batch_size
        self.per_worker = cfg.per_worker(self.num_workers)  # BatchPlanError: does not divide
        if not self.units:
            raise BatchPlanError(
                "the training data has no usable pairs (check data.path / data.languages)"
            )
        strategy = cfg.strategy
        needs_mono = strategy == "mono" or (strategy == "hybrid" and cfg.alpha > 0)
        needs_cross = strategy == "cross" or (strategy == "hybrid" and cfg.alpha < 1)
        if needs_cross and not self.cross_keys:
            langs = sorted({lang for u in self.units for lang in u.languages})
            what = "alpha < 1 needs" if strategy == "hybrid" else "needs"
            raise BatchPlanError(
                f"batch.strategy={strategy!r} ({what} cross-lingual pairs, query language != passage "
                f"language) but the data has a single language {langs}: use strategy 'mono', "
                "'mixed' or 'english', alpha=1, or data with several languages"
            )
        if needs_mono:
            if not self.mono_keys:
                raise BatchPlanError(
                    f"batch.strategy={strategy!r} needs monolingual pairs; the data "
                    "has only cross-lingual ones"
                )
            for key in self.mono_keys:
                n = self._distinct_groups([key])
                if n < bs:
                    raise BatchPlanError(
                        f"batch.batch_size={bs} is larger than what language {key[0]!r} can supply "
                        f"for a monolingual batch: it has {n} units (distinct groups); lower "
                        f"batch.batch_size or drop {key[0]!r} from data.languages"
                    )
        if needs_cross:
            self._check_capacity(self.cross_keys, "cross-lingual")
        if strategy == "mixed":
            if not self.mono_keys:
                raise BatchPlanError(
                    "batch.strategy='mixed' needs monolingual pairs; the data has none"
                )
            self._check_capacity(self.mono_keys, "monolingual")
        if strategy == "english":
            if ("en", "en") not in self._index:
                raise BatchPlanError(
                    "batch.strategy='english' needs English (en-en) pairs; the data "
                    "has none (check data.languages)"
                )
            self._check_capacity([("en", "en")], "English")

    def _check_capacity(self, keys: Sequence[Key], what: str) -> None:
        n = self._distinct_groups(keys)
        if n < self.cfg.batch_size:
            raise BatchPlanError(
                f"batch.batch_size={self.cfg.batch_size} is larger than the {n} distinct groups that "
                f"can supply {what} pairs (no group may appear twice in a global batch)"
            )

    def _weights(self, keys: Sequence[Key]) -> np.ndarray:
        if not keys:
            return np.zeros(0)
        if self.cfg.language_sampling == "uniform":
            w = np.ones(len(keys))
        else:  # temperature: p ~ n^(1/T), n = units that can serve the language / pair
            n = np.array([len(self._index[k]) for k in keys], dtype=np.float64)
            w = n ** (1.0 / self.cfg.temperature)
        return w / w.sum()

    # ------------------------------------------------------------------ public API

    @property
    def languages(self) -> list[str]:
        return sorted({lang for key in self._index for lang in key})

    def locate(self, global_step: int) -> tuple[int, int]:
        """(epoch, step in epoch) of a global step."""
        if global_step < 0:
            raise ValueError(f"global step must be >= 0, got {global_step}")
        return divmod(global_step, self.steps_per_epoch)

    def key_count(self, key: Key) -> int:
        """Units that can serve (query language, passage language) ``key``."""
        return len(self._index.get(key, ()))

    def mode_of(self, global_step: int) -> str:
        """The mode of a global step (cheap: no units are assigned)."""
        epoch, step = self.locate(global_step)
        return self._draw_mode(self._step_rng(epoch, step))

    def step(self, global_step: int) -> list[PlanRow]:
        """All ``batch_size`` rows of one global step, in slot order."""
        epoch, step = self.locate(global_step)
        return self._epoch(epoch)[step]

    def worker_rows(self, global_step: int, rank: int) -> list[PlanRow]:
        """The share of worker ``rank``: slots ``[rank*b, (rank+1)*b)``."""
        if not 0 <= rank < self.num_workers:
            raise ValueError(f"rank must be in [0, {self.num_workers}), got {rank}")
        b = self.per_worker
        return self.step(global_step)[rank * b : (rank + 1) * b]

    def rows(self, start: int, stop: int, rank: int | None = None) -> Iterator[PlanRow]:
        """Rows of global steps ``[start, stop)``; only worker ``rank``'s share when given."""
        for g in range(start, stop):
            yield from (self.step(g) if rank is None else self.worker_rows(g, rank))

    # ------------------------------------------------------------------ internals

    def _step_rng(self, epoch: int, step: int) -> np.random.Generator:
        return np.random.default_rng(
            np.random.SeedSequence([self.cfg.seed, epoch, step, _STEP_TAG])
        )

    def _draw_mode(self, rng: np.random.Generator) -> str:
        strategy = self.cfg.strategy
        if strategy == "hybrid":
            # The first draw of the step's RNG decides the mode, whatever the data.
            return "mono" if rng.random() < self.cfg.alpha else "cross"
        return strategy

    def _epoch(self, epoch: int) -> list[list[PlanRow]]:
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        rows = _EpochBuilder(self, epoch).build()
        self._cache[epoch] = rows
        if len(self._cache) > 4:  # a stream walks epochs in order; a few suffice
            self._cache.popitem(last=False)
        return rows


class _EpochBuilder:
    """Fills the slots of one epoch's steps from the per-epoch permutation."""

    def __init__(self, plan: BatchPlan, epoch: int):
        self.plan = plan
        self.epoch = epoch
        n = len(plan.units)
        rng = np.random.default_rng(np.random.SeedSequence([plan.cfg.seed, epoch, _EPOCH_TAG]))
        self.rank = np.empty(n, dtype=np.int64)
        self.rank[rng.permutation(n)] = np.arange(n)
        self.used = np.zeros(n, dtype=bool)
        self.order: dict[Key, np.ndarray] = {}
        self.fresh: dict[Key, int] = {}
        self.recycle: dict[Key, int] = {}

    def build(self) -> list[list[PlanRow]]:
        spe = self.plan.steps_per_epoch
        return [self._step(s, self.epoch * spe + s) for s in range(spe)]

    def _step(self, step: int, global_step: int) -> list[PlanRow]:
        plan = self.plan
        rng = plan._step_rng(self.epoch, step)
        mode = plan._draw_mode(rng)
        bs = plan.cfg.batch_size
        taken: set[str] = set()
        out: list[PlanRow] = []
        if mode in ("mono", "english"):
            if mode == "english":
                key = ("en", "en")
            else:
                key = plan.mono_keys[rng.choice(len(plan.mono_keys), p=plan.mono_weights)]
            for slot in range(bs):
                unit = self._pick(key, taken)
                # Validation guarantees batch_size distinct groups for every mono language.
                assert unit is not None, (key, slot)
                out.append(self._row(global_step, slot, mode, key, unit, taken))
            return out
        keys = plan.cross_keys if mode == "cross" else plan.mono_keys
        weights = plan.cross_weights if mode == "cross" else plan.mono_weights
        # One vectorised draw for the whole batch; a slot is redrawn only when its language
        # (pair) has no group left outside the batch.
        drawn = rng.choice(len(keys), size=bs, p=weights)
        open_keys = np.ones(len(keys), dtype=bool)
        for slot in range(bs):
            k = int(drawn[slot])
            while (unit := self._pick(keys[k], taken)) is None:
                open_keys[k] = False
                w = weights * open_keys
                k = int(rng.choice(len(keys), p=w / w.sum()))
            out.append(self._row(global_step, slot, mode, keys[k], unit, taken))
        return out

    def _row(self, g: int, slot: int, mode: str, key: Key, unit: int, taken: set[str]) -> PlanRow:
        group = self.plan._groups[unit]
        taken.add(group)
        return PlanRow(g, slot, mode, group, key[0], key[1], unit)

    def _pick(self, key: Key, taken: set[str]) -> int | None:
        """Next unused unit serving ``key`` (shuffle order) whose group is not in the batch.

        When every unit of ``key`` was used this epoch, units are reused in the same order
        (a language drawn more often than it has data); None if all groups are taken.
        """
        order = self.order.get(key)
        if order is None:
            idx = self.plan._index[key]
            order = self.order[key] = idx[np.argsort(self.rank[idx], kind="stable")]
            self.fresh[key] = self.recycle[key] = 0
        groups = self.plan._groups
        i = self.fresh[key]
        # Vectorised skip over units used by other keys (a rarely drawn key lags behind).
        if i < len(order) and self.used[order[i]]:
            # Vectorised skip over units used by other keys (a rarely drawn key lags behind).
            pos = np.flatnonzero(~self.used[order[i:]])
            i = self.fresh[key] = i + int(pos[0]) if len(pos) else len(order)
        for j in range(i, len(order)):
            u = int(order[j])
            if not self.used[u] and groups[u] not in taken:
                self.used[u] = True
                return u
        start = self.recycle[key]
        for t in range(len(order)):
            j = (start + t) % len(order)
            u = int(order[j])
            if groups[u] not in taken:
                self.recycle[key] = j + 1
                return u
        return None
