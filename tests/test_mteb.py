"""MTEB interoperability (issue 15): a model exported by rayhybrid runs through mteb's own
evaluation with no code of ours in between, and mteb encodes queries with the model's query
prefix and the corpus with its passage prefix (both stored in the saved folder as prompts).

The task is a small custom ``AbsTaskRetrieval`` on local XQuAD-R data (questions against the
sentences of their own language, one subset per language, like MTEB's XQuADRetrieval but on
sentences); nothing is downloaded. mteb's scores and nDCG@10 are checked against a computation
of the test's own: the trainer's bi-encoder (``encode_texts``, not sentence-transformers) with
the prefixes written out, a numpy dot product, and pytrec_eval.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rayhybrid.model import encode_texts, export_model, load_biencoder

mteb = pytest.importorskip("mteb", reason="mteb not installed (pip install -e '.[mteb]')")

LANGS = ("en", "de")
PARAGRAPHS = 8  # the first paragraphs of each language: ~30 sentences, ~120 questions
MAX_LEN = 128
# Distinct words of the tiny model's XQuAD-R vocabulary, so that the two prefixes give
# different token ids (a prefix of unknown words would tokenize to [UNK] on both sides).
QUERY_PREFIX, PASSAGE_PREFIX = "Frage: ", "Antwort: "


def xquad_sentences(path: Path, paragraphs: int) -> dict[str, Any]:
    """Questions, sentences and qrels of the first ``paragraphs`` of one XQuAD-R file.

    The relevant sentence of a question is the one whose span in ``sentence_breaks`` holds the
    answer's start (LAReQA's rule); a question whose answer starts between two spans has none
    and is left out.
    """
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paras = [p for article in data for p in article["paragraphs"]][:paragraphs]
    lang = path.stem
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for i, para in enumerate(paras):
        for j, sentence in enumerate(para["sentences"]):
            corpus[f"{lang}-p{i}-s{j}"] = sentence
        for qa in para["qas"]:
            start = qa["answers"][0]["answer_start"]
            hits = [j for j, (a, b) in enumerate(para["sentence_breaks"]) if a <= start <= b]
            if hits:
                queries[f"{lang}-{qa['id']}"] = qa["question"]
                qrels[f"{lang}-{qa['id']}"] = {f"{lang}-p{i}-s{hits[0]}": 1}
    return {"queries": queries, "corpus": corpus, "qrels": qrels}


def local_retrieval_task(data: dict[str, dict[str, Any]]):
    """An mteb retrieval task over ``data`` (subset -> queries / corpus / qrels), built with
    mteb's public API for custom tasks: ``AbsTaskRetrieval`` with its ``TaskMetadata`` and a
    ``load_data`` that fills ``self.dataset[subset][split]`` from memory instead of the hub."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval

    class XquadRSentences(AbsTaskRetrieval):
        metadata = mteb.TaskMetadata(
            name="RayhybridXquadRSentences",
            description="XQuAD-R questions against the sentences of their own language.",
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs={"en": ["eng-Latn"], "de": ["deu-Latn"]},
            main_score="ndcg_at_10",
            dataset={"path": "local/xquad-r", "revision": "local"},
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {
                lang: {
                    "test": {
                        "queries": Dataset.from_list(
                            [{"id": k, "text": v} for k, v in d["queries"].items()]
                        ),
                        "corpus": Dataset.from_list(
                            [{"id": k, "text": v} for k, v in d["corpus"].items()]
                        ),
                        "relevant_docs": d["qrels"],
                        "top_ranked": None,
                    }
                }
                for lang, d in data.items()
            }
            self.data_loaded = True

    return XquadRSentences()


def dot_scores(
    model, tokenizer, d: dict[str, Any], q_prefix: str, p_prefix: str
) -> dict[str, dict[str, float]]:
    """Score of every (query, sentence) pair: the trainer's embeddings of the prefixed texts,
    dot product (the embeddings are L2-normalised, so this is mteb's cosine)."""
    qids, dids = list(d["queries"]), list(d["corpus"])
    q = encode_texts(
        model, tokenizer, [d["queries"][k] for k in qids], prefix=q_prefix, max_length=MAX_LEN
    )
    p = encode_texts(
        model, tokenizer, [d["corpus"][k] for k in dids], prefix=p_prefix, max_length=MAX_LEN
    )
    s = q.astype(np.float64) @ p.astype(np.float64).T
    return {qid: {did: float(s[i, j]) for j, did in enumerate(dids)} for i, qid in enumerate(qids)}


def ndcg_at_10(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))


