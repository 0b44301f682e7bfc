"""The two-head (--pairs dual) encoder and experiments/frame_pairs.py: training, exact resume, consecutive-frame
triplets, and the quick mode's tables on a tiny rendered benchmark."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import ViewsslError
from common.io import load_checkpoint
from common.training import fit
from tests.test_trajssl_trainer import TINY, make_fake_benchmark
from trajssl.trainer import EncoderTrainer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_fake_benchmark(tmp_path_factory.mktemp("bench"))


def _params(module) -> dict[str, torch.Tensor]:
    """The module's parameters (not its buffers: batch-norm statistics move on any forward pass in train mode)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("method,traj_weight", [("simsiam", 0.2), ("vicreg", 0.0)])
def test_dual_trains_two_steps(bench, method, traj_weight):
    tr = EncoderTrainer({**TINY, "method": method, "data": str(bench), "steps": 2, "pairs": "dual",
                         "traj_weight": traj_weight}, CPU)
    assert set(tr.modules()) == {"encoder", "heads", "heads_distant"}
    before = {name: _params(m) for name, m in tr.modules().items()}
    batches = tr.batches(0)
    for step in range(2):
        batch = next(batches)
        assert batch["partner"].shape == batch["partner_distant"].shape == batch["image"].shape
        assert ("triplet" in batch) == (traj_weight > 0)
        terms = tr.train_step(batch, step)
        assert all(torch.isfinite(v) for v in terms.values())
    assert ("trajectory" in terms) == (traj_weight > 0) and "std_z_distant" in terms
    for name, module in tr.modules().items():  # the trunk and both heads learn
        after = _params(module)
        assert any(not torch.equal(v, before[name][k]) for k, v in after.items() if v.is_floating_point()), name


@pytest.mark.parametrize("pairs", ["nearby", "distant", "dual"])
def test_each_partner_is_the_frame_its_mode_draws(bench, pairs):
    """The batch's partner images are the rows that ``partners`` drew for the batch's frames in the right mode:
    --pairs nearby / distant one partner of that mode; dual a nearby partner and a distant one."""
    tr = EncoderTrainer({**TINY, "data": str(bench), "steps": 2, "pairs": pairs, "traj_weight": 0.0}, CPU)
    drawn, partners = [], tr.frames.partners

    def spy(indices, mode):
        rows = partners(indices, mode)
        drawn.append((mode, [int(i) for i in indices], rows))
        return rows

    tr.frames.partners = spy
    batch = next(tr.batches(0))
    index = [int(i) for i in batch["index"]]
    by_mode = {mode: rows for mode, idx, rows in drawn if idx == index}
    expected = {"nearby": ["nearby"], "distant": ["distant"], "dual": ["nearby", "distant"]}[pairs]
    assert sorted(by_mode) == sorted(expected) and len(drawn) == len(expected)
    assert torch.equal(batch["partner"], tr.frames.load(by_mode[expected[0]]))
    if pairs == "dual":
        assert torch.equal(batch["partner_distant"], tr.frames.load(by_mode["distant"]))
    seq = tr.frames.table.sequence_index
    rank = {i: r for i, r in enumerate(tr.frames.table.frame)}
    for mode, rows in by_mode.items():  # the rows are of the mode: 1-2 frames away, or any other frame
        gaps = [abs(rank[r] - rank[i]) for i, r in zip(index, rows)]
        assert all(seq[r] == seq[i] for i, r in zip(index, rows)), mode
        assert all(1 <= g <= 2 for g in gaps) if mode == "nearby" else all(g >= 1 for g in gaps) and max(gaps) > 2


def test_consecutive_frames(bench):
    from trajssl.data import SequenceFrames

    frames = SequenceFrames(bench / "sequences" / "train", 16)
    seq, frame = frames.table.sequence_index, frames.table.frame
    idx = list(range(len(frames)))
    left, centre, right = frames.consecutive(idx)
    for i, l, c, r in zip(idx, left, centre, right):
        assert seq[l] == seq[c] == seq[r] == seq[i]
        assert frame[l] + 1 == frame[c] == frame[r] - 1  # sequences of 5 frames: always a full triplet
        assert c == i or (frame[i] in (0, 4) and abs(frame[c] - frame[i]) == 1)


def test_dual_resume_equals_uninterrupted(bench, tmp_path):
    cfg = {**TINY, "method": "simsiam", "pairs": "dual", "traj_weight": 0.2, "data": str(bench),
           "schedule_steps": 4, "seed": 5, "warmup_steps": 1}
    fit(EncoderTrainer({**cfg, "steps": 4}, CPU), tmp_path / "full", steps=4, checkpoint_every=2, progress=False)
    fit(EncoderTrainer({**cfg, "steps": 2}, CPU), tmp_path / "half", steps=2, checkpoint_every=2, progress=False)
    result = fit(EncoderTrainer({**cfg, "steps": 4}, CPU), tmp_path / "half", steps=4, checkpoint_every=2,
                 resume="auto", progress=False)
    assert result["start_step"] == 2
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "ckpt-00000004.pt")
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "ckpt-00000004.pt")
    assert set(a["modules"]) == {"encoder", "heads", "heads_distant"}
    for group, state in a["modules"].items():
        for k, v in state.items():
            assert torch.equal(v, b["modules"][group][k]), f"{group}.{k} differs after resume"
    sa, sb = a["optimizers"]["optimizer"]["state"], b["optimizers"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)


def test_dual_needs_sequences(bench):
    with pytest.raises(ViewsslError, match="--pairs dual needs sequences"):
        EncoderTrainer({**TINY, "data": str(bench / "objects" / "train"), "pairs": "dual", "steps": 1}, CPU)


