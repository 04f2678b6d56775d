"""Ray Train training on a real local Ray (2 CPUs): learning, exact resume, a real crash, export, errors.

Issue 3 "What must be shown": 2 (learns), 3 (exact resume), 4 (worker killed with os._exit),
5 (export of a trained run), 6 (bad input). Shown 1 (gathered negatives) is tests/test_loss.py.
Runs use the tiny 2-layer 64-dim model and a few steps; the reference run is shared.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rayhybrid.config import ConfigError, ModelConfig, load_config
from rayhybrid.model import ModelError, encode_texts, load_biencoder
from rayhybrid.train import TrainingError
from rayhybrid.train.driver import TrainHooks, train

N = 3  # steps before the interruption; runs have 2N steps, a checkpoint every N


def make_cfg(root: Path, xquad_dir: Path, name: str, *overrides: str):
    return load_config(
        None,
        [
            f"data.path={xquad_dir}",
            "data.max_query_length=24",
            "data.max_passage_length=40",
            "batch.batch_size=8",
            "batch.strategy=hybrid",
            "batch.seed=7",
            "train.lr=1e-3",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.log_every=2",
            f"train.max_steps={2 * N}",
            f"train.checkpoint_every={N}",
            f"train.storage_path={root / 'runs'}",
            f"train.run_name={name}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.experiment=tests",
            *overrides,
        ],
    )


def read_batch_log(folder: Path) -> dict[int, list[dict]]:
    """rank -> logged steps in order ({step, pid, group})."""
    return {
        r: [json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    }


def final_weights(result) -> dict[str, torch.Tensor]:
    ckpt = result.run_dir / f"checkpoint_{2 * N:08d}" / "model.pt"
    return torch.load(ckpt, weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"weights differ by up to {worst}"


def mlflow_runs(root: Path, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    return client, runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def reference(ray_local, root, xquad_dir, tiny_model_dir):
    """2N uninterrupted steps, 2 workers, batch log kept."""
    return train(
        make_cfg(root, xquad_dir, "ref", f"model.name={tiny_model_dir}"),
        hooks=TrainHooks(batch_log=str(root / "log_ref")),
    )


def test_reference_run_logs_one_mlflow_run_and_exports(reference, root):
    assert reference.metrics["step"] == 2 * N
    client, runs = mlflow_runs(root, "ref")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.info.run_id == reference.mlflow_run_id
    assert run.data.params["train.tau"] == "0.05" and run.data.params["batch.strategy"] == "hybrid"
    assert run.data.tags["train.precision_used"] == "fp32"  # the precision the workers ran
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 2 * N + 1))
    for key in ("train/lr", "train/pairs_per_s", "train/mode_is_mono", "train/grad_norm"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2 * N, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    (output,) = run.outputs.model_outputs  # the model: an MLflow sentence-transformers model
    data = "model.sentence_transformer"
    assert "modules.json" in {
        Path(a.path).name for a in client.list_logged_model_artifacts(output.model_id, data)
    }
    log = read_batch_log(root / "log_ref")
    assert [e["step"] for e in log[0]] == list(range(2 * N)) == [e["step"] for e in log[1]]
    for s in range(2 * N):  # no parallel item twice in one global batch
        groups = log[0][s]["group"] + log[1][s]["group"]
        assert len(groups) == 8 and len(set(groups)) == 8


def test_exact_resume_after_an_interruption(reference, root, xquad_dir, tiny_model_dir):
    """Issue 3, shown 3: N steps + checkpoint + resume + N steps == 2N uninterrupted."""
    hooks = TrainHooks(batch_log=str(root / "log_resume"), fault=f"1:{N}:{root / 'killed_resume'}")
    cfg = make_cfg(root, xquad_dir, "resume", f"model.name={tiny_model_dir}")
    with pytest.raises(TrainingError, match="continue with train.resume=true"):
        train(cfg, hooks=hooks)  # rank 1 dies at step N, max_failures=0: the run stops after N
    assert (root / "killed_resume").is_file()
    run_dir = root / "runs" / "resume"
    assert (run_dir / f"checkpoint_{N:08d}").is_dir()
    assert not (run_dir / f"checkpoint_{2 * N:08d}").exists()
    first_id = json.loads((run_dir / "rayhybrid_run.json").read_text())["mlflow_run_id"]

    with pytest.raises(TrainingError, match="already exists"):
        train(cfg, hooks=hooks)  # same name without resume/overwrite: refused, nothing touched
    resumed = train(
        make_cfg(root, xquad_dir, "resume", f"model.name={tiny_model_dir}", "train.resume=true"),
        hooks=hooks,
    )
    assert resumed.resumed and resumed.metrics["step"] == 2 * N
    assert_same_weights(final_weights(resumed), final_weights(reference))

    log, ref = read_batch_log(root / "log_resume"), read_batch_log(root / "log_ref")
    for r in (0, 1):
        pids = list(dict.fromkeys(e["pid"] for e in log[r]))
        assert len(pids) == 2
        second = [e for e in log[r] if e["pid"] == pids[1]]
        assert second[0]["step"] == N  # the resumed stream starts at the checkpoint's step
        seen = [e for e in log[r] if e["pid"] == pids[0] and e["step"] < N] + second
        assert [e["step"] for e in seen] == list(range(2 * N))
        assert [e["group"] for e in seen] == [e["group"] for e in ref[r]]
    _, runs = mlflow_runs(root, "resume")
    assert [x.info.run_id for x in runs] == [first_id] == [resumed.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"


def test_worker_killed_mid_run_recovers_from_the_last_checkpoint(
    reference, root, xquad_dir, tiny_model_dir
):
    """Issue 3, shown 4: os._exit in rank 1 at step N+1; FailureConfig restarts from checkpoint N."""
    hooks = TrainHooks(
        batch_log=str(root / "log_crash"), fault=f"1:{N + 1}:{root / 'killed_crash'}"
    )
    result = train(
        make_cfg(root, xquad_dir, "crash", f"model.name={tiny_model_dir}", "train.max_failures=1"),
        hooks=hooks,
    )
    assert (root / "killed_crash").is_file(), "the fault was not injected"
    assert result.metrics["step"] == 2 * N
    assert_same_weights(final_weights(result), final_weights(reference))

    log, ref = read_batch_log(root / "log_crash"), read_batch_log(root / "log_ref")
    for r in (0, 1):
        pids = list(dict.fromkeys(e["pid"] for e in log[r]))
        assert len(pids) == 2, "exactly one restart"
        first = [e for e in log[r] if e["pid"] == pids[0]]
        second = [e for e in log[r] if e["pid"] == pids[1]]
        assert first[-1]["step"] >= N  # the crash came after the checkpoint at step N ...
        assert second[0]["step"] == N  # ... and the restart resumed exactly there
        effective = [e for e in first if e["step"] < N] + second
        assert [e["step"] for e in effective] == list(range(2 * N))  # none skipped, none twice
        assert [e["group"] for e in effective] == [e["group"] for e in ref[r]]
    client, runs = mlflow_runs(root, "crash")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # Every step once: the steps sent between the checkpoint and the crash are not sent again.
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == list(range(1, 2 * N + 1))


def test_export_of_a_trained_run_matches_the_trainer_encoder(reference, tiny_model_dir):
    """Issue 3, shown 5: the run's model/ folder vs the encoder holding the final checkpoint."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    tokenizer, trainer_model = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
    trainer_model.load_state_dict(final_weights(reference))
    texts = [
        "Wer gewann den Super Bowl 50?",
        "The Broncos defeated the Panthers 24–10.",
        "¿Quién ganó?",
        "谁赢得了比赛？",
    ]
    ours = encode_texts(trainer_model, tokenizer, texts, max_length=40)
    st = SentenceTransformer(str(reference.model_dir), device="cpu")
    np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), ours, atol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(reference.model_dir)
    hf = AutoModel.from_pretrained(reference.model_dir).eval()
    tok = hf_tok(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**tok).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(emb.numpy(), ours, atol=1e-5)
    _, start = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
    assert np.abs(encode_texts(start, tokenizer, texts, max_length=40) - ours).max() > 1e-3


