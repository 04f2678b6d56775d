"""Quickstart job: train on the XQuAD-R training split, evaluate on held-out articles, log to MLflow.

    python jobs/quickstart.py                       # configs/quickstart.yaml
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/quickstart.py train.storage_path=/mnt/shared/runs

Same as ``rayhybrid quickstart``; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import run_job

from rayhybrid.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.quickstart import quickstart

    return quickstart(cfg)


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    sys.exit(run_job(run, __doc__, default_config=str(default)))
