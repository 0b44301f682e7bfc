"""Objectron loader on fixtures written in its real format: a ``video.MOV`` per video and an ``annotations/...pbdata``
serialised ``Sequence`` with ARKit-frame keypoints (the box centre and 8 corners in Objectron's order), normalised 2D
keypoints, the ground plane and a camera. The video's frames encode pixel coordinates (R = 4x, G = 3y) so crops can be
checked exactly (the 'png ' codec in the MOV is lossless)."""
import json
import logging

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from common.data.formats import detect_format, open_dataset
from common.data.labels import read_labels
from common.data.objectron import (SIGNS, Objectron, fit_box_keypoints, fit_camera, message_classes,
                                   read_sequence)
from common.errors import ViewsslError
from common.eval.boxes import box_corners, box_frames_from_table, box_iou_3d, fit_box, project_points
from experiments.cli import cli

W, H = 48, 64  # portrait frames, as Objectron's videos decode
FX, FY, CX, CY = 60.0, 58.0, 23.0, 33.0
SIZE = np.array([0.10, 0.15, 0.08])


def quarter_turn(k: int) -> np.ndarray:
    return Rotation.from_euler("z", 90 * k, degrees=True).as_matrix().round(12)


def frame_pose(f: int) -> tuple[np.ndarray, np.ndarray]:
    """Object rotation (object -> our camera frame) and centre for frame f: azimuth sweeps, elevation and tilt fixed."""
    angles = np.radians([-40.0 + 12.0 * f, 20.0, 5.0])
    R = Rotation.from_euler("YXZ", angles).as_matrix()
    return R, np.array([0.01 * f - 0.02, -0.01, -0.6])


def coord_frame(f: int) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([4 * x, 3 * y, np.full_like(x, 10 * f)], -1).astype(np.uint8)


def write_objectron(root, name="cup/batch-1/0", frames=5, turn=1, video_frames=None, keypoints=9, scramble=False,
                    normal_sign=1.0):
    """One video. ``turn``: quarter turns between ARKit's camera frame and the decoded frame's (our = M @ ARKit)."""
    classes = message_classes()
    seq = classes["Sequence"]()
    M = quarter_turn(turn)
    for f in range(frames):
        R, t = frame_pose(f)
        pts = np.vstack([t, t + (SIGNS * SIZE) @ R.T])  # our camera frame
        uv = np.stack([CX + FX * pts[:, 0] / -pts[:, 2], CY - FY * pts[:, 1] / -pts[:, 2]], 1) / [W, H]
        if scramble:
            uv = uv[::-1]
        arkit = pts @ M  # rows: M^T p
        fa = seq.frame_annotations.add(frame_id=f, timestamp=f / 30.0)
        fa.camera.intrinsics.extend([FY, 0, CY, 0, FX, CX, 0, 0, 1])  # landscape layout: not read
        fa.camera.image_resolution_width, fa.camera.image_resolution_height = H, W
        fa.plane_center.extend((M.T @ (t - R @ [0, SIZE[1] / 2, 0])).tolist())
        fa.plane_normal.extend((normal_sign * M.T @ R[:, 1]).tolist())
        obj = fa.annotations.add(object_id=0, visibility=0.9)
        for k in range(keypoints):
            kp = obj.keypoints.add(id=k)
            kp.point_3d.x, kp.point_3d.y, kp.point_3d.z = arkit[k]
            kp.point_2d.x, kp.point_2d.y = uv[k]
            kp.point_2d.depth = -pts[k, 2]
    seq.objects.add(id=0, category="cup", type=1)
    ann = root / "annotations" / f"{name}.pbdata"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_bytes(seq.SerializeToString())
    video = root / "videos" / name / "video.MOV"
    video.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"png "), 30, (W, H))
    assert writer.isOpened()
    for f in range(frames if video_frames is None else video_frames):
        writer.write(cv2.cvtColor(coord_frame(f), cv2.COLOR_RGB2BGR))
    writer.release()
    return ann, video


