"""Tuning: Ray Tune over the mixing ratio alpha (optionally lr, tau), scored on the dev split.

- :mod:`~rayhybrid.tuning.space`: the search space and the objective, validated before
  anything starts (pure: no Ray).
- :mod:`~rayhybrid.tuning.driver`: :func:`~rayhybrid.tuning.driver.run_tune`, the sweep
  (``rayhybrid tune``, ``tune/run.py``): one Train V2 driver function per trial.
- :mod:`~rayhybrid.tuning.report`: what a sweep leaves behind: the MLflow parent run, the
  results table, the trade-off plot, the best config.

Named search spaces are YAML files in ``configs/spaces/`` (``rayhybrid tune --space``).
"""


class TuneError(ValueError):
    """The search space or the tuning setup is invalid; raised before anything starts."""


__all__ = ["TuneError"]
