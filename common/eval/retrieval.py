"""Retrieval and re-identification on frozen features (cosine similarity).

- :func:`recall_at_k`: the standard video-retrieval R@k (VCOP / Luo et al.): a query succeeds at k when at least one
  of its k nearest gallery items shares its label. Gallery = training split, queries = test split (or the set against
  itself with self / same-group matches excluded).
- :func:`pool_sequences`: one feature per video for that R@k at video level (the standard UCF101 protocol): the mean
  of a sequence's L2-normalised frame features, L2-normalised again.
- :func:`reid_metrics`: SiamPose's sequence re-identification (``siampose/other_metrics.py``), within one set, the
  query itself excluded from its ranking:
  ``top1`` = the nearest other frame comes from the same sequence;
  ``map`` = mean over queries of the average precision of same-sequence retrieval over the full ranking
  (``sklearn.metrics.average_precision_score`` per query);
  ``auc`` = SiamPose's figure, the trapezoidal area under the (recall@k, precision@k) points of the full ranking
  (``sklearn.metrics.auc``), which the SiamPose notebooks call "mAP";
  ``jitter`` = mean |frame difference| to the nearest frame, over queries whose nearest frame is from their sequence
  (frames numbered -1, unknown, left out).
  Two deliberate differences from SiamPose's code: the query is removed from its ranking (SiamPose zeroes its
  similarity, so it stays in the ranking and in the positive count), and queries alone in their sequence are skipped.

Everything is chunked over queries so the (chunk x gallery) similarity block stays under a memory budget.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .knn import knn_search

__all__ = ["recall_at_k", "pool_sequences", "reid_metrics", "average_precision_rows"]


def _wide(device: torch.device) -> torch.dtype:
    """float64 for exact figures, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def recall_at_k(
    train_features: torch.Tensor,
    train_labels,
    query_features: torch.Tensor,
    query_labels,
    ks: Sequence[int] = (1, 5, 10, 20),
    *,
    train_groups=None,
    query_groups=None,
) -> dict[str, float]:
    """``{"r@1": ..., "r@5": ...}``: share of queries with a same-label item among their k nearest neighbours
    (over the labelled queries: label -1 = none, as in the kNN classification). Exact ties in similarity are broken
    by :func:`~common.eval.knn.knn_search`'s order, not at random: for a collapsed encoder (constant features) R@k
    depends on the order of the gallery rows, so read such a model's R@k with its ``std_z`` near 0."""
    device = query_features.device
    kmax = max(ks)
    res = knn_search(train_features, query_features, kmax, train_groups=train_groups, query_groups=query_groups)
    tl = torch.as_tensor(train_labels, device=device).long()
    ql = torch.as_tensor(query_labels, device=device).long()
    nl = torch.where(res.indices >= 0, tl[res.indices.clamp_min(0)], torch.full_like(res.indices, -1))
    hit = (nl == ql[:, None]) & (ql[:, None] >= 0)
    first = torch.where(hit.any(1), hit.long().argmax(1), torch.full_like(ql, kmax))[ql >= 0]
    return {f"r@{k}": float((first < k).double().mean()) if first.numel() else math.nan for k in ks}


def pool_sequences(features: torch.Tensor, sequence_ids, num_sequences: int) -> torch.Tensor:
    """(N, D) frame features, (N,) sequence ids in [0, num_sequences) -> (num_sequences, D): each sequence's mean of
    L2-normalised frame features, L2-normalised again (a sequence without frames is an error)."""
    ids = torch.as_tensor(sequence_ids, device=features.device).long()
    if ids.numel() != features.shape[0] or (ids.numel() and (ids.min() < 0 or ids.max() >= num_sequences)):
        raise ValueError("pool_sequences: one id in [0, num_sequences) per frame")
    counts = torch.bincount(ids, minlength=num_sequences)
    if (counts == 0).any():
        raise ValueError("pool_sequences: a sequence has no frames")
    frames = F.normalize(features.to(_wide(features.device)), dim=1)
    sums = torch.zeros(num_sequences, features.shape[1], dtype=frames.dtype, device=features.device)
    return F.normalize(sums.index_add_(0, ids, frames), dim=1).to(features.dtype)


