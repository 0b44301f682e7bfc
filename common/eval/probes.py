"""Cheap, seeded probes on frozen features: a linear classifier and the relative-pose MLP.

Both standardise the features with the training set's mean and std, draw all randomness from their own
``torch.Generator`` (so they never touch the global RNG a training run depends on), and run on the features' device.

- :func:`linear_probe`: multinomial logistic regression, full batch, L-BFGS from a zero start (a convex problem, so
  the answer does not depend on initialisation), small L2 penalty; top-1 accuracy.
- :func:`relative_pose_probe`: the trajectory paper's relative-pose probe made continuous: an MLP on the
  concatenated features of two views of the same instance predicts their relative rotation as a 6-D rotation
  (Zhou et al.), trained with the geodesic loss. The target is ``R_rel = R_j @ R_i^T``: the rotation taking view
  i's camera frame to view j's, which does not depend on the object's canonical frame (so it is defined for unseen
  categories). Reports the median / mean geodesic error and Acc@30 deg on seeded test pairs.
"""
from __future__ import annotations

import contextlib

import torch

from ..geometry import geodesic_distance, rotation_6d_to_matrix
from .pose import geodesic_summary

__all__ = ["standardize", "linear_probe", "PairSampler", "same_group_pairs", "relative_rotation",
           "relative_pose_probe"]


def standardize(train: torch.Tensor, *others: torch.Tensor):
    """z-score every tensor with the mean/std of ``train`` (std floored at 1e-6); returns them in order."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of a full-batch L-BFGS logistic-regression probe; ``{"top1", "train_top1"}``."""
    device = train_features.device
    x_tr, x_te = standardize(train_features.float(), test_features.float().to(device))
    y_tr = torch.as_tensor(train_labels, device=device).long()
    y_te = torch.as_tensor(test_labels, device=device).long()
    c = num_classes or int(max(int(y_tr.max()), int(y_te.max()))) + 1
    w = torch.zeros(x_tr.shape[1], c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_tr @ w + b, y_tr) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    small = contextlib.nullcontext() if x_tr.numel() * c > 2**22 else _threads(device)
    with torch.enable_grad(), small:
        opt.step(closure)
    with torch.no_grad():
        top1 = float(((x_te @ w + b).argmax(1) == y_te).double().mean())
        train_top1 = float(((x_tr @ w + b).argmax(1) == y_tr).double().mean())
    return {"top1": top1, "train_top1": train_top1}


class PairSampler:
    """Random ordered pairs (i, j), i != j, of items sharing a group id (groups < 0 are ignored): uniform over the
    anchors i, then over the other members of i's group. The group structure is computed once."""

    def __init__(self, groups):
        groups = torch.as_tensor(groups).cpu().long()
        self.order = torch.argsort(groups, stable=True)
        uniq, counts = torch.unique_consecutive(groups[self.order], return_counts=True)
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.group_of_sorted = torch.repeat_interleave(torch.arange(len(uniq)), counts)
        valid = (uniq >= 0) & (counts >= 2)
        self.anchors = torch.nonzero(valid[self.group_of_sorted]).squeeze(1)
        if self.anchors.numel() == 0:
            raise ValueError("no group has two or more items: no pairs to draw")

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.anchors[torch.randint(len(self.anchors), (n,), generator=generator)]
        g = self.group_of_sorted[a]
        cnt, st = self.counts[g], self.starts[g]
        offset = 1 + (torch.rand(n, generator=generator, dtype=torch.float64) * (cnt - 1)).long().clamp_max(cnt - 2)
        b = st + (a - st + offset) % cnt
        return self.order[a], self.order[b]


def same_group_pairs(groups: torch.Tensor, n_pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_pairs`` pairs from :class:`PairSampler` (CPU int64 tensors)."""
    return PairSampler(groups).sample(n_pairs, generator)


@contextlib.contextmanager
def _threads(device: torch.device, n: int = 1):
    """Small CPU workloads (a probe MLP on a few hundred samples) run far faster on one thread than on a shared,
    oversubscribed pool; the setting is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_rotation(rot_i: torch.Tensor, rot_j: torch.Tensor) -> torch.Tensor:
    """``R_j @ R_i^T`` (camera frame of view i -> camera frame of view j); (..., 3, 3)."""
    return rot_j @ rot_i.transpose(-1, -2)


class _PairMLP(torch.nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 * in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 6),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return rotation_6d_to_matrix(self.net(torch.cat([a, b], dim=-1)))


def relative_pose_probe(
    train_features: torch.Tensor,
    train_rotations: torch.Tensor,
    train_groups,
    test_features: torch.Tensor,
    test_rotations: torch.Tensor,
    test_groups,
    *,
    steps: int = 300,
    hidden: int = 256,
    batch_size: int = 256,
    lr: float = 1e-3,
    test_pairs: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Train the pair MLP on same-group (same-instance) pairs of the training features, score on seeded test pairs.

    Returns ``median_geodesic, mean_geodesic, acc_30`` (degrees / fraction) on the test pairs and
    ``train_median_geodesic`` on as many training pairs, plus ``n_test_pairs``.
    """
    device = train_features.device
    gen = torch.Generator().manual_seed(int(seed))
    x_tr, x_te = standardize(train_features.float(), test_features.float().to(device))
    r_tr = train_rotations.to(device=device, dtype=torch.float32)
    r_te = test_rotations.to(device=device, dtype=torch.float32)
    init_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(init_seed)
        model = _PairMLP(x_tr.shape[1], hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    sampler = PairSampler(train_groups)
    model.train()
    with torch.enable_grad(), _threads(device):
        for _ in range(int(steps)):
            i, j = sampler.sample(batch_size, gen)
            i, j = i.to(device), j.to(device)
            pred = model(x_tr[i], x_tr[j])
            loss = geodesic_distance(pred, relative_rotation(r_tr[i], r_tr[j])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()

    def score(x, r, groups, n):
        eval_gen = torch.Generator().manual_seed(int(seed) + 1)
        i, j = same_group_pairs(groups, n, eval_gen)
        i, j = i.to(device), j.to(device)
        errs = []
        with torch.no_grad():
            for s in range(0, n, 4096):
                p = model(x[i[s : s + 4096]], x[j[s : s + 4096]])
                errs.append(geodesic_distance(p.double(), relative_rotation(r[i[s : s + 4096]], r[j[s : s + 4096]]).double()))
        return torch.rad2deg(torch.cat(errs))

    test_err = score(x_te, r_te, test_groups, int(test_pairs))
    train_err = score(x_tr, r_tr, train_groups, int(test_pairs))
    out = geodesic_summary(test_err)
    out["train_median_geodesic"] = float(torch.quantile(train_err, 0.5))
    out["n_test_pairs"] = float(test_pairs)
    return out
