"""Ray Tune sweep over the mixing ratio alpha (and optionally lr, tau) on the dev split.

    python tune/run.py --config configs/tune_small.yaml
    python tune/run.py --config configs/tune_small.yaml --space alpha_lr   # configs/spaces/
    python tune/run.py --config configs/tune_small.yaml tune.resume=true   # continue a sweep
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python tune/run.py --config configs/paper_xlmr.yaml tune.storage_path=/mnt/shared/tune

``rayhybrid tune`` as a script (:func:`rayhybrid.cli.job_main`); prints the results table,
exits non-zero on failure (or when every trial failed).
"""

from __future__ import annotations

import sys

from rayhybrid.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("tune", __doc__, prog="tune/run.py"))
