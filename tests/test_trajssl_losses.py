"""Losses of the Siamese family against their formulas, on hand-made inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from trajssl.losses import info_nce_loss, simsiam_loss, trajectory_loss, vicreg_loss, vicreg_terms
from trajssl.trajectory_loss import trajectory_cosine


def _arc(angles, dim=5, seed=0):
    """Unit vectors at the given angles along one great circle of S^(dim-1), randomly oriented."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.cos(a)[:, None] * q[:, 0] + torch.sin(a)[:, None] * q[:, 1]


# --- trajectory ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0.05, 0.3, 1.0])
def test_trajectory_straight_geodesic_is_minus_one(step):
    z = _arc([-step, 0.0, step])
    loss = trajectory_loss(z[0:1] * 3.0, z[1:2] * 0.5, z[2:3] * 7.0)  # scale-free: inputs are normalised inside
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)


def test_trajectory_unequal_steps_along_geodesic_still_straight():
    z = _arc([-0.1, 0.0, 0.6])
    assert trajectory_loss(z[0:1], z[1:2], z[2:3]).item() == pytest.approx(-1.0, abs=1e-5)


def test_trajectory_folded_is_plus_one():
    z = _arc([-0.4, 0.0])
    assert trajectory_loss(z[0:1], z[1:2], z[0:1]).item() == pytest.approx(1.0, abs=1e-5)


def test_trajectory_right_angle_turn_is_zero():
    # z_c = e0; left comes along e1, right leaves along e2: orthogonal tangent steps.
    e = torch.eye(4, dtype=torch.float64)
    a = 0.3
    z_l = math.cos(a) * e[0] - math.sin(a) * e[1]
    z_r = math.cos(a) * e[0] + math.sin(a) * e[2]
    assert trajectory_loss(z_l[None], e[0][None], z_r[None]).item() == pytest.approx(0.0, abs=1e-6)


def test_trajectory_matches_direct_formula_on_random_batch():
    g = torch.Generator().manual_seed(1)
    zl, zc, zr = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(3))
    expected = []
    for a, b, c in zip(zl, zc, zr):
        a, b, c = a / a.norm(), b / b.norm(), c / c.norm()
        u1 = (b - a) - torch.dot(b - a, b) * b
        u2 = (c - b) - torch.dot(c - b, b) * b
        expected.append(torch.dot(u1, u2) / (u1.norm() * u2.norm()))
    assert trajectory_loss(zl, zc, zr).item() == pytest.approx(-torch.stack(expected).mean().item(), abs=1e-6)


def test_trajectory_accepts_feature_maps():
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(3, 4, 2, 2, generator=g) for _ in range(3)]
    a = trajectory_loss(*maps)
    b = trajectory_loss(*(m.flatten(1) for m in maps))
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


@pytest.mark.parametrize("case", ["left_equals_centre", "all_identical", "zero_vectors", "right_equals_centre"])
def test_trajectory_degenerate_inputs_have_finite_value_and_gradient(case):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, generator=g)
    other = torch.randn(4, 8, generator=g)
    if case == "left_equals_centre":
        zl, zc, zr = base.clone(), base.clone(), other.clone()
    elif case == "right_equals_centre":
        zl, zc, zr = other.clone(), base.clone(), base.clone()
    elif case == "all_identical":
        zl, zc, zr = base.clone(), base.clone(), base.clone()
    else:
        zl, zc, zr = torch.zeros(4, 8), torch.zeros(4, 8), other.clone()
    for t in (zl, zc, zr):
        t.requires_grad_(True)
    loss = trajectory_loss(zl, zc, zr)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # degenerate triplets count as cos = 0
    for t in (zl, zc, zr):
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().max() < 1e3


