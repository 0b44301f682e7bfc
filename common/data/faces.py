"""Real head-pose datasets: 300W-LP, AFLW2000(-3D) and BIWI Kinect Head Pose, with SSV's face crop.

Face crop (SSV, ``extern/transformImage.py`` + ``prepare_lmdb.py``)
-------------------------------------------------------------------
SSV crops faces from its detector's five points (eye centres, mouth corners)::

    eye_avg = (eye_left + eye_right) / 2            eye_to_eye   = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) / 2      eye_to_mouth = mouth_avg - eye_avg
    centre = eye_avg + 0.1 * eye_to_mouth           side = max(3 |eye_to_eye|, 2.7 |eye_to_mouth|)

(its 256-px crop of half-side max(2 |e2e|, 1.8 |e2m|), then the central 192 px), axis-aligned (in-plane roll stays in
the data), reflect-padded when the square leaves the image. From 68 landmarks the eye centres are the means of points
36-41 and 42-47 and the mouth corners are points 48 and 54. SSV also blurs the reflected margin; we only reflect.

Angles (``angles="viewssl"``, the default)
------------------------------------------
Returned in the project's convention (``common/data/synthetic/render.py``): object frame y up, +z the face's front,
OpenGL camera (x right, y up, z towards the viewer), R = R_y(azimuth) R_x(elevation) R_z(tilt) maps head to camera.
azimuth is the yaw-like angle (positive turns the face to the image right), elevation the pitch-like one (positive
lowers the chin), tilt the roll-like one (positive turns the head counter-clockwise in the image); the exact
rotation of the dataset is converted with :func:`common.geometry.matrix_to_angles`, not the raw numbers relabelled.

- 300W-LP / AFLW2000 store ``Pose_Para = [pitch, yaw, roll, tx, ty, tz, scale]`` (radians) of 3DDFA, whose rotation
  is R = Rx(pitch)^T Ry(yaw)^T Rz(roll)^T with the standard elementary rotations, applied to the Basel Face Model
  (x right, y up, z towards the viewer), image y flipped: the same frames as ours. So R_viewssl = Rx(-pitch)
  Ry(-yaw) Rz(-roll), and for small angles (azimuth, elevation, tilt) ~ (-yaw, -pitch, -roll): 300W-LP's positive
  yaw turns the face to the image left, positive pitch raises the chin, positive roll turns the head clockwise.
- BIWI stores, per frame, R_pose (head -> depth camera) and the head centre; ``rgb.cal`` holds the RGB camera's
  intrinsics, distortion and extrinsic (R_cal, t_cal), with x_rgb = R_cal^T (x_depth - t_cal) (the map SSV's
  preprocessing applies to the head centre), so R_rgb = R_cal^T R_pose (SSV composed R_pose @ R_cal, inconsistent with
  its own centre; ``angles="dataset"`` keeps that to reproduce its labels). BIWI's camera is OpenCV's (x right, y
  down, z forward, away from the viewer) and its head frame at identity faces the camera with y down; both differ from
  ours by D = diag(1, -1, -1), so R_viewssl = D R_rgb D. (Checked on SSV's demo frame 00442: R_pose ~ R_y(+58 deg)
  with the face turned to the image left, giving azimuth ~ -58 deg.)

``angles="dataset"`` returns the dataset's own numbers instead, as (azimuth, elevation, tilt) = (yaw, pitch, roll):
300W-LP / AFLW2000 the Pose_Para values (what Hopenet-style tables report), BIWI the components (y, x, z) of the
rotation vector ``cv2.Rodrigues(R_pose @ R_cal)``, which is what SSV evaluated against (ssv.md 3.2: not Euler
angles).

BIWI face boxes: ``detector="auto" | "face-alignment" | "haar" | "center"``
---------------------------------------------------------------------------
- ``face-alignment``: the ``face_alignment`` package's FAN (68 landmarks, SFD detector), only when both weight files
  are already in torch's hub cache (``<torch.hub.get_dir()>/checkpoints``); never downloaded. Crop as above.
- ``haar``: OpenCV's frontal-face Haar cascade from ``cv2.data.haarcascades`` (opencv-python < 5; OpenCV 5 dropped
  ``cv2.CascadeClassifier``). Square of side 1.2 x the detection's width about its centre (approximate).
- ``center``: a square of ``box_mm`` (default 230 mm) at the head's depth about the head centre projected into the
  RGB image, moved ``box_down_mm`` (25 mm) down (chosen by eye on SSV's three demo frames to frame forehead to chin).
- ``auto``: the first available of the three. The choice and the reason are logged once per dataset. When a
  detector finds no face, the ``center`` box is used for that frame, logged (first time) and counted
  (``dataset.fallbacks``). Among several faces the one nearest the projected head centre is used (BIWI frames can
  show a second person).
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ViewsslError, error_summary
from ..geometry import axis_rotation, matrix_to_angles
from ..io import opencv
from .folders import ImageItems, _ids, _inside_only, list_images, load_rgb, natural_key

log = logging.getLogger("viewssl.data.faces")

__all__ = [
    "face_box_from_points", "face_box_from_landmarks", "square_origin", "crop_square", "pose_para_to_angles",
    "read_pose_mat",
    "FaceMatFolder", "W300LP", "AFLW2000", "read_biwi_calibration", "read_biwi_pose", "biwi_rotation_to_angles",
    "BIWI", "DETECTORS", "resolve_detector", "face_alignment_weights", "haar_cascade",
]

ANGLE_MODES = ("viewssl", "dataset")


# --------------------------------------------------------------------------------------------------------------------
# Face box and crop
# --------------------------------------------------------------------------------------------------------------------

def face_box_from_points(eye_left, eye_right, mouth_left, mouth_right) -> tuple[float, float, float]:
    """SSV's square from five-point-style landmarks (pixels): returns (centre x, centre y, side)."""
    eye_left, eye_right = np.asarray(eye_left, float), np.asarray(eye_right, float)
    mouth_left, mouth_right = np.asarray(mouth_left, float), np.asarray(mouth_right, float)
    eye_avg = (eye_left + eye_right) / 2.0
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2.0 - eye_avg
    centre = eye_avg + 0.1 * eye_to_mouth
    side = max(3.0 * float(np.hypot(*eye_to_eye)), 2.7 * float(np.hypot(*eye_to_mouth)))
    return float(centre[0]), float(centre[1]), side


