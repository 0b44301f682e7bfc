"""Smoke run of `viewssl compare`: every method trains two steps on a tiny benchmark; files and tables are produced."""
import json

import pytest
import torch
from click.testing import CliRunner

from experiments.cli import cli

TINY = dict(head_train=24, head_test=12, head_train_identities=6, head_test_identities=3, head_triplets=16,
            head_sequences_train=2, head_sequences_test=1, frames=8)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    from common.data.synthetic import render_benchmark

    root = tmp_path_factory.mktemp("bench") / "b"
    render_benchmark(root, kinds=("heads", "head_triplets", "head_sequences"), size=32, scale="small",
                     progress=False, **TINY)
    return root


def test_compare_smoke_writes_tables_and_plots(tiny_bench, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "cmp"
        result = CliRunner().invoke(cli, ["--quiet", "compare", "--quick", "--data", str(tiny_bench), "--out", str(out),
                                          "--steps-scale", "0.001", "--device", "cpu"], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["runs"]) == {"ssv", "vicreg", "vicreg_traj", "simsiam_nearby", "simsiam_distant", "supervised"}
    for name, runs in data["runs"].items():
        assert runs[0]["steps"] == 2
        assert 0 <= runs[0]["viewpoint_readout/readout/mae"] <= 180, name
    for name in ("ssv", "supervised"):
        assert 0 <= data["runs"][name][0]["viewpoint/calibrated/mae"] <= 180
        assert "calibrated" in json.dumps(data["protocol"][name])
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| SSV (cpu preset) |" in md and "heads/test" in md
    # the table shows the JSON's figures (one seed: the value itself)
    ssv_row = next(line for line in table if line.startswith("| SSV (cpu preset) |")).split("|")[2:-1]
    run = data["runs"]["ssv"][0]
    keys = [f"viewpoint_readout/readout/{k}" for k in ("azimuth_mae", "elevation_mae", "tilt_mae", "mae")]
    keys += ["viewpoint/raw/mae"] + [f"viewpoint/calibrated/{k}" for k in ("azimuth_mae", "elevation_mae",
                                                                           "tilt_mae", "mae")]
    assert [cell.strip() for cell in ssv_row[:9]] == [f"{run[k]:.1f}" for k in keys]
    for png in ("per_angle_errors", "error_vs_azimuth", "sequence_pca", "ssv_azimuth_sweep"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png}.png)" in md
    assert "| method | readout az" in result.output


def test_compare_refuses_a_benchmark_without_head_kinds(tmp_path):
    (tmp_path / "b" / "heads").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["compare", "--data", str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "lacks head_triplets, head_sequences" in result.output and "Traceback" not in result.output


def test_compare_unknown_method(tiny_bench, tmp_path):
    result = CliRunner().invoke(cli, ["compare", "--data", str(tiny_bench), "--out", str(tmp_path / "o"),
                                      "--methods", "ssv,byol"])
    assert result.exit_code == 2 and "--methods: unknown byol" in result.output
    for args, message in [(["--methods", ""], "--methods: empty list"),
                          (["--methods", "ssv,ssv"], "--methods: ssv given more than once"),
                          (["--steps-scale", "0"], "--steps-scale"), (["--steps-scale", "-5"], "--steps-scale"),
                          (["--steps-scale", "nan"], "--steps-scale must be a finite number")]:
        result = CliRunner().invoke(cli, ["compare", "--data", str(tiny_bench), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # nothing trained


def test_per_angle_bars_draw_a_spread_only_where_seeds_give_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.container
    import matplotlib.pyplot as plt

    from experiments.compare import per_angle_bars

    def runs(*values):
        return [{f"viewpoint_readout/readout/{a}_mae": v + k for k, a in enumerate(("azimuth", "elevation", "tilt"))}
                for v in values]

    fig, ax = plt.subplots()
    per_angle_bars(ax, {"vicreg": runs(10.0), "simsiam_nearby": runs(10.0, 14.0)})
    one, two = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert one.errorbar is None  # one seed: no spread is drawn (not a bar of zero height)
    assert [b.get_height() for b in two] == pytest.approx([12.0, 13.0, 14.0])
    segments = two.errorbar.lines[2][0].get_segments()  # std (ddof 1) of (10, 14) is 2.83 around each mean
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * 2 ** 1.5] * 3)
    assert ax.get_title().endswith("mean +- std over the seeds)")
    plt.close(fig)


def test_ssv_ranges_come_from_meta_json_or_fall_back_with_a_warning(tmp_path, caplog):
    import logging
    import math

    from experiments.compare import _head_ranges

    with caplog.at_level(logging.WARNING):
        assert _head_ranges(tmp_path) == {}  # no meta.json (a benchmark copied without it): SSV's own ranges
    assert "no head pose ranges" in caplog.text
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"yaw_range": 90, "pitch_range": 30, "roll_range": 20}}))
    assert _head_ranges(tmp_path) == pytest.approx(
        {"az_range": math.pi / 2, "el_range": math.pi / 6, "tilt_range": math.radians(20)})


