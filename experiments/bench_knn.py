"""Benchmark: kNN evaluation on 20k x 20k 512-d features, ``common.eval.knn_classify`` vs scikit-learn brute force.

    python -m experiments.bench_knn [--n 20000] [--dim 512] [--k 20] [--classes 100] [--seed 0] [--repeat 3]
                                    [--threads N]

Both sides do the whole kNN evaluation of solo-learn's weighted classifier (cosine, k neighbours, votes
``exp(sim / T)``): ours is ``knn_classify``; the reference is ``NearestNeighbors(metric="cosine",
algorithm="brute").fit(train).kneighbors(query)`` followed by the same vote in NumPy. Both get the same float32
arrays. Runs are interleaved (``--repeat``) and each side's best time is compared, which is robust to other
processes on a shared machine. The script prints wall times, the speed ratio, peak memory above the starting resident
set (Linux VmHWM, reset between the runs; plus tracemalloc's peak of Python/NumPy allocations; measured in an untimed
pass of each side before the timed ones, as tracemalloc slows NumPy's allocations) and whether the
predictions and the neighbour lists agree; where they differ it recomputes the disputed similarities in float64 to say
which side is right. Features are clustered (one Gaussian centre per class plus isotropic noise) so the vote is not
trivial.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
import tracemalloc
from types import SimpleNamespace

import click
import numpy as np
import torch

from common.cli import ViewsslCommand
from common.errors import ViewsslError


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory (MiB) above the level at entry, and tracemalloc's peak (Python/NumPy allocations)."""

    def __enter__(self):
        self.can_reset = _reset_peak()
        self.start = _rss_kib("VmRSS")
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, self.traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        hwm = _rss_kib("VmHWM") if self.can_reset else None
        if hwm is None:  # non-Linux fallback: the process-lifetime peak
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = max(0.0, (hwm - (self.start or 0)) / 1024.0)
        self.traced_mib = self.traced_peak / 2**20
        return False