def face_box_from_landmarks(points: np.ndarray) -> tuple[float, float, float]:
    """SSV's square from 68 landmarks ((68, 2) pixels, the iBUG 300-W order): (centre x, centre y, side)."""
    pts = np.asarray(points, dtype=np.float64)
    return face_box_from_points(pts[36:42].mean(0), pts[42:48].mean(0), pts[48], pts[54])


def square_origin(cx: float, cy: float, side: float) -> tuple[int, int, int]:
    """(x0, y0, s) of the pixel square :func:`crop_square` cuts: top-left pixel and side s = round(side)."""
    s = max(int(round(side)), 1)
    return int(round(cx - s / 2.0)), int(round(cy - s / 2.0)), s


def crop_square(image: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """The axis-aligned square of ``side`` px about (cx, cy) from an (H, W, 3) image, reflect-padded (mirror without
    repeating the edge pixel) where it leaves the image. Returns (s, s, 3) with s = round(side), whose pixel (0, 0) is
    the image's pixel :func:`square_origin` (x0, y0)."""
    cv2 = opencv()

    x0, y0, s = square_origin(cx, cy, side)
    h, w = image.shape[:2]
    pad = (max(0, -y0), max(0, y0 + s - h), max(0, -x0), max(0, x0 + s - w))  # top, bottom, left, right
    if any(pad):
        mode = cv2.BORDER_REFLECT_101 if min(h, w) > 1 else cv2.BORDER_REPLICATE
        image = cv2.copyMakeBorder(image, *pad, mode)
        x0, y0 = x0 + pad[2], y0 + pad[0]
    return np.ascontiguousarray(image[y0:y0 + s, x0:x0 + s])


def _check_box(box, path) -> tuple[float, float, float]:
    cx, cy, side = box
    if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(side)) or side < 2.0:
        raise ViewsslError(f"landmarks give no usable face box (centre {cx:.1f}, {cy:.1f}, side {side:.1f} px)", path)
    return cx, cy, side


# --------------------------------------------------------------------------------------------------------------------
# 300W-LP and AFLW2000
# --------------------------------------------------------------------------------------------------------------------

def pose_para_to_angles(pitch: float, yaw: float, roll: float) -> tuple[float, float, float]:
    """3DDFA's Pose_Para angles (radians) -> viewssl (azimuth, elevation, tilt) of the same rotation (radians).

    3DDFA's rotation is Rx(pitch)^T Ry(yaw)^T Rz(roll)^T = Rx(-pitch) Ry(-yaw) Rz(-roll) in frames equal to ours.
    """
    p, y, r = (torch.tensor(float(v), dtype=torch.float64) for v in (pitch, yaw, roll))
    R = axis_rotation("x", -p) @ axis_rotation("y", -y) @ axis_rotation("z", -r)
    return tuple(float(a) for a in matrix_to_angles(R))


