"""The hybrid batch stream on Ray Data (DESIGN.md, 'Pipeline' and 'Batch strategies').

For every training worker ``r`` one Ray Dataset ``train_rank{r}`` holds that worker's
share of every global step in ``[start_step, max_steps)``, in step order. Ray Data
expands step numbers into plan rows (:mod:`rayhybrid.batching`, a pure function of
``(seed, epoch, step)``), looks the texts up, validates them and tokenizes them with a
Hugging Face fast tokenizer in ``map_batches``: the driver loads it once and ships its
Rust backend; every tokenizer actor builds its own copy once (no "Already borrowed" from
a tokenizer shared across threads). Token ids are stored unpadded;
:func:`iter_step_batches` pads each step to its longest row.

Why one dataset per rank instead of ``streaming_split``: Ray Train's split does not
say which rows reach which worker, and the plan must decide that (a worker's share of
a mono step is part of a global batch whose other part another worker holds). Pass
the datasets with ``dataset_config=train_data_config()`` (no splitting, order kept) and
read them in the worker with ``ray.train.get_dataset_shard(f"train_rank{rank}")``.

Resume: a stream built with ``start_step=k`` yields exactly batches k, k+1, ... of the
uninterrupted stream, because every row is computed from its global step alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import os
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rayhybrid.batching import BatchPlan, PlanRow, Unit, check_negatives, units_from
from rayhybrid.datamodel import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from rayhybrid.config import BatchConfig, Config

__all__ = [
    "StreamError",
    "build_train_datasets",
    "iter_step_batches",
    "rank_key",
    "show_batches",
    "train_data_config",
    "validation_batches",
    "validation_plan",
]

log = logging.getLogger(__name__)

# Materialize automatically up to this many planned pairs (~0.5 KB each once tokenized).
MATERIALIZE_MAX_PAIRS = 500_000
PAIRS_PER_BLOCK = 2048  # rows per Ray Data block: large enough for batched tokenization


class StreamError(RuntimeError):
    """The stream handed to a worker is not the planned one (wrong order or batch size)."""


def rank_key(rank: int) -> str:
    """Name of worker ``rank``'s dataset in ``TorchTrainer(datasets=...)``."""
    return f"train_rank{rank}"


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a tokenizer actor needs to compute its rows (shipped once via the object store)."""

    batch: BatchConfig
    units: list[Unit]
    num_workers: int
    start_step: int
    n_steps: int
    tokenizer_path: str
    tokenizer_json: str  # the fast tokenizer's Rust backend, serialized
    truncation_side: str
    query_prefix: str
    passage_prefix: str
    max_query_length: int
    max_passage_length: int
    negatives_per_query: int = 0  # hard negatives tokenized per row (train.negatives_per_query)


def text_key(text: str) -> int:
    """A 64-bit key of a passage text (equal texts, equal keys): the loss masks pairs whose
    passages share one as false negatives (:func:`rayhybrid.loss.info_nce`)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _token_lists(tokenizer: Any, texts: list[str]) -> pa.Array:
    import pyarrow as pa

    ids = [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=True)]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _check_share(share: list[PlanRow], texts: list[tuple[str, str]], step: int, rank: int) -> None:
    for row, (query, passage) in zip(share, texts):
        for what, text in (("query", query), ("passage", passage)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"group {row.group!r}: empty {what} in language "
                    f"{row.query_lang if what == 'query' else row.passage_lang!r} "
                    f"(step {step}, worker {rank}); expected non-empty text"
                )
    if len({r.group for r in share}) != len(share):  # the plan guarantees it; a cheap guard
        raise StreamError(f"step {step}, worker {rank}: a group appears twice in one batch")


