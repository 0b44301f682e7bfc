"""`viewssl data render` and `viewssl data show` through click's CliRunner."""
from __future__ import annotations

import json

import numpy as np

import pytest
from click.testing import CliRunner

from experiments.cli import cli

TINY = ["--set", "categories=car", "--set", "ood_categories=mug", "--set", "train_instances=1", "--set",
        "val_instances=1", "--set", "test_instances=1", "--set", "ood_train_instances=1", "--set",
        "ood_test_instances=1", "--set", "view_stride=25", "--set", "unseen_views=4", "--set", "head_train=3",
        "--set", "head_test=2", "--set", "head_train_identities=2", "--set", "head_test_identities=1", "--set",
        "triplets_per_instance=1", "--set", "sequence_categories=chair", "--set", "sequence_train_instances=1",
        "--set", "sequence_test_instances=1", "--set", "frames=3"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bench"
    result = CliRunner().invoke(cli, ["data", "render", "--kind", "all", "--out", str(out), "--size", "32",
                                      "--seed", "5", "--no-progress", *TINY])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_render_writes_the_layout_and_prints_a_summary(rendered):
    out, output = rendered
    assert "objects/train" in output and "sequences/test" in output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["size"] == 32 and meta["config"]["frames"] == 3
    assert meta["config"]["categories"] == ["car"]
    for kind, split in (("objects", "test_unseen_pose"), ("heads", "train"), ("triplets", "train"),
                        ("sequences", "test")):
        assert (out / kind / split / "labels.csv").is_file()


def test_render_one_kind(tmp_path):
    out = tmp_path / "h"
    result = CliRunner().invoke(cli, ["data", "render", "--kind", "heads", "--out", str(out), "--size", "16",
                                      "--no-progress", *TINY])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".lock", "heads", "meta.json"]  # .lock: the render's lock


def test_show_writes_a_grid(rendered, tmp_path):
    out, _ = rendered
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["data", "show", str(out), "--out", str(grid), "--n", "12"])
    assert result.exit_code == 0, result.output
    assert grid.stat().st_size > 1000 and "12 images" in result.output
    # a single labels folder, default output inside it
    result = CliRunner().invoke(cli, ["data", "show", str(out / "objects" / "train"), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "objects" / "train" / "grid.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["data", "show", "/nonexistent/folder"], "no such folder"),
    (["data", "render", "--out", "{tmp}/x", "--set", "frames"], "expected KEY=VALUE"),
    (["data", "render", "--out", "{tmp}/x", "--set", "nonsense=3"], "expected KEY=VALUE"),
    (["data", "render", "--out", "{tmp}/x", "--set", "frames=many"], "frames must be an integer"),
    (["data", "render", "--out", "{tmp}/x", "--set", "categories=car,spaceship"], "unknown categories spaceship"),
    (["data", "render", "--out", "{tmp}/x", "--set", "seed=3"], "use --seed"),
    (["data", "render", "--out", "{tmp}/x", "--set", "object_fov=inf"], "object_fov must be a finite number >= 0"),
    (["data", "render", "--out", "{tmp}/x", "--set", "object_distance=nan"], "object_distance must be a finite"),
    (["data", "render", "--out", "{tmp}/x", "--set", "head_fov=180"], "head_fov must be in (0, 180) degrees"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output


def test_show_a_folder_without_viewpoints(rendered, tmp_path):
    import shutil

    out, _ = rendered
    folder = tmp_path / "frames"
    shutil.copytree(out / "sequences" / "test", folder)
    lines = (folder / "labels.csv").read_text().splitlines()
    (folder / "labels.csv").write_text("\n".join(["path,sequence,frame"] + [
        ",".join([line.split(",")[0], "v", str(i)]) for i, line in enumerate(lines[1:])]) + "\n")
    result = CliRunner().invoke(cli, ["data", "show", str(folder), "--n", "3"])
    assert result.exit_code == 0, result.output
    assert (folder / "grid.png").stat().st_size > 500


def test_export_ucf101_frames(tmp_path):
    """`viewssl data export` of UCF101-style frames (no viewpoints): a labels.csv folder with blank angles and the
    video ids (evaluated per video in tests/test_loaders.py); a folder that already holds labels is refused."""
    from tests.test_loaders import write_video

    write_video(tmp_path / "ucf", seq_lengths=(3, 2, 2))
    out = tmp_path / "ucf-labels"
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "ucf"), "--out", str(out), "--kind", "ucf101",
                                      "--size", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"wrote 7 images and {out / 'labels.csv'}" in result.output
    header, first = (out / "labels.csv").read_text().splitlines()[:2]
    assert header == "path,azimuth,elevation,tilt,category,instance,sequence,frame"
    assert first.split(",")[1:4] == ["", "", ""] and first.split(",")[6] == "class-1/group-1/seq-1"
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "ucf"), "--out", str(out)])
    assert result.exit_code == 2 and "already holds a labels.csv" in result.output


