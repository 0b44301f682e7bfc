"""Exact oriented-box IoU (known cases, Monte-Carlo) and SiamPose box fitting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from common.eval import box_iou_3d
from common.eval.boxes import BoxFrame, box_corners, fit_box, project_points, rotation_between

I = np.eye(3)


def _rz(deg):
    return Rotation.from_euler("z", deg, degrees=True).as_matrix()


def test_known_cases():
    assert box_iou_3d([0, 0, 0], [1, 2, 3], I, [0, 0, 0], [1, 2, 3], I) == pytest.approx(1.0)
    assert box_iou_3d([0, 0, 0], [1, 1, 1], I, [3, 0, 0], [1, 1, 1], I) == 0.0  # disjoint
    assert box_iou_3d([0, 0, 0], [1, 1, 1], I, [1, 0, 0], [1, 1, 1], I) == 0.0  # touching faces
    # Nested: the small box inside the large one -> V_small / V_large.
    assert box_iou_3d([0, 0, 0], [2, 2, 2], I, [0.3, -0.2, 0.1], [1, 1, 1], I) == pytest.approx(1 / 8)
    # Half overlap along x.
    assert box_iou_3d([0, 0, 0], [2, 1, 1], I, [1, 0, 0], [2, 1, 1], I) == pytest.approx(1 / 3)
    # Rotated 90 deg about z: a (2, 1, 1) box turned is the (1, 2, 1) box.
    assert box_iou_3d([0, 0, 0], [2, 1, 1], I, [0, 0, 0], [1, 2, 1], _rz(90)) == pytest.approx(1.0)
    # The same (2, 1, 1) box turned 90 deg: a 1x1x1 cross-section -> 1 / (2 + 2 - 1).
    assert box_iou_3d([0, 0, 0], [2, 1, 1], I, [0, 0, 0], [2, 1, 1], _rz(90)) == pytest.approx(1 / 3)
    # A unit cube rotated 45 deg about z inside itself: octagon prism area 2(sqrt2 - 1)*... known: 4(sqrt2-1)/ (2 - ...)
    inter = 2 * (math.sqrt(2) - 1)  # area of the regular octagon common to the two unit squares
    assert box_iou_3d([0, 0, 0], [1, 1, 1], I, [0, 0, 0], [1, 1, 1], _rz(45)) == pytest.approx(inter / (2 - inter))


def test_symmetric_and_scale_invariant():
    rng = np.random.default_rng(0)
    ra, rb = Rotation.random(2, random_state=1).as_matrix()
    ca, cb = rng.normal(size=3) * 0.3, rng.normal(size=3) * 0.3
    sa, sb = rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    a = box_iou_3d(ca, sa, ra, cb, sb, rb)
    assert box_iou_3d(cb, sb, rb, ca, sa, ra) == pytest.approx(a, rel=1e-9)
    assert box_iou_3d(3 * ca, 3 * sa, ra, 3 * cb, 3 * sb, rb) == pytest.approx(a, rel=1e-9)


def _monte_carlo(ca, sa, ra, cb, sb, rb, n, rng):
    pts = np.concatenate([box_corners(ca, sa, ra), box_corners(cb, sb, rb)])
    lo, hi = pts.min(0), pts.max(0)
    p = rng.uniform(lo, hi, (n, 3))
    ina = np.all(np.abs((p - ca) @ ra) <= np.asarray(sa) / 2, 1)
    inb = np.all(np.abs((p - cb) @ rb) <= np.asarray(sb) / 2, 1)
    return (ina & inb).sum() / (ina | inb).sum()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_against_monte_carlo(seed):
    rng = np.random.default_rng(seed)
    ra, rb = Rotation.random(2, random_state=seed + 10).as_matrix()
    ca, cb = rng.normal(size=3) * 0.25, rng.normal(size=3) * 0.25
    sa, sb = rng.uniform(0.6, 1.8, 3), rng.uniform(0.6, 1.8, 3)
    exact = box_iou_3d(ca, sa, ra, cb, sb, rb)
    mc = _monte_carlo(ca, sa, ra, cb, sb, rb, 300_000, rng)
    assert exact == pytest.approx(mc, abs=0.01)


def test_nearly_orthonormal_rotations():
    # A float32 rotation matrix is orthonormal only to ~1e-7: identical boxes must still give IoU 1.
    r = Rotation.from_euler("YXZ", [0.7, 0.35, 0.1]).as_matrix().astype(np.float32).astype(np.float64)
    assert box_iou_3d([0.3, -0.4, -5.0], [1.0, 0.6, 1.4], r,
                      [0.3, -0.4, -5.0], [1.0, 0.6, 1.4], r) == pytest.approx(1.0)


def test_batched_and_torch_inputs():
    rng = np.random.default_rng(4)
    rots = Rotation.random(6, random_state=4).as_matrix()
    c = rng.normal(size=(6, 3)) * 0.3
    s = rng.uniform(0.5, 1.5, (6, 3))
    batched = box_iou_3d(c[:3], s[:3], rots[:3], c[3:], s[3:], rots[3:])
    single = [box_iou_3d(c[i], s[i], rots[i], c[i + 3], s[i + 3], rots[i + 3]) for i in range(3)]
    np.testing.assert_allclose(batched, single)
    for n in (1, 2, 3):  # a shared rotation (3, 3) beside batched centres and sizes
        shared = box_iou_3d(c[:n], s[:n], rots[0], c[3:3 + n], s[3:3 + n], rots[3])
        np.testing.assert_allclose(shared, [box_iou_3d(c[i], s[i], rots[0], c[i + 3], s[i + 3], rots[3])
                                            for i in range(n)])
    # a shared box A against a batch of boxes B (only B batched) and a batched rotation alone
    one_a = box_iou_3d(c[0], s[0], rots[0], c[3:], s[3:], rots[3:])
    np.testing.assert_allclose(one_a, [box_iou_3d(c[0], s[0], rots[0], c[i], s[i], rots[i]) for i in range(3, 6)])
    turned = box_iou_3d(np.zeros(3), np.ones(3), np.eye(3), np.zeros(3), np.ones(3),
                        Rotation.from_euler("z", [[0], [45]], degrees=True).as_matrix())
    assert turned.shape == (2,) and turned[0] == pytest.approx(1.0)
    assert turned[1] == pytest.approx(box_iou_3d(np.zeros(3), np.ones(3), np.eye(3), np.zeros(3), np.ones(3),
                                                 Rotation.from_euler("z", 45, degrees=True).as_matrix()))
    assert math.isnan(box_iou_3d(c[0], s[0] * np.nan, rots[0], c[3], s[3], rots[3]))  # not 0: not a miss
    t = box_iou_3d(torch.tensor(c[0]), torch.tensor(s[0]), torch.tensor(rots[0]), torch.tensor(c[3]),
                   torch.tensor(s[3]), torch.tensor(rots[3]))
    assert t == pytest.approx(single[0])


def test_rotation_between():
    rng = np.random.default_rng(5)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = rotation_between(a, b)
        np.testing.assert_allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b), atol=1e-12)
        np.testing.assert_allclose(r @ r.T, I, atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    r = rotation_between([0, 1, 0], [0, -1, 0])
    np.testing.assert_allclose(r @ [0, 1, 0], [0, -1, 0], atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def _frame(center, size, az, el, intr=(60.0, 60.0, 32.0, 32.0), shrink=0.0) -> BoxFrame:
    """A box standing on a ground plane whose normal is the box's up axis; 2D box = projected 3D box bounds,
    optionally shrunk by ``shrink`` of its size on each side (a tighter 'object' box)."""
    from common.geometry import angles_to_matrix

    rot = angles_to_matrix(torch.tensor(az, dtype=torch.float64), torch.tensor(el, dtype=torch.float64),
                           torch.tensor(0.0, dtype=torch.float64)).numpy()
    n = rot[:, 1]
    center = np.asarray(center, dtype=float)
    d = -(n @ center) + size[1] / 2  # the plane through the bottom face
    uv = project_points(box_corners(center, size, rot), *intr)
    b = np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()])
    w, h = b[2] - b[0], b[3] - b[1]
    b = b + shrink * np.array([w, h, -w, -h])
    return BoxFrame(center, np.asarray(size, dtype=float), rot, n, float(d), intr, b)


@pytest.mark.parametrize("shrink", [0.0, 0.1])
def test_fit_recovers_the_box_from_itself(shrink):
    q = _frame([0.3, -0.4, -5.0], [1.0, 0.6, 1.4], 0.7, 0.35, shrink=shrink)
    c, s, r = fit_box(q, q)
    np.testing.assert_allclose(c, q.center, atol=1e-9)
    np.testing.assert_allclose(s, q.size, atol=1e-9)
    np.testing.assert_allclose(r, q.rotation, atol=1e-12)
    assert box_iou_3d(c, s, r, q.center, q.size, q.rotation) == pytest.approx(1.0, abs=1e-9)


def test_fit_moves_scales_and_aligns_a_neighbour():
    # The same object (same camera-relative yaw) seen elsewhere, bigger, under another camera pitch.
    nb = _frame([-0.5, -0.6, -4.0], [0.5, 0.3, 0.7], 0.5, 0.2)
    q = _frame([0.4, -0.2, -6.0], [1.0, 0.6, 1.4], 0.5, 0.45)
    c, s, r = fit_box(nb, q, iterations=12)
    # Up axis aligned with the query plane normal.
    np.testing.assert_allclose(r[:, 1], q.plane_normal, atol=1e-9)
    # Centre on the query plane at a height proportional to the scale, size scaled isotropically.
    ratio = s / nb.size
    np.testing.assert_allclose(ratio, ratio[0])
    assert q.plane_normal @ c + q.plane_d == pytest.approx(nb.size[1] / 2 * ratio[0], rel=1e-9)
    # Projected 2D diagonal matches the query box after the iterations, and the fit overlaps the truth well.
    uv = project_points(box_corners(c, s, r), *q.intrinsics)
    diag = math.hypot(uv[:, 0].max() - uv[:, 0].min(), uv[:, 1].max() - uv[:, 1].min())
    assert diag == pytest.approx(math.hypot(q.bbox[2] - q.bbox[0], q.bbox[3] - q.bbox[1]), rel=1e-3)
    assert box_iou_3d(c, s, r, q.center, q.size, q.rotation) > 0.5
    # Without rescaling the box keeps the neighbour's size.
    _, s0, _ = fit_box(nb, q, rescale=False)
    np.testing.assert_allclose(s0, nb.size)
