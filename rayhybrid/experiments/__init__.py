"""Experiments built on training and evaluation, and how their results are shown.

- :mod:`~rayhybrid.experiments.compare`: the paper's strategy comparison (``rayhybrid
  compare``): every batch strategy under one budget, evaluated zero-shot, tested against a
  baseline row.
- :mod:`~rayhybrid.experiments.quickstart`: the one-command quickstart (``rayhybrid
  quickstart``): evaluate, fine-tune, evaluate again.
- :mod:`~rayhybrid.experiments.results`: the results table of compare and tune (markdown,
  CSV).
- :mod:`~rayhybrid.experiments.plots`: every plot (evaluation, comparison, tuning).
"""
