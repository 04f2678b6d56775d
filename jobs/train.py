"""`ray job submit -- python jobs/train.py --config C [key=value ...]`: fine-tune with Ray Train.

Thin entry point: load the config, call :func:`rayhybrid.training.train`, print the
summary; exit 0 on success, 2 on a config error, 1 on any other failure.
"""

from __future__ import annotations

import sys

from rayhybrid.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
