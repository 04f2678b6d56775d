"""The embedding cache: keys, atomic entries, bad folders, and a real second evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayhybrid.config import ModelConfig
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.cache import EmbeddingCache, model_fingerprint


def model_folder(tmp_path, weights: bytes = b"weights-1"):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    return folder


def test_key_changes_with_model_files_prefix_length_and_texts(tmp_path):
    folder = model_folder(tmp_path)
    cfg = ModelConfig()
    cache = EmbeddingCache.for_model(str(tmp_path / "cache"), cfg, str(folder))
    texts = ["a sentence", "another one"]
    base = cache.path(texts, "query: ", 64)
    assert cache.path(list(texts), "query: ", 64) == base  # same inputs, same entry
    assert cache.path(texts, "passage: ", 64) != base
    assert cache.path(texts, "query: ", 32) != base
    assert cache.path(texts[::-1], "query: ", 64) != base  # order is part of the texts
    assert cache.path(["a sentence", "another one."], "query: ", 64) != base
    # a copy of the same files elsewhere is the same model
    other = tmp_path / "copy"
    other.mkdir()
    for p in folder.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    assert model_fingerprint(other) == model_fingerprint(folder)
    assert (
        EmbeddingCache.for_model(str(tmp_path / "cache"), cfg, str(other)).path(
            texts, "query: ", 64
        )
        == base
    )
    # one changed weight file, or a model setting that shapes embeddings: another entry
    (other / "model.safetensors").write_bytes(b"weights-2")
    changed = EmbeddingCache.for_model(str(tmp_path / "cache"), cfg, str(other))
    assert changed.path(texts, "query: ", 64) != base
    pooled = EmbeddingCache.for_model(
        str(tmp_path / "cache"), ModelConfig(pooling="cls"), str(folder)
    )
    assert pooled.path(texts, "query: ", 64) != base
    # the configured prefixes are not part of the model: only of the texts they start
    prefixed = EmbeddingCache.for_model(
        str(tmp_path / "cache"), ModelConfig(query_prefix="Q-"), str(folder)
    )
    assert prefixed.path(texts, "query: ", 64) == base


def test_put_get_roundtrip_is_atomic_and_bad_entries_are_misses(tmp_path):
    cache = EmbeddingCache.for_model(
        str(tmp_path / "c"), ModelConfig(), str(model_folder(tmp_path))
    )
    texts = [f"t{i}" for i in range(5)]
    assert cache.get(texts, "", 16) is None
    emb = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    path = cache.put(texts, "", 16, emb)
    assert np.array_equal(cache.get(texts, "", 16), emb)
    cache.put(texts, "", 16, emb)  # a second writer of the same key: one whole entry
    assert sorted(p.name for p in cache.folder.iterdir()) == [path.name]  # no temp files left
    path.write_bytes(path.read_bytes()[:50])  # torn entry (e.g. a copy cut short)
    assert cache.get(texts, "", 16) is None
    cache.put(texts, "", 16, emb[:3])  # wrong row count for these texts
    assert cache.get(texts, "", 16) is None


def test_unusable_cache_folder_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(
        EvaluationError, match=r"eval.cache_dir='.*file/cache': not a writable folder"
    ):
        EmbeddingCache.for_model(str(blocker / "cache"), ModelConfig(), str(model_folder(tmp_path)))
    # also for a hub name (no cache for it), the folder is checked before anything runs
    with pytest.raises(EvaluationError, match="not a writable folder"):
        EmbeddingCache.for_model(str(blocker / "cache"), ModelConfig(), "org/not-a-local-folder")
    assert EmbeddingCache.for_model(str(tmp_path / "ok"), ModelConfig(), "org/hub-model") is None
    assert EmbeddingCache.for_model("", ModelConfig(), str(tmp_path)) is None  # off


def test_second_evaluation_skips_encoding_and_gives_identical_metrics(
    ray_local, xquad_dir, minilm_dir, tmp_path, encoder_calls
):
    from rayhybrid.config import load_config
    from rayhybrid.corpus import load_lareqa_task, read_lareqa_folder
    from rayhybrid.evaluation.run import evaluate

    parsed = read_lareqa_folder(xquad_dir)
    task = load_lareqa_task(
        xquad_dir, ["de", "en"], "xq", articles=parsed.key_order[:1], parsed=parsed
    )
    calls = encoder_calls

    def run(*extra: str) -> tuple[dict, dict]:
        cfg = load_config(
            None,
            [
                "tracking.enabled=false",
                f"eval.output_dir={tmp_path}/out",
                f"eval.cache_dir={tmp_path}/cache",
                f"model.name={minilm_dir}",
                "eval.top_k=10",
                "eval.bootstrap_samples=20",
                *extra,
            ],
        )
        metrics = evaluate(cfg, tasks=[task])
        summary = json.loads((tmp_path / "out" / "xq" / "summary.json").read_text())
        return {k: v for k, v in metrics.items() if "/time/" not in k}, summary

    first, s1 = run()
    print(
        f"\nencode / total s: miss {s1['timing_s']['encode_s']:.2f} / {s1['timing_s']['total_s']:.2f}"
    )
    assert calls == [2] and s1["embedding_cache"] == {"queries": "miss", "candidates": "miss"}
    second, s2 = run()
    print(
        f"encode / total s: hit {s2['timing_s']['encode_s']:.2f} / {s2['timing_s']['total_s']:.2f}"
    )
    assert calls == [2]  # the encoder did not run again
    assert s2["embedding_cache"] == {"queries": "hit", "candidates": "hit"}
    assert second.keys() == first.keys()
    assert all(second[k] == first[k] or (np.isnan(first[k]) and np.isnan(second[k])) for k in first)
    # another query prefix: the queries are encoded again, the candidates still come from the cache
    _, s3 = run("model.query_prefix=Q-")
    assert calls == [2, 1] and s3["embedding_cache"] == {"queries": "miss", "candidates": "hit"}
