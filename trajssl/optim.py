"""Optimisers (LARS from timm, SGD, AdamW) and the warm-up + cosine learning-rate schedule.

Biases and normalisation parameters (1-D tensors) get no weight decay and, with LARS, no trust-ratio adaptation,
as in VICReg / solo-learn; the other weights always adapt, also at weight decay 0. Each parameter group keeps its
``base_lr``; :func:`set_lr` sets ``lr = base_lr * schedule(step)`` from the step index alone, so resuming needs no
scheduler state. Groups flagged ``fixed_lr`` (SimSiam's predictor) keep their base lr.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from common.errors import ViewsslError

OPTIMIZERS = ("lars", "sgd", "adamw")

__all__ = ["OPTIMIZERS", "build_optimizer", "warmup_cosine", "set_lr"]


def _groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, fixed_lr: bool) -> list[dict]:
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "base_lr": lr, "lr": lr, "fixed_lr": fixed_lr})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "lr": lr, "fixed_lr": fixed_lr})
    return groups


def build_optimizer(modules: dict[str, nn.Module], name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    fixed_lr: Iterable[str] = (), trust_coeff: float = 0.02, trust_clip: bool = True
                    ) -> torch.optim.Optimizer:
    """One optimiser over named modules; modules named in ``fixed_lr`` keep a constant learning rate.

    ``lars``: timm ``Lars`` (momentum, trust coefficient ``trust_coeff``, LARC clipping if ``trust_clip``; trajSSL
    uses eta 0.02 with clipping). ``sgd``: momentum SGD. ``adamw``: AdamW (``momentum`` unused).
    """
    groups = []
    for key, module in modules.items():
        groups += _groups(module.named_parameters(), lr, weight_decay, key in set(fixed_lr))
    if name == "lars":
        from timm.optim import Lars

        # timm adapts a group only if its weight decay is not 0 (or always_adapt): say which groups adapt, so that
        # --weight-decay 0 keeps the trust ratio on the weights (without it LARS silently became plain SGD)
        for g in groups:
            g["always_adapt"] = g["params"][0].ndim > 1  # the weights' group (see _groups), not biases / norms
        return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff,
                    trust_clip=trust_clip)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ViewsslError(f"--optimizer {name!r}: unknown optimiser (available: {', '.join(OPTIMIZERS)})")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, start: float = 0.0, final: float = 0.0) -> float:
    """LR factor at ``step``: linear from ``start`` to 1 over ``warmup_steps``, then cosine from 1 to ``final`` at
    ``total_steps`` (and ``final`` after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr * factor`` (``fixed_lr`` groups keep ``base_lr``); returns the factor."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * factor
    return factor
