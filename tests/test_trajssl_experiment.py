"""experiments.traj_objects: aggregation over seeds, paired differences, the markdown tables, and a --quick run."""
import json
import math

import pytest

from experiments.traj_objects import COLUMNS, aggregate, format_markdown, main, paired_deltas


def _run(method, w, seed, pose, cls):
    metrics = {}
    for tap, bonus in (("pooled", 0.0), ("layer3", 0.1)):
        metrics[f"knn_pose/{tap}/in_domain/acc"] = pose + bonus
        metrics[f"linear_probe/{tap}/top1"] = cls
    return {"config": {"method": method, "traj_weight": w, "seed": seed}, "metrics": metrics,
            "sec_per_step": 1.0, "eval_seconds": 2.0}


RUNS = [_run("vicreg", 0.0, 0, 0.40, 0.8), _run("vicreg", 0.0, 1, 0.50, 0.8),
        _run("vicreg", 0.2, 0, 0.44, 0.8), _run("vicreg", 0.2, 1, 0.56, 0.8)]


def test_aggregate_mean_and_sample_std():
    agg = aggregate(RUNS)
    s = agg["vicreg-traj0"]["knn_pose/pooled/in_domain/acc"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.45) and s["std"] == pytest.approx(math.sqrt(0.005))


def test_one_value_has_no_spread_to_report():
    """One seed (or one finite value of several) is printed as its mean alone, not as "x ± 0.0"."""
    from experiments.compare import _cell
    from experiments.traj_objects import format_stats, seed_stats

    one = seed_stats([0.42, None, math.nan])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.42) and math.isnan(one["std"])
    assert format_stats(one, 100.0) == "42.0" and format_stats(seed_stats([0.4, 0.5]), 100.0) == "45.0 ± 7.1"
    assert _cell([{"mae": 3.0}, {"mae": math.nan}], "mae") == "3.0"
    assert _cell([{"mae": 3.0}, {"mae": 5.0}], "mae") == "4.0 ± 1.4"


def test_paired_deltas_by_seed():
    key = "knn_pose/pooled/in_domain/acc"
    d = paired_deltas(RUNS, key, key, lambda c: c["traj_weight"] == 0, lambda c: c["traj_weight"] == 0.2)
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.05) and d["std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    # one run per seed on each side, keys differ: pooled against layer3 of the same runs, a bonus of its own per seed
    runs = [_run("vicreg", 0.0, 0, 0.40, 0.8), _run("vicreg", 0.0, 1, 0.50, 0.8)]
    runs[1]["metrics"]["knn_pose/layer3/in_domain/acc"] = 0.80
    plain = lambda c: c["traj_weight"] == 0  # noqa: E731
    mid = paired_deltas(runs, key, key.replace("pooled", "layer3"), plain, plain)
    assert mid["n"] == 2 and mid["mean"] == pytest.approx(0.2) and mid["std"] == pytest.approx(math.sqrt(0.02))


def test_markdown_has_both_taps_and_effect_tables():
    md = format_markdown(RUNS, aggregate(RUNS), {"quick": False, "steps": 10, "batch_size": 4, "image_size": 32})
    assert "final layer" in md and "mid layer" in md and "Trajectory effect" in md
    assert "| vicreg + traj 0.2 | 80.0 ± 0.0 |" in md
    assert "| vicreg, pooled | 0.0 ± 0.0 | n/a | 5.0 ± 1.4 |" in md
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header.count("|") - 2 == len(COLUMNS)


def test_quick_run_trains_both_weights_and_writes_the_tables(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "traj"
        result = main.main(["--quick", "--out", str(out), "--methods", "vicreg", "--seeds", "0", "--device", "cpu",
                            "--stem", "imagenet", "--image-size", "32", "--optimizer", "adamw"],
                           standalone_mode=False)
    finally:
        torch.set_num_threads(threads)
    assert [r["config"]["traj_weight"] for r in result["runs"]] == [0.0, 0.2]
    assert all(r["config"]["optimizer"] == "adamw" and not r["config"]["small_stem"] for r in result["runs"])
    saved = json.loads((out / "results.json").read_text())
    assert 0.0 <= saved["aggregate"]["vicreg-traj0.2"]["linear_probe/layer3/top1"]["mean"] <= 1.0
    md = (out / "results.md").read_text()
    assert "Command: `python -m experiments.traj_objects --quick" in md and "imagenet stem, adamw" in md
    assert "QUICK smoke run" in md


def test_describe_benchmark_from_meta_json(tmp_path):
    from experiments.traj_objects import describe_benchmark

    nothing = "not a synthetic benchmark root (no readable meta.json)"
    assert describe_benchmark(tmp_path) == nothing  # a plain dataset folder
    (tmp_path / "meta.json").write_text('{"config": ')  # damaged
    assert describe_benchmark(tmp_path) == nothing
    (tmp_path / "meta.json").write_text(json.dumps({"scale": "full", "size": 64, "seed": 3}))  # no config, kinds
    assert describe_benchmark(tmp_path) == nothing
    (tmp_path / "meta.json").write_text(json.dumps({"config": {}, "kinds": {}, "scale": "full", "size": 64, "seed": 3}))
    assert describe_benchmark(tmp_path) == "synthetic benchmark, full scale, 64 px, seed 3"
