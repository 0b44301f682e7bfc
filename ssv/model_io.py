"""SSV as a :class:`common.eval` PoseModel: ``predict_angles`` decodes V's viewpoint heads, ``features`` are V's trunk.

Importing this module registers the family ``"ssv"`` with ``common.eval.register_family``, so
``common.eval.load_model(run_dir_or_ckpt)`` can open SSV checkpoints, including the supervised baseline's (same V,
family "ssv").

Also here: :func:`predict_dataset`, V's angles and the labels of a dataset (the errors are ``common.eval``'s).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ViewsslError, error_summary
from common.eval import register_family
from common.eval.models import MALFORMED, malformed
from common.training import eval_mode

from .networks import build_viewpoint, to_model_range

__all__ = ["SSVPoseModel", "load_pose_model", "predict_dataset"]


class SSVPoseModel:
    """V wrapped for evaluation. Images are (B, 3, H, W) in [0, 1]; they are resized to ``input_size`` if needed.

    taps: ``block<i>`` (trunk block i, global-average-pooled to (B, C_i)) and ``pooled`` (the trunk's feature vector).
    """

    family = "ssv"

    def __init__(self, V: torch.nn.Module, config: dict, device: torch.device | str = "cpu"):
        self.V = V
        self.config = config
        self.device = torch.device(device)
        self.input_size = int(config["image_size"])
        self.taps = list(V.tap_names)
        self.supervised = bool(config.get("supervised", False))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return to_model_range(images)

    @torch.no_grad()
    def predict_angles(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3) (azimuth, elevation, tilt) radians, in V's own frame."""
        with eval_mode(self.V):
            out = self.V(self._prepare(images))
            return self.V.decode(out["view"])

    @torch.no_grad()
    def features(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        unknown = [t for t in taps if t not in self.taps]
        if unknown:
            raise ViewsslError(f"unknown feature tap(s) {', '.join(unknown)} for an SSV model "
                               f"(has {', '.join(self.taps)})")
        with eval_mode(self.V):
            _, maps = self.V.trunk(self._prepare(images), taps=True)
        return {t: maps[t] if maps[t].dim() == 2 else maps[t].mean(dim=(2, 3)) for t in taps}


def load_pose_model(ckpt: dict, device: torch.device | str = "cpu", ema: bool = False) -> SSVPoseModel:
    """Family loader: a checkpoint dict (``common.training`` layout) -> :class:`SSVPoseModel` in eval mode.

    ``ema``: V_ema, the moving average of V's weights (``v_ema_decay``), instead of V."""
    config = ckpt.get("config") or {}
    if ckpt.get("family", "ssv") != "ssv":
        raise ViewsslError(f"is a {ckpt.get('family')!r} checkpoint, not 'ssv'")
    name = "V_ema" if ema else "V"
    try:
        V = build_viewpoint(config)
        state = (ckpt.get("modules") or {}).get(name)
    except KeyError as e:
        raise ViewsslError(f"SSV checkpoint config lacks {e.args[0]!r}") from None
    except MALFORMED as e:
        raise malformed("ssv", e) from e
    if state is None:
        if ema:
            raise ViewsslError("SSV checkpoint has no V_ema (the run kept no EMA of V: v_ema_decay 0, or written "
                               "before it existed)")
        raise ViewsslError("SSV checkpoint has no viewpoint network 'V'")
    try:
        V.load_state_dict(state)
    except RuntimeError as e:
        raise ViewsslError(f"SSV checkpoint's {name} does not match its config ({error_summary(e)})") from None
    except MALFORMED as e:
        raise malformed("ssv", e) from e
    V.to(device).eval()
    return SSVPoseModel(V, config, device)


register_family("ssv", load_pose_model)


@torch.no_grad()
def predict_dataset(model, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and labelled angles of a dataset: two (N, 3) float64 arrays, radians."""
    preds, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it["image"] for it in items])
        preds.append(model.predict_angles(images).double().cpu())
        labels.append(torch.stack([torch.as_tensor(it["angles"]) for it in items]).double())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()
