"""Accumulators, the metric registry and run_metrics on a tiny fake benchmark with an oracle model.

The fake benchmark is written here (no renderer): 8x8 PNGs whose first pixel encodes (dataset id, row), and
``labels.csv`` files with the columns the metrics read. :class:`OracleModel` decodes the pixel and answers from the
labels: angles (optionally through a per-axis affine "miscalibration") and features built from the ground truth.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.labels import read_labels, write_labels
from common.errors import ViewsslError
from common.eval import (
    METRICS,
    AccuracyAccumulator,
    GeodesicAccumulator,
    IoUAccumulator,
    MeanAccumulator,
    ViewpointAccumulator,
    evaluate_viewpoints,
    run_metrics,
    viewpoint_errors,
)
from common.eval.boxes import box_corners, project_points
from common.geometry import angles_to_matrix, fibonacci_sphere, look_at_rotation, matrix_to_angles
from common.io import write_image

SIZE = 8
SEQ_COLUMNS = ["fx", "fy", "cx", "cy", "box_cx", "box_cy", "box_cz", "box_sx", "box_sy", "box_sz", "plane_nx",
               "plane_ny", "plane_nz", "plane_d", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]


# ============================================================================ fake data
def _code_image(dataset_id: int, row: int) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    img[0, 0] = img[0, -1] = (dataset_id, row // 256, row % 256)  # both top corners: a mirrored image reads the same
    return img


def write_split(folder: Path, rows: list[dict], dataset_id: int, extra=()) -> None:
    for i, row in enumerate(rows):
        rel = f"images/{i:05d}.png"
        write_image(folder / rel, _code_image(dataset_id, i))
        row["path"] = rel
    write_labels(folder / "labels.csv", rows, extra_columns=extra)


def _fib_angles(n: int) -> torch.Tensor:
    rot = look_at_rotation(fibonacci_sphere(n))
    return torch.stack(matrix_to_angles(rot), dim=-1)


def _object_rows(categories, instances, n_views, inst_offset=0):
    ang = _fib_angles(n_views)
    rows = []
    for c in categories:
        for i in range(instances):
            for v in range(n_views):
                a = ang[v]
                rows.append({"azimuth": float(a[0]), "elevation": float(a[1]), "tilt": float(a[2]), "category": c,
                             "instance": str(inst_offset + i), "view": str(v)})
    return rows


def _sequence_rows(seed: int, n_seq: int, n_frames: int, seq_prefix: str):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_seq):
        size = rng.uniform(0.4, 1.2, 3)
        base = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.6, -0.2), rng.uniform(-6, -4)])
        for f in range(n_frames):
            az, el = rng.uniform(-1.5, 1.5), rng.uniform(0.1, 0.5)
            rot = angles_to_matrix(torch.tensor(az, dtype=torch.float64), torch.tensor(el, dtype=torch.float64),
                                   torch.tensor(0.0, dtype=torch.float64)).numpy()
            centre = base + rng.normal(0, 0.05, 3)
            n = rot[:, 1]
            d = -(n @ centre) + size[1] / 2
            intr = (50.0, 50.0, 32.0, 32.0)
            uv = project_points(box_corners(centre, size, rot), *intr)
            rows.append({
                "azimuth": az, "elevation": el, "tilt": 0.0, "category": "box", "instance": f"{seq_prefix}{s}",
                "sequence": f"{seq_prefix}{s}", "frame": str(f), "fx": intr[0], "fy": intr[1], "cx": intr[2],
                "cy": intr[3], "box_cx": centre[0], "box_cy": centre[1], "box_cz": centre[2], "box_sx": size[0],
                "box_sy": size[1], "box_sz": size[2], "plane_nx": n[0], "plane_ny": n[1], "plane_nz": n[2],
                "plane_d": d, "bbox_x0": uv[:, 0].min(), "bbox_y0": uv[:, 1].min(), "bbox_x1": uv[:, 0].max(),
                "bbox_y1": uv[:, 1].max(),
            })
    return rows


def make_benchmark(root: Path, unseen_gallery: bool = False) -> Path:
    """objects/{train,test,test_unseen_pose,ood_train,ood_test}, heads/test, sequences/{train,test}
    (+ objects/train_unseen_pose with ``unseen_gallery``)."""
    splits = {
        "objects/train": (_object_rows(["car", "chair"], 3, 6), ("view",)),
        "objects/test": (_object_rows(["car", "chair"], 2, 6, inst_offset=10), ("view",)),
        "objects/test_unseen_pose": (_object_rows(["car", "chair"], 1, 9, inst_offset=20), ("view",)),
        "objects/ood_train": (_object_rows(["mug"], 3, 6, inst_offset=30), ("view",)),
        "objects/ood_test": (_object_rows(["mug"], 2, 6, inst_offset=40), ("view",)),
        # heads turn within +-72 deg (objects are seen from all around)
        "heads/test": ([{**r, "category": "", "instance": "", "azimuth": 0.4 * r["azimuth"]}
                        for r in _object_rows(["h"], 1, 12)], ()),
    }
    if unseen_gallery:
        splits["objects/train_unseen_pose"] = (_object_rows(["car", "chair"], 3, 9), ("view",))
    train_seq = _sequence_rows(0, 3, 5, "tr")
    # The test sequences re-use the train geometry (other sequence ids): the 1-NN is the identical frame.
    test_seq = [{**r, "sequence": "te" + r["sequence"][2:], "instance": "te" + r["instance"][2:]} for r in train_seq]
    splits["sequences/train"] = (train_seq, SEQ_COLUMNS)
    splits["sequences/test"] = (test_seq, SEQ_COLUMNS)
    manifest = {}
    for i, (name, (rows, extra)) in enumerate(sorted(splits.items()), start=1):
        write_split(root / name, rows, i, extra)
        manifest[str(i)] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_folder(root: Path, n: int = 30, seed: int = 0) -> Path:
    """A single labels.csv folder with category / instance / view / sequence columns."""
    rows = _object_rows(["a", "b"], 3, 5)[:n]
    for i, r in enumerate(rows):
        r["sequence"] = f"{r['category']}{r['instance']}"
        r["frame"] = r["view"]
    write_split(root, rows, 1, ("view",))
    (root / "manifest.json").write_text(json.dumps({"1": "."}))
    return root


# ============================================================================ oracle model
class OracleModel:
    """Reads the labels back through the pixel code. ``taps``: "pooled" = category one-hot + rotation (+ box for
    sequences), "noise" = per-row random features. ``slope``/``offset``: predicted angle = (true - offset) / slope
    (``wrap``: then wrapped to (-pi, pi], as an angle head predicts)."""

    family = "oracle"
    input_size = SIZE

    def __init__(self, root: Path, slope=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0), angles=True, wrap=False):
        manifest = json.loads((Path(root) / "manifest.json").read_text())
        self.tables = {int(k): read_labels(Path(root) / v) for k, v in manifest.items()}
        cats = sorted({c for t in self.tables.values() for c in t.raw.get("category", [])})
        self.cat_index = {c: i for i, c in enumerate(cats)}
        self.slope, self.offset = torch.tensor(slope, dtype=torch.float64), torch.tensor(offset, dtype=torch.float64)
        self.has_angles, self.wrap = angles, wrap
        self.taps = ["pooled", "noise"]
        self.calls = 0

    def _rows(self, images):
        code = (images[:, :, 0, 0] * 255).round().long()
        return [(int(c[0]), int(c[1]) * 256 + int(c[2])) for c in code]

    def predict_angles(self, images):
        if not self.has_angles:
            return None
        rows = self._rows(images)
        true = torch.stack([self.tables[d].angles[i] for d, i in rows])
        pred = (true - self.offset) / self.slope
        return torch.atan2(pred.sin(), pred.cos()) if self.wrap else pred

    def features(self, images, taps):
        self.calls += 1
        out = {}
        rows = self._rows(images)
        if "pooled" in taps:
            feats = []
            for d, i in rows:
                t = self.tables[d]
                onehot = torch.zeros(len(self.cat_index), dtype=torch.float64)
                if "category" in t.raw and t.raw["category"][i]:
                    onehot[self.cat_index[t.raw["category"][i]]] = 3.0
                rot = angles_to_matrix(*t.angles[i].unbind(-1)).reshape(9)
                extra = torch.zeros(6, dtype=torch.float64)
                if "box_cx" in t.raw:
                    extra = torch.tensor([float(t.raw[c][i]) for c in ("box_cx", "box_cy", "box_cz", "box_sx",
                                                                       "box_sy", "box_sz")], dtype=torch.float64)
                feats.append(torch.cat([onehot, rot, extra]))
            out["pooled"] = torch.stack(feats).float()
        if "noise" in taps:
            out["noise"] = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(d * 100003 + i))
                                        for d, i in rows])
        return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_benchmark(tmp_path_factory.mktemp("bench"))


# ============================================================================ accumulators
def test_accumulators_batched_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(103, generator=g, dtype=torch.float64) * 90
    pred, target = torch.randint(0, 4, (103,), generator=g), torch.randint(0, 4, (103,), generator=g)
    one = [MeanAccumulator(), AccuracyAccumulator(), GeodesicAccumulator(), IoUAccumulator()]
    batched = [MeanAccumulator(), AccuracyAccumulator(), GeodesicAccumulator(), IoUAccumulator()]
    one[0].update(values), one[1].update(pred, target), one[2].update(values), one[3].update(values / 90)
    for s in range(0, 103, 10):
        batched[0].update(values[s : s + 10])
        batched[1].update(pred[s : s + 10], target[s : s + 10])
        batched[2].update(values[s : s + 10])
        batched[3].update(values[s : s + 10] / 90)
    assert batched[0].compute() == one[0].compute() == math.fsum(values.tolist()) / 103
    assert batched[1].compute() == one[1].compute() == float((pred == target).double().mean())
    assert batched[2].compute() == one[2].compute()
    assert batched[3].compute() == one[3].compute()
    # both summaries against numpy, with values exactly on their thresholds (30 deg / IoU 0.5: neither counts)
    values[:3] = torch.tensor([30.0, 45.0, 0.0], dtype=torch.float64)
    for acc in (one[2], one[3]):
        acc.reset()
    one[2].update(values), one[3].update(values / 90)
    v, iou = values.numpy(), values.numpy() / 90
    assert one[2].compute() == pytest.approx({"median_geodesic": np.median(v), "mean_geodesic": np.mean(v),
                                             "acc_30": np.mean(v < 30)}, rel=1e-12)
    assert one[3].compute() == pytest.approx({"mean_iou": np.mean(iou), "median_iou": np.median(iou),
                                             "ap_50": np.mean(iou > 0.5)}, rel=1e-12)
    acc = AccuracyAccumulator()
    acc.update(pred[:4, None], pred[:4])  # (N, 1) against (N,): flattened, not broadcast to N x N
    assert (acc.correct, acc.count) == (4, 4)
    with pytest.raises(ValueError, match="3 predictions for 4 targets"):
        acc.update(pred[:3], pred[:4])

    true = torch.rand(57, 3, generator=g, dtype=torch.float64) * 2 - 1
    p = true * 0.8 + 0.1
    va = ViewpointAccumulator(calibration=0.2, seed=1)
    for s in range(0, 57, 8):
        va.update(p[s : s + 8], true[s : s + 8])
    assert va.compute() == evaluate_viewpoints(p, true, 0.2, 1)
    assert va.compute(calibrated=False) == viewpoint_errors(p, true)
    va.reset()
    assert va.pred == []


# ============================================================================ run_metrics on the fake benchmark
def test_run_metrics_on_fake_benchmark(bench):
    model = OracleModel(bench, slope=(-0.5, 2.0, 1.0), offset=(0.2, 0.0, -0.1))
    before = torch.get_rng_state()
    res = run_metrics(model, bench, probe_steps=150, batch_size=16)
    assert torch.equal(before, torch.get_rng_state())  # training runs are not perturbed
    assert set(res.skipped) == set(), res.skipped
    # Viewpoint: raw is off (the model's own frame), calibrated recovers it exactly.
    assert res["viewpoint/heads/raw/mae"] > 5
    assert res["viewpoint/heads/calibrated/mae"] == pytest.approx(0.0, abs=1e-3)
    assert res["viewpoint/objects/calibrated/n_scored"] + res["viewpoint/objects/calibrated/n_calibration"] == 24
    assert res.protocol["viewpoint"]["heads"]["calibrated"]["protocol"] == "calibrated"
    assert [res.protocol["viewpoint"][k]["calibrated"]["fit_azimuth"] for k in ("heads", "objects")] == [
        "linear", "circular"]  # heads within +-80 deg; objects from all around
    # kNN pose from rotation features: perfect in domain and OOD; unseen poses: geodesic only.
    assert res["knn_pose/in_domain/acc"] == 1.0 and res["knn_pose/ood/acc"] == 1.0
    assert res["knn_pose/in_domain/median_geodesic"] == pytest.approx(0.0, abs=1e-3)
    assert "knn_pose/unseen_pose/acc" not in res and 0 < res["knn_pose/unseen_pose/median_geodesic"] < 60
    # Category figures.
    assert res["knn_class/top1"] == 1.0 and res["knn_class/top1_1nn"] == 1.0
    assert res["linear_probe/top1"] == 1.0
    assert res["retrieval/r@1"] == 1.0
    # Relative pose probe runs on the three settings.
    # (features hold the rotation: the probe gets seen poses within a degree; random pairs would be ~120 deg off)
    assert res["relative_pose/in_domain/median_geodesic"] < 1
    assert res["relative_pose/unseen_category/median_geodesic"] < 1
    assert res["relative_pose/unseen_pose/median_geodesic"] < 60
    # Box fitting: the test frames have identical twins in train -> exact boxes; the random baseline is worse.
    assert res["box_fit/mean_iou"] == pytest.approx(1.0, abs=1e-6) and res["box_fit/ap_50"] == 1.0
    assert res["box_fit/random_neighbor/mean_iou"] < 0.9
    # Re-ID within sequences/test.
    assert res["reid/top1"] > 0.8 and res["reid/map"] > 0.5
    # Every figure is a float; JSON-able with protocols.
    assert all(isinstance(v, float) for v in res.values())
    json.dumps(res.to_json())
    assert res.context["taps"] == ["pooled"] and res.context["layout"] == "benchmark"


def test_category_and_box_figures_on_random_features_match_an_independent_computation(bench):
    """On the oracle's random features ("noise" tap) neighbours are not twins, so k, the vote and which frame's box is
    fitted into which all show: kNN top-1 (k=20, exp(cos/T) votes) and 1-NN against numpy / scikit-learn, box fitting
    against fitting the cosine nearest neighbour's box into each query by hand."""
    from sklearn.neighbors import KNeighborsClassifier

    from common.eval.boxes import box_frames_from_table, box_iou_3d, fit_box

    ids = {name: int(i) for i, name in json.loads((bench / "manifest.json").read_text()).items()}

    def feats(split):  # what OracleModel's "noise" tap gives the rows of ``split``
        n = len(read_labels(bench / split))
        return np.stack([torch.randn(16, generator=torch.Generator().manual_seed(ids[split] * 100003 + i)).numpy()
                         for i in range(n)])

    def cos(a, b):
        a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
        return b @ a.T  # (queries, gallery)

    res = run_metrics(OracleModel(bench), bench, ["knn_class", "box_fit"], taps=["noise"], batch_size=16)
    f_tr, f_q = feats("objects/train"), feats("objects/test")
    y_tr = np.array(read_labels(bench / "objects/train").raw["category"])
    y_q = np.array(read_labels(bench / "objects/test").raw["category"])
    sim = cos(f_tr, f_q)
    top = np.argsort(-sim, axis=1)[:, :20]
    votes = [{c: np.exp(sim[q, top[q]][y_tr[top[q]] == c] / 0.07).sum() for c in ("car", "chair")}
             for q in range(len(y_q))]
    weighted = np.array([max(v, key=v.get) for v in votes])
    one_nn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(f_tr, y_tr).predict(f_q)
    assert np.mean(weighted == y_q) != np.mean(one_nn == y_q)  # the two figures tell k apart on these features
    assert res["knn_class/top1"] == pytest.approx(np.mean(weighted == y_q), abs=1e-12)
    assert res["knn_class/top1_1nn"] == pytest.approx(np.mean(one_nn == y_q), abs=1e-12)

    gallery = box_frames_from_table(read_labels(bench / "sequences/train"))
    queries = box_frames_from_table(read_labels(bench / "sequences/test"))
    nearest = cos(feats("sequences/train"), feats("sequences/test")).argmax(axis=1)
    ious = [box_iou_3d(*fit_box(gallery[n], q), q.center, q.size, q.rotation) for n, q in zip(nearest, queries)]
    assert not np.allclose(ious, 1.0)  # random neighbours: not the twins
    assert res["box_fit/mean_iou"] == pytest.approx(np.mean(ious), rel=1e-6)
    assert res["box_fit/median_iou"] == pytest.approx(np.median(ious), rel=1e-6)
    # --box-queries: a subset of the query frames drawn with --seed (SiamPose scores 1,000 of them)
    sub = run_metrics(OracleModel(bench), bench, ["box_fit"], taps=["noise"], batch_size=16, box_queries=5, seed=7)
    chosen = np.sort(np.random.default_rng(7).choice(len(queries), size=5, replace=False))
    assert sub["box_fit/n_queries"] == 5 and len(queries) > 5
    assert sub["box_fit/mean_iou"] == pytest.approx(np.mean(np.asarray(ious)[chosen]), rel=1e-6)


