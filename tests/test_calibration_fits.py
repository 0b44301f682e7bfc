"""``experiments.calibration_fits``: richer maps than SSV's per-angle line tell frame mismatch from imprecision."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from common.eval.pose import calibrated_viewpoint_errors
from experiments.calibration_fits import FITS, calibration_fits, design, main, markdown
from tests.test_eval_cli import _checkpoint, oracle_family  # noqa: F401  (the fixture)
from tests.test_eval_metrics import make_folder

RANGES = np.radians([90.0, 60.0, 40.0])  # the synthetic heads' azimuth, elevation and tilt ranges


def _heads(n=400, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3)) * RANGES


def _mae(result, fit, where):
    return result["fits"][fit][where]["mae"]


def _assert_every_map_exact(result):
    assert result["protocol"]["mae"] < 1e-6
    for fit in FITS:
        for where in ("calibration", "all"):
            assert _mae(result, fit, where) < 1e-6, (fit, where)


def test_the_protocol_row_is_ssvs_figure_and_the_per_angle_line_on_its_frames():
    pred = _heads()
    true = 0.8 * pred + 0.1 + np.random.default_rng(1).normal(0, 0.05, pred.shape)
    res = calibration_fits(pred, true)
    ref = calibrated_viewpoint_errors(torch.from_numpy(pred), torch.from_numpy(true))
    assert res["protocol"]["mae"] == pytest.approx(ref["mae"], rel=1e-12)
    assert res["uncalibrated_mae"] == pytest.approx(ref["uncalibrated_mae"], rel=1e-12)
    for key in ("azimuth_mae", "elevation_mae", "tilt_mae", "mae"):
        assert res["fits"]["per-angle linear"]["calibration"][key] == pytest.approx(res["protocol"][key], rel=1e-9)
    assert (res["n_calibration"], res["n_scored"]) == (40, 360)


def test_a_curved_scale_is_removed_by_the_cubic_and_not_by_the_line():
    pred = _heads()
    true = 0.5 * pred + 0.4 * pred**3  # the labels an exact cubic of each predicted angle
    res = calibration_fits(pred, true)
    assert res["protocol"]["mae"] > 1.0  # degrees: the line cannot follow the curve
    for where in ("calibration", "all"):
        assert _mae(res, "per-angle cubic", where) < 1e-6
        assert _mae(res, "cross-angle cubic", where) < 1e-6
        assert _mae(res, "cross-angle affine", where) > 1.0


def test_one_angle_leaking_into_another_is_removed_by_the_cross_angle_affine_map():
    pred = _heads()
    mix = np.array([[1.0, 0.3, 0.0], [0.0, 0.9, -0.25], [0.2, 0.0, 1.1]])
    true = pred @ mix.T + np.array([0.05, -0.1, 0.0])
    res = calibration_fits(pred, true)
    assert res["protocol"]["mae"] > 2.0 and _mae(res, "per-angle cubic", "all") > 2.0
    for where in ("calibration", "all"):
        assert _mae(res, "cross-angle affine", where) < 1e-6


def test_noise_is_left_by_every_map():
    """Independent noise of sd s per angle: no map of the predictions removes it; MAE stays near s sqrt(2/pi)."""
    sd = math.radians(4.0)
    true = _heads(2000)
    pred = true + np.random.default_rng(2).normal(0, sd, true.shape)
    res = calibration_fits(pred, true)
    floor = math.degrees(sd) * math.sqrt(2 / math.pi)  # the MAE of the labels' own noise through a perfect map
    for fit in FITS:
        for where in ("calibration", "all"):
            assert 0.9 * floor < _mae(res, fit, where) < 1.15 * floor, (fit, where)


def test_angles_seen_from_all_around_are_fitted_on_the_circle():
    """Azimuths over the whole circle, predicted reversed and wrapped: after the protocol's circular fit every map
    fits the labels moved to within pi of its prediction (a linear fit of the raw wrapped numbers could not)."""
    rng = np.random.default_rng(3)
    true = np.stack([rng.uniform(-math.pi, math.pi, 600), *(rng.uniform(-1, 1, (2, 600)) * RANGES[1:, None])], 1)
    pred = true.copy()
    pred[:, 0] = np.arctan2(np.sin(-true[:, 0] + 1.0), np.cos(-true[:, 0] + 1.0))
    _assert_every_map_exact(calibration_fits(pred, true))


def test_predictions_wrapping_inside_their_range_are_unwrapped_as_the_protocol_does():
    """V's azimuth zero at 180 deg: the heads' +-90 deg come out as two runs near +-pi; the protocol cuts them in
    their widest gap, and so must the maps built on it."""
    true = _heads()
    pred = true.copy()
    turned = true[:, 0] / 0.7 + math.pi  # a scale too: a whole turn of the prediction is not one of the labels
    pred[:, 0] = np.arctan2(np.sin(turned), np.cos(turned))
    _assert_every_map_exact(calibration_fits(pred, true))


def test_design_columns():
    c = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    assert np.allclose(design(c, "per-angle linear", 2), [[3.0, 1.0], [2.0, 1.0]])
    assert np.allclose(design(c, "per-angle cubic", 0), [[1, 1, 1, 1], [0.125, 0.25, 0.5, 1]])
    assert np.allclose(design(c, "cross-angle affine", 1), [[1, 1, 2, 3], [1, 0.5, -1, 2]])
    cubic = design(c, "cross-angle cubic", 0)
    assert cubic.shape == (2, 20)  # 1 + 3 + 6 + 10 monomials
    assert np.allclose(cubic[0, -1], 27.0) and np.allclose(cubic[1, 4], 0.25)  # c3^3; c1^2


def test_a_map_with_more_terms_than_calibration_frames_is_left_out(caplog):
    pred = _heads(100)  # 10 calibration frames: enough for the cubic per angle (4 terms), not across angles (20)
    res = calibration_fits(pred, pred)
    assert res["fits"]["cross-angle cubic"]["calibration"] is None
    assert _mae(res, "cross-angle cubic", "all") < 1e-6 and _mae(res, "per-angle cubic", "calibration") < 1e-6
    assert "cross-angle cubic: 10 frames cannot fit its 20 terms" in caplog.text
    assert "| cross-angle cubic | calibration | n/a (too few frames) |" in markdown(res, "t")


def test_cli_on_a_labels_folder(tmp_path, oracle_family):  # noqa: F811
    folder = make_folder(tmp_path / "mine")  # 30 frames, azimuth all around
    ckpt = _checkpoint(tmp_path / "run", folder, slope=(-1.0, 1.0, 1.0))
    out = tmp_path / "fits.json"
    res = CliRunner().invoke(main, [str(ckpt), "--data", str(folder), "--calibration", "0.8", "--device", "cpu",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| SSV protocol (per-angle linear) | calibration |" in res.output and "step 10" in res.output
    payload = json.loads(out.read_text())
    assert (payload["n_calibration"], payload["n_scored"], payload["step"]) == (24, 6, 10)
    assert payload["protocol"]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert payload["uncalibrated_mae"] > 1.0
    assert set(payload["fits"]) == set(FITS) and payload["table"] in res.output
    # 3 calibration frames (the default 10 %) fit the line only; the other maps are fitted in sample alone
    res = CliRunner().invoke(main, [str(ckpt), "--data", str(folder), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.count("| calibration | n/a (too few frames) |") == 3
    # a folder without viewpoints: one line naming it
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "labels.csv").write_text("path\nx.png\n")
    (bare / "x.png").write_bytes(b"")  # never read: the folder is refused first
    res = CliRunner().invoke(main, [str(ckpt), "--data", str(bare), "--device", "cpu"])
    assert res.exit_code != 0 and "no labelled split with viewpoints" in res.output and "Traceback" not in res.output
