"""The shared training loop: exact resume, corrupt checkpoints, config mismatch, non-finite loss, signals."""
import json
import math
import logging
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common.errors import ViewsslError
from common.io import atomic_save, load_checkpoint
from common.training import (NonFiniteLoss, Trainer, TrainingInterrupted, batch_iterator, config_diff, find_checkpoint,
                             find_resumable_run, fit, new_run_dir, resolve_run_dir, seed_everything)


class ToyTrainer(Trainer):
    """A small MLP regression with dropout (uses the torch RNG in every step) and an SGD-momentum optimiser."""

    family = "toy"

    def __init__(self, config, device=torch.device("cpu")):
        super().__init__(config, device)
        seed_everything(config["seed"])
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=config["lr"], momentum=config.get("momentum", 0.9))
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True))
        self.fail_at = config.get("fail_at", -1)
        self.on_step = None

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"opt": self.opt}

    def schedulers(self):
        return {"sched": self.sched}

    def batches(self, start_step):
        return batch_iterator(self.data, 8, self.config["seed"], start_step)

    def train_step(self, batch, step):
        x, y = batch
        noise = torch.randn(()) * 0.01  # consumes RNG outside the model too
        loss = ((self.net(x) - y) ** 2).mean() + noise
        if step == self.fail_at:
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.on_step:
            self.on_step(step)
        return {"loss": loss.detach(), "np": torch.tensor(float(np.random.rand())), "py": random.random()}


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.net.parameters()])


def test_resume_equals_uninterrupted(tmp_path):
    full = ToyTrainer({"seed": 3, "lr": 0.05})
    full_out = fit(full, tmp_path / "full", steps=12, checkpoint_every=0, progress=False)

    first = ToyTrainer({"seed": 3, "lr": 0.05})
    fit(first, tmp_path / "half", steps=6, checkpoint_every=3, progress=False)
    second = ToyTrainer({"seed": 99, "lr": 0.05, "steps": 12})  # seed of a fresh process differs: state must restore
    second.config["seed"] = 3
    out = fit(second, tmp_path / "half", steps=12, resume="auto", progress=False)
    assert out["start_step"] == 6 and out["step"] == 12
    assert torch.equal(params(full), params(second))
    assert full.opt.param_groups[0]["lr"] == second.opt.param_groups[0]["lr"]
    # the last step's terms: its loss (torch RNG: dropout, noise), a NumPy and a Python draw (RNGs restored)
    assert out["terms"] == full_out["terms"]


def test_resume_removes_a_half_written_checkpoint(tmp_path):
    fit(ToyTrainer({"seed": 3, "lr": 0.05}), tmp_path / "run", steps=3, checkpoint_every=3, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    stale = ckpts / ".ckpt-00000006.pt.k2j4x.tmp"  # what atomic_save leaves when the process is killed mid-write
    stale.write_bytes(b"\0" * 64)
    out = fit(ToyTrainer({"seed": 3, "lr": 0.05}), tmp_path / "run", steps=6, checkpoint_every=3, resume="auto",
              progress=False)
    assert out["start_step"] == 3 and not stale.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-00000003.pt", "ckpt-00000006.pt"]


def test_checkpoint_contents_and_pruning(tmp_path):
    t = ToyTrainer({"seed": 0, "lr": 0.01})
    fit(t, tmp_path, steps=10, checkpoint_every=2, keep_checkpoints=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-00000008.pt", "ckpt-00000010.pt"]
    ck = load_checkpoint(tmp_path / "checkpoints" / names[-1])
    assert ck["family"] == "toy" and ck["step"] == 10
    assert set(ck) >= {"modules", "optimizers", "schedulers", "rng", "config"}
    assert (tmp_path / "config.json").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_training_time_adds_up_over_resumes(tmp_path, monkeypatch):
    """train_seconds in the checkpoint and the result is the run's, not the last call's (compare's "train s" showed 0
    for a rerun and only the continued part of an interrupted run); a checkpoint from before it gives NaN."""
    import common.training as training

    clock = iter(float(x) for x in range(0, 10_000, 10))  # every perf_counter() call: 10 s later
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    first = fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)
    ck2 = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000002.pt")
    assert 0 < ck2["train_seconds"] <= first["train_seconds"]
    again = fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, resume="auto", progress=False)
    assert again["start_step"] == 2 and again["train_seconds"] >= ck2["train_seconds"]
    more = fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, resume="auto", progress=False)
    ck4 = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000004.pt")
    assert ck4["train_seconds"] > ck2["train_seconds"] and more["train_seconds"] >= ck4["train_seconds"]
    del ck4["train_seconds"]
    atomic_save(ck4, tmp_path / "checkpoints" / "ckpt-00000004.pt")
    old = fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=5, resume="auto", progress=False)
    assert math.isnan(old["train_seconds"])


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    t = ToyTrainer({"seed": 0, "lr": 0.01})
    fit(t, tmp_path, steps=4, checkpoint_every=2, progress=False)
    newest = tmp_path / "checkpoints" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as after a crash of a non-atomic writer
    ckpt, path = find_checkpoint(tmp_path)
    assert path.name == "ckpt-00000002.pt" and ckpt["step"] == 2
    assert "ckpt-00000004.pt" in caplog.text


