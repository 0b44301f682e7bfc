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


@contextlib.contextmanager
def seeded_rng(seed: int):
    """``torch.manual_seed(seed)`` inside, and every torch RNG the seed touches (the CPU's and each CUDA device's)
    restored after: evaluating in the middle of training leaves its random stream as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

__all__ = ["standardize", "linear_probe", "PairSampler", "same_group_pairs", "relative_rotation",
           "RelativePoseProbe", "relative_pose_probe"]


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
    """Top-1 accuracy of a full-batch L-BFGS logistic-regression probe; ``{"top1", "train_top1"}``.

    Features (N, D) with integer labels (N,); an empty test set has ``top1`` NaN, an empty training set is a
    ``ValueError`` (nothing to fit)."""
    if len(train_labels) == 0:
        raise ValueError("linear_probe: no training sample")
    device = train_features.device
    x_tr, x_te = standardize(train_features.float(), test_features.float().to(device))
    y_tr = torch.as_tensor(train_labels, device=device).long()
    y_te = torch.as_tensor(test_labels, device=device).long()
    c = num_classes or int(torch.cat([y_tr, y_te]).max()) + 1
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
        top1 = float(((x_te @ w + b).argmax(1) == y_te).double().mean()) if len(y_te) else float("nan")
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


def same_group_pairs(groups: torch.Tensor, n_pairs: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


class RelativePoseProbe:
    """The pair MLP: :meth:`fit` on same-group pairs of training features, :meth:`score` on any set of features
    (standardised with the training statistics). Seeded; leaves the global RNG alone."""

    def __init__(self, *, steps: int = 300, hidden: int = 256, batch_size: int = 256, lr: float = 1e-3,
                 seed: int = 0):
        self.steps, self.hidden, self.batch_size, self.lr, self.seed = (int(steps), int(hidden), int(batch_size), lr,
                                                                        int(seed))
        self.model: _PairMLP | None = None

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().to(self.mean.device) - self.mean) / self.std

    def fit(self, features: torch.Tensor, rotations: torch.Tensor, groups) -> "RelativePoseProbe":
        device = features.device
        x = features.float()
        self.mean = x.mean(dim=0, keepdim=True)
        self.std = x.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
        x = self._standardize(x)
        r = rotations.to(device=device, dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.seed)
        init_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        with seeded_rng(init_seed):
            model = _PairMLP(x.shape[1], self.hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.steps))
        sampler = PairSampler(groups)
        model.train()
        with torch.enable_grad(), _threads(device):
            for _ in range(self.steps):
                i, j = sampler.sample(self.batch_size, gen)
                i, j = i.to(device), j.to(device)
                loss = geodesic_distance(model(x[i], x[j]), relative_rotation(r[i], r[j])).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        self.model = model
        return self

    def errors(self, features: torch.Tensor, rotations: torch.Tensor, groups, n_pairs: int = 2000) -> torch.Tensor:
        """Geodesic errors (degrees, float64) on ``n_pairs`` seeded same-group pairs."""
        if self.model is None:
            raise RuntimeError("RelativePoseProbe.errors before fit")
        x = self._standardize(features)
        r = rotations.to(device=x.device, dtype=torch.float32)
        i, j = same_group_pairs(groups, int(n_pairs), torch.Generator().manual_seed(self.seed + 1))
        i, j = i.to(x.device), j.to(x.device)
        errs = []
        with torch.no_grad():
            for s in range(0, len(i), 4096):
                a, b = i[s : s + 4096], j[s : s + 4096]
                errs.append(geodesic_distance(self.model(x[a], x[b]).double(), relative_rotation(r[a], r[b]).double()))
        return torch.rad2deg(torch.cat(errs))

    def score(self, features: torch.Tensor, rotations: torch.Tensor, groups, n_pairs: int = 2000) -> dict[str, float]:
        """``median_geodesic, mean_geodesic, acc_30`` and ``n_test_pairs``."""
        out = geodesic_summary(self.errors(features, rotations, groups, n_pairs))
        out["n_test_pairs"] = float(n_pairs)
        return out


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
    probe = RelativePoseProbe(steps=steps, hidden=hidden, batch_size=batch_size, lr=lr, seed=seed)
    probe.fit(train_features, train_rotations, train_groups)
    out = probe.score(test_features.to(train_features.device), test_rotations, test_groups, test_pairs)
    out["train_median_geodesic"] = float(torch.quantile(probe.errors(train_features, train_rotations, train_groups,
                                                                     test_pairs), 0.5))
    return out