@pytest.mark.parametrize("step", [5e-4, 2e-3, 1e-2, 1e-1])
def test_trajectory_nearly_identical_views_bounded_gradient(step):
    # the left view a short step from the centre (consecutive video frames), at 60 deg from the path to the right:
    # cos = 0.5 and the gradient grows as 1 / step, down to eps = 1e-3, below which the triplet counts as degenerate
    g = torch.Generator().manual_seed(5)
    zc = F.normalize(torch.randn(1, 512, generator=g), dim=1)
    d, e = torch.randn(2, 512, generator=g)
    d = F.normalize(d - (d * zc).sum() * zc, dim=1)  # two orthonormal tangent directions at z_c
    e = F.normalize(e - (e * zc).sum() * zc - (e * d).sum() * d, dim=1)
    zl = (zc - step * (0.5 * d + math.sqrt(0.75) * e)).requires_grad_(True)
    loss = trajectory_loss(zl, zc, zc + 0.3 * d)
    loss.backward()
    if step < 1e-3:
        assert loss.item() == 0.0 and zl.grad.abs().max() == 0.0
    else:
        assert loss.item() == pytest.approx(-0.5, abs=1e-3)
        assert 0.5 / step < zl.grad.norm() < 1.0 / step  # sin(60 deg) / step


def test_trajectory_mixed_batch_ignores_only_degenerate_rows():
    z = _arc([-0.2, 0.0, 0.2]).float()
    zl = torch.stack([z[0], z[1]])  # second row: z_l == z_c (degenerate)
    zc = torch.stack([z[1], z[1]])
    zr = torch.stack([z[2], z[2]])
    cos = trajectory_cosine(zl, zc, zr)
    assert cos.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def test_trajectory_loss_falls_under_gradient_steps():
    g = torch.Generator().manual_seed(4)
    zl, zc, zr = (torch.randn(8, 16, generator=g).requires_grad_() for _ in range(3))
    opt = torch.optim.SGD([zl, zc, zr], lr=2.0)
    first = trajectory_loss(zl, zc, zr).item()
    for _ in range(30):
        opt.zero_grad()
        loss = trajectory_loss(zl, zc, zr)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


# --- InfoNCE ---------------------------------------------------------------------------------------------------
def _info_nce_direct(z1, z2, t):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = [torch.dot(z[i], z[k]) / t for k in range(n2) if k != i]
        total = total - (torch.dot(z[i], z[pos]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


def test_info_nce_matches_direct_computation():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5):
        assert info_nce_loss(z1, z2, t).item() == pytest.approx(_info_nce_direct(z1, z2, t).item(), rel=1e-5)


def test_info_nce_perfect_pairs_beat_random():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(8, 16, generator=g)
    assert info_nce_loss(z, z, 0.1) < info_nce_loss(z, torch.randn(8, 16, generator=g), 0.1)


# --- VICReg ----------------------------------------------------------------------------------------------------
def _vicreg_official(x, y, sim=25.0, std_c=25.0, cov_c=1.0):
    """The official facebookresearch/vicreg formula, written out term by term (float64)."""
    n, d = x.shape
    repr_loss = ((x - y) ** 2).mean()
    x = x - x.mean(0)
    y = y - y.mean(0)
    std_x = torch.sqrt(x.var(0) + 0.0001)
    std_y = torch.sqrt(y.var(0) + 0.0001)
    std_loss = torch.mean(torch.relu(1 - std_x)) / 2 + torch.mean(torch.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return repr_loss, std_loss, cov_loss, sim * repr_loss + std_c * std_loss + cov_c * cov_loss


def test_vicreg_terms_match_official_formula():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64) * 0.7
    y = x + 0.3 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    inv, var, cov, total = _vicreg_official(x, y)
    t = vicreg_terms(x, y)
    assert t["invariance"].item() == pytest.approx(inv.item(), rel=1e-5)
    assert t["variance"].item() == pytest.approx(var.item(), rel=1e-5)
    assert t["covariance"].item() == pytest.approx(cov.item(), rel=1e-5)
    assert vicreg_loss(x, y).item() == pytest.approx(total.item(), rel=1e-5)
    assert vicreg_loss(x, y, 1.0, 2.0, 3.0).item() == pytest.approx(_vicreg_official(x, y, 1.0, 2.0, 3.0)[3].item(),
                                                                    rel=1e-5)


def test_vicreg_terms_on_hand_made_inputs():
    # Identical views: invariance 0. Constant embeddings: variance hinge = 1 - sqrt(1e-4) = 0.99, covariance 0.
    z = torch.ones(4, 3)
    t = vicreg_terms(z, z)
    assert t["invariance"].item() == 0.0
    assert t["variance"].item() == pytest.approx(0.99, abs=1e-6)
    assert t["covariance"].item() == 0.0
    # Two perfectly correlated dims with variance 4 (std 2 > 1): no variance penalty; cov = 4 per off-diagonal
    # entry -> (2 * 16) / 2 per branch, two branches.
    a = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [-2.0, -2.0], [2.0, 2.0]]) * math.sqrt(3) / 2
    t = vicreg_terms(a, a)
    assert t["variance"].item() == 0.0
    var = (a[:, 0] - a[:, 0].mean()).pow(2).sum() / 3
    assert t["covariance"].item() == pytest.approx(2 * (2 * var.item() ** 2) / 2, rel=1e-6)