def test_resume_with_different_config_is_refused(tmp_path):
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)
    with pytest.raises(ViewsslError, match=r"lr: 0.01 -> 0.02.*--force"):
        fit(ToyTrainer({"seed": 0, "lr": 0.02}), tmp_path, steps=4, resume="auto", progress=False)
    from common.training import RETRAIN_HINT

    with pytest.raises(ViewsslError, match=r"lr: 0.01 -> 0.02\); use another --out for these settings"):
        fit(ToyTrainer({"seed": 0, "lr": 0.02}), tmp_path, steps=4, resume="auto", progress=False,
            force_hint=RETRAIN_HINT)  # the experiment scripts, which have no --force
    out = fit(ToyTrainer({"seed": 0, "lr": 0.02}), tmp_path, steps=4, resume="auto", force=True, progress=False)
    assert out["start_step"] == 2
    # forced: the optimiser's settings are the new config's, its momentum buffers and scheduled lr the checkpoint's
    forced = ToyTrainer({"seed": 0, "lr": 0.02, "momentum": 0.5})
    fit(forced, tmp_path, steps=4, resume="auto", force=True, progress=False, checkpoint_every=0)
    group = forced.opt.param_groups[0]
    assert group["momentum"] == 0.5 and group["lr"] == pytest.approx(0.01 * 0.5)  # StepLR: halved at step 3
    assert all("momentum_buffer" in forced.opt.state[p] for p in forced.net.parameters())


def test_resume_past_the_requested_steps_is_refused(tmp_path):
    """A checkpoint beyond --steps would otherwise be returned as if it were the run at --steps."""
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, progress=False)
    with pytest.raises(ViewsslError, match=r"ckpt-00000004.pt: the run is already at step 4, past --steps 2"):
        fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, resume="auto", progress=False)
    out = fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, resume="auto", progress=False)
    assert out["start_step"] == 4 and out["step"] == 4  # the finished run itself is still fine


def test_a_run_folder_in_use_is_refused_and_free_again_after_the_run_or_its_error(tmp_path):
    from common.io import folder_lock

    with folder_lock(tmp_path, "training run"):  # as another process resuming this folder would hold it
        with pytest.raises(ViewsslError, match="another training run is writing to this folder"):
            fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)
    with pytest.raises(ViewsslError, match="lr: 0.01 -> 0.02"):
        fit(ToyTrainer({"seed": 0, "lr": 0.02}), tmp_path, steps=4, resume="auto", progress=False)
    with folder_lock(tmp_path, "training run"):  # released by both the finished run and the refused one
        pass


