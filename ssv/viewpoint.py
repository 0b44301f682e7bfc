"""Viewpoint parameterisations for the viewpoint network V: SSV's spherical-regression head and a 6-D alternative.

Angles are (azimuth, elevation, tilt) in radians, the project convention of :mod:`common.geometry`.

**Spherical regression** (Liao et al. CVPR 2019, squared variant, as in SSV). For each angle theta the head predicts

- magnitudes: a 2-way log-softmax ``logp = (log p_cos, log p_sin)`` that regresses ``(cos^2 theta, sin^2 theta)``
  (they sum to 1), trained by soft-label cross-entropy;
- a sign quadrant: 4-way logits over ``(sign cos, sign sin)``: 0 = (+, +), 1 = (+, -), 2 = (-, +), 3 = (-, -).

Decoding: ``theta = atan2(s_sin * sqrt(p_sin), s_cos * sqrt(p_cos))`` with the signs of the argmax quadrant; the
result lies in (-pi, pi] and is differentiable with respect to the magnitudes (not the argmax sign).

**6-D head** (Zhou et al. CVPR 2019): six numbers, Gram-Schmidt to a rotation matrix R (first two columns), decoded
with :func:`common.geometry.matrix_to_angles`; trained with the squared Frobenius distance to the target matrix.

**Flip.** A horizontally mirrored image of a left-right symmetric object seen under (a, e, t) shows the object under
(-a, e, -t): with M = diag(-1, 1, 1) (mirror of the camera x axis and of the object x axis),
M R(a, e, t) M = R(-a, e, -t). In the spherical encoding this keeps every magnitude and toggles the sin sign of
azimuth and tilt (quadrant 0 <-> 1, 2 <-> 3).
"""
from __future__ import annotations

import torch
from torch import nn

from common.geometry import angles_to_matrix, flip_angles, matrix_to_angles, rotation_6d_to_matrix

from . import losses
from .layers import EqualLinear

__all__ = [
    "SIGNS",
    "FLIP_MASK",
    "flip_angles",
    "flip_matrix",
    "sign_class",
    "encode_spherical",
    "decode_spherical",
    "flip_sign_class",
    "SphericalHead",
    "Rotation6DHead",
    "build_head",
    "HEADS",
]

#: (sign cos, sign sin) per quadrant class.
SIGNS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
#: Which of (azimuth, elevation, tilt) change sign under a horizontal mirror.
FLIP_MASK = torch.tensor([True, False, True])
_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))


def flip_matrix(R: torch.Tensor) -> torch.Tensor:
    """Rotation of the mirrored view: (..., 3, 3) R -> M R M with M = diag(-1, 1, 1); equals R(-a, e, -t)."""
    M = _MIRROR.to(dtype=R.dtype, device=R.device)
    return M @ R @ M


def sign_class(angles: torch.Tensor) -> torch.Tensor:
    """Quadrant class of each angle: (...,) radians -> (...,) long, 2 * [cos < 0] + [sin < 0]."""
    return 2 * (torch.cos(angles) < 0).long() + (torch.sin(angles) < 0).long()


