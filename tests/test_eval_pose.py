"""Viewpoint errors, SSV's calibrated protocol and kNN pose against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from common.eval import calibrated_viewpoint_errors, evaluate_viewpoints, knn_pose, viewpoint_errors
from common.eval.pose import (VIEWPOINT_KEYS, calibration_split, chordal_mean, circular_fit,
                              fit_angle_calibration)
from common.geometry import angles_to_matrix, fibonacci_sphere, look_at_rotation

R = math.radians


def test_keys_and_identity():
    a = torch.tensor([[0.1, 0.2, 0.3], [1.0, -0.5, 2.0]], dtype=torch.float64)
    out = viewpoint_errors(a, a)
    assert tuple(out) == VIEWPOINT_KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert out["mae"] == pytest.approx(0, abs=1e-9) and out["median_geodesic"] == pytest.approx(0, abs=1e-5)
    assert out["acc_pi_6"] == 1.0


def test_wrap_around():
    pred = torch.tensor([[R(359), R(0), R(-179)]])
    true = torch.tensor([[R(1), R(0), R(179)]])
    out = viewpoint_errors(pred, true)
    assert out["azimuth_mae"] == pytest.approx(2.0, abs=1e-4)
    assert out["tilt_mae"] == pytest.approx(2.0, abs=1e-4)
    assert out["elevation_mae"] == pytest.approx(0.0, abs=1e-6)
    assert out["mae"] == pytest.approx(4.0 / 3.0, abs=1e-4)


def test_against_independent_numpy_and_scipy():
    rng = np.random.default_rng(0)
    true = rng.uniform([-math.pi, -1.2, -math.pi], [math.pi, 1.2, math.pi], (300, 3))
    pred = true + rng.normal(0, 0.4, (300, 3))
    out = viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(true))
    diff = np.abs((pred - true + np.pi) % (2 * np.pi) - np.pi)
    for j, name in enumerate(("azimuth", "elevation", "tilt")):
        assert out[f"{name}_mae"] == pytest.approx(np.degrees(diff[:, j]).mean(), rel=1e-9)
    rp = Rotation.from_euler("YXZ", pred)
    rt = Rotation.from_euler("YXZ", true)
    geo = np.degrees((rp.inv() * rt).magnitude())
    assert out["median_geodesic"] == pytest.approx(np.median(geo), rel=1e-6)
    assert out["acc_pi_6"] == pytest.approx(np.mean(geo < 30.0))


def test_known_geodesic_errors():
    true = torch.zeros(4, 3, dtype=torch.float64)
    pred = torch.tensor([[0, 0, R(10)], [0, 0, R(20)], [0, 0, R(40)], [0, 0, R(50)]], dtype=torch.float64)
    out = viewpoint_errors(pred, true)
    assert out["median_geodesic"] == pytest.approx(30.0, abs=1e-6)  # mean of the two middle values
    assert out["acc_pi_6"] == 0.5


def test_an_unknown_prediction_makes_every_summary_unknown():
    from common.eval.pose import geodesic_summary

    true = torch.zeros(4, 3, dtype=torch.float64)
    pred = torch.tensor([[0, 0, R(10)], [0, 0, R(20)], [0, 0, math.nan], [0, 0, R(50)]], dtype=torch.float64)
    out = viewpoint_errors(pred, true)
    assert math.isnan(out["mae"]) and math.isnan(out["median_geodesic"])
    assert math.isnan(out["acc_pi_6"])  # not 0.5: the NaN frame is neither a hit nor a miss
    summary = geodesic_summary(torch.tensor([10.0, math.nan, 50.0]))
    assert all(math.isnan(v) for v in summary.values()), summary
    assert geodesic_summary(torch.tensor([10.0, 50.0]))["acc_30"] == 0.5


def test_calibration_split_is_seeded_and_disjoint():
    cal, scored = calibration_split(50, 0.2, seed=3)
    assert len(cal) == 10 and len(scored) == 40
    assert set(cal.tolist()).isdisjoint(scored.tolist()) and len(set(cal.tolist()) | set(scored.tolist())) == 50
    cal2, _ = calibration_split(50, 0.2, seed=3)
    assert torch.equal(cal, cal2)
    cal3, _ = calibration_split(50, 0.2, seed=4)
    assert not torch.equal(cal, cal3)
    assert len(calibration_split(50, count=7)[0]) == 7


def test_calibrated_protocol_against_polyfit():
    rng = np.random.default_rng(1)
    true = rng.uniform(-1.0, 1.0, (200, 3))
    # A model with its own sign, scale and zero per axis, plus noise.
    slope = np.array([-0.5, 2.0, 1.3])
    offset = np.array([0.3, -0.2, 0.05])
    pred = (true - offset) / slope + rng.normal(0, 0.05, (200, 3))
    out = calibrated_viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(true), fraction=0.15, seed=7)
    cal, scored = calibration_split(200, 0.15, seed=7)
    cal, scored = cal.numpy(), scored.numpy()
    mapped = np.empty((len(scored), 3))
    for j, name in enumerate(("azimuth", "elevation", "tilt")):
        a, b = np.polyfit(pred[cal, j], true[cal, j], 1)
        assert out[f"slope_{name}"] == pytest.approx(a, rel=1e-9)
        assert out[f"intercept_{name}"] == pytest.approx(b, rel=1e-9, abs=1e-12)
        mapped[:, j] = a * pred[scored, j] + b
    diff = np.degrees(np.abs((mapped - true[scored] + np.pi) % (2 * np.pi) - np.pi))
    assert out["mae"] == pytest.approx(diff.mean(), rel=1e-9)
    assert out["protocol"] == "calibrated" and out["n_calibration"] == 30 and out["n_scored"] == 170
    assert out["seed"] == 7
    assert out["mae"] < 5.0 < out["uncalibrated_mae"]


@pytest.mark.parametrize("sign, zero_deg", [(1, 0.0), (-1, 180.0), (1, 120.0), (-1, -150.0)])
def test_the_calibrated_error_does_not_depend_on_where_the_model_puts_its_zero(sign, zero_deg):
    """Heads (yaw +-90, pitch +-60, roll +-40 deg) and a model exact but for its sign, its zero and 3 deg of noise,
    its predictions wrapped to (-pi, pi] as an atan2 head gives them. Where the zero puts the cut inside the labelled
    range (zero at 180 deg reversed: as mirror-consistent as zero at 0), a line on the wrapped radians cannot map
    them; on the predictions unwrapped around their circular mean it maps every zero alike, to the noise level."""
    rng = np.random.default_rng(0)
    n = 2000
    true = np.stack([rng.uniform(-1, 1, n) * np.radians(90), rng.uniform(-1, 1, n) * np.radians(60),
                     rng.uniform(-1, 1, n) * np.radians(40)], 1)
    pred = true + rng.normal(0, np.radians(3), (n, 3))
    pred[:, 0] = np.angle(np.exp(1j * (sign * pred[:, 0] + np.radians(zero_deg))))
    out = calibrated_viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(true), fraction=0.1, seed=0)
    # independently: the error of the exact inverse map on the scored frames (3 deg noise: ~2.4 deg MAE)
    _, scored = calibration_split(n, 0.1, seed=0)
    scored = scored.numpy()
    exact = sign * np.angle(np.exp(1j * (pred[scored, 0] - np.radians(zero_deg))))
    ideal = np.degrees(np.abs(exact - true[scored, 0])).mean()
    assert out["azimuth_mae"] == pytest.approx(ideal, abs=0.05)
    assert out["slope_azimuth"] == pytest.approx(sign, abs=0.02)
    # the raw predictions (SSV's fit) where they do not wrap inside the labelled range, the unwrapped ones where they do
    assert (out["center_azimuth"] is None) == (zero_deg == 0.0)
    assert out["center_elevation"] is None and out["center_tilt"] is None


def test_the_calibrated_error_does_not_depend_on_how_the_labels_are_written():
    """Azimuth labels covering 150..210 deg, written in [0, 360) or in (-180, 180]: one arc of 60 deg, so a linear
    fit either way (the span was max - min, 360 deg for the second, which made it circular and a slope of 0.5 could
    not be mapped)."""
    rng = np.random.default_rng(5)
    n = 400
    az = np.radians(rng.uniform(150, 210, n))
    true = np.stack([az, rng.uniform(-0.5, 0.5, n), rng.uniform(-0.3, 0.3, n)], 1)
    pred = true.copy()
    pred[:, 0] = 0.5 * (az - np.pi)  # a model at half the scale, its zero at 180 deg
    wrapped = true.copy()
    wrapped[:, 0] = np.angle(np.exp(1j * az))  # the same labels in (-pi, pi]
    assert (wrapped[:, 0] < 0).any() and (wrapped[:, 0] > 0).any()
    for labels in (true, wrapped):
        out = calibrated_viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(labels), fraction=0.1, seed=0)
        assert out["fit_azimuth"] == "linear"
        assert out["azimuth_mae"] == pytest.approx(0.0, abs=1e-9)
        assert out["slope_azimuth"] == pytest.approx(2.0, abs=1e-9)


def test_calibration_of_an_angle_all_around_the_circle_is_circular():
    """Objects seen from every azimuth: a model exact but for its own zero (57 deg) and direction. A straight line
    fitted to wrapped angles cannot map that (the wrap breaks it); the circular fit does, exactly. Checked against a
    brute-force search over signs and offsets."""
    rng = np.random.default_rng(3)
    n = 300
    true = np.stack([rng.uniform(-np.pi, np.pi, n), rng.uniform(-0.5, 0.5, n), rng.uniform(-0.3, 0.3, n)], 1)
    pred = true.copy()
    pred[:, 0] = np.angle(np.exp(1j * (-(true[:, 0] - 1.0))))  # reversed, zero at 57 deg, wrapped to (-pi, pi]
    out = calibrated_viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(true), fraction=0.1, seed=0)
    assert (out["fit_azimuth"], out["fit_elevation"], out["fit_tilt"]) == ("circular", "linear", "linear")
    assert out["slope_azimuth"] == -1.0 and out["intercept_azimuth"] == pytest.approx(1.0, abs=1e-9)
    assert out["azimuth_mae"] == pytest.approx(0.0, abs=1e-9)
    # a noisy model: the circular fit's wrapped error is the minimum of a brute-force grid over sign and offset
    noisy = pred[:, 0] + rng.normal(0, 0.2, n)
    cal, _ = calibration_split(n, 0.1, seed=0)
    cal = cal.numpy()

    def err(sign, offset):
        return np.abs(np.angle(np.exp(1j * (true[cal, 0] - sign * noisy[cal] - offset)))).mean()

    sign, offset = circular_fit(noisy[cal], true[cal, 0])
    grid = min(err(s, o) for s in (1, -1) for o in np.linspace(-np.pi, np.pi, 3601))
    assert sign == -1 and err(sign, offset) <= grid + 2e-3


def test_evaluate_viewpoints_reports_both_protocols():
    rng = np.random.default_rng(2)
    true = torch.from_numpy(rng.uniform(-1, 1, (40, 3)))
    res = evaluate_viewpoints(true * 0.9, true, fraction=0.25, seed=0)
    assert res["raw"]["protocol"] == "raw" and res["raw"]["n"] == 40
    assert res["calibrated"]["protocol"] == "calibrated" and res["calibrated"]["n_calibration"] == 10
    assert res["calibrated"]["mae"] == pytest.approx(0.0, abs=1e-6)


def test_constant_prediction_calibration():
    true = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.2, 0.2]], dtype=torch.float64)
    slope, intercept = fit_angle_calibration(torch.zeros(3, 3, dtype=torch.float64), true)
    assert torch.equal(slope, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(intercept, true.mean(0))


def test_chordal_mean():
    r = angles_to_matrix(torch.tensor(0.3), torch.tensor(0.2), torch.tensor(-0.4)).double()
    torch.testing.assert_close(chordal_mean(r.expand(5, 3, 3)), r)
    # a spread-out set: scipy's mean rotation (the chordal L2 mean)
    from scipy.spatial.transform import Rotation

    rots = Rotation.random(9, random_state=2)
    torch.testing.assert_close(chordal_mean(torch.from_numpy(rots.as_matrix())),
                               torch.from_numpy(rots.mean().as_matrix()))


def test_knn_pose_perfect_and_geodesic():
    views = look_at_rotation(fibonacci_sphere(12))  # (12, 3, 3)
    gallery_views = torch.arange(12).repeat(3)
    gallery_rot = views[gallery_views]
    feats = gallery_rot.reshape(-1, 9) + 0.01 * torch.randn(36, 9, dtype=torch.float64)
    q_views = torch.tensor([0, 5, 11, 7])
    q_rot = views[q_views]
    figs, correct, errs = knn_pose(feats, gallery_views, gallery_rot, q_rot.reshape(-1, 9), q_rot, q_views, k=3)
    assert figs["acc"] == 1.0 and correct.all()
    assert figs["median_geodesic"] == pytest.approx(0.0, abs=1e-5)
    # Unseen poses (no view labels): the error is the geodesic distance to the retrieved Fibonacci view.
    off = q_rot @ angles_to_matrix(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(R(5.0))).double()
    figs2, _, errs2 = knn_pose(feats, gallery_views, gallery_rot, off.reshape(-1, 9), off, None, k=1)
    assert "acc" not in figs2
    np.testing.assert_allclose(errs2.numpy(), 5.0, atol=1e-6)


def test_knn_pose_predicts_the_mean_rotation_of_a_view_s_copies():
    """Copies of one view index with different rotations (real captures, not Fibonacci renders): the predicted
    rotation is their mean, as scipy's Rotation.mean computes it (the chordal L2 mean), not one of them."""
    copies = Rotation.from_euler("xyz", [[10, 0, 0], [0, 25, 0], [0, 0, -15]], degrees=True)
    other = Rotation.from_euler("xyz", [[90, 0, 0]], degrees=True)
    rot = torch.from_numpy(np.concatenate([copies.as_matrix(), other.as_matrix()]))
    views = torch.tensor([0, 0, 0, 1])
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]], dtype=torch.float64)
    query = torch.eye(3, dtype=torch.float64)[None]
    figs, correct, errs = knn_pose(feats, views, rot, feats[:1], query, views[:1], k=3)
    assert correct.all()
    expected = np.degrees(copies.mean().magnitude())  # geodesic angle from the identity to the mean
    assert errs.item() == pytest.approx(expected, abs=1e-6) and expected > 1