def test_other_family_checkpoint_is_refused(tmp_path):
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)

    class Other(ToyTrainer):
        family = "other"

    with pytest.raises(ViewsslError, match="is a 'toy' checkpoint, not 'other'"):
        fit(Other({"seed": 0, "lr": 0.01}), tmp_path, steps=4, resume="auto", progress=False)


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["rng"][0].pop("numpy"), r"its RNG state is malformed \(KeyError"),
    (lambda c: c["rng"][0].update(python={"version": 3, "state": "x", "gauss_next": None}),
     "its RNG state is malformed"),
    (lambda c: c["optimizers"].update(opt={"state": {}, "param_groups": 7}), "optimizer 'opt' does not match"),
])
def test_a_loadable_but_malformed_checkpoint_is_a_one_line_error(tmp_path, damage, message):
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, progress=False)
    path = tmp_path / "checkpoints" / "ckpt-00000002.pt"
    ckpt = load_checkpoint(path)
    damage(ckpt)
    atomic_save(ckpt, path)
    with pytest.raises(ViewsslError, match=message) as err:
        fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, resume="auto", progress=False)
    assert "ckpt-00000002.pt" in str(err.value)


def test_non_finite_loss_names_step_and_terms(tmp_path):
    t = ToyTrainer({"seed": 0, "lr": 0.01, "fail_at": 5})
    with pytest.raises(NonFiniteLoss, match=r"step 5: loss=nan.*ckpt-00000004.pt"):
        fit(t, tmp_path, steps=10, checkpoint_every=2, progress=False)
    assert (tmp_path / "checkpoints" / "ckpt-00000004.pt").is_file()


def test_non_finite_weights_are_not_saved_as_a_good_checkpoint(tmp_path):
    """An update that makes a weight NaN while its own loss was finite: the next checkpoint would be poisoned."""
    t = ToyTrainer({"seed": 0, "lr": 0.01})

    def poison(step):
        if step == 4:  # the update of step 5 (index 4) leaves a NaN weight behind; its loss was computed before
            with torch.no_grad():
                t.net[2].bias.fill_(float("nan"))
    t.on_step = poison
    with pytest.raises(NonFiniteLoss, match=r"non-finite weights after step 5 \(net\.2\.bias\); not saved; "
                                            r"last good checkpoint: .*ckpt-00000004.pt"):
        fit(t, tmp_path, steps=10, checkpoint_every=1, progress=False)
    assert find_checkpoint(tmp_path)[1].name == "ckpt-00000004.pt"


def test_train_seconds_leave_out_evaluations_and_add_up_over_resumes(tmp_path):
    class SlowEval(ToyTrainer):
        def evaluate(self, step):
            time.sleep(0.2)
            return {"score": 1.0}

    first = fit(SlowEval({"seed": 0, "lr": 0.01}), tmp_path, steps=4, eval_every=2, progress=False)
    assert first["side_seconds"] >= 0.4 and first["train_seconds"] < first["seconds"] - 0.4
    assert load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000004.pt")["train_seconds"] == first["train_seconds"]
    second = fit(SlowEval({"seed": 0, "lr": 0.01}), tmp_path, steps=6, eval_every=2, resume="auto", progress=False)
    assert second["side_seconds"] >= 0.2
    # the result is the last checkpoint's figure: a later run that reads it reports the same time
    assert second["train_seconds"] == load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000006.pt")["train_seconds"]
    assert second["train_seconds"] == pytest.approx(
        load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000004.pt")["train_seconds"]
        + second["seconds"] - second["side_seconds"], abs=0.05)


def test_sigterm_writes_checkpoint(tmp_path):
    t = ToyTrainer({"seed": 0, "lr": 0.01})
    t.on_step = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None
    with pytest.raises(TrainingInterrupted, match="step 3"):
        fit(t, tmp_path, steps=100, checkpoint_every=0, progress=False)
    assert find_checkpoint(tmp_path)[0]["step"] == 3


def test_a_signal_on_a_checkpoint_step_writes_it_once(tmp_path, monkeypatch):
    import common.training as training

    saved = []
    real = training.atomic_save
    monkeypatch.setattr(training, "atomic_save", lambda obj, path: (saved.append(Path(path).name), real(obj, path)))
    t = ToyTrainer({"seed": 0, "lr": 0.01})
    t.on_step = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None  # step 3 ends at 4
    with pytest.raises(TrainingInterrupted, match="step 4; checkpoint written to .*ckpt-00000004.pt"):
        fit(t, tmp_path, steps=100, checkpoint_every=2, progress=False)
    assert saved == ["ckpt-00000002.pt", "ckpt-00000004.pt"]


