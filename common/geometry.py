"""Rotation geometry, one convention for the whole project.

Viewpoint = (azimuth, elevation, tilt) in **radians** (degrees only at user-facing edges: CSV, tables, CLI).

    R = R_y(azimuth) @ R_x(elevation) @ R_z(tilt)

with right-handed elementary rotations. This is SSV's composition and scipy's intrinsic ``'YXZ'`` Euler order:
``Rotation.from_euler('YXZ', [azimuth, elevation, tilt]).as_matrix()``. R maps object coordinates to camera
coordinates (x right, y down the image is NOT assumed: y is the camera's vertical axis, z points to the camera).

Every function is batched over leading dimensions and keeps the dtype (float32 or float64) and device of its input.
"""
from __future__ import annotations

import math

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

__all__ = [
    "angles_to_matrix",
    "matrix_to_angles",
    "angular_difference",
    "flip_angles",
    "wrap_angle",
    "geodesic_distance",
    "fibonacci_sphere",
    "look_at_rotation",
    "slerp",
    "axis_rotation",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
]


def _as_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a tensor; a plain number or array takes ``like``'s dtype and device (else the default dtype)."""
    if isinstance(x, torch.Tensor):
        return x
    if like is None:
        return torch.as_tensor(x, dtype=torch.get_default_dtype())
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def axis_rotation(axis: str, angle: torch.Tensor) -> torch.Tensor:
    """Elementary right-handed rotation about ``axis`` in {'x', 'y', 'z'}; (...,) -> (..., 3, 3)."""
    angle = _as_tensor(angle)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "x":
        rows = (one, zero, zero, zero, c, -s, zero, s, c)
    elif axis == "y":
        rows = (c, zero, s, zero, one, zero, -s, zero, c)
    elif axis == "z":
        rows = (c, -s, zero, s, c, zero, zero, zero, one)
    else:
        raise ValueError(f"axis must be 'x', 'y' or 'z', not {axis!r}")
    return torch.stack(rows, dim=-1).reshape(*angle.shape, 3, 3)


def angles_to_matrix(azimuth, elevation, tilt) -> torch.Tensor:
    """(azimuth, elevation, tilt), each (...,) radians -> R = R_y(az) R_x(el) R_z(tilt), (..., 3, 3)."""
    like = next((x for x in (azimuth, elevation, tilt) if isinstance(x, torch.Tensor)), None)
    azimuth, elevation, tilt = (_as_tensor(x, like) for x in (azimuth, elevation, tilt))
    azimuth, elevation, tilt = torch.broadcast_tensors(azimuth, elevation, tilt)
    return axis_rotation("y", azimuth) @ axis_rotation("x", elevation) @ axis_rotation("z", tilt)


