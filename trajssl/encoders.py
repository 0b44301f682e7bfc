"""ResNet-18 backbone (torchvision) with named feature taps.

Taps: ``layer2``, ``layer3``, ``layer4`` (feature maps) and ``pooled`` (the 512-d global average). Images come in as
float RGB in [0, 1]; the encoder normalises them itself (ImageNet mean / std).

``small_stem=True`` (default) swaps the 7x7 stride-2 first convolution and the max-pool for one 3x3 stride-1
convolution, as trajSSL's code does for its 32 px renders; a 32 px input then gives layer3 8x8 and layer4 4x4 maps.
Weights start random (ImageNet weights cannot be downloaded here); ``weights=PATH`` loads a local torchvision
state dict (the first convolution is skipped when the stem differs).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.errors import ViewsslError

log = logging.getLogger("viewssl.trajssl.encoders")

TAPS = ("layer2", "layer3", "layer4", "pooled")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

__all__ = ["TAPS", "ResNetEncoder", "tap_vector", "build_encoder"]


def tap_vector(feature: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """One tap as a (B, D) vector: a feature map (B, C, H, W) is average-pooled to at most ``grid`` x ``grid`` cells
    and flattened (C * min(H, grid) * min(W, grid) dims); a (B, D) vector is returned as it is."""
    if feature.ndim == 2:
        return feature
    h, w = feature.shape[-2:]
    if h > grid or w > grid:
        feature = F.adaptive_avg_pool2d(feature, (min(h, grid), min(w, grid)))
    return feature.flatten(1)


class ResNetEncoder(nn.Module):
    """torchvision ResNet-18 trunk returning a dict of taps. ``forward(images, taps=("pooled",))``."""

    feat_dim = 512

    def __init__(self, arch: str = "resnet18", small_stem: bool = True, weights: str | None = None):
        super().__init__()
        if arch != "resnet18":
            raise ViewsslError(f"--arch {arch!r}: only resnet18 is available")
        net = torchvision.models.resnet18(weights=None)
        if weights:
            self._load_weights(net, weights, small_stem)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load_weights(net: nn.Module, path: str, small_stem: bool) -> None:
        from common.io import load_checkpoint

        state = load_checkpoint(path)
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.") and not (small_stem and k == "conv1.weight")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.") and k != "conv1.weight"]
        if missing or unexpected:
            raise ViewsslError(f"not a torchvision resnet18 state dict (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})", path)
        log.info("loaded backbone weights from %s", path)

    def forward(self, images: torch.Tensor, taps: Sequence[str] = ("pooled",)) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> {tap: (B, C, h, w) map or (B, 512) for ``pooled``}."""
        unknown = [t for t in taps if t not in TAPS]
        if unknown:
            raise ViewsslError(f"unknown feature tap(s) {', '.join(unknown)} (available: {', '.join(TAPS)})")
        x = self.stem((images - self.mean) / self.std)
        out: dict[str, torch.Tensor] = {}
        x = self.layer2(self.layer1(x))
        out["layer2"] = x
        if not any(t in taps for t in ("layer3", "layer4", "pooled")):
            return {t: out[t] for t in taps}
        x = self.layer3(x)
        out["layer3"] = x
        if "layer4" in taps or "pooled" in taps:
            x = self.layer4(x)
            out["layer4"] = x
            out["pooled"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return {t: out[t] for t in taps}


def build_encoder(config: dict) -> ResNetEncoder:
    return ResNetEncoder(arch=config.get("arch", "resnet18"), small_stem=bool(config.get("small_stem", True)),
                         weights=config.get("weights") or None)
