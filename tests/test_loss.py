"""InfoNCE with gathered negatives: formula, options, and 2 gloo workers == 1 process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayhybrid.loss import (
    LossError,
    duplicate_text_pairs,
    gather_with_local_grad,
    in_batch_accuracy,
    info_nce,
)
from tests.fixtures_model import tiny_ddp
from tests.procs import free_ports

B = 4  # pairs per worker


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_gather_world_size_one_is_the_tensor_itself():
    x = torch.randn(3, 5, requires_grad=True)
    out = gather_with_local_grad(x, 0, 1)
    assert torch.equal(out, x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(LossError, match="rank 2 outside"):
        gather_with_local_grad(x, 2, 2)


def test_info_nce_matches_the_formula_and_symmetric_option():
    q, p, tau = _unit(6, 8, 0), _unit(6, 8, 1), 0.07
    loss, backward_loss = info_nce(q, p, tau=tau)
    s = (q @ p.T) / tau
    expected = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(6)) / 6
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert backward_loss.item() == pytest.approx(loss.item())  # world_size 1: no rescaling
    sym, _ = info_nce(q, p, tau=tau, symmetric=True)
    reverse = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(6)) / 6
    assert sym.item() == pytest.approx(0.5 * (expected + reverse).item(), abs=1e-6)
    # Perfectly aligned, well separated pairs give a near-zero loss and full accuracy.
    eye = torch.eye(6)
    assert info_nce(eye, eye, tau=0.01)[0].item() < 1e-6
    assert in_batch_accuracy(eye, eye) == 1.0
    assert in_batch_accuracy(eye, eye.roll(1, dims=0)) == 0.0


@pytest.mark.parametrize("tau", [0.0, -0.5, math.nan])
def test_tau_must_be_positive(tau):
    with pytest.raises(LossError, match="tau must be > 0"):
        info_nce(_unit(2, 4, 0), _unit(2, 4, 1), tau=tau)


def test_shapes_must_match():
    with pytest.raises(LossError, match=r"\[n, d\]"):
        info_nce(_unit(2, 4, 0), _unit(3, 4, 1), tau=0.1)


# ----------------------------------------------------------------- 2 processes vs 1 process


def _batch(tokenizer, texts_q, texts_p):
    tq = tokenizer(
        texts_q, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    tp = tokenizer(
        texts_p, padding="max_length", truncation=True, max_length=48, return_tensors="pt"
    )
    return tq, tp


def _grads_and_losses(model, tq, tp, rank, world_size, sl):
    """Loss (plain and symmetric) and parameter gradients after backward, in eval mode (no dropout)."""
    out = {}
    for symmetric in (False, True):
        model.zero_grad(set_to_none=True)
        q = model(tq["input_ids"][sl], tq["attention_mask"][sl])
        p = model(tp["input_ids"][sl], tp["attention_mask"][sl])
        loss, backward_loss = info_nce(
            q, p, tau=0.05, rank=rank, world_size=world_size, symmetric=symmetric
        )
        backward_loss.backward()
        inner = getattr(model, "module", model)
        out[symmetric] = (
            loss.item(),
            {n: t.grad.detach().clone() for n, t in inner.named_parameters() if t.grad is not None},
        )
    return out


def _ddp_worker(rank: int, world_size: int, port: int, model_dir: str, texts: tuple, out_dir: str):
    with tiny_ddp(rank, world_size, port, model_dir) as (tokenizer, ddp):
        tq, tp = _batch(tokenizer, *texts)
        sl = slice(rank * B, (rank + 1) * B)
        torch.save(
            _grads_and_losses(ddp, tq, tp, rank, world_size, sl), Path(out_dir) / f"r{rank}.pt"
        )


def test_two_gloo_workers_equal_one_process_with_the_global_batch(
    tiny_model_dir, xquad_dir, tmp_path
):
    """Issue 3, shown 1: 2 workers x batch b == 1 process x batch 2b, loss and gradients to 1e-5."""
    import json

    import torch.multiprocessing as mp

    from rayhybrid.config import ModelConfig
    from rayhybrid.model import load_biencoder

    qas = [
        (qa["question"], para["context"])
        for article in json.loads((xquad_dir / "de.json").read_text())["data"][:3]
        for para in article["paragraphs"]
        for qa in para["qas"][:1]
    ][: 2 * B]
    texts = (tuple(q for q, _ in qas), tuple(p for _, p in qas))
    assert len(texts[0]) == 2 * B
    mp.spawn(
        _ddp_worker,
        args=(2, free_ports(1)[0], str(tiny_model_dir), texts, str(tmp_path)),
        nprocs=2,
        join=True,
    )

    tokenizer, model = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
    model.eval()
    tq, tp = _batch(tokenizer, *texts)
    single = _grads_and_losses(model, tq, tp, 0, 1, slice(0, 2 * B))
    for rank in (0, 1):
        dist_out = torch.load(tmp_path / f"r{rank}.pt")
        for symmetric in (False, True):
            loss_1, grads_1 = single[symmetric]
            loss_2, grads_2 = dist_out[symmetric]
            assert loss_2 == pytest.approx(loss_1, abs=1e-5)
            assert grads_2.keys() == grads_1.keys() and len(grads_1) > 10
            worst = max((grads_2[k] - grads_1[k]).abs().max().item() for k in grads_1)
            assert worst < 1e-5, f"rank {rank} symmetric={symmetric}: max grad diff {worst}"
            # The check has teeth: the gradient is far from zero and a 1/world_size slip shows.
            scale = max(grads_1[k].abs().max().item() for k in grads_1)
            assert scale > 1e-3


# ----------------------------------------------------------------- hard negatives, false negatives


def _row_loss(s: torch.Tensor, i: int, keep: list[int]) -> torch.Tensor:
    """-log softmax of column i among columns ``keep`` of row ``s`` (written out, no masking)."""
    row = torch.stack([s[j] for j in keep])
    return -(s[i] - torch.logsumexp(row, 0))


def test_hard_negatives_are_extra_columns_for_every_query():
    q, p, neg, tau = _unit(4, 8, 0), _unit(4, 8, 1), _unit(6, 8, 2), 0.1
    loss, _ = info_nce(q, p, tau=tau, negatives=neg)
    cols = torch.cat([p, neg]) @ q.T / tau  # [10, 4]: column i = scores of query i
    expected = sum(_row_loss(cols[:, i], i, list(range(10))) for i in range(4)) / 4
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # symmetric: the passage->query term scores passages against queries only
    sym, _ = info_nce(q, p, tau=tau, negatives=neg, symmetric=True)
    s = p @ q.T / tau
    reverse = sum(_row_loss(s[i], i, list(range(4))) for i in range(4)) / 4
    assert sym.item() == pytest.approx(0.5 * (expected + reverse).item(), abs=1e-6)
    with pytest.raises(LossError, match="hard negatives must be"):
        info_nce(q, p, tau=tau, negatives=_unit(3, 5, 0))


def test_near_duplicate_hard_negatives_raise_the_loss_and_get_gradients(minilm_dir):
    """Issue 13, shown 2: easy in-batch negatives, near-duplicate hard ones, step 0 of a model.

    A trained encoder (MiniLM): a random tiny model maps every text to nearly one direction,
    so nothing is "easy" for it."""
    from rayhybrid.config import ModelConfig
    from rayhybrid.model import load_biencoder

    tokenizer, model = load_biencoder(ModelConfig(), path=str(minilm_dir))
    model.eval()
    topics = ["river", "castle", "engine", "violin"]
    queries = [f"where is the old {t}" for t in topics]
    passages = [f"the old {t} stands near the market square of the town" for t in topics]
    # easy: the other pairs' passages; hard: the positive with one word changed
    hard = [f"the old {t} stands near the market square of the city" for t in topics]

    def enc(texts):
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        return model(tok["input_ids"], tok["attention_mask"])

    q, p, n = enc(queries), enc(passages), enc(hard)
    n.retain_grad()
    plain, _ = info_nce(q, p, tau=0.05)
    with_hard, backward_loss = info_nce(q, p, tau=0.05, negatives=n)
    assert with_hard.item() > plain.item() + 0.1, (plain.item(), with_hard.item())
    # the hard negatives are closer to the positives than the in-batch negatives are
    assert (p * n).sum(1).mean() > (p @ p.T).fill_diagonal_(0).sum() / 12
    backward_loss.backward()
    assert n.grad is not None and n.grad.abs().sum(1).min().item() > 1e-4


def test_identical_passage_texts_are_masked_like_a_removed_column():
    """Issue 13, shown 3: pairs 1 and 3 share a passage text (keys equal): each one's loss is
    the loss of the batch with the other's column removed for it."""
    q, p, tau = _unit(5, 8, 3), _unit(5, 8, 4), 0.1
    p[3] = p[1]  # same text, same embedding
    keys = torch.tensor([10, 11, 12, 11, 14])
    masked, _ = info_nce(q, p, tau=tau, passage_keys=keys)
    s = q @ p.T / tau
    keep = {i: [j for j in range(5) if j != {1: 3, 3: 1}.get(i)] for i in range(5)}
    expected = sum(_row_loss(s[i], i, keep[i]) for i in range(5)) / 5
    assert masked.item() == pytest.approx(expected.item(), abs=1e-6)
    unmasked, _ = info_nce(q, p, tau=tau)
    assert unmasked.item() > masked.item() + 1e-3  # the mask changed something
    assert duplicate_text_pairs(keys) == 1 and duplicate_text_pairs(torch.arange(5)) == 0
    # symmetric: passage 1 does not count query 3 as a negative either
    sym, _ = info_nce(q, p, tau=tau, passage_keys=keys, symmetric=True)
    reverse = sum(_row_loss(s[:, i], i, keep[i]) for i in range(5)) / 5
    assert sym.item() == pytest.approx(0.5 * (expected + reverse).item(), abs=1e-6)
    # a hard negative with the text of the query's own positive is masked too
    neg = torch.cat([p[2:3], _unit(1, 8, 5)])
    with_neg, _ = info_nce(
        q, p, tau=tau, negatives=neg, passage_keys=keys, negative_keys=torch.tensor([12, 99])
    )
    cols = torch.cat([s, q @ neg.T / tau], dim=1)
    keep_n = {i: keep[i] + ([6] if i == 2 else [5, 6]) for i in range(5)}
    expected_n = sum(_row_loss(cols[i], i, keep_n[i]) for i in range(5)) / 5
    assert with_neg.item() == pytest.approx(expected_n.item(), abs=1e-6)
