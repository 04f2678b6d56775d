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


class TrainingStopped(KeyboardInterrupt):
    """The training was stopped by a signal (``ray job stop``'s SIGTERM, Ctrl-C).

    A ``KeyboardInterrupt``: code that catches ``Exception`` does not swallow a stop. The
    message says what was kept; ``exit_status`` is 128 + the signal number, as a shell reports
    a process ended by that signal.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


__all__ = ["TrainingError", "TrainingStopped"]
