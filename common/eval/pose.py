"""Viewpoint errors (raw and SSV's calibrated protocol) and absolute pose by kNN.

Angles are radians inside; every figure returned here is in **degrees** (accuracies are fractions in [0, 1]).

- :func:`viewpoint_errors`: per-angle MAE with wrap-around (359 deg vs 1 deg is 2 deg), their mean (the SSV
  paper's "MAE"), the median geodesic error and Acc@pi/6 (share of geodesic errors < 30 deg; the PASCAL3D+ metrics).
- :func:`calibrated_viewpoint_errors`: SSV's protocol (``test_vpnet.py``): per angle a 1-D least-squares map
  ``gt ~ slope * pred + intercept`` is fitted on a seeded calibration subset of the frames and the errors are
  reported on the **disjoint** rest. A self-supervised model picks its own zero, sign and scale per axis; this fit
  removes them (using labels, so it is not the standard protocol). The fit is a straight line, as SSV's, on the raw
  radians, or on the predictions unwrapped with the cut in the widest gap between them on the calibration frames
  (:func:`prediction_center`, ``center_<angle>``), whichever it maps better there: a model whose zero puts the
  +-180 deg cut of its predictions inside the labelled range (e.g. zero at 180 deg with the sign reversed, which the
  mirror symmetry allows as well as zero at 0) is mapped as well as one whose zero is at 0, where SSV's fit on the
  raw wrapped radians is not (a near-exact model scored at the "predict the mean" floor). A line suits angles that
  stay within +-180 deg of each other (heads, limited azimuth ranges). An angle
  whose labels span more than 270 deg (:data:`CIRCULAR_SPAN`: objects seen from all around) would wrap inside any
  model's predictions, so it gets a circular fit instead: the sign (+1 or -1) and the offset (circular mean of
  ``gt - sign * pred``) with the smaller wrapped error on the calibration frames. The choice is made on all the
  frames' labels (a property of the dataset, not of the calibration draw); ``fit_<angle>`` says which fit each
  angle got. Head datasets (yaw within +-100 deg) keep SSV's linear fit.
- :func:`evaluate_viewpoints`: both protocols, each result dict naming its protocol.
- :func:`knn_pose`: the trajectory paper's absolute-pose kNN (discrete viewpoint index as class) plus the geodesic
  error of the retrieved viewpoint.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..geometry import angles_to_matrix, angular_difference, geodesic_distance, wrap_angle
from .knn import knn_classify

__all__ = [
    "VIEWPOINT_KEYS",
    "viewpoint_errors",
    "circular_fit",
    "circular_angles",
    "fit_angle_calibration",
    "apply_angle_calibration",
    "prediction_center",
    "unwrap_around",
    "calibration_split",
    "calibrated_predictions",
    "calibrated_viewpoint_errors",
    "evaluate_viewpoints",
    "geodesic_errors_deg",
    "geodesic_summary",
    "chordal_mean",
    "knn_pose",
]

VIEWPOINT_KEYS = ("azimuth_mae", "elevation_mae", "tilt_mae", "mae", "median_geodesic", "acc_pi_6")
ANGLE_NAMES = ("azimuth", "elevation", "tilt")
#: an angle whose labels span more than this (radians, 270 deg) is calibrated on the circle
CIRCULAR_SPAN = 1.5 * math.pi


def _angles(x, name: str) -> torch.Tensor:
    """(N, 3) float64 on the CPU: these figures are small reductions, on whatever device the angles came from."""
    t = torch.as_tensor(x).detach().cpu()
    if not t.dtype.is_floating_point:
        t = t.double()
    t = t.to(torch.float64)
    if t.dim() != 2 or t.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3) (azimuth, elevation, tilt) radians, got {tuple(t.shape)}")
    return t


def _median(x: torch.Tensor) -> float:
    """Median with the mean of the two middle values for even counts (numpy's convention, not torch.median's)."""
    return float(torch.quantile(x.double(), 0.5)) if x.numel() else math.nan


def _share_below(x: torch.Tensor, threshold: float) -> float:
    """Share of ``x`` strictly below ``threshold``; NaN when ``x`` is empty or holds a NaN (as its mean and median:
    an unknown error is neither a hit nor a miss)."""
    return float((x < threshold).double().mean()) if x.numel() and not x.isnan().any() else math.nan


def geodesic_errors_deg(pred_rot: torch.Tensor, true_rot: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations in degrees; (N, 3, 3) x (N, 3, 3) -> (N,) float64."""
    return torch.rad2deg(geodesic_distance(pred_rot.double(), true_rot.double()))


