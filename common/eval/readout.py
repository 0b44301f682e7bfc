"""Viewpoint read out from frozen features: one protocol for every model, with or without an angle head.

A ridge regression maps standardised features to (cos, sin) of azimuth, elevation and tilt; angles are decoded with
atan2. It is fitted on the labelled *training* split of the same kind (e.g. ``heads/train``) and scored on the
evaluation split (``heads/test``), so it is a linear probe of how much viewpoint the features hold, comparable
between the generative critic's trunk and a Siamese encoder. The ridge strength is chosen on a seeded 20 % hold-out
of the training split from a fixed grid, then the probe is refitted on all of it.
"""
from __future__ import annotations

import logging

import torch

from .context import EvalContext, SkipMetric
from .metrics import register_metric
from .pose import viewpoint_errors

__all__ = ["angles_to_targets", "targets_to_angles", "fit_ridge", "readout_angles"]

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
log = logging.getLogger("viewssl.eval")
MIN_TRAIN = 10  # samples the readout needs: a fifth of them choose alpha, the rest fit


def angles_to_targets(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3) radians -> (N, 6): cos and sin of each angle."""
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def targets_to_angles(targets: torch.Tensor) -> torch.Tensor:
    """(N, 6) -> (N, 3) radians, atan2(sin, cos) per angle."""
    return torch.atan2(targets[:, 3:], targets[:, :3])


def fit_ridge(x: torch.Tensor, y: torch.Tensor,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form ridge on standardised features: returns (mean, std, W, b) with y ~ ((x - mean) / std) @ W + b.

    ``alpha`` is relative to the number of samples (the penalty is alpha * N * ||W||^2), so one grid serves any N.
    """
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    b = y.mean(0)
    n, d = z.shape
    if d <= n:
        gram = z.T @ z + alpha * n * torch.eye(d, dtype=z.dtype, device=z.device)
        W = torch.linalg.solve(gram, z.T @ (y - b))
    else:  # dual form: cheaper when the features are wider than the sample count
        gram = z @ z.T + alpha * n * torch.eye(n, dtype=z.dtype, device=z.device)
        W = z.T @ torch.linalg.solve(gram, y - b)
    return mean, std, W, b


def _predict(params, x: torch.Tensor) -> torch.Tensor:
    mean, std, W, b = params
    return ((x.to(mean.device).double() - mean) / std) @ W + b


def readout_angles(train_features: torch.Tensor, train_angles: torch.Tensor, query_features: torch.Tensor,
                   seed: int = 0) -> tuple[torch.Tensor, float]:
    """Fit the readout on (train_features (N, D), train_angles (N, 3) rad) and predict (M, 3) radians for
    ``query_features`` (M, D). Returns (predicted angles on the features' device, chosen alpha)."""
    train_angles = train_angles.to(train_features.device, torch.float64)  # labels come from the CPU
    y = angles_to_targets(train_angles)
    n = train_features.shape[0]
    if n < MIN_TRAIN:
        raise ValueError(f"the readout needs at least {MIN_TRAIN} training samples, got {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(train_features.device)
    n_val = max(2, n // 5)
    val, fit = perm[:n_val], perm[n_val:]
    best = None
    for alpha in RIDGE_GRID:
        params = fit_ridge(train_features[fit], y[fit], alpha)
        pred = targets_to_angles(_predict(params, train_features[val]))
        err = viewpoint_errors(pred, train_angles[val])["mae"]
        if best is None or err < best[0]:
            best = (err, alpha)
    params = fit_ridge(train_features, y, best[1])
    return targets_to_angles(_predict(params, query_features)), best[1]


@register_metric("viewpoint_readout")
def viewpoint_readout_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Viewpoint MAE of a ridge readout of frozen features, fitted on the training split (any model with taps)."""
    if ctx.source.layout == "folder":
        raise SkipMetric("the readout needs a training split beside the evaluation split")
    candidates = ("heads", "objects") if ctx.source.layout == "benchmark" else ("",)
    kinds = [k for k in candidates if ctx.has_angles(k, "train") and ctx.has_angles(k, ctx.split)]
    if not kinds:
        raise SkipMetric(f"no train and {ctx.split} splits with viewpoints")
    out: dict[str, float] = {}
    too_few: list[str] = []
    for kind in kinds:
        train = ctx.outputs(model, kind, "train")
        query = ctx.outputs(model, kind, ctx.split)
        if train.true_angles.shape[0] < MIN_TRAIN:
            too_few.append(f"{ctx.name(kind, 'train')} has {train.true_angles.shape[0]}")
            log.info("viewpoint_readout: skipping %s: %s", kind or "the data", too_few[-1])
            continue
        pred, alpha = readout_angles(ctx.features(model, kind, "train"), train.true_angles,
                                     ctx.features(model, kind, ctx.split), seed=ctx.seed)
        errs = viewpoint_errors(pred, query.true_angles.to(pred.device))
        for key, value in errs.items():
            out["/".join(p for p in (kind, "readout", key) if p)] = float(value)
        ctx.record("viewpoint_readout", **{kind or "data": {
            "protocol": "readout",
            "fit": f"ridge to (cos, sin) per angle on standardised features of {kind or '.'}/train "
            f"(alpha {alpha} chosen on a seeded 20% hold-out of train from {list(RIDGE_GRID)})",
            "n_train": int(train.true_angles.shape[0]), "n_scored": int(query.true_angles.shape[0]),
            "tap": ctx.tap or ctx.default_tap(model)}})
    if not out:
        raise SkipMetric(f"the readout needs at least {MIN_TRAIN} training samples: {'; '.join(too_few)}")
    return out
