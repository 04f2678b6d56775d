"""Forward and backward of one training step: plain, or cached InfoNCE (GradCache).

Plain: encode this worker's queries, passages (and hard negatives) with the graph kept, call
:func:`rayhybrid.loss.info_nce`, backpropagate.

Cached (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"; ``train.mini_batch_size``): the graph of a whole batch is what limits its size, while
the loss only needs the embeddings. So (1) encode the batch in mini-batches without a graph,
(2) compute the loss of the whole global batch on those embeddings as leaf tensors and
backpropagate it to them only (cheap: [n, d] tensors), (3) encode each mini-batch again with
its graph and backpropagate the cached embedding gradients through it. The parameter
gradients are those of the plain step (tests/test_gradcache.py, to 1e-5). Peak activation
memory is one mini-batch's. Under DDP the re-encoding of every mini-batch but the last runs
in ``no_sync``: gradients accumulate locally and are all-reduced once per optimiser step
(sentence-transformers issue 4027 is what one all-reduce per mini-batch costs). Dropout sees
the same masks in both passes: the RNG state before each mini-batch is restored for its second
pass. The GradCache package is not used: it wraps the model and optimiser in its own loop and
knows neither the gathered negatives nor DDP's ``no_sync`` of Ray Train's wrapper.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rayhybrid.loss import duplicate_text_pairs, gather_with_local_grad, info_nce
from rayhybrid.train.precision import autocast

__all__ = ["StepOutput", "forward_backward"]

SIDES = ("q", "p", "n")  # queries, positive passages, hard negatives (when the batch has them)


@dataclass(frozen=True)
class StepOutput:
    """What one step's forward/backward measured (gradients are left on the parameters)."""

    loss: float
    false_negatives: int  # pairs of the global batch masked because their passage texts match


def _keys(batch: dict, device: torch.device) -> dict:
    out = {}
    if "p_key" in batch:
        out["passage_keys"] = batch["p_key"].to(device)
        if "n_key" in batch:
            out["negative_keys"] = batch["n_key"].to(device)
    return out


def _encode(model, batch: dict, side: str, rows: slice, device, precision: str) -> torch.Tensor:
    with autocast(precision, device):
        return model(
            batch[f"{side}_input_ids"][rows].to(device),
            batch[f"{side}_attention_mask"][rows].to(device),
        ).float()


class _RngState:
    """CPU (and current CUDA device) RNG state, to replay dropout in GradCache's second pass."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def forward_backward(
    model,
    batch: dict,
    *,
    tau: float,
    symmetric: bool,
    rank: int,
    world_size: int,
    device: torch.device,
    precision: str = "fp32",
    mini_batch_size: int = 0,
) -> StepOutput:
    """Loss of this worker's share of a global batch and its gradients on ``model``'s parameters.

    Args:
        model: the bi-encoder, DDP-wrapped when ``world_size > 1``.
        batch: :func:`rayhybrid.stream.iter_step_batches` batch (``n_*`` hard negatives and
            ``p_key`` / ``n_key`` text keys optional).
        tau, symmetric: the loss (:func:`rayhybrid.loss.info_nce`).
        rank, world_size: this process in the default process group.
        device, precision: where and how to encode (``fp32`` / ``bf16`` autocast).
        mini_batch_size: 0: plain step; else cached InfoNCE in mini-batches of this many pairs
            (with their hard negatives).

    Raises:
        ValueError: ``mini_batch_size`` does not divide the batch.
    """
    sides = [s for s in SIDES if f"{s}_input_ids" in batch]
    n = batch["q_input_ids"].shape[0]
    counts = {s: batch[f"{s}_input_ids"].shape[0] for s in sides}
    keys = _keys(batch, device)
    loss_kw = dict(tau=tau, rank=rank, world_size=world_size, symmetric=symmetric, **keys)
    fn = 0
    if "passage_keys" in keys:
        fn = duplicate_text_pairs(gather_with_local_grad(keys["passage_keys"], rank, world_size))
    if not mini_batch_size or mini_batch_size >= n:
        embs = {s: _encode(model, batch, s, slice(None), device, precision) for s in sides}
        loss, backward_loss = info_nce(embs["q"], embs["p"], negatives=embs.get("n"), **loss_kw)
        backward_loss.backward()
        return StepOutput(loss.item(), fn)
    if n % mini_batch_size:
        raise ValueError(f"train.mini_batch_size={mini_batch_size} does not divide the batch {n}")
    chunks = n // mini_batch_size

    def rows(side: str, c: int) -> slice:
        per = counts[side] // n * mini_batch_size  # hard negatives: k rows per pair
        return slice(c * per, (c + 1) * per)

    # 1. Embeddings without a graph, mini-batch by mini-batch (RNG state kept for step 3).
    states, parts = [], {s: [] for s in sides}
    with torch.no_grad():
        for c in range(chunks):
            states.append(_RngState(device))
            for s in sides:
                parts[s].append(_encode(model, batch, s, rows(s, c), device, precision))
    # 2. Loss of the global batch on leaf embeddings; its gradient w.r.t. them.
    leaves = {s: torch.cat(parts[s]).requires_grad_() for s in sides}
    loss, backward_loss = info_nce(leaves["q"], leaves["p"], negatives=leaves.get("n"), **loss_kw)
    backward_loss.backward()
    grads = {s: leaves[s].grad for s in sides}
    # 3. Each mini-batch again with its graph; its cached gradients through it. DDP all-reduces
    # once, in the last mini-batch's backward.
    no_sync = getattr(model, "no_sync", None)
    after = _RngState(device)
    for c in range(chunks):
        last = c == chunks - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            states[c].restore()
            # One backward from the mini-batch's embeddings with their cached gradients (no
            # surrogate product-and-sum graph).
            torch.autograd.backward(
                [_encode(model, batch, s, rows(s, c), device, precision) for s in sides],
                [grads[s][rows(s, c)] for s in sides],
            )
    after.restore()
    return StepOutput(loss.item(), fn)
