"""``viewssl eval`` end to end with a tiny fake family registered here and data written by the test."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from common.eval import FAMILIES, register_family
from common.io import atomic_save
from experiments.cli import cli
from tests.test_eval_metrics import OracleModel, make_benchmark, make_folder


@pytest.fixture()
def oracle_family():
    def loader(ckpt, device):
        cfg = ckpt["config"]
        return OracleModel(cfg["data"], slope=tuple(cfg["slope"]), offset=tuple(cfg["offset"]))

    register_family("oracle_test", loader)
    yield
    FAMILIES.pop("oracle_test", None)


def _checkpoint(run_dir, data, slope=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0), family="oracle_test"):
    path = run_dir / "checkpoints" / "ckpt-00000010.pt"
    atomic_save({"family": family, "config": {"data": str(data), "slope": list(slope), "offset": list(offset)},
                 "step": 10, "modules": {}}, path)
    return path


def test_eval_on_a_labels_folder(tmp_path, oracle_family):
    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    _checkpoint(run, folder, slope=(-1.0, 1.0, 1.0))  # azimuth reversed (all around: calibrated on the circle)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(folder), "--output", str(out),
                                   "--device", "cpu", "--batch-size", "7"])
    assert res.exit_code == 0, res.output
    assert "viewpoint/raw/mae" in res.output and "skipped box_fit" in res.output
    payload = json.loads(out.read_text())
    assert payload["step"] == 10 and payload["checkpoint"].endswith("ckpt-00000010.pt")
    m = payload["metrics"]
    assert m["viewpoint/raw/mae"] > 1.0 and m["viewpoint/calibrated/mae"] == pytest.approx(0.0, abs=1e-3)
    assert payload["protocol"]["viewpoint"]["data"]["calibrated"]["n_calibration"] == 3
    assert payload["protocol"]["viewpoint"]["data"]["calibrated"]["seed"] == 0
    assert payload["context"]["layout"] == "folder"
    assert "relative_pose" in payload["skipped"]


def test_eval_says_that_a_labels_folder_has_no_splits(tmp_path, oracle_family, caplog):
    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    _checkpoint(run, folder)
    args = ["eval", "--checkpoint", str(run), "--data", str(folder), "--metrics", "viewpoint", "--device", "cpu"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert "ignored" not in caplog.text
    res = CliRunner().invoke(cli, args + ["--split", "val"])
    assert res.exit_code == 0, res.output
    assert "--split val ignored" in caplog.text and "labels.csv folder" in caplog.text


def test_eval_on_a_benchmark_with_selected_metrics_and_default_output(tmp_path, oracle_family):
    bench = make_benchmark(tmp_path / "bench")
    run = tmp_path / "run"
    _checkpoint(run, bench)
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "checkpoints" / "ckpt-00000010.pt"), "--data",
                                   str(bench), "--metrics", "knn_class,box_fit", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    written = run / "eval-bench-test-step10.json"
    payload = json.loads(written.read_text())
    assert set(k.split("/")[0] for k in payload["metrics"]) == {"knn_class", "box_fit"}
    assert payload["metrics"]["box_fit/mean_iou"] == pytest.approx(1.0, abs=1e-6)
    assert "1-NN" in payload["protocol"]["box_fit"]["retrieval"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--metrics", "viewpoint,bogus"], "unknown metric(s) bogus (known: viewpoint"),
        (["--compress", "pca"], "--compress 'pca'"),
        (["--data", "MISSING"], "no such data folder"),
        (["--metrics", ""], "no metric named"),
        (["--metrics", " , "], "no metric named"),
    ],
)
def test_eval_user_errors(tmp_path, oracle_family, args, message):
    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    _checkpoint(run, folder)
    base = ["eval", "--checkpoint", str(run), "--data", str(folder), "--device", "cpu"]
    if "--data" in args:
        base[base.index("--data") + 1] = str(tmp_path / "missing")
        args = []
    res = CliRunner().invoke(cli, base + args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_eval_unknown_split_is_an_error_and_writes_nothing(tmp_path, oracle_family):
    """--split tset used to print "(no figures)", exit 0 and overwrite the default JSON of an earlier evaluation."""
    bench = make_benchmark(tmp_path / "bench")
    run = tmp_path / "run"
    _checkpoint(run, bench)
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(bench), "--split", "tset",
                                   "--device", "cpu"])
    assert res.exit_code == 2 and "--split 'tset': no such split (splits here: " in res.output, res.output
    assert "test" in res.output.split("splits here: ")[1] and not list(run.glob("eval-*.json"))


def test_eval_unknown_family_and_missing_checkpoint(tmp_path):
    folder = make_folder(tmp_path / "mine")
    _checkpoint(tmp_path / "run", folder, family="martian")
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(folder)])
    assert res.exit_code == 2 and "unknown model family 'martian'" in res.output
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(folder)])
    assert res.exit_code == 2 and str(tmp_path / "nope") in res.output, res.output
    assert "no such run folder or checkpoint" in res.output and len(res.output.strip().splitlines()) == 1


def test_list_metrics():
    res = CliRunner().invoke(cli, ["eval", "--list-metrics"])
    assert res.exit_code == 0
    assert res.output.split()[0] == "viewpoint" and "box_fit" in res.output


def test_eval_flip_average(tmp_path, oracle_family):
    """The oracle sees the same code in a mirrored image, so with --flip-average every prediction becomes the
    geodesic midpoint of the true view and its mirror: the raw errors are those of that midpoint (scipy's mean)."""
    import numpy as np
    from scipy.spatial.transform import Rotation

    from common.data.labels import read_labels

    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    _checkpoint(run, folder)
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(folder), "--metrics", "viewpoint",
                                   "--device", "cpu", "--flip-average"])
    assert res.exit_code == 0, res.output
    payload = json.loads((run / "eval-mine-all-step10-flip.json").read_text())
    assert payload["flip_average"] is True
    true = read_labels(folder).angles.double().numpy()
    mirrored = true * np.array([-1.0, 1.0, -1.0])
    mid = np.stack([Rotation.from_euler("YXZ", [t, m]).mean().as_euler("YXZ") for t, m in zip(true, mirrored)])
    err = np.degrees(np.abs((mid - true + np.pi) % (2 * np.pi) - np.pi)).mean(axis=0)
    m = payload["metrics"]
    assert err[0] > 1.0  # the fixture's views are turned: the flip moves them
    for name, e in zip(("azimuth", "elevation", "tilt"), err):
        assert m[f"viewpoint/raw/{name}_mae"] == pytest.approx(e, abs=1e-4), name


