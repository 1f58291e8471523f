"""The one optimizer recipe both trainers use: AdamW, linear warmup, cosine decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """LR factor per step: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw_warmup_cosine(model: torch.nn.Module, lr: float, weight_decay: float, steps: int, warmup: int):
    """AdamW (no decay on biases, norms and the logit scale) and its warmup/cosine LambdaLR."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