def matrix_to_angles(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`angles_to_matrix`: (..., 3, 3) -> (azimuth, elevation, tilt), each (...,).

    Ranges: azimuth and tilt in (-pi, pi], elevation in [-pi/2, pi/2] (the same branch as scipy's ``as_euler('YXZ')``).
    At the gimbal lock (|elevation| = pi/2) only azimuth - sign(el) * tilt is defined; tilt is set to 0 there.
    """
    R = _as_tensor(R)
    r02, r12, r22 = R[..., 0, 2], R[..., 1, 2], R[..., 2, 2]
    r10, r11 = R[..., 1, 0], R[..., 1, 1]
    cos_el = torch.sqrt(r02 * r02 + r22 * r22)
    elevation = torch.atan2(-r12, cos_el)
    # Lock below sqrt(eps): there, setting tilt to 0 costs a rotation error of about 2 cos_el, while the two atan2s
    # of entries of size cos_el carrying rounding errors of about eps (a matrix built by products) would cost about
    # eps / cos_el; sqrt(eps) balances the two (worst case about 6e-4 rad in float32, 3e-8 in float64).
    locked = cos_el < math.sqrt(torch.finfo(R.dtype).eps)
    azimuth = torch.atan2(r02, r22)
    tilt = torch.atan2(r10, r11)
    # Gimbal lock: R = R_y(az) R_x(+-pi/2) with tilt folded into az; with tilt = 0, R00 = cos az, R01 = sin az * sin el.
    sin_el = torch.sign(-r12)
    az_locked = torch.atan2(sin_el * R[..., 0, 1], R[..., 0, 0])
    azimuth = torch.where(locked, az_locked, azimuth)
    tilt = torch.where(locked, torch.zeros_like(tilt), tilt)
    return azimuth, elevation, tilt


def flip_angles(angles: torch.Tensor) -> torch.Tensor:
    """Viewpoint of the horizontally mirrored image: (..., 3) (a, e, t) -> (..., 3) (-a, e, -t). Exact for a frame whose
    azimuth 0 / tilt 0 view is the mirror-symmetric one (a head facing the camera; SSV's L_sym trains V's frame so)."""
    sign = torch.tensor([-1.0, 1.0, -1.0], dtype=angles.dtype, device=angles.device)
    return angles * sign


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap radians to [-pi, pi)."""
    angle = _as_tensor(angle)
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def angular_difference(a, b) -> torch.Tensor:
    """Absolute difference of two angles (radians) on the circle, in [0, pi]: 359 deg vs 1 deg is 2 deg."""
    a = _as_tensor(a)
    b = _as_tensor(b, a)
    return wrap_angle(a - b).abs()


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle of R1^T R2 in radians, in [0, pi]; (..., 3, 3) x (..., 3, 3) -> (...,).

    Uses atan2(|sin|, cos) from the skew and trace parts, which stays accurate near 0 and near pi (unlike acos of the
    trace), and has finite gradients everywhere (0 at identical rotations).
    """
    M = R1.transpose(-1, -2) @ R2
    cos = (M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1.0) / 2.0
    skew = torch.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], dim=-1
    )
    sin = torch.linalg.vector_norm(skew, dim=-1) / 2.0
    return torch.atan2(sin, cos)


def fibonacci_sphere(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` near-uniform unit vectors on the sphere (Fibonacci lattice), (n, 3).

    These are the Fib(n) viewpoint sets of the trajectory paper: Fib(50) in-domain, Fib(100) out-of-domain.
    Deterministic; point i has height 1 - (2i + 1)/n and longitude i * golden angle.
    """
    if n < 1:
        raise ValueError(f"fibonacci_sphere needs n >= 1, got {n}")
    i = torch.arange(n, dtype=dtype)
    y = 1.0 - (2.0 * i + 1.0) / n
    radius = torch.sqrt((1.0 - y * y).clamp_min(0.0))
    golden = math.pi * (3.0 - math.sqrt(5.0))
    phi = i * golden
    return torch.stack([radius * torch.cos(phi), y, radius * torch.sin(phi)], dim=-1)


def look_at_rotation(direction: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Object rotation R (object -> camera) for a camera placed along the unit ``direction`` (object coordinates),
    looking at the origin, with the object's ``up`` (default +y) kept upright in the image. (..., 3) -> (..., 3, 3).

    The camera's z axis points from the object towards the camera, so ``R @ direction = (0, 0, 1)``.
    When ``direction`` is parallel to ``up`` the object's -z axis is used as the up vector instead (the limit of the
    camera's up vector over the top of the sphere: R_x(90 deg) at the north pole).
    """
    d = torch.nn.functional.normalize(_as_tensor(direction), dim=-1)
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], dtype=d.dtype, device=d.device).expand_as(d)
    up = _as_tensor(up, d).expand_as(d)
    alt = torch.tensor([0.0, 0.0, -1.0], dtype=d.dtype, device=d.device).expand_as(d)
    parallel = torch.linalg.vector_norm(torch.cross(up, d, dim=-1), dim=-1, keepdim=True) < 1e-6
    up = torch.where(parallel, alt, up)
    x = torch.nn.functional.normalize(torch.cross(up, d, dim=-1), dim=-1)
    y = torch.cross(d, x, dim=-1)
    # Rows of R are the camera axes expressed in object coordinates.
    return torch.stack([x, y, d], dim=-2)


def slerp(R0: torch.Tensor, R1: torch.Tensor, t) -> torch.Tensor:
    """Geodesic interpolation of rotations: R0 @ exp(t * log(R0^T R1)); (..., 3, 3) -> (..., 3, 3).

    ``t`` may lie outside [0, 1]: ``slerp(R_L, R_C, 2)`` is the right view of a symmetric (L, C, R) triplet, the same
    geodesic step past the centre (R_R = R_C R_L^T R_C).
    """
    rel = R0.transpose(-1, -2) @ R1
    axis_angle = rotation_matrix_to_axis_angle(rel.reshape(-1, 3, 3)).reshape(*rel.shape[:-2], 3)
    t = _as_tensor(t, axis_angle)
    if t.dim() > 0:
        t = t.unsqueeze(-1)
    step = axis_angle_to_rotation_matrix((axis_angle * t).reshape(-1, 3)).reshape(rel.shape)
    return R0 @ step


def rotation_6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Continuous 6-D rotation representation (Zhou et al., CVPR 2019) -> rotation matrix; (..., 6) -> (..., 3, 3).

    The two 3-vectors are orthonormalised by Gram-Schmidt and become the first two **columns** of R.
    """
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotation_6d_to_matrix` on rotation matrices: the first two columns; (..., 3, 3) -> (..., 6)."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)
