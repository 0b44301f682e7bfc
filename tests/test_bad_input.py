"""Issue 7, data part: every bad input is one ViewsslError line naming the file and what is wrong; nothing is skipped
silently (``skip_bad=True`` is opt-in, counted and logged); corrupt images fail lazily and in ``verify()``."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from common.data.faces import AFLW2000, BIWI, W300LP, read_pose_mat
from common.data.folders import ImageFolder, ShapeNetRenders, load_rgb, to_rgb_uint8
from common.data.formats import detect_format, open_dataset
from common.data.labels import read_labels
from common.errors import ViewsslError
from common.io import read_image
from tests.test_loaders import (biwi_pose_text, pose_mat, write_aflw2000, write_biwi, write_rgb, write_shapenet,
                                write_video)


def one_line(e: pytest.ExceptionInfo, *names) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def small_folder(root, n=3, ext=".png"):
    img = np.full((8, 8, 3), 100, np.uint8)
    for i in range(n):
        write_rgb(root / f"img{i}{ext}", img)
    return [root / f"img{i}{ext}" for i in range(n)]


# -- folders ---------------------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path / "nope")
    assert one_line(e, tmp_path / "nope").endswith("no such folder")
    with pytest.raises(ViewsslError) as e:
        ImageFolder(tmp_path / "nope")
    one_line(e, tmp_path / "nope")


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path / "x.png")
    assert "not a folder" in one_line(e, tmp_path / "x.png")


def test_empty_folder(tmp_path):
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path)
    assert "folder is empty" in one_line(e, tmp_path)
    with pytest.raises(ViewsslError) as e:
        ImageFolder(tmp_path)
    assert "empty" in one_line(e, tmp_path)


def test_unrecognised_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path)
    msg = one_line(e, tmp_path)
    for what in ("labels.csv", "BIWI", "300W-LP", "ShapeNet", "video frames", "image files"):
        assert what in msg


@pytest.mark.parametrize("kind", ["video", "shapenet", "biwi", "300w-lp", "aflw2000"])
def test_explicit_kind_on_a_folder_without_that_data(tmp_path, kind):
    small_folder(tmp_path)
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path, kind=kind)
    one_line(e, tmp_path)


# -- images ----------------------------------------------------------------------------------------------------------

def test_unreadable_image_fails_when_read_and_in_verify(tmp_path):
    paths = small_folder(tmp_path)
    paths[1].write_bytes(b"this is not a png at all")
    ds = open_dataset(tmp_path, size=8)  # lazy: building the dataset does not decode images
    ds[0]
    with pytest.raises(ViewsslError) as e:
        ds[1]
    assert "unreadable or truncated image" in one_line(e, paths[1])
    with pytest.raises(ViewsslError) as e:
        ds.verify(progress=False)
    one_line(e, paths[1])


def test_truncated_images(tmp_path):
    paths = small_folder(tmp_path, n=2, ext=".jpg")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) - 20])
    png = small_folder(tmp_path / "p", n=1)[0]
    d = png.read_bytes()
    png.write_bytes(d[: len(d) // 2])
    for p in (paths[0], png):
        with pytest.raises(ViewsslError) as e:
            load_rgb(p)
        assert "truncated" in one_line(e, p)
    with pytest.raises(ViewsslError) as e:
        ImageFolder(tmp_path, size=8)[0]
    one_line(e, paths[0])


def test_truncated_jpeg_that_a_decoder_might_accept(tmp_path, monkeypatch):
    """Older OpenCV builds decode a JPEG cut short with a warning; the end-of-image check still catches it."""
    p = small_folder(tmp_path, n=1, ext=".jpg")[0]
    data = p.read_bytes()
    p.write_bytes(data[:-2])  # drop the EOI marker only
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: real(np.frombuffer(data, np.uint8), flags))
    with pytest.raises(ViewsslError) as e:
        load_rgb(p)
    assert "truncated JPEG" in one_line(e, p)


def test_empty_image_file(tmp_path):
    p = small_folder(tmp_path, n=1)[0]
    p.write_bytes(b"")
    with pytest.raises(ViewsslError) as e:
        load_rgb(p)
    assert "empty image file" in one_line(e, p)


def test_image_modes_convertible(tmp_path):
    from PIL import Image

    la = np.stack([np.full((6, 6), 200, np.uint8), np.full((6, 6), 255, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((6, 6), 65535, np.uint16))
    cv2.imwrite(str(tmp_path / "c16.png"), np.full((6, 6, 3), 257 * 10, np.uint16))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.full((6, 6, 4), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "f.tiff"), np.full((6, 6, 3), 0.5, np.float32))
    for name, value in [("la.png", 200), ("g16.png", 255), ("c16.png", 10), ("rgba.png", 255), ("f.tiff", 128)]:
        img = load_rgb(tmp_path / name)
        assert img.shape == (6, 6, 3) and img.dtype == np.uint8 and int(img[0, 0, 0]) == value, name
        # labels.csv folders and triplets read through common.io.read_image: the same conversions
        assert torch.equal(read_image(tmp_path / name, 6), torch.from_numpy(img).permute(2, 0, 1).float() / 255), name
    ds = ImageFolder(tmp_path, size=4)
    assert len(ds) == 5 and ds.verify(progress=False) == []
    # 2-channel arrays straight from a decoder are gray + alpha
    assert to_rgb_uint8(np.full((2, 2, 2), 255, np.uint8), "x.png").shape == (2, 2, 3)
    # half-transparent pixels of three distinct colours, composited on black, in RGB order
    Image.fromarray(np.array([[[200, 100, 50, 128]]], np.uint8), "RGBA").save(tmp_path / "half.png")
    Image.fromarray(np.array([[[200, 64]]], np.uint8), "LA").save(tmp_path / "half_la.png")
    assert load_rgb(tmp_path / "half.png")[0, 0].tolist() == [round(v * 128 / 255) for v in (200, 100, 50)]
    assert load_rgb(tmp_path / "half_la.png")[0, 0].tolist() == [round(200 * 64 / 255)] * 3  # (decoded as BGRA)
    assert to_rgb_uint8(np.array([[[200, 64]]], np.uint8), "x.png")[0, 0].tolist() == [round(200 * 64 / 255)] * 3


def test_image_modes_not_convertible(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((5, 5), np.int32)).save(tmp_path / "i32.tiff")
    with pytest.raises(ViewsslError) as e:
        load_rgb(tmp_path / "i32.tiff")
    assert "int32" in one_line(e, tmp_path / "i32.tiff")
    with pytest.raises(ViewsslError) as e:
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8), tmp_path / "five.tiff")
    assert "5 channels" in one_line(e, tmp_path / "five.tiff")
    with pytest.raises(ViewsslError) as e:
        to_rgb_uint8(np.full((4, 4, 3), 3.0, np.float32), tmp_path / "hdr.tiff")
    assert "outside [0, 1]" in one_line(e, tmp_path / "hdr.tiff")
    with pytest.raises(ViewsslError) as e:
        to_rgb_uint8(np.full((4, 4), np.nan, np.float32), tmp_path / "nan.tiff")
    one_line(e, tmp_path / "nan.tiff")


def test_skip_bad_is_opt_in_counted_and_logged(tmp_path, caplog):
    paths = small_folder(tmp_path, n=4)
    paths[1].write_bytes(b"garbage")
    paths[2].write_bytes(b"")
    strict = ImageFolder(tmp_path, size=8)
    with pytest.raises(ViewsslError) as e:
        strict.verify(progress=False)
    assert "and 1 more bad files" in one_line(e, paths[1]) and "skip_bad=True" in str(e.value)

    lazy = ImageFolder(tmp_path, size=8, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="viewssl.data.folders"):
        item = lazy[1]
    assert item["index"] == 3 and lazy.skipped == 2  # items 1 and 2 are bad: the next readable one is 3
    assert str(paths[1]) in caplog.text and str(paths[2]) in caplog.text
    assert lazy[1]["index"] == 3 and lazy.skipped == 2  # deterministic, each bad file counted once

    ds = ImageFolder(tmp_path, size=8, skip_bad=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="viewssl.data.folders"):
        bad = ds.verify(progress=False)
    assert [i for i, _ in bad] == [1, 2] and len(ds) == 2 and ds.skipped == 2
    assert "skipped 2 bad of 4 items" in caplog.text
    assert [p.name for p in ds.paths] == ["img0.png", "img3.png"]


def test_every_item_bad_under_skip_bad(tmp_path):
    for p in small_folder(tmp_path, n=2):
        p.write_bytes(b"x")
    with pytest.raises(ViewsslError) as e:
        ImageFolder(tmp_path, size=8, skip_bad=True)[0]
    assert "every item is bad" in one_line(e, tmp_path)


# -- paths that escape the dataset folder -----------------------------------------------------------------------------

def test_symlink_escaping_the_folder(tmp_path):
    outside = small_folder(tmp_path / "outside", n=1)[0]
    root = tmp_path / "data"
    small_folder(root, n=2)
    os.symlink(outside, root / "link.png")
    with pytest.raises(ViewsslError) as e:
        open_dataset(root)
    assert "escapes the dataset folder" in one_line(e, root / "link.png")
    ds = ImageFolder(root, size=8, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1


def test_symlinked_subfolder_is_named_not_dropped_silently(tmp_path, caplog):
    """300W-LP with HELEN -> another disk: the linked folder is not searched (its files would escape the dataset
    folder), and a warning names it; a folder of links only says so in its "empty" error."""
    elsewhere = tmp_path / "disk2" / "HELEN"
    write_aflw2000(elsewhere, n=1)
    root = tmp_path / "300W_LP"
    write_aflw2000(root / "AFW", n=2)
    os.symlink(elsewhere, root / "HELEN", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="viewssl.data.folders"):
        ds = open_dataset(root)
    assert len(ds) == 2
    assert f"{root / 'HELEN'}: not searched, it is a symlink to a folder" in caplog.text
    only_links = tmp_path / "links"
    only_links.mkdir()
    os.symlink(elsewhere, only_links / "HELEN", target_is_directory=True)
    with pytest.raises(ViewsslError) as e:
        open_dataset(only_links)
    assert "folder is empty (symlinked folders are not followed: HELEN)" in one_line(e, only_links)


def test_labels_csv_path_escaping(tmp_path):
    small_folder(tmp_path / "outside", n=1)
    root = tmp_path / "data"
    root.mkdir()
    (root / "labels.csv").write_text("path,azimuth,elevation,tilt\n../outside/img0.png,0,0,0\n")
    with pytest.raises(ViewsslError) as e:
        open_dataset(root)
    assert "escapes the dataset folder" in one_line(e, root / "labels.csv")


def test_rotations_json_key_escaping(tmp_path):
    write_shapenet(tmp_path / "data", rotations=False)
    (tmp_path / "data" / "rotations.json").write_text('{"../x.png": [0, 0, 0]}')
    with pytest.raises(ViewsslError) as e:
        ShapeNetRenders(tmp_path / "data")
    assert "escapes" in one_line(e, tmp_path / "data" / "rotations.json")


def test_rotations_npy_wrong_shape_and_pickle(tmp_path):
    write_shapenet(tmp_path, rotations=False)
    np.save(tmp_path / "rotations.npy", np.zeros((4, 3)))
    with pytest.raises(ViewsslError) as e:
        ShapeNetRenders(tmp_path)
    assert "(V, 3, 3)" in one_line(e, tmp_path / "rotations.npy")
    np.save(tmp_path / "rotations.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ViewsslError) as e:
        ShapeNetRenders(tmp_path)
    one_line(e, tmp_path / "rotations.npy")


@pytest.mark.parametrize("bad,message", [
    (np.diag([1.0, 1.0, -1.0]), "rotation 2 is a reflection (determinant -1), not a rotation"),
    (2 * np.eye(3), "rotation 2 is not orthonormal"),
    (np.full((3, 3), np.nan), "rotation 2 has non-finite entries"),
])
def test_rotations_npy_must_hold_rotations(tmp_path, bad, message):
    write_shapenet(tmp_path, rotations=False)
    mats = np.stack([np.eye(3)] * 4)
    mats[2] = bad  # an axis flip (OpenCV vs OpenGL) read as azimuth 180, a scaled matrix as 0, NaN as "unknown"
    np.save(tmp_path / "rotations.npy", mats)
    with pytest.raises(ViewsslError) as e:
        ShapeNetRenders(tmp_path)
    assert message in one_line(e, tmp_path / "rotations.npy")
    if not np.isfinite(bad).all():
        return  # JSON has no NaN
    (tmp_path / "rotations.npy").unlink()
    (tmp_path / "rotations.json").write_text(json.dumps({"02691156/m1/0_1_0.png": bad.tolist()}))
    with pytest.raises(ViewsslError) as e:
        ShapeNetRenders(tmp_path)
    assert ("key '02691156/m1/0_1_0.png': the matrix " + message.split(" ", 2)[2]
            in one_line(e, tmp_path / "rotations.json"))


def test_unknown_split(tmp_path):
    write_video(tmp_path / "split-1" / "train")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path, split="val")
    assert "no split 'val'" in one_line(e, tmp_path) and "split-1/train" in str(e.value)
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path, split="../x")
    one_line(e, tmp_path)


# -- labels.csv --------------------------------------------------------------------------------------------------------

def test_labels_missing_columns(tmp_path):
    small_folder(tmp_path, n=1)
    (tmp_path / "labels.csv").write_text("path,azimuth\nimg0.png,3\n")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path)
    assert "missing column(s) elevation, tilt" in one_line(e, tmp_path / "labels.csv")


def test_labels_non_numeric_angle(tmp_path):
    small_folder(tmp_path, n=2)
    (tmp_path / "labels.csv").write_text("path,azimuth,elevation,tilt\nimg0.png,1,2,3\nimg1.png,ten,2,3\n")
    with pytest.raises(ViewsslError) as e:
        read_labels(tmp_path)
    assert "line 3: azimuth is not a number: 'ten'" in one_line(e, tmp_path / "labels.csv")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path)
    one_line(e, tmp_path / "labels.csv")


@pytest.mark.parametrize("content,message", [
    # a decimal comma: one cell too many (it used to read azimuth 10, elevation 5, tilt 20)
    ("path,azimuth,elevation,tilt\nimg0.png,10,5,20,5,0\n", "line 2: 6 cells, the header has 4 columns"),
    ("path,azimuth,elevation,tilt,azimuth\nimg0.png,1,2,3,99\n", "column(s) azimuth appear twice in the header"),
    ("path,azimuth,elevation,tilt\n\nimg0.png,1,2,3\n\nimg1.png,ten,2,3\n", "line 5: azimuth is not a number"),
    ("path,azimuth,elevation,tilt\nimg0.png,0,200,0\n", "line 2: elevation 200 is outside [-90, 90] degrees"),
    ("path,azimuth,elevation,tilt,sequence,frame\nimg0.png,0,0,0,s,1.7\n", "line 2: frame is not a whole number"),
    ("path,azimuth,elevation,tilt,sequence,frame\nimg0.png,0,0,0,s,inf\n", "line 2: frame is not a whole number"),
    ("path,azimuth,elevation,tilt,sequence,frame\nimg0.png,0,0,0,s,1e20\n", "line 2: frame must be between 0 and 2^53"),
    ("path,azimuth,elevation,tilt,sequence,frame\nimg0.png,0,0,0,s,-1\n", "line 2: frame must be between 0 and 2^53"),
])
def test_labels_malformed_rows(tmp_path, content, message):
    small_folder(tmp_path, n=2)
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(ViewsslError) as e:
        read_labels(tmp_path)
    assert message in one_line(e, tmp_path / "labels.csv")


def test_labels_with_a_byte_order_mark(tmp_path):
    small_folder(tmp_path, n=1)
    (tmp_path / "labels.csv").write_bytes("path,azimuth,elevation,tilt\nimg0.png,1,2,3\n".encode("utf-8-sig"))
    assert read_labels(tmp_path).columns == ["path", "azimuth", "elevation", "tilt"]


def test_labels_bad_image_lazy_and_skip(tmp_path, caplog):
    paths = small_folder(tmp_path, n=3)
    (tmp_path / "labels.csv").write_text("path,azimuth,elevation,tilt\n" +
                                         "".join(f"img{i}.png,{i},0,0\n" for i in range(3)))
    paths[0].write_bytes(b"broken")
    ds = open_dataset(tmp_path, size=8)
    with pytest.raises(ViewsslError) as e:
        ds[0]
    one_line(e, paths[0])
    ds = open_dataset(tmp_path, size=8, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="viewssl.data.folders"):
        assert ds.verify(progress=False)[0][0] == 0
    assert len(ds) == 2 and ds.skipped == 1 and "skipped 1 bad of 3" in caplog.text
    assert ds[0]["angles"][0].item() == pytest.approx(np.radians(1.0))


def test_export_with_skip_bad_drops_bad_items_once(tmp_path):
    from common.data.formats import export_labels

    paths = small_folder(tmp_path / "in", n=3)
    (tmp_path / "in" / "labels.csv").write_text("path,azimuth,elevation,tilt\n" +
                                                "".join(f"img{i}.png,{i},0,0\n" for i in range(3)))
    paths[1].write_bytes(b"broken")
    out = export_labels(open_dataset(tmp_path / "in", size=8, skip_bad=True), tmp_path / "out", progress=False)
    back = read_labels(out)
    assert len(back) == 2 and len(set(back.paths)) == 2  # a replaced item was written under the bad one's name too
    assert np.degrees(back.angles[:, 0].numpy()) == pytest.approx([0, 2])


# -- .mat annotations --------------------------------------------------------------------------------------------------

def test_mat_without_pose_para(tmp_path):
    write_aflw2000(tmp_path, n=2)
    bad = tmp_path / "image00003.mat"
    scipy.io.savemat(str(bad), {"pt3d_68": np.zeros((3, 68)), "roi": np.ones((1, 4))})
    with pytest.raises(ViewsslError) as e:
        read_pose_mat(bad)
    assert "no Pose_Para" in one_line(e, bad) and "pt3d_68" in str(e.value)
    ds = open_dataset(tmp_path, size=8)  # lazy
    ds[0]
    with pytest.raises(ViewsslError) as e:
        ds[1]
    one_line(e, bad)
    with pytest.raises(ViewsslError) as e:
        ds.verify(progress=False)
    one_line(e, bad)
    skip = AFLW2000(tmp_path, size=8, skip_bad=True)
    assert len(skip.verify(progress=False)) == 1 and len(skip) == 1 and skip.skipped == 1
    assert torch.isfinite(skip.angles).all()


def test_mat_corrupt_and_short_pose_para(tmp_path):
    write_aflw2000(tmp_path, n=1)
    mat = tmp_path / "image00002.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file garbage")
    with pytest.raises(ViewsslError) as e:
        AFLW2000(tmp_path)[0]
    assert "not a readable MATLAB .mat" in one_line(e, mat)
    pose_mat(mat, pt3d_68=np.zeros((3, 68)))
    scipy.io.savemat(str(mat), {"Pose_Para": np.array([[0.1, np.nan]]), "pt3d_68": np.zeros((3, 68))})
    with pytest.raises(ViewsslError) as e:
        read_pose_mat(mat)
    assert "Pose_Para must start with finite pitch, yaw, roll" in one_line(e, mat)


@pytest.mark.parametrize("key", ["pt3d_68", "pt2d"])
def test_mat_landmarks_not_numeric(tmp_path, key):
    write_rgb(tmp_path / "image00002.jpg", np.zeros((20, 20, 3), np.uint8))
    mat = tmp_path / "image00002.mat"
    pose_mat(mat, **{key: np.array(["corrupt"])})
    with pytest.raises(ViewsslError) as e:
        AFLW2000(tmp_path)[0]
    assert f"{key} is not numeric" in one_line(e, mat)


def test_300wlp_landmark_file_not_numeric(tmp_path):
    write_aflw2000(tmp_path / "AFW", n=1)
    pts = tmp_path / "landmarks" / "AFW" / "image00002_pts.mat"
    pts.parent.mkdir(parents=True)
    scipy.io.savemat(str(pts), {"pts_2d": np.array(["corrupt"])})
    with pytest.raises(ViewsslError) as e:
        W300LP(tmp_path)[0]
    assert "pts_2d is not numeric" in one_line(e, pts)


def test_mat_without_landmarks(tmp_path):
    write_rgb(tmp_path / "image00002.jpg", np.zeros((20, 20, 3), np.uint8))
    pose_mat(tmp_path / "image00002.mat", pt2d=np.full((2, 21), -1.0))  # AFLW's 21 points only
    with pytest.raises(ViewsslError) as e:
        AFLW2000(tmp_path)[0]
    assert "no 68 landmarks" in one_line(e, tmp_path / "image00002.mat")


def test_image_without_mat(tmp_path):
    write_aflw2000(tmp_path / "AFW", n=2)
    (tmp_path / "AFW" / "image00003.mat").unlink()
    with pytest.raises(ViewsslError) as e:
        W300LP(tmp_path)
    assert "no matching .mat annotation" in one_line(e, tmp_path / "AFW" / "image00003.jpg")
    ds = W300LP(tmp_path, size=8, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1


# -- BIWI --------------------------------------------------------------------------------------------------------------

def test_biwi_bad_pose_file(tmp_path):
    write_biwi(tmp_path, sessions=("01",))
    pose = tmp_path / "01" / "frame_00005_pose.txt"
    pose.write_text("1 0 0\n0 1 0\n")
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert "expected a 3x3 rotation" in one_line(e, pose)
    pose.write_text(biwi_pose_text(np.diag([1.0, 1.0, 2.0]), (0, 0, 1000)))
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert "not a rotation matrix" in one_line(e, pose)
    ds = BIWI(tmp_path, size=8, detector="center", skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1
    pose.unlink()
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert "pose file not found" in one_line(e, pose)


@pytest.mark.parametrize("centre,where", [((0, 0, 0), "head centre z = 0 mm"),
                                          ((0, 0, -900), "head centre z = -900 mm"),
                                          ((0, 0, 3), "head centre z = 3 mm")])
def test_biwi_head_centre_behind_or_at_the_camera(tmp_path, centre, where):
    """A head centre at or behind the camera used to reach cv2 as a crop 1e11 px wide (a raw cv2.error)."""
    write_biwi(tmp_path, sessions=("01",))
    pose = tmp_path / "01" / "frame_00005_pose.txt"
    pose.write_text(biwi_pose_text(np.eye(3), centre))
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert where in one_line(e, pose)
    ds = BIWI(tmp_path, size=8, detector="center", skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1


def test_biwi_head_behind_the_rgb_camera_after_the_extrinsic(tmp_path):
    write_biwi(tmp_path, sessions=("01",))
    cal = tmp_path / "01" / "rgb.cal"
    cal.write_text(cal.read_text().replace("\n0 0 0\n\n", "\n0 0 2000\n\n"))  # t_cal: 2 m in front of the depth one
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert "in the RGB camera" in one_line(e, tmp_path / "01" / "frame_00003_pose.txt")


@pytest.mark.parametrize("old,new,message", [
    ("517.679 0", "nan 0", "intrinsics are not finite"),
    ("0 517.679 ", "0 inf ", "intrinsics are not finite"),
    ("\n0 0 0\n\n", "\n0 nan 0\n\n", "extrinsic t: expected 3 finite numbers"),
    ("0 0 0 0", "0 nan 0 0", "distortion is not finite"),
    ("200 160", "1e20 160", "image size: expected two positive whole numbers"),
])
def test_biwi_calibration_not_finite(tmp_path, old, new, message):
    write_biwi(tmp_path, sessions=("01",))
    cal = tmp_path / "01" / "rgb.cal"
    text = cal.read_text()
    assert old in text
    cal.write_text(text.replace(old, new, 1))
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    assert message in one_line(e, cal)


def test_biwi_bad_calibration(tmp_path):
    write_biwi(tmp_path, sessions=("01",))
    cal = tmp_path / "01" / "rgb.cal"
    cal.write_text("517 0 320\n0 517 240\n0 0 1\n\nzero zero\n")
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path, detector="center")
    assert "line 5: not numbers" in one_line(e, cal)
    cal.write_text("517 0 320\n0 517 240\n0 0 1\n\n0 0 0 0\n")
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="center")
    one_line(e, cal)


def test_biwi_unknown_and_unavailable_detector(tmp_path):
    write_biwi(tmp_path, sessions=("01",))
    with pytest.raises(ViewsslError) as e:
        BIWI(tmp_path, detector="mtcnn")
    assert "detector='mtcnn'" in one_line(e) and "face-alignment" in str(e.value)


def test_biwi_corrupt_frame_is_lazy(tmp_path):
    write_biwi(tmp_path, sessions=("01",))
    frame = tmp_path / "01" / "frame_00003_rgb.png"
    frame.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = BIWI(tmp_path, size=8, detector="center")
    with pytest.raises(ViewsslError) as e:
        ds[0]
    one_line(e, frame)
    assert ds[1]["image"].shape == (3, 8, 8)


def test_detect_format_unknown_kind_message(tmp_path):
    small_folder(tmp_path)
    assert detect_format(tmp_path) == "images"
    with pytest.raises(ViewsslError) as e:
        open_dataset(tmp_path, kind="imagenet")
    assert "unknown dataset kind 'imagenet'" in one_line(e) and "biwi" in str(e.value)


def test_folder_lock_refuses_a_second_writer_in_this_or_another_process_and_goes_with_the_first(tmp_path):
    import subprocess
    import sys

    from common.errors import ViewsslError
    from common.io import folder_lock

    out = tmp_path / "runs" / "out"
    probe = ("import sys; from common.io import folder_lock\n"
             "try:\n"
             f"    with folder_lock({str(out)!r}, 'probe'): sys.exit(0)\n"
             "except Exception as e:\n"
             "    print(e); sys.exit(3)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with folder_lock(out, "test run"):
        assert out.is_dir()
        with pytest.raises(ViewsslError, match=r"runs/out: another test run is writing to this folder"):
            with folder_lock(out, "test run"):
                pass
        other = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
        assert other.returncode == 3 and "another probe is writing" in other.stdout
    # released with the block: the same process and another one may take it now
    with folder_lock(out, "test run"):
        pass
    assert subprocess.run([sys.executable, "-c", probe], cwd=root).returncode == 0


class _Payload:
    """A pickle that would run code on load (torch.load without weights_only would call os.system)."""

    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_checkpoint_with_code_in_its_pickle_is_refused_unrun(tmp_path, monkeypatch):
    from common.io import load_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.save({"family": "ssv", "step": 1, "config": {}, "evil": _Payload()}, tmp_path / "ckpt-00000001.pt")
    with pytest.raises(ViewsslError, match=r"ckpt-00000001\.pt: not a readable viewssl checkpoint"):
        load_checkpoint(tmp_path / "ckpt-00000001.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_error_summary_keeps_what_is_wrong():
    """The one line of a wrapped library error: torch's load_state_dict header gives way to its details, a bare key
    gets its type, long text is cut."""
    from common.errors import error_summary

    net = torch.nn.Linear(2, 3)
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict({"weight": torch.zeros(3, 4)})
    text = error_summary(info.value)
    assert text.startswith("Missing key(s) in state_dict: \"bias\". size mismatch for weight: copying a param with "
                           "shape torch.Size([3, 4])"), text
    assert error_summary(KeyError(101)) == "KeyError: 101"
    assert error_summary(ValueError("")) == "ValueError"
    assert error_summary(ValueError("bad value\nsecond line")) == "bad value"
    assert error_summary(TypeError("string indices"), with_type=True) == "TypeError: string indices"
    assert error_summary(ValueError("x" * 300), limit=50) == "x" * 47 + "..."


def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path):
    from common.io import load_checkpoint

    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    with pytest.raises(ViewsslError, match=r"notes\.pt: not a readable viewssl checkpoint \(\w+Error: "):
        load_checkpoint(tmp_path / "notes.pt")


def test_an_opencv_that_cannot_load_names_the_system_packages(tmp_path, monkeypatch):
    """opencv-python (what face-alignment requires) needs libGL and GLib from the system; without them reading an
    image is a one-line error naming the packages (was an ImportError traceback)."""
    import sys

    from common.io import read_image, write_image

    write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "cv2", None)  # as an import that fails: libGL.so.1 not found
    with pytest.raises(ViewsslError, match=r"cannot import OpenCV \(.*\); on Debian/Ubuntu install libgl1 and "
                                           r"libglib2\.0-0"):
        read_image(tmp_path / "a.png")