def test_objects_all_around_are_calibrated_on_the_circle(bench):
    """A model of the objects' azimuth exact but for its own zero and direction, predicting wrapped angles: a straight
    line through wrapped angles cannot undo that, the circular fit does."""
    model = OracleModel(bench, slope=(-1.0, 1.0, 1.0), offset=(2.0, 0.0, 0.0), wrap=True)
    res = run_metrics(model, bench, ["viewpoint"], batch_size=16)
    assert res["viewpoint/objects/raw/azimuth_mae"] > 30
    assert res["viewpoint/objects/calibrated/azimuth_mae"] == pytest.approx(0.0, abs=1e-4)


def test_knn_pose_unseen_pose_gallery(tmp_path):
    root = make_benchmark(tmp_path / "b", unseen_gallery=True)
    res = run_metrics(OracleModel(root), root, ["knn_pose"])
    assert res["knn_pose/unseen_pose/acc"] == 1.0
    assert res.protocol["knn_pose"]["unseen_pose"]["gallery"] == "objects/train_unseen_pose"


def test_features_computed_once_per_split(bench):
    model = OracleModel(bench)
    run_metrics(model, bench, ["knn_class", "retrieval", "linear_probe"], batch_size=100)
    # objects/train (36 rows) and objects/test (24 rows): one batch each, shared by the three metrics.
    assert model.calls == 2


