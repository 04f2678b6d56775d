"""The front door: the ``rayhybrid`` command line and the ``jobs/`` / ``tune/`` scripts.

This is the only module with argparse. Every command is: parse ``--config`` and
``key=value`` overrides, load the config, call one library function, turn the outcome into
an exit status (:func:`execute`). ``rayhybrid train ...`` and ``python jobs/train.py ...``
run the same :data:`COMMANDS` entry through the same :func:`execute`, so they parse alike,
exit alike and print the same error lines; only the name in those lines differs.

Exit status: 0 success, 2 config error (one line ``<prog>: config error: ...``), 1 any other
error (one line ``<prog>: error: <Type>: ...``, plus the traceback when it is a bug rather
than bad input), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (``ray job stop``). ``ray job submit`` marks a job FAILED exactly when its
entrypoint exits non-zero and shows what it printed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rayhybrid.config import ConfigError, explain, load_config, shipped_config

if TYPE_CHECKING:
    from rayhybrid.config import Config

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "execute",
    "job_main",
    "main",
    "run_job",
    "setup_logging",
]

EPILOG = """\
Overrides are key=value pairs with dotted keys, values parsed as YAML, e.g.
  rayhybrid train --config configs/quickstart.yaml train.max_steps=50 batch.alpha=0.3