def test_sequence_messages_round_trip_the_wire_format(tmp_path):
    ann, _ = write_objectron(tmp_path, frames=2)
    seq = read_sequence(ann)
    assert [fa.frame_id for fa in seq.frame_annotations] == [0, 1]
    kp = seq.frame_annotations[1].annotations[0].keypoints[3]
    assert kp.id == 3 and kp.point_2d.depth > 0 and seq.objects[0].category == "cup"
    raw = ann.read_bytes()  # the wire format: first Sequence.objects (field 1, length-delimited)
    assert raw[0] == (1 << 3 | 2)


def test_box_fit_recovers_the_box_in_objectrons_corner_order():
    R = Rotation.random(random_state=3).as_matrix()
    c = np.array([0.1, -0.2, -1.0])
    pts = np.vstack([c, c + (SIGNS * SIZE) @ R.T])
    centre, size, rotation = fit_box_keypoints(pts)
    np.testing.assert_allclose(centre, c, atol=1e-12)
    np.testing.assert_allclose(size, SIZE, atol=1e-12)
    np.testing.assert_allclose(rotation, R, atol=1e-12)
    np.testing.assert_allclose(box_corners(centre, size, rotation), pts[1:], atol=1e-12)  # the project's order too


@pytest.mark.parametrize("turn", [0, 1, 2, 3])
def test_fit_camera_finds_the_turn_and_intrinsics_and_leaves_out_points_behind(turn):
    g = np.random.default_rng(turn)
    ours = np.column_stack([g.uniform(-0.3, 0.3, (40, 2)), g.uniform(-2.0, -0.5, 40)])  # our camera frame
    uv = np.stack([CX + FX * ours[:, 0] / -ours[:, 2], CY - FY * ours[:, 1] / -ours[:, 2]], 1) / [W, H]
    ours[0, 2], uv[0] = 0.4, (0.1, 0.9)  # behind the camera: no projection, its 2D point is anything
    M, (fx, fy, cx, cy), rms = fit_camera(ours @ quarter_turn(turn), uv, W, H)
    np.testing.assert_allclose(M, quarter_turn(turn), atol=1e-12)  # ours = M @ ARKit
    assert (fx, fy, cx, cy) == pytest.approx((FX, FY, CX, CY), rel=1e-9) and rms < 1e-12


