"""labels.csv: round trip in degrees/radians, optional columns, and one-line errors naming the file."""
import math
import shutil

import numpy as np
import pytest
import torch

from common.data.labels import LabeledFolder, read_labels, write_labels
from common.errors import ViewsslError
from common.io import write_image


def make_folder(root, n=4, extra=True):
    rows = []
    for i in range(n):
        write_image(root / "img" / f"{i}.png", torch.full((3, 8, 8), i / n))
        row = {"path": f"img/{i}.png", "azimuth": math.radians(10 * i), "elevation": -0.1 * i, "tilt": 3.0}
        if extra:
            row.update({"category": ["car", "mug"][i % 2], "instance": f"inst{i // 2}", "sequence": i // 2, "frame": i})
        rows.append(row)
    write_labels(root / "labels.csv", rows)
    return rows


def test_round_trip_degrees_at_the_edge(tmp_path):
    make_folder(tmp_path)
    text = (tmp_path / "labels.csv").read_text().splitlines()
    assert text[0] == "path,azimuth,elevation,tilt,category,instance,sequence,frame"
    assert text[2].split(",")[1] == "10.000000"  # degrees in the file
    t = read_labels(tmp_path)
    assert t.angles.shape == (4, 3)
    np.testing.assert_allclose(t.angles[:, 0].numpy(), [math.radians(10 * i) for i in range(4)], atol=1e-9)
    assert t.categories == ["car", "mug"] and list(t.category_index) == [0, 1, 0, 1]
    assert list(t.frame) == [0, 1, 2, 3] and list(t.sequence_index) == [0, 0, 1, 1]


def test_dataset_items(tmp_path):
    make_folder(tmp_path)
    ds = LabeledFolder(tmp_path, size=16)
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert abs(float(item["image"].mean()) - 0.75) < 0.01
    assert item["category"] == 1 and item["frame"] == 3 and item["instance"] == 1
    make_folder(tmp_path / "plain", extra=False)
    assert LabeledFolder(tmp_path / "plain")[0]["category"] == -1


@pytest.mark.parametrize("content, message", [
    ("path,azimuth,tilt\nimg/0.png,1,2\n", "missing column(s) elevation"),
    ("path,azimuth,elevation,tilt\nimg/0.png,abc,2,3\n", "line 2: azimuth is not a number: 'abc'"),
    ("path,azimuth,elevation,tilt\nimg/0.png,nan,2,3\n", "line 2: azimuth is not finite"),
    ("path,azimuth,elevation,tilt\nimg/9.png,1,2,3\n", "line 2: image 'img/9.png' does not exist"),
    ("path,azimuth,elevation,tilt\n../outside.png,1,2,3\n", "escapes the dataset folder"),
    ("path,azimuth,elevation,tilt\n/etc/passwd,1,2,3\n", "is absolute"),
    ("path,azimuth,elevation,tilt\n", "has a header but no rows"),
])
def test_bad_labels_name_the_file(tmp_path, content, message):
    make_folder(tmp_path)
    (tmp_path / "outside.png").write_bytes(b"")
    sub = tmp_path / "ds"
    sub.mkdir()
    shutil.copytree(tmp_path / "img", sub / "img")
    (sub / "labels.csv").write_text(content)
    with pytest.raises(ViewsslError) as e:
        read_labels(sub)
    assert message in str(e.value) and str(sub / "labels.csv") in str(e.value)


def test_a_folder_without_viewpoints(tmp_path):
    """No angle columns, or all three blank on every row: NaN angles, has_angles False, written back blank. A row
    with some angles blank, or a table with viewpoints on some rows only, is an error naming the line."""
    make_folder(tmp_path)
    rows = [{"path": f"img/{i}.png", "azimuth": float("nan"), "elevation": float("nan"), "tilt": float("nan"),
             "sequence": "v0"} for i in range(3)]
    write_labels(tmp_path / "blank" / "labels.csv", rows)
    text = (tmp_path / "blank" / "labels.csv").read_text().splitlines()
    assert text[:2] == ["path,azimuth,elevation,tilt,sequence", "img/0.png,,,,v0"]
    shutil.copytree(tmp_path / "img", tmp_path / "blank" / "img")
    for folder, content in (("blank", None), ("none", "path,sequence\nimg/0.png,v0\nimg/1.png,v0\n")):
        if content is not None:
            shutil.copytree(tmp_path / "img", tmp_path / folder / "img")
            (tmp_path / folder / "labels.csv").write_text(content)
        t = read_labels(tmp_path / folder)
        assert not t.has_angles and torch.isnan(t.angles).all() and t.angles.shape == (len(t), 3)
        assert t.sequences == ["v0"]
        assert torch.isnan(LabeledFolder(tmp_path / folder)[1]["angles"]).all()
    assert read_labels(tmp_path).has_angles
    for content, message in (
        ("path,azimuth,elevation,tilt\nimg/0.png,1,,\n", "line 2: elevation, tilt blank but not the other"),
        ("path,azimuth,elevation,tilt\nimg/0.png,1,2,3\nimg/1.png,,,\n",
         "line 3 has no viewpoint (blank angles) but line 2 has one"),
        ("path,azimuth\nimg/0.png,1\n", "missing column(s) elevation, tilt"),
    ):
        (tmp_path / "blank" / "labels.csv").write_text(content)
        with pytest.raises(ViewsslError) as e:
            read_labels(tmp_path / "blank")
        assert message in str(e.value) and str(tmp_path / "blank" / "labels.csv") in str(e.value)


def test_an_unreadable_subfolder_is_an_error_not_a_silent_gap(tmp_path, monkeypatch):
    import os

    from common.data.folders import list_images

    make_folder(tmp_path)
    (tmp_path / "more").mkdir()
    real = os.scandir

    def scandir(path="."):  # what a folder without read permission gives (chmod does not stop root)
        if os.fspath(path).endswith("more"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ViewsslError, match=r"more: cannot read the folder \(Permission denied\)"):
        list_images(tmp_path)


def test_a_labels_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "labels.csv"
    write_labels(path, [{"path": "a.png", "azimuth": 0.1, "elevation": 0.0, "tilt": 0.0}])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_labels(path, [{"path": "a.png", "azimuth": 0.2, "elevation": 0.0, "tilt": 0.0},
                            {"path": "b.png", "azimuth": "north", "elevation": 0.0, "tilt": 0.0}])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    make_folder(tmp_path)
    sub = tmp_path / "ds"
    sub.mkdir()
    (sub / "img").symlink_to(tmp_path / "img")
    (sub / "labels.csv").write_text("path,azimuth,elevation,tilt\nimg/0.png,1,2,3\n")
    with pytest.raises(ViewsslError, match="escapes the dataset folder"):
        read_labels(sub)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(ViewsslError, match="no such folder"):
        read_labels(tmp_path / "nope")
    with pytest.raises(ViewsslError, match="no labels.csv"):
        read_labels(tmp_path)


def test_truncated_image_is_named(tmp_path):
    make_folder(tmp_path)
    p = tmp_path / "img" / "1.png"
    p.write_bytes(p.read_bytes()[:20])
    ds = LabeledFolder(tmp_path)
    with pytest.raises(ViewsslError, match=r"1\.png: unreadable or truncated image"):
        ds[1]


def test_atomic_writes_respect_the_umask(tmp_path):
    import os

    from common.io import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_writes_sync_the_file_and_then_its_folder(tmp_path, monkeypatch):
    import os
    import stat

    from common.io import atomic_write_bytes

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert synced == [False, True]  # the data before the rename, the folder's entry after it


def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_no_temp_file(tmp_path, monkeypatch):
    import torch

    from common.io import atomic_save

    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()

    def half_then_fail(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    """atomic_save_figure: the PNG appears in one rename (the old plot stays if drawing fails) and the figure is
    closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_save_figure

    path = tmp_path / "plot.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    assert atomic_save_figure(fig, path, dpi=50) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    before = path.read_bytes()
    fig, ax = plt.subplots(figsize=(2, 2))
    with pytest.raises(ValueError):
        atomic_save_figure(fig, path, dpi=-1)  # matplotlib refuses to draw: nothing is written
    assert not plt.fignum_exists(fig.number) and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_id_order_is_numeric_then_text_and_nan_is_text():
    """A "nan" id used to get a NaN sort key, so the order (and every int id) changed with the hash seed."""
    from common.data.labels import _index

    names, index = _index(["car", "nan", "3", "1", "chair", "2", "10", "inf", ""])
    assert names == ["1", "2", "3", "10", "car", "chair", "inf", "nan"]
    assert index.tolist() == [4, 7, 2, 0, 5, 1, 3, 6, -1]
