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
from tests.procs import cli_env, run_cli

# Lines Ray prints on its own: the token-auth notice, the local-start INFO line, Ray Data's
# execution echoes and logged progress, tqdm bars of datasets, worker deprecation warnings,
# the C++ core worker's restart notice (driver and forwarded), Ray Train's per-report INFO
# lines, the Ray Train placement-group cleaner's traceback when two Ray instances share the
# machine (the suite's own Ray and the command's), sentence-transformers' save line, MLflow's
# local-version-label warning of the logged model.
RAY_LINES = {
    "core worker restart notice": re.compile(
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments"
    ),
    "Ray Train report line": re.compile(r"Reporting training result \d"),
    "placement group cleaner traceback": re.compile(r"PlacementGroupCleaner.*(Traceback|Error)"),
    "sentence-transformers save line": re.compile(r"Saving model to "),
    "Ray Data progress notice": re.compile(r"Progress bars disabled"),
    "MLflow local version label": re.compile(r"contains a local version label"),
    "token-auth notice": re.compile(r"Token authentication is enabled"),
    "local start": re.compile(r"Started a local Ray instance"),
    "Ray Data execution plan": re.compile(r"Execution plan of Dataset"),
    "Ray Data start echo": re.compile(r"Starting execution of Dataset"),
    "Ray Data logged progress": re.compile(r"logging_progress\.py|Total Progress:"),
    "Ray Data progress bar": re.compile(r"Running Dataset"),
    "deprecation warning": re.compile(r"DeprecationWarning"),
}


def _run(args: list[str], cwd: Path, xquad_dir: Path) -> str:
    env = cli_env(xquad_dir.parent, drop=("MLFLOW_", "RAY_", "RAYHYBRID_CONSOLE", *QUIET_ENV))
    proc = run_cli(args, cwd, env, timeout=1200)
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
    # Ray's own lines back, the restart notice of the driver's encoder pool among them (the
    # pattern the quiet run was checked with matches Ray's real line).
    assert {"local start", "core worker restart notice"} <= back, (back, verbose[-4000:])
    assert re.search(r"\[rayhybrid eval\] xquad_r: outputs in ", verbose)


# Ray Tune's own console output: the status table every 30 s and the per-trial config boxes.
TUNE_LINES = {
    "Tune status table": re.compile(r"Trial status: \d"),
    "Tune experiment box": re.compile(r"Configuration for experiment"),
    "Tune trial config box": re.compile(r"Trial \S+ started with configuration"),
}