# --------------------------------------------------------------------------- learning


def heldout_pairs(cfg, n: int = 512) -> list[tuple[str, str]]:
    """Monolingual (question, answer sentence) pairs of the test articles, one per item,
    its language drawn at random."""
    from rayhybrid.corpus import load_training_data

    rng = random.Random(0)
    pairs = []
    for item in load_training_data(cfg.data, part="test").items:
        lang = rng.choice(item.languages)
        pairs.append((item.queries[lang], item.positives[lang][0]))
    return pairs[:n]


def heldout_scores(model_dir: Path, pairs, batch: int = 16) -> tuple[float, float]:
    """Mean InfoNCE loss and in-batch accuracy over held-out batches."""
    from rayhybrid.loss import in_batch_accuracy, info_nce

    tokenizer, model = load_biencoder(ModelConfig(), path=str(model_dir))
    q = torch.from_numpy(encode_texts(model, tokenizer, [a for a, _ in pairs], max_length=32))
    p = torch.from_numpy(encode_texts(model, tokenizer, [b for _, b in pairs], max_length=64))
    chunks = [slice(i, i + batch) for i in range(0, len(pairs) - batch + 1, batch)]
    loss = np.mean([info_nce(q[s], p[s], tau=0.05)[0].item() for s in chunks])
    return float(loss), float(np.mean([in_batch_accuracy(q[s], p[s]) for s in chunks]))