def test_a_reused_context_computes_what_a_later_call_needs_and_refuses_other_settings(bench):
    """A context cached each split with what its first call needed: a later call needing angles (or a tap) it had not
    computed got "the model does not predict angles"; settings passed beside ``context=`` were silently ignored."""
    from common.eval.context import DataSource, EvalContext

    model = OracleModel(bench)
    ctx = EvalContext(source=DataSource.detect(bench), device=torch.device("cpu"))
    assert "knn_class/top1" in run_metrics(model, metrics=["knn_class"], context=ctx)
    res = run_metrics(model, metrics=["viewpoint"], context=ctx)
    assert not res.skipped and dict(res) == dict(run_metrics(OracleModel(bench), bench, ["viewpoint"]))
    both = run_metrics(model, metrics=["knn_class", "viewpoint"], context=ctx)
    calls = model.calls
    assert dict(run_metrics(model, metrics=["knn_class", "viewpoint"], context=ctx)) == dict(both)
    assert model.calls == calls and not both.skipped  # cached: every split holds what both need
    with pytest.raises(TypeError, match=r"seed, knn_k cannot be set with context="):
        run_metrics(model, metrics=["knn_class"], context=ctx, seed=7, knn_k=1)
    run_metrics(model, metrics=["knn_class"], context=ctx, seed=0, split="test")  # the context's own values


