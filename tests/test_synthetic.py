"""The synthetic benchmark: camera convention, labels agree with images, determinism, splits, triplets, streaming."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.labels import BOX_COLUMNS, LabeledFolder, read_labels
from common.data.synthetic import (
    CATEGORIES,
    IN_DOMAIN,
    OUT_OF_DOMAIN,
    BenchmarkConfig,
    SyntheticDataset,
    fib_rotations,
    render_benchmark,
    summarize,
)
from common.data.synthetic.parts import Builder
from common.data.synthetic.render import Background, Camera, Light, get_renderer, project
from common.errors import ViewsslError
from common.eval.boxes import box_corners, project_points
from common.geometry import angles_to_matrix, geodesic_distance

# A benchmark small enough to render in a second or two.
TINY = dict(categories=("car", "mug"), ood_categories=("bottle",), train_instances=2, val_instances=1,
            test_instances=1, ood_train_instances=1, ood_test_instances=1, view_stride=17, head_train=6, head_test=3,
            head_train_identities=2, head_test_identities=1, triplets_per_instance=2, sequence_categories=("mug",),
            sequence_train_instances=1, sequence_test_instances=1, frames=4, head_triplets=2, head_sequences_train=1,
            head_sequences_test=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "b"
    render_benchmark(root, scale="small", seed=3, progress=False, **TINY)
    return root


def _rot(az, el, ti) -> np.ndarray:
    return angles_to_matrix(*(torch.tensor(math.radians(a), dtype=torch.float64) for a in (az, el, ti))).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Camera convention: a white cube with coloured nubs on +x (red), +y (green) and +z (blue)
# ---------------------------------------------------------------------------------------------------------------
NUBS = {"red": ((1, 0, 0), (0.9, 0.05, 0.05)), "green": ((0, 1, 0), (0.05, 0.9, 0.05)),
        "blue": ((0, 0, 1), (0.05, 0.05, 0.9))}
SIZE, FOV, DIST = 64, 30.0, 4.0


@pytest.fixture(scope="module")
def marker_cube():
    b = Builder(np.random.default_rng(0))
    b.box((1, 1, 1), (0, 0, 0), (0.9, 0.9, 0.9))
    for axis, color in NUBS.values():
        a = np.asarray(axis, dtype=float)
        b.box((0.3, 0.3, 0.3), a * 0.65, color)  # a 0.3 cube sticking out of the face, from 0.5 to 0.8
    return b.build("test/marker-cube", normalize=False)


def _render_cube(mesh, az, el, ti):
    camera = Camera.from_fov(SIZE, FOV)
    image = get_renderer().render([mesh], _rot(az, el, ti), (0, 0, -DIST), camera, Light(direction=(0, 0, 1),
                                  ambient=0.5, diffuse=0.5, specular=0.0), Background())
    return image.astype(np.float64), camera


def _centroid(image, name):
    """Pixel centre of mass (u, v) and pixel count of a nub's colour."""
    channel = {"red": 0, "green": 1, "blue": 2}[name]
    others = [c for c in range(3) if c != channel]
    mask = (image[..., channel] > 60) & (image[..., others].max(-1) < 0.5 * image[..., channel])
    if mask.sum() == 0:
        return None, 0
    v, u = np.nonzero(mask)
    return np.array([u.mean() + 0.5, v.mean() + 0.5]), int(mask.sum())


@pytest.mark.parametrize("angles", [(0, 0, 0), (-90, 0, 0), (90, 0, 0), (0, 0, 90), (0, 45, 0), (0, -45, 0),
                                    (30, 20, -25), (-120, 35, 60), (180, -10, 10), (-60, 35, 60), (150, -30, 10),
                                    (-150, -40, 30)])
