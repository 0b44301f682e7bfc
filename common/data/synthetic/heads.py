"""Procedural heads: the 300W-LP analog of the synthetic benchmark (for SSV).

A head faces +z with y up (the object frame of ``render.py``); the origin is the centre of the skull, so pose
rotations turn the head about its own centre. Features break the symmetries a pose learner must not be fooled by:
nose, eyes, brows and mouth mark the front and the up/down direction, hair covers the top and the back, ears mark
the sides. Identity varies by skull and jaw proportions, feature sizes and placement, skin, eye and hair colour, hair
style and glasses.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .meshes import instance_rng
from .parts import Builder, TriangleMesh

__all__ = ["build_head", "SKIN_TONES"]

#: Skin tones from light to dark (RGB), interpolated per identity.
SKIN_TONES = np.array([
    (0.96, 0.80, 0.69), (0.91, 0.72, 0.58), (0.80, 0.60, 0.45), (0.66, 0.46, 0.32), (0.48, 0.32, 0.21),
    (0.33, 0.22, 0.15),
])
HAIR_COLORS = [(0.05, 0.04, 0.03), (0.22, 0.13, 0.07), (0.45, 0.3, 0.15), (0.8, 0.65, 0.35), (0.55, 0.2, 0.08),
               (0.6, 0.6, 0.6), (0.85, 0.85, 0.82)]
EYE_COLORS = [(0.25, 0.15, 0.08), (0.12, 0.08, 0.05), (0.2, 0.4, 0.6), (0.25, 0.45, 0.3), (0.4, 0.35, 0.2)]


def _surface_z(x: float, y: float, rx: float, ry: float, rz: float) -> float:
    """z of the front of the skull ellipsoid at (x, y)."""
    q = 1.0 - (x / rx) ** 2 - (y / ry) ** 2
    return rz * math.sqrt(max(q, 0.0))


def head(b: Builder) -> None:
    """Add one head's parts to ``b``."""
    rx, ry, rz = b.u(0.74, 0.86), b.u(0.95, 1.08), b.u(0.88, 1.0)
    t = b.u(0, 1) * (len(SKIN_TONES) - 1)
    i = min(int(t), len(SKIN_TONES) - 2)
    skin = tuple(SKIN_TONES[i] + (SKIN_TONES[i + 1] - SKIN_TONES[i]) * (t - i) + b.rng.normal(0, 0.02, 3))
    skin = tuple(float(min(max(c, 0.0), 1.0)) for c in skin)
    darker = tuple(c * 0.85 for c in skin)
    hair = b.choice(HAIR_COLORS)
    # skull, jaw and neck
    b.sphere(1.0, (0, 0, 0), skin, scale=(rx, ry, rz), subdivisions=2)
    jaw_w, jaw_y = b.u(0.5, 0.65), b.u(-0.5, -0.4)
    b.sphere(1.0, (0, jaw_y, 0.28), skin, scale=(jaw_w, 0.45, 0.62), subdivisions=2)
    neck_r = b.u(0.32, 0.42)
    b.cylinder(neck_r, 1.4, (0, -1.2, -0.12), skin, sections=20)
    # eyes, irises and brows
    ex, ey = b.u(0.26, 0.34), b.u(0.08, 0.18)
    eye_r = b.u(0.085, 0.11)
    iris = b.choice(EYE_COLORS)
    for sx in (-1, 1):
        z = _surface_z(ex, ey, rx, ry, rz) - eye_r * 0.45
        b.sphere(eye_r, (sx * ex, ey, z), (0.95, 0.95, 0.93), scale=(1.0, 0.8, 0.8), subdivisions=1)
        b.sphere(eye_r * 0.5, (sx * ex, ey, z + eye_r * 0.62), iris, scale=(1.0, 1.0, 0.5), subdivisions=1)
        brow_y = ey + b.u(0.14, 0.2)
        b.box((0.26, b.u(0.035, 0.06), 0.06), (sx * ex, brow_y, _surface_z(ex, brow_y, rx, ry, rz) - 0.01), hair,
              rotate=(("z", sx * b.u(-12, 8)),))
    # nose and mouth
    nl = b.u(0.22, 0.32)
    ny = ey - 0.12 - nl / 2
    b.sphere(1.0, (0, ny, _surface_z(0, ny, rx, ry, rz) + b.u(0.02, 0.06)), darker,
             scale=(b.u(0.09, 0.13), nl / 2, b.u(0.12, 0.17)), rotate=(("x", -18),), subdivisions=2)
    my = ny - nl / 2 - b.u(0.1, 0.16)
    lips = (min(skin[0] * 0.95 + 0.1, 1.0), skin[1] * 0.55, skin[2] * 0.55)
    mz = max(_surface_z(0, my, rx, ry, rz), 0.28 + 0.62 * math.sqrt(max(1 - ((my - jaw_y) / 0.45) ** 2, 0)))
    b.sphere(1.0, (0, my, mz - 0.02), lips, scale=(b.u(0.16, 0.24), b.u(0.035, 0.06), 0.06), subdivisions=1)
    # ears
    for sx in (-1, 1):
        b.sphere(1.0, (sx * rx, b.u(-0.05, 0.05), -0.05), darker, scale=(0.09, b.u(0.17, 0.22), 0.13),
                 rotate=(("y", sx * 15),), subdivisions=1)
    # hair
    style = b.choice(["short", "short", "long", "bun", "bald"])
    if style != "bald":
        back = b.u(0.1, 0.2)
        b.sphere(1.0, (0, 0.14, -back), hair, scale=(rx + 0.02, ry + 0.05, rz - 0.01), subdivisions=2)
        if style == "long":
            b.sphere(1.0, (0, -0.45, -0.35), hair, scale=(rx + 0.06, 0.9, 0.6), subdivisions=2)
        elif style == "bun":
            b.sphere(0.28, (0, 0.75, -0.6), hair, subdivisions=2)
    else:
        b.sphere(1.0, (0, -0.05, -0.25), hair, scale=(rx + 0.015, 0.55, rz * 0.8), subdivisions=2)
    # glasses
    if b.chance(0.2):
        frame = b.choice([(0.05, 0.05, 0.05), (0.5, 0.35, 0.2), (0.7, 0.7, 0.72)])
        z = _surface_z(ex, ey, rx, ry, rz) + 0.03
        for sx in (-1, 1):
            b.torus(eye_r * 1.7, 0.02, (sx * ex, ey, z), frame, axis="z", sections=(16, 5))
        b.box((2 * ex - 3 * eye_r, 0.03, 0.03), (0, ey + eye_r * 0.3, z), frame)


@lru_cache(maxsize=1024)
def build_head(identity: int, seed: int = 0) -> TriangleMesh:
    """Head ``identity`` of benchmark ``seed`` (not normalised: the skull, about 1.6 x 2 x 1.9, is centred on the
    origin). Cached per process."""
    b = Builder(instance_rng(seed, "head", identity))
    head(b)
    return b.build(key=f"head/{seed}/{identity}", normalize=False)