def test_non_finite_features_skip_the_feature_metrics_only(bench):
    model = OracleModel(bench)
    features = model.features
    model.features = lambda images, taps: {t: f * float("nan") for t, f in features(images, taps).items()}
    res = run_metrics(model, bench, ["viewpoint", "knn_class", "linear_probe"])
    assert res.skipped["knn_class"] == "the features of tap 'pooled' on objects/train hold NaN or inf"
    assert "NaN or inf" in res.skipped["linear_probe"] and res["viewpoint/objects/raw/mae"] == pytest.approx(0.0)


def test_linear_probe_without_any_category_is_skipped(bench, tmp_path):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(bench, root)
    labels = root / "objects" / "test" / "labels.csv"
    lines = labels.read_text().splitlines()
    col = lines[0].split(",").index("category")
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:
        r[col] = ""
    labels.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    res = run_metrics(OracleModel(root), root, ["linear_probe"])
    assert res.skipped["linear_probe"] == "no row of objects/test has a category"
    from common.eval.probes import linear_probe

    x = torch.randn(6, 3)
    assert math.isnan(linear_probe(x, torch.tensor([0, 1, 0, 1, 0, 1]), x[:0], torch.zeros(0))["top1"])


def test_skips_and_unknown_metric(bench):
    model = OracleModel(bench, angles=False)
    res = run_metrics(model, bench, ["viewpoint", "knn_class"])
    assert "predict_angles" in res.skipped["viewpoint"]
    assert "knn_class/top1" in res
    with pytest.raises(ViewsslError, match=r"unknown metric\(s\) nope \(known: viewpoint, knn_pose"):
        run_metrics(model, bench, ["knn_class", "nope"])
    model.taps = []
    res = run_metrics(model, bench, ["knn_class"])
    assert res.skipped["knn_class"] == "the model offers no feature taps"


