"""Quickstart job: train on the XQuAD-R training split, evaluate on held-out articles, log to MLflow.

    python jobs/quickstart.py                       # configs/quickstart.yaml
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/quickstart.py train.storage_path=/mnt/shared/runs

``rayhybrid quickstart`` as a script (:func:`rayhybrid.cli.job_main`); exits non-zero on failure.
"""

from __future__ import annotations

import sys

from rayhybrid.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("quickstart", __doc__))
