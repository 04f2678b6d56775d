"""Session fixtures: one local Ray (num_cpus=2), the XQuAD-R folder beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Fixtures of each stage live in their own plugin module so that parts evolve independently.
pytest_plugins = ["tests.fixtures_model"]


def pytest_configure(config):
    # The library logs its progress lines; show them on stdout as the CLI and the jobs do,
    # so tests that call library functions see what a user of the commands sees.
    from rayhybrid.cli import setup_logging

    setup_logging()


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, .ci/run): there a missing input is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def xquad_path() -> Path | None:
    """The XQuAD-R folder: under RAYHYBRID_DATA when set (and only there), else ../shared/data."""
    env = os.environ.get("RAYHYBRID_DATA")
    # A folder named explicitly is the one meant: falling back to another copy would hide a
    # wrong RAYHYBRID_DATA (and make a CI run without its data pass on a stray copy).
    base = Path(env) if env else REPO.parent / "shared" / "data"
    return base / "xquad-r" if (base / "xquad-r" / "en.json").is_file() else None


@pytest.fixture(scope="session")
def xquad_dir() -> Path:
    path = xquad_path()
    where = os.environ.get("RAYHYBRID_DATA") or str(REPO.parent / "shared" / "data")
    if path is None and in_ci():
        pytest.fail(
            f"XQuAD-R not found in {where} (no xquad-r/en.json) and CI is set: a CI run without "
            "the data proves nothing; set RAYHYBRID_DATA to the folder holding xquad-r/",
            pytrace=False,
        )
    if path is None:
        pytest.skip(
            f"XQuAD-R not found in {where} (no xquad-r/en.json): set RAYHYBRID_DATA to the "
            "folder holding xquad-r/ (default ../shared/data beside the checkout)"
        )
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session, 2 CPUs like CI."""
    import ray

    from rayhybrid.cluster import ensure_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=True)  # the jobs' environment
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture()
def gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: GPU-only check not run")
    return torch.device("cuda")


@pytest.fixture()
def encoder_calls(monkeypatch) -> list[int]:
    """The real Ray Data encoder, counted: each call appends its number of text groups."""
    from rayhybrid.evaluation import encode

    calls: list[int] = []
    real = encode.encode_with_ray

    def counting(groups, *args, **kwargs):
        calls.append(len(groups))
        return real(groups, *args, **kwargs)

    monkeypatch.setattr(encode, "encode_with_ray", counting)
    return calls
