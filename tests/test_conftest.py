"""tests/conftest.py: without XQuAD-R a data test fails in CI (CI=true) and skips, saying why, elsewhere.

Each case runs pytest in a subprocess on one small data test with RAYHYBRID_DATA pointing to an
empty folder, as a CI machine without the data would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_TEST = "tests/test_stream.py::test_show_batches_prints_the_plan"  # needs xquad_dir only


def _pytest_without_data(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    empty = tmp_path / "no-data"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["RAYHYBRID_DATA"] = str(empty)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", DATA_TEST],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_missing_data_fails_in_ci(tmp_path):
    out = _pytest_without_data(tmp_path, ci="true")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]  # 1: tests failed (not 5, nothing collected)
    assert "1 error" in text, text[-3000:]  # the fixture failed the test at setup
    assert f"XQuAD-R not found in {tmp_path / 'no-data'}" in text, text[-3000:]
    assert "CI is set" in text and "RAYHYBRID_DATA" in text, text[-3000:]


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_data_skips_with_the_reason_outside_ci(tmp_path, ci):
    out = _pytest_without_data(tmp_path, ci=ci)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "1 skipped" in text, text[-3000:]
    assert "SKIPPED [1] tests/test_stream.py" in text, text[-3000:]
    assert f"XQuAD-R not found in {tmp_path / 'no-data'}" in text, text[-3000:]
