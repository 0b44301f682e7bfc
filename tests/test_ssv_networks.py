"""S and V: shapes of both presets, every critic parameter live, gradients from the image to the angles, Phi."""
import numpy as np
import pytest
import torch

from common.errors import ViewsslError
from common.geometry import angles_to_matrix
from ssv import features
from ssv.networks import PRESETS, ball_window, build_synthesis, build_viewpoint, rotate_volume


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 oneDNN threads spin against other processes (5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

TINY = dict(
    PRESETS["cpu"],
    image_size=16,
    code_dim=4,
    n_mlp=2,
    rotate_size=None,
    g_channels_3d=[8, 4],
    g_channels_3d_post=[4],
    g_projection=8,
    g_channels_2d=[4],
    d_channels=[4, 8, 8],
    d_feature=8,
    d_head_hidden=8,
)


def test_paper_preset_shapes_and_sizes():
    cfg = PRESETS["paper"]
    G, V = build_synthesis(cfg), build_viewpoint(cfg)
    assert sum(p.numel() for p in G.parameters()) == pytest.approx(17.17e6, rel=0.01)  # the release's S
    assert cfg["image_size"] == 128 and G.vol_res == 16
    with torch.no_grad():
        x = G(torch.rand(1, 128) * 2 - 1, torch.zeros(1, 3))
        assert x.shape == (1, 3, 128, 128)
        out = V(x.expand(2, -1, -1, -1))
    assert out["score"].shape == (2,) and out["z"].shape == (2, 128) and out["feat"].shape == (2, 512)
    assert out["view"]["logp"].shape == (2, 3, 2) and out["view"]["sign"].shape == (2, 3, 4)


def test_every_preset_is_a_command_line_choice():
    from ssv.cli import DEFAULT_STEPS, PRESET_CHOICES
    from ssv.trainer import TRAIN_DEFAULTS

    assert set(PRESET_CHOICES) == set(PRESETS) == set(DEFAULT_STEPS) == set(TRAIN_DEFAULTS)


def test_cpu64w_widens_only_s():
    wide, base = PRESETS["cpu64w"], PRESETS["cpu64"]
    assert {k for k in base if wide[k] != base[k]} == {"g_channels_3d", "g_projection", "g_channels_2d"}
    n = [sum(p.numel() for p in build_synthesis(c).parameters()) for c in (base, wide)]
    assert n[1] > 3 * n[0]


@pytest.mark.parametrize("preset,head", [("cpu", "spherical"), ("cpu", "6d"), ("cpu64", "spherical"),
                                         ("cpu64w", "spherical")])
def test_cpu_preset_forward_backward(preset, head):
    cfg = dict(PRESETS[preset], viewpoint_head=head)
    G, V = build_synthesis(cfg), build_viewpoint(cfg)
    z = torch.rand(2, 2 * cfg["code_dim"]) * 2 - 1
    x = G(z, torch.tensor([[0.3, -0.2, 0.1], [-1.0, 0.5, 0.0]]))
    assert x.shape == (2, 3, cfg["image_size"], cfg["image_size"])
    out = V(x)
    assert V.decode(out["view"]).shape == (2, 3)
    (out["score"].sum() + out["z"].sum()).backward()
    assert all(p.grad is not None for p in G.parameters())


def test_every_critic_parameter_is_live():
    """No dead block: each trunk parameter gets a gradient from the score (the release's first block got none)."""
    V = build_viewpoint(TINY)
    V.critic(torch.rand(3, 3, 16, 16) * 2 - 1).sum().backward()
    for name, p in V.named_parameters():
        if name.startswith(("from_rgb", "blocks", "final", "score_head")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trunk_taps_and_tap():
    V = build_viewpoint(TINY).eval()
    x = torch.rand(2, 3, 16, 16)
    feat, taps = V.trunk(x, taps=True)
    assert set(taps) == {"block0", "block1", "pooled"}
    assert taps["block0"].shape == (2, 8, 8, 8) and taps["block1"].shape == (2, 8, 4, 4)
    assert torch.allclose(V.tap(x, "block1"), taps["block1"])
    assert torch.equal(feat, V.trunk(x))  # taps change nothing of the features
    assert torch.allclose(taps["pooled"], V(x)["feat"])


def test_image_gradient_reaches_predicted_angles_and_style():
    """L_imc's path: a loss on S(z_hat, v_hat) reaches V's magnitude head and style head (trilinear sampling)."""
    G, V = build_synthesis(TINY), build_viewpoint(TINY)
    for p in G.parameters():
        p.requires_grad_(False)
    out = V(torch.rand(2, 3, 16, 16))
    rec = G(out["z"], V.decode(out["view"]))
    rec.square().mean().backward()
    assert V.view_head.mag[0].weight.grad.abs().sum() > 0  # azimuth magnitudes
    assert V.style_head.weight.grad.abs().sum() > 0


def test_minibatch_stddev_option():
    V = build_viewpoint(dict(TINY, mbstd=True))
    assert V.final.conv1.weight.shape[1] == 8 + 1
    assert V(torch.rand(2, 3, 16, 16))["score"].shape == (2,)
    # in eval mode a frame's outputs do not depend on the frames beside it (the batch-of-one value, as the release's
    # test); in training the channel is the batch's std, so they do
    torch.manual_seed(0)
    x, others = torch.rand(1, 3, 16, 16), torch.rand(7, 3, 16, 16)
    V.eval()
    with torch.no_grad():
        alone, in_batch = V(x), V(torch.cat([x, others]))
        torch.testing.assert_close(in_batch["feat"][:1], alone["feat"])
        torch.testing.assert_close(in_batch["score"][:1], alone["score"])
    V.train()
    assert not torch.allclose(V.trunk(torch.cat([x, others]))[:1], V.trunk(torch.cat([x, x])), atol=1e-6)


def test_phi_choices(tmp_path, monkeypatch):
    V = build_viewpoint(TINY)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # critic: V's current trunk, detached
    phi = features.build_phi("critic", critic=V)
    assert list(phi.parameters()) == []
    f = phi(x.requires_grad_(True))
    f.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in V.parameters())
    # random: fixed (same weights on every build, no global RNG use)
    state = torch.random.get_rng_state()
    r1, r2 = features.build_phi("random"), features.build_phi("random")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.allclose(r1(x), r2(x))
    # pretrained weights absent -> clear error, no download; auto falls back to the critic
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ViewsslError, match="alexnet-owt-7be5be79.pth"):
        features.build_phi("alexnet")
    with pytest.raises(ViewsslError, match="no download"):
        features.build_phi("vgg")
    assert features.resolve_phi("auto") == "critic"
    with pytest.raises(ViewsslError, match="unknown feature network"):
        features.resolve_phi("resnet")


