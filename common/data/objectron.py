"""Objectron (Ahmadyan et al., CVPR 2021) as Google distributes it: videos plus one annotation file per video.

Layout (the bucket's, ``gs://objectron``)::

    <root>/videos/<class>/batch-<i>/<j>/video.MOV
    <root>/annotations/<class>/batch-<i>/<j>.pbdata          # one serialised xeno.pursuit.proto.Sequence
    <root>/index/<class>_annotations_{train,test}           # optional: one "<class>/batch-<i>/<j>" per line

Annotation schema (``objectron/schema/annotation_data.proto``, ``object.proto``, ``a_r_capture_metadata.proto``; only
the fields read here are declared, the rest is skipped as unknown fields): a ``Sequence`` has ``frame_annotations``,
each with ``frame_id`` (the decoded video frame number), ``annotations`` (per object: ``object_id``, ``visibility``
and 9 ``keypoints``: the box centre then its 8 corners, each with ``point_3d`` in the camera frame, metres, and
``point_2d`` normalised to [0, 1] from the image's top-left), ``camera`` (ARKit: ``intrinsics`` 3x3 row-major,
``image_resolution_width/height``) and ``plane_center`` / ``plane_normal`` (the ground plane in the camera frame). The
messages are built at run time from descriptors (:func:`message_classes`), so neither TensorFlow nor generated
``_pb2`` modules are needed.

Conventions and what is derived
-------------------------------
- The corner order is Objectron's ``box.py``: corner k (1..8) is the centre plus R @ (s * sign), signs (x, y, z) =
  (-,-,-), (-,-,+), (-,+,-), (-,+,+), (+,-,-), (+,-,+), (+,+,-), (+,+,+), which is the order of
  :func:`common.eval.boxes.box_corners`. The box (centre, size, rotation) is fitted to the 9 points as Objectron's
  ``Box.fit`` does (least squares), the rotation made orthonormal (SVD).
- ARKit's camera frame is OpenGL's (x right, y up, z towards the viewer), but for the sensor's landscape orientation,
  while the videos decode (with their rotation tag applied, as OpenCV and ffmpeg both do) to portrait frames. Rather
  than trust a convention (the intrinsics' layout is itself disputed, Objectron issue #39), each video's rotation
  about the optical axis (0, 90, 180 or 270 deg) and its pinhole intrinsics (fx, fy, cx, cy, in pixels of the decoded
  frame) are **fitted** so the 3D keypoints project onto the 2D ones; a video whose keypoints do not agree to 1% of the
  frame under any of the four is an error naming its annotation file. ARKit's own intrinsics are not used.
- Everything is then in the project's camera convention (``common/eval/boxes.py``): ``u = cx + fx X / (-Z)``,
  ``v = cy - fy Y / (-Z)``; the viewpoint is ``matrix_to_angles`` of the box rotation (object y up, as Objectron's
  boxes); the ground plane ``n . x + d = 0`` with n pointing to the object; the 2D box is the bounds of the 9 projected
  keypoints. These are the synthetic sequences' columns (:data:`common.data.labels.BOX_COLUMNS`), in the pixels of the
  item's image (after the crop and resize), so ``viewssl data export`` followed by ``viewssl eval --metrics box_fit``
  runs SiamPose's zero-shot box fitting on real Objectron frames.
- Ids: ``category`` = the class folder (not ``Object.category``, wrong for some videos: Objectron issue #62),
  ``sequence`` = the video (``<class>/batch-<i>/<j>``), ``instance`` = the object in the video, ``frame`` = frame_id.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ViewsslError
from ..geometry import axis_rotation, matrix_to_angles
from ..io import opencv
from .faces import crop_square, square_origin
from .folders import ImageItems, _ids, natural_key
from .labels import BOX_COLUMNS

log = logging.getLogger("viewssl.data.objectron")

__all__ = ["Objectron", "message_classes", "read_sequence", "fit_box_keypoints", "fit_camera", "is_objectron",
           "BOX_COLUMNS"]

SIGNS = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
MAX_RMS = 0.01  # keypoint reprojection error allowed, as a fraction of the frame's side
_PACKAGE = "xeno.pursuit.proto"

# message -> fields (name, number, type, repeated, message type); a subset of Objectron's .proto files
_SCHEMA = {
    "ARCamera": [("transform", 3, "float", True, None), ("image_resolution_width", 5, "int32", False, None),
                 ("image_resolution_height", 6, "int32", False, None), ("intrinsics", 7, "float", True, None),
                 ("projection_matrix", 8, "float", True, None), ("view_matrix", 9, "float", True, None)],
    "NormalizedPoint2D": [("x", 1, "float", False, None), ("y", 2, "float", False, None),
                          ("depth", 3, "float", False, None)],
    "Point3D": [("x", 1, "float", False, None), ("y", 2, "float", False, None), ("z", 3, "float", False, None)],
    "AnnotatedKeyPoint": [("id", 1, "int32", False, None), ("point_3d", 2, "message", False, "Point3D"),
                          ("point_2d", 3, "message", False, "NormalizedPoint2D")],
    "ObjectAnnotation": [("object_id", 1, "int32", False, None),
                         ("keypoints", 2, "message", True, "AnnotatedKeyPoint"),
                         ("visibility", 3, "float", False, None)],
    "FrameAnnotation": [("frame_id", 1, "int32", False, None), ("annotations", 2, "message", True, "ObjectAnnotation"),
                        ("camera", 3, "message", False, "ARCamera"), ("timestamp", 4, "double", False, None),
                        ("plane_center", 5, "float", True, None), ("plane_normal", 6, "float", True, None)],
    "Object": [("id", 1, "int32", False, None), ("category", 2, "string", False, None),
               ("type", 3, "int32", False, None), ("rotation", 4, "float", True, None),
               ("translation", 5, "float", True, None), ("scale", 6, "float", True, None),
               ("method", 8, "int32", False, None)],
    "Sequence": [("objects", 1, "message", True, "Object"),
                 ("frame_annotations", 2, "message", True, "FrameAnnotation")],
}


@functools.lru_cache(maxsize=None)
def message_classes() -> dict[str, type]:
    """Objectron's protobuf message classes, built from descriptors at run time (name -> class). Enum fields are
    declared int32, which is the same on the wire."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    types = {"float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE, "int32": F.TYPE_INT32, "string": F.TYPE_STRING,
             "message": F.TYPE_MESSAGE}
    file = descriptor_pb2.FileDescriptorProto(name="viewssl/objectron.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _SCHEMA.items():
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            f = message.field.add(name=field, number=number, type=types[kind],
                                  label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass  # protobuf >= 4.22 (setup.cfg)
    return {name: get(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _SCHEMA}


def read_sequence(path: str | os.PathLike):
    """An ``annotations/<class>/batch-<i>/<j>.pbdata`` file as a ``Sequence`` message (a clear error if it is not)."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ViewsslError(f"cannot read ({e.strerror or e})", path) from None
    try:
        sequence = message_classes()["Sequence"].FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ViewsslError(f"not an Objectron annotation (Sequence protobuf): {str(e)[:120]}", path) from None
    if not sequence.frame_annotations:
        raise ViewsslError("no frame annotations in this Objectron annotation file", path)
    return sequence


def fit_box_keypoints(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objectron's ``Box.fit``: (9, 3) keypoints (centre, then the 8 corners in :data:`SIGNS` order) -> (centre (3,),
    size (3,), rotation (3, 3)), with ``corners = centre + rotation @ (size * signs)`` in the least-squares sense."""
    points = np.asarray(points, dtype=np.float64)
    centre = points[0]
    m, *_ = np.linalg.lstsq(SIGNS, points[1:] - centre, rcond=None)  # SIGNS @ m ~ corners: m = diag(size) R^T
    a = m.T  # = R diag(size)
    size = np.linalg.norm(a, axis=0)
    u, _, vt = np.linalg.svd(a / np.maximum(size, 1e-12))
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a mirrored corner order: keep a rotation, flip the last axis
        u[:, -1] *= -1
        rotation = u @ vt
    return centre, size, rotation


def _quarter_turn(k: int) -> np.ndarray:
    return axis_rotation("z", torch.tensor(k * math.pi / 2, dtype=torch.float64)).numpy().round(12)


def fit_camera(points_3d: np.ndarray, points_2d: np.ndarray, width: int, height: int) -> tuple[np.ndarray, tuple,
                                                                                                float]:
    """The rotation about the optical axis (a quarter turn M) and the intrinsics that take ARKit's 3D keypoints (N, 3)
    to the decoded frame's normalised 2D keypoints (N, 2): ``u = cx + fx X'/(-Z')``, ``v = cy - fy Y'/(-Z')`` with
    ``X' = M X``, least squares per axis, in pixels of a ``width`` x ``height`` frame. Returns (M, (fx, fy, cx, cy),
    RMS error as a fraction of the frame's larger side); the best of the four turns with positive focal lengths.
    Points behind the camera are left out of the fit."""
    p3 = np.asarray(points_3d, dtype=np.float64)
    uv = np.asarray(points_2d, dtype=np.float64) * np.array([width, height], dtype=np.float64)
    ahead = -p3[:, 2] > 1e-6  # a corner behind the camera (a large box seen from close) has no projection
    p3, uv = p3[ahead], uv[ahead]
    best = None
    for k in range(4 if len(p3) >= 3 else 0):
        M = _quarter_turn(k)
        q = p3 @ M.T
        depth = -q[:, 2]
        xn, yn = q[:, 0] / depth, q[:, 1] / depth
        (fx, cx), *_ = np.linalg.lstsq(np.stack([xn, np.ones_like(xn)], 1), uv[:, 0], rcond=None)
        (fy, cy), *_ = np.linalg.lstsq(np.stack([-yn, np.ones_like(yn)], 1), uv[:, 1], rcond=None)
        if fx <= 0 or fy <= 0:
            continue
        err = np.concatenate([cx + fx * xn - uv[:, 0], cy - fy * yn - uv[:, 1]])
        rms = float(np.sqrt(np.mean(err ** 2))) / max(width, height)
        if best is None or rms < best[2]:
            best = (M, (float(fx), float(fy), float(cx), float(cy)), rms)
    if best is None:
        return np.eye(3), (math.nan,) * 4, math.inf
    return best


def is_objectron(root: Path) -> bool:
    """``root/annotations/`` with a ``.pbdata`` file two folders down and ``root/videos/``."""
    ann = root / "annotations"
    return ann.is_dir() and (root / "videos").is_dir() and next(ann.glob("*/*/*.pbdata"), None) is not None


class _VideoReader:
    """Decodes frame n of a video, reading forward from the last frame read when it can (export reads in order)."""

    def __init__(self):
        self.path, self.cap, self.next = None, None, 0

    def __getstate__(self):  # DataLoader workers open their own
        return {"path": None, "cap": None, "next": 0}

    def read(self, path: Path, n: int) -> np.ndarray:
        cv2 = opencv()

        if self.path != path or n < self.next:
            if self.cap is not None:
                self.cap.release()
            self.cap = cv2.VideoCapture(str(path))
            self.path, self.next = path, 0
            if not self.cap.isOpened():
                self.path = None
                raise ViewsslError("cannot open this video (OpenCV/FFmpeg could not decode it)", path)
        while self.next < n:
            if not self.cap.grab():
                self.path = None
                raise ViewsslError(f"the video has {self.next} frames; its annotation asks for frame {n}", path)
            self.next += 1
        ok, frame = self.cap.read()
        if not ok or frame is None:
            self.path = None
            raise ViewsslError(f"the video has {self.next} frames; its annotation asks for frame {n}", path)
        self.next += 1
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _frame_size(path: Path) -> tuple[int, int]:
    cv2 = opencv()

    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read()
    finally:
        cap.release()
    if not ok or frame is None:
        raise ViewsslError("cannot decode the first frame of this video", path)
    return frame.shape[1], frame.shape[0]


class Objectron(ImageItems):
    """Objectron frames, one item per (video frame, annotated object): the object's square crop (``crop="object"``,
    the 2D box's larger side times ``margin``, reflect-padded) or the whole frame (``crop="frame"``), resized to
    ``size``. See the module doc for the layout and what is fitted.

    ``subset`` ("train" / "test") keeps the videos listed in ``index/<class>_annotations_<subset>``; ``categories``
    keeps some classes; ``frame_step`` keeps every k-th annotated frame (SiamPose keeps every 5th);
    ``min_visibility`` drops objects less visible than that. Per-item geometry: :attr:`box_table` ((N, 18), columns
    :data:`BOX_COLUMNS`, in the pixels of the item's image), also through :meth:`extra_columns` (what
    ``export_labels`` writes). Annotations are read when the dataset is built (each video's first frame is decoded for
    its size); the frames are decoded lazily.
    """

    kind = "objectron"
    item_noun = "Objectron videos (videos/<class>/batch-<i>/<j>/video.MOV + annotations/<class>/batch-<i>/<j>.pbdata)"
    _item_arrays = ImageItems._item_arrays + ("box_table", "crop_box", "object_id", "visibility")

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False,
                 subset: str | None = None, categories: Sequence[str] | None = None, frame_step: int = 1,
                 crop: str = "object", margin: float = 1.1, min_visibility: float = 0.0):
        super().__init__(root, size, transform, skip_bad)
        if crop not in ("object", "frame"):
            raise ViewsslError(f"crop={crop!r}: expected 'object' or 'frame'")
        if int(frame_step) < 1 or not margin > 0:
            raise ViewsslError(f"frame_step must be >= 1 and margin > 0 (got {frame_step}, {margin})")
        if crop == "frame" and size is None:
            raise ViewsslError("crop='frame' needs a size (frames are resized to size x size)")
        self.crop, self.margin, self.frame_step = crop, float(margin), int(frame_step)
        videos = self._videos(subset, categories)
        rows, bad = [], []
        for name in videos:
            try:
                rows += self._read_video(name, min_visibility)
            except ViewsslError as e:
                if not self.skip_bad:
                    raise
                bad.append(str(e))
        if bad:
            self.skipped += len(bad)
            log.warning("skipped %d Objectron videos with a bad annotation or video (skip_bad=True); first: %s",
                        len(bad), bad[0])
        if not rows:
            raise ViewsslError(f"no annotated objects found (videos: {len(videos)}, min_visibility "
                               f"{min_visibility:g})", self.root)
        self.categories, cat = _ids([r["category"] for r in rows])
        self.sequences, seq = _ids([r["video"] for r in rows])
        self.instances, inst = _ids([f"{r['video']}/{r['object_id']}" for r in rows])
        self._set_items([r["path"] for r in rows], category_index=cat, sequence_index=seq, instance_index=inst,
                        frame=np.array([r["frame"] for r in rows]),
                        box_table=np.array([r["columns"] for r in rows], dtype=np.float64).reshape(-1, 18),
                        crop_box=np.array([r["crop"] for r in rows], dtype=np.float64).reshape(-1, 4),
                        object_id=np.array([r["object_id"] for r in rows], dtype=np.int64),
                        visibility=np.array([r["visibility"] for r in rows], dtype=np.float64))
        self.angles = torch.tensor(np.array([r["angles"] for r in rows]), dtype=torch.float32).reshape(-1, 3)
        self._reader = _VideoReader()
        log.info("Objectron %s: %d items from %d videos in %d classes (crop %s)", self.root, len(self),
                 len(self.sequences), len(self.categories), crop)

    # -- listing ------------------------------------------------------------------------------------------------------
    def _videos(self, subset: str | None, categories: Sequence[str] | None) -> list[str]:
        ann = self.root / "annotations"
        if not is_objectron(self.root):
            raise ViewsslError("not an Objectron folder: expected annotations/<class>/batch-<i>/<j>.pbdata and "
                               "videos/", self.root)
        names = sorted((p.relative_to(ann).with_suffix("").as_posix() for p in ann.glob("*/*/*.pbdata")),
                       key=natural_key)
        if categories is not None:
            wanted = {str(c) for c in categories}
            names = [n for n in names if n.split("/")[0] in wanted]
        if subset is not None:
            listed = set()
            for cls in sorted({n.split("/")[0] for n in names}):
                index = self.root / "index" / f"{cls}_annotations_{subset}"
                if not index.is_file():
                    raise ViewsslError(f"subset {subset!r}: no index file for class {cls!r}", index)
                listed |= {line.strip() for line in index.read_text(encoding="utf-8").splitlines() if line.strip()}
            names = [n for n in names if n in listed]
        if not names:
            raise ViewsslError("no Objectron annotation files match" + (f" subset {subset!r}" if subset else "") +
                               (f" categories {sorted(categories)}" if categories is not None else ""), self.root)
        return names

    # -- one video ----------------------------------------------------------------------------------------------------
    def _read_video(self, name: str, min_visibility: float) -> list[dict]:
        ann_path = self.root / "annotations" / f"{name}.pbdata"
        video = self.root / "videos" / name / "video.MOV"
        if not video.is_file():
            raise ViewsslError("no video for this annotation (expected videos/<class>/batch-<i>/<j>/video.MOV)",
                               ann_path)
        sequence = read_sequence(ann_path)
        width, height = _frame_size(video)
        found = []  # (frame_id, object_id, visibility, points_3d (9, 3), points_2d (9, 2), plane centre, normal)
        for k, fa in enumerate(sorted(sequence.frame_annotations, key=lambda f: f.frame_id)):
            if k % self.frame_step:
                continue
            for obj in fa.annotations:
                if len(obj.keypoints) != 9:
                    raise ViewsslError(f"frame {fa.frame_id}, object {obj.object_id}: {len(obj.keypoints)} keypoints "
                                       "(a box has 9: its centre and 8 corners)", ann_path)
                if obj.visibility < min_visibility:
                    continue
                kps = sorted(obj.keypoints, key=lambda p: p.id) if any(p.id for p in obj.keypoints) else obj.keypoints
                p3 = np.array([[p.point_3d.x, p.point_3d.y, p.point_3d.z] for p in kps], dtype=np.float64)
                p2 = np.array([[p.point_2d.x, p.point_2d.y] for p in kps], dtype=np.float64)
                if not (np.isfinite(p3).all() and np.isfinite(p2).all()):
                    raise ViewsslError(f"frame {fa.frame_id}, object {obj.object_id}: keypoints are not finite",
                                       ann_path)
                plane = (np.array(fa.plane_center, dtype=np.float64), np.array(fa.plane_normal, dtype=np.float64))
                found.append((fa.frame_id, obj.object_id, float(obj.visibility), p3, p2, plane))
        if not found:
            return []
        M, (fx, fy, cx, cy), rms = fit_camera(np.concatenate([f[3] for f in found]),
                                              np.concatenate([f[4] for f in found]), width, height)
        if not rms <= MAX_RMS:
            raise ViewsslError(f"the 3D keypoints do not project onto the 2D ones under any quarter turn of the camera "
                               f"(best RMS error {rms:.1%} of the {width}x{height} frame)", ann_path)
        log.debug("%s: camera turn %s, fx %.1f fy %.1f cx %.1f cy %.1f, RMS %.2e", name, M.round(3).tolist(), fx, fy,
                  cx, cy, rms)
        rows = []
        for frame_id, object_id, visibility, p3, p2, (pc, pn) in found:
            q = p3 @ M.T
            centre, box_size, rotation = fit_box_keypoints(q)
            uv = p2 * np.array([width, height])
            x0, y0 = uv.min(0)
            x1, y1 = uv.max(0)
            if pc.shape == (3,) and pn.shape == (3,) and np.linalg.norm(pn) > 0:
                n = M @ pn / np.linalg.norm(pn)
                d = -float(n @ (M @ pc))
                if n @ centre + d < 0:
                    n, d = -n, -d
            else:
                n, d = np.full(3, math.nan), math.nan
            # the item's image: its pixels are (frame pixel - origin) * scale
            if self.crop == "object":
                side = max(x1 - x0, y1 - y0) * self.margin
                ox, oy, s = square_origin((x0 + x1) / 2, (y0 + y1) / 2, max(side, 2.0))
                sx = sy = (self.size / s) if self.size is not None else 1.0
                crop = (ox, oy, s, s)
            else:
                ox, oy, sx, sy = 0, 0, self.size / width, self.size / height
                crop = (0, 0, width, height)
            columns = [fx * sx, fy * sy, (cx - ox) * sx, (cy - oy) * sy, *centre, *box_size, *n, d,
                       (x0 - ox) * sx, (y0 - oy) * sy, (x1 - ox) * sx, (y1 - oy) * sy]
            angles = [float(a) for a in matrix_to_angles(torch.from_numpy(rotation))]
            rows.append({"path": Path(video), "video": name, "category": name.split("/")[0], "frame": frame_id,
                         "object_id": object_id, "visibility": visibility, "columns": columns, "crop": crop,
                         "angles": angles})
        return rows

    # -- items --------------------------------------------------------------------------------------------------------
    def load_image(self, i: int) -> np.ndarray:
        frame = self._reader.read(self.paths[i], int(self.frame[i]))
        if self.crop == "frame":
            return frame
        ox, oy, s, _ = self.crop_box[i]
        return crop_square(frame, ox + s / 2.0, oy + s / 2.0, s)

    def extra_columns(self) -> dict[str, np.ndarray]:
        """Per-item columns beyond the angles and ids: the box geometry (:data:`BOX_COLUMNS`) and the visibility."""
        out = {c: self.box_table[:, k] for k, c in enumerate(BOX_COLUMNS)}
        out["visibility"] = self.visibility
        return out