def test_multiple_taps_and_compression(bench):
    model = OracleModel(bench)
    res = run_metrics(model, bench, ["knn_class"], taps=["pooled", "noise"])
    assert res["knn_class/pooled/top1"] == 1.0
    assert res["knn_class/noise/top1"] < 1.0
    res = run_metrics(model, bench, ["knn_pose"], compress="pca:9")
    assert res["knn_pose/in_domain/acc"] == 1.0  # the 9-d rotation part survives PCA to 9 dims
    assert res.context["compress"] == "pca:9"
    with pytest.raises(ViewsslError, match="--tap layer9"):
        run_metrics(model, bench, ["knn_class"], taps=["layer9"])


def test_limit_subsets_are_seeded(bench):
    """--limit draws its rows with --seed: one seed, one subset; another seed, other rows (an oracle with a wrong
    slope and offset, so that every row has its own error and the subset shows in the MAE)."""
    model = OracleModel(bench, slope=(-0.5, 2.0, 1.0), offset=(0.2, 0.0, 0.0))
    a = run_metrics(model, bench, ["viewpoint"], limit=10, seed=3)
    b = run_metrics(model, bench, ["viewpoint"], limit=10, seed=3)
    c = run_metrics(model, bench, ["viewpoint"], limit=10, seed=4)
    full = run_metrics(model, bench, ["viewpoint"])
    assert a == b and a["viewpoint/objects/raw/n"] == 10 and full["viewpoint/objects/raw/n"] > 10
    assert a["viewpoint/objects/raw/mae"] != c["viewpoint/objects/raw/mae"]
    assert a["viewpoint/objects/raw/mae"] != full["viewpoint/objects/raw/mae"]


def test_category_knn_scores_only_queries_with_a_neighbour(tmp_path):
    """One instance in the folder: leave-one-out with same-instance neighbours excluded leaves no query a neighbour,
    so knn_class is skipped with its reason, not reported as 0 % (knn_pose says the same)."""
    folder = make_folder(tmp_path / "one", n=5)  # instance a/0, views 0-4
    res = run_metrics(OracleModel(folder), folder, ["knn_class", "knn_pose"])
    assert not any(k.startswith(("knn_class/", "knn_pose/")) for k in res), dict(res)
    assert "admissible" in res.skipped["knn_class"] and "admissible" in res.skipped["knn_pose"]
    res = run_metrics(OracleModel(folder), folder, ["knn_class"], exclude_same_instance=False)
    assert res["knn_class/top1_1nn"] == 1.0 and res.protocol["knn_class"]["queries_without_neighbour"] == 0


