"""Issue 7 end to end: a run killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run
ends; --debug shows the traceback that the one-line error hides."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import ViewsslError
from common.io import load_checkpoint
from common.training import find_checkpoint, fit
from experiments.cli import cli
from tests.test_training import ToyTrainer, params

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from common.training import fit
from tests.test_training import ToyTrainer
t = ToyTrainer({{"seed": 5, "lr": 0.05}})
t.on_step = lambda step: time.sleep(0.05)
fit(t, {run!r}, steps=100000, checkpoint_every=5, progress=False)
"""


def test_sigkill_mid_training_resumes_and_matches_uninterrupted(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), run=str(run))], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpts = list((run / "checkpoints").glob("ckpt-*.pt")) if (run / "checkpoints").is_dir() else []
            if len(ckpts) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child wrote no checkpoints")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    ckpt, path = find_checkpoint(run)
    killed_at = ckpt["step"]
    assert killed_at >= 10 and killed_at % 5 == 0
    for kept in (run / "checkpoints").glob("ckpt-*.pt"):  # a kill mid-write may leave a temp file, never a torn one
        assert load_checkpoint(kept)["step"] % 5 == 0, kept

    total = killed_at + 7
    resumed = ToyTrainer({"seed": 5, "lr": 0.05})
    out = fit(resumed, run, steps=total, resume="auto", progress=False)
    assert out["start_step"] == killed_at
    straight = ToyTrainer({"seed": 5, "lr": 0.05})
    fit(straight, tmp_path / "straight", steps=total, checkpoint_every=0, progress=False)
    assert torch.equal(params(resumed), params(straight))


def test_debug_flag_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    plain = CliRunner().invoke(cli, ["eval", "--checkpoint", missing, "--data", missing])
    assert plain.exit_code == 2 and "Traceback" not in plain.output and "Error:" in plain.output
    debug = CliRunner().invoke(cli, ["--debug", "eval", "--checkpoint", missing, "--data", missing])
    assert isinstance(debug.exception, ViewsslError)