def make_features(n: int, dim: int, classes: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(seed).standard_normal((classes, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, split])
    labels = rng.integers(0, classes, n)
    feats = 0.15 * centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(2.0)
    return np.ascontiguousarray(feats, dtype=np.float32), labels.astype(np.int64)


def numpy_vote(sims: np.ndarray, neighbor_labels: np.ndarray, classes: int, temperature: float) -> np.ndarray:
    """solo-learn's vote, in NumPy: scores[c] = sum_j exp((sim_j - max sim) / T) [label_j == c]; argmax."""
    w = np.exp((sims.astype(np.float64) - sims.max(axis=1, keepdims=True)) / temperature)
    scores = np.zeros((sims.shape[0], classes))
    np.add.at(scores, (np.arange(sims.shape[0])[:, None], neighbor_labels), w)
    return scores.argmax(axis=1)


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--n", type=click.IntRange(min=2), default=20000, help="Gallery size = query count.")
@click.option("--dim", type=click.IntRange(min=1), default=512, help="Feature dimension.")
@click.option("--k", type=click.IntRange(min=1), default=20, help="Neighbours.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, help="Vote temperature.")
@click.option("--classes", type=click.IntRange(min=2), default=100, help="Classes (one Gaussian centre each).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--repeat", type=click.IntRange(min=1), default=3,
              help="Interleaved repeats; the best time of each side is used.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for both sides (torch intra-op and the BLAS/OpenMP pools scikit-learn uses)  [default: "
                   "the libraries' defaults]")
def main(**options) -> None:
    """kNN evaluation, common.eval.knn_classify against scikit-learn brute force."""
    args = SimpleNamespace(**options)
    if args.k > args.n:  # scikit-learn's kneighbors would stop with a traceback
        raise ViewsslError(f"--k {args.k}: more neighbours than the {args.n} gallery vectors of --n")
    limits = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(limits=args.threads)
    with limits:
        _run(args)


def _run(args) -> None:

    from sklearn import __version__ as sk_version
    from sklearn.neighbors import NearestNeighbors

    from common.eval.knn import fast_bf16_matmul, knn_classify, knn_search

    train, train_labels = make_features(args.n, args.dim, args.classes, args.seed, 1)
    query, query_labels = make_features(args.n, args.dim, args.classes, args.seed, 2)
    print(f"kNN benchmark: {args.n} gallery x {args.n} queries, {args.dim}-d float32, k={args.k}, T={args.temperature},"
          f" {args.classes} classes")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), scikit-learn {sk_version}; bf16 coarse pass:"
          f" {'yes (AMX)' if fast_bf16_matmul(torch.device('cpu')) else 'no (float32)'}; load average"
          f" {' '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'}")

    t_train, t_query = torch.from_numpy(train), torch.from_numpy(query)
    t_labels = torch.from_numpy(train_labels)
    knn_classify(t_train[:512], t_labels[:512], t_query[:64], k=args.k, temperature=args.temperature)  # warm-up

    def run_ours():
        return knn_classify(t_train, t_labels, t_query, k=args.k, temperature=args.temperature,
                            num_classes=args.classes).numpy()

    def run_sklearn():
        nn = NearestNeighbors(n_neighbors=args.k, metric="cosine", algorithm="brute").fit(train)
        dist, idx = nn.kneighbors(query)
        return numpy_vote(1.0 - dist, train_labels[idx], args.classes, args.temperature), idx

    # Memory in a pass of its own, untimed: tracemalloc slows NumPy's and scikit-learn's allocations, not torch's.
    with PeakMemory() as mem_ours:
        ours = run_ours()
    with PeakMemory() as mem_sk:
        sk_pred, sk_idx = run_sklearn()
    # Interleaved repeats: on a shared machine the other processes come and go, so each side's best (minimum) time
    # is the comparable figure.
    times_ours, times_sk = [], []
    for rep in range(args.repeat):
        t0 = time.perf_counter()
        run_ours()
        times_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_sklearn()
        times_sk.append(time.perf_counter() - t0)
    t_ours, t_sk = min(times_ours), min(times_sk)

    # Agreement (not timed).
    res = knn_search(t_train, t_query, args.k)
    our_idx = res.indices.numpy()
    same_pred = ours == sk_pred
    same_lists = np.all(np.sort(our_idx, 1) == np.sort(sk_idx, 1), axis=1)
    same_order = np.all(our_idx == sk_idx, axis=1)
    fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    print(f"ours (common.eval.knn_classify): best {t_ours:6.2f} s  (runs: {fmt(times_ours)})   peak"
          f" +{mem_ours.peak_mib:.0f} MiB RSS (tracemalloc {mem_ours.traced_mib:.0f} MiB)")
    print(f"scikit-learn brute + vote:       best {t_sk:6.2f} s  (runs: {fmt(times_sk)})   peak"
          f" +{mem_sk.peak_mib:.0f} MiB RSS (tracemalloc {mem_sk.traced_mib:.0f} MiB)")
    print(f"speed ratio (best vs best): {t_sk / t_ours:.1f}x;  median vs median:"
          f" {float(np.median(times_sk)) / float(np.median(times_ours)):.1f}x")
    print(f"predictions identical: {bool(same_pred.all())} ({int((~same_pred).sum())} of {args.n} differ);"
          f" neighbour sets identical for {same_lists.mean():.4%} of queries, same order for {same_order.mean():.4%}")
    if not same_lists.all():
        # Which side holds the true top k? Recompute the disputed similarities in float64.
        tn = train.astype(np.float64) / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
        wins = {"ours": 0, "sklearn": 0, "tie": 0}
        for i in np.nonzero(~same_lists)[0]:
            qn = query[i].astype(np.float64) / np.linalg.norm(query[i].astype(np.float64))
            s_ours, s_sk = np.sort(tn[our_idx[i]] @ qn).sum(), np.sort(tn[sk_idx[i]] @ qn).sum()
            wins["ours" if s_ours > s_sk + 1e-12 else "sklearn" if s_sk > s_ours + 1e-12 else "tie"] += 1
        print(f"  differing neighbour sets, float64 sum of the k similarities larger for: {wins}")
    acc = (ours == query_labels).mean()
    print(f"kNN top-1 accuracy on the clustered data: {acc:.4f}")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes slow both sides)")


if __name__ == "__main__":
    main()
