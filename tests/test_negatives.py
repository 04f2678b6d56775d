"""Hard negatives through the stream: the step's passage language, k per pair, tokenized like
passages, a pure function of (seed, epoch, step); clear errors before training."""

from __future__ import annotations

import json

import pytest

from rayhybrid.batching import BatchPlan, check_negatives, units_from
from rayhybrid.config import ConfigError, load_config
from rayhybrid.corpus import load_training_data
from rayhybrid.datamodel import DataError
from rayhybrid.stream import _spec, _step_batch, _StepTokenizer, text_key

LANGS, N_ITEMS, K, WORKERS = ("de", "en", "fr"), 12, 2, 2


def _write_items(path, with_negatives=True):
    rows = []
    for i in range(N_ITEMS):
        row = {
            "id": f"it{i}",
            "queries": {lang: f"question {i} in {lang}" for lang in LANGS},
            "positives": {lang: [f"answer {i} in {lang}"] for lang in LANGS},
        }
        if with_negatives:  # three per language, so k=2 rotates through them over the epochs
            row["negatives"] = {lang: [f"wrong {i} {j} {lang}" for j in range(3)] for lang in LANGS}
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(path, *extra):
    return load_config(
        None,
        [
            f"data.path={path}",
            "data.format=jsonl",
            "data.train_fraction=1.0",
            "data.dev_fraction=0.0",
            "batch.batch_size=4",
            "batch.strategy=hybrid",
            "batch.alpha=0.5",
            "batch.steps_per_epoch=3",
            f"train.num_workers={WORKERS}",
            f"train.negatives_per_query={K}",
            "model.passage_prefix='Passage: '",
            *extra,
        ],
    )


def test_negatives_are_in_the_step_passage_language_and_a_pure_function_of_the_step(
    tmp_path, tiny_model_dir
):
    from transformers import AutoTokenizer

    cfg = _cfg(_write_items(tmp_path / "items.jsonl"))
    data = load_training_data(cfg.data, part="train")
    units = units_from(data.items, data.pairs)
    plan = BatchPlan(cfg.batch, units, WORKERS)
    spec, _ = _spec(cfg, cfg.batch, units, WORKERS, 0, 9, str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    modes = set()
    for step in range(9):  # three epochs
        epoch = step // 3
        for rank in range(WORKERS):
            batch = _step_batch(_StepTokenizer(spec).table([(rank, step)]), tok.pad_token_id)
            rows = plan.worker_rows(step, rank)
            modes.add(rows[0].mode)
            assert batch["n_input_ids"].shape[0] == len(rows) * K
            assert batch["p_key"].tolist() == [
                text_key(units[r.unit].texts(r.query_lang, r.passage_lang)[1]) for r in rows
            ]
            for i, row in enumerate(rows):
                item = row.group
                passage = units[row.unit].texts(row.query_lang, row.passage_lang)[1]
                ids = tok("Passage: " + passage, truncation=True, max_length=128)["input_ids"]
                assert batch["p_input_ids"][i][batch["p_attention_mask"][i].bool()].tolist() == ids
                for j in range(K):
                    # independent expectation: item i's negatives in the pair's passage
                    # language, starting at (epoch * K) mod 3
                    want = f"wrong {item[2:]} {(epoch * K + j) % 3} {row.passage_lang}"
                    ids = tok("Passage: " + want, truncation=True, max_length=128)["input_ids"]
                    r = i * K + j
                    got = batch["n_input_ids"][r][batch["n_attention_mask"][r].bool()].tolist()
                    assert got == ids, (step, rank, i, j)
                    assert batch["n_key"][r].item() == text_key(want)
            # the same step computed again (a resumed run, another worker) is identical
            again = _step_batch(_StepTokenizer(spec).table([(rank, step)]), tok.pad_token_id)
            assert again["n_input_ids"].equal(batch["n_input_ids"])
    assert modes == {"mono", "cross"}  # both kinds of steps were checked


def test_negatives_requested_from_data_without_them_fail_before_training(tmp_path):
    cfg = _cfg(_write_items(tmp_path / "plain.jsonl", with_negatives=False))
    data = load_training_data(cfg.data, part="train")
    with pytest.raises(DataError, match=r"negatives_per_query=2 but 36 unit language\(s\)"):
        check_negatives(units_from(data.items, data.pairs), cfg.train.negatives_per_query)
    check_negatives(units_from(data.items, data.pairs), 0)  # 0: nothing asked, nothing checked


def test_mini_batch_size_must_divide_the_per_worker_batch(tmp_path):
    path = _write_items(tmp_path / "items.jsonl")
    with pytest.raises(
        ConfigError, match="mini_batch_size=3 does not divide the per-worker batch 2"
    ):
        _cfg(path, "train.mini_batch_size=3", "batch.batch_size=4")
    with pytest.raises(ConfigError, match="expected a divisor such as 4"):
        _cfg(path, "train.mini_batch_size=5", "batch.batch_size=16")
    assert _cfg(path, "train.mini_batch_size=2").train.mini_batch_size == 2


def test_ray_train_run_with_mined_negatives_cached_loss_and_checkpointing(
    ray_local, xquad_dir, tiny_model_dir, tmp_path
):
    """End to end on a real local Ray: mine (in process), then 2 Ray Train steps on 2 workers
    with the mined negatives, the cached loss and gradient checkpointing."""
    from rayhybrid.mine import MineSettings, mine_hard_negatives
    from rayhybrid.train.driver import train

    common = [
        f"data.path={xquad_dir}",
        "data.languages=[en,de]",
        "data.train_fraction=0.05",
        "data.dev_fraction=0.0",
        "data.max_query_length=24",
        "data.max_passage_length=40",
        f"model.name={tiny_model_dir}",
    ]
    mined = tmp_path / "mined.jsonl"
    # margin -10: every candidate in the rank range qualifies (a random model's positives
    # rarely lead), so every query gets its negatives
    settings = MineSettings(num_negatives=2, range_min=0, range_max=10, margin=-10.0)
    mine_hard_negatives(
        load_config(None, common), str(tiny_model_dir), mined, settings, use_ray=False
    )
    cfg = load_config(
        None,
        [
            *common,
            "batch.batch_size=8",
            "batch.strategy=hybrid",
            "train.num_workers=2",
            "train.max_steps=2",
            "train.log_every=1",
            "train.mini_batch_size=2",
            f"train.negatives_per_query={K}",
            f"train.negatives_path={mined}",
            "model.gradient_checkpointing=true",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=negs",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    result = train(cfg)
    assert result.metrics["step"] == 2
    assert result.metrics["false_negatives_masked"] >= 0
    assert (result.model_dir / "config.json").is_file()