def test_training_learns_on_xquad_r(ray_local, root, xquad_dir):
    """Issue 3, shown 2: tiny model built on the fly; loss falls, held-out accuracy rises."""
    cfg = make_cfg(
        root,
        xquad_dir,
        "learn",
        "model.name=tiny",
        "batch.strategy=mono",
        "batch.batch_size=16",
        "train.num_workers=1",
        "train.cpus_per_worker=2",
        "train.max_steps=150",
        "train.lr=1e-3",
        "train.checkpoint_every=0",
        "train.log_every=10",
        "train.eval_every=75",
        "data.train_fraction=0.5",
        "data.dev_fraction=0.1",
        "data.max_query_length=32",
        "data.max_passage_length=64",
    )
    result = train(cfg)
    assert (result.run_dir / "init_model" / "tokenizer.json").is_file()
    assert result.metrics["best_step"] in (75, 150)
    assert result.metrics["best_val_loss"] < np.log(16) - 0.3  # below chance level, clearly
    client, runs = mlflow_runs(root, "learn")
    losses = [
        m.value
        for m in sorted(
            client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step
        )
    ]
    assert len(losses) == 150
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3, (losses[:20], losses[-20:])
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "val/loss")} == {75, 150}

    pairs = heldout_pairs(cfg)
    loss_0, acc_0 = heldout_scores(result.run_dir / "init_model", pairs)
    loss_1, acc_1 = heldout_scores(result.model_dir, pairs)
    # Seen on this setting: held-out loss 2.55 -> 1.10, accuracy 0.59 -> 0.68 (426 pairs).
    assert loss_1 < loss_0 - 0.5, (loss_0, loss_1)
    assert acc_1 > acc_0 + 0.04, (acc_0, acc_1)