`rayhybrid config --explain` lists every key with its default and meaning."""

Body = Callable[["Config", argparse.Namespace], "int | None"]


# --------------------------------------------------------------------------- the commands


def _cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    import yaml

    from rayhybrid.config import config_to_dict

    if args.explain and args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, help_text in explain():
            print(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
        return 0
    if args.explain:
        for key, default, help_text in explain():
            print(f"{key} = {default}\n    {help_text}")
        return 0
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--explain", action="store_true", help="List every key, its default and meaning."
    )
    p.add_argument("--markdown", action="store_true", help="With --explain: as a Markdown table.")


def _cmd_batches(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.stream import show_batches

    print(show_batches(cfg, n=args.show, texts=args.texts, start_step=args.start_step))
    return 0


def _args_batches(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", type=int, default=5, help="Number of batches to print (default 5).")
    p.add_argument(
        "--texts", type=int, default=2, help="Example pairs printed per batch (default 2)."
    )
    p.add_argument("--start-step", type=int, default=0, help="First step to print (default 0).")


def _cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.train.driver import train_and_evaluate

    result, _ = train_and_evaluate(cfg)  # the evaluation prints its own headline per task
    print(result.summary(), flush=True)
    return 0


def _cmd_mine(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.mine import MineSettings, mine_hard_negatives

    settings = MineSettings(
        args.num_negatives, args.range_min, args.range_max, args.margin, args.part
    )
    report = mine_hard_negatives(cfg, args.model, args.out, settings, use_ray=not args.in_process)
    for lang, r in report["languages"].items():
        print(
            f"{lang}: {r['queries']} queries, negatives per query {r['negatives_per_query']}, "
            f"positive score median {r['positive_score'].get('median')}, negative score "
            f"median {r['negative_score'].get('median')}"
        )
    print(f"wrote {args.out} ({report['items']} items) and {args.out}.report.json")
    print(f"train with: train.negatives_path={args.out} train.negatives_per_query=<k>")
    return 0


def _args_mine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="Encoder folder or name that ranks.")
    p.add_argument("--out", "-o", default="mined_negatives.jsonl", help="Items JSONL to write.")
    p.add_argument("--num-negatives", type=int, default=4, help="Negatives per query (4).")
    p.add_argument("--range-min", type=int, default=0, help="Skip this many top ranks (0).")
    p.add_argument("--range-max", type=int, default=50, help="Consider ranks below this (50).")
    p.add_argument(
        "--margin", type=float, default=0.05, help="Keep scores <= positive - margin (0.05)."
    )
    p.add_argument("--part", default="train", help="Split part to mine (train).")
    p.add_argument("--in-process", action="store_true", help="Encode here, without Ray.")


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.evaluation.run import evaluate_cli

    return evaluate_cli(cfg, model=args.model, task=args.task, data=args.data)


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", help="Model folder or name (default: model.name of the config)."
    )
    p.add_argument(
        "--task", "-t", help="Task format: lareqa or beir (default: eval.tasks of the config)."
    )
    p.add_argument("--data", "-d", help="Task folder (with --task); evaluated whole.")


def _cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.experiments.compare import compare

    table = compare(cfg)
    print(table.summary or table.to_markdown(), flush=True)
    return 1 if table.all_failed else 0


def _cmd_tune(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.tuning.driver import run_tune

    table = run_tune(cfg)
    print(table.summary or table.to_markdown(), flush=True)
    return 1 if table.all_failed else 0


def _args_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--space",
        help="Search space applied over --config before the overrides: a "
        "name from configs/spaces/ (alpha, alpha_fine, alpha_lr, alpha_lr_tau, random) "
        "or a YAML file (default: the config's tune section).",
    )


def _cmd_quickstart(cfg: Config, args: argparse.Namespace) -> int:
    from rayhybrid.experiments.quickstart import quickstart

    return quickstart(cfg)


@dataclass(frozen=True)
class Command:
    """One command of the front door.

    Attributes:
        run: the body, ``run(cfg, args) -> exit status or None`` (None means 0).
        help: one line for ``--help``.
        add_args: adds the command's own options.
        default_config: shipped config (``configs/<name>``) used when ``--config`` is omitted;
            None: the schema's defaults.
    """

    run: Body
    help: str
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    default_config: str | None = None


COMMANDS: dict[str, Command] = {
    "config": Command(
        _cmd_config, "Print the resolved config, or explain every key.", _args_config
    ),
    "batches": Command(
        _cmd_batches, "Print the planned hybrid batches the trainer will get.", _args_batches
    ),
    "train": Command(
        _cmd_train,
        "Fine-tune a bi-encoder with Ray Train on the hybrid batch "
        "stream (then evaluate eval.tasks when eval.at_end_of_training).",
    ),
    "evaluate": Command(
        _cmd_evaluate,
        "Evaluate an encoder: mono / cross / multilingual retrieval and language bias.",
        _args_evaluate,
        "evaluate_xquad_r.yaml",
    ),
    "mine": Command(
        _cmd_mine,
        "Mine hard negatives for the training items (rank range, margin, never the own item).",
        _args_mine,
    ),
    "compare": Command(_cmd_compare, "Train and evaluate every batch strategy under one budget."),
    "tune": Command(
        _cmd_tune, "Ray Tune search over the mixing ratio alpha (dev split).", _args_tune
    ),
    "quickstart": Command(
        _cmd_quickstart,
        "Train on the XQuAD-R training split, evaluate on held-out articles, log to MLflow.",
        default_config="quickstart.yaml",
    ),
}


# --------------------------------------------------------------------------- parsing


def _add_config_args(p: argparse.ArgumentParser, default_config: str | None) -> None:
    shown = f"configs/{default_config}" if default_config else "the schema's defaults"
    p.add_argument(
        "--config",
        "-c",
        help=f"YAML config file (default: {shown}; defaults apply to anything it omits).",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config overrides, e.g. train.lr=1e-4 data.languages=[en,de].",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="Show everything Ray, Ray Data, Train and MLflow print (default: their internal "
        "warnings and progress echoes are filtered; the project's own lines always show).",
    )
    p.set_defaults(default_config=default_config)


def build_parser() -> argparse.ArgumentParser:
    """The ``rayhybrid`` parser: one subcommand per :data:`COMMANDS` entry."""
    parser = argparse.ArgumentParser(
        prog="rayhybrid",
        description="Hybrid batch training and multilingual retrieval evaluation on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_args(p, command.default_config)
        if command.add_args is not None:
            command.add_args(p)
        p.set_defaults(fn=command.run)
    return parser


def _load(args: argparse.Namespace) -> Config:
    """The config of a parsed command line: ``--config`` (or the command's shipped default),
    then ``--space``, then the overrides.

    Raises:
        ConfigError: bad file, key, type or value; unknown search space.
        FileNotFoundError: no ``--config`` and the shipped default is not found.
    """
    path = args.config
    if path is None and getattr(args, "default_config", None):
        path = shipped_config(args.default_config)
    layers = []
    space = getattr(args, "space", None)
    if space:
        if Path(space).is_file():
            layers.append(Path(space))
        else:
            try:
                layers.append(shipped_config(f"spaces/{space}.yaml"))
            except FileNotFoundError:
                raise ConfigError(
                    f"--space {space}: no such file, and no configs/spaces/{space}.yaml"
                ) from None
    return load_config(path, args.overrides, layers=layers)


# --------------------------------------------------------------------------- running


class _Stdout(logging.StreamHandler):
    """A handler writing to ``sys.stdout`` as it is at each record (a job's log, pytest's
    capture), not as it was when the handler was made."""

    @property
    def stream(self) -> object:
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:  # StreamHandler.__init__ sets it
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show the library's log records (``rayhybrid.*`` loggers, INFO and up) as plain lines on
    stdout: the progress lines every command prints. Idempotent; :func:`execute` calls it."""
    logger = logging.getLogger("rayhybrid")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # one line per record, whatever the root logger does
    logger.setLevel(level)


def _user_facing(exc: BaseException) -> bool:
    """Errors whose message says what to change (no traceback needed)."""
    from rayhybrid.cluster import JobError
    from rayhybrid.datamodel import DataError
    from rayhybrid.tracking import TrackingError

    # ModelError, TrainingError, EvaluationError, TuneError and BatchPlanError derive from
    # ValueError.
    return isinstance(
        exc, (DataError, TrackingError, JobError, ValueError, FileNotFoundError, PermissionError)
    ) or _is_mlflow_error(exc)


def _is_mlflow_error(exc: BaseException) -> bool:
    """An MlflowException (refused request, unknown run, ...): its first line says what failed."""
    mod = sys.modules.get("mlflow.exceptions")  # only loaded if MLflow was used
    return mod is not None and isinstance(exc, mod.MlflowException)


def _error_line(exc: BaseException) -> str:
    """One line: MLflow's messages can carry a whole HTTP response body after the first."""
    text = str(exc)
    if _is_mlflow_error(exc):
        text = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"


def execute(prog: str, run: Body, args: argparse.Namespace) -> int:
    """Load the config of ``args``, call ``run(cfg, args)``; return the exit status.

    Args:
        prog: the name error lines start with (``rayhybrid train``, ``jobs/train.py``).
        run: the command's body.
        args: parsed arguments (``config``, ``overrides`` and the command's own options).

    Returns:
        The body's status (None: 0), 2 for a config error, 1 for any other error, 130 when
        interrupted; errors are printed to stderr as one line.
    """
    from rayhybrid.cluster import path_warnings
    from rayhybrid.console import drop_stderr_lines, is_quiet, quiet

    restore_env = quiet(verbose=bool(getattr(args, "verbose", False)))  # before Ray starts
    setup_logging()
    # Ray's C++ lines on this process's own stderr (rayhybrid.console.drop_stderr_lines).
    with drop_stderr_lines() if is_quiet() else contextlib.nullcontext():
        try:
            cfg = _load(args)
            for warning in path_warnings(cfg):
                print(f"{prog}: warning: {warning}", file=sys.stderr, flush=True)
            status = run(cfg, args)
        except ConfigError as exc:
            print(f"{prog}: config error: {exc}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt as exc:  # TrainingStopped (SIGTERM) says what was kept
            print(f"{prog}: {exc or 'interrupted'}", file=sys.stderr, flush=True)
            return getattr(exc, "exit_status", 130)
        except Exception as exc:  # noqa: BLE001 - any failure must become a non-zero exit status
            # Library errors (bad data, model, run folder, tracking server) carry a message that
            # says what to change; anything else is a bug and keeps its traceback.
            if not _user_facing(exc):
                traceback.print_exc()
            print(f"{prog}: error: {_error_line(exc)}", file=sys.stderr, flush=True)
            return 1
        finally:
            restore_env()
    return int(status or 0)


def run_job(
    run: Body,
    description: str = "",
    *,
    default_config: str | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """One command as a script of its own: parse like the CLI, then :func:`execute`.

    Args:
        run: the body, ``run(cfg, args) -> exit status or None``.
        description: ``--help`` text (the script's docstring).
        default_config: shipped config (``configs/<name>``) used without ``--config``.
        add_args: adds the command's own options.
        argv: arguments (default ``sys.argv[1:]``).
        prog: name in usage and error lines (default ``jobs/<script name>``).
    """
    prog = prog or f"jobs/{Path(sys.argv[0]).name}"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(parser, default_config)
    if add_args is not None:
        add_args(parser)
    return execute(prog, run, parser.parse_args(argv))


def job_main(
    command: str,
    description: str = "",
    *,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """``python jobs/<command>.py ...``: the CLI's ``command``, run by :func:`run_job`."""
    c = COMMANDS[command]
    return run_job(
        c.run,
        description or c.help,
        default_config=c.default_config,
        add_args=c.add_args,
        argv=argv,
        prog=prog,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rayhybrid`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    return execute(f"rayhybrid {args.command}", args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
