"""Small readers shared by the loaders: JSON / JSONL with errors that name file and line."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayhybrid.datamodel import DataError

__all__ = ["find_jsonl", "read_json", "read_jsonl", "require"]


def find_jsonl(folder: Path, stem: str, expected: str) -> Path:
    """``folder/<stem>.jsonl`` or ``folder/<stem>.jsonl.gz``, whichever exists.

    Raises:
        DataError: neither exists; the message ends with ``expected`` (what the folder
            should hold).
    """
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem}.jsonl; expected {expected}")


def read_json(path: Path) -> Any:
    """Parse one JSON file.

    Raises:
        DataError: the file is missing, not UTF-8 or not valid JSON (names file:line:column).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file (``.gz`` too).

    Lines are decoded one by one (strict UTF-8), so an error names its line; a string holding
    a lone surrogate (``"\\ud800"``, valid JSON but not text) is refused here rather than
    crashing the tokenizer later.

    Raises:
        DataError: the path is missing or a folder, the gzip stream is truncated or corrupt,
            a line is not UTF-8, not valid JSON, not a JSON object or holds a lone surrogate.
    """
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield lineno, _jsonl_line(path, lineno, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(
            f"{path}: gzip stream truncated or corrupt after line {lineno} ({exc}); "
            "expected a complete .jsonl.gz file"
        ) from None


def _jsonl_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
        ) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column "
            f"{exc.colno}); expected one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{path}:{lineno}: a string holds a lone surrogate escape (such as \\ud800); "
            "expected valid Unicode text"
        ) from None
    return obj


def require(obj: dict, key: str, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """Return ``obj[key]`` if present and of type ``kind``.

    Raises:
        DataError: the field is missing, null or of another type; the message says ``where``
            and what was expected (``what``).
    """
    if key not in obj or obj[key] is None:
        raise DataError(f"{where}: missing field {key!r} (expected {what})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected {what}")
    return value
