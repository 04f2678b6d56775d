"""Training: fine-tune a bi-encoder with Ray Train on the hybrid batch stream.

- :mod:`~rayhybrid.train.driver`: :func:`~rayhybrid.train.driver.train`, what ``rayhybrid
  train``, the jobs, the quickstart and Tune's trials call; checks everything that can be
  checked before Ray Train starts, launches the ``TorchTrainer``, owns the MLflow run.
- :mod:`~rayhybrid.train.worker`: the loop every Ray Train worker runs.
- :mod:`~rayhybrid.train.checkpoint`: the run folder, checkpoints and the state that makes a
  resume exact.
- :mod:`~rayhybrid.train.optim`: AdamW and the warm-up / linear-decay schedule.
- :mod:`~rayhybrid.train.precision`: ``train.precision`` per device (bf16 where it is native).

Nothing here starts Ray or imports torch at import time of this package.
"""


class TrainingError(ValueError):
    """A training setting or the run folder is unusable; the message says what to change."""


__all__ = ["TrainingError"]
