"""Strategy comparison job: train every batch strategy under one budget and seed, evaluate each zero-shot.

    python jobs/compare.py --config configs/small.yaml
    python jobs/compare.py --config configs/small.yaml "strategies=[mono, cross, hybrid]"
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/compare.py --config configs/paper_xlmr.yaml train.storage_path=/mnt/shared/runs

``rayhybrid compare`` as a script (:func:`rayhybrid.cli.job_main`); prints the table, exits
non-zero on failure (or when every strategy failed).
"""

from __future__ import annotations

import sys

from rayhybrid.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("compare", __doc__))
