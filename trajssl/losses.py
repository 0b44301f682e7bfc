"""Semantic (view-invariance) losses of the Siamese family, as small pure functions, plus the trajectory loss.

Batch-statistic losses (InfoNCE negatives, VICReg variance and covariance) see the whole batch: callers pass
embeddings gathered over processes (``common.distributed.gather_with_grad``), which is the identity in one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .trajectory_loss import trajectory_cosine, trajectory_loss

__all__ = ["info_nce_loss", "vicreg_loss", "vicreg_terms", "simsiam_loss", "trajectory_loss", "trajectory_cosine"]


def _wide(z: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for the reductions; float32 / float64 unchanged."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, name: str, min_batch: int = 1) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{name}: expected two (B, D) tensors of the same shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch}, got {z1.shape[0]}")


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views. z1, z2 (N, D): row i of z1 and of z2 are two views of one image.

    Each of the 2N embeddings is classified against the 2N - 1 others (cosine similarity / temperature); its
    positive is the other view of the same image. Returns the mean cross-entropy over the 2N rows (scalar).
    """
    _check_pair(z1, z2, "info_nce_loss", min_batch=1)
    n = z1.shape[0]
    z = F.normalize(_wide(torch.cat([z1, z2])), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three unweighted VICReg terms of the official implementation (Bardes et al., ICLR 2022).

    z1, z2 (N, D), N >= 2. Returns scalars ``invariance`` = MSE(z1, z2); ``variance`` = mean over dims of
    relu(1 - sqrt(var + 1e-4)), averaged over the two branches; ``covariance`` = sum of squared off-diagonal
    covariances / D, summed over the two branches (variance and covariance use the unbiased estimate).
    """
    _check_pair(z1, z2, "vicreg_loss", min_batch=2)
    z1, z2 = _wide(z1), _wide(z2)
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    std1 = torch.sqrt(z1.var(dim=0) + 1e-4)
    std2 = torch.sqrt(z2.var(dim=0) + 1e-4)
    variance = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1 = z1.T @ z1 / (n - 1)
    cov2 = z2.T @ z2 / (n - 1)
    covariance = _off_diagonal(cov1).pow(2).sum() / d + _off_diagonal(cov2).pow(2).sum() / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0) -> torch.Tensor:
    """VICReg loss (scalar) of two (N, D) projector outputs: the weighted sum of :func:`vicreg_terms`."""
    t = vicreg_terms(z1, z2)
    return sim_weight * t["invariance"] + var_weight * t["variance"] + cov_weight * t["covariance"]


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric negative cosine (scalar in [-1, 1]); the targets z are detached (stop-gradient).

    p1, p2 (N, D) predictor outputs of views 1 and 2; z1, z2 (N, D) projector outputs of views 1 and 2.
    """
    _check_pair(p1, z2, "simsiam_loss")
    _check_pair(p2, z1, "simsiam_loss")
    return -(F.cosine_similarity(p1, z2.detach(), dim=1).mean()
             + F.cosine_similarity(p2, z1.detach(), dim=1).mean()) / 2
