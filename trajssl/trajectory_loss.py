"""The viewpoint-trajectory loss of trajSSL (Wang, Chen and Yu, ECCV 2024), written from the paper's equations.

Three renders of one object, left / centre / right, whose viewpoints are equal steps along one rotation (a geodesic
triplet), should map to three embeddings that lie on a *straight* path on the unit sphere: the step from left to
centre and the step from centre to right point the same way once both are seen from the centre (projected on the
sphere's tangent plane at the centre).

    z_l, z_c, z_r  <- L2-normalised embeddings                       (B, D) each
    v1 = z_c - z_l,  v2 = z_r - z_c                                  steps along the path
    u_i = v_i - (v_i . z_c) z_c                                      tangent-plane components at z_c
    loss = - mean_b cos(u1, u2)                                      -1 straight path ... +1 folded back (z_l = z_r)

Degenerate triplets (a tangent step shorter than ``eps``, e.g. z_l == z_c, or collapsed features) count as
cos = 0 with zero gradient: the value stays finite and no NaN reaches the weights. The cosine's gradient grows as
1 / step length, so ``eps`` (1e-3 on the unit sphere, about 0.06 deg) also bounds it for nearly identical views.

The released code (``solo/losses/dcl.py::PoseLoss``) returns ``+mean(u1 . u2)``: opposite sign and no
normalisation, so it rewards folding and scales with the squared step length. This file follows the paper instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["trajectory_loss", "trajectory_cosine"]


def _wide(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def trajectory_cosine(z_l: torch.Tensor, z_c: torch.Tensor, z_r: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-triplet cosine between the two tangent steps. Inputs (B, ...) (flattened to (B, D)); output (B,)."""
    z_l, z_c, z_r = (F.normalize(_wide(z.flatten(1)), dim=1) for z in (z_l, z_c, z_r))
    v1, v2 = z_c - z_l, z_r - z_c
    u1 = v1 - (v1 * z_c).sum(1, keepdim=True) * z_c
    u2 = v2 - (v2 * z_c).sum(1, keepdim=True) * z_c
    sq1, sq2 = (u1 * u1).sum(1), (u2 * u2).sum(1)
    ok = (sq1 > eps * eps) & (sq2 > eps * eps)
    # Square roots of clamped values: no infinite derivative of sqrt at 0, and the masked branch gets zero gradient.
    norm = (sq1.clamp_min(eps * eps) * sq2.clamp_min(eps * eps)).sqrt()
    cos = (u1 * u2).sum(1) / norm
    return torch.where(ok, cos, torch.zeros_like(cos))


def trajectory_loss(z_l: torch.Tensor, z_c: torch.Tensor, z_r: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Trajectory loss ``-mean cos(u1, u2)``: z_l, z_c, z_r (B, D) or feature maps (B, C, H, W) -> scalar in [-1, 1]."""
    return -trajectory_cosine(z_l, z_c, z_r, eps).mean()
