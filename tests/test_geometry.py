"""Geometry against scipy: composition, round trips over every angle range, gimbal lock, wrap-around, slerp."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation, Slerp

from common.geometry import (angles_to_matrix, angular_difference, axis_rotation, fibonacci_sphere, geodesic_distance,
                             look_at_rotation, matrix_to_angles, matrix_to_rotation_6d, rotation_6d_to_matrix, slerp,
                             wrap_angle)

DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


def random_angles(n, seed=0, dtype=torch.float64):
    g = np.random.default_rng(seed)
    a = g.uniform(-math.pi, math.pi, n)
    e = g.uniform(-math.pi / 2, math.pi / 2, n)
    t = g.uniform(-math.pi, math.pi, n)
    return [torch.tensor(v, dtype=dtype) for v in (a, e, t)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_composition_matches_scipy_intrinsic_yxz(dtype):
    a, e, t = random_angles(500, dtype=dtype)
    R = angles_to_matrix(a, e, t)
    assert R.dtype == dtype and R.shape == (500, 3, 3)
    ref = Rotation.from_euler("YXZ", np.stack([a, e, t], 1).astype(np.float64)).as_matrix()
    np.testing.assert_allclose(R.double().numpy(), ref, atol=10 * _tol(dtype))


def test_elementary_rotations_are_right_handed():
    # +90 deg about z takes x to y; about x takes y to z; about y takes z to x.
    q = torch.tensor(math.pi / 2, dtype=torch.float64)
    ex, ey, ez = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(axis_rotation("z", q) @ ex, ey, atol=1e-12)
    assert torch.allclose(axis_rotation("x", q) @ ey, ez, atol=1e-12)
    assert torch.allclose(axis_rotation("y", q) @ ez, ex, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_range_and_scipy_branch(dtype):
    a, e, t = random_angles(2000, seed=1, dtype=dtype)
    a2, e2, t2 = matrix_to_angles(angles_to_matrix(a, e, t))
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert angular_difference(a, a2).max() < tol
    assert (e - e2).abs().max() < tol
    assert angular_difference(t, t2).max() < tol
    ref = Rotation.from_matrix(angles_to_matrix(a, e, t).double().numpy()).as_euler("YXZ")
    assert np.abs(np.angle(np.exp(1j * (ref[:, 0] - a2.double().numpy())))).max() < tol
    np.testing.assert_allclose(ref[:, 1], e2.double().numpy(), atol=tol)


def test_batched_leading_dims():
    a, e, t = (x.reshape(4, 5) for x in random_angles(20, seed=2))
    R = angles_to_matrix(a, e, t)
    assert R.shape == (4, 5, 3, 3)
    assert matrix_to_angles(R)[0].shape == (4, 5)


@pytest.mark.parametrize("el", [math.pi / 2, -math.pi / 2])
def test_gimbal_lock_reconstructs_the_rotation(el):
    a = torch.tensor([0.3, -1.0, 2.5], dtype=torch.float64)
    t = torch.tensor([0.7, 0.2, -2.0], dtype=torch.float64)
    R = angles_to_matrix(a, torch.full_like(a, el), t)
    a2, e2, t2 = matrix_to_angles(R)
    assert torch.allclose(e2, torch.full_like(a, el), atol=1e-6)
    assert torch.all(t2 == 0)
    assert geodesic_distance(R, angles_to_matrix(a2, e2, t2)).max() < 1e-6


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-3), (torch.float64, 1e-7)])
def test_near_gimbal_lock_round_trip_of_matrices_with_rounding_error(dtype, bound):
    """Elevation within 1e-1 .. 1e-11 rad of 90 deg, matrices built through a product (rounding errors of about eps
    in every entry, as a network's or a composed rotation has): the angles rebuild the rotation to within the bound.
    (The old lock band of 1e-6 in float64 cost 2e-6 rad just inside it.)"""
    n = 400
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    q = torch.tensor(Rotation.random(n, random_state=6).as_matrix())
    for d in [10 ** (-k / 4) for k in range(4, 45)]:
        for sign in (1.0, -1.0):
            a = torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3
            t = torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3
            exact = angles_to_matrix(a, torch.full_like(a, sign * (math.pi / 2 - d)), t)
            R = (exact @ q).to(dtype) @ q.transpose(-1, -2).to(dtype)
            back = angles_to_matrix(*(x.double() for x in matrix_to_angles(R)))
            worst = max(worst, geodesic_distance(exact, back).max().item())
    assert worst < bound


def test_plain_numbers_take_the_dtype_and_device_of_the_tensor_argument():
    d64 = torch.zeros(3, dtype=torch.float64)
    assert angles_to_matrix(0.1, d64, d64).dtype == torch.float64
    assert angles_to_matrix(0.1, 0.2, d64).dtype == torch.float64
    meta = torch.zeros(3, device="meta")
    assert angles_to_matrix(meta, 0.0, 0.0).device.type == "meta"
    assert angular_difference(meta, 0.5).device.type == "meta"


def test_angular_difference_wraps():
    deg = lambda x: torch.tensor(math.radians(x), dtype=torch.float64)
    assert math.isclose(math.degrees(angular_difference(deg(359), deg(1))), 2.0, abs_tol=1e-9)
    assert math.isclose(math.degrees(angular_difference(deg(-179), deg(179))), 2.0, abs_tol=1e-9)
    assert math.isclose(math.degrees(angular_difference(deg(0), deg(180))), 180.0, abs_tol=1e-9)
    assert math.isclose(math.degrees(angular_difference(deg(720 + 10), deg(0))), 10.0, abs_tol=1e-9)
    w = wrap_angle(torch.linspace(-20, 20, 101, dtype=torch.float64))
    assert w.min() >= -math.pi and w.max() < math.pi


@pytest.mark.parametrize("dtype", DTYPES)
def test_geodesic_against_scipy_including_near_0_and_pi(dtype):
    g = np.random.default_rng(3)
    R1 = Rotation.random(300, random_state=4)
    angles = np.concatenate([g.uniform(0, math.pi, 294), [0.0, 1e-7, 1e-4, math.pi - 1e-4, math.pi - 1e-7, math.pi]])
    axes = g.normal(size=(300, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    R2 = R1 * Rotation.from_rotvec(axes * angles[:, None])
    d = geodesic_distance(torch.tensor(R1.as_matrix(), dtype=dtype), torch.tensor(R2.as_matrix(), dtype=dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-13  # acos(trace) would be off by 1e-4 near 0 in float32
    np.testing.assert_allclose(d.double().numpy(), angles, atol=tol)


def test_geodesic_gradient_finite_at_identity_and_pi():
    R = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    R2 = torch.stack([torch.eye(3, dtype=torch.float64),
                      axis_rotation("x", torch.tensor(math.pi, dtype=torch.float64))])
    R2.requires_grad_(True)
    geodesic_distance(R, R2).sum().backward()
    assert torch.isfinite(R2.grad).all()


def test_fibonacci_sphere():
    p = fibonacci_sphere(50)
    assert p.shape == (50, 3)
    assert torch.allclose(p.norm(dim=1), torch.ones(50, dtype=p.dtype))
    # near-uniform: the mean is near zero and no two points coincide
    assert p.mean(0).norm() < 0.05
    d = torch.cdist(p, p) + torch.eye(50, dtype=p.dtype) * 10
    assert d.min() > 0.3
    assert not torch.equal(fibonacci_sphere(100)[:50], p)  # Fib(100) is a different set
    # the lattice itself (the Fib(50) / Fib(100) viewpoints): point i at height y = 1 - (2i + 1) / n on the y axis
    # (up), at longitude i x the golden angle, measured from +x towards +z
    i = np.arange(50)
    np.testing.assert_allclose(p[:, 1].numpy(), 1 - (2 * i + 1) / 50, atol=1e-14)
    longitude = np.arctan2(p[:, 2].numpy(), p[:, 0].numpy())
    golden = np.pi * (3 - np.sqrt(5))
    np.testing.assert_allclose(np.angle(np.exp(1j * (longitude - i * golden))), 0, atol=1e-12)
    with pytest.raises(ValueError):
        fibonacci_sphere(0)


def test_look_at_rotation_points_camera_at_object():
    dirs = fibonacci_sphere(50)
    R = look_at_rotation(dirs)
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=R.dtype)
    assert torch.allclose(R @ dirs.unsqueeze(-1), ez.expand(50, 3).unsqueeze(-1), atol=1e-9)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=R.dtype).expand(50, 3, 3), atol=1e-9)
    assert torch.allclose(torch.det(R), torch.ones(50, dtype=R.dtype))
    # the world up (+y) stays in the upper half of the image (positive camera y)
    up_cam = R @ torch.tensor([0.0, 1.0, 0.0], dtype=R.dtype)
    assert (up_cam[:, 1] >= -1e-9).all()
    assert torch.allclose(up_cam[:, 0], torch.zeros(50, dtype=R.dtype), atol=1e-9)  # ... straight up: no roll
    # at the north pole R_x(90 deg), the limit of cameras in front of the object (+z) rising over the top
    pole = Rotation.from_euler("x", 90, degrees=True).as_matrix()
    np.testing.assert_allclose(look_at_rotation(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).numpy(), pole,
                               atol=1e-12)
    near = torch.nn.functional.normalize(torch.tensor([0.0, 1.0, 1e-7], dtype=torch.float64), dim=0)
    np.testing.assert_allclose(look_at_rotation(near).numpy(), pole, atol=1e-6)


def test_slerp_matches_scipy_and_builds_symmetric_triplets():
    R0 = Rotation.random(20, random_state=5)
    R1 = R0 * Rotation.from_rotvec(np.random.default_rng(6).normal(size=(20, 3)) * 0.5)
    A = torch.tensor(R0.as_matrix())
    B = torch.tensor(R1.as_matrix())
    for t in (0.0, 0.25, 0.5, 1.0):
        ours = slerp(A, B, t).numpy()
        ref = np.stack([Slerp([0, 1], Rotation.concatenate([R0[i], R1[i]]))(t).as_matrix() for i in range(20)])
        np.testing.assert_allclose(ours, ref, atol=1e-9)
    right = slerp(A, B, 2.0)  # L = A, C = B: R is the same geodesic step past C
    assert torch.allclose(geodesic_distance(A, B), geodesic_distance(B, right), atol=1e-9)
    two_steps = 2 * geodesic_distance(A, B)  # folded back onto [0, pi] where two steps pass half a turn
    assert torch.allclose(geodesic_distance(A, right), math.pi - (math.pi - two_steps).abs(), atol=1e-9)


def test_rotation_6d_round_trip():
    R = torch.tensor(Rotation.random(10, random_state=7).as_matrix())
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_rotation_6d(R)), R, atol=1e-12)
    M = rotation_6d_to_matrix(torch.randn(10, 6, dtype=torch.float64))
    assert torch.allclose(M @ M.transpose(1, 2), torch.eye(3, dtype=M.dtype).expand(10, 3, 3), atol=1e-12)
    assert torch.allclose(torch.det(M), torch.ones(10, dtype=M.dtype))