@pytest.mark.slow
def test_tune_console_shows_trial_lines_not_tune_tables(xquad_dir, tmp_path):
    quiet = _run(
        [
            "tune",
            "--config",
            str(Path(__file__).parents[1] / "configs" / "tune_small.yaml"),
            "model.name=tiny",
            f"data.path={xquad_dir}",
            "data.languages=[en,de]",
            "data.max_query_length=24",
            "data.max_passage_length=40",
            "batch.batch_size=8",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.log_every=1",
            "train.precision=fp32",
            "tune.alphas=[0.0,1.0]",
            "tune.scheduler=none",
            "tune.cpus_per_trial=1",
            "eval.bootstrap_samples=50",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tune.storage_path={tmp_path / 'tune'}",
            f"eval.output_dir={tmp_path / 'out'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        tmp_path,
        xquad_dir,
    )
    (tmp_path / "console.txt").write_text(quiet)
    noise = {**RAY_LINES, **TUNE_LINES}
    shown = {name for name, pattern in noise.items() if pattern.search(quiet)}
    assert not shown, (shown, quiet[-6000:])
    for alpha, n in (("0.0", 1), ("1.0", 2)):
        trial = rf"\[rayhybrid tune\] trial {n}/2 \(alpha={alpha}\)"
        for event in (" started", r" step 2: dev objective 0\.\d{4}", " finished"):
            assert len(re.findall(trial + event, quiet)) == 1, (trial + event, quiet[-4000:])
    # The table people read (figures with intervals), not the CSV's bookkeeping columns.
    assert re.search(r"\| 0\.000 \| finished \(baseline\) \| 2 \| 0\.\d{3} \[", quiet), quiet[
        -3000:
    ]
    assert "mlflow_run_id" not in quiet, quiet[-3000:]


NOISE = (
    "[2026-12-04 20:58:41,825 E 23947 23947] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(_Encoder))' and ID: 'ab01' has constructor arguments in the object "
    "store and max_restarts > 0. If the arguments in the object store go out of scope or are "
    "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727"
)


def _traceback(cause: str) -> list[str]:
    return [
        "Exception in thread PlacementGroupCleanerMonitor:",
        "Traceback (most recent call last):",
        '  File "placement_group_cleaner.py", line 80, in _monitor_loop',
        "    alive = is_actor_alive(",
        "            ^^^^^^^^^^^^^^^",
        "^^^^^^^^^^^^",  # a caret line split off by the forwarding, as seen from a Tune trial
        cause,
    ]


def test_worker_log_filter_drops_only_the_known_ray_lines():
    """The forwarded-lines filter on a real Ray dispatcher: the restart notice and the
    cleaner's multiple-instances traceback (even split across batches) are dropped; the same
    actor's other traceback, other actors' lines and project lines all reach the printer."""
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from rayhybrid.console import filter_worker_logs

    printed: list[tuple[str | None, list[str]]] = []
    dispatcher = WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", lambda d: printed.append((d["pid"], d["lines"])))
    filter_worker_logs(dispatcher)
    filter_worker_logs(dispatcher)  # a second ray.init in one process: wrapped once
    assert [name for name, _ in dispatcher.handlers] == ["ray_print_logs"]

    def emit(pid, lines, actor=None):
        dispatcher.emit({"pid": pid, "is_err": True, "lines": lines, "actor_name": actor})

    emit(1, ["step 1/4 loss 2.0", NOISE, "step 2/4 loss 1.9"], "RayTrainWorker")
    emit(2, [NOISE])  # nothing left: the printer is not called
    known = _traceback("ConnectionError: Found multiple active Ray instances: {'a', 'b'}.")
    emit(3, known[:3], "PlacementGroupCleaner")
    emit(3, known[3:], "PlacementGroupCleaner")
    other = _traceback("RuntimeError: the GCS went away")
    emit(4, other[:2], "PlacementGroupCleaner")
    emit(4, other[2:] + ["after"], "PlacementGroupCleaner")
    emit(5, known, "SomeOtherActor")  # only the cleaner's traceback is recognised
    assert printed == [
        (1, ["step 1/4 loss 2.0", "step 2/4 loss 1.9"]),
        (4, [*other, "after"]),
        (5, known),
    ]


def test_stderr_filter_drops_noise_of_this_process_and_its_children(capfd):
    """File descriptor 2 through the filter: C++-style writes of the process and of a child
    that inherited the descriptor lose exactly the noise line; the rest arrives in order, a
    partial line without waiting for its newline; the descriptor is the real one afterwards."""
    from rayhybrid.console import drop_stderr_lines

    child = (
        f"import os; os.write(2, b'child before\\n' + {NOISE!r}.encode() + b'\\nchild after\\n')"
    )
    with drop_stderr_lines():
        os.write(2, f"first\n{NOISE}\nsecond\n".encode())
        subprocess.run([sys.executable, "-c", child], check=True)
        os.write(2, b"partial ")
        os.write(2, b"line\n")
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert err == ("first\nsecond\nchild before\nchild after\npartial line\nafter the block\n"), err


def test_quiet_worker_keeps_the_project_info_lines_and_every_warning():
    """In a quiet Ray Train worker the root logger's console drops other loggers' INFO
    records (Ray Train's report lines, sentence-transformers' save line), nothing else."""
    import io
    import logging

    from rayhybrid.console import quiet_worker

    root, project = logging.getLogger(), logging.getLogger("rayhybrid")
    before = root.handlers[:], root.level, project.propagate, project.level
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    file_like = logging.FileHandler(os.devnull)
    # As in a worker: the root logger at INFO (Ray Train's setting), the project's loggers
    # propagating to it (a command's own process may have given them a handler of their own).
    root.handlers, root.level = [console, file_like], logging.INFO
    project.propagate, project.level = True, logging.INFO
    try:
        quiet_worker(False)
        logging.getLogger("sentence_transformers.base.model").info("Saving model to /x")
        quiet_worker(True)
        quiet_worker(True)  # once per handler
        logging.getLogger("sentence_transformers.base.model").info("Saving model to /y")
        logging.getLogger("/ray/train/v2/_internal/execution/context.py").info("Reporting 1")
        logging.getLogger("rayhybrid.train.worker").info("step 1/4 loss 2.0")
        logging.getLogger("rayhybrid_lookalike").info("not the project")
        logging.getLogger("transformers.modeling_utils").warning("a real warning")
    finally:
        root.handlers, root.level, project.propagate, project.level = before
        file_like.close()
    assert stream.getvalue().splitlines() == [
        "Saving model to /x",
        "step 1/4 loss 2.0",
        "a real warning",
    ]
    assert len(console.filters) == 1 and not file_like.filters
