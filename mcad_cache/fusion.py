"""Fusion rules: how a candidate list's dual-stream and ITM logits become the target logit.

Each rule is a pure function ``(z_dual, z_itm, a) -> z_fused`` on (N, k) tensors of
the candidates' logits; pairs outside a candidate list keep their dual-stream
logit in stage 2. Rules are registered by name so a cache manifest can record
which one made its targets and variants can be compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FusionRule = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
FUSION_RULES: dict[str, FusionRule] = {}


def register(name: str) -> Callable[[FusionRule], FusionRule]:
    def add(rule: FusionRule) -> FusionRule:
        FUSION_RULES[name] = rule
        return rule

    return add


@register("dual_only")
def dual_only(z_dual: torch.Tensor, z_itm: torch.Tensor, a: float) -> torch.Tensor:
    """The dual-stream logits unchanged: the CLIP-only KD baseline."""
    return z_dual.clone()


@register("itm_topk")
def itm_topk(z_dual: torch.Tensor, z_itm: torch.Tensor, a: float) -> torch.Tensor:
    """Dual-stream logits plus the ITM evidence with weight ``a`` on the top-k candidates."""
    return z_dual + a * z_itm


@register("reconstruction")
def reconstruction(z_dual: torch.Tensor, z_itm: torch.Tensor, a: float) -> torch.Tensor:
    """The paper's reconstruction: ``a * z_dual + (1 - a) * z_itm`` on the candidates."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"reconstruction needs 0 <= a <= 1, got a={a}")
    return a * z_dual + (1.0 - a) * z_itm


def fuse(rule: str, z_dual: torch.Tensor, z_itm: torch.Tensor, a: float) -> torch.Tensor:
    if rule not in FUSION_RULES:
        raise KeyError(f"unknown fusion rule {rule!r}; known: {sorted(FUSION_RULES)}")
    if z_dual.shape != z_itm.shape:
        raise ValueError(f"dual logits {tuple(z_dual.shape)} and ITM logits {tuple(z_itm.shape)} differ in shape")
    return FUSION_RULES[rule](z_dual.float(), z_itm.float(), a)
