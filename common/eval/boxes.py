"""Oriented 3D boxes: exact IoU and SiamPose's zero-shot 9-DoF box fitting from a retrieved neighbour.

Conventions (those of the synthetic benchmark, ``common/data/synthetic/render.py``):

- A box is ``(center (3,), size (3,), rotation (3, 3))`` in **camera** coordinates: ``size`` holds the full edge
  lengths along the box's own x, y, z axes, and the corners are ``center + rotation @ (+-size / 2)``. For the
  synthetic sequences ``center = (box_cx, box_cy, box_cz)``, ``size = (box_sx, box_sy, box_sz)`` and
  ``rotation = angles_to_matrix(azimuth, elevation, tilt)``.
- OpenGL camera: x right, y up, looking down -z. Pixels: ``u = cx + fx * X / (-Z)``, ``v = cy - fy * Y / (-Z)``
  (u right, v down).
- Ground plane: the points x with ``n . x + d = 0``, ``n`` a unit normal pointing from the plane towards the object,
  so ``n . c + d`` is the height of a point c above the plane (``plane_nx, plane_ny, plane_nz, plane_d``).
- 2D box: ``(x0, y0, x1, y1)`` in pixels (``bbox_x0 ... bbox_y1``).

:func:`box_iou_3d` is exact: the intersection of two convex boxes is the convex hull of (corners of each box inside
the other) and (points where an edge of one box crosses a face plane of the other, inside both); its volume is that
hull's (``scipy.spatial.ConvexHull``), the same construction as Objectron's Sutherland-Hodgman clipping.

:func:`fit_box` is SiamPose's ``zero_shot_pose.py`` procedure (section 2.3 of the reference notes), with the same
oracle inputs (the query's 2D box, ground plane and intrinsics):

1. take the neighbour's box (camera-relative, so its yaw relative to the camera is the "pose" transferred);
2. rotate it so the neighbour's plane normal maps onto the query's (minimal rotation, Rodrigues);
3. aim its centre along the ray through the query's 2D-box centre shifted by the neighbour's relative offset (the
   neighbour's projected 3D centre relative to its own 2D box, in box units);
4. snap it to the query plane at the neighbour's height above its own plane;
5. rescale isotropically, ``iterations`` times: s = target 2D diagonal / diagonal of the projected box's 2D bounds,
   smoothed s' = 1 + (s - 1) / ``smoothing`` (SiamPose: 4 iterations, alpha = 2), scaling the size and the height and
   re-snapping each time.

One deviation, documented: the target diagonal is the query's 2D-box diagonal times the neighbour's ratio (diagonal of
its projected 3D box's bounds / diagonal of its own 2D box). When the 2D boxes are the bounds of the projected 3D
boxes (SiamPose's oracle boxes) that ratio is 1 and this is SiamPose exactly; when they are tighter object boxes it
stops the fit from shrinking every box, and either way a query fitted from itself is recovered exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..data.labels import BOX_COLUMNS

__all__ = [
    "box_corners",
    "box_volume",
    "box_iou_3d",
    "project_points",
    "rotation_between",
    "BoxFrame",
    "fit_box",
    "box_frames_from_table",
]

_SIGNS = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
# Corner i and j share an edge when their sign patterns differ in exactly one axis.
_EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8) if int(np.sum(_SIGNS[i] != _SIGNS[j])) == 1])


def _np(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64)


def box_corners(center, size, rotation) -> np.ndarray:
    """The 8 corners (8, 3) of a box (or (..., 8, 3) for batched inputs)."""
    c, s, r = _np(center), _np(size), _np(rotation)
    local = _SIGNS * s[..., None, :]  # (..., 8, 3)
    return c[..., None, :] + np.einsum("...ij,...kj->...ki", r, local)


def box_volume(size) -> float:
    return float(np.prod(np.abs(_np(size))))


def _halfspaces(center: np.ndarray, size: np.ndarray, rotation: np.ndarray):
    """Outward unit normals (6, 3) and offsets (6,): the box is {x : normals @ x <= offsets}."""
    axes = rotation.T  # rows: the box axes in camera coordinates
    normals = np.concatenate([axes, -axes])
    half = np.abs(size) / 2
    offsets = np.concatenate([axes @ center + half, -(axes @ center) + half])
    return normals, offsets


def _inside(points: np.ndarray, normals: np.ndarray, offsets: np.ndarray, tol: float) -> np.ndarray:
    return np.all(points @ normals.T <= offsets + tol, axis=-1)


def _edge_plane_points(corners: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    p0, p1 = corners[_EDGES[:, 0]], corners[_EDGES[:, 1]]  # (12, 3)
    d = p1 - p0
    denom = d @ normals.T  # (12, 6)
    num = offsets[None, :] - p0 @ normals.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / denom
    ok = np.abs(denom) > 1e-300
    ok &= (t >= 0) & (t <= 1)
    t = np.where(ok, t, 0.0)
    pts = p0[:, None, :] + t[..., None] * d[:, None, :]
    return pts[ok]


def _orthonormal(r: np.ndarray) -> np.ndarray:
    """The rotation nearest to ``r`` (labels rounded to a few decimals, float32 matrices are only nearly
    orthonormal)."""
    u, _, vt = np.linalg.svd(r)
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] = -u[:, -1]
    return u @ vt


def _iou_pair(ca, sa, ra, cb, sb, rb) -> float:
    from scipy.spatial import ConvexHull
    from scipy.spatial import QhullError

    if not all(np.isfinite(x).all() for x in (ca, sa, ra, cb, sb, rb)):
        return math.nan  # a NaN box has no IoU (0 would count it as a miss)
    va, vb = box_volume(sa), box_volume(sb)
    if va <= 0 or vb <= 0:
        return 0.0
    ra, rb = _orthonormal(ra), _orthonormal(rb)
    scale = max(np.abs(sa).max(), np.abs(sb).max(), np.abs(ca).max(), np.abs(cb).max(), 1e-12)
    tol = 1e-7 * scale
    corners_a, corners_b = box_corners(ca, sa, ra), box_corners(cb, sb, rb)
    na, oa = _halfspaces(ca, sa, ra)
    nb, ob = _halfspaces(cb, sb, rb)
    # Quick rejection: separated along a face normal of either box.
    for normals, offsets, other in ((na, oa, corners_b), (nb, ob, corners_a)):
        if np.any(np.all(other @ normals.T >= offsets + tol, axis=0)):
            return 0.0
    candidates = [
        corners_a[_inside(corners_a, nb, ob, tol)],
        corners_b[_inside(corners_b, na, oa, tol)],
    ]
    for corners, normals, offsets, n2, o2 in ((corners_a, nb, ob, na, oa), (corners_b, na, oa, nb, ob)):
        pts = _edge_plane_points(corners, normals, offsets)
        if len(pts):
            # On an edge of one box and a face plane of the other: keep it when inside both.
            keep = _inside(pts, normals, offsets, tol) & _inside(pts, n2, o2, tol)
            candidates.append(pts[keep])
    pts = np.concatenate(candidates)
    if len(pts) < 4:
        return 0.0
    try:
        inter = ConvexHull(pts).volume
    except (QhullError, ValueError):  # flat intersection (touching boxes): no volume
        return 0.0
    inter = min(inter, va, vb)
    return float(inter / (va + vb - inter))


def box_iou_3d(center_a, size_a, rotation_a, center_b, size_b, rotation_b):
    """Exact IoU of two oriented boxes. Unbatched inputs ((3,), (3,), (3, 3)) give a float; batched inputs
    ((N, 3), (N, 3), (N, 3, 3)) give an (N,) float64 array. Accepts NumPy arrays or torch tensors."""
    ca, sa, ra = _np(center_a), _np(size_a), _np(rotation_a)
    cb, sb, rb = _np(center_b), _np(size_b), _np(rotation_b)
    batched = [x for x, unbatched in ((ca, 1), (sa, 1), (ra, 2), (cb, 1), (sb, 1), (rb, 2)) if x.ndim > unbatched]
    if not batched:
        return _iou_pair(ca, sa, ra, cb, sb, rb)
    # the batch size: of the batched arguments ((N, 3) centres and sizes, (N, 3, 3) rotations); a shared (3, 3)
    # rotation is not a batch of 3
    n = max(x.shape[0] for x in batched)

    def row(x, i, ndim):  # unbatched arguments are shared by every pair
        return x if x.ndim == ndim else x[i]

    return np.array([_iou_pair(row(ca, i, 1), row(sa, i, 1), row(ra, i, 2), row(cb, i, 1), row(sb, i, 1),
                               row(rb, i, 2)) for i in range(n)])


def project_points(points, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """OpenGL camera points (..., 3) -> pixels (..., 2): u = cx + fx X/(-Z), v = cy - fy Y/(-Z). Points at or behind
    the camera plane are clamped to a depth of 1e-6 (their pixels are then far off the image)."""
    p = _np(points)
    depth = np.maximum(-p[..., 2], 1e-6)
    return np.stack([cx + fx * p[..., 0] / depth, cy - fy * p[..., 1] / depth], axis=-1)


def rotation_between(a, b) -> np.ndarray:
    """The minimal rotation R (3, 3) with R @ a/|a| = b/|b| (Rodrigues); antiparallel vectors turn by pi about an
    axis perpendicular to a."""
    a = _np(a) / np.linalg.norm(_np(a))
    b = _np(b) / np.linalg.norm(_np(b))
    v = np.cross(a, b)
    c = float(a @ b)
    if c < -1 + 1e-12:
        axis = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(axis) < 1e-6:
            axis = np.cross(a, [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


@dataclass
class BoxFrame:
    """Everything box fitting reads from one frame (camera coordinates, pixels)."""

    center: np.ndarray  # (3,)
    size: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3)
    plane_normal: np.ndarray  # (3,) unit, towards the object
    plane_d: float
    intrinsics: tuple[float, float, float, float]  # fx, fy, cx, cy
    bbox: np.ndarray  # (4,) x0, y0, x1, y1


def _bounds(uv: np.ndarray) -> np.ndarray:
    return np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()])


def _diag(b: np.ndarray) -> float:
    return float(math.hypot(b[2] - b[0], b[3] - b[1]))


def _snap(pixel: np.ndarray, intr, normal: np.ndarray, plane_d: float, height: float, fallback_depth: float):
    """Point on the ray through ``pixel`` at ``height`` above the plane (n.x + d = height)."""
    fx, fy, cx, cy = intr
    ray = np.array([(pixel[0] - cx) / fx, -(pixel[1] - cy) / fy, -1.0])
    denom = float(normal @ ray)
    if abs(denom) > 1e-9:
        t = (height - plane_d) / denom
        if t > 1e-6:
            return t * ray
    return fallback_depth * ray  # ray parallel to the plane, or the plane is behind: keep the neighbour's depth


def fit_box(neighbor: BoxFrame, query: BoxFrame, iterations: int = 4, smoothing: float = 2.0, rescale: bool = True):
    """SiamPose's zero-shot fit of the neighbour's box into the query frame -> (center, size, rotation).

    Uses from the query only its 2D box, ground plane and intrinsics (never its 3D box).
    """
    align = rotation_between(neighbor.plane_normal, query.plane_normal)
    rotation = align @ neighbor.rotation
    size = np.abs(neighbor.size).astype(np.float64).copy()
    nb = neighbor.bbox
    n_proj = project_points(box_corners(neighbor.center, neighbor.size, neighbor.rotation), *neighbor.intrinsics)
    n_centre_px = project_points(neighbor.center, *neighbor.intrinsics)
    nw, nh = max(nb[2] - nb[0], 1e-9), max(nb[3] - nb[1], 1e-9)
    rel = np.array([(n_centre_px[0] - (nb[0] + nb[2]) / 2) / nw, (n_centre_px[1] - (nb[1] + nb[3]) / 2) / nh])
    qb = query.bbox
    qw, qh = qb[2] - qb[0], qb[3] - qb[1]
    pixel = np.array([(qb[0] + qb[2]) / 2 + rel[0] * qw, (qb[1] + qb[3]) / 2 + rel[1] * qh])
    height = float(neighbor.plane_normal @ neighbor.center + neighbor.plane_d)
    depth = float(-neighbor.center[2])
    center = _snap(pixel, query.intrinsics, query.plane_normal, query.plane_d, height, depth)
    if rescale:
        ratio = _diag(_bounds(n_proj)) / max(_diag(nb), 1e-12)
        target = _diag(qb) * ratio
        for _ in range(int(iterations)):
            fitted = _diag(_bounds(project_points(box_corners(center, size, rotation), *query.intrinsics)))
            if fitted <= 1e-12 or not math.isfinite(fitted):
                break
            s = target / fitted
            s = 1.0 + (s - 1.0) / smoothing
            size = size * s
            height *= s
            depth *= s
            center = _snap(pixel, query.intrinsics, query.plane_normal, query.plane_d, height, depth)
    return center, size, rotation


def box_frames_from_table(table) -> list[BoxFrame]:
    """The :class:`BoxFrame` of every row of a :class:`common.data.labels.LabelTable` with the sequence columns
    (rotation = angles_to_matrix(azimuth, elevation, tilt))."""
    from ..geometry import angles_to_matrix

    cols = {c: table.numeric(c) for c in BOX_COLUMNS}
    rots = angles_to_matrix(*table.angles.double().unbind(-1)).numpy()
    frames = []
    for i in range(len(table)):
        normal = np.array([cols["plane_nx"][i], cols["plane_ny"][i], cols["plane_nz"][i]])
        norm = np.linalg.norm(normal)
        frames.append(
            BoxFrame(
                center=np.array([cols["box_cx"][i], cols["box_cy"][i], cols["box_cz"][i]]),
                size=np.array([cols["box_sx"][i], cols["box_sy"][i], cols["box_sz"][i]]),
                rotation=rots[i],
                plane_normal=normal / norm,
                plane_d=float(cols["plane_d"][i]) / norm,
                intrinsics=(cols["fx"][i], cols["fy"][i], cols["cx"][i], cols["cy"][i]),
                bbox=np.array([cols["bbox_x0"][i], cols["bbox_y0"][i], cols["bbox_x1"][i], cols["bbox_y1"][i]]),
            )
        )
    return frames
