"""Real-dataset loaders on tiny fixtures written in each dataset's exact on-disk format, format detection, frame pairs.

The fixtures encode pixel coordinates in the image (R = x, G = y), so a face crop can be checked exactly: the crop's
top-left pixel tells where the square started.
"""
import json
import logging
import math

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from torch.utils.data import DataLoader, Subset

from common.data import faces
from common.data.faces import (AFLW2000, BIWI, W300LP, biwi_rotation_to_angles, crop_square, face_box_from_landmarks,
                               pose_para_to_angles, read_biwi_calibration, resolve_detector)
from common.data.folders import FramePairs, ImageFolder, ShapeNetRenders, VideoFrames, natural_key
from common.data.formats import CheckedLabeledFolder, detect_format, open_dataset
from common.data.labels import write_labels
from common.errors import ViewsslError
from common.geometry import angles_to_matrix, axis_rotation
from common.io import write_image

# --------------------------------------------------------------------------------------------------------------------
# Fixture writers (also used by test_bad_input.py)
# --------------------------------------------------------------------------------------------------------------------

H, W = 140, 180


def coord_image(h=H, w=W) -> np.ndarray:
    """(h, w, 3) uint8 RGB with R = x, G = y, B = 128."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)


def write_rgb(path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 100] if path.suffix == ".jpg" else []
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)


def landmarks68(eye_l=(60.0, 60.0), eye_r=(100.0, 60.0), mouth_y=100.0) -> np.ndarray:
    """68 points (iBUG order) whose eyes are centred on eye_l / eye_r and mouth corners at x = eye x +- 5."""
    pts = np.zeros((68, 2))
    pts[:17] = np.stack([np.linspace(eye_l[0] - 20, eye_r[0] + 20, 17), np.full(17, mouth_y)], -1)  # jaw
    pts[17:27] = [eye_l[0], eye_l[1] - 10]                                                           # brows
    pts[27:36] = [(eye_l[0] + eye_r[0]) / 2, (eye_l[1] + mouth_y) / 2]                                # nose
    ring = np.array([[-6, 0], [-3, -2], [3, -2], [6, 0], [3, 2], [-3, 2]], dtype=float)              # mean 0
    pts[36:42] = np.asarray(eye_l) + ring
    pts[42:48] = np.asarray(eye_r) + ring
    pts[48:68] = [(eye_l[0] + eye_r[0]) / 2, mouth_y]
    pts[48] = [eye_l[0] + 5, mouth_y]
    pts[54] = [eye_r[0] - 5, mouth_y]
    return pts


def pose_mat(path, pitch=0.1, yaw=-0.4, roll=0.05, **extra) -> None:
    mat = {"Pose_Para": np.array([[pitch, yaw, roll, 100.0, 80.0, 0.0, 0.0012]]),
           "Shape_Para": np.zeros((199, 1)), "Exp_Para": np.zeros((29, 1)), "roi": np.array([[1, 1, W, H]])}
    mat.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), mat)


def write_300wlp(root) -> dict:
    """AFW/AFW_7_1_0 (pt2d in its .mat only), AFW/AFW_7_1_1 (landmarks/AFW/..._pts.mat overrides pt2d),
    AFW_Flip/AFW_7_1_1 (landmarks mirrored from the unflipped image), HELEN/HELEN_3_1_0."""
    img = coord_image()
    lm0 = landmarks68()
    for rel, pts, yaw in [("AFW/AFW_7_1_0", lm0, -0.4), ("AFW/AFW_7_1_1", lm0, -0.8), ("AFW_Flip/AFW_7_1_1", lm0, 0.8),
                          ("HELEN/HELEN_3_1_0", lm0, 0.2)]:
        write_rgb(root / f"{rel}.jpg", img)
        pose_mat(root / f"{rel}.mat", yaw=yaw, pt2d=pts.T.copy())
    own = landmarks68(eye_l=(50.0, 50.0), eye_r=(90.0, 50.0), mouth_y=90.0)  # off the middle: mirroring moves it
    (root / "landmarks/AFW").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / "landmarks/AFW/AFW_7_1_1_pts.mat"), {"pts_2d": own, "pts_3d": own})
    return {"lm0": lm0, "own": own}


def write_aflw2000(root, n=3) -> np.ndarray:
    img = coord_image()
    pts = landmarks68()
    for i in range(n):
        write_rgb(root / f"image{i + 2:05d}.jpg", img)
        pt2d = np.full((2, 21), -1.0)
        pt2d[:, :5] = pts[36:41].T
        pose_mat(root / f"image{i + 2:05d}.mat", pitch=0.1 * i, yaw=0.2 * i, roll=-0.1 * i, pt2d=pt2d,
                 pt3d_68=np.vstack([pts.T, np.zeros((1, 68))]))
    return pts


RGB_CAL = """517.679 0 320
0 517.679 240.5
0 0 1

0 0 0 0

1 0 0
0 1 0
0 0 1

0 0 0

