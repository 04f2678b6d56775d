"""InfoNCE over in-batch negatives gathered from every worker.

Every worker holds ``n`` query and ``n`` passage embeddings of one global batch of
``world_size * n`` pairs. Each worker gathers all of them (no gradient through the
copies it receives, its own tensors put back in place), computes the loss of the
*whole* global batch, and backpropagates ``world_size *`` that loss: every term that
involves a local embedding is in the local loss, so the local embeddings receive
exactly their share of the global gradient, and DDP's mean over workers turns the
``world_size`` factor back into the gradient of one process holding the whole batch.
Tested against a single process with the global batch (tests/test_loss.py).

Hard negatives (``negatives``, any number of rows per worker, the same on every worker) are
gathered the same way and appended as extra columns: every query is scored against every
passage *and* every hard negative of the global batch. False negatives by text
(``passage_keys``, one integer per passage, equal for equal passage texts): the column of
another pair whose passage text equals this pair's is masked out of the softmax, and so is a
hard negative whose text equals this pair's positive. The batch plan already keeps a parallel
item out of a batch twice; this catches different items (or pairs) that share a passage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LossError",
    "duplicate_text_pairs",
    "gather_with_local_grad",
    "in_batch_accuracy",
    "info_nce",
]


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
    negatives: torch.Tensor | None = None,
    passage_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of the global batch from this rank's query / passage embeddings.

    Query ``i`` of rank ``r`` is the global row ``r * n + i``; its positive is the passage
    of the same global index, every other passage of the global batch (and every hard
    negative) is a negative, except those masked as false negatives by text.

    Args:
        q: [n, d] local query embeddings (normalised if cosine similarity is wanted).
        p: [n, d] local passage embeddings, aligned with ``q``.
        tau: temperature, > 0.
        rank: this process's rank.
        world_size: number of processes holding parts of the batch.
        symmetric: average the query->passage and passage->query losses (the
            passage->query term scores a passage against the queries only).
        negatives: [m, d] local hard-negative embeddings (same ``m`` on every rank), or None.
        passage_keys: [n] integer keys of the local passages' texts (equal text, equal key),
            or None for no masking by text.
        negative_keys: [m] keys of the hard negatives' texts (masked where equal to the
            query's positive); needs ``passage_keys``.

    Returns:
        ``(loss, backward_loss)``: ``loss`` is the mean loss of the global batch (the same
        value on every rank, for logging); ``backward_loss`` is ``world_size * loss``, the
        tensor to call ``backward`` on under DDP's gradient averaging (see module docstring).

    Raises:
        LossError: tau <= 0, or q, p, negatives or keys disagree in shape.
    """
    if not tau > 0:
        raise LossError(f"train.tau must be > 0, got {tau}")
    if q.shape != p.shape or q.dim() != 2:
        raise LossError(
            f"query and passage embeddings must both be [n, d]; got "
            f"{tuple(q.shape)} and {tuple(p.shape)}"
        )
    if negatives is not None and (negatives.dim() != 2 or negatives.shape[1] != q.shape[1]):
        raise LossError(f"hard negatives must be [m, {q.shape[1]}]; got {tuple(negatives.shape)}")
    all_q = gather_with_local_grad(q.float(), rank, world_size)
    all_p = gather_with_local_grad(p.float(), rank, world_size)
    logits = all_q @ all_p.T / tau
    n_all = all_q.shape[0]
    mask = _text_mask(passage_keys, n_all, rank, world_size, logits.device)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(n_all, device=logits.device)
    scores = logits
    if negatives is not None:
        all_n = gather_with_local_grad(negatives.float(), rank, world_size)
        neg_logits = all_q @ all_n.T / tau
        if negative_keys is not None:
            if passage_keys is None or negative_keys.shape != (negatives.shape[0],):
                raise LossError(
                    f"negative_keys must be [{negatives.shape[0]}] and come with passage_keys"
                )
            all_pk = gather_with_local_grad(passage_keys, rank, world_size)
            all_nk = gather_with_local_grad(negative_keys, rank, world_size)
            neg_logits = neg_logits.masked_fill(all_pk[:, None] == all_nk[None, :], float("-inf"))
        scores = torch.cat([logits, neg_logits], dim=1)
    loss = F.cross_entropy(scores, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss, loss * world_size


def _text_mask(
    keys: torch.Tensor | None, n_all: int, rank: int, world_size: int, device: torch.device
) -> torch.Tensor | None:
    """[N, N] True where two *different* pairs of the global batch share a passage text."""
    if keys is None:
        return None
    if keys.dim() != 1 or keys.shape[0] * world_size != n_all:
        raise LossError(f"passage_keys must be [{n_all // world_size}]; got {tuple(keys.shape)}")
    all_keys = gather_with_local_grad(keys.to(device), rank, world_size)
    same = all_keys[:, None] == all_keys[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


def duplicate_text_pairs(keys: torch.Tensor) -> int:
    """Unordered pairs of different rows of ``keys`` (global passage keys) with equal keys:
    how many false negatives by text a batch's loss masked."""
    same = keys[:, None] == keys[None, :]
    return int((same.sum() - keys.shape[0]) // 2)


@torch.no_grad()
def in_batch_accuracy(q: torch.Tensor, p: torch.Tensor) -> float:
    """Share of queries whose highest-scoring passage in the batch is their own positive."""
    scores = q.float() @ p.float().T
    return float((scores.argmax(dim=1) == torch.arange(q.shape[0], device=q.device)).float().mean())
