"""kNN search / classification against scikit-learn and a direct NumPy computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.eval import knn_classify, knn_search, weighted_vote

sklearn = pytest.importorskip("sklearn")
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors  # noqa: E402


def _data(n=600, m=250, d=48, classes=7, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    yt, yq = rng.integers(0, classes, n), rng.integers(0, classes, m)
    xt = 0.6 * centres[yt] + rng.standard_normal((n, d))
    xq = 0.6 * centres[yq] + rng.standard_normal((m, d))
    return xt.astype(dtype), yt, xq.astype(dtype), yq


def _reference(xt, xq, k, mask=None):
    """Brute-force float64 cosine top-k."""
    a = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    b = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    s = b.astype(np.float64) @ a.astype(np.float64).T
    if mask is not None:
        s[mask] = -np.inf
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def _numpy_vote(sims, labels, classes, temperature):
    scores = np.zeros((sims.shape[0], classes))
    w = np.exp(sims / temperature)
    for i in range(sims.shape[0]):
        for j in range(sims.shape[1]):
            scores[i, labels[i, j]] += w[i, j]
    return scores.argmax(1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_k1_equals_sklearn_exact_nearest_neighbour(dtype):
    xt, yt, xq, _ = _data(dtype=dtype)
    clf = KNeighborsClassifier(n_neighbors=1, algorithm="brute", metric="cosine").fit(xt, yt)
    expected = clf.predict(xq)
    ours = knn_classify(torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xq), k=1)
    assert np.array_equal(ours.numpy(), expected)


def test_neighbours_equal_sklearn_brute_force():
    xt, _, xq, _ = _data()
    _, sk_idx = NearestNeighbors(n_neighbors=20, algorithm="brute", metric="cosine").fit(xt).kneighbors(xq)
    res = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 20)
    assert np.array_equal(res.indices.numpy(), sk_idx)


@pytest.mark.parametrize("k,temperature", [(5, 0.1), (20, 0.07), (50, 1.0)])
def test_weighted_vote_matches_direct_numpy(k, temperature):
    xt, yt, xq, _ = _data(seed=1)
    ref_s, ref_i = _reference(xt, xq, k)
    expected = _numpy_vote(ref_s, yt[ref_i], 7, temperature)
    ours = knn_classify(torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xq), k=k, temperature=temperature)
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("coarse", [torch.bfloat16, torch.float32, None])
@pytest.mark.parametrize("margin", [None, 0])
def test_coarse_pass_and_certificate_fallback_stay_exact(coarse, margin):
    # margin=0 keeps only k candidates, so the certificate fails often and the fallback path runs.
    xt, _, xq, _ = _data(n=700, m=300, d=64, dtype=np.float32, seed=2)
    ref_s, ref_i = _reference(xt, xq, 10)
    res = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 10, coarse_dtype=coarse, margin=margin)
    assert np.array_equal(res.indices.numpy(), ref_i)
    np.testing.assert_allclose(res.similarities.numpy(), ref_s, atol=2e-6)


def test_near_duplicate_gallery_stays_exact():
    # Dense neighbourhoods (tiny perturbations of a few points) are where a bf16 pre-selection would go wrong.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 32))
    # Float64 features: the refine step is float64, so the answer must be the exact float64 top k even though the
    # bf16 pass cannot tell these neighbours apart (the certificate sends such rows to the exact fallback).
    xt = base[rng.integers(0, 5, 800)] + 1e-3 * rng.standard_normal((800, 32))
    xq = base[rng.integers(0, 5, 100)] + 1e-3 * rng.standard_normal((100, 32))
    ref_s, ref_i = _reference(xt, xq, 15)
    res = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 15, coarse_dtype=torch.bfloat16)
    assert np.array_equal(res.indices.numpy(), ref_i)
    np.testing.assert_allclose(res.similarities.numpy(), ref_s, atol=1e-12)


def test_chunked_equals_one_shot():
    xt, yt, xq, _ = _data(seed=4)
    one = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 20, memory_budget=1 << 40)
    small = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 20, memory_budget=40_000)  # chunks of ~8 rows
    assert torch.equal(one.indices, small.indices)
    torch.testing.assert_close(one.similarities, small.similarities, atol=1e-12, rtol=0)  # summation order only
    p1 = knn_classify(torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xq), memory_budget=1 << 40)
    p2 = knn_classify(torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xq), memory_budget=100_000)
    assert torch.equal(p1, p2)


def test_group_exclusion_matches_masked_brute_force():
    xt, _, xq, _ = _data(seed=5)
    rng = np.random.default_rng(5)
    gt, gq = rng.integers(0, 30, len(xt)), rng.integers(0, 30, len(xq))
    gt[:10] = -1  # negative groups never match
    gq[:5] = -1
    mask = (gq[:, None] == gt[None, :]) & (gq[:, None] >= 0)
    ref_s, ref_i = _reference(xt, xq, 12, mask)
    res = knn_search(torch.from_numpy(xt), torch.from_numpy(xq), 12, train_groups=torch.from_numpy(gt),
                     query_groups=torch.from_numpy(gq))
    assert np.array_equal(res.indices.numpy(), ref_i)


def test_leave_one_out_excludes_self():
    xt, yt, _, _ = _data(n=200, seed=6)
    ids = torch.arange(len(xt))
    res = knn_search(torch.from_numpy(xt), torch.from_numpy(xt), 3, train_groups=ids, query_groups=ids)
    assert not (res.indices == ids[:, None]).any()
    ref_s, ref_i = _reference(xt, xt, 3, np.eye(len(xt), dtype=bool))
    assert np.array_equal(res.indices.numpy(), ref_i)


def test_k_larger_than_gallery_and_zero_vectors():
    xt = torch.randn(5, 8, dtype=torch.float64)
    xt[2] = 0
    xq = torch.randn(3, 8, dtype=torch.float64)
    res = knn_search(xt, xq, 8)
    assert (res.indices[:, 5:] == -1).all() and torch.isinf(res.similarities[:, 5:]).all()
    assert set(res.indices[0, :5].tolist()) == set(range(5))
    # the zero vector is a neighbour of similarity 0 (not NaN), and the vote runs over the 5 that exist
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    sims = unit(xq) @ unit(xt).T
    assert sims[:, 2].eq(0).all()
    torch.testing.assert_close(res.similarities[:, :5], torch.gather(sims, 1, res.indices[:, :5]))
    labels = torch.tensor([0, 1, 1, 2, 2])
    pred = knn_classify(xt, labels, xq, k=8)
    expected = _numpy_vote(sims.numpy(), labels.expand(3, 5).numpy(), 3, 0.07)
    assert pred.tolist() == expected.tolist()


def test_vote_with_tiny_temperature_does_not_overflow():
    sims = torch.tensor([[0.9, 0.89, 0.1]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, 0]])
    scores = weighted_vote(sims, labels, 2, temperature=1e-4)
    assert torch.isfinite(scores).all() and int(scores.argmax()) == 1
    # T large: (near) majority vote.
    assert int(weighted_vote(sims, labels, 2, temperature=1e6).argmax()) == 0


def test_no_admissible_neighbour_predicts_minus_one():
    x = torch.randn(4, 6, dtype=torch.float64)
    g = torch.zeros(4, dtype=torch.long)
    pred = knn_classify(x, torch.tensor([0, 1, 0, 1]), x, k=2, train_groups=g, query_groups=g)
    assert (pred == -1).all()
    empty = knn_classify(x[:0], torch.zeros(0, dtype=torch.long), x, k=2)  # an empty gallery (was an IndexError)
    assert empty.tolist() == [-1] * 4


def test_non_finite_features_are_refused():
    """A NaN row has no cosine: it lost every comparison and pushed -1 into other queries' neighbours."""
    x = torch.randn(5, 4)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="1 gallery feature row"):
        knn_search(bad, x, k=3)
    with pytest.raises(ValueError, match="1 query feature row"):
        knn_search(x, bad.clone().fill_(float("inf"))[:1], k=3)
    from common.eval import knn_pose

    with pytest.raises(ValueError, match="knn_pose: the gallery is empty"):
        knn_pose(x[:0], torch.zeros(0), torch.zeros(0, 3, 3), x, torch.eye(3).expand(5, 3, 3))


