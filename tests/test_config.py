"""The config schema: YAML + overrides, strict keys and types, every shipped config loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayhybrid.cli import build_parser, main
from rayhybrid.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    explain,
    load_config,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "data.languages=[en,de]",
            "batch.alpha=0.3",
            "eval.tasks=[{name: dev, part: dev}]",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.languages == ("en", "de")
    assert cfg.batch.alpha == pytest.approx(0.3)
    assert cfg.eval.tasks[0].name == "dev" and cfg.eval.tasks[0].part == "dev"
    assert cfg.eval.tasks[0].format == "lareqa"  # default of the nested dataclass


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("train.lr=abc", "train.lr: expected float"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("batch.strategy=random", "batch.strategy: expected one of"),
        ("eval.tasks=[{name: x, bogus: 1}]", "unknown key eval.tasks[0].bogus"),
        ("data.languages=en", "data.languages: expected a list"),
        ("train", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  tau: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key train.learning_rate"):
        load_config(typo)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["tune.alphas=[0.1, 0.9]", "model.name=tiny"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and isinstance(again, Config)


def test_resolve_path_expands_env(monkeypatch):
    monkeypatch.setenv("RAYHYBRID_DATA", "/data/here")
    assert resolve_path("${RAYHYBRID_DATA:-../shared/data}/xquad-r") == "/data/here/xquad-r"
    monkeypatch.delenv("RAYHYBRID_DATA")
    assert resolve_path("${RAYHYBRID_DATA:-../shared/data}/xquad-r") == "../shared/data/xquad-r"


def test_every_knob_has_help():
    rows = explain()
    assert len(rows) > 40
    missing = [key for key, _, help_text in rows if not help_text]
    assert not missing, f"knobs without help text: {missing}"


def test_shipped_configs_exist():
    assert SHIPPED, "configs/ holds no YAML file"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert 0.0 <= cfg.batch.alpha <= 1.0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_passes_the_rules_of_its_commands(path):
    """Not only types: the schema's ranges and cross-checks ran when it loaded; compare's
    strategies and baseline, and the tune setup where the config has a dev split to tune on."""
    from rayhybrid.experiments.compare import baseline_label, parse_strategies
    from rayhybrid.tuning.space import param_space, search_axes

    cfg = load_config(path)
    assert cfg.per_worker_batch_size * cfg.train.num_workers == cfg.batch.batch_size
    baseline_label(cfg, parse_strategies(cfg))
    if cfg.data.dev_fraction > 0 and cfg.train.eval_every > 0:
        param_space(cfg, search_axes(cfg))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("batch.alpha=1.5", "batch.alpha: expected a probability in [0, 1]"),
        ("batch.batch_size=0", "batch.batch_size: expected a positive integer"),
        ("batch.batch_size=10", "batch.batch_size=10 must divide by train.num_workers=4"),
        ("data.train_fraction=1.2", "data.train_fraction: expected a value in [0, 1]"),
        ("train.tau=0", "train.tau must be > 0"),
        ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1)"),
        ("eval.settings=[mono, bilingual]", "eval.settings[1]: expected one of"),
        ("eval.top_k=0", "eval.top_k, eval.batch_size and eval.encode_workers must be >= 1"),
        ("strategies=[mono, 'hybrid(2)']", "strategies[1] = 'hybrid(2)': alpha must be in [0, 1]"),
    ],
)
def test_the_schema_holds_the_rules(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.num_workers=4", override])
    assert fragment in str(info.value)


def test_yaml_floats_without_a_dot_are_floats_everywhere():
    cfg = load_config(None, ["train.lr=1e-4", "tune.lrs=[1e-5, 2.5e-5]", "train.run_name=1e5"])
    assert cfg.train.lr == 1e-4 and cfg.tune.lrs == (1e-5, 2.5e-5)
    assert cfg.train.run_name == "1e5"  # a string field keeps its text


def test_cli_help_explains_every_subcommand():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("config", "batches", "train", "evaluate", "compare", "tune", "quickstart"):
        assert cmd in text
    out = subprocess.run(
        [sys.executable, "-m", "rayhybrid.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--config" in out and "key=value" in out


def test_cli_config_error_exits_2(capsys):
    assert main(["config", "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_readme_lists_every_knob():
    readme = (REPO / "README.md").read_text()
    missing = [key for key, _, _ in explain() if f"`{key}`" not in readme]
    assert not missing, (
        f"README.md does not list: {missing} (regenerate with "
        "`rayhybrid config --explain --markdown`)"
    )