class _StepTokenizer:
    """Plan rows of workers' steps in, their texts checked and tokenized (ids unpadded) out.

    The one recipe for what a batch holds and how it is tokenized: the Ray Data actors of the
    training stream and the driver's validation batches (:func:`validation_batches`) use it.
    """

    def __init__(self, spec: _StreamSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self.plan = BatchPlan(spec.batch, spec.units, spec.num_workers)
        # The Rust backend of the driver's Hugging Face fast tokenizer, set up the way its
        # __call__(truncation=True, max_length=L) does: same ids, and no torch / transformers
        # import in the actor (seconds of start-up per actor on a busy 2-core machine).
        self.tokenizers = {}
        for side, length in (("q", spec.max_query_length), ("p", spec.max_passage_length)):
            tok = Tokenizer.from_str(spec.tokenizer_json)
            tok.no_padding()
            tok.enable_truncation(length, strategy="longest_first", direction=spec.truncation_side)
            self.tokenizers[side] = tok

    def table(self, shares: Sequence[tuple[int, int]]) -> pa.Table:
        """Rows of the ``(rank, global step)`` shares, in that order."""
        import pyarrow as pa

        spec = self.spec
        cols: dict[str, list] = {
            k: [] for k in ("step", "slot", "mode", "group", "q_lang", "p_lang")
        }
        queries: list[str] = []
        passages: list[str] = []
        negatives: list[str] = []  # k per row, in row order
        k = spec.negatives_per_query
        for rank, step in shares:
            share = self.plan.worker_rows(step, rank)
            texts = [spec.units[r.unit].texts(r.query_lang, r.passage_lang) for r in share]
            _check_share(share, texts, step, rank)
            epoch = self.plan.locate(step)[0]
            for row, (query, passage) in zip(share, texts):
                if k:  # in the step's passage language: the pair's own, mono or cross
                    negatives += spec.units[row.unit].negatives(row.passage_lang, k, epoch)
                cols["step"].append(step)
                cols["slot"].append(row.slot)
                cols["mode"].append(row.mode)
                cols["group"].append(row.group)
                cols["q_lang"].append(row.query_lang)
                cols["p_lang"].append(row.passage_lang)
                queries.append(spec.query_prefix + query)
                passages.append(passage)
        table = {
            k: pa.array(v, type=pa.int64() if k in ("step", "slot") else pa.string())
            for k, v in cols.items()
        }
        table["q_ids"] = _token_lists(self.tokenizers["q"], queries)
        # keys of the texts without the prefix (the same prefix is on every passage)
        table["p_key"] = pa.array([text_key(x) for x in passages], type=pa.int64())
        passages_prefixed = [spec.passage_prefix + x for x in passages]
        table["p_ids"] = _token_lists(self.tokenizers["p"], passages_prefixed)
        if k:
            offsets = pa.array(np.arange(0, len(negatives) + 1, k, dtype=np.int32))
            flat = [spec.passage_prefix + x for x in negatives]
            table["n_ids"] = pa.ListArray.from_arrays(
                offsets, _token_lists(self.tokenizers["p"], flat)
            )
            table["n_key"] = pa.ListArray.from_arrays(
                offsets, pa.array([text_key(x) for x in negatives], type=pa.int64())
            )
        return pa.table(table)


class _PlanTokenize(_StepTokenizer):
    """``map_batches`` callable: step numbers in, tokenized plan rows of one worker out."""

    def __init__(self, spec: Any, rank: int | None = None):
        import ray

        # One tokenizer thread per CPU this actor holds: Rust's default (all cores) would
        # oversubscribe the machine when several actors tokenize at once.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(cpus))))
        super().__init__(ray.get(spec) if isinstance(spec, ray.ObjectRef) else spec)
        self.rank = rank

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # A per-rank dataset counts its own steps; the combined one is rank-major.
        n = self.spec.n_steps
        shares = [
            (self.rank, index) if self.rank is not None else divmod(index, n)
            for index in batch["id"].tolist()
        ]
        return self.table([(rank, self.spec.start_step + offset) for rank, offset in shares])


def _fast_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {path}: not a fast (Rust) tokenizer; the stream needs one "
            "(a tokenizer.json beside the model)"
        )
    return tokenizer


def _spec(
    cfg: Config,
    batch: BatchConfig,
    units: list[Unit],
    num_workers: int,
    start_step: int,
    n_steps: int,
    tokenizer_path: str,
) -> tuple[_StreamSpec, Any]:
    """The stream's spec and the driver's fast tokenizer it was made from."""
    tokenizer = _fast_tokenizer(tokenizer_path)
    return _StreamSpec(
        batch,
        units,
        num_workers,
        start_step,
        n_steps,
        tokenizer_path,
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.truncation_side,
        cfg.model.query_prefix,
        cfg.model.passage_prefix,
        cfg.data.max_query_length,
        cfg.data.max_passage_length,
        cfg.train.negatives_per_query,
    ), tokenizer