def max_abs_diff(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    return max(abs(a[q][d] - b[q][d]) for q in a for d in a[q])


def test_mteb_evaluates_exported_model_with_its_prefixes(
    tiny_model_dir, tiny_model_cfg, xquad_dir, tmp_path
):
    from mteb.models.abs_encoder import AbsEncoder  # the base of mteb's model wrappers
    from sentence_transformers import SentenceTransformer

    cfg = dataclasses.replace(
        tiny_model_cfg, query_prefix=QUERY_PREFIX, passage_prefix=PASSAGE_PREFIX
    )
    tokenizer, model = load_biencoder(cfg, path=str(tiny_model_dir))
    assert tokenizer(QUERY_PREFIX)["input_ids"] != tokenizer(PASSAGE_PREFIX)["input_ids"]
    out = export_model(model, tokenizer, tmp_path / "final_model", cfg, max_seq_length=MAX_LEN)
    data = {lang: xquad_sentences(xquad_dir / f"{lang}.json", PARAGRAPHS) for lang in LANGS}
    assert all(len(d["queries"]) >= 20 and len(d["corpus"]) >= 20 for d in data.values())

    # mteb keeps only the prompt names it knows; every name the export stores must be one.
    st = SentenceTransformer(str(out), device="cpu")
    assert AbsEncoder.validate_task_to_prompt_name(st.prompts, raise_for_invalid_keys=True) == {
        "query": QUERY_PREFIX,
        "document": PASSAGE_PREFIX,
    }

    result = mteb.evaluate(
        st,
        local_retrieval_task(data),
        cache=None,  # write nothing under ~/.cache/mteb
        prediction_folder=tmp_path / "predictions",
        show_progress_bar=False,
    )
    (task_result,) = result.task_results
    scores = {s["hf_subset"]: s for s in task_result.scores["test"]}
    predictions = json.loads(
        (tmp_path / "predictions" / "RayhybridXquadRSentences_predictions.json").read_text()
    )
    assert set(scores) == set(LANGS)

    for lang, d in data.items():
        ours = dot_scores(model, tokenizer, d, QUERY_PREFIX, PASSAGE_PREFIX)
        theirs = predictions[lang]["test"]
        # mteb ranked every sentence for every query, with the prefixed texts' scores ...
        assert set(theirs) == set(ours) and all(set(theirs[q]) == set(ours[q]) for q in ours)
        assert max_abs_diff(ours, theirs) < 1e-5, lang
        # ... and not those of the bare texts, nor of the corpus under the query prefix.
        bare = dot_scores(model, tokenizer, d, "", "")
        swapped = dot_scores(model, tokenizer, d, QUERY_PREFIX, QUERY_PREFIX)
        assert max_abs_diff(bare, theirs) > 1e-3 and max_abs_diff(swapped, theirs) > 1e-3, lang

        want = ndcg_at_10(d["qrels"], ours)
        assert scores[lang]["ndcg_at_10"] == pytest.approx(want, abs=1e-5), lang  # mteb rounds
        assert scores[lang]["main_score"] == scores[lang]["ndcg_at_10"]
        # The prefixes matter for the figure too, so a model whose prompts mteb dropped would
        # show here: the bare texts rank differently.
        assert abs(ndcg_at_10(d["qrels"], bare) - want) > 1e-3, lang
