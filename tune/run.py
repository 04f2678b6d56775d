"""Ray Tune sweep over the mixing ratio alpha (and optionally lr, tau) on the dev split.

    python tune/run.py --config configs/tune_small.yaml
    python tune/run.py --config configs/tune_small.yaml --space alpha_lr
    python tune/run.py --config configs/tune_small.yaml tune.resume=true   # continue a sweep
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python tune/run.py --config configs/paper_xlmr.yaml tune.storage_path=/mnt/shared/tune

Same as ``rayhybrid tune``; prints the results table, exits non-zero on failure (or when every
trial failed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spaces.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # _common.py

from _common import run_job
from spaces import SPACES

from rayhybrid.config import Config, load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", choices=sorted(SPACES),
                        help="named search space from tune/spaces.py (default: the config's tune section)")


def run(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.tuning import run_tune

    if args.space:  # the space first, the command line's overrides win
        cfg = load_config(args.config, [*SPACES[args.space], *args.overrides])
    table = run_tune(cfg)
    print(table.to_markdown())
    return 1 if table.all_failed else 0


if __name__ == "__main__":
    sys.exit(run_job(run, __doc__, add_args=add_args))
