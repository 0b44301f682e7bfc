"""A trained encoder as a :class:`common.eval` PoseModel (family ``encoder``), registered at import.

``load_encoder_model(ckpt, device)`` rebuilds the backbone from the checkpoint's config and weights. Its features
are the taps ``pooled`` (512-d), ``layer3`` and ``layer4`` (maps average-pooled to at most ``tap_grid`` x
``tap_grid`` cells and flattened; see :func:`trajssl.encoders.tap_vector`). It has no pose head:
``predict_angles`` returns None, and pose is read from features by the evaluation module (kNN, probes).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.errors import ViewsslError, error_summary
from common.eval import register_family
from common.eval.models import MALFORMED, malformed
from common.training import eval_mode

from .encoders import TAPS, build_encoder, tap_vector

EVAL_TAPS = ["pooled", "layer3", "layer4"]

__all__ = ["EncoderPoseModel", "load_encoder_model", "EVAL_TAPS"]


class EncoderPoseModel:
    """PoseModel protocol for a Siamese encoder: ``features(images, taps)`` -> {tap: (B, D)}; no angle head."""

    family = "encoder"

    def __init__(self, encoder: torch.nn.Module, input_size: int, tap_grid: int, device: torch.device,
                 config: dict | None = None, batch_size: int = 256):
        self.encoder = encoder.to(device).eval()
        self.input_size = int(input_size)
        self.tap_grid = int(tap_grid)
        self.device = torch.device(device)
        self.config = dict(config or {})
        self.batch_size = batch_size
        self.taps = list(EVAL_TAPS)

    def predict_angles(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def features(self, images: torch.Tensor, taps: Sequence[str] = ("pooled",)) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> {tap: (B, D) float32 on the model's device}."""
        unknown = [t for t in taps if t not in TAPS]
        if unknown:
            raise ViewsslError(f"unknown feature tap(s) {', '.join(unknown)} for an encoder "
                               f"(available: {', '.join(self.taps)})")
        outs: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
        with eval_mode(self.encoder):
            for i in range(0, len(images), self.batch_size):
                x = images[i:i + self.batch_size].to(self.device, torch.float32)
                if x.shape[-2:] != (self.input_size, self.input_size):
                    x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
                f = self.encoder(x, taps=tuple(taps))
                for t in taps:
                    outs[t].append(tap_vector(f[t], self.tap_grid).float())
        return {t: torch.cat(v) if v else torch.empty(0, device=self.device) for t, v in outs.items()}


def load_encoder_model(ckpt: dict, device: torch.device) -> EncoderPoseModel:
    """Build the PoseModel from a loaded ``encoder`` checkpoint dict."""
    config = ckpt.get("config") or {}
    try:
        state = ckpt["modules"]["encoder"]
    except (KeyError, TypeError):
        raise ViewsslError("encoder checkpoint has no 'encoder' weights") from None
    try:
        encoder = build_encoder({**config, "weights": None})
        size, grid = int(config.get("image_size", 32)), int(config.get("tap_grid", 4))
    except MALFORMED as e:
        raise malformed("encoder", e) from e
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise ViewsslError(f"encoder weights do not match the checkpoint's config ({error_summary(e)})") from e
    except MALFORMED as e:
        raise malformed("encoder", e) from e
    return EncoderPoseModel(encoder, size, grid, device, config)


register_family("encoder", load_encoder_model)