def geodesic_summary(errors_deg: torch.Tensor, threshold_deg: float = 30.0, prefix: str = "") -> dict[str, float]:
    """``{median_geodesic, mean_geodesic, acc_30}`` of geodesic errors in degrees (acc: share strictly below the
    threshold; the key is named after it)."""
    e = errors_deg.double().flatten()
    acc_key = f"acc_{threshold_deg:g}".replace(".", "_")
    return {
        f"{prefix}median_geodesic": _median(e),
        f"{prefix}mean_geodesic": float(e.mean()) if e.numel() else math.nan,
        f"{prefix}{acc_key}": _share_below(e, threshold_deg),
    }


def viewpoint_errors(pred_angles, true_angles) -> dict[str, float]:
    """(N, 3) predicted and true (azimuth, elevation, tilt) in radians -> dict of floats.

    Keys: ``azimuth_mae, elevation_mae, tilt_mae`` (degrees, wrap-around), ``mae`` (their mean),
    ``median_geodesic`` (degrees, geodesic angle between the two rotations R = R_y(az) R_x(el) R_z(tilt)) and
    ``acc_pi_6`` (fraction of geodesic errors < pi/6).
    """
    pred, true = _angles(pred_angles, "pred_angles"), _angles(true_angles, "true_angles")
    if pred.shape != true.shape:
        raise ValueError(f"pred_angles {tuple(pred.shape)} and true_angles {tuple(true.shape)} differ in shape")
    if pred.shape[0] == 0:
        raise ValueError("viewpoint_errors needs at least one frame")
    per_angle = torch.rad2deg(angular_difference(pred, true)).mean(dim=0)
    geo = torch.rad2deg(
        geodesic_distance(angles_to_matrix(*pred.unbind(-1)), angles_to_matrix(*true.unbind(-1)))
    )
    out = {f"{name}_mae": float(per_angle[i]) for i, name in enumerate(ANGLE_NAMES)}
    out["mae"] = float(per_angle.mean())
    out["median_geodesic"] = _median(geo)
    out["acc_pi_6"] = _share_below(geo, 30.0)
    return out


