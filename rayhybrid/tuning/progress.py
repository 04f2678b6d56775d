"""One console line per trial event of a sweep, in place of Tune's status table.

A quiet command (:mod:`rayhybrid.console`) runs Tune with ``verbose=0``: Tune's 30-second
status tables and per-trial config boxes are Ray's own output, and a sweep of five trials
printed dozens of them. What a person wants to follow instead is which trial runs, its
values, its dev objective at each validation point, and how it ended; this callback prints
exactly that through the project's logger.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from rayhybrid.tuning.space import OBJECTIVE_KEY, STEP_KEY

__all__ = ["trial_lines_callback"]

log = logging.getLogger("rayhybrid.tuning")


def _values(config: dict[str, Any]) -> str:
    return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in sorted(config.items()))


def trial_lines_callback(total: int) -> Any:
    """A Ray Tune ``Callback`` printing ``[rayhybrid tune] trial i/total ...`` lines.

    Args:
        total: the number of trials of the sweep (shown as ``i/total``).

    Returns:
        The callback instance (built here so importing this module does not import Ray).
    """
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.number: dict[str, int] = {}
            self.shown: dict[str, tuple[Any, float]] = {}  # last (step, objective) printed

        def _name(self, trial: Any) -> str:
            n = self.number.setdefault(trial.trial_id, len(self.number) + 1)
            return f"[rayhybrid tune] trial {n}/{total} ({_values(trial.config)})"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info(f"{self._name(trial)} started")

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            value = result.get(OBJECTIVE_KEY)
            if isinstance(value, (int, float)) and math.isfinite(value):
                step = result.get(STEP_KEY, result.get("step"))
                if self.shown.get(trial.trial_id) == (step, value):
                    return  # a trial's final result repeats its last validation point
                self.shown[trial.trial_id] = (step, value)
                at = f" step {int(step)}" if isinstance(step, (int, float)) else ""
                log.info(f"{self._name(trial)}{at}: dev objective {value:.4f}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info(f"{self._name(trial)} finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.warning(f"{self._name(trial)} failed (its error is in the results table)")

    return TrialLines()