@pytest.mark.parametrize("turn", [0, 1, 2, 3])
def test_items_angles_box_plane_and_intrinsics(tmp_path, turn, caplog):
    write_objectron(tmp_path, turn=turn)
    assert detect_format(tmp_path) == "objectron"
    with caplog.at_level(logging.INFO, logger="viewssl.data.objectron"):
        ds = open_dataset(tmp_path, size=None)
    assert isinstance(ds, Objectron) and len(ds) == 5 and "5 items from 1 videos in 1 classes" in caplog.text
    assert ds.categories == ["cup"] and ds.sequences == ["cup/batch-1/0"] and list(ds.frame) == [0, 1, 2, 3, 4]
    cols = ds.extra_columns()
    for f in range(5):
        R, t = frame_pose(f)
        want = Rotation.from_matrix(R).as_euler("YXZ")
        np.testing.assert_allclose(ds.angles[f].double().numpy(), want, atol=1e-5)
        np.testing.assert_allclose([cols[c][f] for c in ("box_cx", "box_cy", "box_cz")], t, atol=1e-6)
        np.testing.assert_allclose([cols[c][f] for c in ("box_sx", "box_sy", "box_sz")], SIZE, atol=1e-6)
        n = np.array([cols[c][f] for c in ("plane_nx", "plane_ny", "plane_nz")])
        np.testing.assert_allclose(n, R[:, 1], atol=1e-6)
        assert n @ t + cols["plane_d"][f] == pytest.approx(SIZE[1] / 2, abs=1e-6)  # centre's height above the plane
        # the item's intrinsics: the crop's pixels are the frame's minus the crop origin
        ox, oy, s, _ = ds.crop_box[f]
        assert (cols["fx"][f], cols["fy"][f]) == pytest.approx((FX, FY), rel=1e-5)
        assert (cols["cx"][f], cols["cy"][f]) == pytest.approx((CX - ox, CY - oy), abs=1e-4)
        uv = project_points(box_corners(t, SIZE, R), cols["fx"][f], cols["fy"][f], cols["cx"][f], cols["cy"][f])
        bbox = [cols[c][f] for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
        np.testing.assert_allclose(bbox, [*uv.min(0), *uv.max(0)], atol=1e-4)
        # the crop: a square about the 2D box, its pixel (0, 0) is frame pixel (ox, oy) of frame f
        image = ds[f]["image"]
        assert image.shape[1:] == (s, s) and s == round(max(bbox[2] - bbox[0], bbox[3] - bbox[1]) * 1.1)
        assert (image[:, 0, 0] * 255).round().tolist() == [4 * ox, 3 * oy, 10 * f]


def test_plane_normal_is_turned_towards_the_object(tmp_path):
    write_objectron(tmp_path, frames=2, normal_sign=-1.0)
    cols = Objectron(tmp_path, size=8).extra_columns()
    R, t = frame_pose(1)
    np.testing.assert_allclose([cols[c][1] for c in ("plane_nx", "plane_ny", "plane_nz")], R[:, 1], atol=1e-6)
    assert cols["plane_d"][1] == pytest.approx(SIZE[1] / 2 - R[:, 1] @ t, abs=1e-6)


def test_whole_frame_resized_scales_the_intrinsics(tmp_path):
    write_objectron(tmp_path, frames=2)
    ds = Objectron(tmp_path, size=16, crop="frame")
    cols = ds.extra_columns()
    assert ds[1]["image"].shape == (3, 16, 16)
    assert (cols["fx"][0], cols["cx"][0]) == pytest.approx((FX * 16 / W, CX * 16 / W), rel=1e-5)
    assert (cols["fy"][0], cols["cy"][0]) == pytest.approx((FY * 16 / H, CY * 16 / H), rel=1e-5)


def test_export_then_box_fitting_on_the_labels_folder(tmp_path):
    write_objectron(tmp_path / "objectron", frames=4)
    out = tmp_path / "labels"
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "objectron"), "--out", str(out), "--size",
                                      "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "export.json").read_text())["kind"] == "objectron"
    table = read_labels(out)
    assert table.raw["sequence"] == ["cup/batch-1/0"] * 4 and table.raw["category"] == ["cup"] * 4
    frames = box_frames_from_table(table)
    for f, frame in enumerate(frames):
        R, t = frame_pose(f)
        assert box_iou_3d(frame.center, frame.size, frame.rotation, t, SIZE, R) == pytest.approx(1.0, abs=1e-4)
        centre, size, rotation = fit_box(frame, frame)  # a frame fitted from itself is recovered
        assert box_iou_3d(centre, size, rotation, t, SIZE, R) == pytest.approx(1.0, abs=1e-3)
    R1, t1 = frame_pose(1)
    centre, size, rotation = fit_box(frames[0], frames[1])  # a 12 deg azimuth step apart: close, not exact
    assert 0.5 < box_iou_3d(centre, size, rotation, t1, SIZE, R1) < 0.999


def test_subset_from_the_index_files_and_frame_step(tmp_path):
    write_objectron(tmp_path, "cup/batch-1/0", frames=4)
    write_objectron(tmp_path, "cup/batch-2/7", frames=4)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "cup_annotations_train").write_text("cup/batch-2/7\n")
    ds = open_dataset(tmp_path, size=8, split="train")
    assert ds.sequences == ["cup/batch-2/7"] and len(ds) == 4
    assert list(Objectron(tmp_path, size=8, frame_step=2).frame) == [0, 2, 0, 2]
    with pytest.raises(ViewsslError, match="no index file for class 'cup'"):
        open_dataset(tmp_path, size=8, split="test")