def test_export_pins_the_biwi_detector_and_angles_and_records_them(tmp_path):
    from tests.test_loaders import write_biwi

    write_biwi(tmp_path / "biwi", sessions=("01",))
    out = tmp_path / "biwi-labels"
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "biwi"), "--out", str(out), "--size", "16",
                                      "--detector", "center", "--angles", "dataset", "--no-progress"])
    assert result.exit_code == 0, result.output
    how = json.loads((out / "export.json").read_text())
    assert how["kind"] == "biwi" and how["detector"] == "center" and how["angles"] == "dataset"
    assert how["options"] == {"detector": "center", "angles": "dataset"} and how["items"] == 3
    azimuths = [float(line.split(",")[1]) for line in (out / "labels.csv").read_text().splitlines()[1:]]
    # "dataset": SSV's labels, the rotation vector of R_pose = R_y(yaw) read as (pitch, yaw, roll): yaw as written
    assert azimuths == pytest.approx([30.0, -20.0, 0.0], abs=1e-3)


def test_export_max_abs_deg_and_options_a_kind_does_not_take(tmp_path):
    from tests.test_loaders import pose_mat, write_aflw2000

    pts = write_aflw2000(tmp_path / "aflw", n=3)
    pose_mat(tmp_path / "aflw" / "image00003.mat", yaw=2.0, pt3d_68=np.vstack([pts.T, np.zeros((1, 68))]))
    out = tmp_path / "aflw-labels"
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "aflw"), "--out", str(out), "--size", "16",
                                      "--max-abs-deg", "99", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 images" in result.output
    assert json.loads((out / "export.json").read_text())["options"] == {"max_abs_deg": 99.0}
    result = CliRunner().invoke(cli, ["data", "export", str(tmp_path / "aflw"), "--out", str(tmp_path / "o2"),
                                      "--detector", "haar"])
    assert result.exit_code == 2 and "aflw2000 dataset: unknown option(s) detector" in result.output


def test_show_rejects_a_folder_without_labels(tmp_path):
    result = CliRunner().invoke(cli, ["data", "show", str(tmp_path)])
    assert result.exit_code == 2 and "no labels.csv" in result.output


def test_show_leaves_out_a_killed_renders_hidden_folder(rendered, tmp_path):
    import shutil

    out, _ = rendered
    bench = tmp_path / "bench"
    shutil.copytree(out, bench)
    shutil.copytree(bench / "heads", bench / ".heads.partial")  # as a render killed halfway leaves it
    from common.data.cli import _find_tables

    assert ".heads.partial" not in {name for name, _ in _find_tables(bench)}
    assert "heads" in {name for name, _ in _find_tables(bench)}


def test_render_refuses_other_settings_in_the_same_folder(rendered):
    out, _ = rendered
    result = CliRunner().invoke(cli, ["data", "render", "--kind", "heads", "--out", str(out), "--size", "32",
                                      "--seed", "6", "--no-progress", *TINY])
    assert result.exit_code == 2 and "other settings" in result.output


def test_bad_choice_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["data", "render", "--kind", "cats", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cats" in result.output


@pytest.mark.parametrize("command", [["data", "--help"], ["data", "render", "--help"], ["data", "show", "--help"],
                                     ["data", "export", "--help"]])
def test_help(command):
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0 and "Usage" in result.output
