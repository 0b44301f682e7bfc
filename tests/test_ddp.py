"""2-process DDP (gloo, CPU, loopback) == 1 process on the same global batch, for the encoder trainer.

What must agree: gathered embeddings for the batch losses (InfoNCE negatives, VICReg variance / covariance), the
trajectory loss averaged over ranks, and batch norm statistics over the global batch. torch's ``nn.SyncBatchNorm``
refuses CPU tensors, so on CPU the trainer uses ``trajssl.distributed.DistBatchNorm`` (statistics all-reduced with
gradient); the comparison therefore includes every BN layer, in the backbone and in the projectors.
Augmentation is off (``augment="none"``): each rank draws its own random views, so a run with augmentation cannot
match a 1-process run draw for draw; the data order is shared (sharded global batches).

The runs are in float64. In float32 the first step agrees to ~1e-4 of the update, but batch norm over a handful of
samples amplifies rounding differences (different reduction orders) about 100x per step; in float64 two steps
agree to ~1e-11, which shows the gradients are the same computation, not merely close.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_trajssl_trainer import TINY, make_fake_benchmark

CONFIGS = {
    "vicreg_traj": {"method": "vicreg", "traj_weight": 0.2},
    "simclr_traj_layer3": {"method": "simclr", "traj_weight": 0.2, "traj_layer": "layer3", "optimizer": "sgd"},
    # (SimSiam gathers nothing; its synchronised batch norms are the same code as above.)
}
STEPS = 2


def _config(bench: Path, name: str) -> dict:
    return {**TINY, **CONFIGS[name], "data": str(bench), "steps": STEPS, "augment": "none", "seed": 5,
            "warmup_steps": 0, "lr": 0.05}


def _train(bench: Path, name: str) -> dict[str, torch.Tensor]:
    from trajssl.trainer import EncoderTrainer

    tr = EncoderTrainer(_config(bench, name), torch.device("cpu"))
    batches = tr.batches(0)
    for step in range(STEPS):
        tr.train_step(next(batches), step)
    state = {f"encoder.{k}": v for k, v in tr.encoder.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in tr.method.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def _worker(rank: int, world: int, port: int, bench: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in CONFIGS:
            state = _train(Path(bench), name)
            if rank == 0:
                torch.save(state, Path(out) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _one_thread_float64():
    n, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(dtype)


def test_two_processes_match_one_process(tmp_path):
    bench = make_fake_benchmark(tmp_path / "bench")
    mp.spawn(_worker, args=(2, _free_port(), str(bench), str(tmp_path)), nprocs=2, join=True)
    for name in CONFIGS:
        single = _train(bench, name)
        double = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        worst = max((single[k].float() - double[k].float()).abs().max().item() for k in single)
        assert single["encoder.stem.0.weight"].dtype == torch.float64
        for k in single:
            torch.testing.assert_close(double[k], single[k], rtol=1e-8, atol=1e-10, msg=lambda m: f"{name} {k}: {m}")
        # the runs did move away from the initialisation, so agreeing means something
        init = _init_state(bench, name)
        weights = [k for k in single if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        moved = max((single[k].float() - init[k].float()).abs().max().item() for k in weights)
        assert moved > 1e-3 and moved > 1e6 * worst, f"{name}: moved {moved}, worst mismatch {worst}"


def _init_state(bench: Path, name: str) -> dict[str, torch.Tensor]:
    from trajssl.trainer import EncoderTrainer

    tr = EncoderTrainer(_config(bench, name), torch.device("cpu"))
    state = {f"encoder.{k}": v for k, v in tr.encoder.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in tr.method.state_dict().items()})
    return state


def test_dist_batchnorm_is_plain_batchnorm_in_one_process():
    from trajssl.distributed import DistBatchNorm, convert_sync_batchnorm

    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Linear(5, 5), torch.nn.BatchNorm1d(5))
    conv = convert_sync_batchnorm(torch.nn.Sequential(*[m for m in bn]), torch.device("cpu"))
    assert isinstance(conv[0], DistBatchNorm) and isinstance(conv[2], DistBatchNorm)
    x = torch.randn(4, 3, 2, 5)
    ref = torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(conv[0](x), ref(x))
    torch.testing.assert_close(conv[0].running_var, ref.running_var)


def test_each_process_of_a_gpu_launch_trains_on_its_own_gpu(monkeypatch):
    """Under torchrun, ``--device cuda:0`` (or ``cuda``) on every process means each its own GPU, cuda:LOCAL_RANK
    (both CLIs take the device from ``init_from_env``); a single process keeps the device it was given."""
    from common import distributed as dist_utils

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.init_from_env(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)  # already joined: nothing to initialise
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_utils.init_from_env(torch.device("cuda", 0)) == torch.device("cuda", 3)
    assert dist_utils.init_from_env(torch.device("cpu")) == torch.device("cpu")


def _toy_trainer(failing_evaluation: bool):
    from tests.test_training import ToyTrainer

    class FailingEvaluation(ToyTrainer):
        def evaluate(self, step):
            raise RuntimeError("the evaluation data went away")

    return (FailingEvaluation if failing_evaluation else ToyTrainer)({"seed": 0, "lr": 0.01})


def _fit_worker(rank: int, world: int, port: int, run_dir: str, out: str, case: str) -> None:
    """fit of a toy trainer on two processes; each writes how its call ended."""
    from datetime import timedelta

    import torch.distributed as dist

    from common.training import fit

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        fit(_toy_trainer(case == "evaluation fails"), run_dir, steps=2, checkpoint_every=2, eval_every=1,
            progress=False)
        outcome = "finished"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("case", ["fine", "folder locked", "checkpoint unwritable", "evaluation fails"])
def test_an_error_on_the_main_process_stops_every_process(tmp_path, case):
    """What only rank 0 does (lock the run folder, write config.json and checkpoints, evaluate) can fail there alone;
    every process then stops with an error at once (the others waited in their next collective until the timeout)."""
    from common.io import folder_lock

    run = tmp_path / "run"
    run.mkdir()
    if case == "checkpoint unwritable":
        (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    held = folder_lock(run, "test") if case == "folder locked" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with held:
        mp.spawn(_fit_worker, args=(2, _free_port(), str(run), str(tmp_path), case), nprocs=2, join=True)
    assert time.perf_counter() - t0 < 25  # not the 30 s timeout
    main, other = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    if case == "fine":  # the same calls when nothing fails: one run folder, written by rank 0
        assert main == other == "finished"
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-00000002.pt"]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2]
    elif case == "folder locked":
        assert main.startswith("ViewsslError") and "another training run is writing to this folder" in main
        assert other == "ViewsslError: locking the run folder failed on the main process (rank 0); its error says why"
    elif case == "checkpoint unwritable":
        assert main.startswith(("FileExistsError", "NotADirectoryError")), main
        assert other == ("ViewsslError: writing checkpoint ckpt-00000002.pt failed on the main process (rank 0); its "
                         "error says why")
    else:
        assert main == "RuntimeError: the evaluation data went away"
        assert other == ("ViewsslError: the evaluation at step 1 failed on the main process (rank 0); its error says "
                         "why")
