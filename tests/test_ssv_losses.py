"""Every SSV loss against its formula; the viewpoint encodings and their flip."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.geometry import angles_to_matrix, matrix_to_rotation_6d, wrap_angle
from ssv import losses
from ssv.viewpoint import (
    Rotation6DHead,
    SphericalHead,
    decode_spherical,
    encode_spherical,
    flip_angles,
    flip_matrix,
    flip_sign_class,
    sign_class,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_wgan_critic_loss_formula():
    real = torch.tensor([1.0, 2.0, 3.0])
    fake = torch.tensor([0.5, 1.5])
    # -E[D(real)] + E[D(fake)] + drift E[D(real)^2]: non-zero means, so a swapped sign shows
    expected = -(1 + 2 + 3) / 3 + (0.5 + 1.5) / 2 + 1e-3 * (1 + 4 + 9) / 3
    assert losses.wgan_critic_loss(real, fake, drift=1e-3).item() == pytest.approx(expected)
    assert losses.wgan_critic_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.5, -0.5]), drift=0.0).item() == 0.0
    assert losses.generator_adversarial_loss(fake).item() == pytest.approx(-1.0)
    assert losses.generator_adversarial_loss(torch.tensor([2.0, 4.0])).item() == pytest.approx(-3.0)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_gradient_penalty_exact_on_linear_critic(scale):
    gen = _gen(1)
    w = torch.randn(3, 8, 8, generator=gen)
    w = (scale * w / w.norm()).requires_grad_(True)

    def critic(x):  # D(x) = <w, x> + 7: gradient w everywhere, norm = scale
        return (x * w).flatten(1).sum(1) + 7.0

    real, fake = torch.rand(5, 3, 8, 8, generator=gen), torch.rand(5, 3, 8, 8, generator=gen)
    gp = losses.gradient_penalty(critic, real, fake, eps=torch.rand(5, generator=gen))
    assert gp.item() == pytest.approx((scale - 1.0) ** 2, rel=1e-5, abs=1e-7)
    gp.backward()  # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    expected = 2 * (scale - 1.0) * w.detach() / scale
    assert torch.allclose(w.grad, expected, atol=1e-5)


def test_gradient_penalty_interpolates_between_real_and_fake():
    seen = []

    def critic(x):
        seen.append(x.detach().clone())
        return x.flatten(1).sum(1)

    real, fake = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    losses.gradient_penalty(critic, real, fake, eps=torch.tensor([0.25, 1.0]))
    assert torch.allclose(seen[0][0], torch.full((1, 2, 2), 0.25))
    assert torch.allclose(seen[0][1], torch.ones(1, 2, 2))


def test_spherical_viewpoint_loss_formula():
    gen = _gen(2)
    B, K = 4, 3
    logp = torch.log_softmax(torch.randn(B, K, 2, generator=gen), -1)
    sign_logits = torch.randn(B, K, 4, generator=gen)
    angles = (torch.rand(B, K, generator=gen) * 2 - 1) * math.pi
    target = encode_spherical(angles)
    got = losses.spherical_viewpoint_loss(logp, sign_logits, target["ccss"], target["sign"])
    expected = 0.0
    for k in range(K):
        c2, s2 = torch.cos(angles[:, k]) ** 2, torch.sin(angles[:, k]) ** 2
        expected += (-(c2 * logp[:, k, 0] + s2 * logp[:, k, 1])).mean()
        expected += F.cross_entropy(sign_logits[:, k], target["sign"][:, k])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_encode_decode_roundtrip_and_quadrants():
    angles = torch.tensor([[0.3, 2.0, -0.4], [-2.5, -1.0, 3.0]])
    assert sign_class(torch.tensor([0.3, -0.3, 2.0, -2.0])).tolist() == [0, 1, 2, 3]
    t = encode_spherical(angles)
    assert torch.allclose(t["ccss"].sum(-1), torch.ones(2, 3))
    logits = F.one_hot(t["sign"], 4).float() * 10
    decoded = decode_spherical(t["ccss"].log(), logits)
    assert torch.allclose(wrap_angle(decoded - angles), torch.zeros(2, 3), atol=1e-5)


def test_flip_of_viewpoint():
    angles = torch.tensor([[0.3, 0.2, -0.4], [-2.5, -1.0, 3.0]])
    assert torch.allclose(flip_angles(angles), angles * torch.tensor([-1.0, 1.0, -1.0]))
    # in matrices: M R(a, e, t) M = R(-a, e, -t)
    R = angles_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    f = flip_angles(angles)
    assert torch.allclose(flip_matrix(R), angles_to_matrix(f[:, 0], f[:, 1], f[:, 2]), atol=1e-6)
    # in the spherical encoding: magnitudes unchanged, sin sign of azimuth and tilt toggled
    t, tf = encode_spherical(angles), encode_spherical(f)
    assert torch.allclose(t["ccss"], tf["ccss"], atol=1e-6)
    assert torch.equal(flip_sign_class(t["sign"]), tf["sign"])
    # the flipped pseudo-target of a prediction decodes to the flipped prediction
    out = {"logp": t["ccss"].log(), "sign": F.one_hot(t["sign"], 4).float()}
    pt = SphericalHead.pseudo_target(out, flip=True)
    dec = decode_spherical(pt["ccss"].log(), F.one_hot(pt["sign"], 4).float())
    assert torch.allclose(wrap_angle(dec - f), torch.zeros_like(f), atol=1e-5)


def test_6d_head_encoding_and_flip():
    angles = torch.tensor([[0.3, 0.2, -0.4], [-1.5, -1.0, 2.0]])
    R = angles_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    out = {"r6d": matrix_to_rotation_6d(R)}
    assert torch.allclose(Rotation6DHead.decode(out), angles, atol=1e-5)
    assert Rotation6DHead.loss(out, Rotation6DHead.encode(angles)).item() == pytest.approx(0.0, abs=1e-10)
    pt = Rotation6DHead.pseudo_target(out, flip=True)
    assert torch.allclose(pt["R"], Rotation6DHead.encode(flip_angles(angles))["R"], atol=1e-5)


def test_rotation_matrix_loss_formula():
    R1 = angles_to_matrix(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    R2 = angles_to_matrix(torch.tensor([math.pi]), torch.tensor([0.0]), torch.tensor([0.0]))
    # ||I - R_y(pi)||_F^2 = 4 + 4 = 8
    assert losses.rotation_matrix_loss(R1, R2).item() == pytest.approx(8.0, abs=1e-5)
    # the mean over the batch, not the sum: (8 + 0) / 2
    assert losses.rotation_matrix_loss(torch.cat([R1, R1]), torch.cat([R2, R1])).item() == pytest.approx(4.0, abs=1e-5)


def test_style_and_cycle_loss():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    z_hat = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert losses.style_loss(z_hat, z).item() == pytest.approx((0 + 4 + 1 + 1) / 4)
    got = losses.cycle_loss(torch.tensor(2.0), torch.tensor(3.0), 0.8, 0.5)
    assert got.item() == pytest.approx(0.8 * 2 + 0.5 * 3)


def test_style_loss_stops_the_gradient_at_the_target():
    # the target code z is a constant: only z_hat learns, d/dz_hat = 2 (z_hat - z) / numel
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    z_hat = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    losses.style_loss(z_hat, z).backward()
    assert z.grad is None
    assert torch.allclose(z_hat.grad, 2 * (z_hat - z).detach() / 4)


def test_image_consistency_loss_formula():
    gen = _gen(4)
    a = torch.randn(3, 4, 5, 5, generator=gen)
    assert losses.image_consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.image_consistency_loss(a, 3.0 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert losses.image_consistency_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    b = torch.randn(3, 4, 5, 5, generator=gen)
    cos = (a.flatten(1) * b.flatten(1)).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    assert losses.image_consistency_loss(a, b).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_view_symmetry_loss_formula_and_minimum():
    """L_sym = L_v(V(flip I), flip(sg V(I))) + ||z_f - sg z||^2; an exactly mirror-equivariant V sits at its minimum."""
    gen = _gen(5)
    B = 4
    out = {"logp": torch.log_softmax(torch.randn(B, 3, 2, generator=gen), -1),
           "sign": torch.randn(B, 3, 4, generator=gen)}
    target = SphericalHead.pseudo_target(out, flip=True)
    # prediction on the mirrored image = the mirror of the prediction (magnitudes equal, signs flipped), as logits
    mag_logits = out["logp"].clone().requires_grad_(True)
    flipped = {"logp": torch.log_softmax(mag_logits, -1), "sign": F.one_hot(target["sign"], 4).float() * 20}
    z = torch.randn(B, 6, generator=gen)
    z_f = z.clone().requires_grad_(True)
    loss = losses.view_symmetry_loss(SphericalHead.loss, flipped, target, z_f, z)
    # L_v written out angle by angle: soft cross-entropy of the magnitudes + cross-entropy of the sign quadrant
    expected = sum(-(target["ccss"][:, k] * flipped["logp"][:, k]).sum(-1).mean()
                   + F.cross_entropy(flipped["sign"][:, k], target["sign"][:, k]) for k in range(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # z_f == z: no style term
    loss.backward()
    assert mag_logits.grad.abs().max().item() < 1e-6  # soft CE is stationary where prediction == target
    assert z_f.grad.abs().max().item() < 1e-7
    # a non-mirrored prediction on the flipped image is penalised more
    wrong = {"logp": flipped["logp"].detach(), "sign": F.one_hot(flip_sign_class(target["sign"]), 4).float() * 20}
    assert losses.view_symmetry_loss(SphericalHead.loss, wrong, target).item() > loss.item() + 1.0
    # the style term is ||z_f - z||^2 (MSE)
    z_off = z + 1.0
    assert losses.view_symmetry_loss(SphericalHead.loss, flipped, target, z_off, z).item() == pytest.approx(
        expected.item() + 1.0, rel=1e-5
    )
    # sg z: the style of the real image is the target, only the mirrored image's style is pulled
    z_leaf, z_f = z.clone().requires_grad_(True), z_off.clone().requires_grad_(True)
    fixed = {k: v.detach() for k, v in flipped.items()}
    losses.view_symmetry_loss(SphericalHead.loss, fixed, target, z_f, z_leaf).backward()
    assert z_leaf.grad is None and torch.allclose(z_f.grad, 2.0 * (z_off - z) / z.numel())


def test_generator_symmetry_loss():
    gen = _gen(6)
    img = torch.randn(2, 3, 8, 8, generator=gen)
    assert losses.generator_symmetry_loss(losses.hflip(img), img).item() == pytest.approx(0.0)
    other = torch.randn(2, 3, 8, 8, generator=gen)
    assert losses.generator_symmetry_loss(other, img).item() == pytest.approx(
        F.smooth_l1_loss(other, torch.flip(img, dims=[-1])).item()
    )
    # the mirrored reference is detached: only S(z, flip v) is pushed
    img.requires_grad_(True)
    other.requires_grad_(True)
    losses.generator_symmetry_loss(other, img).backward()
    assert img.grad is None and other.grad.abs().sum() > 0


# --- gradients: a loss that is right in value can still be detached where it must train --------------------------
def _leaf(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64, requires_grad=True)


def test_loss_gradients_match_finite_differences():
    """Every term reaches the inputs it trains: a detached real term, drift, generator loss, reconstruction feature,
    predicted rotation, magnitude or sign logit, style code, cycle weight or flipped-view image passes the value tests
    above but not this (torch.autograd.gradcheck, float64). view_symmetry_loss is checked through the trainer's replay
    (test_ssv_trainer.py)."""
    from torch.autograd import gradcheck

    assert gradcheck(lambda r, f: losses.wgan_critic_loss(r, f, drift=0.3), (_leaf(5, seed=1), _leaf(4, seed=2)))
    assert gradcheck(losses.generator_adversarial_loss, (_leaf(4, seed=3),))
    assert gradcheck(losses.image_consistency_loss, (_leaf(3, 2, 4, seed=4), _leaf(3, 2, 4, seed=5)))
    assert gradcheck(losses.rotation_matrix_loss, (_leaf(2, 3, 3, seed=6), _leaf(2, 3, 3, seed=7)))
    # L_v of the spherical head, through its magnitude log-probabilities and its sign logits (targets are constants)
    ccss = torch.softmax(torch.randn(3, 2, 2, generator=_gen(12), dtype=torch.float64), -1)
    sign = torch.tensor([[0, 3], [1, 2], [2, 0]])
    assert gradcheck(lambda logp, s: losses.spherical_viewpoint_loss(logp, s, ccss, sign),
                     (_leaf(3, 2, 2, seed=13), _leaf(3, 2, 4, seed=14)))
    assert gradcheck(lambda z_hat: losses.style_loss(z_hat, _leaf(3, 5, seed=15)), (_leaf(3, 5, seed=16),))
    assert gradcheck(lambda s, v: losses.cycle_loss(s, v, 0.7, 1.3), (_leaf(1, seed=17), _leaf(1, seed=18)))
    # L_sym on S trains the flipped-view image; its mirrored target is a constant
    target = torch.randn(2, 3, 4, 4, generator=_gen(19), dtype=torch.float64)
    assert gradcheck(lambda img: losses.generator_symmetry_loss(img, target), (_leaf(2, 3, 4, 4, seed=20),))


def test_gradient_penalty_draws_one_eps_per_sample():
    """x_hat = eps x + (1 - eps) G(z) with eps ~ U[0, 1] per sample (the path the trainer takes, eps=None)."""
    seen = []

    def critic(x):
        seen.append(x.detach())
        return x.flatten(1).sum(1)

    torch.manual_seed(0)
    losses.gradient_penalty(critic, torch.ones(64, 1, 2, 2), torch.zeros(64, 1, 2, 2))
    eps = seen[0][:, 0, 0, 0]
    assert (eps >= 0).all() and (eps <= 1).all() and eps.std() > 0.2
    assert torch.equal(seen[0], eps.reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2))  # one eps for all of a sample


def test_pseudo_targets_are_constants():
    """Flip / symmetry targets are made from V's own prediction and must not carry its gradient."""
    out = {"logp": torch.log_softmax(_leaf(2, 3, 2, seed=8), -1), "sign": _leaf(2, 3, 4, seed=9)}
    assert not SphericalHead.pseudo_target(out, flip=True)["ccss"].requires_grad
    assert not Rotation6DHead.pseudo_target({"r6d": _leaf(2, 6, seed=10)}, flip=True)["R"].requires_grad


def test_spherical_head_magnitudes_are_a_distribution_per_angle():
    out = SphericalHead(8, 16).eval()(torch.randn(4, 8, generator=_gen(11)))
    torch.testing.assert_close(out["logp"].exp().sum(-1), torch.ones(4, 3))
