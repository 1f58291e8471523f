"""The one optimizer recipe both trainers use: AdamW, linear warmup, cosine decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """LR factor per step: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw_warmup_cosine(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    steps: int,
    warmup: int,
    lr_scales: Mapping[str, float] | Callable[[str, torch.nn.Parameter], float] | None = None,
):
    """AdamW (no decay on biases, norms and the logit scale) and its warmup/cosine LambdaLR.

    ``lr_scales`` maps a parameter-name prefix to an LR multiplier (e.g. ``{"visual.": 8.0}``; the
    first matching prefix wins) or is a function of (name, parameter); other parameters train at ``lr``.
    """
    if callable(lr_scales):
        scale_of = lr_scales
    else:
        prefixes = dict(lr_scales or {})

        def scale_of(name: str, param: torch.nn.Parameter) -> float:
            return next((s for prefix, s in prefixes.items() if name.startswith(prefix)), 1.0)

    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        scale = scale_of(name, param)
        decays = not (param.ndim < 2 or "logit_scale" in name)
        groups.setdefault((scale, decays), []).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0}
            for (scale, decays), params in groups.items()
        ],
        lr=lr,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
