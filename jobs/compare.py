"""Strategy comparison job: train every batch strategy under one budget and seed, evaluate each zero-shot.

    python jobs/compare.py --config configs/small.yaml
    python jobs/compare.py --config configs/small.yaml "strategies=[mono, cross, hybrid]"
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/compare.py --config configs/paper_xlmr.yaml train.storage_path=/mnt/shared/runs

Same as ``rayhybrid compare``; prints the table, exits non-zero on failure (or when every
strategy failed).
"""

from __future__ import annotations

import argparse
import sys

from _common import run_job

from rayhybrid.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.compare import compare

    table = compare(cfg)
    print(table.to_markdown())
    return 1 if table.all_failed else 0


if __name__ == "__main__":
    sys.exit(run_job(run, __doc__))
