"""Cached InfoNCE (GradCache) == plain InfoNCE: loss and every parameter gradient, to 1e-5.

World size 1 and 2 (two gloo processes on localhost, plain DDP, no Ray), symmetric on and off,
with and without hard negatives, with a passage text shared by two pairs on different workers
(masked as a false negative). The reference is the plain step of one process holding the whole
global batch. A DDP communication hook counts the all-reduces: one set per optimiser step.
"""

from __future__ import annotations

import hashlib
import json
from itertools import product
from pathlib import Path

import pytest
import torch

from rayhybrid.config import ModelConfig
from rayhybrid.train.step import forward_backward
from tests.fixtures_model import tiny_ddp
from tests.procs import free_ports

B, K, MINI = 4, 2, 2  # pairs per worker, hard negatives per pair, GradCache mini-batch
CASES = list(product((False, True), (False, True)))  # (symmetric, hard negatives)


def _key(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True
    )


def _texts(xquad_dir: Path, world: int) -> dict:
    paras = [
        (qa["question"], para["context"])
        for article in json.loads((xquad_dir / "en.json").read_text())["data"][:6]
        for para in article["paragraphs"]
        for qa in para["qas"][:1]
    ]
    n = world * B
    q = [x for x, _ in paras[:n]]
    p = [x for _, x in paras[:n]]
    p[B + 1] = p[1]  # pair 1 (rank 0) and pair B+1 (rank 1) share a passage: a false negative
    neg = [x for _, x in paras[n : n + n * K]]
    assert len(neg) == n * K
    return {"q": q, "p": p, "n": neg}


def _batch(tokenizer, texts: dict, rank: int, negatives: bool, b: int) -> dict:
    out = {}
    sides = ("q", "p", "n") if negatives else ("q", "p")
    for side in sides:
        per = b * (K if side == "n" else 1)
        chunk = texts[side][rank * per : (rank + 1) * per]
        tok = tokenizer(
            chunk, padding="max_length", truncation=True, max_length=40, return_tensors="pt"
        )
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = (
            tok["input_ids"],
            tok["attention_mask"],
        )
        if side != "q":
            out[f"{side}_key"] = torch.tensor([_key(t) for t in chunk])
    return out


def _run(model, tokenizer, texts, rank, world, mini, b=B) -> dict:
    """Loss, false-negative count and gradients per case; model in eval mode (no dropout)."""
    out = {}
    for symmetric, negatives in CASES:
        model.zero_grad(set_to_none=True)
        res = forward_backward(
            model,
            _batch(tokenizer, texts, rank, negatives, b),
            tau=0.05,
            symmetric=symmetric,
            rank=rank,
            world_size=world,
            device=torch.device("cpu"),
            mini_batch_size=mini,
        )
        inner = getattr(model, "module", model)
        grads = {
            n: t.grad.detach().clone() for n, t in inner.named_parameters() if t.grad is not None
        }
        out[(symmetric, negatives)] = (res.loss, res.false_negatives, grads)
    return out


def _worker(rank: int, world: int, port: int, model_dir: str, texts: dict, out_dir: str):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    with tiny_ddp(rank, world, port, model_dir) as (tokenizer, ddp):
        calls = [0]

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        results, reduces = {}, {}
        for mini in (0, MINI):
            calls[0] = 0
            results[mini] = _run(ddp, tokenizer, texts, rank, world, mini)
            reduces[mini] = calls[0]
        torch.save({"results": results, "reduces": reduces}, Path(out_dir) / f"r{rank}.pt")


def _assert_same(got: tuple, ref: tuple, what: str) -> None:
    loss, fn, grads = got
    ref_loss, ref_fn, ref_grads = ref
    assert loss == pytest.approx(ref_loss, abs=1e-5), what
    assert fn == ref_fn == 1, what  # the shared passage was seen across the global batch
    assert grads.keys() == ref_grads.keys() and len(ref_grads) > 10, what
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    assert worst < 1e-5, f"{what}: max gradient difference {worst}"
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-3  # not trivially zero