def encode_spherical(angles: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets of the spherical head: (B, K) radians -> {"ccss": (B, K, 2) (cos^2, sin^2), "sign": (B, K) long}."""
    c, s = torch.cos(angles), torch.sin(angles)
    return {"ccss": torch.stack([c * c, s * s], dim=-1), "sign": sign_class(angles)}


def decode_spherical(logp: torch.Tensor, sign_logits: torch.Tensor) -> torch.Tensor:
    """(B, K, 2) log(cos^2, sin^2) and (B, K, 4) quadrant logits -> (B, K) angles in [-pi, pi] (atan2's range: -pi
    where a sin magnitude underflows to -0.0; the same angle as pi).

    ``sqrt(p) = exp(logp / 2)`` keeps the gradient finite where a magnitude is 0.
    """
    mag = torch.exp(0.5 * logp)
    signs = SIGNS.to(dtype=logp.dtype, device=logp.device)[sign_logits.argmax(dim=-1)]
    cos_sin = mag * signs
    return torch.atan2(cos_sin[..., 1], cos_sin[..., 0])


def flip_sign_class(sign: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Quadrant classes of the mirrored view: (B, K) long -> (B, K) long; toggles the sin sign where ``mask``.

    ``mask`` (K,) bool defaults to :data:`FLIP_MASK` (azimuth and tilt).
    """
    mask = (FLIP_MASK if mask is None else mask).to(sign.device)
    return torch.where(mask, sign ^ 1, sign)


class SphericalHead(nn.Module):
    """SSV's viewpoint head, one branch per angle: Linear-ReLU-Dropout, then magnitude (2) and sign (4) outputs.

    forward: (B, F) features -> {"logp": (B, K, 2) log-softmax magnitudes, "sign": (B, K, 4) quadrant logits}.
    """

    kind = "spherical"

    def __init__(self, in_dim: int, hidden: int, n_angles: int = 3, dropout: float = 0.5):
        super().__init__()
        self.n_angles = n_angles
        self.fc = nn.ModuleList(
            nn.Sequential(EqualLinear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout)) for _ in range(n_angles)
        )
        self.mag = nn.ModuleList(EqualLinear(hidden, 2) for _ in range(n_angles))
        self.sign = nn.ModuleList(EqualLinear(hidden, 4) for _ in range(n_angles))

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        hs = [fc(feat) for fc in self.fc]
        logits = torch.stack([m(h) for m, h in zip(self.mag, hs)], dim=1)
        sign = torch.stack([s(h) for s, h in zip(self.sign, hs)], dim=1)
        return {"logp": torch.log_softmax(logits, dim=-1), "sign": sign}

    @staticmethod
    def decode(out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Head output -> (B, K) radians."""
        return decode_spherical(out["logp"], out["sign"])

    @staticmethod
    def encode(angles: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, K) radians -> loss target."""
        return encode_spherical(angles)

    @staticmethod
    def loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_v: soft-label CE on magnitudes + sign CE, summed over angles (0-d)."""
        return losses.spherical_viewpoint_loss(out["logp"], out["sign"], target["ccss"], target["sign"])

    @staticmethod
    def pseudo_target(out: dict[str, torch.Tensor], flip: bool = False) -> dict[str, torch.Tensor]:
        """A (detached) target from a prediction: soft magnitudes and the argmax sign, mirrored if ``flip``."""
        ccss = out["logp"].detach().exp()
        sign = out["sign"].detach().argmax(dim=-1)
        if flip:
            sign = flip_sign_class(sign)
        return {"ccss": ccss, "sign": sign}


class Rotation6DHead(nn.Module):
    """Continuous 6-D rotation head: Linear-ReLU-Dropout-Linear(6); forward -> {"r6d": (B, 6)}."""

    kind = "6d"

    def __init__(self, in_dim: int, hidden: int, n_angles: int = 3, dropout: float = 0.5):
        super().__init__()
        if n_angles != 3:
            raise ValueError("the 6-D head predicts a full rotation (3 angles)")
        self.fc = nn.Sequential(EqualLinear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out = EqualLinear(hidden, 6)
        with torch.no_grad():  # start near the identity rotation
            self.out.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"r6d": self.out(self.fc(feat))}

    @staticmethod
    def decode(out: dict[str, torch.Tensor]) -> torch.Tensor:
        a, e, t = matrix_to_angles(rotation_6d_to_matrix(out["r6d"]))
        return torch.stack([a, e, t], dim=-1)

    @staticmethod
    def encode(angles: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"R": angles_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])}

    @staticmethod
    def loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.rotation_matrix_loss(rotation_6d_to_matrix(out["r6d"]), target["R"])

    @staticmethod
    def pseudo_target(out: dict[str, torch.Tensor], flip: bool = False) -> dict[str, torch.Tensor]:
        R = rotation_6d_to_matrix(out["r6d"].detach())
        return {"R": flip_matrix(R) if flip else R}


HEADS = {"spherical": SphericalHead, "6d": Rotation6DHead}


def build_head(kind: str, in_dim: int, hidden: int, dropout: float = 0.5) -> nn.Module:
    if kind not in HEADS:  # the command line offers HEADS only: a config written by hand or a malformed checkpoint
        raise ValueError(f"unknown viewpoint head {kind!r} (choose from {', '.join(HEADS)})")
    return HEADS[kind](in_dim, hidden, dropout=dropout)