def test_nubs_land_where_the_convention_says(marker_cube, angles):
    """Every nub that faces the camera is drawn where R and the projection put it; one that faces away is hidden
    (each case checks at least one; the last three put a nub in view from behind or below)."""
    image, camera = _render_cube(marker_cube, *angles)
    R = _rot(*angles)
    checked = 0
    for name, (axis, _) in NUBS.items():
        centre_cam = R @ (np.asarray(axis) * 0.65) + (0, 0, -DIST)
        facing = (R @ np.asarray(axis, dtype=float))[2]  # > 0: the nub's outer face looks at the camera
        centroid, count = _centroid(image, name)
        if facing > 0.3:
            assert count > 10, (name, angles)
            expected = project(centre_cam, camera)
            assert np.abs(centroid - expected).max() < 3.5, (name, angles, centroid, expected)
            checked += 1
        elif facing < -0.5:
            assert count < 5, (name, angles, count)
            checked += 1
    assert checked > 0, angles


@pytest.mark.parametrize("name,top", [("yaw_range", 180), ("pitch_range", 90), ("roll_range", 180)])
def test_head_ranges_stay_inside_the_label_ranges(name, top):
    """The head draws are written as the labels (elevation = pitch in [-90, 90]): a wider range is refused before
    anything renders, not after, by the labels' reader."""
    BenchmarkConfig.preset("small", **{name: top}).validate()
    with pytest.raises(ViewsslError, match=f"{name} must be at most {top} degrees, got {top + 10}"):
        BenchmarkConfig.preset("small", **{name: top + 10}).validate()


def test_readable_convention_cases(marker_cube):
    c = SIZE / 2
    # identity: +x (red) to the image right, +y (green) up, +z (blue) faces the camera at the centre
    image, _ = _render_cube(marker_cube, 0, 0, 0)
    assert _centroid(image, "red")[0][0] > c + 15 and _centroid(image, "green")[0][1] < c - 15
    assert np.abs(_centroid(image, "blue")[0] - c).max() < 1.5
    # azimuth -90: the +x side faces the camera; +90: it faces away
    assert np.abs(_centroid(_render_cube(marker_cube, -90, 0, 0)[0], "red")[0] - c).max() < 1.5
    assert _centroid(_render_cube(marker_cube, 90, 0, 0)[0], "red")[1] == 0
    # tilt +90 turns the image content counter-clockwise: +x goes up
    red = _centroid(_render_cube(marker_cube, 0, 0, 90)[0], "red")[0]
    assert red[1] < c - 15 and abs(red[0] - c) < 2
    # elevation +45: the camera looks down, the top tips towards it and the front moves down
    image, _ = _render_cube(marker_cube, 0, 45, 0)
    assert _centroid(image, "blue")[0][1] > c + 8
    assert _centroid(image, "green")[1] > 10


def test_upright_camera_formula_of_the_docstring():
    from common.geometry import axis_rotation, look_at_rotation, matrix_to_angles

    for phi, theta in [(0.7, 0.4), (-2.0, -0.3), (0.0, 0.5), (1.2, 0.0)]:
        d = torch.tensor([math.cos(theta) * math.sin(phi), math.sin(theta), math.cos(theta) * math.cos(phi)],
                         dtype=torch.float64)
        R = look_at_rotation(d)
        x, y = (torch.tensor(a, dtype=torch.float64) for a in (theta, -phi))
        assert torch.allclose(R, axis_rotation("x", x) @ axis_rotation("y", y), atol=1e-12)
        assert torch.allclose(R[2], d)  # where the camera is = third row of R
        az, el, ti = matrix_to_angles(R)
        if phi == 0:
            assert abs(az) < 1e-9 and abs(el - theta) < 1e-9 and abs(ti) < 1e-9
        if theta == 0:
            assert abs(az + phi) < 1e-9 and abs(el) < 1e-9 and abs(ti) < 1e-9


def test_projection_matches_opengl_and_principal_point():
    b = Builder(np.random.default_rng(0))
    b.box((0.2, 0.2, 0.2), (0, 0, 0), (1, 1, 1))
    dot = b.build("test/dot", normalize=False)
    camera = Camera(70.0, 60.0, 30.0, 36.0, 64, 64)  # off-centre principal point, fx != fy
    for X in [(0.0, 0.0, -4.0), (0.7, -0.4, -3.0), (-1.0, 0.8, -5.0)]:
        image, mask = get_renderer().render([dot], np.eye(3), X, camera, with_mask=True)
        v, u = np.nonzero(mask > 0.5)
        got = np.array([u.mean() + 0.5, v.mean() + 0.5])
        assert np.abs(got - project(np.asarray(X), camera)).max() < 0.6


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def test_categories_split_13_11():
    assert len(IN_DOMAIN) == 13 and len(OUT_OF_DOMAIN) == 11 and not set(IN_DOMAIN) & set(OUT_OF_DOMAIN)
    assert set(IN_DOMAIN) | set(OUT_OF_DOMAIN) == set(CATEGORIES)