def test_a_finished_run_run_again_logs_its_last_evaluation_once(tmp_path):
    """--resume auto on a run already at --steps trains nothing: its last evaluation (off the eval_every multiples) is
    the one logged, returned again, not computed and logged a second time."""
    class CountingEval(ToyTrainer):
        calls = 0

        def evaluate(self, step):
            CountingEval.calls += 1
            return {"score": float(CountingEval.calls)}

    first = fit(CountingEval({"seed": 0, "lr": 0.01}), tmp_path, steps=5, eval_every=2, progress=False)
    assert CountingEval.calls == 3 and first["metrics"] == {"score": 3.0}  # steps 2, 4 and the last, 5
    again = fit(CountingEval({"seed": 0, "lr": 0.01}), tmp_path, steps=5, eval_every=2, resume="auto", progress=False)
    assert again["start_step"] == 5 and again["metrics"] == {"score": 3.0} and CountingEval.calls == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 5]


def test_batch_iterator_is_resumable():
    data = TensorDataset(torch.arange(10))
    full = batch_iterator(data, 3, seed=1, start_step=0)
    seq = [next(full)[0].tolist() for _ in range(7)]
    later = batch_iterator(data, 3, seed=1, start_step=4)
    assert [next(later)[0].tolist() for _ in range(3)] == seq[4:]
    assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats within an epoch
    with pytest.raises(ViewsslError, match=r"^the dataset: 10 training items, fewer than one batch \(--batch-size 16"):
        batch_iterator(data, 16, seed=0, start_step=0)
    data.root = Path("some/folder")  # a dataset that knows its folder is named
    with pytest.raises(ViewsslError, match=r"^some/folder: 10 training items"):
        batch_iterator(data, 16, seed=0, start_step=0)


def _records(path):
    return [(r["step"], r["kind"]) for r in map(json.loads, path.read_text().splitlines())]


def test_resume_from_an_older_checkpoint_sets_later_checkpoints_and_records_aside(tmp_path):
    """Resumed at step 2 of a run that went to 6: its checkpoints 4 and 6 would be picked by a later --resume auto,
    and the records of steps 3-6 would appear twice in metrics.jsonl; both are moved aside, nothing is deleted."""
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=6, checkpoint_every=2, log_every=1, progress=False)
    ckpts = tmp_path / "checkpoints"
    before = _records(tmp_path / "metrics.jsonl")
    assert [s for s, _ in before] == [1, 2, 3, 4, 5, 6]
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=3, checkpoint_every=0, log_every=1, progress=False,
        resume=ckpts / "ckpt-00000002.pt")
    assert sorted(p.name for p in ckpts.glob("ckpt-*.pt")) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert sorted(p.name for p in (ckpts / "set-aside-00000002").iterdir()) == ["ckpt-00000004.pt",
                                                                                "ckpt-00000006.pt"]
    assert [s for s, _ in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [s for s, _ in _records(tmp_path / "metrics-set-aside.jsonl")] == [3, 4, 5, 6]
    assert find_checkpoint(tmp_path)[1].name == "ckpt-00000003.pt"


def test_resuming_twice_from_one_step_keeps_both_set_aside_branches(tmp_path):
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, checkpoint_every=2, progress=False)
    ckpts = tmp_path / "checkpoints"
    first = load_checkpoint(ckpts / "ckpt-00000004.pt")
    for lr in (0.02, 0.03):  # two branches from step 2, each to step 4
        fit(ToyTrainer({"seed": 0, "lr": lr}), tmp_path, steps=4, checkpoint_every=2, progress=False, force=True,
            resume=ckpts / "ckpt-00000002.pt")
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["set-aside-00000002", "set-aside-00000002-2"]
    kept = load_checkpoint(ckpts / "set-aside-00000002" / "ckpt-00000004.pt")
    assert torch.equal(kept["modules"]["net"]["0.weight"], first["modules"]["net"]["0.weight"])
    assert (ckpts / "set-aside-00000002-2" / "ckpt-00000004.pt").is_file()


