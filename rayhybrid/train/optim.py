"""The optimiser and the learning-rate schedule of a training run (nanoGPT's recipe)."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm weights do not (one ``p.dim() >= 2`` test)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * max_steps`` steps, then linear decay to 0 at max_steps."""
    warmup = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