def test_every_category_builds_varied_normalised_instances():
    from common.data.synthetic import build_object

    for name in CATEGORIES:
        a, b = build_object(name, 0, 7), build_object(name, 1, 7)
        for m in (a, b):
            half_diag = np.linalg.norm(m.extents) / 2
            assert abs(half_diag - 1) < 1e-5 and np.abs(m.positions).max() <= 1.0 + 1e-5, name
            assert 0 < m.n_triangles < 5000, name
        assert not np.array_equal(a.vertex_data, b.vertex_data), name


def test_render_is_deterministic(tiny, tmp_path):
    """Same seed, same bytes -- also when two worker processes share the rendering."""
    again = tmp_path / "again"
    render_benchmark(again, scale="small", seed=3, progress=False, workers=2, **TINY)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) > 50
    for f in files:
        assert (tiny / f).read_bytes() == (again / f).read_bytes(), f


def test_layout_meta_and_summary(tiny):
    s = summarize(tiny)
    assert set(s["kinds"]) == {"objects", "heads", "triplets", "sequences", "head_triplets", "head_sequences"}
    assert set(s["kinds"]["objects"]["splits"]) == {"train", "val", "test", "test_unseen_pose",
                                                    "train_unseen_pose", "ood_train", "ood_test"}
    assert s["kinds"]["objects"]["splits"]["test_unseen_pose"]["fib"] == 100
    # 2 categories x 2 instances x views 0, 17, 34 of Fib(50)
    assert s["kinds"]["objects"]["splits"]["train"]["images"] == 2 * 2 * 3
    seq = read_labels(tiny / "sequences" / "train")
    assert seq.columns[-len(BOX_COLUMNS):] == list(BOX_COLUMNS)
    for column in ("fx", "fy", "cx", "cy", "box_cx", "box_cy", "box_cz", "box_sx", "box_sy", "box_sz", "plane_nx",
                   "plane_ny", "plane_nz", "plane_d", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"):
        assert np.isfinite(seq.numeric(column)).all()
    trip = read_labels(tiny / "triplets" / "train")
    assert list(trip.numeric("position")[:6]) == [0, 1, 2, 0, 1, 2]


def test_splits_are_disjoint(tiny):
    inst = {s: set(read_labels(tiny / "objects" / s).raw["instance"]) for s in ("train", "val", "test", "ood_train",
                                                                                 "ood_test")}
    for a in inst:
        for b in inst:
            if a < b:
                assert not inst[a] & inst[b], (a, b)
    assert inst["train"] == set(read_labels(tiny / "objects" / "train_unseen_pose").raw["instance"])
    assert inst["test"] == set(read_labels(tiny / "objects" / "test_unseen_pose").raw["instance"])
    cats_in = set(read_labels(tiny / "objects" / "train").raw["category"])
    cats_ood = set(read_labels(tiny / "objects" / "ood_train").raw["category"])
    assert cats_in == {"car", "mug"} and cats_ood == {"bottle"}
    assert set(read_labels(tiny / "triplets" / "train").raw["instance"]) <= inst["train"]
    seq = [set(read_labels(tiny / "sequences" / s).raw["instance"]) for s in ("train", "test")]
    assert not seq[0] & seq[1] and not seq[1] & set().union(*inst.values())
    heads = [set(read_labels(tiny / "heads" / s).raw["instance"]) for s in ("train", "test")]
    assert not heads[0] & heads[1]
    head_seq = [set(read_labels(tiny / "head_sequences" / s).raw["instance"]) for s in ("train", "test")]
    assert head_seq[0] <= {"id00000", "id00001"} and head_seq[1] == {"id00002"}
    # Fib(50) and Fib(100) share no viewpoint
    d = geodesic_distance(torch.from_numpy(fib_rotations(50))[:, None], torch.from_numpy(fib_rotations(100))[None])
    assert d.min() > math.radians(1.0)


def test_object_labels_are_the_fib_rotations(tiny):
    for split, n in (("train", 50), ("test_unseen_pose", 100)):
        t = read_labels(tiny / "objects" / split)
        R = angles_to_matrix(*t.angles.unbind(-1))
        expected = torch.from_numpy(fib_rotations(n))[torch.from_numpy(t.numeric("view").astype(np.int64))]
        assert geodesic_distance(R, expected).max() < 1e-6


def test_labels_reproduce_the_images(tiny):
    """Re-rendering with the rotation rebuilt from labels.csv (degrees) gives the same image."""
    for kind, split in (("objects", "test"), ("heads", "test"), ("triplets", "train")):
        ds = SyntheticDataset.from_root(tiny, kind, split)
        table = read_labels(tiny / kind / split)
        for i in range(0, len(ds), max(1, len(ds) // 3)):
            spec = ds.specs[i]
            R = angles_to_matrix(*table.angles[i]).numpy()
            assert np.abs(R - spec.rotation).max() < 1e-6
            image = get_renderer().render([ds.mesh(i)], R, spec.translation, spec.camera, spec.light,
                                          spec.background, supersample=ds.config.supersample)
            disk = (LabeledFolder(tiny / kind / split, size=None)[i]["image"] * 255).round().byte()
            diff = np.abs(image.astype(int) - disk.permute(1, 2, 0).numpy().astype(int))
            assert (diff > 2).mean() < 0.002, (kind, i)


def test_sequence_boxes_agree_with_the_images(tiny):
    ds = SyntheticDataset.from_root(tiny, "sequences", "test")
    table = read_labels(tiny / "sequences" / "test")
    col = {c: table.numeric(c) for c in BOX_COLUMNS}
    for i in range(len(ds)):
        image, mask = ds.render(i, with_mask=True)
        cam = Camera(col["fx"][i], col["fy"][i], col["cx"][i], col["cy"][i], 64, 64)
        centre = project(np.array([col["box_cx"][i], col["box_cy"][i], col["box_cz"][i]]), cam)
        u, v = np.floor(centre).astype(int)
        assert mask[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2].max() > 0.5, i  # the box centre lies on the object
        # the 2D box is the bounds of the 8 projected box corners, with the row's own intrinsics
        R = angles_to_matrix(*table.angles[i]).numpy()
        corners = box_corners(np.array([col["box_cx"][i], col["box_cy"][i], col["box_cz"][i]]),
                              np.array([col["box_sx"][i], col["box_sy"][i], col["box_sz"][i]]), R)
        uv = project_points(corners, col["fx"][i], col["fy"][i], col["cx"][i], col["cy"][i])
        np.testing.assert_allclose([col[c][i] for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")],
                                   [*uv.min(0), *uv.max(0)], atol=1e-3)
        vs, us = np.nonzero(mask > 0)
        assert us.min() >= col["bbox_x0"][i] - 1 and us.max() + 1 <= col["bbox_x1"][i] + 1
        assert vs.min() >= col["bbox_y0"][i] - 1 and vs.max() + 1 <= col["bbox_y1"][i] + 1
        # the ground plane passes through the bottom of the box, below the object
        R = angles_to_matrix(*table.angles[i]).numpy()
        n = np.array([col["plane_nx"][i], col["plane_ny"][i], col["plane_nz"][i]])
        assert np.allclose(n, R[:, 1], atol=1e-5)
        bottom = np.array([col["box_cx"][i], col["box_cy"][i], col["box_cz"][i]]) - R[:, 1] * col["box_sy"][i] / 2
        assert abs(n @ bottom + col["plane_d"][i]) < 1e-4
        assert n @ np.zeros(3) + col["plane_d"][i] > 0  # the camera is above the ground


@pytest.mark.parametrize("kind", ["triplets", "head_triplets"])
def test_triplets_are_symmetric(tiny, kind):
    t = read_labels(tiny / kind / "train")
    assert list(t.numeric("position")[:6]) == [0, 1, 2, 0, 1, 2]
    step = math.radians(BenchmarkConfig().triplet_step)
    R = angles_to_matrix(*t.angles.unbind(-1)).reshape(-1, 3, 3, 3)
    L, C, Rr = R[:, 0], R[:, 1], R[:, 2]
    assert torch.allclose(geodesic_distance(L, C), torch.full((len(R),), step, dtype=R.dtype), atol=1e-5)
    assert torch.allclose(geodesic_distance(C, Rr), torch.full((len(R),), step, dtype=R.dtype), atol=1e-5)
    assert torch.allclose(Rr, C @ L.transpose(-1, -2) @ C, atol=1e-5)
    assert (geodesic_distance(L, Rr) > step * 1.5).all()
    if kind == "triplets":
        views = t.numeric("view").reshape(-1, 3)
        assert (views == views[:, :1]).all()


def test_head_sequences_turn_at_constant_speed(tiny):
    t = read_labels(tiny / "head_sequences" / "train")
    assert list(t.frame) == list(range(len(t)))
    R = angles_to_matrix(*t.angles.unbind(-1))
    steps = geodesic_distance(R[:-1], R[1:])
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-5)
    assert geodesic_distance(R[0], R[-1]) >= math.radians(BenchmarkConfig().head_turn_min) - 1e-6


def test_head_turn_min_is_kept_or_refused():
    """Ranges too narrow for head_turn_min used to give shorter turns silently."""
    with pytest.raises(ViewsslError, match="no end pose 40 deg from its start in 100 draws"):
        SyntheticDataset("head_sequences", "train", scale="small", yaw_range=20, pitch_range=10, roll_range=10)
    ds = SyntheticDataset("head_sequences", "train", scale="small", yaw_range=30, pitch_range=20, roll_range=10,
                          head_turn_min=25)  # the loop has to retry often here
    R = angles_to_matrix(*torch.tensor([[r["azimuth"], r["elevation"], r["tilt"]] for r in ds.rows]).T)
    starts = [i for i, r in enumerate(ds.rows) if r["frame"] == 0]
    ends = starts[1:] + [len(ds.rows)]
    for a, b in zip(starts, ends):
        assert geodesic_distance(R[a], R[b - 1]) >= math.radians(25) - 1e-6


def test_sequences_of_unseen_categories_do_not_take_ood_test_meshes():
    with pytest.raises(ViewsslError, match="ood_train_instances"):
        BenchmarkConfig.preset("small", sequence_train_instances=2)


def test_head_poses_respect_ranges():
    ds = SyntheticDataset("heads", "test", scale="small", head_test=40, yaw_range=30, pitch_range=10, roll_range=5)
    a = torch.stack([torch.tensor([r["azimuth"], r["elevation"], r["tilt"]]) for r in ds.rows])
    assert (a.abs().max(0).values <= torch.tensor([30.0, 10.0, 5.0]).deg2rad() + 1e-9).all()
    assert a[:, 0].abs().max() > math.radians(20)


def test_streaming_equals_disk(tiny):
    for kind, split in (("objects", "ood_test"), ("heads", "train"), ("sequences", "train"), ("triplets", "train")):
        streamed, disk = SyntheticDataset.from_root(tiny, kind, split), LabeledFolder(tiny / kind / split)
        assert len(streamed) == len(disk)
        for i in (0, len(disk) - 1):
            a, b = streamed[i], disk[i]
            assert a.keys() == b.keys()
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["angles"], b["angles"]), (kind, i)
            assert all(a[k] == b[k] for k in ("index", "category", "instance", "sequence", "frame")), (kind, i)


def test_the_streamed_default_is_the_rendered_default():
    """SyntheticDataset(kind, split), render_benchmark(out) and `viewssl data render` default to one benchmark."""
    import inspect

    from common.data.cli import render

    defaults = {k: p.default for k, p in inspect.signature(render_benchmark).parameters.items()}
    cli = {p.name: p.default for p in render.params}
    assert (cli["scale"], cli["size"], cli["seed"]) == (defaults["scale"], defaults["size"], defaults["seed"])
    rendered = BenchmarkConfig.preset(defaults["scale"], size=defaults["size"], seed=defaults["seed"])
    assert SyntheticDataset("heads", "test").config == rendered
    assert BenchmarkConfig.preset("full", size=defaults["size"]) != rendered  # the scales differ: a real check


def test_dataloader_workers_render_after_fork(tiny):
    ds = SyntheticDataset.from_root(tiny, "objects", "val")
    expected = torch.stack([ds[i]["image"] for i in range(len(ds))])  # the parent has a context now
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context=ctx)
    got = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(got, expected)


def test_bad_input_is_a_viewssl_error(tiny, tmp_path):
    with pytest.raises(ViewsslError, match="unknown categories"):
        BenchmarkConfig.preset("small", categories=("car", "spaceship"))
    with pytest.raises(ViewsslError, match="scale"):
        BenchmarkConfig.preset("huge")
    # splits that would share meshes: one category in and out of domain; training sequences on object test meshes
    with pytest.raises(ViewsslError, match="categories and ood_categories share car"):
        BenchmarkConfig.preset("small", categories=("car", "chair"), ood_categories=("car",))
    with pytest.raises(ViewsslError, match=r"sequence_train_instances \(3\) must not exceed train_instances \(2\)"):
        BenchmarkConfig.preset("small", sequence_train_instances=3)
    with pytest.raises(ViewsslError, match="no split"):
        SyntheticDataset("heads", "val")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ViewsslError, match="not a folder"):
        render_benchmark(f, kinds=("heads",), progress=False, **TINY)
    with pytest.raises(ViewsslError, match="other settings"):
        render_benchmark(tiny, kinds=("heads",), seed=4, progress=False, **TINY)
    with pytest.raises(ViewsslError, match="meta.json"):
        summarize(tmp_path)


