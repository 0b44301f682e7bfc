"""Linear probe, relative-pose probe, pair sampling, layer taps and compression."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import ViewsslError
from common.eval import Compressor, LayerTaps, extract_taps, linear_probe, pool_feature_map, relative_pose_probe
from common.eval.probes import relative_rotation, same_group_pairs
from common.geometry import angles_to_matrix, geodesic_distance


def test_linear_probe_separable_and_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 12, generator=g) * 4
    yt, yq = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (80,), generator=g)
    xt = centres[yt] + torch.randn(200, 12, generator=g)
    xq = centres[yq] + torch.randn(80, 12, generator=g)
    a = linear_probe(xt, yt, xq, yq)
    assert a["top1"] == 1.0 and a["train_top1"] == 1.0
    # deterministic where it shows: overlapping classes, so the scores sit between chance and 1
    xt, xq = centres[yt] / 4 + torch.randn(200, 12, generator=g), centres[yq] / 4 + torch.randn(80, 12, generator=g)
    a, b = linear_probe(xt, yt, xq, yq), linear_probe(xt, yt, xq, yq)
    assert a == b and 0.3 < a["top1"] < 1.0 and a["train_top1"] < 1.0


def test_same_group_pairs():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, -1, 3, 3, 3, 3])
    i, j = same_group_pairs(groups, 2000, torch.Generator().manual_seed(1))
    assert (groups[i] == groups[j]).all() and (i != j).all()
    assert (groups[i] >= 0).all()
    assert not ((i == 5) | (j == 5)).any()  # group 2 has one member
    # Every ordered pair of group 3 appears.
    pairs = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if groups[a] == 3}
    assert len(pairs) == 12


def test_relative_rotation_known():
    z = torch.tensor(0.0, dtype=torch.float64)
    r1 = angles_to_matrix(torch.tensor(math.radians(10), dtype=torch.float64), z, z)
    r2 = angles_to_matrix(torch.tensor(math.radians(40), dtype=torch.float64), z, z)
    rel = relative_rotation(r1, r2)
    assert math.degrees(float(geodesic_distance(rel, torch.eye(3, dtype=torch.float64)))) == pytest.approx(30.0)
    torch.testing.assert_close(rel @ r1, r2)
    # rotations about different axes do not commute, so R_j R_i^T is told apart from R_i^T R_j
    from scipy.spatial.transform import Rotation

    ri, rj = Rotation.random(2, random_state=7)
    rel = relative_rotation(torch.tensor(ri.as_matrix()), torch.tensor(rj.as_matrix()))
    torch.testing.assert_close(rel, torch.tensor((rj * ri.inv()).as_matrix()))
    assert not torch.allclose(rel, torch.tensor((ri.inv() * rj).as_matrix()), atol=1e-3)


def _pose_dataset(n_inst, n_views, seed):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(n_inst * n_views, 3, generator=g, dtype=torch.float64) * torch.tensor([6.28, 1.6, 1.0]) \
        - torch.tensor([3.14, 0.8, 0.5])
    rot = angles_to_matrix(*angles.unbind(-1))
    groups = torch.arange(n_inst).repeat_interleave(n_views)
    return rot, groups


def test_relative_pose_probe_learns_from_rotation_features():
    rot_tr, g_tr = _pose_dataset(30, 8, 0)
    rot_te, g_te = _pose_dataset(10, 8, 1)
    good = relative_pose_probe(rot_tr.reshape(-1, 9).float(), rot_tr, g_tr, rot_te.reshape(-1, 9).float(), rot_te,
                               g_te, steps=300, hidden=128, test_pairs=500, seed=0)
    noise = relative_pose_probe(torch.randn(240, 9), rot_tr, g_tr, torch.randn(80, 9), rot_te, g_te, steps=300,
                                hidden=128, test_pairs=500, seed=0)
    assert set(good) >= {"median_geodesic", "mean_geodesic", "acc_30", "train_median_geodesic"}
    assert good["median_geodesic"] < 0.6 * noise["median_geodesic"]
    assert good["acc_30"] > noise["acc_30"]
    runs = [relative_pose_probe(rot_tr.reshape(-1, 9).float(), rot_tr, g_tr, rot_te.reshape(-1, 9).float(), rot_te,
                                g_te, steps=20, hidden=16, test_pairs=50, seed=5) for _ in range(2)]
    assert runs[0] == runs[1]  # seeded


def test_probes_leave_the_global_rng_alone():
    rot, g = _pose_dataset(5, 4, 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    relative_pose_probe(rot.reshape(-1, 9).float(), rot, g, rot.reshape(-1, 9).float(), rot, g, steps=3, hidden=8,
                        test_pairs=10)
    assert torch.equal(before, torch.get_rng_state())


def test_pooling():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(pool_feature_map(x, "avg"), x.mean((2, 3)))
    pn = pool_feature_map(x, "patch_norm")
    assert pn.shape == (2, 60)
    manual = x.reshape(2, 3, 20) / x.reshape(2, 3, 20).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pn, manual.reshape(2, 60))
    # grid2 on a 4 x 5 map: rows 0-1 | 2-3, columns 0-2 | 2-4 (adaptive bins overlap on an odd width)
    cells = [x[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in ((0, 2), (2, 4)) for c0, c1 in ((0, 3), (2, 5))]
    torch.testing.assert_close(pool_feature_map(x, "grid2"), torch.stack(cells, -1).reshape(2, 12))
    assert torch.equal(pool_feature_map(x, "flatten"), x.reshape(2, 60))
    flat = torch.randn(2, 7)
    assert torch.equal(pool_feature_map(flat, "patch_norm"), flat)  # (B, D) passes through
    tokens = torch.randn(2, 6, 5)  # (B, N, C) transformer tokens
    torch.testing.assert_close(pool_feature_map(tokens, "avg"), tokens.mean(1))
    assert torch.equal(pool_feature_map(tokens, "flatten"), tokens.reshape(2, 30))


def test_layer_taps():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )
    x = torch.randn(2, 3, 8, 8)
    out = extract_taps(net, x, ["0", "2", "4"], pooling={"2": "patch_norm"})
    assert out["0"].shape == (2, 4) and out["2"].shape == (2, 6 * 16) and out["4"].shape == (2, 6)
    with torch.no_grad():
        h0 = net[0](x)
        h2 = net[2](net[1](h0))
    torch.testing.assert_close(out["0"], h0.mean((2, 3)))  # default pooling: average
    torch.testing.assert_close(out["2"], (h2.flatten(2) / h2.flatten(2).norm(dim=-1, keepdim=True)).flatten(1))
    torch.testing.assert_close(out["4"], net(x))
    assert not net[0]._forward_hooks  # hooks removed
    with pytest.raises(ViewsslError, match="no layer named 'layer9'"):
        LayerTaps(net, ["layer9"])


def test_compressor_pca_against_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 30)) @ rng.standard_normal((30, 30))
    comp = Compressor("pca", 5).fit(torch.from_numpy(x))
    z = comp.transform(torch.from_numpy(x)).numpy()
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:5].T
    np.testing.assert_allclose(np.abs(z), np.abs(ref), rtol=1e-6, atol=1e-8)  # equal up to the sign of each axis
    # Deterministic sign convention and narrow inputs pass through.
    z2 = Compressor("pca", 5).fit(torch.from_numpy(x)).transform(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(z, z2)
    assert Compressor("pca", 64).fit(torch.from_numpy(x)).transform(torch.from_numpy(x)).shape == (200, 30)


def test_compressor_random_projection_seeded():
    x = torch.randn(50, 40)
    a = Compressor("random", 8, seed=3).fit(x).transform(x)
    b = Compressor("random", 8, seed=3).fit(torch.randn(5, 40)).transform(x)  # data-independent
    c = Compressor("random", 8, seed=4).fit(x).transform(x)
    assert a.shape == (50, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_readout_ridge_against_sklearn_and_exact_on_linear_features():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    from common.eval.readout import angles_to_targets, fit_ridge, readout_angles

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, 6, generator=g, dtype=torch.float64)
    for alpha, width in ((0.1, 8), (1.0, 80)):  # primal and dual (features wider than the samples) forms
        xw = torch.cat([x] * (width // 8), 1) + 0.01 * torch.randn(50, width, generator=g, dtype=torch.float64)
        mean, std, w, b = fit_ridge(xw, y, alpha)
        z = ((xw - mean) / std).numpy()
        ref = sklearn_linear.Ridge(alpha=alpha * 50).fit(z, y.numpy())
        np.testing.assert_allclose(w.numpy(), ref.coef_.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.numpy(), ref.intercept_, rtol=1e-6, atol=1e-9)
    # features that hold (cos, sin) of the angles linearly: the readout recovers the angles
    angles = (torch.rand(200, 3, generator=g, dtype=torch.float64) - 0.5) * 2.0
    feats = angles_to_targets(angles) @ torch.randn(6, 16, generator=g, dtype=torch.float64)
    pred, alpha = readout_angles(feats[:150].float(), angles[:150], feats[150:].float())
    assert alpha == 1e-3 and (pred.double() - angles[150:]).abs().max() < 0.01


def test_linear_probe_against_sklearn_logistic_regression():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    from common.eval.probes import standardize

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 10, generator=g)
    yt, yq = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (200,), generator=g)
    xt = centres[yt] + 1.5 * torch.randn(300, 10, generator=g)  # overlapping classes: not separable
    xq = centres[yq] + 1.5 * torch.randn(200, 10, generator=g)
    wd = 1e-2
    ours = linear_probe(xt, yt, xq, yq, weight_decay=wd, max_iter=500)
    zt, zq = (z.double().numpy() for z in standardize(xt.double(), xq.double()))
    # mean cross-entropy + wd |W|^2  ==  (sum cross-entropy + |W|^2 / (2C)) / n  with  C = 1 / (2 n wd)
    ref = sklearn_linear.LogisticRegression(C=1 / (2 * 300 * wd), max_iter=5000, tol=1e-10).fit(zt, yt.numpy())
    assert ours["top1"] == pytest.approx(ref.score(zq, yq.numpy()), abs=1 / 200)  # at most one test item apart
    assert ours["train_top1"] == pytest.approx(ref.score(zt, yt.numpy()), abs=1 / 300)
    assert 0.4 < ours["top1"] < 0.95
