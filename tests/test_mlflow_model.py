"""A tiny training run read back through ``MlflowClient`` (issue 17): fewer than 60 metrics,
the tags saying what the run is, the final model as an MLflow sentence-transformers model
(loadable, registered, encoding as the exported folder and as a plain transformers
computation with the run's prefix, pooling and normalisation), and summary.json pointing at
the model by a relative path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rayhybrid.config import load_config
from tests.test_mlflow_server import tiny_overrides

TEXTS = ["Wer schrieb die Symphonie?", "The river flows into the sea.", "¿Dónde está Madrid?"]
REGISTERED = "rayhybrid-tiny"


def _plain_cls_embeddings(model_dir: Path, texts: list[str], prefix: str) -> np.ndarray:
    """CLS vector of ``prefix + text``, L2-normalised: the trained bi-encoder's recipe written
    with transformers alone, independent of sentence-transformers and MLflow."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        batch = tok([prefix + t for t in texts], padding=True, truncation=True, return_tensors="pt")
        cls = enc(**batch).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(cls, dim=-1).numpy()


@pytest.mark.slow
def test_training_run_holds_a_loadable_registered_model(ray_local, xquad_dir, tmp_path):
    import mlflow.sentence_transformers
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    from rayhybrid.train.driver import train_and_evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            xquad_dir,
            "model-run",
            uri,
            "model.pooling=cls",
            "model.query_prefix='query: '",
            "model.passage_prefix='passage: '",
            f"tracking.register_model={REGISTERED}",
            "eval.at_end_of_training=true",
            f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: [en, de]}}]",
            "eval.top_k=20",
            "eval.bootstrap_samples=50",
            f"eval.output_dir={tmp_path / 'out'}",
        ),
    )
    result, _ = train_and_evaluate(cfg)

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert 0 < len(run.data.metrics) < 60, sorted(run.data.metrics)
    tags = run.data.tags
    assert tags["rayhybrid.job"] == "train" and tags["rayhybrid.model"] == "tiny"
    assert tags["rayhybrid.strategy"] == "hybrid" and tags["rayhybrid.alpha"] == "0.5"
    assert len(tags["rayhybrid.data_fingerprint"]) == 16 and len(tags["rayhybrid.git_commit"]) == 40
    assert "fine-tunes tiny" in tags["mlflow.note.content"]

    # The model is a logged MLflow model of this run, at the last training step, registered.
    (output,) = run.outputs.model_outputs
    assert output.step == result.metrics["step"]
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.name == "model"
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == run.info.run_id and version.status == "READY"

    loaded = mlflow.sentence_transformers.load_model(f"models:/{REGISTERED}/{version.version}")
    folder = SentenceTransformer(str(result.model_dir), device="cpu")
    assert loaded.prompts.get("query") == "query: " and loaded.prompts.get("document") == (
        "passage: "
    )
    for prompt, prefix in (("query", "query: "), ("document", "passage: ")):
        got = loaded.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
        want = folder.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        plain = _plain_cls_embeddings(result.model_dir, TEXTS, prefix)
        np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)
    assert not np.allclose(
        loaded.encode(TEXTS[:1], prompt_name="query"), loaded.encode(TEXTS[:1])
    ), "the query prompt changes nothing"

    # summary.json names the model relative to its own folder, and the path resolves.
    out = tmp_path / "out" / "xquad_r"
    recorded = json.loads((out / "summary.json").read_text())["model"]
    assert not Path(recorded).is_absolute() and str(tmp_path) not in recorded, recorded
    assert (out / recorded).resolve() == result.model_dir.resolve()
    assert (out / recorded / "config.json").is_file()