@pytest.mark.parametrize("coarse", [torch.bfloat16, torch.float16, torch.float32])
def test_coarse_error_bound_holds_for_every_pair(coarse):
    # The certificate is only as good as this bound: |coarse similarity - exact cosine| <= E(b) for all pairs.
    from common.eval.knn import _ErrorBound, _prepare

    rng = np.random.default_rng(7)
    xt = rng.standard_normal((300, 96)) * rng.uniform(0.1, 10, (300, 1))
    xq = rng.standard_normal((200, 96)) * rng.uniform(0.1, 10, (200, 1))
    xt[:20] = xq[:20] + 1e-4 * rng.standard_normal((20, 96))  # near-identical pairs: similarities close to 1
    t, q = torch.from_numpy(xt).float(), torch.from_numpy(xq).float()
    _, t_low, t_res = _prepare(t, torch.float32, coarse, torch.device("cpu"), 300)
    _, q_low, q_res = _prepare(q, torch.float32, coarse, torch.device("cpu"), 200)
    b = (q_low @ t_low.T).double()  # the coarse product, output rounded to the coarse dtype
    a = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    c = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    exact = torch.from_numpy(c @ a.T)
    bound = _ErrorBound(t_res, 96, coarse, torch.float32, torch.device("cpu"))
    err = (b - exact).abs()
    assert (err <= bound.total(q_res, b)).all()
    if coarse != torch.float32:
        assert float(q_res.max()) > 0  # the query side's rounding is measured, not assumed away
        assert float(err.max()) > 0.05 * float(bound.total(q_res, b).max())  # and the bound is not vacuous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_floor_to_dtype(dtype):
    from common.eval.knn import _floor_to

    x = torch.tensor([0.2, -0.2, 1e-3, -1e-3, 0.0, 0.123456789, -0.987654321, -math.inf, 3.0], dtype=torch.float64)
    x = torch.cat([x, torch.randn(1000, dtype=torch.float64)])
    y = _floor_to(x, dtype)
    assert y.dtype == dtype
    assert (y.double() <= x).all()
    # ... and it is the largest such value: the next value up in that dtype exceeds x.
    finite = torch.isfinite(x)
    nxt = torch.nextafter(y.float(), torch.tensor(math.inf)).to(dtype) if dtype == torch.float32 else None
    if nxt is not None:
        assert (nxt.double()[finite] > x[finite]).all()
    else:  # 16 bits: every value of the dtype, sorted, and the largest one <= x looked up
        values = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).double()
        values = values[torch.isfinite(values)].unique()  # sorted; +0 and -0 are one value
        expected = values[torch.searchsorted(values, x[finite], right=True) - 1]
        assert torch.equal(y.double()[finite], expected)