def test_early_stopping_keeps_the_best_model(ray_local, root, xquad_dir, tiny_model_dir):
    """Validation every 2 steps, patience 2: stops at the second non-improving validation.

    lr=1e-30 leaves the fp32 weights bit-identical, so the validation loss never improves
    after the first validation (which beats +inf): the run must stop at step 6, best step 2.
    """
    cfg = make_cfg(
        root,
        xquad_dir,
        "early",
        f"model.name={tiny_model_dir}",
        "train.lr=1e-30",
        "train.num_workers=1",
        "train.cpus_per_worker=2",
        "train.max_steps=20",
        "train.checkpoint_every=0",
        "train.eval_every=2",
        "train.early_stopping_patience=2",
        "data.dev_fraction=0.1",
    )
    result = train(cfg)
    m = result.metrics
    assert (m["step"], m["stopped_early"], m["best_step"]) == (6, True, 2)
    client, runs = mlflow_runs(root, "early")
    val_steps = {x.step for x in client.get_metric_history(runs[0].info.run_id, "val/loss")}
    assert val_steps == {2, 4, 6}
    best = (result.run_dir / "best_model" / "model.safetensors").read_bytes()
    assert (result.model_dir / "model.safetensors").read_bytes() == best


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("train.tau=0", ConfigError, "train.tau must be > 0"),
        ("train.tau=-0.1", ConfigError, "train.tau must be > 0"),
        ("batch.batch_size=3", ConfigError, "too small for train.num_workers=2"),
        ("batch.batch_size=9", ConfigError, "must divide by train.num_workers=2"),
        ("batch.batch_size=4000", ConfigError, "larger than"),
        ("train.eval_every=5", ConfigError, "needs a dev split"),
        ("train.early_stopping_patience=2", ConfigError, "needs train.eval_every"),
        ("train.max_failures=-2", ConfigError, "train.max_failures must be >= 0"),
        (
            "model.name=no-such-org/no-such-model-xyz",
            ModelError,
            "neither a local folder nor available",
        ),
    ],
)
def test_bad_settings_fail_in_the_driver_before_ray(
    override, error, message, tmp_path, xquad_dir, monkeypatch
):
    """Issue 3, shown 6: one clear error, raised before the run folder or Ray is touched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=message):  # range checks: already when the config is built
        train(make_cfg(tmp_path, xquad_dir, "bad", "model.name=tiny", override))
    assert not (tmp_path / "runs").exists()


def test_unknown_key_and_wrong_type_are_config_errors_on_the_command_line(capsys):
    from rayhybrid.cli import main

    assert main(["train", "train.tua=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.tua" in err and "Traceback" not in err
    assert main(["train", "train.max_steps=many"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: expected int" in err and "Traceback" not in err


def test_unwritable_storage_and_existing_runs(tmp_path, xquad_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_cfg(
        tmp_path, xquad_dir, "x", "model.name=tiny", f"train.storage_path={blocker}/runs"
    )
    with pytest.raises(TrainingError, match="cannot write the run folder"):
        train(cfg)
    existing = tmp_path / "runs" / "taken"
    existing.mkdir(parents=True)
    (existing / "checkpoint_00000005").mkdir()
    (existing / "checkpoint_00000005" / "model.pt").write_text("precious")
    with pytest.raises(TrainingError, match="already exists .* train.overwrite=true"):
        train(make_cfg(tmp_path, xquad_dir, "taken", "model.name=tiny"))
    assert (existing / "checkpoint_00000005" / "model.pt").read_text() == "precious"
    with pytest.raises(TrainingError, match="choose one"):
        train(
            make_cfg(
                tmp_path,
                xquad_dir,
                "taken",
                "model.name=tiny",
                "train.resume=true",
                "train.overwrite=true",
            )
        )
    with pytest.raises(TrainingError, match="run_name"):
        train(make_cfg(tmp_path, xquad_dir, "../escape", "model.name=tiny"))


def _effective_steps(log: dict, ref: dict, restart_at: int) -> None:
    """Both attempts together trained every step once, with the reference run's batches."""
    for r in (0, 1):
        pids = list(dict.fromkeys(e["pid"] for e in log[r]))
        assert len(pids) == 2, "exactly one restart"
        first = [e for e in log[r] if e["pid"] == pids[0]]
        second = [e for e in log[r] if e["pid"] == pids[1]]
        assert second[0]["step"] == restart_at
        effective = [e for e in first if e["step"] < restart_at] + second
        assert [e["step"] for e in effective] == list(range(2 * N))
        assert [e["group"] for e in effective] == [e["group"] for e in ref[r]]


def test_resume_passes_over_a_torn_newest_checkpoint(reference, root, xquad_dir, tiny_model_dir):
    """Issue 12: model.pt of the newest checkpoint cut in half; resume uses the one before."""
    hooks = TrainHooks(batch_log=str(root / "log_torn"), fault=f"1:{N + 1}:{root / 'killed_torn'}")
    args = [f"model.name={tiny_model_dir}", "train.checkpoint_every=1"]
    with pytest.raises(TrainingError, match="continue with train.resume=true"):
        train(make_cfg(root, xquad_dir, "torn", *args), hooks=hooks)
    newest = root / "runs" / "torn" / f"checkpoint_{N + 1:08d}"
    assert (newest / "model.pt").is_file(), "the newest checkpoint was not written"
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    resumed = train(make_cfg(root, xquad_dir, "torn", *args, "train.resume=true"), hooks=hooks)
    assert resumed.metrics["step"] == 2 * N
    assert_same_weights(final_weights(resumed), final_weights(reference))
    _effective_steps(read_batch_log(root / "log_torn"), read_batch_log(root / "log_ref"), N)
    client, runs = mlflow_runs(root, "torn")
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == list(range(1, 2 * N + 1))


