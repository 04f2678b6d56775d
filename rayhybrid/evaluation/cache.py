"""Embedding cache: re-evaluating one model on one corpus reuses its encoded texts.

An entry holds the embeddings of one group of texts (a task's queries, or its candidates)
under a key that names everything they depend on:

- the model: a SHA-256 over the model folder's files (relative names and contents) and
  the model config that shapes the embeddings (pooling, normalisation, dtype ...; its
  ``name`` is left out, so a copy of the same files elsewhere hits the same entries);
- the texts exactly as encoded (text recipe and prefix applied) and their token limit.

A changed weight file, prefix, recipe (with_context / with_title) or max length therefore
misses. Only local model folders are cached: a hub name has no files here to hash (the
cache is then off for that model, said once in the log).

Entries are ``<eval.cache_dir>/<key>.npz`` (float32 embeddings and a JSON note, loaded
without pickle). The evaluation stores a task's queries as one entry (written and read by
the driver: small) and its candidates as one entry *per language shard* (the texts of that
language in shard order), written and read by the shard actors themselves
(:func:`read_entry`, :func:`write_entry`): a cached candidate pool never passes through the
driver, whose memory then stays bounded by the queries however large the pool. Every write goes to a unique temporary file in the same folder and is
renamed over the entry (``os.replace`` is atomic on POSIX), so two jobs sharing the
folder never see a half-written entry; both writing one key leave one whole copy. An
unreadable or mis-shaped entry counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rayhybrid.evaluation import EvaluationError

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = ["EmbeddingCache", "model_fingerprint", "read_entry", "write_entry"]

log = logging.getLogger(__name__)

_VERSION = 1  # bump when what an entry holds changes


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 over every file under ``folder`` (sorted relative names and contents)."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _texts_fingerprint(texts: Sequence[str], prefix: str, max_length: int) -> str:
    h = hashlib.sha256(f"{prefix}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        h.update((prefix + t).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings of text groups for one model, stored under ``folder``.

    Args:
        folder: the cache folder (created).
        model_key: what identifies the model (:meth:`for_model` builds it).

    Raises:
        EvaluationError: the folder cannot be created or written (checked at once, before
            anything is encoded).
    """

    def __init__(self, folder: str | Path, model_key: str) -> None:
        self.folder = Path(folder).expanduser()
        self.model_key = model_key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".probe-"):
                pass
        except OSError as exc:
            raise EvaluationError(
                f"eval.cache_dir={str(folder)!r}: not a writable folder "
                f"({type(exc).__name__}: {exc.strerror or exc}); set eval.cache_dir to a "
                "writable folder, or to '' to turn the cache off"
            ) from exc

    @classmethod
    def for_model(
        cls, folder: str, model_cfg: ModelConfig, model_path: str | None
    ) -> EmbeddingCache | None:
        """The cache of this model, or None when ``folder`` is empty or the model is not
        a local folder (nothing to hash)."""
        if not folder:
            return None
        from rayhybrid.config import config_to_dict

        model = Path(model_path or model_cfg.name).expanduser()
        if not model.is_dir():
            log.info(
                f"[rayhybrid eval] embedding cache off for {model_path or model_cfg.name}: "
                "not a local model folder (no files to fingerprint)"
            )
            cls(folder, "")  # still fail early on an unusable folder
            return None
        # What shapes the embeddings besides the files; prefixes are in each group's text key
        # (a new query prefix must not invalidate the candidates), training-only knobs out.
        skip = {"name", "query_prefix", "passage_prefix", "freeze_embeddings"}
        shape = {k: v for k, v in config_to_dict(model_cfg).items() if k not in skip}
        key = hashlib.sha256(
            json.dumps(
                {"v": _VERSION, "files": model_fingerprint(model), "model": shape},
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        return cls(folder, key)

    def path(self, texts: Sequence[str], prefix: str, max_length: int) -> Path:
        text_key = _texts_fingerprint(texts, prefix, max_length)
        key = hashlib.sha256(f"{self.model_key}\0{text_key}".encode()).hexdigest()
        return self.folder / f"{key[:40]}.npz"

    def get(self, texts: Sequence[str], prefix: str, max_length: int) -> np.ndarray | None:
        """The cached ``[len(texts), dim]`` float32 embeddings, or None (miss)."""
        return read_entry(self.path(texts, prefix, max_length), len(texts))

    def put(self, texts: Sequence[str], prefix: str, max_length: int, emb: np.ndarray) -> Path:
        """Store ``emb`` for these texts (temporary file, then an atomic rename)."""
        path = self.path(texts, prefix, max_length)
        note = {"texts": len(texts), "prefix": prefix, "max_length": max_length}
        return write_entry(path, emb, note)


def read_entry(path: str | Path, rows: int) -> np.ndarray | None:
    """The ``[rows, dim]`` float32 embeddings of one entry; None when it is missing,
    unreadable or mis-shaped (a warning says which: the caller re-encodes)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            emb = np.asarray(z["emb"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning(f"[rayhybrid eval] embedding cache: unreadable {path} ({exc}); re-encoding")
        return None
    if emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != rows:
        log.warning(f"[rayhybrid eval] embedding cache: {path} has shape {emb.shape}; re-encoding")
        return None
    return emb


def write_entry(path: str | Path, emb: np.ndarray, note: dict) -> Path:
    """Write one entry atomically (a unique temporary file in the folder, then a rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, emb=np.ascontiguousarray(emb, np.float32), note=np.array(json.dumps(note)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
