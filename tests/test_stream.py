"""The Ray Data batch stream on a real local Ray (2 CPUs): DESIGN.md properties 1, 2 and 4
measured on the per-rank datasets, resume, streaming vs materialized, a 2-worker TorchTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayhybrid.batching import BatchPlan, BatchPlanError, units_from
from rayhybrid.config import load_config
from rayhybrid.corpus import TrainingData, load_training_data
from rayhybrid.datamodel import LoadReport, Pair
from rayhybrid.stream import (
    StreamError,
    build_train_datasets,
    iter_step_batches,
    rank_key,
    show_batches,
    train_data_config,
)

WORKERS, BATCH, STEPS, RESUME_AT = 2, 16, 12, 5


def xquad_cfg(xquad_dir: Path, *extra: str):
    # steps_per_epoch=5: the 12 steps cross two epoch boundaries (per-epoch shuffle).
    return load_config(
        None,
        [
            f"data.path={xquad_dir}",
            f"batch.batch_size={BATCH}",
            "batch.strategy=hybrid",
            "batch.alpha=0.5",
            "batch.steps_per_epoch=5",
            "model.query_prefix='Query: '",
            "model.passage_prefix='Passage: '",
            "data.max_query_length=16",
            "data.max_passage_length=24",
            f"train.max_steps={STEPS}",
            *extra,
        ],
    )


def read_all(datasets: dict, per_worker: int = BATCH // WORKERS) -> list[list[dict]]:
    """Per rank, the list of step batches."""
    return [
        list(iter_step_batches(datasets[rank_key(r)], per_worker, 0)) for r in range(len(datasets))
    ]


@pytest.fixture(scope="module")
def xquad(xquad_dir, ray_local, minilm_dir):
    cfg = xquad_cfg(xquad_dir)
    data = load_training_data(cfg.data, part="train")
    datasets = build_train_datasets(cfg, data, str(minilm_dir), WORKERS)
    return cfg, data, read_all(datasets), datasets


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), (x["step"], key)
            else:
                assert value == y[key], (x["step"], key)


def test_rank_datasets_obey_the_plan(xquad):
    cfg, data, full, _ = xquad
    plan = BatchPlan(cfg.batch, units_from(data.items, data.pairs), WORKERS)
    assert [len(rank) for rank in full] == [STEPS, STEPS]
    modes = set()
    for step in range(STEPS):
        shares = [full[r][step] for r in range(WORKERS)]
        assert [s["step"] for s in shares] == [step, step]
        # Two workers' shares at the same step follow the same plan.
        assert len({s["mode"] for s in shares}) == 1
        mode = shares[0]["mode"]
        modes.add(mode)
        q = [lang for s in shares for lang in s["q_lang"]]
        p = [lang for s in shares for lang in s["p_lang"]]
        if mode == "mono":
            assert len(set(q) | set(p)) == 1
        else:
            assert all(a != b for a, b in zip(q, p))
        groups = [g for s in shares for g in s["group"]]
        assert len(set(groups)) == BATCH, f"group twice in global batch {step}"
        for r, share in enumerate(shares):
            planned = plan.worker_rows(step, r)
            assert share["group"] == [row.group for row in planned]
            assert share["q_lang"] == [row.query_lang for row in planned]
    assert modes == {"mono", "cross"}


def test_tokens_are_prefixed_truncated_and_padded_per_step(xquad, minilm_dir):
    from transformers import AutoTokenizer

    _, data, full, _ = xquad
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    items = {it.id: it for it in data.items}
    batch = full[1][3]
    for i in range(len(batch["group"])):
        item = items[batch["group"][i]]
        q = tok("Query: " + item.queries[batch["q_lang"][i]], truncation=True, max_length=16)[
            "input_ids"
        ]
        p_text = "Passage: " + item.positives[batch["p_lang"][i]][0]
        p = tok(p_text, truncation=True, max_length=24)["input_ids"]
        n = int(batch["q_attention_mask"][i].sum())
        assert batch["q_input_ids"][i, :n].tolist() == q
        assert batch["p_input_ids"][i, : int(batch["p_attention_mask"][i].sum())].tolist() == p
        assert (batch["q_input_ids"][i, n:] == 0).all()
    for rank in full:
        for b in rank:
            assert (
                b["q_input_ids"].dtype == torch.long and b["p_attention_mask"].dtype == torch.long
            )
            assert b["q_input_ids"].shape[1] <= 16 and b["p_input_ids"].shape[1] <= 24
            # Padded to the step's longest row, not to the maximum length.
            assert b["q_attention_mask"][:, -1].any() and b["p_attention_mask"][:, -1].any()


def test_restart_at_step_k_yields_the_uninterrupted_batches(xquad, minilm_dir):
    cfg, data, full, datasets = xquad
    resumed = read_all(
        build_train_datasets(cfg, data, str(minilm_dir), WORKERS, start_step=RESUME_AT)
    )
    for r in range(WORKERS):
        assert resumed[r][0]["step"] == RESUME_AT
        assert_same_batches(resumed[r], full[r][RESUME_AT:])
        # A restart that keeps the datasets built from step 0 skips to its step instead.
        skipped = iter_step_batches(
            datasets[rank_key(r)], BATCH // WORKERS, 0, start_step=RESUME_AT
        )
        assert_same_batches(list(skipped), full[r][RESUME_AT:])
    # A run resumed at its last step gets an empty stream, not an error.
    done = build_train_datasets(cfg, data, str(minilm_dir), WORKERS, start_step=STEPS)
    assert read_all(done) == [[], []]


def test_streaming_equals_materialized(xquad, minilm_dir):
    # Lazy per-rank datasets (what a cluster with spare CPUs streams during training).
    cfg, data, full, _ = xquad
    lazy = build_train_datasets(cfg, data, str(minilm_dir), WORKERS, materialize=False)
    assert type(lazy[rank_key(1)]).__name__ == "Dataset"
    assert_same_batches(list(iter_step_batches(lazy[rank_key(1)], BATCH // WORKERS, 0)), full[1])


def test_stream_of_pairs(ray_local, minilm_dir):
    from transformers import AutoTokenizer

    # Non-parallel pairs: each serves only its own (query language, passage language).
    pairs = [
        Pair(
            f"question {i} about topic {i % 7}",
            f"answer passage number {i} " * (1 + i % 4),
            ql,
            pl,
            group=f"g{i}",
        )
        for i, (ql, pl) in enumerate([("en", "en"), ("de", "de"), ("en", "de"), ("de", "en")] * 40)
    ]
    by_group = {p.group: p for p in pairs}
    data = TrainingData(items=[], pairs=pairs, report=LoadReport("synthetic"))
    cfg = load_config(
        None,
        ["batch.batch_size=8", "batch.strategy=hybrid", "batch.alpha=0.3", "train.max_steps=6"],
    )
    eager = build_train_datasets(cfg, data, str(minilm_dir), WORKERS)
    assert type(eager[rank_key(0)]).__name__ == "MaterializedDataset"
    batches = read_all(eager, 4)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    for step in range(6):
        mode = batches[0][step]["mode"]
        assert batches[1][step]["mode"] == mode
        for b in (batches[0][step], batches[1][step]):
            for i, group in enumerate(b["group"]):
                pair = by_group[group]
                assert (b["q_lang"][i], b["p_lang"][i]) == (pair.query_lang, pair.passage_lang)
                assert (pair.query_lang == pair.passage_lang) == (mode == "mono")
                n = int(b["p_attention_mask"][i].sum())
                assert b["p_input_ids"][i, :n].tolist() == tok(pair.passage)["input_ids"]
    # Read with the wrong per-worker batch size: a clear error, not silently misaligned steps.
    with pytest.raises(StreamError, match="expected 3 rows of one step"):
        list(iter_step_batches(eager[rank_key(0)], 3, 0))


def test_plan_errors_surface_in_the_driver(ray_local, minilm_dir):
    data = TrainingData(
        items=[],
        pairs=[Pair("q", "p", "en", "en", f"g{i}") for i in range(20)],
        report=LoadReport("synthetic"),
    )
    cfg = load_config(None, ["batch.batch_size=8", "batch.strategy=cross"])
    with pytest.raises(BatchPlanError, match="single language"):
        build_train_datasets(cfg, data, str(minilm_dir), 2)
    cfg = load_config(None, ["batch.batch_size=9", "batch.strategy=mono"])
    with pytest.raises(BatchPlanError, match="num_workers=2"):
        build_train_datasets(cfg, data, str(minilm_dir), 2)
    with pytest.raises(ValueError, match="start_step=30"):
        build_train_datasets(
            load_config(None, ["batch.batch_size=8", "batch.strategy=mono", "train.max_steps=20"]),
            data,
            str(minilm_dir),
            2,
            start_step=30,
        )


def _train_loop(config: dict) -> None:
    """Each worker reads its own rank's dataset and writes what it saw."""
    import ray.train

    from rayhybrid.stream import iter_step_batches, rank_key

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(rank_key(rank))
    seen = [
        {
            "step": b["step"],
            "mode": b["mode"],
            "group": b["group"],
            "q_sum": int(b["q_input_ids"].sum()),
            "p_shape": list(b["p_input_ids"].shape),
        }
        for b in iter_step_batches(shard, config["per_worker"], 0)
    ]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def test_two_worker_trainer_on_two_cpus_reads_its_planned_share(xquad, minilm_dir, tmp_path):
    # 2 workers x 1 CPU on a 2-CPU Ray: the stream is materialized before the trainer takes
    # the CPUs, so the workers never wait for tokenizer actors that cannot be scheduled.
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _, _, full, datasets = xquad
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"per_worker": BATCH // WORKERS, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
        datasets=datasets,
        dataset_config=train_data_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream_test"),
    )
    trainer.fit()
    for r in range(WORKERS):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert [s["step"] for s in seen] == list(range(STEPS))
        assert [s["group"] for s in seen] == [b["group"] for b in full[r]]
        assert [s["q_sum"] for s in seen] == [int(b["q_input_ids"].sum()) for b in full[r]]
        assert [s["mode"] for s in seen] == [b["mode"] for b in full[r]]