def test_eval_flip_average_without_viewpoint_figures_warns(tmp_path, oracle_family, caplog):
    bench = make_benchmark(tmp_path / "bench")
    run = tmp_path / "run"
    _checkpoint(run, bench)
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(bench), "--metrics", "knn_class",
                                   "--device", "cpu", "--flip-average"])
    assert res.exit_code == 0, res.output
    assert "--flip-average changed nothing" in caplog.text


def test_eval_ema_asks_the_familys_loader_for_its_average(tmp_path, oracle_family):
    """--ema passes ema=True to a loader that takes it (here the average is an oracle with another slope) and names
    the output -ema; a family whose loader takes no ema keyword is a one-line error naming the checkpoint."""
    folder = make_folder(tmp_path / "mine")

    def loader(ckpt, device, ema=False):
        cfg = ckpt["config"]
        return OracleModel(cfg["data"], slope=(2.0, 1.0, 1.0) if ema else (1.0, 1.0, 1.0))

    register_family("oracle_ema_test", loader)
    try:
        run = tmp_path / "run"
        _checkpoint(run, folder, family="oracle_ema_test")
        args = ["eval", "--checkpoint", str(run), "--data", str(folder), "--metrics", "viewpoint", "--device", "cpu"]
        for extra in ([], ["--ema"]):
            res = CliRunner().invoke(cli, args + extra)
            assert res.exit_code == 0, res.output
        plain = json.loads((run / "eval-mine-all-step10.json").read_text())
        ema = json.loads((run / "eval-mine-all-step10-ema.json").read_text())
        assert ema["ema"] is True and plain["ema"] is False
        assert plain["metrics"]["viewpoint/raw/azimuth_mae"] == pytest.approx(0.0, abs=1e-3)
        assert ema["metrics"]["viewpoint/raw/azimuth_mae"] > 1.0
    finally:
        FAMILIES.pop("oracle_ema_test", None)
    other = tmp_path / "other"
    path = _checkpoint(other, folder)  # oracle_test's loader takes no ema
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(other), "--data", str(folder), "--device", "cpu",
                                   "--ema"])
    assert res.exit_code == 2 and "keep no EMA weights" in res.output and str(path) in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_eval_retrieval_per_sequence(tmp_path, oracle_family):
    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    _checkpoint(run, folder)
    out = tmp_path / "metrics.json"
    base = ["eval", "--checkpoint", str(run), "--data", str(folder), "--metrics", "retrieval", "--device", "cpu",
            "--output", str(out)]
    res = CliRunner().invoke(cli, base + ["--retrieval-unit", "sequence"])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["metrics"]["retrieval/r@50"] == 1.0 and payload["protocol"]["retrieval"]["query_sequences"] == 6
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert "retrieval/r@50" not in payload["metrics"] and payload["protocol"]["retrieval"]["unit"] == "frame"


def test_too_little_data_for_a_fit_skips_the_metric_and_keeps_the_others(tmp_path, oracle_family):
    """With one frame per split (--limit 1) the readout has too few training samples and no instance has a pair for
    the relative-pose probe: both are skipped with the reason, the others run, the JSON is written (was a
    ValueError traceback that lost every figure)."""
    bench = make_benchmark(tmp_path / "bench")
    run = tmp_path / "run"
    _checkpoint(run, bench)
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(bench), "--device", "cpu",
                                   "--metrics", "viewpoint_readout,relative_pose,knn_class", "--limit", "1",
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert "at least 10 training samples" in payload["skipped"]["viewpoint_readout"]
    assert "two or more items" in payload["skipped"]["relative_pose"]
    assert any(k.startswith("knn_class/") for k in payload["metrics"])


def test_the_default_output_is_one_file_per_checkpoint(tmp_path, oracle_family):
    folder = make_folder(tmp_path / "mine")
    run = tmp_path / "run"
    first = _checkpoint(run, folder)
    ckpt = torch.load(first, weights_only=True)
    atomic_save({**ckpt, "step": 20}, run / "checkpoints" / "ckpt-00000020.pt")
    for name in ("ckpt-00000010.pt", "ckpt-00000020.pt"):
        res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "checkpoints" / name), "--data", str(folder),
                                       "--metrics", "viewpoint", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    steps = {json.loads((run / f"eval-mine-all-step{s}.json").read_text())["step"] for s in (10, 20)}
    assert steps == {10, 20}


def test_load_model_leaves_a_loaders_other_errors_alone(tmp_path):
    """Only the family's loader knows which errors mean a malformed file: an out-of-memory (or a bug) while loading is
    raised as it is, not called a bad checkpoint."""
    from common.eval import load_model

    def loader(ckpt, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    register_family("oom_test", loader)
    try:
        path = _checkpoint(tmp_path / "run", tmp_path, family="oom_test")
        with pytest.raises(torch.cuda.OutOfMemoryError):
            load_model(path)
    finally:
        FAMILIES.pop("oom_test", None)