def test_iou_summary_of_an_unknown_box_is_unknown():
    acc = IoUAccumulator()
    acc.update(torch.tensor([0.7, math.nan, 0.2]))
    assert all(math.isnan(v) for v in acc.compute().values())  # ap_50 too: NaN is neither a hit nor a miss


def test_single_folder(tmp_path):
    folder = make_folder(tmp_path / "mine")
    model = OracleModel(folder)
    res = run_metrics(model, folder)
    assert res.context["layout"] == "folder"
    assert res["viewpoint/raw/mae"] == pytest.approx(0.0, abs=1e-4)
    assert res["viewpoint/calibrated/n_calibration"] == 3
    # Leave-one-out, same-instance neighbours excluded: other instances of the category, same view.
    assert res["knn_pose/acc"] == 1.0
    assert res["knn_class/top1"] == 1.0 and res["retrieval/r@1"] == 1.0
    assert "reid/map" in res
    for name in ("linear_probe", "relative_pose", "box_fit"):
        assert name in res.skipped
    # labels.csv given directly works too.
    res2 = run_metrics(model, folder / "labels.csv", ["viewpoint"])
    assert res2["viewpoint/raw/mae"] == res["viewpoint/raw/mae"]


def test_knn_pose_accuracy_over_frames_and_over_categories(tmp_path):
    """acc counts frames, acc_macro averages the categories' accuracies: on 15 frames of one category and 10 of the
    other, with random features (the "noise" tap), the two differ; each category is knn_pose on its own rows,
    leave-one-out with the frames of the query's instance excluded."""
    from common.eval import knn_pose

    folder = make_folder(tmp_path / "mine", n=25)
    res = run_metrics(OracleModel(folder), folder, ["knn_pose"], taps=["noise"])
    table = read_labels(folder)
    cats, inst = np.array(table.raw["category"]), np.array(table.raw["instance"])
    views = torch.tensor([int(v) for v in table.raw["view"]])
    rot = angles_to_matrix(*table.angles.double().unbind(-1))
    f = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(100003 + i)) for i in range(25)])
    per_cat = {}
    for c in ("a", "b"):
        i = torch.from_numpy(np.nonzero(cats == c)[0])
        groups = torch.from_numpy(np.unique(inst[i.numpy()], return_inverse=True)[1])
        _, correct, _ = knn_pose(f[i], views[i], rot[i], f[i], rot[i], views[i], train_groups=groups,
                                 query_groups=groups)
        per_cat[c] = correct
    assert [len(v) for v in per_cat.values()] == [15, 10]
    acc = float(torch.cat(list(per_cat.values())).double().mean())
    macro = float(np.mean([v.double().mean() for v in per_cat.values()]))
    assert acc != pytest.approx(macro)
    assert res["knn_pose/acc"] == pytest.approx(acc) and res["knn_pose/acc_macro"] == pytest.approx(macro)


def test_leave_one_out_rows_without_instance_exclude_themselves():
    from types import SimpleNamespace

    from common.eval.knn import knn_search
    from common.eval.metrics import _groups

    instances = ["a", "a", "b", "b", "", ""]
    rows = SimpleNamespace(strings=lambda key: instances if key == "instance" else None, indices=range(6))
    ctx = SimpleNamespace(exclude_same_instance=True, device=torch.device("cpu"))
    train_groups, query_groups = _groups(ctx, rows, rows, same_set=True)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    nearest = knn_search(x, x, 1, train_groups=train_groups, query_groups=query_groups).indices[:, 0].tolist()
    assert nearest[0] in (2, 3, 4, 5) and nearest[2] in (0, 1, 4, 5)  # not the same instance
    assert nearest[4] != 4 and nearest[5] != 5  # no instance: only itself excluded (it used to be kept)


def test_mps_model_metrics_on_the_cpu(tmp_path):
    # MPS has no float64: the model runs there, its features come to the CPU for the metrics (no MPS needed here:
    # only the devices are checked)
    from common.eval.context import DataSource, EvalContext

    source = DataSource.detect(make_folder(tmp_path / "mine", n=12))
    ctx = EvalContext(source=source, device=torch.device("mps"))
    assert ctx.device == torch.device("cpu") and ctx.model_device == torch.device("mps")
    assert ctx.describe()["device"] == "cpu" and ctx.describe()["model_device"] == "mps"
    ctx = EvalContext(source=source, device="cpu")
    assert ctx.model_device == ctx.device == torch.device("cpu") and "model_device" not in ctx.describe()


def test_leave_one_out_without_other_instances_is_skipped(tmp_path):
    folder = tmp_path / "one"
    write_split(folder, _object_rows(["a", "b"], 1, 5), 1, ("view",))
    (folder / "manifest.json").write_text(json.dumps({"1": "."}))
    res = run_metrics(OracleModel(folder), folder, ["knn_pose", "knn_class", "retrieval"])
    assert "no query has an admissible neighbour" in res.skipped["knn_pose"]
    assert res["knn_class/top1"] == 0.0  # the only other items belong to the other category
    assert res["retrieval/r@1"] == 0.0  # (a query finding itself or its own instance would score 1)


