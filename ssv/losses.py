"""SSV's losses as small pure functions. Shapes: B = batch, K = number of angles (3), F = feature size.

Weights are applied by the trainer (once each); every function here returns the unweighted term as a 0-d tensor,
averaged over the batch.

Paper names -> functions:
- adversarial (WGAN-GP): :func:`wgan_critic_loss` (with the drift term), :func:`gradient_penalty`,
  :func:`generator_adversarial_loss`;
- viewpoint loss L_v: :func:`spherical_viewpoint_loss` (or :func:`rotation_matrix_loss` for the 6-D head);
- self-consistency / cycle L_sv = ||z - z_hat||^2 + L_v(v, v_hat): :func:`style_loss` + L_v, summed by
  :func:`cycle_loss`;
- image consistency L_imc = 1 - cos(Phi(I), Phi(S(z_hat, v_hat))): :func:`image_consistency_loss`;
- symmetry on V (mirrored image -> (-a, e, -t), same style): :func:`view_symmetry_loss`;
- symmetry on S (S(z, flipped v) == mirror S(z, v)): :func:`generator_symmetry_loss`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "wgan_critic_loss",
    "gradient_penalty",
    "generator_adversarial_loss",
    "spherical_viewpoint_loss",
    "rotation_matrix_loss",
    "style_loss",
    "cycle_loss",
    "image_consistency_loss",
    "view_symmetry_loss",
    "generator_symmetry_loss",
    "hflip",
]


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror images left-right: (B, C, H, W) -> (B, C, H, W)."""
    return torch.flip(images, dims=[-1])


def wgan_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, drift: float = 1e-3) -> torch.Tensor:
    """WGAN critic loss with the ProGAN drift term: (B,), (B',) -> 0-d.

    -mean D(x) + mean D(G(z)) + drift * mean D(x)^2.
    """
    return -real_scores.mean() + fake_scores.mean() + drift * real_scores.pow(2).mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): mean_b (||grad_x D(x_hat_b)||_2 - 1)^2 with x_hat = eps x + (1 - eps) G(z).

    critic: (B, ...) -> (B,); real, fake: (B, ...); eps: (B,) in [0, 1] (drawn from the global RNG if None) -> 0-d.
    The graph is kept (create_graph) so the penalty trains the critic. The weight (10) is the trainer's.
    """
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    eps = eps.reshape(-1, *([1] * (real.dim() - 1)))
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(dim=1)
    return (norms - 1.0).pow(2).mean()


def generator_adversarial_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss: -mean D(G(z)); (B,) -> 0-d."""
    return -fake_scores.mean()


def spherical_viewpoint_loss(
    logp: torch.Tensor, sign_logits: torch.Tensor, ccss: torch.Tensor, sign: torch.Tensor
) -> torch.Tensor:
    """SSV's L_v, summed over the K angles, each term averaged over the batch.

    logp (B, K, 2) log-softmax of (cos^2, sin^2); sign_logits (B, K, 4); targets ccss (B, K, 2) (rows sum to 1)
    and sign (B, K) long in 0..3 -> 0-d:

        sum_k [ mean_b -(ccss_bk . logp_bk) + mean_b CE(sign_logits_bk, sign_bk) ]
    """
    magnitude = -(ccss * logp).sum(dim=-1).mean(dim=0).sum()
    K = sign_logits.shape[1]
    quadrant = F.cross_entropy(sign_logits.reshape(-1, 4), sign.reshape(-1), reduction="none")
    quadrant = quadrant.reshape(-1, K).mean(dim=0).sum()
    return magnitude + quadrant


def rotation_matrix_loss(R_pred: torch.Tensor, R_target: torch.Tensor) -> torch.Tensor:
    """L_v of the 6-D head: mean_b ||R_pred - R_target||_F^2; (B, 3, 3) x (B, 3, 3) -> 0-d (in [0, 8])."""
    return (R_pred - R_target).pow(2).sum(dim=(-1, -2)).mean()


def style_loss(z_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Style reconstruction ||z - z_hat||^2, averaged over batch *and* code entries (the release's MSE);
    (B, Z) -> 0-d."""
    return F.mse_loss(z_hat, z.detach())


def cycle_loss(style_term: torch.Tensor, view_term: torch.Tensor, w_style: float, w_view: float) -> torch.Tensor:
    """Self-consistency L_sv on synthetic images: w_style * ||z - z_hat||^2 + w_view * L_v(v, v_hat);
    0-d, 0-d -> 0-d."""
    return w_style * style_term + w_view * view_term


def image_consistency_loss(feat_real: torch.Tensor, feat_rec: torch.Tensor) -> torch.Tensor:
    """L_imc = mean_b [1 - cos(Phi(I_b), Phi(S(z_hat_b, v_hat_b)))]; features (B, ...) flattened per sample -> 0-d."""
    return (1.0 - F.cosine_similarity(feat_real.flatten(1), feat_rec.flatten(1), dim=1, eps=1e-8)).mean()


def view_symmetry_loss(
    view_loss: Callable[[dict, dict], torch.Tensor],
    view_flipped: dict,
    flipped_target: dict,
    z_flipped: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_sym on V: the mirrored image must be seen under (-a, e, -t) and with the same style.

    view_loss: the head's L_v(output, target); view_flipped: V's head output on hflip(I); flipped_target: the
    (detached) pseudo-target built from V's prediction on I and mirrored (``head.pseudo_target(out, flip=True)``);
    z_flipped, z: (B, Z) style predictions on hflip(I) and I (z is detached) -> 0-d:

        L_v(V(hflip I), flip(sg V(I))) + ||z_hat(hflip I) - sg z_hat(I)||^2
    """
    loss = view_loss(view_flipped, flipped_target)
    if z_flipped is not None and z is not None:
        loss = loss + style_loss(z_flipped, z.detach())
    return loss


def generator_symmetry_loss(image_flipped_view: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """L_sym on S: SmoothL1(S(z, flip v), sg hflip(S(z, v))); (B, 3, H, W) x (B, 3, H, W) -> 0-d."""
    return F.smooth_l1_loss(image_flipped_view, hflip(image).detach())
