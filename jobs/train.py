"""Training job: fine-tune a bi-encoder with Ray Train on the hybrid batch stream.

    python jobs/train.py --config configs/small.yaml train.max_steps=50
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/train.py --config configs/paper_xlmr.yaml train.storage_path=/mnt/shared/runs

Same as ``rayhybrid train`` (training, then the evaluation of ``eval.tasks`` when
``eval.at_end_of_training``); prints the run summary; exits non-zero on failure
(2: config error, 1: anything else).
"""

from __future__ import annotations

import argparse
import sys

from _common import run_job

from rayhybrid.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.training import train_and_evaluate

    result, _ = train_and_evaluate(cfg)  # eval.at_end_of_training: evaluated into the same run
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(run, __doc__))