def circular_fit(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(sign, offset) of ``true ~ sign * pred + offset`` on the circle: per sign, the offset is the circular mean of
    ``true - sign * pred``; the sign with the smaller mean wrapped error wins (ties: +1)."""
    best = None
    for sign in (1.0, -1.0):
        d = true - sign * pred
        offset = float(np.arctan2(np.sin(d).mean(), np.cos(d).mean()))
        err = float(np.abs(np.angle(np.exp(1j * (d - offset)))).mean())
        if best is None or err < best[0] - 1e-12:
            best = (err, sign, offset)
    return best[1], best[2]


def circular_angles(true_angles) -> list[bool]:
    """Per angle, whether its labels cover more than :data:`CIRCULAR_SPAN` of the circle (then it is calibrated on
    the circle): 2 pi minus the widest gap between them, so labels written in [0, 2 pi) or in (-pi, pi] agree."""
    t = _angles(true_angles, "true_angles")
    if t.shape[0] == 0:
        return [False] * 3
    gap, _ = _widest_gaps(t)
    return [bool(2 * math.pi - float(gap[j]) > CIRCULAR_SPAN) for j in range(3)]


def fit_angle_calibration(pred_angles, true_angles, circular=None, return_kinds: bool = False):
    """Per angle, least squares ``true ~ slope * pred + intercept`` on raw radians; -> (slope (3,), intercept (3,)),
    and with ``return_kinds`` the list of fits (``"linear"`` or ``"circular"``).

    A constant prediction (no spread) gets slope 0 and the mean of ``true`` as intercept. The angles flagged in
    ``circular`` (3 bools; default: :func:`circular_angles` of ``true_angles``) get :func:`circular_fit` (slope = its
    sign, intercept = its offset).
    """
    pred, true = _angles(pred_angles, "pred_angles").numpy(), _angles(true_angles, "true_angles").numpy()
    if pred.shape[0] < 2:
        raise ValueError("the calibration fit needs at least 2 frames")
    circular = circular_angles(true_angles) if circular is None else list(circular)
    slope, intercept, kinds = np.zeros(3), np.zeros(3), []
    label_center = prediction_center(true)
    for j in range(3):
        p, t = pred[:, j], true[:, j]
        if circular[j]:
            slope[j], intercept[j] = circular_fit(p, t)
            kinds.append("circular")
            continue
        # the labels as one run of numbers (150..210 deg, not 150..180 and -180..-150): they may be written either way
        t = t + 2 * math.pi * np.round((float(label_center[j]) - t) / (2 * math.pi))  # whole turns: others unchanged
        pc = p - p.mean()
        denom = float(pc @ pc)
        slope[j] = float(pc @ (t - t.mean())) / denom if denom > 1e-24 else 0.0
        intercept[j] = t.mean() - slope[j] * p.mean()
        kinds.append("linear")
    fit = torch.from_numpy(slope), torch.from_numpy(intercept)
    return (*fit, kinds) if return_kinds else fit


def prediction_center(pred_angles) -> torch.Tensor:
    """Per angle, the point of the circle opposite the middle of the widest gap between the predictions: (N, 3)
    radians -> (3,) float64. Unwrapped around it (:func:`unwrap_around`), predictions that wrap across +-pi inside
    their own range become one run of numbers again, and predictions that do not wrap stay as they are."""
    p = _angles(pred_angles, "pred_angles")
    if p.shape[0] == 0:
        return torch.zeros(3, dtype=torch.float64)
    _, middle = _widest_gaps(p)
    return wrap_angle(middle + math.pi)


def _widest_gaps(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per angle of (N >= 1, 3) radians, the widest gap between consecutive values around the circle and its middle:
    two (3,) float64 tensors (radians; the middle in [0, 3 pi))."""
    p = torch.remainder(angles, 2 * math.pi)
    gap, middle = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for j in range(3):
        a = torch.sort(p[:, j]).values
        gaps = torch.diff(torch.cat([a, a[:1] + 2 * math.pi]))  # the gap after each value, around the circle
        i = int(torch.argmax(gaps))
        gap[j], middle[j] = gaps[i], a[i] + gaps[i] / 2
    return gap, middle


def unwrap_around(pred_angles, center: torch.Tensor) -> torch.Tensor:
    """``center + wrap(pred - center)`` per angle: the same angles, as radians within +-pi of ``center`` (N, 3)."""
    p = _angles(pred_angles, "pred_angles")
    return center + wrap_angle(p - center)


def apply_angle_calibration(pred_angles, slope: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """``slope * pred + intercept`` per angle: (N, 3) float64 on the CPU, whatever device ``pred_angles`` is on."""
    return _angles(pred_angles, "pred_angles") * slope.detach().cpu().double() + intercept.detach().cpu().double()


def calibration_split(n: int, fraction: float = 0.1, seed: int = 0, count: int | None = None):
    """Seeded disjoint split of ``range(n)`` -> (calibration indices, scored indices), both sorted int64.

    The calibration size is ``count`` if given, else ``round(fraction * n)``, clamped to [2, n - 1].
    """
    if n < 3:
        raise ValueError(f"the calibrated protocol needs at least 3 frames, got {n}")
    size = int(count) if count is not None else int(round(float(fraction) * n))
    size = min(max(size, 2), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:size].sort().values, perm[size:].sort().values


def calibrated_predictions(
    pred_angles, true_angles, fraction: float = 0.1, seed: int = 0, count: int | None = None
) -> dict:
    """SSV's calibration map, fitted on a seeded calibration subset and applied to every frame (the protocol of
    :func:`calibrated_viewpoint_errors`, which scores it on the other frames).

    Per angle the fit is made on the raw predictions or on the predictions unwrapped around
    :func:`prediction_center` of the calibration frames, whichever it maps with the smaller error there (the module
    docstring says why). Returns ``mapped`` (N, 3) float64 radians, ``calibration`` and ``scored`` (the two index
    sets), ``pred`` (the predictions the fit was made on: raw or unwrapped per angle), ``slope``, ``intercept``
    (3,), ``center`` (3,) and ``unwrapped`` (3 bools: where ``pred`` is unwrapped around ``center``), ``kinds``.
    """
    raw, true = _angles(pred_angles, "pred_angles"), _angles(true_angles, "true_angles")
    cal, scored = calibration_split(raw.shape[0], fraction, seed, count)
    circular = circular_angles(true)
    center = prediction_center(raw[cal])
    # per angle, the raw predictions (SSV's) or the unwrapped ones, whichever the fit maps better on the calibration
    # frames (the raw ones on a tie): a model whose outputs are not wrapped, and spread beyond 2 pi, keeps them raw
    fits = []
    for pred in (raw, unwrap_around(raw, center)):
        slope, intercept, kinds = fit_angle_calibration(pred[cal], true[cal], circular, return_kinds=True)
        mapped = apply_angle_calibration(pred[cal], slope, intercept)
        fits.append((pred, slope, intercept, kinds, angular_difference(mapped, true[cal]).mean(0)))
    unwrapped = [bool(fits[1][4][j] < fits[0][4][j] - 1e-12) for j in range(3)]  # not on a rounding difference
    pick = torch.tensor(unwrapped)
    pred = torch.where(pick, fits[1][0], fits[0][0])
    slope, intercept = torch.where(pick, fits[1][1], fits[0][1]), torch.where(pick, fits[1][2], fits[0][2])
    return {"mapped": apply_angle_calibration(pred, slope, intercept), "calibration": cal, "scored": scored,
            "pred": pred, "slope": slope, "intercept": intercept, "center": center, "unwrapped": unwrapped,
            "kinds": fits[0][3]}


def calibrated_viewpoint_errors(
    pred_angles, true_angles, fraction: float = 0.1, seed: int = 0, count: int | None = None
) -> dict:
    """SSV's protocol: :func:`viewpoint_errors` on the frames outside a seeded calibration subset, after mapping the
    predictions with the per-angle linear fit made on that subset (:func:`calibrated_predictions`).

    Returns the :data:`VIEWPOINT_KEYS` plus ``protocol="calibrated"``, ``n_calibration``, ``n_scored``, ``seed``,
    ``fraction``, ``slope_<angle>``, ``intercept_<angle>`` (radians), ``center_<angle>`` (radians; None where the raw
    predictions were kept), ``fit_<angle>`` and ``uncalibrated_mae`` (the raw MAE on the same scored frames, for
    comparison).
    """
    c = calibrated_predictions(pred_angles, true_angles, fraction, seed, count)
    true, cal, scored = _angles(true_angles, "true_angles"), c["calibration"], c["scored"]
    out: dict = viewpoint_errors(c["mapped"][scored], true[scored])
    out["uncalibrated_mae"] = viewpoint_errors(c["pred"][scored], true[scored])["mae"]
    out.update(protocol="calibrated", n_calibration=int(cal.numel()), n_scored=int(scored.numel()), seed=int(seed),
               fraction=float(cal.numel()) / c["pred"].shape[0])
    for j, name in enumerate(ANGLE_NAMES):
        out[f"slope_{name}"] = float(c["slope"][j])
        out[f"intercept_{name}"] = float(c["intercept"][j])
        out[f"center_{name}"] = float(c["center"][j]) if c["unwrapped"][j] else None
        out[f"fit_{name}"] = c["kinds"][j]
    return out


def evaluate_viewpoints(pred_angles, true_angles, fraction: float = 0.1, seed: int = 0, count: int | None = None):
    """Both protocols: ``{"raw": {...keys, protocol: "raw", n}, "calibrated": {...}}`` (calibrated is omitted with
    fewer than 3 frames)."""
    pred, true = _angles(pred_angles, "pred_angles"), _angles(true_angles, "true_angles")
    result: dict = {"raw": {**viewpoint_errors(pred, true), "protocol": "raw", "n": int(pred.shape[0])}}
    if pred.shape[0] >= 3:
        result["calibrated"] = calibrated_viewpoint_errors(pred, true, fraction, seed, count)
    return result


def chordal_mean(rotations: torch.Tensor) -> torch.Tensor:
    """Chordal L2 mean of rotations (N, 3, 3) -> (3, 3): the rotation closest to their arithmetic mean (SVD)."""
    m = rotations.double().mean(dim=0)
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return u @ fix @ vh


def knn_pose(
    train_features: torch.Tensor,
    train_views: torch.Tensor,
    train_rotations: torch.Tensor,
    query_features: torch.Tensor,
    query_rotations: torch.Tensor,
    query_views: torch.Tensor | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    train_groups=None,
    query_groups=None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Absolute pose by weighted kNN over discrete viewpoint indices (one category's gallery and queries).

    The predicted index's viewpoint is the chordal mean of the gallery rotations carrying that index (for rendered
    Fibonacci views all copies are equal, so it is that rotation). Queries left without any admissible neighbour
    (all excluded by the groups) are not scored. Returns ``(figures, correct (M',) bool or empty, geodesic errors
    (M',) degrees)`` over the M' scored queries; figures: ``acc`` (exact index; only when ``query_views`` is given,
    over the scored queries whose view is known, >= 0; a train view < 0 is a row the caller should have left out),
    ``median_geodesic``, ``mean_geodesic``, ``acc_30``, ``n_queries`` (M').
    """
    device = query_features.device
    views = torch.as_tensor(train_views, device=device).long()
    if views.numel() == 0:
        raise ValueError("knn_pose: the gallery is empty")
    n_views = int(views.max()) + 1
    pred = knn_classify(train_features, views, query_features, k=k, temperature=temperature, num_classes=n_views,
                        train_groups=train_groups, query_groups=query_groups)
    train_rot = train_rotations.to(device=device, dtype=torch.float64)
    reps = torch.eye(3, dtype=torch.float64, device=device).repeat(n_views, 1, 1)
    for v in views.unique().tolist():
        if v >= 0:
            reps[v] = chordal_mean(train_rot[views == v])
    valid = pred >= 0  # queries with at least one admissible neighbour
    pred_rot = reps[pred.clamp_min(0)]
    errors = geodesic_errors_deg(pred_rot, query_rotations.to(device=device, dtype=torch.float64))[valid]
    figures = geodesic_summary(errors)
    correct = torch.zeros(0, dtype=torch.bool, device=device)
    if query_views is not None:
        q_views = torch.as_tensor(query_views, device=device).long()
        correct = (pred == q_views)[valid & (q_views >= 0)]
        figures = {"acc": float(correct.double().mean()) if correct.numel() else math.nan, **figures}
    figures["n_queries"] = float(valid.sum())
    return figures, correct, errors
