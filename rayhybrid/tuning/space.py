"""The search space and the objective of ``rayhybrid tune`` (pure: no Ray, nothing started).

Everything here runs before a trial starts, so a bad space fails in a second with a message
naming the config key. See :mod:`rayhybrid.tuning.driver` for the job itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from rayhybrid.config import Config, apply_overrides
from rayhybrid.tuning import TuneError

__all__ = [
    "AXIS_NAMES",
    "DEV_PREFIX",
    "OBJECTIVE_KEY",
    "STEP_KEY",
    "Objective",
    "dev_key",
    "param_space",
    "parse_objective",
    "search_axes",
]

DEV_PREFIX = "dev/"
OBJECTIVE_KEY = "dev/objective"
STEP_KEY = "dev/step"
# Short names of the usual axes in tables and plots; other axes keep their dotted key.
AXIS_NAMES = {"batch.alpha": "alpha", "train.lr": "lr", "train.tau": "tau"}
_SETTINGS = ("mono", "cross", "multi")


def dev_key(name: str) -> str:
    """Report / MLflow key of a dev metric: ``mono/map_at_20`` -> ``dev/mono/map_at_20``.

    An old ``@`` spelling is mapped to the one scheme (MLflow rejects '@' in metric names).
    """
    return DEV_PREFIX + name.replace("@", "_at_")


_METRICS = ("map", "map_at_20", "mrr", "r_at_1", "r_at_10", "ndcg_at_10", "mrr_at_10", "r_at_100")
_MIN_METRICS = ("bias/rank_distance",)


# --------------------------------------------------------------------------- objective


@dataclass(frozen=True)
class Objective:
    """What Tune maximises (or minimises), computed from the dev metrics of one report.

    Attributes:
        name: as configured, e.g. ``mean_map_at_20`` or ``multi/map_at_20``.
        keys: the dev metrics it is computed from (without the ``dev/`` prefix).
        mode: ``max`` or ``min``.
    """

    name: str
    keys: tuple[str, ...]
    mode: str

    def value(self, dev: dict[str, float]) -> float:
        """The objective from dev metrics keyed without prefix (``mono/map_at_20``, ...).

        Raises:
            TuneError: a metric it needs is missing from ``dev``.
        """
        missing = [k for k in self.keys if k not in dev]
        if missing:
            raise TuneError(
                f"tune.objective {self.name!r} needs dev metric(s) {missing}; the dev "
                f"evaluation returned {sorted(dev)}"
            )
        return float(sum(dev[k] for k in self.keys) / len(self.keys))


def parse_objective(text: str, settings: Sequence[str] = _SETTINGS) -> Objective:
    """Parse ``tune.objective``.

    ``mean_<metric>`` is the mean over the configured settings (mono, cross, multi) of
    ``<setting>/<metric>``; ``<setting>/<metric>`` is one metric; ``bias/rank_distance``
    is minimised, everything else maximised.

    Raises:
        TuneError: unknown form, setting or metric.
    """
    known = ", ".join(_METRICS)
    # The old spelling (mean_map@20, multi/r@10) names the same metric.
    text = re.sub(r"@(\d+)", r"_at_\1", text)
    m = re.fullmatch(r"mean_(.+)", text)
    if m:
        metric = m.group(1)
        if metric not in _METRICS:
            raise TuneError(
                f"tune.objective {text!r}: unknown metric {metric!r}; expected one of {known}"
            )
        used = [s for s in _SETTINGS if s in settings]
        if not used:
            raise TuneError(
                f"tune.objective {text!r}: eval.settings {list(settings)} has none of "
                f"{list(_SETTINGS)}"
            )
        return Objective(text, tuple(f"{s}/{metric}" for s in used), "max")
    if text in _MIN_METRICS:
        if "multi" not in settings:
            raise TuneError(f"tune.objective {text!r} needs 'multi' in eval.settings")
        return Objective(text, (text,), "min")
    parts = text.split("/")
    if len(parts) == 2 and parts[0] in _SETTINGS and parts[1] in _METRICS:
        if parts[0] not in settings:
            raise TuneError(
                f"tune.objective {text!r}: setting {parts[0]!r} is not in eval.settings "
                f"{list(settings)}"
            )
        return Objective(text, (text,), "max")
    raise TuneError(
        f"tune.objective {text!r}: expected mean_<metric>, <setting>/<metric> with "
        f"setting in {list(_SETTINGS)} and metric in {known}, or bias/rank_distance"
    )


# --------------------------------------------------------------------------- search space


def _check_values(name: str, values: Sequence[Any], lo: float, hi: float, lo_open: bool) -> None:
    seen: set[float] = set()
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TuneError(f"{name}[{i}] = {v!r}: expected a finite number")
        if v < lo or v > hi or (lo_open and v <= lo):
            interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
            raise TuneError(f"{name}[{i}] = {v!r} is outside {interval}")
        if v in seen:
            raise TuneError(f"{name} lists {v!r} twice; each value would run the same trial again")
        seen.add(v)


def search_axes(cfg: Config) -> dict[str, list[Any]]:
    """The validated search axes, ``{dotted config key: values}``; alpha always comes first.

    Raises:
        TuneError: an empty search space, alpha outside [0, 1], lr or tau <= 0, a value
            listed twice, a malformed ``tune.extra_grid`` entry, no dev split, no
            validation points, or a bad objective / resources.
        ConfigError: an extra grid value of the wrong type for its key.
    """
    t = cfg.tune
    if not t.alphas:
        raise TuneError(
            "tune.alphas is empty: the search space has no trial; give at least one "
            "value in [0, 1], e.g. tune.alphas=[0.0,0.5,1.0]"
        )
    _check_values("tune.alphas", t.alphas, 0.0, 1.0, lo_open=False)
    _check_values("tune.lrs", t.lrs, 0.0, 1.0, lo_open=True)
    _check_values("tune.taus", t.taus, 0.0, math.inf, lo_open=True)
    axes: dict[str, list[Any]] = {"batch.alpha": list(t.alphas)}
    if t.lrs:
        axes["train.lr"] = list(t.lrs)
    if t.taus:
        axes["train.tau"] = list(t.taus)
    for i, entry in enumerate(t.extra_grid):
        key, sep, raw = entry.partition("=")
        key = key.strip()
        try:
            values = yaml.safe_load(raw) if sep else None
        except yaml.YAMLError:
            values = None
        if not key or not isinstance(values, list):
            raise TuneError(f"tune.extra_grid[{i}] = {entry!r}: expected 'key=[v1, v2, ...]'")
        if not values:
            raise TuneError(
                f"tune.extra_grid[{i}] = {entry!r}: empty list, the search space has no trial"
            )
        if key in axes or key in ("batch.strategy",):
            raise TuneError(
                f"tune.extra_grid[{i}]: {key} is set by the sweep itself; use "
                "tune.alphas / tune.lrs / tune.taus"
            )
        for v in values:  # type-check every value now, not in a trial an hour later
            apply_overrides(cfg, {key: v})
        axes[key] = values
    _check_setup(cfg)
    return axes


def _check_setup(cfg: Config) -> None:
    t = cfg.tune
    if cfg.data.dev_fraction <= 0:
        raise TuneError(
            "tuning scores trials on the dev split, and data.dev_fraction is 0: set "
            "data.dev_fraction > 0 (the dev articles come after the training ones; the "
            "test split is never used for tuning)"
        )
    if cfg.train.eval_every <= 0 or cfg.train.eval_every > cfg.train.max_steps:
        raise TuneError(
            f"train.eval_every = {cfg.train.eval_every}: tuning reports dev metrics at "
            "the validation points; set it to a value in [1, train.max_steps]"
        )
    if t.max_concurrent < 1:
        raise TuneError(f"tune.max_concurrent = {t.max_concurrent}: expected >= 1")
    if not t.trial_timeout_s >= 0:  # NaN too
        raise TuneError(
            f"tune.trial_timeout_s = {t.trial_timeout_s}: expected seconds >= 0 (0: no budget)"
        )
    if t.cpus_per_trial <= 0:
        raise TuneError(f"tune.cpus_per_trial = {t.cpus_per_trial}: expected > 0")
    if t.gpus_per_trial < 0 or (t.gpus_per_trial > 0 and t.gpus_per_trial != cfg.train.num_workers):
        raise TuneError(
            f"tune.gpus_per_trial = {t.gpus_per_trial}: expected 0 (CPU) or "
            f"train.num_workers = {cfg.train.num_workers} (one GPU per worker)"
        )
    if t.search != "grid" and t.num_samples < 1:
        raise TuneError(f"tune.num_samples = {t.num_samples}: expected >= 1")
    parse_objective(t.objective, cfg.eval.settings)


def param_space(cfg: Config, axes: dict[str, list[Any]]) -> tuple[dict[str, Any], Any, int]:
    """Tune ``param_space``, search algorithm (or None) and ``num_samples`` for ``cfg.tune.search``.

    grid: every combination. random / optuna: alpha uniform on [min, max], lr and tau
    log-uniform on [min, max] of their lists, extra axes drawn from their lists.

    Raises:
        TuneError: optuna is asked for but not installed.
    """
    from ray import tune

    t = cfg.tune
    if t.search == "grid":
        return {k: tune.grid_search(v) for k, v in axes.items()}, None, 1

    def dist(key: str, values: list[Any]) -> Any:
        if len(values) == 1:
            return values[0]
        lo, hi = min(values), max(values)
        if key == "batch.alpha":
            return tune.uniform(lo, hi)
        if key in ("train.lr", "train.tau"):
            return tune.loguniform(lo, hi)
        return tune.choice(values)

    space = {k: dist(k, v) for k, v in axes.items()}
    if t.search == "random":
        return space, None, t.num_samples
    try:
        import optuna  # noqa: F401 - OptunaSearch only fails later without it
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise TuneError(
            "tune.search = optuna needs optuna: `pip install optuna`, or use "
            "tune.search = grid / random"
        ) from None
    objective = parse_objective(t.objective, cfg.eval.settings)
    return space, OptunaSearch(metric=OBJECTIVE_KEY, mode=objective.mode), t.num_samples
