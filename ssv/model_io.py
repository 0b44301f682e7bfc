"""SSV as a :class:`common.eval` PoseModel: ``predict_angles`` decodes V's viewpoint heads, ``features`` are V's trunk.

Importing this module registers the family ``"ssv"`` with ``common.eval.register_family`` (when the evaluation module
provides it), so ``common.eval.load_model(run_dir_or_ckpt)`` can open SSV checkpoints, including the supervised
baseline's (same V, family "ssv").

Also here: :func:`predict_dataset` and :func:`angle_errors`, the raw and calibrated angle errors the SSV experiment
reports (the paper's protocol fits, per angle, a 1-D linear map from predicted to true angle on a labelled subset).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ViewsslError

from .networks import build_viewpoint, to_model_range

log = logging.getLogger("viewssl.ssv.model_io")

__all__ = ["SSVPoseModel", "load_pose_model", "predict_dataset", "angle_errors", "ANGLE_NAMES"]

ANGLE_NAMES = ("azimuth", "elevation", "tilt")


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
        was = self.V.training
        self.V.eval()
        try:
            out = self.V(self._prepare(images))
            return self.V.decode(out["view"])
        finally:
            self.V.train(was)

    @torch.no_grad()
    def features(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        unknown = [t for t in taps if t not in self.taps]
        if unknown:
            raise ViewsslError(f"unknown feature tap(s) {', '.join(unknown)} for an SSV model (has {', '.join(self.taps)})")
        was = self.V.training
        self.V.eval()
        try:
            _, maps = self.V.trunk(self._prepare(images), taps=True)
        finally:
            self.V.train(was)
        return {t: maps[t] if maps[t].dim() == 2 else maps[t].mean(dim=(2, 3)) for t in taps}


def load_pose_model(ckpt: dict, device: torch.device | str = "cpu") -> SSVPoseModel:
    """Family loader: a checkpoint dict (``common.training`` layout) -> :class:`SSVPoseModel` in eval mode."""
    config = ckpt.get("config") or {}
    if ckpt.get("family", "ssv") != "ssv":
        raise ViewsslError(f"is a {ckpt.get('family')!r} checkpoint, not 'ssv'")
    try:
        V = build_viewpoint(config)
    except KeyError as e:
        raise ViewsslError(f"SSV checkpoint config lacks {e.args[0]!r}") from None
    state = (ckpt.get("modules") or {}).get("V")
    if state is None:
        raise ViewsslError("SSV checkpoint has no viewpoint network 'V'")
    try:
        V.load_state_dict(state)
    except RuntimeError as e:
        raise ViewsslError(f"SSV checkpoint's V does not match its config ({str(e).splitlines()[0][:160]})") from None
    V.to(device).eval()
    return SSVPoseModel(V, config, device)


def _register() -> None:
    try:
        from common.eval import register_family
    except ImportError:
        log.debug("common.eval.register_family not available yet; family 'ssv' not registered")
        return
    register_family("ssv", load_pose_model)


_register()


# ---------------------------------------------------------------------------------------------------- metrics
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


def _wrap(x: np.ndarray) -> np.ndarray:
    return (x + math.pi) % (2 * math.pi) - math.pi


def angle_errors(model_or_pred, dataset_or_gt, calib_every: int = 5, batch_size: int = 64) -> dict[str, float]:
    """Raw and calibrated mean absolute angle errors in degrees.

    Either (model, dataset) or (pred (N, 3), gt (N, 3)) in radians. ``raw_mae_<angle>``: |wrap(pred - gt)| over all
    items. ``cal_mae_<angle>``: the release's protocol -- per angle, a least-squares line gt ~ a * pred + b fitted on
    every ``calib_every``-th item (items 0, k, 2k, ...), the MAE measured on the other items. Before the fit each
    predicted angle is re-centred on its circular mean over the calibration items, so a learned frame whose zero lies
    near +-180 deg does not wrap. ``*_mean`` averages the three angles.
    """
    if isinstance(model_or_pred, np.ndarray):
        pred, gt = np.asarray(model_or_pred, np.float64), np.asarray(dataset_or_gt, np.float64)
    else:
        pred, gt = predict_dataset(model_or_pred, dataset_or_gt, batch_size)
    n = len(pred)
    calib = np.zeros(n, dtype=bool)
    calib[::calib_every] = True
    if calib.sum() < 2 or (~calib).sum() < 1:
        raise ViewsslError(f"need at least {2 * calib_every} labelled images for calibrated errors, got {n}")
    out: dict[str, float] = {}
    for j, name in enumerate(ANGLE_NAMES):
        out[f"raw_mae_{name}"] = float(np.degrees(np.abs(_wrap(pred[:, j] - gt[:, j]))).mean())
        centre = math.atan2(np.sin(pred[calib, j]).mean(), np.cos(pred[calib, j]).mean())
        p = _wrap(pred[:, j] - centre)
        A = np.stack([p[calib], np.ones(calib.sum())], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, gt[calib, j], rcond=None)
        fitted = a * p[~calib] + b
        out[f"cal_mae_{name}"] = float(np.degrees(np.abs(_wrap(fitted - gt[~calib, j]))).mean())
        out[f"cal_slope_{name}"] = float(a)
    out["raw_mae_mean"] = float(np.mean([out[f"raw_mae_{a}"] for a in ANGLE_NAMES]))
    out["cal_mae_mean"] = float(np.mean([out[f"cal_mae_{a}"] for a in ANGLE_NAMES]))
    return out