def validation_plan(cfg: Config, data: Any, num_workers: int) -> tuple[list[Unit], BatchPlan]:
    """The batch plan over the dev split: the training plan's strategy, alpha, sampling and
    seed over the dev units, one epoch of its own length (``batch.steps_per_epoch`` counts
    training steps).

    Raises:
        BatchPlanError: the dev split cannot fill a batch of this strategy.
    """
    units = units_from(data.items, data.pairs, cfg.data.languages)
    return units, BatchPlan(
        dataclasses.replace(cfg.batch, steps_per_epoch=None), units, num_workers
    )


def validation_batches(
    cfg: Config, data: Any, tokenizer_path: str, num_workers: int, max_steps: int
) -> list[list[dict]]:
    """Fixed validation batches: the first steps (at most ``max_steps``, at most one epoch) of
    :func:`validation_plan`, tokenized and padded as the training stream's are.

    Returns:
        Per rank, one :func:`iter_step_batches`-style batch per validation step.

    Raises:
        BatchPlanError: the dev split cannot fill a batch of this strategy.
        ValueError: not a fast tokenizer.
    """
    units, plan = validation_plan(cfg, data, num_workers)
    n_steps = min(max_steps, plan.steps_per_epoch)
    spec, tokenizer = _spec(cfg, plan.cfg, units, num_workers, 0, n_steps, tokenizer_path)
    # The validation loss stays in-batch (comparable across negatives_per_query; the dev split
    # need not carry negatives).
    spec = dataclasses.replace(spec, negatives_per_query=0)
    steps = _StepTokenizer(spec)
    return [
        [
            _step_batch(steps.table([(rank, step)]), tokenizer.pad_token_id)
            for step in range(n_steps)
        ]
        for rank in range(num_workers)
    ]


