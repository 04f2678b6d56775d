"""Training job: fine-tune a bi-encoder with Ray Train on the hybrid batch stream.

    python jobs/train.py --config configs/small.yaml train.max_steps=50
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/train.py --config configs/paper_xlmr.yaml train.storage_path=/mnt/shared/runs

``rayhybrid train`` as a script (:func:`rayhybrid.cli.job_main`: the same parsing, exit
statuses and error lines): training, then the evaluation of ``eval.tasks`` when
``eval.at_end_of_training``; prints the run summary; exits non-zero on failure
(2: config error, 1: anything else).
"""

from __future__ import annotations

import sys

from rayhybrid.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train", __doc__))