def test_vicreg_symmetric_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert vicreg_loss(x, y).item() == pytest.approx(vicreg_loss(y, x).item(), rel=1e-6)
    with pytest.raises(ValueError):
        vicreg_loss(x[:1], y[:1])
    with pytest.raises(ValueError):
        vicreg_loss(x, y[:, :3])


# --- SimSiam ---------------------------------------------------------------------------------------------------
def test_simsiam_formula_and_stop_gradient():
    g = torch.Generator().manual_seed(9)
    p1, p2, z1, z2 = (torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    expected = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and torch.isfinite(p1.grad).all()
    assert simsiam_loss(z2, z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


# --- all losses: optimisable, finite at degenerate inputs -------------------------------------------------------
LOSSES = {
    "info_nce": lambda a, b: info_nce_loss(a, b, 0.2),
    "vicreg": vicreg_loss,
    "simsiam": lambda a, b: simsiam_loss(a, b, b.detach() + 0.1, a.detach() - 0.1),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_fall_under_gradient_steps(name):
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(16, 8, generator=g).requires_grad_(), torch.randn(16, 8, generator=g).requires_grad_()
    opt = torch.optim.SGD([a, b], lr=0.05)
    first = LOSSES[name](a, b).item()
    for _ in range(20):
        opt.zero_grad()
        loss = LOSSES[name](a, b)
        loss.backward()
        opt.step()
    assert loss.item() < first


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_finite_gradients_on_identical_or_constant_inputs(name):
    for z in (torch.ones(6, 5), torch.zeros(6, 5)):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss = LOSSES[name](a, b)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# --- gradients: values can be right while a term is detached -------------------------------------------------------
def _leaf(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def test_trajectory_and_vicreg_gradients_match_finite_differences():
    """A z_C detached in the tangent projection, a detached norm, a detached invariance target or variance term
    all keep the values above and fail here (torch.autograd.gradcheck, float64; VICReg's inputs small enough for
    its variance hinge to act)."""
    from torch.autograd import gradcheck

    assert gradcheck(trajectory_loss, (_leaf(4, 6, seed=7), _leaf(4, 6, seed=8), _leaf(4, 6, seed=9)))
    assert gradcheck(lambda x, y: vicreg_loss(x, y, 1.0, 2.0, 3.0), (_leaf(6, 4, seed=12, scale=0.3),
                                                                     _leaf(6, 4, seed=13, scale=0.3)))


def test_info_nce_gradient_matches_the_direct_computation():
    z1, z2 = _leaf(4, 5, seed=10), _leaf(4, 5, seed=11)
    got = torch.autograd.grad(info_nce_loss(z1, z2, 0.3), (z1, z2))
    want = torch.autograd.grad(_info_nce_direct(z1, z2, 0.3), (z1, z2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_trajectory_short_right_step_is_degenerate_too():
    """The right view within eps of the centre: the triplet counts as degenerate (as the left one, tested above)."""
    g = torch.Generator().manual_seed(1)
    zc = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    zl = (zc + 0.3 * F.normalize(torch.randn(1, 64, generator=g), dim=1)).requires_grad_(True)
    zr = (zc + 5e-4 * F.normalize(torch.randn(1, 64, generator=g), dim=1)).requires_grad_(True)
    loss = trajectory_loss(zl, zc, zr)
    loss.backward()
    assert loss.item() == 0.0 and zr.grad.abs().max() == 0.0


def test_half_precision_inputs_are_reduced_in_float32():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 128, generator=g).bfloat16()
    z2 = (z1.float() + 0.3 * torch.randn(64, 128, generator=g)).bfloat16()
    got = info_nce_loss(z1, z2, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(info_nce_loss(z1.double(), z2.double(), 0.1).item(), rel=1e-4)
    assert trajectory_loss(z1[:4], z2[:4], z1[4:8]).dtype == torch.float32
