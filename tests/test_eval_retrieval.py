"""R@k and SiamPose re-identification against brute force and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.eval import recall_at_k, reid_metrics
from common.eval.retrieval import average_precision_rows, pool_sequences

sklearn = pytest.importorskip("sklearn")
from sklearn.metrics import auc, average_precision_score  # noqa: E402


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_at_k_against_brute_force():
    rng = np.random.default_rng(0)
    xt, xq = rng.standard_normal((300, 16)), rng.standard_normal((120, 16))
    yt, yq = rng.integers(0, 9, 300), rng.integers(0, 9, 120)
    out = recall_at_k(torch.from_numpy(xt), yt, torch.from_numpy(xq), yq)
    order = np.argsort(-(_unit(xq) @ _unit(xt).T), axis=1)
    for k in (1, 5, 10, 20):
        expected = np.mean([(yt[order[i, :k]] == yq[i]).any() for i in range(120)])
        assert out[f"r@{k}"] == expected  # exact: a fraction of 120 in float64, not float32
    assert out["r@1"] <= out["r@5"] <= out["r@10"] <= out["r@20"]


def test_recall_leave_one_out_excludes_self():
    x = torch.eye(4, dtype=torch.float64)
    y = np.array([0, 1, 2, 3])  # every label once: a query can only find itself
    ids = torch.arange(4)
    assert recall_at_k(x, y, x, y, ks=(1, 3))["r@3"] == 1.0
    assert recall_at_k(x, y, x, y, ks=(1, 3), train_groups=ids, query_groups=ids) == {"r@1": 0.0, "r@3": 0.0}


def test_recall_over_labelled_queries_only():
    x = torch.eye(4, dtype=torch.float64)
    y_train, y_query = np.array([0, 1, 2, 3]), np.array([0, 1, -1, -1])  # two queries without a label
    assert recall_at_k(x, y_train, x, y_query, ks=(1,)) == {"r@1": 1.0}
    assert math.isnan(recall_at_k(x, y_train, x[:1], np.array([-1]), ks=(1,))["r@1"])


def _siampose_reference(x, seq, frames):
    """Per query, self excluded: top-1 same sequence, sklearn AP, SiamPose's auc(r@k, p@k), jitter."""
    s = _unit(x) @ _unit(x).T
    n = len(x)
    top1, aps, aucs, jit = [], [], [], []
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        rel = (seq[others] == seq[i]).astype(int)
        if rel.sum() == 0:
            continue
        scores = s[i, others]
        aps.append(average_precision_score(rel, scores))
        order = np.argsort(-scores, kind="stable")
        r = rel[order]
        hits = np.cumsum(r)
        aucs.append(auc(hits / r.sum(), hits / np.arange(1, len(r) + 1)))
        top1.append(r[0])
        if r[0] and frames[i] >= 0 and frames[others[order[0]]] >= 0:  # -1: unknown frame number
            jit.append(abs(frames[others[order[0]]] - frames[i]))
    return np.mean(top1), np.mean(aps), np.mean(aucs), np.mean(jit)


def test_reid_against_sklearn():
    rng = np.random.default_rng(1)
    seq = np.repeat(np.arange(8), 12)
    frames = np.tile(np.arange(12), 8)
    centres = rng.standard_normal((8, 10))
    x = centres[seq] + 0.9 * rng.standard_normal((96, 10)) + 0.05 * frames[:, None]
    seq = seq.copy()
    seq[-1] = 99  # a sequence with a single frame: skipped
    out = reid_metrics(torch.from_numpy(x), seq, frames)
    t1, ap, au, jit = _siampose_reference(x, seq, frames)
    assert out["top1"] == pytest.approx(t1)
    assert out["map"] == pytest.approx(ap, rel=1e-9)
    assert out["auc"] == pytest.approx(au, rel=1e-9)
    assert out["jitter"] == pytest.approx(jit)
    assert out["n_queries"] == 95
    # Frames numbered -1 (blank cells) are left out of the jitter, and only of it.
    unknown = frames.copy()
    unknown[::5] = -1
    blank = reid_metrics(torch.from_numpy(x), seq, unknown)
    assert blank["jitter"] == pytest.approx(_siampose_reference(x, seq, unknown)[3])
    assert blank["jitter"] != pytest.approx(out["jitter"]) and blank["top1"] == out["top1"]
    # Chunking does not change anything.
    small = reid_metrics(torch.from_numpy(x), seq, frames, memory_budget=3000)
    for k in out:
        assert small[k] == pytest.approx(out[k], rel=1e-12)


def test_reid_ties_and_blank_sequences_as_sklearn():
    # a collapsed encoder (every frame the same feature): chance, whatever the storage order, as sklearn's AP
    seq = np.repeat(np.arange(4), 5)
    frames = np.tile(np.arange(5), 4)
    x = np.ones((20, 6))
    out = reid_metrics(torch.from_numpy(x), seq, frames)
    _, ap, _, _ = _siampose_reference(x, seq, frames)
    assert out["map"] == pytest.approx(ap, rel=1e-12) and ap == pytest.approx(4 / 19)
    # partial ties (two feature values) against sklearn too
    x2 = np.stack([np.ones(20), (np.arange(20) % 3 == 0).astype(float)], 1)
    out2 = reid_metrics(torch.from_numpy(x2), seq, frames)
    assert out2["map"] == pytest.approx(_siampose_reference(x2, seq, frames)[1], rel=1e-12)
    # frames without a sequence (-1) are not members of sequence 0: its single frame has no positive
    out3 = reid_metrics(torch.randn(5, 3, dtype=torch.float64), [0, 1, 1, -1, -1])
    assert out3["n_queries"] == 2


def test_average_precision_rows_known():
    rel = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    ap, area = average_precision_rows(rel)
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == pytest.approx(0.25)
    assert area[1] == pytest.approx(0.125)  # one trapezoid: recall 0 -> 1, precision 0 -> 1/4


def test_reid_figures_do_not_move_with_the_memory_budget():
    """Tied features (rounded): the chunk height changes the float64 rounding of the similarities, which must not
    split or merge the tie blocks of the AP."""
    rng = np.random.default_rng(0)
    n = 300
    seq = rng.integers(0, 20, n)
    frames = rng.integers(0, 50, n)
    feats = rng.normal(size=(n, 16))
    feats[:, 0] += seq * 0.3
    feats = torch.from_numpy(np.round(feats))
    whole = reid_metrics(feats, seq, frames)
    for rows in (50, 7, 1):
        assert reid_metrics(feats, seq, frames, memory_budget=rows * n * 32) == whole, rows


def test_reid_on_one_frame_scores_nothing():
    out = reid_metrics(torch.randn(1, 4), [0], frames=[3])
    assert out["n_queries"] == 0 and math.isnan(out["map"]) and math.isnan(out["jitter"])


def test_pool_sequences_is_the_renormalised_mean_of_unit_frame_features():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 5)) * rng.uniform(0.1, 10, (11, 1))  # frames of very different norms
    ids = np.array([2, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1])
    pooled = pool_sequences(torch.from_numpy(x), ids, 3).numpy()
    for s in range(3):
        mean = _unit(x[ids == s]).mean(0)
        np.testing.assert_allclose(pooled[s], mean / np.linalg.norm(mean), atol=1e-12)
    with pytest.raises(ValueError, match="has no frames"):
        pool_sequences(torch.from_numpy(x), ids, 4)
    with pytest.raises(ValueError, match="one id"):
        pool_sequences(torch.from_numpy(x), ids[:-1], 3)