def test_the_table_shows_an_unknown_train_time_as_a_dash():
    from experiments.compare import format_table

    runs = [{"seed": 0, "train_seconds": float("nan"), "viewpoint/calibrated/mae": 10.0}]
    assert format_table({"ssv": runs}, quick=True).splitlines()[-1].endswith("| - |")
    runs = [{**runs[0], "train_seconds": 61.4}, {**runs[0], "train_seconds": 58.6}]
    assert format_table({"ssv": runs}, quick=True).splitlines()[-1].endswith("| 60 |")


def test_demo_runs_end_to_end_and_a_second_demo_reuses_everything(tmp_path, monkeypatch):
    """`viewssl demo` (the README's `make demo`) on a shrunken small preset with two steps per method: the summary,
    the grid and the table; run again, it renders nothing and trains nothing (the benchmark's files and the runs'
    checkpoints are the same files); a device that is not there is said before any rendering."""
    import dataclasses

    import common.data.synthetic.benchmark as bm
    import experiments.compare as compare
    from tests.test_synthetic import TINY as TINY_ALL

    monkeypatch.setitem(bm.PRESETS, "small", {**TINY_ALL, **TINY})
    for name, method in compare.METHODS.items():
        monkeypatch.setitem(compare.METHODS, name, dataclasses.replace(method, steps=(2, 2)))
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = CliRunner().invoke(cli, ["--quiet", "demo", "--out", str(out), "--device", "cpu"],
                                   catch_exceptions=False)
        assert first.exit_code == 0, first.output
        labels = out / "benchmark" / "heads" / "train" / "labels.csv"
        ckpts = sorted((out / "compare" / "runs").glob("*/checkpoints/*.pt"))
        before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in [labels, *ckpts]]
        second = CliRunner().invoke(cli, ["--quiet", "demo", "--out", str(out), "--device", "cpu"],
                                    catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert second.exit_code == 0, second.output
    assert len(ckpts) >= 6 and sorted((out / "compare" / "runs").glob("*/checkpoints/*.pt")) == ckpts
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in [labels, *ckpts]] == before
    for result in (first, second):
        assert "image grid:" in result.output and "| SSV (cpu preset) |" in result.output
    assert (out / "benchmark_grid.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare" / "results.md").is_file()

    # another training seed in the same OUT: the same benchmark (it was refused as "other settings")
    other = CliRunner().invoke(cli, ["--quiet", "demo", "--out", str(out), "--seed", "1", "--render-only"])
    assert other.exit_code == 0, other.output
    assert (labels.stat().st_ino, labels.stat().st_mtime_ns) == before[0]

    absent = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "nodevice"), "--device", "cuda:7"])
    assert absent.exit_code == 2 and "--device cuda:7" in absent.output
    assert not (tmp_path / "nodevice").exists()