def test_phi_alexnet_from_local_file(tmp_path, monkeypatch):
    """A torchvision AlexNet state dict in the hub cache is found and used by ``auto`` (here random weights)."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = features.hub_weights_path("alexnet")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    assert features.resolve_phi("auto") == "alexnet"
    phi = features.build_phi("auto", input_size=64)
    out = phi(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert out.shape == (1, 192, 7, 7)  # conv2 (pre-ReLU) at 64x64 input
    # an explicit file that is not AlexNet is a clear error
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ViewsslError, match="not an AlexNet state dict"):
        features.build_phi("alexnet", weights_path=bad)
    # auto with --phi-weights takes the network the file holds, whatever its name
    vgg_file = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg_file)
    assert features.resolve_phi("auto", vgg_file) == "vgg"
    with pytest.raises(ViewsslError, match="not a VGG-16 state dict \\(Missing key") as err:
        features.build_phi("auto", weights_path=vgg_file)  # a first layer, and nothing else: names the file and keys
    assert str(vgg_file) in str(err.value) and "features.2.weight" in str(err.value)
    assert features.resolve_phi("auto", path) == "alexnet"
    with pytest.raises(ViewsslError, match="neither a torchvision AlexNet nor a VGG-16 state dict"):
        features.resolve_phi("auto", bad)


def test_highpass_removes_ramps_and_keeps_edges():
    """V's optional input high-pass: identity when off; x - blur(x) with odd-reflection padding otherwise, so a
    linear brightness ramp added to an image changes nothing, border included, while an edge survives; the critic
    still has an input gradient."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(build_viewpoint(TINY).prefilter(x), x)
    V = build_viewpoint(dict(TINY, d_highpass=1.0))
    ramp = (torch.linspace(-0.8, 0.8, 16).view(1, 1, 1, 16) + torch.linspace(0.5, -0.5, 16).view(1, 1, 16, 1)) \
        * torch.tensor([1.0, 0.5, -0.3]).view(1, 3, 1, 1)
    assert torch.allclose(V.prefilter(x + 3.0 * ramp), V.prefilter(x), atol=1e-5)
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0
    assert V.prefilter(step)[0, :, 8, 7:9].abs().min() > 0.1
    # against an independent computation: numpy's odd reflection, a normalised 7-tap Gaussian (sigma 1, radius 3)
    g = np.exp(-np.arange(-3.0, 4.0) ** 2 / 2)
    g /= g.sum()
    pad = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect", reflect_type="odd")
    blur = sum(g[i] * g[j] * pad[..., i : i + 16, j : j + 16] for i in range(7) for j in range(7))
    np.testing.assert_allclose(V.prefilter(x).numpy(), x.numpy() - blur, atol=1e-5)
    xi = x.clone().requires_grad_(True)
    V.critic(xi).sum().backward()
    assert xi.grad.abs().sum() > 0
    # smooth shading is attenuated, not removed: the largest residual of a half-cosine across a 32-px image, as a
    # share of its range (the figures in the prefilter docstring and the README: 0.25 %, 0.9 %, 8 %)
    half_cosine = torch.cos(torch.pi * torch.linspace(0, 1, 32)).expand(1, 3, 32, 32)
    for sigma, share in ((1.0, 0.0025), (2.0, 0.0092), (8.0, 0.078)):
        residual = build_viewpoint(dict(PRESETS["cpu"], d_highpass=sigma)).prefilter(half_cosine).abs().max() / 2
        assert 0.9 * share < float(residual) < share
    # the trunk and every tap read the high-pass once: the same weights without it, fed V.prefilter(x), agree
    V0 = build_viewpoint(TINY)
    V0.load_state_dict(V.state_dict())
    V.eval(), V0.eval()
    with torch.no_grad():
        assert torch.allclose(V.trunk(x), V0.trunk(V.prefilter(x)), atol=1e-5)
        for name in V.tap_names[:-1]:
            assert torch.allclose(V.tap(x, name), V0.tap(V.prefilter(x), name), atol=1e-5)
        assert not torch.allclose(V.trunk(x), V0.trunk(x), atol=1e-3)
    for sigma in (-1.0, 0.25, 5.1):  # negative; too small to pass anything; kernel wider than the 16-px image
        with pytest.raises(ValueError, match="high-pass sigma"):
            build_viewpoint(dict(TINY, d_highpass=sigma))