def test_bad_data_root(tmp_path):
    with pytest.raises(ViewsslError, match="no such data folder"):
        run_metrics(OracleModel.__new__(OracleModel), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ViewsslError, match="not a dataset"):
        run_metrics(OracleModel.__new__(OracleModel), tmp_path / "empty")


def test_registry_names():
    assert list(METRICS)[:8] == ["viewpoint", "knn_pose", "relative_pose", "linear_probe", "knn_class",
                                 "retrieval", "reid", "box_fit"]
    assert all(callable(f) and f.__doc__ for f in METRICS.values())


# ============================================================================ test-time flip
class _SidedModel:
    """Predicts ``left`` for images brighter on the left, ``right`` otherwise (one row per image)."""

    family, input_size, taps = "sided", 8, ["pooled"]

    def __init__(self, left, right):
        self.left, self.right = torch.tensor(left, dtype=torch.float64), torch.tensor(right, dtype=torch.float64)

    def predict_angles(self, images):
        brighter_left = images[..., :4].mean(dim=(1, 2, 3)) > images[..., 4:].mean(dim=(1, 2, 3))
        return torch.where(brighter_left[:, None], self.left, self.right)

    def features(self, images, taps):
        return {"pooled": images.flatten(1)}


def test_flip_averaged_is_the_geodesic_midpoint_against_scipy():
    from scipy.spatial.transform import Rotation

    from common.eval import FlipAveraged
    from common.geometry import flip_angles

    images = torch.zeros(2, 3, 8, 8)
    images[..., :4] = 1.0  # brighter on the left: the model says `left`; mirrored, it says `right`
    left, right = [[0.3, 0.2, 0.1], [1.2, -0.4, 0.3]], [[-0.5, 0.25, 0.05], [-0.9, -0.3, -0.2]]
    model = FlipAveraged(_SidedModel(left, right))
    got = model.predict_angles(images)
    for i in range(2):
        mirrored = flip_angles(torch.tensor(right[i])).tolist()
        want = Rotation.from_euler("YXZ", [left[i], mirrored]).mean()
        assert Rotation.from_euler("YXZ", got[i].tolist()).approx_equal(want, atol=1e-6), i
    # a model that already predicts the mirrored view exactly is unchanged
    exact = FlipAveraged(_SidedModel(left, flip_angles(torch.tensor(left)).tolist()))
    torch.testing.assert_close(exact.predict_angles(images), torch.tensor(left, dtype=torch.float64))
    # features and attributes are the wrapped model's; no angles stay no angles
    assert model.taps == ["pooled"] and model.input_size == 8 and model.family == "sided"
    assert torch.equal(model.features(images, ["pooled"])["pooled"], images.flatten(1))
    model.model.predict_angles = lambda images: None
    assert model.predict_angles(images) is None


def _video_split(folder: Path, dataset_id: int, prefix: str, n_frames: int) -> None:
    """Three categories x two sequences (videos) of ``n_frames`` frames; every sequence its own instance."""
    rows = [{"azimuth": 0.0, "elevation": 0.0, "tilt": 0.0, "category": c, "instance": f"{prefix}{c}{s}",
             "sequence": f"{prefix}{c}{s}", "frame": str(f)}
            for c in ("run", "jump", "swim") for s in range(2) for f in range(n_frames)]
    write_split(folder, rows, dataset_id)


def test_retrieval_per_sequence_against_an_independent_computation(tmp_path):
    """``retrieval_unit="sequence"``: one feature per video (the mean of its unit-norm frame features, renormalised),
    R@1/5/10/20/50 over videos; checked against numpy on the oracle's per-frame random features."""
    _video_split(tmp_path / "train", 1, "tr", 4)
    _video_split(tmp_path / "test", 2, "te", 3)
    (tmp_path / "manifest.json").write_text(json.dumps({"1": "train", "2": "test"}))
    model = OracleModel(tmp_path)
    res = run_metrics(model, tmp_path, ["retrieval"], taps=["noise"], retrieval_unit="sequence")

    def videos(dataset_id, n_frames):
        x = np.stack([torch.randn(16, generator=torch.Generator().manual_seed(dataset_id * 100003 + i)).numpy()
                      for i in range(6 * n_frames)]).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        v = x.reshape(6, n_frames, 16).mean(1)
        return v / np.linalg.norm(v, axis=1, keepdims=True), np.repeat(np.arange(3), 2)

    (xt, yt), (xq, yq) = videos(1, 4), videos(2, 3)
    order = np.argsort(-(xq @ xt.T), axis=1)
    for k in (1, 5, 10, 20, 50):
        expected = np.mean([(yt[order[i, :k]] == yq[i]).any() for i in range(6)])
        assert res[f"retrieval/r@{k}"] == pytest.approx(expected)
    assert res["retrieval/r@1"] < 1.0  # random features: not every video finds its class first
    assert res.protocol["retrieval"]["query_sequences"] == 6 and res.protocol["retrieval"]["gallery_sequences"] == 6
    assert "r@50" not in {k.split("/")[-1] for k in run_metrics(model, tmp_path, ["retrieval"], taps=["noise"])}


