"""Multi-process training helpers (torchrun + DistributedDataParallel), all no-ops in a single process.

Launch: ``torchrun --nproc_per_node N -m experiments.cli train ...`` (backend gloo on CPU, nccl on GPU; see README).
Rank 0 writes logs and checkpoints; every rank steps. ``gather_with_grad`` concatenates a tensor from all ranks and
lets the gradient flow back to each rank's own slice, for losses that need the whole batch (InfoNCE negatives,
VICReg statistics).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("viewssl.distributed")

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "gather_with_grad",
           "all_gather_objects", "any_true", "on_main", "destroy"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1); otherwise do nothing.
    Returns the device this process trains on: under torchrun on GPUs, its own one (``cuda:LOCAL_RANK``, whatever
    index ``device`` named), else ``device``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if is_distributed():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return device


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # Every rank computed the same loss over the gathered batch: sum the gradients of all ranks for our slice.
        # DDP then averages parameter gradients over ranks, which gives the single-process gradient.
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, differentiably; identity in a single process."""
    if not is_distributed() or world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def all_gather_objects(obj) -> list:
    """A picklable object from every rank (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (used to stop all ranks together on a signal)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def on_main(fn, what: str):
    """``fn()`` on the main process only (its result there, None elsewhere). An exception it raises is raised on every
    process: the others would otherwise wait in their next collective until the process group's timeout."""
    from .errors import ViewsslError

    error, result = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after every process knows (a second Ctrl-C too)
            error = e
    if any_true(error is not None):
        if error is not None:
            raise error
        raise ViewsslError(f"{what} failed on the main process (rank 0); its error says why")
    return result
