"""Bad JSONL input reaches the user as one line naming file, line and what was expected (issue 12)."""

from __future__ import annotations

import gzip
import json

import pytest

from rayhybrid.corpus._io import read_jsonl
from rayhybrid.datamodel import DataError


def lines(path):
    return list(read_jsonl(path))


def test_good_lines_and_blank_lines(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"a": "é"}\n\n{"b": 2}\n', encoding="utf-8")
    assert lines(f) == [(1, {"a": "é"}), (3, {"b": 2})]


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(DataError) as err:
        lines(f)
    assert str(err.value).startswith(f"{f}:2: not UTF-8 text")
    assert "\n" not in str(err.value)


def test_lone_surrogate_is_refused_at_its_line(tmp_path):
    f = tmp_path / "sur.jsonl"
    f.write_text('{"a": "ok"}\n{"q": "x\\ud800y"}\n', encoding="utf-8")
    assert "\\ud800" in f.read_text()  # valid JSON that json.loads accepts ...
    assert "\ud800" in json.loads(f.read_text().splitlines()[1])["q"]
    with pytest.raises(DataError, match=r"sur\.jsonl:2: a string holds a lone surrogate"):
        lines(f)  # ... but not text


def test_truncated_gzip_is_one_line(tmp_path):
    whole = gzip.compress(b"".join(b'{"i": %d, "t": "%s"}\n' % (i, b"x" * 50) for i in range(500)))
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        lines(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}: gzip stream truncated or corrupt after line ")
    assert "expected a complete .jsonl.gz file" in msg


def test_folder_given_as_a_jsonl_path(tmp_path):
    d = tmp_path / "corpus.jsonl"
    d.mkdir()
    with pytest.raises(DataError, match=r"corpus\.jsonl: is a folder; expected a JSONL file"):
        lines(d)