def test_ball_mask_gives_the_volume_one_outline_from_every_viewpoint():
    """S's optional ball window: a ball is its own image under every rotation, so a windowed constant volume looks
    the same from any viewpoint, where the plain rotated cube loses its corners; in S the window is applied to the
    rotated volume and nothing else changes (same parameters, so checkpoints from before the option load)."""
    w = ball_window(16)
    r = np.sqrt(0.9375**2 + 2 * 0.0625**2)  # the centre of voxel (0, 8, 8) of 16, in [-1, 1] coordinates
    assert w[8, 8, 8] == 1 and w[0, 0, 0] == 0 and 0 <= w.min()
    assert float(w[0, 8, 8]) == pytest.approx(0.5 * (1 + np.cos(np.pi * (r - 0.7) / 0.3)), abs=1e-6)
    ones = torch.ones(1, 1, 8, 8, 8)
    for angles in ([0.7, 0.3, 0.4], [1.4, -1.2, 0.75], [-0.5, 1.0, -0.2]):
        R = angles_to_matrix(*torch.tensor(angles).view(3, 1))
        turned = rotate_volume(ones, R, 16)[0, 0]
        assert torch.allclose(turned * w, w, atol=0.03)  # the windowed volume: the same ball from every viewpoint
        assert (turned - 1).abs().max() > 0.9  # the plain cube: its corners leave the grid
    torch.manual_seed(0)
    G0, G = build_synthesis(TINY), build_synthesis(dict(TINY, g_ball_mask=True))
    assert G0.state_dict().keys() == G.state_dict().keys() and G0.window is None
    G.load_state_dict(G0.state_dict())
    seen = {}
    for name, net in (("plain", G0), ("ball", G)):
        net.blocks_3d_post[0].register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
    z = (torch.rand(1, 2 * TINY["code_dim"]) * 2 - 1).expand(2, -1)
    with torch.no_grad():
        G0(z, torch.tensor([[0.0, 0.0, 0.0], [0.8, -0.6, 0.5]]))
        G(z, torch.tensor([[0.0, 0.0, 0.0], [0.8, -0.6, 0.5]]))
    assert torch.allclose(seen["ball"], seen["plain"] * ball_window(G.vol_res))
