"""The ``rayhybrid`` command line: parse arguments, load the config, call one library function.

This is the only module with argparse; every subcommand is a thin shell over a
library function so that ``jobs/`` and tests call the same code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rayhybrid.config import ConfigError, explain, load_config

EPILOG = """\
Overrides are key=value pairs with dotted keys, values parsed as YAML, e.g.
  rayhybrid train --config configs/quickstart.yaml train.max_steps=50 batch.alpha=0.3
`rayhybrid config --explain` lists every key with its default and meaning."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (defaults apply to anything it omits).")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Config overrides, e.g. train.lr=1e-4 data.languages=[en,de].")


def _cmd_config(args: argparse.Namespace) -> int:
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
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_batches(args: argparse.Namespace) -> int:
    from rayhybrid.stream import show_batches

    cfg = load_config(args.config, args.overrides)
    print(show_batches(cfg, n=args.show, texts=args.texts, start_step=args.start_step))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rayhybrid.training import train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    result, _ = train_and_evaluate(cfg)  # the evaluation prints its own headline per task
    print(result.summary())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rayhybrid.evaluation.run import evaluate_cli

    cfg = load_config(args.config, args.overrides)
    return evaluate_cli(cfg, model=args.model, task=args.task, data=args.data)


def _cmd_compare(args: argparse.Namespace) -> int:
    from rayhybrid.compare import compare

    cfg = load_config(args.config, args.overrides)
    table = compare(cfg)
    print(table.to_markdown())
    return 1 if table.all_failed else 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from rayhybrid.tuning import run_tune

    cfg = load_config(args.config, args.overrides)
    table = run_tune(cfg)
    print(table.to_markdown())
    return 1 if table.all_failed else 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from rayhybrid.quickstart import default_config_path, quickstart

    cfg = load_config(args.config or default_config_path(), args.overrides)
    return quickstart(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayhybrid", description="Hybrid batch training and multilingual retrieval evaluation on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = add("config", _cmd_config, "Print the resolved config, or explain every key.")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="List every key, its default and meaning.")
    p.add_argument("--markdown", action="store_true", help="With --explain: as a Markdown table.")

    p = add("batches", _cmd_batches, "Print the planned hybrid batches the trainer will get.")
    _add_config_args(p)
    p.add_argument("--show", type=int, default=5, help="Number of batches to print (default 5).")
    p.add_argument("--texts", type=int, default=2, help="Example pairs printed per batch (default 2).")
    p.add_argument("--start-step", type=int, default=0, help="First step to print (default 0).")

    p = add("train", _cmd_train, "Fine-tune a bi-encoder with Ray Train on the hybrid batch stream.")
    _add_config_args(p)

    p = add("evaluate", _cmd_evaluate,
            "Evaluate an encoder: mono / cross / multilingual retrieval and language bias.")
    _add_config_args(p)
    p.add_argument("--model", "-m", help="Model folder or name (default: model.name of the config).")
    p.add_argument("--task", "-t", help="Task format: lareqa or beir (default: eval.tasks of the config).")
    p.add_argument("--data", "-d", help="Task folder (with --task).")

    p = add("compare", _cmd_compare, "Train and evaluate every batch strategy under one budget.")
    _add_config_args(p)

    p = add("tune", _cmd_tune, "Ray Tune search over the mixing ratio alpha (dev split).")
    _add_config_args(p)

    p = add("quickstart", _cmd_quickstart,
            "Train on the XQuAD-R training split, evaluate on held-out articles, log to MLflow.")
    _add_config_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rayhybrid`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"rayhybrid {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from rayhybrid.datamodel import DataError
        from rayhybrid.tracking import TrackingError

        if isinstance(exc, (DataError, FileNotFoundError, PermissionError, ValueError,
                            TrackingError)):
            print(f"rayhybrid {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
