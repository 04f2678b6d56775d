"""Model fixtures (tiny model built from a config, the pip-installed MiniLM).

``tiny_model_dir``: a 2-layer, 64-dim BERT-like encoder with a WordPiece tokenizer
trained on XQuAD-R texts (all languages), built once per session. Load it with
``load_biencoder(tiny_model_cfg, path=str(tiny_model_dir))``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayhybrid.config import ModelConfig


@contextlib.contextmanager
def tiny_ddp(rank: int, world: int, port: int, model_dir: str) -> Iterator[tuple[Any, Any]]:
    """In a spawned process: a gloo process group on loopback port ``port`` and the tiny
    bi-encoder of ``model_dir`` in eval mode (no dropout) wrapped in DDP, one torch thread.

    Yields:
        ``(tokenizer, ddp_model)``; the process group is destroyed on exit.
    """
    import torch
    import torch.distributed as dist

    from rayhybrid.model import load_biencoder

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        tokenizer, model = load_biencoder(ModelConfig(name="tiny"), path=model_dir)
        model.eval()
        yield tokenizer, torch.nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


def xquad_texts(xquad_dir: Path, per_language: int = 400) -> list[str]:
    """Questions and paragraphs of every XQuAD-R language (the first ``per_language`` of each)."""
    texts: list[str] = []
    for path in sorted(Path(xquad_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        mine: list[str] = []
        for article in data:
            for para in article["paragraphs"]:
                mine.append(para["context"])
                mine.extend(qa["question"] for qa in para["qas"])
        texts.extend(mine[:per_language])
    return texts


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(
        name="tiny", pooling="mean", tiny_hidden_size=64, tiny_layers=2, tiny_vocab_size=4000
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, xquad_dir, tiny_model_cfg) -> Path:
    from rayhybrid.model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    return build_tiny_model(tiny_model_cfg, xquad_texts(xquad_dir), out, seed=0)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from rayhybrid.model import MINILM, ModelError, resolve_model_path

    try:
        return Path(resolve_model_path(MINILM))
    except ModelError as exc:
        pytest.skip(f"pretrained MiniLM not installed ({exc})")