def test_a_run_started_again_from_scratch_sets_the_earlier_start_aside(tmp_path):
    """Killed before its first checkpoint, then run again (``resume="auto"`` finds nothing): the first start's records
    must not be mixed with the new ones, in metrics.jsonl or in tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=3, checkpoint_every=0, log_every=1, progress=False)
    (tmp_path / "checkpoints" / "ckpt-00000003.pt").unlink()  # as if killed before its first checkpoint
    fit(ToyTrainer({"seed": 1, "lr": 0.01}), tmp_path, steps=4, checkpoint_every=0, log_every=1, progress=False,
        resume="auto")
    assert [s for s, _ in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [s for s, _ in _records(tmp_path / "metrics-set-aside.jsonl")] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == [1, 2, 3, 4]
    # a run from scratch in a folder whose checkpoints were not meant to be resumed: set aside, not pruned
    fit(ToyTrainer({"seed": 2, "lr": 0.01}), tmp_path, steps=2, checkpoint_every=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "set-aside-start").iterdir()) == ["ckpt-00000004.pt"]
    assert find_checkpoint(tmp_path)[1].name == "ckpt-00000002.pt"


def test_a_record_cut_short_does_not_swallow_the_resumed_runs_first(tmp_path):
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=2, checkpoint_every=2, log_every=1, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tr')  # killed while writing the record of step 3, before its checkpoint
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, checkpoint_every=2, log_every=1, progress=False,
        resume="auto")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[2] == '{"step": 3, "kind": "tr'  # kept where it was, on its own line
    assert [json.loads(x)["step"] for x in lines[:2] + lines[3:]] == [1, 2, 3, 4]


_WORKER_RUN = """
import sys, time, torch
from common.training import Trainer, batch_iterator, fit

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([float(i)])

class Toy(Trainer):
    family = "toy"

    def __init__(self):
        super().__init__({"seed": 0}, torch.device("cpu"))
        self.net = torch.nn.Linear(1, 1)

    def modules(self):
        return {"net": self.net}

    def batches(self, start_step):
        return batch_iterator(Slow(), 8, 0, start_step, num_workers=1)

    def train_step(self, batch, step):
        if step == 2:
            print("ready", flush=True)
            if sys.argv[2] == "fail":
                raise RuntimeError("a bug in the step")
        return {"loss": self.net(batch).pow(2).mean()}

