"""Evaluation: mono / cross / multilingual retrieval, language bias, TREC files, MLflow.

Pure cores, thin Ray shells (DESIGN.md, "Evaluation"):

- :mod:`~rayhybrid.evaluation.search`: the exact / FAISS searcher of one shard, the top-k
  merge and the "how many rank before" counts; plain numpy / torch, no Ray.
- :mod:`~rayhybrid.evaluation.retrieval`: runs the settings over a pool of shards (local
  objects or Ray actors alike) and collects per-query ranks.
- :mod:`~rayhybrid.evaluation.metrics`: metric definitions and aggregation (pure).
- :mod:`~rayhybrid.evaluation.shards`: one Ray actor per candidate language.
- :mod:`~rayhybrid.evaluation.encode`: Ray Data ``map_batches`` encoding with an actor pool.
- :mod:`~rayhybrid.evaluation.outputs`: JSON summary, TREC run / qrels, the matrices plotted
  by :mod:`rayhybrid.experiments.plots`.
- :mod:`~rayhybrid.evaluation.run`: the job (``rayhybrid evaluate``), MLflow logging.
- :mod:`~rayhybrid.evaluation.inprocess`: the same pipeline without actors (dev metrics).

Nothing here starts Ray or imports faiss / mlflow / matplotlib at import time.
"""


class EvaluationError(ValueError):
    """Evaluation input is unusable (empty shard, dimension mismatch, top-k too large, ...).

    The message names the shard / file / setting and what was expected.
    """


__all__ = ["EvaluationError"]