def average_precision_rows(relevant_sorted: torch.Tensor, scores_sorted: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of 0/1 relevance in ranked order (R, N): (average precision (R,), SiamPose trapezoidal PR-AUC (R,)).

    AP = sum_k P@k rel_k / n_pos, as ``sklearn.metrics.average_precision_score``: with the rows' scores in that
    order (``scores_sorted``, descending), a block of tied scores is one threshold, so each of its items takes the
    precision at the block's end (a collapsed encoder scores chance, whatever the storage order). AUC = trapezoid
    over the points (recall@k, precision@k), k = 1..N, as ``sklearn.metrics.auc(r_at_k, p_at_k)``.
    """
    rel = relevant_sorted.to(_wide(relevant_sorted.device))
    n_pos = rel.sum(1)
    hits = torch.cumsum(rel, 1)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=rel.dtype, device=rel.device)
    precision = hits / ranks
    at = precision
    if scores_sorted is not None and rel.shape[1] > 1:
        # block id of each position, then the last position of each block (positions increase within a block)
        new_block = torch.ones_like(scores_sorted, dtype=torch.long)
        new_block[:, 1:] = (scores_sorted[:, 1:] != scores_sorted[:, :-1]).long()
        block = torch.cumsum(new_block, 1) - 1
        pos = torch.arange(rel.shape[1], device=rel.device).expand_as(block)
        end = torch.zeros_like(block).scatter_reduce(1, block, pos, reduce="amax")
        at = precision.gather(1, end.gather(1, block))
    ap = (at * rel).sum(1) / n_pos.clamp_min(1)
    recall = hits / n_pos.clamp_min(1)[:, None]
    auc = ((recall[:, 1:] - recall[:, :-1]) * (precision[:, 1:] + precision[:, :-1]) / 2).sum(1)
    return ap, auc


def reid_metrics(
    features: torch.Tensor,
    sequences,
    frames=None,
    *,
    memory_budget: int = 128 * 2**20,
) -> dict[str, float]:
    """SiamPose's re-identification figures within one set of frames (see the module doc)."""
    device = features.device
    n = features.shape[0]
    seq = torch.as_tensor(sequences, device=device).long()
    frm = torch.as_tensor(frames, device=device).long() if frames is not None else None
    unit = F.normalize(features.to(_wide(device)), dim=1)
    counts = torch.bincount(seq[seq >= 0], minlength=int(seq.max()) + 1 if n and seq.max() >= 0 else 1)
    chunk = int(max(1, min(n, memory_budget // max(1, n * 8 * 4))))
    top1, aps, aucs, jitters = [], [], [], []
    for s in range(0, n if n >= 2 else 0, chunk):  # a single frame has nothing to retrieve
        e = min(n, s + chunk)
        # rounded to a grid of 2^-36: the matmul's last bits depend on the chunk's height, so tied similarities
        # (orthogonal features: +-1e-17 around 0) are rounded alike, and the tie blocks of the AP, and the figures, do
        # not move with the memory budget
        sims = torch.round((unit[s:e] @ unit.T) * 2.0**36) / 2.0**36
        rows = torch.arange(s, e, device=device)
        sims[torch.arange(e - s, device=device), rows] = -math.inf
        sorted_sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
        sorted_sims, order = sorted_sims[:, : n - 1], order[:, : n - 1]  # drop self (last)
        rel = seq[order] == seq[s:e, None]
        valid = (seq[s:e] >= 0) & (counts[seq[s:e].clamp_min(0)] >= 2)
        ap, auc = average_precision_rows(rel, sorted_sims)
        top1.append(rel[:, 0][valid])
        aps.append(ap[valid])
        aucs.append(auc[valid])
        if frm is not None:
            same = valid & rel[:, 0] & (frm[s:e] >= 0) & (frm[order[:, 0]] >= 0)  # frame -1: unknown
            jitters.append((frm[order[:, 0]] - frm[s:e]).abs()[same].float())
    top1_t = torch.cat(top1) if top1 else torch.zeros(0)
    out = {
        "top1": float(top1_t.double().mean()) if top1_t.numel() else math.nan,
        "map": float(torch.cat(aps).mean()) if top1_t.numel() else math.nan,
        "auc": float(torch.cat(aucs).mean()) if top1_t.numel() else math.nan,
        "n_queries": float(top1_t.numel()),
    }
    if frm is not None:
        j = torch.cat(jitters) if jitters else torch.zeros(0)
        out["jitter"] = float(j.mean()) if j.numel() else math.nan
    return out
