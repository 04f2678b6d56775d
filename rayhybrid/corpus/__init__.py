"""Corpus loaders: every source into the DESIGN.md data model.

- LAReQA folders (XQuAD-R, MLQA-R): :func:`load_lareqa_items` (training),
  :func:`load_lareqa_task` (evaluation).
- BEIR / MIRACL folders: :func:`load_beir_task`.
- JSONL / Parquet files and Hugging Face datasets: :func:`load_pairs_file`, :func:`load_hf`.
- Deterministic splits: :func:`split_units`.
- Config-driven: :func:`load_training_data`, :func:`load_eval_task`.
"""

from rayhybrid.corpus.beir import load_beir_pairs, load_beir_task, read_beir_folder
from rayhybrid.corpus.data import TrainingData, load_eval_task, load_training_data, task_from_items
from rayhybrid.corpus.formats import load_hf, load_pairs_file, parse_rows
from rayhybrid.corpus.lareqa import (
    LareqaFolder,
    lareqa_article_keys,
    lareqa_split_units,
    load_lareqa_items,
    load_lareqa_task,
    read_lareqa_folder,
)
from rayhybrid.corpus.splits import PARTS, split_units

__all__ = [
    "PARTS",
    "LareqaFolder",
    "TrainingData",
    "lareqa_article_keys",
    "lareqa_split_units",
    "load_beir_pairs",
    "load_beir_task",
    "load_eval_task",
    "load_hf",
    "load_lareqa_items",
    "load_lareqa_task",
    "load_pairs_file",
    "load_training_data",
    "parse_rows",
    "read_beir_folder",
    "read_lareqa_folder",
    "split_units",
    "task_from_items",
]
