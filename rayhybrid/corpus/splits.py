"""Deterministic train/dev/test splits over units (articles or groups).

Splitting whole articles (LAReQA) or groups (parallel items / pairs) keeps every text of a
unit on one side, so training and evaluation never share a sentence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rayhybrid.config import check_fractions

__all__ = ["PARTS", "split_units"]

PARTS = ("train", "dev", "test")


def split_units(
    keys: Sequence[str], train_fraction: float, dev_fraction: float = 0.0, seed: int | None = None
) -> dict[str, set[str]]:
    """Split unit keys into ``train`` / ``dev`` / ``test`` sets.

    Args:
        keys: unit keys in file order (duplicates are ignored after the first).
        train_fraction: share of units for training, in [0, 1].
        dev_fraction: share of units for dev, taken after the training units.
        seed: None keeps file order (the first units train); an int shuffles the units
            with ``random.Random(seed)`` first, the same on every machine.

    Returns:
        ``{"train": ..., "dev": ..., "test": ...}``: disjoint sets covering all keys.

    Raises:
        ConfigError: a fraction outside [0, 1] or ``train_fraction + dev_fraction > 1``.
    """
    check_fractions(train_fraction, dev_fraction)
    units = list(dict.fromkeys(keys))
    if seed is not None:
        random.Random(seed).shuffle(units)
    n = len(units)
    # Half-up rounding (not banker's) so 0.75 of 2 units is 2, predictable for users.
    n_train = min(n, int(n * train_fraction + 0.5))
    n_dev = min(n - n_train, int(n * dev_fraction + 0.5))
    return {
        "train": set(units[:n_train]),
        "dev": set(units[n_train : n_train + n_dev]),
        "test": set(units[n_train + n_dev :]),
    }
