"""What the evaluation logs to MLflow: headline figures only, at the training step (issue 17)."""

from __future__ import annotations

import itertools
import math

import pytest

from rayhybrid.config import config_from_dict
from rayhybrid.evaluation.run import _Tracker, headline_metrics, mlflow_key
from rayhybrid.tracking import mlflow_client

LANGS = ("de", "en", "es")
NAMES = ("map", "map_at_20", "r_at_1", "r_at_10", "mrr", "ndcg_at_10", "mrr_at_10")


def _flat_metrics() -> dict[str, float]:
    """A summarize()-shaped dict with cells, macros, counts, intervals and bias figures."""
    out: dict[str, float] = {}
    value = itertools.count(1)
    cells = {
        "mono": list(LANGS),
        "cross": [f"{x}-{y}" for x in LANGS for y in LANGS if x != y],
        "multi": list(LANGS),
    }
    for setting, labels in cells.items():
        for label, name in itertools.product(labels, NAMES):
            out[f"t/{setting}/{label}/{name}"] = next(value) / 1000
        for name in NAMES:
            out[f"t/{setting}/{name}"] = next(value) / 1000
            out[f"t/{setting}/{name}/ci_low"] = next(value) / 1000
            out[f"t/{setting}/{name}/ci_high"] = next(value) / 1000
        out[f"t/{setting}/queries"] = 30.0
        out[f"t/{setting}/excluded"] = 0.0
    out.update(
        {
            "t/bias/rank_distance": 12.0,
            "t/bias/rank_distance/ci_low": 10.0,
            "t/bias/rank_distance/ci_high": 14.0,
            "t/bias/rank_distance_micro": 11.0,
            "t/bias/excluded": 0.0,
            "t/bias/share_at_20/de": 0.3,
            "t/time/encode_s": 1.5,
            "t/multi/ndcg_at_10": float("nan"),  # a NaN headline figure is not logged
        }
    )
    return out


def _expected(metrics: dict[str, float]) -> set[str]:
    """The headline keys, written out from the issue's list rather than from the regex."""
    keep = set()
    for setting in ("mono", "cross", "multi"):
        names = ["map", "map_at_20", "r_at_1", "r_at_10", "ndcg_at_10", "mrr_at_10"]
        names += ["mrr"] if setting == "multi" else []
        for name in names:
            with_interval = name in ("map", "map_at_20", "ndcg_at_10")
            ends = ("", "/ci_low", "/ci_high") if with_interval else ("",)
            keep |= {f"t/{setting}/{name}{end}" for end in ends}
    keep |= {f"t/bias/rank_distance{end}" for end in ("", "/ci_low", "/ci_high")}
    return {k for k in keep & set(metrics) if not math.isnan(metrics[k])}


def test_headline_metrics_keep_only_the_headline() -> None:
    metrics = _flat_metrics()
    got = headline_metrics(metrics)
    assert set(got) == _expected(metrics)
    assert all(got[k] == metrics[k] for k in got)
    assert len(got) < 80 < len(metrics)
    assert not any("/queries" in k or "/excluded" in k or "-" in k.split("/")[2] for k in got)


def test_tracker_logs_headline_at_step_and_all_with_the_knob(tmp_path) -> None:
    metrics = _flat_metrics()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    logged = {}
    for log_all in (False, True):
        cfg = config_from_dict(
            {"tracking": {"tracking_uri": uri, "log_all_metrics": log_all, "experiment": "h"}}
        )
        tracker = _Tracker(cfg, None, "some/model", step=80)
        tracker.log(metrics, folder, "eval/t")
        tracker.finish()
        run = client.get_run(tracker.run_id)
        logged[log_all] = run.data.metrics
        history = client.get_metric_history(tracker.run_id, mlflow_key("t/multi/map_at_20"))
        assert [m.step for m in history] == [80]
        # A zero-shot evaluation carries no training params, and says what it is.
        assert not any(k.startswith(("train.", "batch.")) for k in run.data.params)
        assert run.data.tags["rayhybrid.job"] == "evaluate"
        assert "some/model" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["rayhybrid.model"] == "some/model"
        assert len(run.data.tags["rayhybrid.data_fingerprint"]) == 16
        assert len(run.data.tags.get("rayhybrid.git_commit", "x" * 40)) == 40
        # Params resolved and readable: no ${VAR:-...}, no Python tuple reprs.
        assert not any("${" in v or v.startswith("(") for v in run.data.params.values())
    assert set(logged[False]) == {mlflow_key(k) for k in _expected(metrics)}
    finite = {k for k, v in metrics.items() if not math.isnan(v)}
    assert set(logged[True]) == {mlflow_key(k) for k in finite}


if __name__ == "__main__":
    pytest.main([__file__])
