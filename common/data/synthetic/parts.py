"""Parametric parts and the triangle-soup mesh the renderer draws.

A category (``meshes.py``) or a head (``heads.py``) is a small function that adds coloured parts to a
:class:`Builder`: boxes, cylinders, cones, spheres/ellipsoids, capsules, tori, lathes (surfaces of revolution) and
convex prisms, all made with ``trimesh.creation`` and placed with a translation and optional rotations.
:meth:`Builder.build` concatenates them into a :class:`TriangleMesh` (per-vertex position, normal, colour).

Frame of every part: y up, +z the object's front (see ``render.py`` for the full camera convention).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import trimesh

__all__ = ["TriangleMesh", "Builder", "hsv", "rotation_about"]

Color = Sequence[float]


@dataclass
class TriangleMesh:
    """A triangle soup ready for the renderer.

    ``vertex_data``: (3 * n_triangles, 9) float32 rows (x, y, z, nx, ny, nz, r, g, b); ``extents``: the size of the
    axis-aligned bounding box (centred on the origin for objects); ``key``: a unique name used for GPU caching.
    """

    key: str
    vertex_data: np.ndarray
    extents: np.ndarray
    center: np.ndarray

    @property
    def n_triangles(self) -> int:
        return len(self.vertex_data) // 3

    @property
    def positions(self) -> np.ndarray:
        return self.vertex_data[:, :3]


def hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    """HSV in [0, 1] (hue wraps) -> RGB tuple."""
    return colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def rotation_about(axis: str, degrees: float) -> np.ndarray:
    """Right-handed 3x3 rotation about 'x', 'y' or 'z'."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"axis must be x, y or z, not {axis!r}")


# trimesh primitives are built along +z; these rotations send +z to the requested axis.
_AXIS_FROM_Z = {
    "x": rotation_about("y", 90), "-x": rotation_about("y", -90),
    "y": rotation_about("x", -90), "-y": rotation_about("x", 90),
    "z": np.eye(3), "-z": rotation_about("y", 180),
}


