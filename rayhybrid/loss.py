"""InfoNCE over in-batch negatives gathered from every worker.

Every worker holds ``n`` query and ``n`` passage embeddings of one global batch of
``world_size * n`` pairs. Each worker gathers all of them (no gradient through the
copies it receives, its own tensors put back in place), computes the loss of the
*whole* global batch, and backpropagates ``world_size *`` that loss: every term that
involves a local embedding is in the local loss, so the local embeddings receive
exactly their share of the global gradient, and DDP's mean over workers turns the
``world_size`` factor back into the gradient of one process holding the whole batch.
Tested against a single process with the global batch (tests/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LossError", "gather_with_local_grad", "in_batch_accuracy", "info_nce"]


class LossError(ValueError):
    """A loss setting (temperature, batch shape) is invalid."""


def gather_with_local_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All-gather ``x`` ([n, d] on each rank) into [world_size * n, d] in rank order.

    Gradient semantics: the rows received from other ranks are constants (the
    collective is not differentiated); rows ``rank * n : (rank + 1) * n`` are ``x``
    itself, so gradients of anything computed from the result flow into the local
    ``x`` only. With ``world_size == 1`` the result is ``x`` (same code path, no
    collective). All ranks must pass the same shape.

    Args:
        x: local embeddings.
        rank: this process's rank in the default process group.
        world_size: number of processes in it.

    Raises:
        LossError: rank is outside [0, world_size).
    """
    if not 0 <= rank < world_size:
        raise LossError(f"rank {rank} outside [0, {world_size})")
    parts = [x]
    if world_size > 1:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x  # put the local tensor back so its gradient survives
    return torch.cat(parts, dim=0)


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    tau: float,
    rank: int = 0,
    world_size: int = 1,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of the global batch from this rank's query / passage embeddings.

    Query ``i`` of rank ``r`` is the global row ``r * n + i``; its positive is the passage
    of the same global index, every other passage of the global batch is a negative.

    Args:
        q: [n, d] local query embeddings (normalised if cosine similarity is wanted).
        p: [n, d] local passage embeddings, aligned with ``q``.
        tau: temperature, > 0.
        rank: this process's rank.
        world_size: number of processes holding parts of the batch.
        symmetric: average the query->passage and passage->query losses.

    Returns:
        ``(loss, backward_loss)``: ``loss`` is the mean loss of the global batch (the same
        value on every rank, for logging); ``backward_loss`` is ``world_size * loss``, the
        tensor to call ``backward`` on under DDP's gradient averaging (see module docstring).

    Raises:
        LossError: tau <= 0, or q and p differ in shape.
    """
    if not tau > 0:
        raise LossError(f"train.tau must be > 0, got {tau}")
    if q.shape != p.shape or q.dim() != 2:
        raise LossError(
            f"query and passage embeddings must both be [n, d]; got "
            f"{tuple(q.shape)} and {tuple(p.shape)}"
        )
    all_q = gather_with_local_grad(q.float(), rank, world_size)
    all_p = gather_with_local_grad(p.float(), rank, world_size)
    logits = all_q @ all_p.T / tau
    labels = torch.arange(all_q.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss, loss * world_size


@torch.no_grad()
def in_batch_accuracy(q: torch.Tensor, p: torch.Tensor) -> float:
    """Share of queries whose highest-scoring passage in the batch is their own positive."""
    scores = q.float() @ p.float().T
    return float((scores.argmax(dim=1) == torch.arange(q.shape[0], device=q.device)).float().mean())