fit(Toy(), sys.argv[1], steps=10**6, checkpoint_every=0, progress=False)  # what escapes is not caught: --debug
"""


@pytest.mark.parametrize("case", ["group_sigterm", "fail"])
def test_a_run_with_loader_workers_stops_cleanly(tmp_path, case):
    """``kill -- -PGID`` (a scheduler's pre-emption) reaches every process of the group: the loader's workers must
    leave it to the main process, which finishes its step and writes the checkpoint; and a run that fails with its
    loader alive must exit, not wait for workers forever."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_WORKER_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), case], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=Path(__file__).parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "ready"
        if case == "group_sigterm":
            os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    if case == "group_sigterm":
        assert "TrainingInterrupted: interrupted at step" in err, err
        assert find_checkpoint(tmp_path / "run")[0]["step"] >= 3
    else:
        assert "RuntimeError: a bug in the step" in err, err


def test_tensorboard_keeps_the_resume_steps_own_point(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, checkpoint_every=2, log_every=1, progress=False)
    (tmp_path / "checkpoints" / "ckpt-00000004.pt").unlink()  # as if killed after step 4 was logged, before its save
    fit(ToyTrainer({"seed": 0, "lr": 0.01}), tmp_path, steps=4, checkpoint_every=2, log_every=1, progress=False,
        resume="auto")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = sorted(e.step for e in events.Scalars("train/loss"))
    assert steps == [1, 2, 3, 4]  # step 2, logged before checkpoint 2 was written, is kept; 3 and 4 once each


def _toy_run(out, seed):
    trainer = ToyTrainer({"seed": seed, "lr": 0.01})
    run = new_run_dir(out, "toy")
    fit(trainer, run, steps=2, progress=False)
    return run


def test_resume_auto_takes_the_newest_run_of_the_same_config(tmp_path, caplog):
    seed0 = _toy_run(tmp_path, 0)
    seed1 = _toy_run(tmp_path, 1)
    new_run_dir(tmp_path, "toy")  # a run of the same config that has no checkpoint yet: never resumed
    assert find_resumable_run(tmp_path, "toy", ToyTrainer({"seed": 0, "lr": 0.01})) == seed0
    assert find_resumable_run(tmp_path, "toy", ToyTrainer({"seed": 1, "lr": 0.01})) == seed1
    with caplog.at_level(logging.INFO, logger="viewssl.training"):
        assert find_resumable_run(tmp_path, "toy", ToyTrainer({"seed": 2, "lr": 0.01})) is None
    assert "00001-toy (seed: 1 -> 2)" in caplog.text and "00000-toy (seed: 0 -> 2)" in caplog.text
    # --force: the newest run of the tag with a checkpoint, whatever its config
    assert find_resumable_run(tmp_path, "toy", ToyTrainer({"seed": 2, "lr": 0.01}), force=True) == seed1
    run, resume = resolve_run_dir(tmp_path, "toy", "auto", ToyTrainer({"seed": 2, "lr": 0.01}))
    assert resume is None and run.name == "00003-toy" and run.is_dir()
    assert resolve_run_dir(tmp_path, "toy", "auto", ToyTrainer({"seed": 0, "lr": 0.01})) == (seed0, "auto")
    ckpt = seed1 / "checkpoints" / "ckpt-00000002.pt"
    assert resolve_run_dir(tmp_path, "toy", str(ckpt), ToyTrainer({"seed": 0, "lr": 0.01})) == (seed1, str(ckpt))
    assert resolve_run_dir(tmp_path, "toy", str(seed1 / "checkpoints"), None) == (seed1, str(seed1))
    aside = seed1 / "checkpoints" / "set-aside-00000001" / "ckpt-00000002.pt"  # set aside by a resume from step 1
    aside.parent.mkdir()
    aside.write_bytes(ckpt.read_bytes())
    assert resolve_run_dir(tmp_path, "toy", str(aside), None) == (seed1, str(aside))


def test_new_run_dir_numbers(tmp_path):
    a = new_run_dir(tmp_path, "ssv")
    b = new_run_dir(tmp_path, "encoder")
    assert a.name == "00000-ssv" and b.name == "00001-encoder"


def test_new_run_dir_takes_the_next_number_when_another_run_took_its_own(tmp_path, monkeypatch):
    (tmp_path / "00000-ssv").mkdir()  # made by a run started at the same time, after this one listed the folder
    real_glob, calls = Path.glob, []

    def stale_once(self, pattern):
        calls.append(pattern)
        return iter(()) if len(calls) == 1 else real_glob(self, pattern)
    monkeypatch.setattr(Path, "glob", stale_once)
    assert new_run_dir(tmp_path, "ssv").name == "00001-ssv" and len(calls) == 2


def test_config_diff():
    assert config_diff({"a": 1, "b": {"c": 2}},
                       {"a": 1, "b": {"c": 3}, "d": 4}) == ["b.c: 2 -> 3", "d: '<absent>' -> 4"]
    assert config_diff({"steps": 1}, {"steps": 2}, ignore=("steps",)) == []


def test_config_diff_compares_paths_by_place(tmp_path, monkeypatch):
    # a run started with a relative --data resumes with the absolute path, or through a symlink to the folder
    (tmp_path / "bench" / "heads").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "bench")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "bench" / "heads")
    for same in ("bench/heads", "./bench/heads/", str(tmp_path / "link" / "heads")):
        assert config_diff({"data": absolute}, {"data": same}) == []
        assert config_diff({"eval_data": same}, {"eval_data": absolute}) == []
    assert config_diff({"data": absolute}, {"data": "bench"}) == [f"data: {absolute!r} -> 'bench'"]
    # only path keys: another string key is compared as written
    assert config_diff({"method": "bench/heads"}, {"method": absolute}) != []


def test_eval_mode_sets_eval_for_the_block_and_restores_the_mode_even_on_error():
    from common.training import eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with eval_mode(net) as m:
        assert m is net and not net.training and not net[1].training
    assert net.training
    net.eval()
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            raise RuntimeError("boom")
    assert not net.training  # it was in eval mode before: it stays there
    net.train()
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            raise RuntimeError("boom")
    assert net.training