class Builder:
    """Collects coloured parts; ``rng`` (a numpy Generator) drives every random choice of one instance.

    Every ``add``-style method takes ``at`` (translation) and ``rotate``: a sequence of ``(axis, degrees)`` applied
    in order about the part's own origin before the translation. Methods return nothing; parts are kept in order.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.parts: list[tuple[trimesh.Trimesh, tuple[float, float, float], bool]] = []

    # ---- random helpers -------------------------------------------------------------------------------------
    def u(self, lo: float, hi: float) -> float:
        """Uniform float in [lo, hi)."""
        return float(self.rng.uniform(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    def integer(self, lo: int, hi: int) -> int:
        """Uniform int in [lo, hi] (inclusive)."""
        return int(self.rng.integers(lo, hi + 1))

    def color(self, hue: tuple[float, float] = (0.0, 1.0), sat: tuple[float, float] = (0.4, 0.8),
              val: tuple[float, float] = (0.5, 0.9)) -> tuple[float, float, float]:
        """A random colour with hue, saturation and value drawn from the given ranges."""
        return hsv(self.u(*hue), self.u(*sat), self.u(*val))

    def wood(self) -> tuple[float, float, float]:
        return self.color((0.05, 0.1), (0.45, 0.75), (0.3, 0.75))

    def metal(self) -> tuple[float, float, float]:
        g = self.u(0.45, 0.8)
        return (g, g, g * 1.02)

    def dark(self) -> tuple[float, float, float]:
        g = self.u(0.06, 0.16)
        return (g, g, g * 1.1)

    # ---- parts ----------------------------------------------------------------------------------------------
    def add(self, mesh: trimesh.Trimesh, color: Color, at=(0.0, 0.0, 0.0), rotate=(), smooth: bool = False,
            base: np.ndarray | None = None, scale=(1.0, 1.0, 1.0)) -> None:
        """Place ``mesh``: first ``base`` (a 3x3 matrix orienting a primitive), then ``scale`` along the object
        axes, then the ``rotate`` steps, then the translation ``at``."""
        M = np.diag(np.asarray(scale, dtype=np.float64))
        if base is not None:
            M = M @ np.asarray(base, dtype=np.float64)
        for axis, degrees in rotate:
            M = rotation_about(axis, degrees) @ M
        T = np.eye(4)
        T[:3, :3] = M
        T[:3, 3] = at
        mesh.apply_transform(T)
        self.parts.append((mesh, tuple(float(c) for c in color), smooth))

    def box(self, size, at, color: Color, rotate=()) -> None:
        self.add(trimesh.creation.box(extents=size), color, at, rotate)

    def cylinder(self, radius: float, length: float, at, color: Color, axis: str = "y", sections: int = 16,
                 rotate=(), scale=(1.0, 1.0, 1.0)) -> None:
        """A closed cylinder centred at ``at`` along ``axis`` (``scale`` makes elliptic ones)."""
        self.add(trimesh.creation.cylinder(radius=radius, height=length, sections=sections), color, at, rotate,
                 base=_AXIS_FROM_Z[axis], scale=scale)

    def rod(self, start, end, radius: float, color: Color, sections: int = 10) -> None:
        """A cylinder from point ``start`` to point ``end``."""
        mesh = trimesh.creation.cylinder(radius=radius, segment=[start, end], sections=sections)
        self.add(mesh, color)

    def cone(self, radius: float, length: float, at, color: Color, axis: str = "y", sections: int = 16,
             rotate=()) -> None:
        """A cone whose base is centred at ``at`` and whose apex points along ``axis`` (e.g. '-y')."""
        self.add(trimesh.creation.cone(radius=radius, height=length, sections=sections), color, at, rotate,
                 base=_AXIS_FROM_Z[axis])

    def cone_between(self, base_center, apex, radius: float, color: Color, sections: int = 16) -> None:
        """A cone from the centre of its base to its apex (any direction)."""
        base_center, apex = np.asarray(base_center, float), np.asarray(apex, float)
        v = apex - base_center
        self.add(trimesh.creation.cone(radius=radius, height=float(np.linalg.norm(v)), sections=sections), color,
                 base_center, base=_rotation_z_to(v))

    def sphere(self, radius: float, at, color: Color, scale=(1.0, 1.0, 1.0), subdivisions: int = 2,
               rotate=()) -> None:
        """A (smooth-shaded) sphere, or an ellipsoid with ``scale``."""
        mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
        self.add(mesh, color, at, rotate, smooth=True, scale=scale)

    def capsule(self, radius: float, length: float, at, color: Color, axis: str = "y", rotate=()) -> None:
        """A capsule of total length ``length`` (>= 2 radius) centred at ``at`` along ``axis``."""
        mesh = trimesh.creation.capsule(height=max(length - 2 * radius, 1e-4), radius=radius, count=[10, 10])
        self.add(mesh, color, at, rotate, smooth=True, base=_AXIS_FROM_Z[axis])

    def torus(self, major: float, minor: float, at, color: Color, axis: str = "z", rotate=(),
              sections: tuple[int, int] = (20, 8)) -> None:
        """A torus around ``axis`` (its hole looks along ``axis``)."""
        mesh = trimesh.creation.torus(major_radius=major, minor_radius=minor, major_sections=sections[0],
                                      minor_sections=sections[1])
        self.add(mesh, color, at, rotate, smooth=True, base=_AXIS_FROM_Z[axis])

    def lathe(self, profile: Sequence[tuple[float, float]], at, color: Color, sections: int = 24,
              smooth: bool = False, rotate=()) -> None:
        """A surface of revolution about the vertical axis: ``profile`` lists (radius, height) from bottom to top;
        start and end with radius 0 to close it."""
        mesh = trimesh.creation.revolve(np.asarray(profile, dtype=np.float64), sections=sections)
        self.add(mesh, color, at, rotate, smooth=smooth, base=_AXIS_FROM_Z["y"])

    def band(self, radius: float, y0: float, y1: float, color: Color, center_deg: float = 0.0,
             width_deg: float = 90.0, sections: int = 12) -> None:
        """A strip of a vertical cylinder (a label on a bottle): radius ``radius``, heights y0..y1, spanning
        ``width_deg`` around the direction (sin c, 0, cos c) with c = ``center_deg`` (0 = the front, +z)."""
        mesh = trimesh.creation.revolve(np.array([[radius, y0], [radius, y1]], dtype=np.float64),
                                        angle=math.radians(width_deg), sections=sections)
        # revolve sweeps object directions (sin p, 0, cos p) for p in [90, 90 + width] once +z is sent to +y
        self.add(mesh, color, rotate=(("y", center_deg - 90.0 - width_deg / 2.0),), base=_AXIS_FROM_Z["y"])

    def prism(self, outline: Sequence[tuple[float, float]], thickness: float, at, color: Color, axis: str = "y",
              rotate=()) -> None:
        """A convex polygon extruded by ``thickness`` (centred) along ``axis``.

        ``outline`` is given in the plane of the two other axes, in the order (x, z) for axis 'y', (z, y) for 'x'
        and (x, y) for 'z'.
        """
        pts = np.asarray(outline, dtype=np.float64)
        if _signed_area(pts) < 0:
            pts = pts[::-1]
        n = len(pts)
        h = thickness / 2.0
        # local frame: outline in (a, b), extrusion along c; (a, b, c) is right-handed
        bottom = np.column_stack([pts, np.full(n, -h)])
        top = np.column_stack([pts, np.full(n, h)])
        vertices = np.vstack([bottom, top])
        faces = []
        for i in range(1, n - 1):
            faces.append([0, i + 1, i])              # bottom cap, facing -c
            faces.append([n, n + i, n + i + 1])      # top cap, facing +c
        for i in range(n):
            j = (i + 1) % n
            faces.append([i, j, n + j])
            faces.append([i, n + j, n + i])
        if axis == "z":
            M = np.eye(3)                                   # (a, b, c) = (x, y, z)
        elif axis == "y":
            M = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]])  # (a, b, c) = (x, z, y)
        elif axis == "x":
            M = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])  # (a, b, c) = (z, y, x)
        else:
            raise ValueError(f"prism axis must be x, y or z, not {axis!r}")
        faces = np.asarray(faces)
        if np.linalg.det(M) < 0:  # a mirrored frame: flip the winding so normals point outwards
            faces = faces[:, ::-1]
        mesh = trimesh.Trimesh(vertices=vertices @ M.T, faces=faces, process=False)
        self.add(mesh, color, at, rotate)

    # ---- output ---------------------------------------------------------------------------------------------
    def build(self, key: str, normalize: bool = True) -> TriangleMesh:
        """Concatenate the parts. With ``normalize`` the bounding box is centred on the origin and scaled so that
        its half-diagonal is 1 (the object fits the unit sphere)."""
        if not self.parts:
            raise ValueError("no parts")
        all_vertices, all_faces, all_colors, offset = [], [], [], 0
        for mesh, color, _ in self.parts:
            all_vertices.append(np.asarray(mesh.vertices, dtype=np.float64))
            all_faces.append(np.asarray(mesh.faces) + offset)
            all_colors.append(np.broadcast_to(np.asarray(color, dtype=np.float64), (3 * len(mesh.faces), 3)))
            offset += len(mesh.vertices)
        vertices, faces = np.concatenate(all_vertices), np.concatenate(all_faces)
        data = np.concatenate([vertices[faces].reshape(-1, 3), corner_normals(vertices, faces),
                               np.concatenate(all_colors)], axis=1)
        lo, hi = data[:, :3].min(axis=0), data[:, :3].max(axis=0)
        center = (lo + hi) / 2.0
        if normalize:
            scale = 1.0 / (np.linalg.norm(hi - lo) / 2.0)
            data[:, :3] = (data[:, :3] - center) * scale
            extents, center = (hi - lo) * scale, np.zeros(3)
        else:
            extents = hi - lo
        return TriangleMesh(key=key, vertex_data=data.astype(np.float32), extents=extents, center=center)


def corner_normals(vertices: np.ndarray, faces: np.ndarray, crease_deg: float = 40.0) -> np.ndarray:
    """Per-corner normals (3F, 3), smooth across edges whose faces differ by less than ``crease_deg`` and sharp
    across creases: a cylinder gets a round side and flat caps, a box stays flat, a sphere is smooth."""
    import scipy.sparse

    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    face_n = cross / np.maximum(area2, 1e-20)[:, None]
    n_faces = len(faces)
    corner_vertex = faces.ravel()
    corner_face = np.repeat(np.arange(n_faces), 3)
    incidence = scipy.sparse.csr_matrix((np.ones(3 * n_faces), (corner_vertex, corner_face)),
                                        shape=(len(vertices), n_faces))
    incidence.sum_duplicates()
    per_corner = incidence[corner_vertex]                                  # corner -> faces sharing its vertex
    rows = np.repeat(np.arange(3 * n_faces), np.diff(per_corner.indptr))
    cols = per_corner.indices
    agree = np.einsum("ij,ij->i", face_n[corner_face[rows]], face_n[cols]) > math.cos(math.radians(crease_deg))
    weights = (agree * area2[cols])[:, None] * face_n[cols]
    out = np.zeros((3 * n_faces, 3))
    np.add.at(out, rows, weights)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 1e-12, out / np.maximum(norm, 1e-12), np.repeat(face_n, 3, axis=0))


def _rotation_z_to(v: np.ndarray) -> np.ndarray:
    """A rotation sending +z to the direction of ``v``."""
    v = np.asarray(v, dtype=np.float64)
    v = v / np.linalg.norm(v)
    z = np.array([0.0, 0.0, 1.0])
    c = float(np.dot(z, v))
    if c < -1 + 1e-9:
        return rotation_about("x", 180)
    k = np.cross(z, v)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + K + K @ K / (1.0 + c)


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
