"""The console of a command (issue 17): quiet by default, everything with ``--verbose``.

The real ``rayhybrid`` console script runs as a subprocess, as a person runs it: a tiny
``train`` (its end-of-training evaluation included) prints the project's stage lines and
none of Ray's known internal lines; ``evaluate --verbose`` of the model it exported brings
Ray's lines back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayhybrid.console import QUIET_ENV

BIN = Path(sys.executable).parent

# Lines Ray prints on its own: the token-auth notice, the local-start INFO line, Ray Data's
# execution echoes and logged progress, tqdm bars of datasets, worker deprecation warnings.
RAY_LINES = {
    "token-auth notice": re.compile(r"Token authentication is enabled"),
    "local start": re.compile(r"Started a local Ray instance"),
    "Ray Data execution plan": re.compile(r"Execution plan of Dataset"),
    "Ray Data start echo": re.compile(r"Starting execution of Dataset"),
    "Ray Data logged progress": re.compile(r"logging_progress\.py|Total Progress:"),
    "Ray Data progress bar": re.compile(r"Running Dataset"),
    "deprecation warning": re.compile(r"DeprecationWarning"),
}


def _run(args: list[str], cwd: Path, xquad_dir: Path) -> str:
    drop = ("MLFLOW_", "RAY_", "RAYHYBRID_CONSOLE", *QUIET_ENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        RAYHYBRID_DATA=str(xquad_dir.parent),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    proc = subprocess.run(
        [str(BIN / "rayhybrid"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
def test_console_is_quiet_by_default_and_verbose_on_request(xquad_dir, tmp_path):
    task = f"eval.tasks=[{{name: xquad_r, path: '{xquad_dir}', part: test, languages: [en, de]}}]"
    common = [
        f"data.path={xquad_dir}",
        "data.languages=[en,de,es]",
        "data.max_query_length=24",
        "data.max_passage_length=40",
        "eval.top_k=20",
        "eval.bootstrap_samples=50",
        task,
        f"eval.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    quiet = _run(
        [
            "train",
            *common,
            "model.name=tiny",
            "batch.batch_size=8",
            "train.max_steps=4",
            "train.log_every=1",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=console",
            "eval.at_end_of_training=true",
        ],
        tmp_path,
        xquad_dir,
    )
    shown = {name for name, pattern in RAY_LINES.items() if pattern.search(quiet)}
    assert not shown, (shown, quiet[-6000:])
    # The project's own progress, one line per stage.
    for line in (
        r"\[rayhybrid job\] Ray \d",
        r"step 4/4 loss \d",
        r"\[rayhybrid eval\] task xquad_r: \d+ queries",
        r"\[rayhybrid eval\] xquad_r: outputs in ",
        r"^\s+multi\s+mAP \d",
        r"^run folder: ",
    ):
        assert re.search(line, quiet, re.MULTILINE), (line, quiet[-4000:])

    model = tmp_path / "runs" / "console" / "final_model"
    verbose = _run(
        ["evaluate", "--verbose", "--model", str(model), *common, "tracking.enabled=false"],
        tmp_path,
        xquad_dir,
    )
    back = {name for name, pattern in RAY_LINES.items() if pattern.search(verbose)}
    assert "local start" in back, (back, verbose[-4000:])
    assert re.search(r"\[rayhybrid eval\] xquad_r: outputs in ", verbose)