def _one_line(e, path):
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_bad_annotation_files_are_named(tmp_path):
    ann, video = write_objectron(tmp_path, frames=2)
    ann.write_bytes(b"\x12\xff\xff\xff garbage")
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "not an Objectron annotation" in _one_line(e, ann)
    ann.write_bytes(b"")
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "no frame annotations" in _one_line(e, ann)
    write_objectron(tmp_path, frames=2, keypoints=8)
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "8 keypoints (a box has 9" in _one_line(e, ann)
    write_objectron(tmp_path, frames=2, scramble=True)
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "do not project onto the 2D ones" in _one_line(e, ann)
    video.unlink()
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "no video for this annotation" in _one_line(e, ann)


def test_bad_video_skipped_under_skip_bad_and_short_video_named_when_read(tmp_path):
    write_objectron(tmp_path, "cup/batch-1/0", frames=3, video_frames=2)
    ann, video = write_objectron(tmp_path, "cup/batch-1/1", frames=2)
    video.write_bytes(b"not a video")
    with pytest.raises(ViewsslError) as e:
        Objectron(tmp_path)
    assert "cannot decode the first frame" in _one_line(e, video)
    ds = Objectron(tmp_path, size=8, skip_bad=True)
    assert ds.skipped == 1 and len(ds) == 3
    ds[1]
    ds.skip_bad = False
    with pytest.raises(ViewsslError) as e:
        ds[2]
    assert "the video has 2 frames; its annotation asks for frame 2" in _one_line(e, tmp_path / "videos" /
                                                                                  "cup/batch-1/0/video.MOV")


def test_reading_back_and_forth_decodes_the_right_frames(tmp_path):
    write_objectron(tmp_path, frames=5)
    ds = Objectron(tmp_path, size=None)
    order = [3, 0, 4, 4, 1, 2]
    for i in order:
        assert int(round(float(ds[i]["image"][2, 0, 0]) * 255)) == 10 * i  # the frame's B value


class _PixelModel:
    """Features = the image's mean colour (the fixture's B channel numbers the frame), no angle head."""

    family = "pixels_test"
    input_size = 32
    taps = ["pooled"]

    def predict_angles(self, images):
        return None

    def features(self, images, taps):
        return {"pooled": images.mean((2, 3))}


def test_viewssl_eval_box_fit_on_exported_objectron_splits(tmp_path):
    """export --split train / test, then `viewssl eval --metrics box_fit`: the nearest train frame (same pose, other
    video) gives the query's box back (IoU 1), a random one less."""
    from common.eval import FAMILIES, register_family
    from common.io import atomic_save

    src = tmp_path / "objectron"
    write_objectron(src, "cup/batch-1/0", frames=5)
    write_objectron(src, "cup/batch-1/1", frames=5)
    (src / "index").mkdir()
    (src / "index" / "cup_annotations_train").write_text("cup/batch-1/0\n")
    (src / "index" / "cup_annotations_test").write_text("cup/batch-1/1\n")
    for split in ("train", "test"):
        result = CliRunner().invoke(cli, ["data", "export", str(src), "--split", split, "--out",
                                          str(tmp_path / "obj" / split), "--size", "32", "--no-progress"])
        assert result.exit_code == 0, result.output
    register_family("pixels_test", lambda ckpt, device: _PixelModel())
    try:
        run = tmp_path / "run"
        atomic_save({"family": "pixels_test", "config": {}, "step": 1, "modules": {}},
                    run / "checkpoints" / "ckpt-00000001.pt")
        out = tmp_path / "m.json"
        res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(tmp_path / "obj"),
                                       "--metrics", "box_fit", "--output", str(out), "--device", "cpu"])
    finally:
        FAMILIES.pop("pixels_test", None)
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["box_fit/n_queries"] == 5
    assert metrics["box_fit/mean_iou"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["box_fit/random_neighbor/mean_iou"] < 0.99
