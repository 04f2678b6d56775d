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


def xquad_path() -> Path | None:
    env = os.environ.get("RAYHYBRID_DATA")
    for base in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (base / "xquad-r" / "en.json").is_file():
            return base / "xquad-r"
    return None


@pytest.fixture(scope="session")
def xquad_dir() -> Path:
    path = xquad_path()
    if path is None and os.environ.get("CI"):
        pytest.fail(
            "XQuAD-R not found and CI is set: a CI run without the data proves nothing; "
            "set RAYHYBRID_DATA to the folder holding xquad-r/"
        )
    if path is None:
        pytest.skip(
            "XQuAD-R not found: set RAYHYBRID_DATA to the folder holding xquad-r/ "
            "(expected ../shared/data/xquad-r beside the checkout)"
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