@pytest.fixture(scope="module")
def reference(tiny_model_dir, xquad_dir):
    """Plain step, one process, the whole 2-worker global batch (B*2 pairs)."""
    from rayhybrid.model import load_biencoder

    tokenizer, model = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
    model.eval()
    texts = _texts(xquad_dir, 2)
    plain = _run(model, tokenizer, texts, 0, 1, 0, b=2 * B)  # one process, both workers' rows
    cached = _run(model, tokenizer, texts, 0, 1, MINI, b=2 * B)
    return texts, plain, cached


def test_cached_equals_plain_in_one_process(reference):
    _, plain, cached = reference
    for case in CASES:
        _assert_same(cached[case], plain[case], f"world 1, (symmetric, negatives)={case}")
    # Hard negatives change the loss (the check above is not blind to them).
    assert plain[(False, True)][0] != pytest.approx(plain[(False, False)][0], abs=1e-3)


def test_cached_equals_plain_on_two_gloo_workers_with_one_allreduce(
    reference, tiny_model_dir, tmp_path
):
    import torch.multiprocessing as mp

    texts, plain, _ = reference
    mp.spawn(
        _worker,
        args=(2, free_ports(1)[0], str(tiny_model_dir), texts, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        out = torch.load(tmp_path / f"r{rank}.pt")
        for case in CASES:
            _assert_same(out["results"][0][case], plain[case], f"rank {rank} plain {case}")
            _assert_same(out["results"][MINI][case], plain[case], f"rank {rank} cached {case}")
        # B / MINI = 2 mini-batches per step, yet the cached step all-reduces as often as the
        # plain one (once per bucket per step): no_sync held back the first mini-batch's sync.
        assert out["reduces"][MINI] == out["reduces"][0] > 0, out["reduces"]


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_model_dir, xquad_dir):
    """model.gradient_checkpointing, in training mode (dropout on, same seed): the same loss and
    gradients as without, alone and under the cached loss."""
    from rayhybrid.model import enable_gradient_checkpointing, load_biencoder

    texts = _texts(xquad_dir, 2)  # rank 0's share: pairs 0..B-1, negatives 0..B*K-1
    texts["p"][1] = texts["p"][0]  # a duplicate inside this one worker's share
    out = {}
    for checkpointing, mini in product((False, True), (0, MINI)):
        tokenizer, model = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
        if checkpointing:
            enable_gradient_checkpointing(model)
            enc = model.encoder
            assert (
                getattr(enc, "is_activation_checkpointing", None) or enc.is_gradient_checkpointing
            )
        model.train()
        torch.manual_seed(0)
        res = forward_backward(
            model,
            _batch(tokenizer, texts, 0, True, B),
            tau=0.05,
            symmetric=True,
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
            mini_batch_size=mini,
        )
        grads = {n: t.grad for n, t in model.named_parameters() if t.grad is not None}
        out[(checkpointing, mini)] = (res.loss, res.false_negatives, grads)
    # Dropout draws its masks in another order in mini-batches than in one pass: compare
    # checkpointing on / off at the same mini-batch size.
    for mini in (0, MINI):
        _assert_same(out[(True, mini)], out[(False, mini)], f"checkpointing, mini={mini}")
    assert out[(False, 0)][0] != out[(False, MINI)][0]  # dropout is on (masks differ)


def test_cached_under_bf16_autocast_follows_the_plain_step(tiny_model_dir, xquad_dir):
    """bf16 autocast: mini-batches round differently from one pass, so not to 1e-5, but the
    cached step's loss and gradient direction are the plain step's."""
    from rayhybrid.model import load_biencoder

    tokenizer, model = load_biencoder(ModelConfig(name="tiny"), path=str(tiny_model_dir))
    model.eval()
    batch = _batch(tokenizer, _texts(xquad_dir, 2), 0, True, 2 * B)
    out = {}
    for mini in (0, MINI):
        model.zero_grad(set_to_none=True)
        res = forward_backward(
            model,
            batch,
            tau=0.05,
            symmetric=True,
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
            precision="bf16",
            mini_batch_size=mini,
        )
        flat = torch.cat([t.grad.flatten() for t in model.parameters() if t.grad is not None])
        out[mini] = (res.loss, flat)
    assert out[MINI][0] == pytest.approx(out[0][0], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(out[MINI][1], out[0][1], dim=0).item()
    assert cos > 0.99, cos
