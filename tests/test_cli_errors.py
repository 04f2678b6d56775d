"""The command line turns an MlflowException into one line, no traceback (issue 12)."""

from __future__ import annotations

import argparse

from rayhybrid.cli import execute


def test_mlflow_exception_is_one_line(tmp_path, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")

    def body(cfg, args):
        try:
            client.get_run("0" * 32)  # a real MLflow refusal: no such run
        except MlflowException as exc:  # add a response body the way REST errors carry one
            raise MlflowException(
                f"{exc.message}\n<html><body>403 Forbidden</body></html>"
            ) from exc

    args = argparse.Namespace(config=None, overrides=[], default_config=None)
    status = execute("rayhybrid train", body, args)
    err = capsys.readouterr().err  # MLflow's own INFO lines (creating the db) may precede
    ours = [line for line in err.splitlines() if line.startswith("rayhybrid train")]
    assert status == 1
    assert len(ours) == 1, err
    assert ours[0].startswith("rayhybrid train: error: MlflowException: Run")
    assert "Traceback" not in err and "<html>" not in err