640 480
"""


def biwi_pose_text(R: np.ndarray, centre) -> str:
    rows = "\n".join(" ".join(f"{v:.6f}" for v in r) + " " for r in R)
    return rows + "\n\n" + " ".join(f"{v:.4f}" for v in centre) + " \n"


def write_biwi(root, yaws_deg=(30.0, -20.0, 0.0), sessions=("01", "02"), size=(160, 200)) -> list:
    """Sessions of frames with R_pose = R_y(yaw) (OpenCV axes) and the head centre on the optical axis at 1 m
    (session 01) or 100 mm to the right (02); the RGB camera is the depth camera (identity extrinsic)."""
    out = []
    h, w = size
    cal = RGB_CAL.replace("320", f"{w / 2:g}").replace("240.5", f"{h / 2:g}").replace("640 480", f"{w} {h}")
    for s, name in enumerate(sessions):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rgb.cal").write_text(cal)
        for k, yaw in enumerate(yaws_deg):
            number = f"{3 + 2 * k:05d}"
            R = axis_rotation("y", torch.tensor(math.radians(yaw), dtype=torch.float64)).numpy()
            centre = (100.0 * s, 0.0, 1000.0)
            (folder / f"frame_{number}_pose.txt").write_text(biwi_pose_text(R, centre))
            write_rgb(folder / f"frame_{number}_rgb.png", coord_image(h, w))
            (folder / f"frame_{number}_depth.bin").write_bytes(b"\0" * 8)
            out.append((name, int(number), yaw))
    return out


#: (azimuth, elevation, tilt) of the four anchors of rotations.npy; the files use anchors 0 and 3
SHAPENET_ANGLES = [[0.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.2, 0.0, 0.0], [0.3, -0.3, 0.2]]


def write_shapenet(root, rotations=True) -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    for model in ("m1", "m2"):
        for anchor, ax in ((0, 1), (3, 0)):
            for k in range(3):
                img[:] = (40 * k, anchor * 10, ax * 50)
                write_rgb(root / "02691156" / model / f"{anchor}_{ax}_{k}.png", img)
    write_rgb(root / "02958343" / "c1" / "0_2_1.png", img)  # an incomplete triplet
    if rotations:
        # azimuth about y, then elevation about x, then tilt about z (the project's convention), built by scipy so that
        # a convention error shared by angles_to_matrix and matrix_to_angles shows
        from scipy.spatial.transform import Rotation

        mats = Rotation.from_euler("YXZ", SHAPENET_ANGLES).as_matrix()
        np.save(root / "rotations.npy", mats)


def write_video(root, seq_lengths=(5, 3, 1), ext=".jpg") -> None:
    img = np.zeros((12, 12, 3), np.uint8)
    for s, n in enumerate(seq_lengths):
        cls = f"class-{1 + s % 2}"
        for f in range(n):
            img[:] = (20 * f, 30 * s, 0)
            write_rgb(root / cls / "group-1" / f"seq-{s + 1}" / f"frame_{f:06d}{ext}", img)


# --------------------------------------------------------------------------------------------------------------------
# Face crop and angle conventions
# --------------------------------------------------------------------------------------------------------------------

def test_face_box_matches_ssv_formula():
    pts = landmarks68(eye_l=(60, 60), eye_r=(100, 60), mouth_y=100)
    cx, cy, side = face_box_from_landmarks(pts)
    # eye_avg (80, 60), eye_to_eye 40, mouth corners (65, 100) (95, 100) -> eye_to_mouth (0, 40)
    assert (cx, cy) == pytest.approx((80.0, 64.0))
    assert side == pytest.approx(max(3 * 40, 2.7 * 40))


def test_crop_square_inside_and_reflect_padded():
    img = coord_image()
    c = crop_square(img, 80, 64, 120)
    assert c.shape == (120, 120, 3)
    assert tuple(c[0, 0, :2]) == (20, 4) and tuple(c[-1, -1, :2]) == (139, 123)
    # leaves the image on the left and top: reflect (101) padding mirrors x = 1, 2, ...
    c = crop_square(img, 5, 5, 20)
    assert c.shape == (20, 20, 3)
    assert list(c[10, :6, 0]) == [5, 4, 3, 2, 1, 0] and list(c[:6, 10, 1]) == [5, 4, 3, 2, 1, 0]
    # larger than the whole image still works
    assert crop_square(img, 90, 70, 600).shape == (600, 600, 3)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_pose_para_to_angles_signs_and_matrix(which):
    v = [0.0, 0.0, 0.0]
    v[which] = 0.3  # pitch, yaw, roll
    az, el, ti = pose_para_to_angles(*v)
    expected = {0: (0.0, -0.3, 0.0), 1: (-0.3, 0.0, 0.0), 2: (0.0, 0.0, -0.3)}[which]
    assert (az, el, ti) == pytest.approx(expected, abs=1e-9)


def test_pose_para_general_rotation_is_3ddfa():
    p, y, r = 0.3, -0.7, 0.2
    Rx = lambda a: axis_rotation("x", torch.tensor(a, dtype=torch.float64))  # noqa: E731
    Ry = lambda a: axis_rotation("y", torch.tensor(a, dtype=torch.float64))  # noqa: E731
    Rz = lambda a: axis_rotation("z", torch.tensor(a, dtype=torch.float64))  # noqa: E731
    R_3ddfa = Rx(p).T @ Ry(y).T @ Rz(r).T
    a = pose_para_to_angles(p, y, r)
    R = angles_to_matrix(*(torch.tensor(v, dtype=torch.float64) for v in a))
    torch.testing.assert_close(R, R_3ddfa)


def test_biwi_rotation_conventions():
    R = axis_rotation("y", torch.tensor(math.radians(58.0), dtype=torch.float64)).numpy()
    az, el, ti = biwi_rotation_to_angles(R)
    assert math.degrees(az) == pytest.approx(-58.0) and abs(el) < 1e-9 and abs(ti) < 1e-9
    # dataset mode: SSV's rotation vector read as (pitch, yaw, roll) -> (yaw, pitch, roll)
    assert np.degrees(biwi_rotation_to_angles(R, "dataset")) == pytest.approx((58.0, 0.0, 0.0), abs=1e-9)
    # +0.2 about OpenCV's x tips the face (-z) towards +y = image down: the chin lowers = positive elevation
    Rx = axis_rotation("x", torch.tensor(0.2, dtype=torch.float64)).numpy()
    assert biwi_rotation_to_angles(Rx) == pytest.approx((0.0, 0.2, 0.0), abs=1e-9)
    # +0.2 about OpenCV's z (into the scene) turns the image content clockwise: negative tilt
    Rz = axis_rotation("z", torch.tensor(0.2, dtype=torch.float64)).numpy()
    assert biwi_rotation_to_angles(Rz) == pytest.approx((0.0, 0.0, -0.2), abs=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# 300W-LP and AFLW2000
# --------------------------------------------------------------------------------------------------------------------

def test_300wlp_items_landmark_sources_and_angles(tmp_path):
    lm = write_300wlp(tmp_path)
    assert detect_format(tmp_path) == "300w-lp"
    ds = open_dataset(tmp_path, size=None)
    assert isinstance(ds, W300LP) and len(ds) == 4
    names = [p.relative_to(tmp_path).as_posix() for p in ds.paths]
    assert names == ["AFW/AFW_7_1_0.jpg", "AFW/AFW_7_1_1.jpg", "AFW_Flip/AFW_7_1_1.jpg", "HELEN/HELEN_3_1_0.jpg"]
    # AFW_7_1_0 and AFW_7_1_1 come from one source face
    assert ds.instances == ["AFW/AFW_7_1", "AFW_Flip/AFW_7_1", "HELEN/HELEN_3_1"]
    assert list(ds.instance_index) == [0, 0, 1, 2]

    item = ds[0]  # pt2d from the .mat: box centre (80, 64), side 120
    assert item["image"].shape == (3, 120, 120)
    corner = (item["image"][:2, 0, 0] * 255).round().tolist()
    assert corner == pytest.approx([20, 4], abs=3)
    assert item["angles"].dtype == torch.float32
    assert item["angles"].tolist() == pytest.approx(pose_para_to_angles(0.1, -0.4, 0.05), abs=1e-6)
    assert item["category"] == -1 and item["sequence"] == -1 and item["frame"] == -1 and item["instance"] == 0

    item = ds[1]  # landmarks/AFW/AFW_7_1_1_pts.mat wins over pt2d: eyes (50, 50) (90, 50) -> centre (70, 54)
    cx, cy, side = face_box_from_landmarks(lm["own"])
    assert (cx, cy, side) == pytest.approx((70, 54, 120))
    # the square starts at (10, -6): row -6 is the reflection of row 6
    assert (item["image"][:2, 0, 0] * 255).round().tolist() == pytest.approx([10, 6], abs=3)

    item = ds[2]  # _Flip: no own landmarks file -> the AFW one mirrored (x -> W - x): centre x = 180 - 70 = 110
    assert (item["image"][0, 0, 0] * 255).round().item() == pytest.approx(50, abs=3)  # unmirrored 10, pt2d's 20

    # angles property reads all .mat files; batches collate
    assert ds.angles.shape == (4, 3) and torch.isfinite(ds.angles).all()
    sized = open_dataset(tmp_path, size=32)
    batch = next(iter(DataLoader(sized, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["angles"].shape == (4, 3)


def test_300wlp_dataset_angle_mode(tmp_path):
    write_300wlp(tmp_path)
    ds = W300LP(tmp_path, size=16, angles="dataset")
    assert ds[0]["angles"].tolist() == pytest.approx([-0.4, 0.1, 0.05], abs=1e-6)  # (yaw, pitch, roll) as stored


def test_aflw2000_uses_pt3d_68(tmp_path):
    pts = write_aflw2000(tmp_path)
    assert detect_format(tmp_path) == "aflw2000"
    ds = open_dataset(tmp_path, size=None)
    assert isinstance(ds, AFLW2000) and len(ds) == 3
    assert list(ds.instance_index) == [-1, -1, -1]
    cx, cy, side = face_box_from_landmarks(pts)
    item = ds[1]
    assert item["image"].shape[1] == round(side)
    assert (item["image"][:2, 0, 0] * 255).round().tolist() == pytest.approx([cx - side / 2, cy - side / 2], abs=3)
    assert item["angles"].tolist() == pytest.approx(pose_para_to_angles(0.1, 0.2, -0.1), abs=1e-6)
    assert ds.verify(progress=False) == []


def test_aflw2000_max_abs_deg_keeps_the_usual_test_set(tmp_path, caplog):
    """max_abs_deg=99: a face with |yaw| = 114.6 deg in Pose_Para is left out (Hopenet's 1,969-image protocol); the
    angles, paths and ids of the others stay aligned."""
    pts = write_aflw2000(tmp_path, n=4)
    pose_mat(tmp_path / "image00003.mat", pitch=0.3, yaw=2.0, roll=0.0, pt3d_68=np.vstack([pts.T, np.zeros((1, 68))]))
    assert len(AFLW2000(tmp_path, size=8)) == 4
    with caplog.at_level(logging.INFO, logger="viewssl.data.faces"):
        ds = open_dataset(tmp_path, size=8, max_abs_deg=99)
    assert "left out 1 of 4 faces" in caplog.text
    assert [p.name for p in ds.paths] == ["image00002.jpg", "image00004.jpg", "image00005.jpg"]
    assert ds.angles[1].tolist() == pytest.approx(pose_para_to_angles(0.2, 0.4, -0.2), abs=1e-6)
    assert ds[2]["angles"].tolist() == pytest.approx(pose_para_to_angles(0.3, 0.6, -0.3), abs=1e-6)
    assert len(open_dataset(tmp_path, size=8, max_abs_deg=30)) == 2  # yaw 0.6 rad = 34.4 deg goes too
    assert [p.name for p in AFLW2000(tmp_path, size=8, max_abs_deg=1e-3).paths] == ["image00002.jpg"]  # all 0
    pose_mat(tmp_path / "image00002.mat", yaw=0.1, pt3d_68=np.vstack([pts.T, np.zeros((1, 68))]))
    with pytest.raises(ViewsslError, match="no face has"):
        AFLW2000(tmp_path, size=8, max_abs_deg=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# BIWI
# --------------------------------------------------------------------------------------------------------------------

def test_biwi_calibration_reader(tmp_path):
    (tmp_path / "rgb.cal").write_text(RGB_CAL)
    cal = read_biwi_calibration(tmp_path / "rgb.cal")
    assert cal["K"][0, 0] == pytest.approx(517.679) and cal["K"][1, 2] == pytest.approx(240.5)
    assert cal["dist"].shape == (4,) and cal["size"] == (640, 480)
    np.testing.assert_allclose(cal["R"], np.eye(3))


def test_biwi_items_angles_and_center_fallback(tmp_path, caplog):
    frames = write_biwi(tmp_path / "hpdb")
    assert detect_format(tmp_path) == "biwi"
    with caplog.at_level(logging.INFO, logger="viewssl.data.faces"):
        ds = open_dataset(tmp_path, size=None, detector="center")
    assert isinstance(ds, BIWI) and len(ds) == len(frames)
    assert "detector 'center'" in caplog.text
    assert ds.sequences == ["01", "02"] and list(ds.sequence_index) == [0, 0, 0, 1, 1, 1]
    assert list(ds.frame) == [3, 5, 7, 3, 5, 7]
    np.testing.assert_allclose(np.degrees(ds.angles[:, 0].numpy()), [-y for _, _, y in frames], atol=1e-4)
    # head centre at 1 m on the optical axis (session 01): box centred at (100, 80 + f*25/1000), side f*0.23
    f = 517.679
    item = ds[0]
    side = round(f * 230 / 1000)
    assert item["image"].shape == (3, side, side)
    x0 = round(100 - side / 2)
    y0 = round(80 + f * 25 / 1000 - side / 2)
    assert (item["image"][:2, side // 2, side // 2] * 255).round().tolist() == [x0 + side // 2, y0 + side // 2]
    # session 02: head 100 mm to the right -> u = 100 + f * 0.1
    u, v, z = ds.head_pixel(3)
    assert (u, v, z) == pytest.approx((100 + f * 0.1, 80, 1000))
    batch = next(iter(DataLoader(open_dataset(tmp_path, size=24, detector="center"), batch_size=6)))
    assert batch["image"].shape == (6, 3, 24, 24) and list(batch["sequence"]) == [0, 0, 0, 1, 1, 1]


def test_biwi_rgb_calibration_moves_the_head_rotation_as_it_moves_the_head_centre(tmp_path):
    """rgb.cal's extrinsic maps the head centre as x_rgb = R_cal^T (x_depth - t_cal), so the head's rotation in the RGB
    camera is R_cal^T R_pose: a head facing the depth camera (R_pose = I), seen from an RGB camera turned 20 deg about
    its y axis, is left of the image centre and turned 20 deg the other way (azimuth +20); SSV's labels
    (angles="dataset") keep SSV's R_pose @ R_cal."""
    write_biwi(tmp_path, yaws_deg=(0.0,), sessions=("01",))
    R_cal = axis_rotation("y", torch.tensor(math.radians(20.0), dtype=torch.float64)).numpy()
    cal = tmp_path / "01" / "rgb.cal"
    identity = "1 0 0\n0 1 0\n0 0 1\n"
    assert cal.read_text().count(identity) == 1
    rows = "".join(" ".join(f"{v:.12f}" for v in row) + "\n" for row in R_cal)
    cal.write_text(cal.read_text().replace(identity, rows))
    ds = BIWI(tmp_path, size=None, detector="center")
    u, _, z = ds.head_pixel(0)
    f, cx = 517.679, 100.0
    a = math.radians(20.0)
    assert u == pytest.approx(cx - f * math.tan(a)) and z == pytest.approx(1000 * math.cos(a))
    assert np.degrees(ds.angles[0].numpy()) == pytest.approx([20.0, 0.0, 0.0], abs=1e-4)
    ssv = BIWI(tmp_path, size=None, detector="center", angles="dataset")
    assert np.degrees(ssv.angles[0].numpy()) == pytest.approx([20.0, 0.0, 0.0], abs=1e-4)  # rotvec of R_y(20) @ I


def test_biwi_single_session_folder_and_sessions_filter(tmp_path):
    write_biwi(tmp_path, sessions=("01", "02", "03"))
    assert len(BIWI(tmp_path / "02", size=8, detector="center")) == 3
    ds = BIWI(tmp_path, size=8, detector="center", sessions=[1, 3])
    assert ds.sequences == ["01", "03"] and len(ds) == 6


def test_biwi_auto_detector_is_explicit_and_logged(tmp_path, caplog):
    write_biwi(tmp_path, sessions=("01",))
    with caplog.at_level(logging.INFO, logger="viewssl.data.faces"):
        ds = BIWI(tmp_path, size=16)
    name, _, reason = resolve_detector("auto")
    assert ds.detector_name == name
    assert f"face boxes by detector {name!r}" in caplog.text and "auto" in caplog.text
    assert ds[0]["image"].shape == (3, 16, 16)


class _FakeDetector:
    name = "haar"
    box = None
    calls = 0

    @staticmethod
    def available():
        return True, "fake for the test"

    def detect(self, image, prior=None):
        type(self).calls += 1
        return type(self).box


def test_biwi_detector_no_face_falls_back_and_logs_once(tmp_path, caplog, monkeypatch):
    write_biwi(tmp_path, sessions=("01",))
    monkeypatch.setitem(faces.DETECTORS, "haar", _FakeDetector)
    _FakeDetector.box = None
    ds = BIWI(tmp_path, size=None, detector="haar")
    center = BIWI(tmp_path, size=None, detector="center")
    with caplog.at_level(logging.WARNING, logger="viewssl.data.faces"):
        a, _ = ds[0], ds[1]
    assert ds.fallbacks == 2
    assert caplog.text.count("found no face") == 1 and "projected head centre" in caplog.text
    assert "frame_00003_rgb.png" in caplog.text
    torch.testing.assert_close(a["image"], center[0]["image"])
    # a detector that finds a face: its box is used
    _FakeDetector.box = (50.0, 40.0, 30.0)
    found = BIWI(tmp_path, size=None, detector="haar")[0]
    assert found["image"].shape == (3, 30, 30)
    assert (found["image"][:2, 0, 0] * 255).round().tolist() == [35, 25]


def test_biwi_haar_path(tmp_path, caplog):
    """Real Haar cascade where this OpenCV has it (a synthetic frame may show no face, so either outcome is right;
    what is checked is that a fallback is counted and logged together); otherwise an explicit request is a clear
    error (the only branch that runs with OpenCV 5.1, which has no CascadeClassifier)."""
    write_biwi(tmp_path, sessions=("01",), yaws_deg=(0.0,))
    ok, reason = faces.HaarDetector.available()
    if not ok:
        with pytest.raises(ViewsslError, match="detector 'haar' is not available"):
            BIWI(tmp_path, size=16, detector="haar")
        return
    ds = BIWI(tmp_path, size=16, detector="haar")
    with caplog.at_level(logging.WARNING, logger="viewssl.data.faces"):
        assert ds[0]["image"].shape == (3, 16, 16)
    assert ds.fallbacks in (0, 1) and (ds.fallbacks == 1) == ("found no face" in caplog.text)


def test_face_alignment_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    paths, reason = faces.face_alignment_weights()
    assert paths is None and "never downloaded" in reason and str(tmp_path) in reason
    with pytest.raises(ViewsslError, match="face-alignment"):
        resolve_detector("face-alignment")
    assert resolve_detector("auto")[0] in ("haar", "center")


# --------------------------------------------------------------------------------------------------------------------
# ShapeNet renders, plain images, video frames
# --------------------------------------------------------------------------------------------------------------------

def test_shapenet_triplet_layout_and_rotations(tmp_path):
    write_shapenet(tmp_path)
    assert detect_format(tmp_path) == "shapenet"
    ds = open_dataset(tmp_path, size=8)
    assert isinstance(ds, ShapeNetRenders) and len(ds) == 13
    assert ds.categories == ["02691156", "02958343"]
    assert ds.instances == ["02691156/m1", "02691156/m2", "02958343/c1"]
    trip = ds.triplets()
    assert trip.shape == (4, 3)  # the lone 0_2_1.png is not a complete triplet
    for l, c, r in trip:
        assert (ds.position[[l, c, r]] == [0, 1, 2]).all()
        assert len({ds.paths[i].parent for i in (l, c, r)}) == 1
        assert len({(ds.view[i], ds.axis[i]) for i in (l, c, r)}) == 1
    # rotations.npy: centre images get their anchor's angles (anchor 3 turns about all three axes), left / right NaN
    assert sorted({int(ds.view[c]) for c in trip[:, 1]}) == [0, 3]
    for left, c, _ in trip:
        assert ds[int(c)]["angles"].tolist() == pytest.approx(SHAPENET_ANGLES[ds.view[c]], abs=1e-6)
        assert torch.isnan(ds[int(left)]["angles"]).all()
        assert ds[int(c)]["sequence"] == -1 and ds[int(c)]["category"] == 0


def test_shapenet_view_layout_and_json_rotations(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for v in (0, 1, 2, 10):
        write_rgb(tmp_path / "03001627" / "chair1" / f"{v}.png", img)
    from scipy.spatial.transform import Rotation

    # one image's rotation as degrees, another's as a matrix built by scipy (azimuth about y, elevation about x,
    # tilt about z, in that order)
    matrix = Rotation.from_euler("YXZ", [-40.0, 20.0, -15.0], degrees=True).as_matrix().tolist()
    (tmp_path / "rotations.json").write_text(json.dumps({"03001627/chair1/10.png": [30.0, -10.0, 5.0],
                                                         "03001627/chair1/1.png": matrix}))
    assert detect_format(tmp_path) == "shapenet"
    ds = ShapeNetRenders(tmp_path, size=8)
    assert [p.name for p in ds.paths] == ["0.png", "1.png", "2.png", "10.png"]  # natural order
    assert list(ds.view) == [0, 1, 2, 10] and list(ds.position) == [-1] * 4 and ds.triplets().shape == (0, 3)
    assert np.degrees(ds[3]["angles"].numpy()) == pytest.approx([30, -10, 5], abs=1e-4)
    assert np.degrees(ds[1]["angles"].numpy()) == pytest.approx([-40, 20, -15], abs=1e-4)
    assert torch.isnan(ds[0]["angles"]).all()


def test_plain_image_folder_recursive_sorted_unlabeled(tmp_path):
    img = np.zeros((10, 14, 3), np.uint8)
    for rel in ("b/img10.png", "b/img2.JPG", "a.jpeg", "c/d/e.bmp", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".txt":
            p.write_text("hello")
        else:
            ok, buf = cv2.imencode(p.suffix.lower(), img)
            p.write_bytes(buf.tobytes())
    assert detect_format(tmp_path) == "images"
    ds = open_dataset(tmp_path, size=12)
    assert isinstance(ds, ImageFolder)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["a.jpeg", "b/img2.JPG", "b/img10.png",
                                                                      "c/d/e.bmp"]
    item = ds[1]
    assert item["image"].shape == (3, 12, 12) and torch.isnan(item["angles"]).all()
    assert all(item[k] == -1 for k in ("category", "instance", "sequence", "frame"))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert torch.isnan(batch["angles"]).all() and batch["angles"].shape == (4, 3)
    assert natural_key("seq-2") < natural_key("seq-10")


def test_video_frames_ucf101_layout(tmp_path):
    write_video(tmp_path)
    assert detect_format(tmp_path) == "video"
    ds = open_dataset(tmp_path, size=8)
    assert isinstance(ds, VideoFrames) and len(ds) == 9
    assert ds.categories == ["class-1", "class-2"] and ds.instances == ["class-1/group-1", "class-2/group-1"]
    assert ds.sequences == ["class-1/group-1/seq-1", "class-1/group-1/seq-3", "class-2/group-1/seq-2"]
    assert list(ds.frame[:5]) == [0, 1, 2, 3, 4]
    item = ds[7]  # seq-1 (5 frames), seq-3 (1), then seq-2: its second frame
    assert item["sequence"] == 2 and item["frame"] == 1 and item["category"] == 1 and item["instance"] == 1
    assert torch.isnan(item["angles"]).all()


def test_video_frames_siampose_split_layout(tmp_path):
    write_video(tmp_path / "split-1" / "train")
    write_video(tmp_path / "split-1" / "test", seq_lengths=(2,))
    with pytest.raises(ViewsslError, match="split-1/train"):
        open_dataset(tmp_path)
    assert len(open_dataset(tmp_path, split="train")) == 9
    assert len(open_dataset(tmp_path, split="test")) == 2
    assert len(open_dataset(tmp_path, split="split-1/test")) == 2
    # the split-k folder itself is not one video dataset of categories "train" and "test"
    with pytest.raises(ViewsslError, match=r"split-1: this folder holds splits \(test, train\)"):
        open_dataset(tmp_path / "split-1")
    assert len(open_dataset(tmp_path / "split-1", split="test")) == 2
    write_video(tmp_path / "split-2" / "train", seq_lengths=(1,))
    with pytest.raises(ViewsslError, match="ambiguous"):
        open_dataset(tmp_path, split="train")


def test_labels_folder_and_splits(tmp_path):
    for split in ("train", "val"):
        rows = []
        for i in range(3):
            write_image(tmp_path / split / f"{i}.png", torch.full((3, 8, 8), 0.5))
            rows.append({"path": f"{i}.png", "azimuth": 0.1 * i, "elevation": 0.0, "tilt": 0.0, "sequence": "s",
                         "frame": 2 - i})
        write_labels(tmp_path / split / "labels.csv", rows)
    with pytest.raises(ViewsslError, match="splits.*train.*val.*split="):
        open_dataset(tmp_path)
    ds = open_dataset(tmp_path, split="val", size=4)
    assert isinstance(ds, CheckedLabeledFolder) and ds.kind == "labels"
    assert ds[2]["angles"].tolist() == pytest.approx([0.2, 0, 0], abs=1e-6)
    assert detect_format(tmp_path / "train") == "labels"


def test_explicit_kind_and_unknown_options(tmp_path):
    write_video(tmp_path)
    ds = open_dataset(tmp_path, size=8, kind="images")  # frames as plain images
    assert isinstance(ds, ImageFolder) and len(ds) == 9
    assert isinstance(open_dataset(tmp_path, kind="UCF101"), VideoFrames)
    with pytest.raises(ViewsslError, match="unknown dataset kind 'nope'"):
        open_dataset(tmp_path, kind="nope")
    with pytest.raises(ViewsslError, match="unknown option.*detector"):
        open_dataset(tmp_path, detector="haar")


# --------------------------------------------------------------------------------------------------------------------
# Frame pairs
# --------------------------------------------------------------------------------------------------------------------

def _check_pairs(pairs, seq, rank, mode, k):
    us = np.linspace(0, 0.999999, 50)
    for i in range(len(seq)):
        got = {pairs.partner_index(i, u) for u in us}
        same_seq = [j for j in range(len(seq)) if seq[j] == seq[i]]
        others = [j for j in same_seq if j != i]
        if mode == "same" or not others:
            assert got == {i}
            continue
        if mode == "nearby":
            want = {j for j in others if abs(rank[j] - rank[i]) <= k}
        elif mode == "distant":
            want = {j for j in others if abs(rank[j] - rank[i]) > k} or set(others)
        else:
            want = set(others)
        assert got == want, (mode, i)


@pytest.mark.parametrize("mode", ["same", "nearby", "distant", "uniform"])
def test_frame_pairs_modes_cover_exactly_their_candidates(tmp_path, mode):
    write_video(tmp_path, seq_lengths=(7, 3, 1))
    ds = VideoFrames(tmp_path, size=8)
    pairs = FramePairs(ds, mode=mode, max_offset=2)
    rank = ds.frame  # frames 0..n-1 per sequence
    _check_pairs(pairs, ds.sequence_index, rank, mode, 2)
    # vectorised == scalar, and a pure function of (i, u)
    idx = np.arange(len(ds)).repeat(3)
    u = np.tile([0.0, 0.5, 0.99], len(ds))
    assert list(pairs.partner_indices(idx, u)) == [pairs.partner_index(i, v) for i, v in zip(idx, u)]


def test_frame_pairs_randomness_from_caller_and_on_labels_and_subset(tmp_path):
    rows = []
    order = [3, 0, 2, 1, 4]  # frames written out of order
    for r, f in enumerate(order):
        write_image(tmp_path / f"{r}.png", torch.zeros(3, 4, 4))
        rows.append({"path": f"{r}.png", "azimuth": 0.0, "elevation": 0.0, "tilt": 0.0, "sequence": "a", "frame": f})
    write_labels(tmp_path / "labels.csv", rows)
    ds = open_dataset(tmp_path, size=4)
    pairs = FramePairs(ds, mode="nearby", max_offset=1)
    # row 1 is frame 0: its only neighbour within 1 is frame 1 (row 3)
    assert {pairs.partner_index(1, u) for u in np.linspace(0, 0.99, 10)} == {3}
    # row 2 is frame 2: neighbours frame 1 (row 3) and frame 3 (row 0)
    assert {pairs.partner_index(2, u) for u in np.linspace(0, 0.99, 10)} == {3, 0}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [pairs.partner(2, g1) for _ in range(8)] == [pairs.partner(2, g2) for _ in range(8)]
    assert pairs.partner(2, 123) == pairs.partner(2, 123)
    a, b = pairs.pair(1, 0.3)
    assert a["frame"] == 0 and b["frame"] == 1
    # a plain LabeledFolder works too (table.sequence_index / table.frame)
    from common.data.labels import LabeledFolder

    assert FramePairs(LabeledFolder(tmp_path, size=4), "nearby", 1).partner_index(1, 0.5) == 3
    sub = Subset(ds, [1, 3, 4])
    sp = FramePairs(sub, "uniform")
    assert {sp.partner_index(0, u) for u in np.linspace(0, 0.99, 10)} == {1, 2}


def test_frame_pairs_needs_sequences(tmp_path):
    img = np.zeros((6, 6, 3), np.uint8)
    write_rgb(tmp_path / "a.png", img)
    with pytest.raises(ViewsslError, match="sequence"):
        FramePairs(_NoSeq(), "nearby")
    with pytest.raises(ViewsslError, match="pair mode"):
        FramePairs(ImageFolder(tmp_path, size=4), mode="next")
    # unknown sequences (-1) pair with themselves
    assert FramePairs(ImageFolder(tmp_path, size=4), "nearby").partner_index(0, 0.7) == 0


class _NoSeq(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {}


def test_layout_misfits_are_left_out_with_a_count(tmp_path, caplog):
    write_video(tmp_path, seq_lengths=(2,))
    write_rgb(tmp_path / "class-1" / "group-1" / "seq-1" / "thumb.jpg", np.zeros((4, 4, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="viewssl.data.folders"):
        ds = VideoFrames(tmp_path, size=4)
    assert len(ds) == 2 and "left out 1 images" in caplog.text and "thumb.jpg" in caplog.text


def test_export_labels_round_trip(tmp_path):
    from common.data.formats import export_labels

    write_biwi(tmp_path / "biwi", sessions=("01",))
    ds = BIWI(tmp_path / "biwi", size=16, detector="center")
    out = export_labels(ds, tmp_path / "crops", progress=False)
    back = open_dataset(out, size=16)
    assert isinstance(back, CheckedLabeledFolder) and len(back) == len(ds)
    assert back.sequences == ds.sequences == ["01"]  # the session's name, not the dataset's index 0
    for i in range(len(ds)):
        a, b = ds[i], back[i]
        torch.testing.assert_close(a["angles"], b["angles"], atol=1e-5, rtol=0)
        assert (a["sequence"], a["frame"]) == (b["sequence"], b["frame"])
        assert (a["image"] - b["image"]).abs().max() < 1 / 255 + 1e-6
    with pytest.raises(ViewsslError, match="already holds"):
        export_labels(ds, out, progress=False)


def test_export_of_a_dataset_without_viewpoints(tmp_path):
    """UCF101's frames have no viewpoint: exported with blank angle cells, read back as NaN angles with every id kept,
    and evaluated per video (the angle metrics skipped). A dataset with angles on some items only is an error."""
    from common.data.formats import export_labels
    from common.eval import run_metrics

    write_video(tmp_path / "vid", seq_lengths=(3, 2, 2))
    ds = VideoFrames(tmp_path / "vid", size=8)
    out = export_labels(ds, tmp_path / "frames", progress=False)
    assert (out / "labels.csv").read_text().splitlines()[1].split(",")[1:4] == ["", "", ""]
    back = open_dataset(out, size=8)
    assert not back.table.has_angles and torch.isnan(back.table.angles).all()
    assert back.sequences == ds.sequences and back.categories == ds.categories
    for i in range(len(ds)):
        assert [back[i][k] for k in ("category", "sequence", "frame")] == [ds[i][k] for k in
                                                                          ("category", "sequence", "frame")]

    class Pooled(torch.nn.Module):  # the mean colour: frames of one video share it here
        input_size, taps = 8, ["pooled"]

        def predict_angles(self, images):
            raise AssertionError("no angles should be asked of a folder without viewpoints")

        def features(self, images, taps):
            return {"pooled": images.mean((2, 3))}

    res = run_metrics(Pooled(), out, ["viewpoint", "retrieval"], retrieval_unit="sequence")
    assert "viewpoints" in res.skipped["viewpoint"]
    assert res.protocol["retrieval"]["query_sequences"] == 3 and 0.0 <= res["retrieval/r@1"] <= 1.0

    class Mixed(torch.utils.data.Dataset):
        paths = [tmp_path / "a.png", tmp_path / "b.png"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            angles = torch.tensor([0.1, 0.2, 0.3]) if i == 0 else torch.full((3,), float("nan"))
            return {"image": torch.zeros(3, 4, 4), "angles": angles, "index": i, "category": -1, "instance": -1,
                    "sequence": -1, "frame": -1}

    with pytest.raises(ViewsslError, match=r"b\.png.*item 1 has no viewpoint and item 0 has one"):
        export_labels(Mixed(), tmp_path / "mixed", progress=False)