def train_data_config() -> Any:
    """``ray.train.DataConfig`` for :func:`build_train_datasets`' datasets: no split, order kept."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(
        datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
    )


def _should_materialize(
    choice: bool | None, n_pairs: int, num_workers: int, cpus_per_worker: float
) -> bool:
    import ray

    if choice is not None:
        return choice
    if n_pairs <= MATERIALIZE_MAX_PAIRS:
        return True
    # Streaming needs one CPU per rank for its tokenizer actor beside the training workers;
    # without it the workers would wait forever for data the cluster cannot produce.
    spare = ray.cluster_resources().get("CPU", 0.0) - num_workers * cpus_per_worker
    if spare < num_workers:
        log.warning(
            "materializing a stream of %d pairs: the cluster has %.1f CPUs beside the "
            "training workers, %d needed to stream",
            n_pairs,
            spare,
            num_workers,
        )
        return True
    return False


def _rows_dataset(
    spec_ref: Any, n_ids: int, per_worker: int, rank: int | None, actors: int
) -> ray.data.Dataset:
    import pyarrow as pa
    import ray.data

    steps_per_block = max(1, PAIRS_PER_BLOCK // per_worker)
    n_blocks = max(1, math.ceil(n_ids / steps_per_block))
    # Step numbers are made here as ready blocks, not with ray.data.range: a read task needs a
    # CPU of its own, and with the tokenizer actors holding every CPU it would never run.
    ds = ray.data.from_arrow(
        [
            pa.table({"id": np.arange(i, min(i + steps_per_block, n_ids))})
            for i in range(0, n_ids, steps_per_block)
        ]
    )
    # The dataset's own context (shared by everything derived from it): keep the row order.
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        _PlanTokenize,
        fn_constructor_kwargs={"spec": spec_ref, "rank": rank},
        batch_size=steps_per_block,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, n_blocks))),
        num_cpus=1,
    )


def build_train_datasets(
    cfg: Config,
    data: Any,
    tokenizer_path: str,
    num_workers: int,
    start_step: int = 0,
    max_steps: int | None = None,
    materialize: bool | None = None,
) -> dict[str, ray.data.Dataset]:
    """One Ray Dataset per training worker holding its share of steps ``[start_step, max_steps)``.

    Args:
        cfg: the whole config (``batch``, ``data`` max lengths, ``model`` prefixes, ``train``).
        data: :class:`rayhybrid.corpus.TrainingData` (``items``, ``pairs``).
        tokenizer_path: folder or name for ``AutoTokenizer.from_pretrained`` (fast tokenizer).
        num_workers: Ray Train workers; ``cfg.batch.batch_size`` must divide by it.
        start_step: first global step (a resumed run passes its checkpoint's step).
        max_steps: end of the stream; None: ``cfg.train.max_steps``.
        materialize: overrides ``cfg.batch.materialize`` (None: auto, see the config help).

    Returns:
        ``{"train_rank0": ds0, ...}``: rows ``step, slot, mode, group, q_lang, p_lang, q_ids,
        p_ids`` (unpadded token ids), ``p_key`` (passage text key), with hard negatives
        ``n_ids`` (k token lists) and ``n_key``, ``batch_size // num_workers`` rows per step, in order.

    Raises:
        BatchPlanError: the batch config cannot be satisfied by the data (checked here,
            in the driver, before any Ray work starts).
        DataError: ``train.negatives_per_query > 0`` and some unit has no negatives; a
            ``train.negatives_path`` file with ids the training data lacks.
        ValueError: ``start_step`` outside ``[0, max_steps]``; not a fast tokenizer.
    """
    import ray

    max_steps = cfg.train.max_steps if max_steps is None else max_steps
    if not 0 <= start_step <= max_steps:
        raise ValueError(f"start_step={start_step} must be in [0, max_steps={max_steps}]")
    if cfg.train.negatives_path:  # mined negatives, attached by item id (DataError: unknown ids)
        from rayhybrid.config import resolve_path
        from rayhybrid.mine import attach_negatives

        data = attach_negatives(data, resolve_path(cfg.train.negatives_path))
    units = units_from(data.items, data.pairs, cfg.data.languages)
    BatchPlan(cfg.batch, units, num_workers)  # validate in the driver, with a clear error
    check_negatives(units, cfg.train.negatives_per_query)  # DataError before any Ray work
    n_steps = max_steps - start_step
    per_worker = cfg.batch.per_worker(num_workers)
    spec, _ = _spec(cfg, cfg.batch, units, num_workers, start_step, n_steps, str(tokenizer_path))
    if n_steps == 0:  # a run resumed at its last step: nothing left to read
        empty = ray.data.range(0)
        return {rank_key(r): empty for r in range(num_workers)}
    spec_ref = ray.put(spec)
    choice = cfg.batch.materialize if materialize is None else materialize
    if not _should_materialize(
        choice, n_steps * cfg.batch.batch_size, num_workers, cfg.train.cpus_per_worker
    ):
        return {
            rank_key(r): _rows_dataset(spec_ref, n_steps, per_worker, r, 1)
            for r in range(num_workers)
        }
    # Materialize before the trainer takes the CPUs: one pass over all ranks (rank-major),
    # every free CPU tokenizing, then cut into the per-rank parts.
    cpus = int(ray.available_resources().get("CPU", 1))
    ds = _rows_dataset(spec_ref, num_workers * n_steps, per_worker, None, cpus)
    rows = n_steps * per_worker
    parts = (
        ds.split_at_indices([r * rows for r in range(1, num_workers)])
        if num_workers > 1
        else [ds.materialize()]
    )
    return {rank_key(r): part for r, part in enumerate(parts)}


def _padded(column: pa.ChunkedArray | pa.Array, pad_token_id: int) -> tuple[Any, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(lengths), width), pad_token_id, dtype=np.int64)
    ids[mask] = values  # row-major fill: row i gets its own tokens, then padding
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def iter_step_batches(
    source: Any, per_worker_batch_size: int, pad_token_id: int, start_step: int = 0
) -> Iterator[dict]:
    """One padded batch per global step from a worker's shard (DataIterator) or a Dataset.

    ``start_step`` skips earlier steps unpadded: a run that Ray Train restarted after a
    failure (same datasets, built from step 0) resumes at its checkpoint's step with it.

    Yields:
        ``q_input_ids, q_attention_mask, p_input_ids, p_attention_mask`` (torch.long, padded
        to the step's longest row), ``q_lang, p_lang, group`` (lists of str), ``step`` (int),
        ``mode`` (``mono`` / ``cross`` / ``mixed`` / ``english``), ``p_key`` (text keys of the
        passages); with ``train.negatives_per_query = k``: ``n_input_ids, n_attention_mask``
        (``k`` rows per pair, pair-major) and ``n_key``.

    Raises:
        StreamError: a batch does not hold exactly one step's ``per_worker_batch_size`` rows
            (the dataset was shuffled, split or built for another number of workers).
    """
    for table in source.iter_batches(
        batch_size=per_worker_batch_size, batch_format="pyarrow", prefetch_batches=2
    ):
        steps = table.column("step").to_numpy()
        slots = table.column("slot").to_numpy()
        # A worker's share is one step's consecutive slots [r*b, (r+1)*b).
        if (
            len(steps) != per_worker_batch_size
            or steps.min() != steps.max()
            or slots[0] % per_worker_batch_size
            or (np.diff(slots) != 1).any()
        ):
            raise StreamError(
                f"expected {per_worker_batch_size} rows of one step, got {len(steps)} rows of steps "
                f"{sorted(set(steps.tolist()))[:5]}: was the dataset built with this number of "
                "workers and passed with dataset_config=train_data_config()?"
            )
        if steps[0] < start_step:
            continue
        yield _step_batch(table, pad_token_id)


def _step_batch(table: pa.Table, pad_token_id: int) -> dict:
    """One worker's rows of one step as a padded batch (see :func:`iter_step_batches`)."""
    import torch

    q_ids, q_mask = _padded(table.column("q_ids"), pad_token_id)
    p_ids, p_mask = _padded(table.column("p_ids"), pad_token_id)
    extra = {}
    if "p_key" in table.column_names:
        extra["p_key"] = torch.from_numpy(table.column("p_key").to_numpy().astype(np.int64))
    if "n_ids" in table.column_names:  # k hard negatives per row, flattened row-major
        n_ids = table.column("n_ids").combine_chunks().flatten()
        extra["n_input_ids"], extra["n_attention_mask"] = _padded(n_ids, pad_token_id)
        n_key = table.column("n_key").combine_chunks().flatten()
        extra["n_key"] = torch.from_numpy(n_key.to_numpy().astype(np.int64))
    return {
        **extra,
        "q_input_ids": q_ids,
        "q_attention_mask": q_mask,
        "p_input_ids": p_ids,
        "p_attention_mask": p_mask,
        "q_lang": table.column("q_lang").to_pylist(),
        "p_lang": table.column("p_lang").to_pylist(),
        "group": table.column("group").to_pylist(),
        "step": int(table.column("step")[0].as_py()),
        "mode": table.column("mode")[0].as_py(),
    }


# ---------------------------------------------------------------------------- inspection


def _languages_line(rows: Sequence[PlanRow]) -> str:
    counts = Counter(f"{r.query_lang}->{r.passage_lang}" for r in rows)
    if len(counts) == 1:
        return f"{next(iter(counts))} (all {len(rows)})"
    top = ", ".join(f"{k} x{v}" for k, v in counts.most_common(6))
    more = len(counts) - 6
    return top + (f", ... ({more} more)" if more > 0 else "")


def show_batches(cfg: Config, n: int = 5, texts: int = 2, start_step: int = 0) -> str:
    """What ``rayhybrid batches --show N`` prints: N planned global batches from ``start_step``.

    Raises:
        DataError: the training data cannot be loaded.
        BatchPlanError: the batch config cannot be satisfied by the data.
    """
    from rayhybrid.corpus import load_training_data

    data = load_training_data(cfg.data, part="train")
    units = units_from(data.items, data.pairs, cfg.data.languages)
    plan = BatchPlan(cfg.batch, units, cfg.train.num_workers)
    b, workers = cfg.batch, cfg.train.num_workers
    alpha = f" alpha={b.alpha}" if b.strategy == "hybrid" else ""
    temperature = f" T={b.temperature}" if b.language_sampling == "temperature" else ""
    lines = [
        (
            f"plan: strategy={b.strategy}{alpha} batch_size={b.batch_size} ({workers} worker(s) x "
            f"{cfg.per_worker_batch_size}) sampling={b.language_sampling}{temperature} seed={b.seed}"
        ),
        (
            f"data: {len(units)} units ({len(data.items)} parallel items, {len(data.pairs)} pairs), "
            f"languages {' '.join(plan.languages)}; {plan.steps_per_epoch} steps per epoch"
        ),
    ]
    for g in range(start_step, start_step + n):
        rows = plan.step(g)
        epoch, step = plan.locate(g)
        lines.append(
            f"step {g} (epoch {epoch}, step {step}): {rows[0].mode:<7} "
            f"{len(rows)} pairs, {len({r.group for r in rows})} groups"
        )
        lines.append(f"  languages (query->passage): {_languages_line(rows)}")
        for row in rows[:texts]:
            query, passage = units[row.unit].texts(row.query_lang, row.passage_lang)
            lines.append(
                f"  [{row.query_lang}->{row.passage_lang}] {row.group}: "
                f"Q: {textwrap.shorten(cfg.model.query_prefix + query, 60)} | "
                f"P: {textwrap.shorten(cfg.model.passage_prefix + passage, 60)}"
            )
    return "\n".join(lines)