def test_show_batches_prints_the_plan(xquad_dir):
    cfg = load_config(None, [f"data.path={xquad_dir}", "batch.batch_size=32", "batch.alpha=0.5"])
    out = show_batches(cfg, n=4, texts=2, start_step=10)
    lines = out.splitlines()
    assert lines[0].startswith("plan: strategy=hybrid alpha=0.5 batch_size=32")
    assert "languages ar de el en es hi ru th tr vi zh" in lines[1]
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["10", "11", "12", "13"]
    assert sum(line.startswith("  [") for line in lines) == 8
    data = load_training_data(cfg.data, part="train")
    plan = BatchPlan(cfg.batch, units_from(data.items, data.pairs), 1)
    for g, line in zip(range(10, 14), step_lines):
        assert plan.mode_of(g) in line
        assert "32 groups" in line


def test_validation_batches_are_the_dev_plan_through_the_stream(xquad_dir, ray_local, minilm_dir):
    """The driver's validation batches: the batch plan's steps over the dev split, tokenized and
    padded exactly as the training stream's steps (no second planner, no second tokenizer)."""
    from rayhybrid.stream import validation_batches, validation_plan

    cfg = load_config(
        None,
        [
            f"data.path={xquad_dir}",
            "data.dev_fraction=0.1",
            f"batch.batch_size={BATCH}",
            "batch.strategy=hybrid",
            "batch.alpha=0.5",
            "model.query_prefix='Query: '",
            "data.max_query_length=16",
            "data.max_passage_length=24",
        ],
    )
    dev = load_training_data(cfg.data, part="dev")
    _, plan = validation_plan(cfg, dev, WORKERS)
    n = min(4, plan.steps_per_epoch)
    val = validation_batches(cfg, dev, str(minilm_dir), WORKERS, max_steps=4)
    assert len(val) == WORKERS and all(len(v) == n for v in val)
    stream = read_all(build_train_datasets(cfg, dev, str(minilm_dir), WORKERS, max_steps=n))
    for rank in range(WORKERS):
        assert_same_batches(val[rank], stream[rank])
        for step, batch in enumerate(val[rank]):
            rows = plan.worker_rows(step, rank)
            assert batch["group"] == [r.group for r in rows]
            assert batch["mode"] == plan.mode_of(step)