def _loadmat(path: Path) -> dict:
    import scipy.io

    if not path.is_file():
        raise ViewsslError("annotation .mat file not found", path)
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ViewsslError("MATLAB v7.3 (HDF5) .mat files are not supported; save it with -v7", path) from None
    except Exception as e:  # truncated file, not a .mat at all
        raise ViewsslError(f"not a readable MATLAB .mat file ({error_summary(e, 160)})", path) from None


def _numeric(value, name: str, path: Path) -> np.ndarray:
    """A .mat variable as a float64 array, or an error naming the file and the variable."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ViewsslError(f"{name} is not numeric", path) from None


def read_pose_mat(path: str | os.PathLike) -> dict:
    """Read a 300W-LP / AFLW2000 ``.mat``: ``{"pose_para": (7,) float64, "landmarks": (68, 2) or None,
    "landmarks_key": str or None}``. No ``Pose_Para``, or one with fewer than 3 finite numbers, is an error naming
    the file. Landmarks: ``pt3d_68`` (3x68, AFLW2000; first two rows) else ``pt2d`` when it has 68 points (300W-LP;
    2x68). AFLW2000's ``pt2d`` (the 21 original AFLW points, -1 where missing) is not used."""
    path = Path(path)
    mat = _loadmat(path)
    if "Pose_Para" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise ViewsslError(f"no Pose_Para in this .mat (has: {keys})", path)
    try:
        pose = np.asarray(mat["Pose_Para"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ViewsslError("Pose_Para is not numeric", path) from None
    if pose.size < 3 or not np.isfinite(pose[:3]).all():
        raise ViewsslError(f"Pose_Para must start with finite pitch, yaw, roll (got {pose[:3].tolist()})", path)
    landmarks, key = None, None
    for name in ("pt3d_68", "pt2d"):
        if name in mat:
            arr = _numeric(mat[name], name, path)
            if arr.ndim == 2 and arr.shape[1] == 68 and arr.shape[0] in (2, 3):
                landmarks, key = arr[:2].T.copy(), name
                break
            if arr.ndim == 2 and arr.shape[0] == 68 and arr.shape[1] in (2, 3):
                landmarks, key = arr[:, :2].copy(), name
                break
    return {"pose_para": pose, "landmarks": landmarks, "landmarks_key": key}


def _read_pts_mat(path: Path) -> np.ndarray:
    """300W-LP ``landmarks/<subset>/<stem>_pts.mat``: ``pts_2d`` (68x2, the visible contour) else ``pts_3d``."""
    mat = _loadmat(path)
    for name in ("pts_2d", "pts_3d"):
        if name in mat:
            arr = _numeric(mat[name], name, path)
            if arr.shape == (68, 2):
                return arr
            if arr.shape == (2, 68):
                return arr.T.copy()
            raise ViewsslError(f"{name} has shape {arr.shape}, expected (68, 2)", path)
    raise ViewsslError("no pts_2d or pts_3d landmarks in this .mat", path)


_VIEW_SUFFIX = re.compile(r"^(.*)_(\d+)$")


class FaceMatFolder(ImageItems):
    """Face images with 3DDFA ``.mat`` annotations next to them (``name.jpg`` + ``name.mat``), searched
    recursively: 300W-LP (``AFW/``, ``HELEN/``, ``IBUG/``, ``LFPW/`` and their ``_Flip`` folders) and AFLW2000-3D
    (a flat folder). Each item is SSV's landmark crop, resized to ``size``.

    Landmarks for the crop, first found: 300W-LP's ``landmarks/<subset>/<stem>_pts.mat`` (``pts_2d``; for a
    ``<subset>_Flip`` image without its own file, the unflipped image's points mirrored), then ``pt3d_68`` in the
    image's .mat (AFLW2000), then ``pt2d`` if it has 68 points (300W-LP's .mat; note TFDS calls these the *origin*
    landmarks, i.e. of the source photo, so for the synthesised large-pose views the separate landmarks file is
    preferred). No landmarks is an error naming the .mat. The top-level ``landmarks/`` and ``Code/`` folders of
    300W-LP are not searched for images.

    Ids: ``instance`` = the source face of a 300W-LP image (``AFW/AFW_134212_1`` for ``AFW/AFW_134212_1_5.jpg``, the
    views synthesised from one photo share it), -1 for AFLW2000; ``category``, ``sequence``, ``frame`` = -1.
    The .mat files are read lazily with each item; :attr:`angles` reads all that have not been read yet (progress
    bar), :meth:`verify` reads everything. ``max_abs_deg=99`` keeps only the faces whose Pose_Para pitch, yaw and
    roll are within 99 deg (the 1,969-image AFLW2000 test set of Hopenet's and FSA-Net's tables); it reads every .mat
    when the dataset is built and logs how many faces it left out.
    """

    kind = "300w-lp"
    item_noun = "face images with .mat annotations (name.jpg + name.mat)"
    _item_arrays = ImageItems._item_arrays + ("_known",)

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False,
                 angles: str = "viewssl", max_abs_deg: float | None = None):
        super().__init__(root, size, transform, skip_bad)
        if angles not in ANGLE_MODES:
            raise ViewsslError(f"angles={angles!r}: expected one of {', '.join(ANGLE_MODES)}")
        self.angle_mode = angles
        self.landmarks_root = self.root / "landmarks" if (self.root / "landmarks").is_dir() else None
        skip_dirs = [self.root / "landmarks", self.root / "Code"]  # 300W-LP's landmark files and Matlab code
        images = [p for p in list_images(self.root, (".jpg", ".jpeg", ".png"))
                  if not any(d in p.parents for d in skip_dirs)]
        images = _inside_only(self.root, images, self.skip_bad, self)
        paths, instances, missing = [], [], []
        for p in images:
            if not p.with_suffix(".mat").is_file():
                missing.append(p)
                continue
            paths.append(p)
            rel = p.relative_to(self.root)
            m = _VIEW_SUFFIX.match(p.stem)
            instances.append("/".join(rel.parts[:-1] + (m.group(1),)) if m and len(rel.parts) > 1 else None)
        if missing:
            msg = f"no matching .mat annotation ({missing[0].stem}.mat)"
            if not self.skip_bad:
                more = f" (and {len(missing) - 1} more images without one)" if len(missing) > 1 else ""
                raise ViewsslError(msg + more, missing[0])
            self.skipped += len(missing)
            log.warning("skipped %d images without a .mat annotation (skip_bad=True); first: %s", len(missing),
                        missing[0])
        if not paths:
            raise ViewsslError(f"no {self.item_noun} found", self.root)
        self.instances, inst = _ids(instances)
        self._set_items(paths, instance_index=inst)
        self._known = np.zeros(len(paths), dtype=bool)
        self.max_abs_deg = None if max_abs_deg is None else float(max_abs_deg)
        if self.max_abs_deg is not None:
            self._keep_within(self.max_abs_deg)

    def _keep_within(self, limit: float) -> None:
        """Drop the faces whose Pose_Para pitch, yaw or roll exceeds ``limit`` degrees in size (AFLW2000's usual
        test set is the 1,969 faces within 99 deg, as Hopenet and FSA-Net report); reads every .mat."""
        from tqdm import tqdm

        outside, bad = [], []
        for i in tqdm(range(len(self)), desc=f"read {self.root.name} .mat", unit="file", disable=len(self) < 2000,
                      leave=False):
            try:
                pose = self._annotation(i)["pose_para"][:3]
            except ViewsslError as e:
                if not self.skip_bad:
                    raise
                bad.append(i)
                log.warning("skipping (skip_bad=True): %s", e)
                continue
            if np.abs(np.degrees(pose)).max() > limit:
                outside.append(i)
        if len(outside) + len(bad) == len(self):
            raise ViewsslError(f"no face has |pitch|, |yaw| and |roll| within {limit:g} deg", self.root)
        self.skipped += len(bad)
        log.info("%s: left out %d of %d faces with |pitch|, |yaw| or |roll| over %g deg (max_abs_deg)", self.root,
                 len(outside), len(self), limit)
        self._drop(outside + bad)

    @property
    def angles(self) -> torch.Tensor:
        """(N, 3) float32 radians of every item (reads the .mat files not read yet)."""
        todo = np.nonzero(~self._known)[0] if hasattr(self, "_known") else []
        if len(todo):
            from tqdm import tqdm

            for i in tqdm(todo, desc=f"read {self.root.name} .mat", unit="file", disable=len(todo) < 2000,
                          leave=False):
                self._annotation(int(i))
        return self._angles

    @angles.setter
    def angles(self, value: torch.Tensor) -> None:
        self._angles = value

    def mat_path(self, i: int) -> Path:
        return self.paths[i].with_suffix(".mat")

    def _annotation(self, i: int) -> dict:
        ann = read_pose_mat(self.mat_path(i))
        pitch, yaw, roll = ann["pose_para"][:3]
        if self.angle_mode == "viewssl":
            a = pose_para_to_angles(pitch, yaw, roll)
        else:
            a = (yaw, pitch, roll)
        self._angles[i] = torch.tensor(a, dtype=torch.float32)
        self._known[i] = True
        ann["angles"] = self._angles[i].clone()
        return ann

    def landmarks(self, i: int, ann: dict | None = None, width: int | None = None) -> np.ndarray:
        """(68, 2) landmarks (pixels) used for item i's crop."""
        ann = ann if ann is not None else read_pose_mat(self.mat_path(i))
        if self.landmarks_root is not None:
            rel = self.paths[i].relative_to(self.root)
            own = self.landmarks_root.joinpath(*rel.parts[:-1], f"{rel.stem}_pts.mat")
            if own.is_file():
                return _read_pts_mat(own)
            if len(rel.parts) > 1 and rel.parts[0].endswith("_Flip"):
                src = self.landmarks_root.joinpath(rel.parts[0][: -len("_Flip")], *rel.parts[1:-1],
                                                   f"{rel.stem}_pts.mat")
                if src.is_file() and width is not None:
                    pts = _read_pts_mat(src)
                    pts[:, 0] = width - pts[:, 0]
                    return pts
        if ann["landmarks"] is not None:
            return ann["landmarks"]
        raise ViewsslError("no 68 landmarks for the face crop (looked for landmarks/<subset>/<name>_pts.mat, "
                           "pt3d_68 (3x68) and pt2d (2x68))", self.mat_path(i))

    def load_image(self, i: int) -> np.ndarray:
        return self._load(i)[0]

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        ann = self._annotation(i)
        image = load_rgb(self.paths[i])
        pts = self.landmarks(i, ann, width=image.shape[1])
        box = _check_box(face_box_from_landmarks(pts), self.mat_path(i))
        return crop_square(image, *box), ann


class W300LP(FaceMatFolder):
    """300W-LP (Zhu et al., 3DDFA): ``<root>/{AFW,HELEN,IBUG,LFPW}[_Flip]/*.jpg`` + ``.mat``, ``<root>/landmarks/``.
    See :class:`FaceMatFolder`."""

    kind = "300w-lp"


class AFLW2000(FaceMatFolder):
    """AFLW2000-3D: ``<root>/image*.jpg`` + ``.mat`` with ``Pose_Para`` and ``pt3d_68``. See :class:`FaceMatFolder`."""

    kind = "aflw2000"


# --------------------------------------------------------------------------------------------------------------------
# BIWI
# --------------------------------------------------------------------------------------------------------------------

def _number_lines(path: Path) -> list[list[float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ViewsslError("not a text file", path) from None
    except OSError as e:
        raise ViewsslError(f"cannot read ({e.strerror or e})", path) from None
    rows = []
    for k, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append([float(t) for t in line.split()])
        except ValueError:
            raise ViewsslError(f"line {k + 1}: not numbers: {line.strip()[:60]!r}", path) from None
    return rows


def _rotation(rows: list[list[float]], path: Path, what: str) -> np.ndarray:
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise ViewsslError(f"{what}: expected 3 rows of 3 numbers", path)
    R = np.array(rows, dtype=np.float64)
    if not np.isfinite(R).all() or np.abs(R.T @ R - np.eye(3)).max() > 1e-2 or np.linalg.det(R) < 0:
        raise ViewsslError(f"{what} is not a rotation matrix", path)
    return R


def read_biwi_calibration(path: str | os.PathLike) -> dict:
    """BIWI ``rgb.cal``: intrinsics (3 rows), distortion (1 row), extrinsic R (3 rows), t (1 row, mm), image size
    (1 row, optional); blank lines between sections. Returns ``{"K", "dist", "R", "t", "size"}``."""
    path = Path(path)
    if not path.is_file():
        raise ViewsslError("calibration file not found", path)
    rows = _number_lines(path)
    if len(rows) < 8:
        raise ViewsslError(f"expected intrinsics (3 rows), distortion, R (3 rows), t and size; found {len(rows)} "
                           "rows of numbers", path)
    if any(len(r) != 3 for r in rows[:3]):
        raise ViewsslError("intrinsics: expected 3 rows of 3 numbers", path)
    K = np.array(rows[:3], dtype=np.float64)
    if not np.isfinite(K).all():
        raise ViewsslError("intrinsics are not finite", path)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ViewsslError("intrinsics: focal lengths must be positive", path)
    dist = np.array(rows[3], dtype=np.float64)
    if not np.isfinite(dist).all():
        raise ViewsslError("distortion is not finite", path)
    R = _rotation(rows[4:7], path, "extrinsic R")
    t = np.array(rows[7], dtype=np.float64)
    if t.shape != (3,) or not np.isfinite(t).all():
        raise ViewsslError("extrinsic t: expected 3 finite numbers", path)
    size = None
    if len(rows) > 8 and len(rows[8]) == 2:
        if not all(math.isfinite(v) and 0 < v < 2 ** 31 and v == int(v) for v in rows[8]):
            raise ViewsslError(f"image size: expected two positive whole numbers (got {rows[8]})", path)
        size = tuple(int(v) for v in rows[8])
    return {"K": K, "dist": dist, "R": R, "t": t, "size": size}


MIN_HEAD_DEPTH_MM = 100.0  # a head centre nearer the camera than this is a broken pose file, not a pose


def _check_head_depth(z: float, path: Path, camera: str = "") -> None:
    if z < MIN_HEAD_DEPTH_MM:
        raise ViewsslError(f"head centre z = {z:g} mm{camera}: a head is at least {MIN_HEAD_DEPTH_MM:g} mm in front "
                           "of the camera", path)


def read_biwi_pose(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """BIWI ``frame_XXXXX_pose.txt``: a 3x3 rotation (head -> depth camera, rows as written) then the head centre
    (mm, depth camera). Returns (R, centre)."""
    path = Path(path)
    if not path.is_file():
        raise ViewsslError("pose file not found", path)
    rows = _number_lines(path)
    if len(rows) != 4 or len(rows[3]) != 3:
        raise ViewsslError("expected a 3x3 rotation then a 3-vector head centre", path)
    R = _rotation(rows[:3], path, "rotation")
    centre = np.array(rows[3], dtype=np.float64)
    if not np.isfinite(centre).all():
        raise ViewsslError("head centre is not finite", path)
    _check_head_depth(centre[2], path)
    return R, centre


_D = np.diag([1.0, -1.0, -1.0])


def biwi_rotation_to_angles(R_rgb: np.ndarray, mode: str = "viewssl") -> tuple[float, float, float]:
    """BIWI head rotation in the RGB camera (OpenCV axes) -> (azimuth, elevation, tilt) radians.

    ``viewssl``: matrix_to_angles(D R D), D = diag(1, -1, -1). ``dataset``: SSV's labels, the rotation vector
    (x, y, z) = cv2.Rodrigues(R) read as (pitch, yaw, roll) and returned as (yaw, pitch, roll)."""
    R = np.asarray(R_rgb, dtype=np.float64)
    if mode == "dataset":
        from scipy.spatial.transform import Rotation

        rx, ry, rz = Rotation.from_matrix(R).as_rotvec()
        return float(ry), float(rx), float(rz)
    a = matrix_to_angles(torch.from_numpy(_D @ R @ _D))
    return tuple(float(v) for v in a)


# -- detectors -------------------------------------------------------------------------------------------------------

def face_alignment_weights() -> tuple[dict[str, Path] | None, str]:
    """Local paths of face-alignment's FAN-2D and SFD weights in torch's hub cache, or (None, reason)."""
    try:
        import face_alignment.api as fa_api
        from face_alignment.detection.sfd import sfd_detector
    except Exception as e:  # not installed, or broken
        return None, f"face_alignment not importable ({type(e).__name__}: {e})"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    need = {
        "fan": checkpoints / os.path.basename(fa_api.models_urls["2DFAN-4"]),
        "sfd": checkpoints / os.path.basename(sfd_detector.models_urls["s3fd"]),
    }
    missing = [str(p) for p in need.values() if not p.is_file()]
    if missing:
        return None, f"face-alignment weights not found (never downloaded): {', '.join(missing)}"
    return need, "weights in " + str(checkpoints)


def haar_cascade() -> tuple[Path | None, str]:
    """Path of OpenCV's frontal-face Haar cascade, or (None, reason)."""
    cv2 = opencv()

    if not hasattr(cv2, "CascadeClassifier"):
        return None, f"OpenCV {cv2.__version__} has no cv2.CascadeClassifier (Haar cascades left OpenCV in 5.0)"
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / "haarcascade_frontalface_default.xml"
    if not folder or not path.is_file():
        return None, f"no haarcascade_frontalface_default.xml in cv2.data.haarcascades ({folder})"
    return path, str(path)


def _nearest(centres: list[tuple[float, float]], prior) -> int:
    if prior is None or len(centres) == 1:
        return 0
    d = [math.hypot(c[0] - prior[0], c[1] - prior[1]) for c in centres]
    return int(np.argmin(d))


class CenterDetector:
    """No detection: every frame uses the projected head centre box."""

    name = "center"

    @staticmethod
    def available() -> tuple[bool, str]:
        return True, "projected head centre"

    def detect(self, image: np.ndarray, prior=None):
        return None


class HaarDetector:
    """OpenCV's Haar cascade; square of 1.2 x the detection width about its centre."""

    name = "haar"

    @staticmethod
    def available() -> tuple[bool, str]:
        path, reason = haar_cascade()
        return path is not None, reason

    def __init__(self):
        self._cascade = None

    def __getstate__(self):
        return {"_cascade": None}

    def detect(self, image: np.ndarray, prior=None):
        cv2 = opencv()

        if self._cascade is None:
            path, reason = haar_cascade()
            if path is None:
                raise ViewsslError(f"detector 'haar': {reason}")
            self._cascade = cv2.CascadeClassifier(str(path))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        faces = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        if len(faces) == 0:
            return None
        centres = [(x + w / 2.0, y + h / 2.0) for x, y, w, h in faces]
        k = _nearest(centres, prior)
        return centres[k][0], centres[k][1], 1.2 * float(faces[k][2])


class FaceAlignmentDetector:
    """face_alignment's FAN 68 landmarks (SFD face detector) from local weights; SSV's landmark crop."""

    name = "face-alignment"

    @staticmethod
    def available() -> tuple[bool, str]:
        paths, reason = face_alignment_weights()
        return paths is not None, reason

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._fa = None

    def __getstate__(self):
        return {"device": self.device, "_fa": None}

    def _model(self):
        if self._fa is None:
            import inspect

            import face_alignment

            paths, reason = face_alignment_weights()
            if paths is None:
                raise ViewsslError(f"detector 'face-alignment': {reason}")
            kwargs = {"device": self.device, "face_detector": "sfd",
                      "face_detector_kwargs": {"path_to_detector": str(paths["sfd"])}}
            if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
                kwargs["compile"] = False
            self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)
        return self._fa

    def detect(self, image: np.ndarray, prior=None):
        import warnings

        with warnings.catch_warnings():  # "No faces were detected." per frame; the fallback is logged by the caller
            warnings.simplefilter("ignore", UserWarning)
            found = self._model().get_landmarks_from_image(image)
        if not found:
            return None
        boxes = [face_box_from_landmarks(np.asarray(p)[:, :2]) for p in found]
        return boxes[_nearest([(b[0], b[1]) for b in boxes], prior)]


DETECTORS = {"face-alignment": FaceAlignmentDetector, "haar": HaarDetector, "center": CenterDetector}
DETECTOR_CHOICES = ("auto",) + tuple(DETECTORS)


def resolve_detector(name: str = "auto"):
    """(chosen name, detector instance, reason). ``auto`` takes the first available of face-alignment, haar, center;
    an explicit choice that is unavailable is a :class:`ViewsslError` saying why."""
    if name not in DETECTOR_CHOICES:
        raise ViewsslError(f"detector={name!r}: expected one of {', '.join(DETECTOR_CHOICES)}")
    if name != "auto":
        ok, reason = DETECTORS[name].available()
        if not ok:
            raise ViewsslError(f"detector {name!r} is not available: {reason}; use detector='center' or 'auto'")
        return name, DETECTORS[name](), reason
    skipped = []
    for candidate, cls in DETECTORS.items():
        ok, reason = cls.available()
        if ok:
            why = f"auto: {reason}" + (f"; not {'; not '.join(skipped)}" if skipped else "")
            return candidate, cls(), why
        skipped.append(f"{candidate} ({reason})")
    raise AssertionError("the center detector is always available")


BIWI_FRAME = re.compile(r"^frame_(\d+)_rgb\.png$", re.IGNORECASE)
CALIBRATION_FILE = "rgb.cal"


def biwi_sessions(root: Path) -> list[Path]:
    """Session folders (holding ``rgb.cal``) of a BIWI root: root itself, ``root/NN``, or ``root/hpdb/NN``."""
    if (root / CALIBRATION_FILE).is_file():
        return [root]
    for base in (root, root / "hpdb"):
        if base.is_dir():
            found = sorted((d for d in base.iterdir() if d.is_dir() and (d / CALIBRATION_FILE).is_file()),
                           key=lambda d: natural_key(d.name))
            if found:
                return found
    return []


class BIWI(ImageItems):
    """BIWI Kinect Head Pose: ``<root>/[hpdb/]NN/frame_XXXXX_rgb.png`` + ``frame_XXXXX_pose.txt`` + ``NN/rgb.cal``.

    Angles: see the module doc (R_rgb = R_cal^T R_pose, converted to viewssl's convention, or SSV's rotation-vector
    labels of R_pose @ R_cal with ``angles="dataset"``). Ids: ``sequence`` = session (01..24 -> 0..23), ``frame`` =
    the frame number, others -1. ``sessions`` restricts to some session numbers. ``head_center`` is the (N, 3) head
    centre in the RGB camera (mm), ``R_cal^T (c - t_cal)`` as SSV's preprocessing computes it. Face box: ``detector``,
    see module doc. Pose files and calibrations are read when the dataset is built (a bad one names its file;
    ``skip_bad`` drops the frame and counts it); images and detections are lazy.
    """

    kind = "biwi"

    item_noun = "BIWI frames (NN/frame_XXXXX_rgb.png + frame_XXXXX_pose.txt + NN/rgb.cal)"
    _item_arrays = ImageItems._item_arrays + ("head_center", "session")

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False,
                 detector: str = "auto", angles: str = "viewssl", sessions: Sequence[int] | None = None,
                 box_mm: float = 230.0, box_down_mm: float = 25.0):
        super().__init__(root, size, transform, skip_bad)
        if angles not in ANGLE_MODES:
            raise ViewsslError(f"angles={angles!r}: expected one of {', '.join(ANGLE_MODES)}")
        self.angle_mode = angles
        self.box_mm = float(box_mm)
        self.box_down_mm = float(box_down_mm)
        folders = biwi_sessions(self.root)
        if not folders:
            raise ViewsslError(f"no BIWI session folders (NN/ with {CALIBRATION_FILE} and frame_XXXXX_rgb.png)",
                               self.root)
        if sessions is not None:
            wanted = {int(s) for s in sessions}
            folders = [f for f in folders if f.name.isdigit() and int(f.name) in wanted]
            if not folders:
                raise ViewsslError(f"none of sessions {sorted(wanted)} found", self.root)
        self.session_names = [f.name for f in folders]
        self.calibrations = []
        paths, angle_rows, centres, seq, frames, sess, bad = [], [], [], [], [], [], []
        for s, folder in enumerate(folders):
            cal = read_biwi_calibration(folder / CALIBRATION_FILE)
            self.calibrations.append(cal)
            images = [p for p in _inside_only(self.root, list_images(folder, (".png",)), self.skip_bad, self)
                      if p.parent == folder and BIWI_FRAME.match(p.name)]
            for p in images:
                number = BIWI_FRAME.match(p.name).group(1)
                pose_file = folder / f"frame_{number}_pose.txt"
                try:
                    R_pose, c = read_biwi_pose(pose_file)
                    centre_rgb = cal["R"].T @ (c - cal["t"])
                    _check_head_depth(centre_rgb[2], pose_file, f" in the RGB camera ({CALIBRATION_FILE}'s extrinsic "
                                                                 "applied)")
                except ViewsslError as e:
                    if not self.skip_bad:
                        raise
                    bad.append(str(e))
                    continue
                # head -> RGB camera by the map the head centre takes below (x_rgb = R_cal^T (x_depth - t_cal));
                # "dataset" keeps SSV's labels, which it computed as R_pose @ R_cal
                R_rgb = R_pose @ cal["R"] if angles == "dataset" else cal["R"].T @ R_pose
                angle_rows.append(biwi_rotation_to_angles(R_rgb, angles))
                centres.append(centre_rgb)
                paths.append(p)
                seq.append(s)
                frames.append(int(number))
                sess.append(s)
        if bad:
            self.skipped += len(bad)
            log.warning("skipped %d BIWI frames with a bad pose file (skip_bad=True); first: %s", len(bad), bad[0])
        self.sequences = list(self.session_names)
        self._set_items(paths, sequence_index=np.array(seq), frame=np.array(frames),
                        head_center=np.array(centres, dtype=np.float64).reshape(-1, 3),
                        session=np.array(sess, dtype=np.int64))
        self.angles = torch.tensor(angle_rows, dtype=torch.float32).reshape(-1, 3)
        self.detector_name, self.detector, reason = resolve_detector(detector)
        self.fallbacks = 0
        log.info("BIWI %s: %d frames in %d sessions; face boxes by detector %r (%s)", self.root, len(self),
                 len(folders), self.detector_name, reason)

    def head_pixel(self, i: int) -> tuple[float, float, float]:
        """Projected head centre (u, v) in the RGB image and its depth (mm)."""
        K = self.calibrations[int(self.session[i])]["K"]
        x, y, z = (float(v) for v in self.head_center[i])  # z >= MIN_HEAD_DEPTH_MM, checked when read
        return K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2], z

    def center_box(self, i: int) -> tuple[float, float, float]:
        """The ``center`` box: a square of ``box_mm`` at the head's depth about the projected head centre, moved
        ``box_down_mm`` down the image (the skull centre sits above the face centre)."""
        u, v, z = self.head_pixel(i)
        fx = self.calibrations[int(self.session[i])]["K"][0, 0]
        return u, v + fx * self.box_down_mm / z, fx * self.box_mm / z

    def face_box(self, i: int, image: np.ndarray) -> tuple[tuple[float, float, float], str]:
        """(box, how) for item i: the detector's box, or the head-centre box when it finds no face."""
        u, v, _ = self.head_pixel(i)
        box = self.detector.detect(image, prior=(u, v))
        if box is not None:
            return box, self.detector_name
        if self.detector_name != "center":
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("BIWI: detector %r found no face in %s; using the projected head centre box (logged once, "
                            "counted in dataset.fallbacks)", self.detector_name, self.paths[i])
        return self.center_box(i), "center"

    def load_image(self, i: int) -> np.ndarray:
        image = load_rgb(self.paths[i])
        box, _ = self.face_box(i, image)
        return crop_square(image, *box)
