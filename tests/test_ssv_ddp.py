"""SSV under 2 processes (gloo, CPU, loopback): the replicas start equal (rank 0's weights broadcast) and stay equal
(gradients averaged).

Each rank draws its own style codes, viewpoints and dropout masks (seed + rank), so a 2-process run is not the
1-process run draw for draw; what must hold is that every rank applies the same averaged update.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_ssv_trainer import TINY


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import ssv.trainer as ssv_trainer
        from ssv.trainer import SSVTrainer, default_config

        def perturbed(build):  # rank 1 builds other initial weights: the broadcast from rank 0 must replace them
            def wrapped(config):
                net = build(config)
                if rank == 1:
                    with torch.no_grad():
                        for p in net.parameters():
                            p.add_(0.5)
                return net
            return wrapped

        ssv_trainer.build_viewpoint = perturbed(ssv_trainer.build_viewpoint)
        ssv_trainer.build_synthesis = perturbed(ssv_trainer.build_synthesis)
        t = SSVTrainer(default_config("cpu", data=data, seed=3, **TINY))
        init = {k: v.detach().clone() for k, v in t.V.state_dict().items()}
        batches = t.batches(0)
        for step in range(2):
            t.train_step(next(batches), step)
        state = {f"{name}.{k}": v.detach().clone() for name, m in t.modules().items()
                 for k, v in m.state_dict().items()}
        torch.save({"state": state, "init": init}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~25 s: two fresh interpreters import torch
def test_two_process_replicas_stay_in_sync(tmp_path):
    from common.data.labels import write_labels
    from common.io import write_image

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        write_image(tmp_path / "data" / f"{i}.png", torch.rand(3, 16, 16, generator=gen))
        rows.append({"path": f"{i}.png", "azimuth": 0.1 * i, "elevation": 0.0, "tilt": 0.0})
    write_labels(tmp_path / "data" / "labels.csv", rows)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "data"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["init"]:
        assert torch.equal(r0["init"][k], r1["init"][k]), f"initial {k} differs between ranks"
    changed = 0
    for k, v in r0["state"].items():
        assert torch.allclose(v, r1["state"][k], atol=1e-6, rtol=0), f"{k} differs between ranks after 2 steps"
        if k.startswith("V.") and k[2:] in r0["init"] and not torch.equal(v, r0["init"][k[2:]]):
            changed += 1
    assert changed > 0
