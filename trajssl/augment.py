"""Semantic views: batched random augmentations (kornia), applied in the main process with the global torch RNG.

Recipe of trajSSL (SimCLR-style, on the centre image): random resized crop (scale 0.08-1), horizontal flip
p 0.5, colour jitter (0.4, 0.4, 0.4, 0.2) p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 p 0.5. Triplet
images are not augmented (the trajectory loss needs their geometry intact).

For frame pairs (SiamPose) the flip can be shared by both views of a pair (``sync_flip``), so that a flip does not
mirror one view of the motion only; crops and colours stay independent.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SemanticViews"]


class SemanticViews(nn.Module):
    """``views(x1, x2, sync_flip=False) -> (v1, v2)``: two independently augmented (B, 3, S, S) batches in [0, 1].

    ``x1`` and ``x2`` are the sources of the two views (the same tensor for two views of one image, or the two
    frames of a pair). ``mode="none"`` returns the sources unchanged (tests, ablations).
    """

    def __init__(self, size: int, mode: str = "full", crop_scale: tuple[float, float] = (0.08, 1.0),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.2), jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: float = 0.5, flip_p: float = 0.5):
        super().__init__()
        if mode not in ("full", "none"):
            raise ValueError(f"augmentation mode {mode!r}: expected 'full' or 'none'")
        self.mode, self.flip_p = mode, flip_p
        if mode == "none":
            return
        import kornia.augmentation as K

        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        self.pipeline = nn.Sequential(
            K.RandomResizedCrop((size, size), scale=crop_scale),
            K.ColorJitter(*jitter, p=jitter_p),
            K.RandomGrayscale(p=gray_p),
            K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=blur_p),
        )

    def _flip(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)

    @torch.no_grad()
    def forward(self, x1: torch.Tensor, x2: torch.Tensor, sync_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "none":
            return x1, x2
        b = x1.shape[0]
        flip1 = torch.rand(b, device=x1.device) < self.flip_p
        flip2 = flip1 if sync_flip else torch.rand(b, device=x1.device) < self.flip_p
        v1 = self.pipeline(self._flip(x1, flip1)).clamp_(0, 1)
        v2 = self.pipeline(self._flip(x2, flip2)).clamp_(0, 1)
        return v1.contiguous(), v2.contiguous()