# ------------------------------------------------------------------------------------------------ the experiment
TINY_SEQUENCES = dict(sequence_categories=("car", "mug"), frames=8)


@pytest.fixture(scope="module")
def tiny_sequences(tmp_path_factory) -> Path:
    from common.data.synthetic import render_benchmark

    root = tmp_path_factory.mktemp("seqbench") / "b"
    render_benchmark(root, kinds=("sequences",), size=32, scale="small", progress=False, **TINY_SEQUENCES)
    return root


def test_quick_mode_writes_well_formed_tables(tiny_sequences, tmp_path, capsys):
    from experiments.frame_pairs import COLUMNS, main

    out = tmp_path / "fp"
    args = ["--quick", "--data", str(tiny_sequences), "--out", str(out), "--device", "cpu", "--seeds", "0",
            "--batch-size", "4", "--image-size", "32"]
    result = main.main(args, standalone_mode=False)
    printed = capsys.readouterr().out
    assert "wall time" in printed and "python -m experiments.frame_pairs --quick" in printed

    data = json.loads((out / "results.json").read_text())
    variants = ["simsiam-same", "simsiam-nearby", "simsiam-distant", "simsiam-dual", "simsiam-dual-traj0.2"]
    assert sorted(data["aggregate"]) == sorted(variants) and len(data["runs"]) == 5
    rates = (out / "results.md").read_text().split("Training s/step (median): ")[1].split(";")[0]
    assert [part.split()[0] for part in rates.split(", ")] == variants  # one rate per method and pair mode
    for run in data["runs"]:
        assert run["trained_steps"] == 2 and run["config"]["steps"] == 2
        m = run["metrics"]
        taps = ["pooled", "layer3", "head"] + (["head_distant"] if run["config"]["pairs"] == "dual" else [])
        for tap in taps:
            for _, key, scale, _, _ in COLUMNS:
                v = m[key.format(tap=tap)]
                assert math.isfinite(v) and 0 <= v <= (180 if scale == 1.0 else 1), (key, tap, v)
    for key in ("box_fit", "knn_class", "reid", "viewpoint_readout", "pose_nn"):
        assert key in data["protocol"]
    assert set(data["dual_deltas"]["pooled"]) == {"simsiam-dual - simsiam-nearby", "simsiam-dual - simsiam-distant",
                                                  "simsiam-dual-traj0.2 - simsiam-nearby",
                                                  "simsiam-dual-traj0.2 - simsiam-distant"}

    md = (out / "results.md").read_text()
    lines = md.splitlines()
    tables, current = [], None
    for line in lines:
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append(line)
        else:
            current = None
    # pooled (5 variants + random baseline), layer3 (5), heads (3 single + 2 x 2 dual heads), deltas (4)
    assert [len(t) - 2 for t in tables] == [6, 5, 7, 4]
    for t in tables:
        assert all(line.count("|") == len(COLUMNS) + 2 for line in t) and set(t[1]) <= set("|-")
    assert "| simsiam, dual: nearby + distant heads + traj 0.2, head B (distant) |" in md
    assert "## Against SiamPose's claim" in md and "nearby minus distant" in md
    assert "Command: `python -m experiments.frame_pairs --quick" in md
    # the data it ran on, from the benchmark's meta.json (a --data rendered elsewhere is used as it is)
    assert "; data: synthetic benchmark, small scale, 32 px, seed 0." in md
    assert data["settings"]["benchmark"] == "synthetic benchmark, small scale, 32 px, seed 0"

    # Rerunning reuses every finished run (no training, no new checkpoints).
    again = main.main(args, standalone_mode=False)
    assert [r["eval_seconds"] for r in again["runs"]] == [r["eval_seconds"] for r in result["runs"]]
    # a damaged cache is no traceback: that run (only) is evaluated again, from its checkpoint
    (damaged,) = (out / "runs").glob("simsiam-same*/eval.json")
    damaged.write_text('{"config": ')
    third = main.main(args, standalone_mode=False)
    assert json.loads(damaged.read_text())["config"]["pairs"] == "same"
    changed = [r["config"]["pairs"] for r, before in zip(third["runs"], result["runs"])
               if r["eval_seconds"] != before["eval_seconds"]]
    assert changed == ["same"]


def test_unknown_mode_is_one_line_error(tmp_path):
    from experiments.frame_pairs import main

    result = CliRunner().invoke(main, ["--quick", "--modes", "nearby,tripled", "--out", str(tmp_path / "o"),
                                       "--data", str(tmp_path / "d")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == ["Error: --modes: unknown tripled (choose from same, nearby, "
                                                  "distant, dual)"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()  # nothing rendered or trained


@pytest.mark.parametrize("script", ["frame_pairs", "traj_objects"])
def test_a_folder_that_is_not_a_benchmark_is_refused_not_rendered_into(tmp_path, script):
    """A copy of one split's sequences (no meta.json) used to get a benchmark rendered into it and trained on."""
    import importlib

    main = importlib.import_module(f"experiments.{script}").main
    data = tmp_path / "seqcopy"
    (data / "train").mkdir(parents=True)
    (data / "train" / "labels.csv").write_text("path,azimuth,elevation,tilt\n")
    result = CliRunner().invoke(main, ["--quick", "--data", str(data), "--out", str(tmp_path / "o"), "--device",
                                       "cpu"])
    assert result.exit_code == 2, result.output
    assert "is not a synthetic benchmark root (no meta.json)" in result.output and str(data) in result.output
    assert sorted(p.name for p in data.iterdir()) == ["train"]