def test_model_code_imported_after_rendering_does_not_crash(tmp_path):
    """Loading triton (torchvision, torch._dynamo) after an EGL context exists segfaulted; the renderer preloads it."""
    import subprocess
    import sys

    code = (
        "from common.data.synthetic import render_benchmark\n"
        f"render_benchmark({str(tmp_path / 'b')!r}, kinds=('heads',), size=16, scale='small', progress=False,\n"
        "                 head_train=2, head_test=2, head_train_identities=1, head_test_identities=1)\n"
        "import torchvision, torch._dynamo\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_meta_from_another_version_is_a_logged_warning(tiny, tmp_path, caplog):
    import json
    import logging
    import shutil

    from common.data.synthetic.benchmark import load_config

    shutil.copy(tiny / "meta.json", tmp_path / "meta.json")
    with caplog.at_level(logging.WARNING, logger="viewssl.data.synthetic"):
        assert load_config(tmp_path) == load_config(tiny)
    assert caplog.text == ""
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["config"]["frames"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="viewssl.data.synthetic"):
        load_config(tmp_path)
    assert "another version of viewssl" in caplog.text and "no frames" in caplog.text


def test_render_refuses_a_folder_of_other_files(tmp_path):
    """Rendering replaces root/<kind>: a folder holding files but no meta.json (a user's own sequences/) is refused,
    and nothing in it is touched."""
    mine = tmp_path / "mine"
    (mine / "sequences").mkdir(parents=True)
    (mine / "sequences" / "keep.txt").write_text("mine")
    with pytest.raises(ViewsslError, match="holds files but no meta.json"):
        render_benchmark(mine, kinds=("sequences",), progress=False, **TINY)
    assert (mine / "sequences" / "keep.txt").read_text() == "mine"
    assert not (mine / ".lock").exists()  # refused before the lock would add its file


def test_a_second_render_into_a_folder_being_rendered_is_refused(tmp_path, monkeypatch):
    """Two renders into one folder would write over each other's kinds and meta.json: the second is refused while the
    first holds the folder; the lock's file left afterwards does not make the folder one of other files."""
    import common.data.synthetic.benchmark as bm

    root = tmp_path / "b"
    real = bm._render_kind

    def second_render_meanwhile(*args):
        with pytest.raises(ViewsslError, match="another benchmark render is writing to this folder"):
            render_benchmark(root, kinds=("triplets",), size=32, progress=False, **TINY)
        real(*args)

    monkeypatch.setattr(bm, "_render_kind", second_render_meanwhile)
    render_benchmark(root, kinds=("sequences",), size=32, progress=False, **TINY)
    monkeypatch.setattr(bm, "_render_kind", real)
    assert (root / "sequences" / "train" / "labels.csv").is_file() and not (root / "triplets").exists()
    lock_only = tmp_path / "lock_only"
    lock_only.mkdir()
    (lock_only / ".lock").touch()
    assert not bm.holds_other_files(lock_only)
    render_benchmark(lock_only, kinds=("sequences",), size=32, progress=False, **TINY)


def test_a_render_killed_before_its_meta_json_renders_again(tmp_path):
    """The first kind is written into root/.<kind>.partial before meta.json exists: a folder holding only that (a
    killed first render) is rendered into again, by render_benchmark and by the experiments' ensure_benchmark (both
    refused it as a folder of other files); a user's file beside it is still refused."""
    from common.data.synthetic import holds_other_files
    from experiments.traj_objects import ensure_benchmark

    killed = tmp_path / "killed"
    (killed / ".sequences.partial" / "train").mkdir(parents=True)
    assert not holds_other_files(killed)
    render_benchmark(killed, kinds=("sequences",), size=32, progress=False, **TINY)
    assert (killed / "sequences" / "train" / "labels.csv").is_file() and not (killed / ".sequences.partial").exists()
    before = (killed / "sequences" / "train" / "labels.csv").stat().st_mtime_ns
    ensure_benchmark(killed, True, 32, kinds=("sequences", "triplets"), needs=("sequences/train", "triplets/train"),
                     quick_bench=TINY)  # renders the kind that is missing only
    assert (killed / "triplets" / "train" / "labels.csv").is_file()
    assert (killed / "sequences" / "train" / "labels.csv").stat().st_mtime_ns == before

    again = tmp_path / "again"
    (again / ".sequences.partial" / "train").mkdir(parents=True)
    assert ensure_benchmark(again, True, 32, kinds=("sequences",), needs=("sequences/train",),
                            quick_bench=TINY) == again
    assert (again / "sequences" / "train" / "labels.csv").is_file()

    (again / ".sequences.partial").mkdir()
    (again / "notes.txt").write_text("mine")
    assert holds_other_files(again)


def test_a_second_render_keeps_the_kinds_it_finds_and_names_settings_an_older_version_lacks(tmp_path, monkeypatch):
    """Rendering kinds a benchmark already holds with the same settings keeps them (it deleted and rewrote them, under
    any reader); meta.json is written before the first kind, so a render killed at any point leaves a benchmark
    root; a setting an older version did not record is named as such (the message listed nothing)."""
    import json

    import common.data.synthetic.benchmark as bm

    root = tmp_path / "b"

    def killed(root_, kind, *args):
        assert (root_ / "meta.json").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "_render_kind", killed)
    with pytest.raises(KeyboardInterrupt):
        render_benchmark(root, kinds=("sequences",), progress=False, **TINY)
    monkeypatch.undo()
    render_benchmark(root, kinds=("sequences",), progress=False, **TINY)
    labels = root / "sequences" / "train" / "labels.csv"
    first = labels.stat().st_ino, labels.stat().st_mtime_ns
    render_benchmark(root, kinds=("sequences", "triplets"), progress=False, **TINY)
    assert (labels.stat().st_ino, labels.stat().st_mtime_ns) == first
    assert (root / "triplets" / "train" / "labels.csv").is_file()
    import shutil

    shutil.rmtree(root / "sequences" / "test")  # a kind missing a split it recorded is rendered again
    render_benchmark(root, kinds=("sequences",), progress=False, **TINY)
    assert (root / "sequences" / "test" / "labels.csv").is_file()
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(ViewsslError, match=r"another version of viewssl \(benchmark version 0, this one"):
        render_benchmark(root, kinds=("sequences",), progress=False, **TINY)
    (root / "meta.json").write_text(json.dumps(meta))

    meta = json.loads((root / "meta.json").read_text())
    del meta["config"]["frames"]
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ViewsslError, match=r"other settings \(frames \(not recorded: an older version\) differ\)"):
        render_benchmark(root, kinds=("heads",), progress=False, **TINY)