def test_retrieval_per_sequence_leave_one_out_and_bad_labels(tmp_path):
    folder = make_folder(tmp_path / "mine")  # 2 categories x 3 instances, one sequence per instance
    res = run_metrics(OracleModel(folder), folder, ["retrieval"], retrieval_unit="sequence")
    # the oracle's pooled features hold the category: every video finds another video of its category, not itself
    assert res["retrieval/r@1"] == 1.0 and res.protocol["retrieval"]["query_sequences"] == 6
    alone = tmp_path / "alone"  # one video per category: only the query itself would match, and it is left out
    rows = [{"azimuth": 0.0, "elevation": 0.0, "tilt": 0.0, "category": c, "sequence": c, "frame": str(f)}
            for c in ("a", "b", "c") for f in range(2)]
    write_split(alone, rows, 1)
    (alone / "manifest.json").write_text(json.dumps({"1": "."}))
    assert run_metrics(OracleModel(alone), alone, ["retrieval"], retrieval_unit="sequence")["retrieval/r@50"] == 0.0
    table = (folder / "labels.csv").read_text().splitlines()
    header = table[0].split(",")
    row = table[1].split(",")
    row[header.index("category")] = "b"  # a frame of sequence a0 now says category b
    (folder / "labels.csv").write_text("\n".join([table[0], ",".join(row), *table[2:]]) + "\n")
    with pytest.raises(ViewsslError, match=r"labels\.csv.*sequence 'a0' has frames of more than one category"):
        run_metrics(OracleModel(folder), folder, ["retrieval"], retrieval_unit="sequence")
    with pytest.raises(ViewsslError, match="retrieval unit"):
        run_metrics(OracleModel(folder), folder, ["retrieval"], retrieval_unit="video")


def test_splits_without_viewpoints_skip_the_angle_metrics(bench, tmp_path):
    """Blank angle cells (a dataset without viewpoints): the metrics that need angles leave those splits out or skip,
    naming viewpoints; the others give the figures they give with the angles (the oracle keeps its own copy)."""
    import shutil

    root = tmp_path / "bench"
    shutil.copytree(bench, root)
    model = OracleModel(root)  # read before the angles are blanked: its features still hold the rotation
    blanked = [p for p in root.glob("*/*/labels.csv") if p.parent.parent.name in ("objects", "sequences")]
    for path in blanked:
        lines = path.read_text().splitlines()
        rows = [line.split(",") for line in lines[1:]]
        path.write_text("\n".join([lines[0], *(",".join([r[0], "", "", "", *r[4:]]) for r in rows)]) + "\n")
    assert len(blanked) == 7 and not read_labels(blanked[0].parent).has_angles
    names = ["viewpoint", "relative_pose", "viewpoint_readout", "box_fit", "knn_class", "knn_pose", "retrieval", "reid"]
    res = run_metrics(model, root, names, probe_steps=20)
    assert res["viewpoint/heads/raw/mae"] == pytest.approx(0.0, abs=1e-6)
    assert not any(k.startswith("viewpoint/objects") for k in res)
    for name in ("relative_pose", "viewpoint_readout", "box_fit", "knn_pose"):
        assert "viewpoint" in res.skipped[name], (name, res.skipped[name])
    assert res["knn_class/top1"] == 1.0 and res["retrieval/r@1"] == 1.0 and res["reid/top1"] > 0.8


def test_blank_view_and_frame_cells_are_unknown_not_an_error(tmp_path):
    """A blank ``view`` cell: the row votes for no view in the kNN gallery and its query is scored for the geodesic
    error only; a blank ``frame``: left out of the re-ID jitter. A cell that is not a whole number is an error."""
    folder = make_folder(tmp_path / "mine")
    lines = (folder / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    for r in rows[::4]:
        r[header.index("view")] = ""
        r[header.index("frame")] = ""
    (folder / "labels.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    res = run_metrics(OracleModel(folder), folder, ["knn_pose", "reid"])
    # every view keeps a row in another instance of its category, so the oracle still finds it
    assert res["knn_pose/acc"] == 1.0 and res["knn_pose/n_queries"] == 30
    assert res["knn_pose/median_geodesic"] == pytest.approx(0.0, abs=1e-3)
    assert "reid/top1" in res and "reid/jitter" in res
    rows[1][header.index("view")] = "2.5"
    (folder / "labels.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    with pytest.raises(ViewsslError, match=r"labels\.csv.*line 3: view is not a whole number >= 0: '2\.5'"):
        run_metrics(OracleModel(folder), folder, ["knn_pose"])