def test_fault_inside_checkpoint_saving_restarts_from_the_complete_one(
    reference, root, xquad_dir, tiny_model_dir
):
    """Issue 12: rank 0 dies after writing model.pt of checkpoint N+1, before its marker."""
    hooks = TrainHooks(
        batch_log=str(root / "log_savefault"), save_fault=f"0:{N + 1}:{root / 'killed_save'}"
    )
    result = train(
        make_cfg(
            root,
            xquad_dir,
            "savefault",
            f"model.name={tiny_model_dir}",
            "train.checkpoint_every=1",
            "train.max_failures=1",
        ),
        hooks=hooks,
    )
    assert (root / "killed_save").is_file(), "the fault was not injected"
    assert result.metrics["step"] == 2 * N
    assert_same_weights(final_weights(result), final_weights(reference))
    _effective_steps(read_batch_log(root / "log_savefault"), read_batch_log(root / "log_ref"), N)


def test_crash_before_the_first_checkpoint_logs_each_step_once(
    reference, root, xquad_dir, tiny_model_dir
):
    """Issue 12: rank 1 dies at step 2, after steps 1-2 reached MLflow and before the first
    checkpoint (step N); the restart begins again at step 0 and must not log 1, 2 again."""
    hooks = TrainHooks(batch_log=str(root / "log_early"), fault=f"1:2:{root / 'killed_early'}")
    result = train(
        make_cfg(
            root, xquad_dir, "crash-early", f"model.name={tiny_model_dir}", "train.max_failures=1"
        ),
        hooks=hooks,
    )
    assert (root / "killed_early").is_file(), "the fault was not injected"
    log = read_batch_log(root / "log_early")
    pids = list(dict.fromkeys(e["pid"] for e in log[0]))
    assert len(pids) == 2, "exactly one restart"
    assert next(e["step"] for e in log[0] if e["pid"] == pids[1]) == 0  # from scratch
    assert result.metrics["step"] == 2 * N
    client, runs = mlflow_runs(root, "crash-early")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * N + 1)), history
    # The first attempt's steps were already in MLflow before the crash: they are the logged
    # ones, and (same seed, same batches) they equal the uninterrupted run's.
    ref_client, ref_runs = mlflow_runs(root, "ref")
    ref = {
        m.step: m.value
        for m in ref_client.get_metric_history(ref_runs[0].info.run_id, "train/loss")
    }
    assert {m.step: m.value for m in history} == pytest.approx(ref, abs=1e-6)


@pytest.mark.slow
def test_sigterm_mid_run_closes_the_mlflow_run_killed_and_a_resume_continues(
    tmp_path, xquad_dir, tiny_model_dir
):
    """Issue 12: a real SIGTERM (what `ray job stop` sends) to `rayhybrid train` mid-run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from rayhybrid.train.checkpoint import RunPaths, checkpoint_complete, latest_checkpoint

    steps, every = 60, 4
    args = [
        str(Path(sys.executable).parent / "rayhybrid"),
        "train",
        *[
            f"data.path={xquad_dir}",
            "data.max_query_length=24",
            "data.max_passage_length=40",
            f"model.name={tiny_model_dir}",
            "batch.batch_size=8",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.log_every=1",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={every}",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=stopped",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=tests",
            "eval.at_end_of_training=false",
        ],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run_dir = tmp_path / "runs" / "stopped"
    first = run_dir / f"checkpoint_{every:08d}"

    def start(*extra: str, log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            return subprocess.Popen(
                [*args, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )

    proc = start(log="first.log")
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint_complete(first)[0] == every:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (
            "the run ended before it could be stopped:\n"
            + (tmp_path / "first.log").read_text()[-3000:]
        )
        os.kill(proc.pid, signal.SIGTERM)  # the job process only, as `ray job stop` does
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the Ray it started
    text = (tmp_path / "first.log").read_text()
    assert status == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM" in text and "MLflow run is marked KILLED" in text, text[-3000:]
    # (Ray's own actors may print theirs as the driver goes: lines prefixed "(name pid=...)".)
    assert not any(ln.startswith("Traceback") for ln in text.splitlines()), text[-3000:]
    assert not (run_dir / "run.lock").exists()
    assert not (run_dir / "final_model").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((run_dir / "rayhybrid_run.json").read_text())["mlflow_run_id"]
    info = client.get_run(run_id).info
    assert info.status == "KILLED" and info.end_time and info.end_time >= info.start_time
    kept, _ = latest_checkpoint(RunPaths(str(run_dir)))
    assert every <= kept < steps and kept % every == 0

    proc = start("train.resume=true", log="resume.log")
    try:
        status = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "resume.log").read_text()
    assert status == 0, text[-3000:]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == steps and final["steps_this_attempt"] == steps - kept
    info = client.get_run(run_id).info
    assert info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # each step once
