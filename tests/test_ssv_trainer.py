"""SSVTrainer: training steps of both presets, exact resume, supervised baseline, media, evaluation, model I/O, CLI."""
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from common.data.labels import write_labels
from common.io import load_checkpoint, write_image
from common.training import fit
from ssv.model_io import load_pose_model
from ssv.networks import to_unit_range
from ssv.trainer import SSVTrainer, default_config, sample_styles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 oneDNN threads spin against other processes (5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

TINY = dict(
    image_size=16,
    code_dim=4,
    n_mlp=2,
    rotate_size=8,  # a 4^3 volume rotated onto 8^3, as the cpu preset does 8^3 -> 16^3
    g_channels_3d=[8],
    g_channels_3d_post=[4],
    g_projection=8,
    g_channels_2d=[4],
    d_channels=[4, 8, 8],
    d_feature=8,
    d_head_hidden=8,
    batch_size=4,
    g_group=2,
    phi_size=None,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 tiny labelled images (a bright square whose position follows the azimuth)."""
    root = tmp_path_factory.mktemp("ssvdata")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(20):
        az = (i / 19 - 0.5) * 2.0
        img = torch.rand(3, 16, 16, generator=gen) * 0.3
        c = int(8 + 5 * math.sin(az))
        img[:, 6:10, c - 2 : c + 2] = 1.0
        write_image(root / "images" / f"{i:03d}.png", img)
        rows.append({"path": f"images/{i:03d}.png", "azimuth": az, "elevation": 0.1 * (i % 3), "tilt": -0.05 * (i % 4)})
    write_labels(root / "labels.csv", rows)
    return root


def tiny_config(folder, **kw):
    return default_config("cpu", data=str(folder), **{**TINY, **kw})


def all_params(trainer):
    return {f"{name}.{k}": v.detach().clone() for name, m in trainer.modules().items()
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kw", [{}, {"phi": "random", "viewpoint_head": "6d"},
                                {"w_imc": 0.0, "w_sym": 0.0, "w_gsym": 0.0}, {"augment_gain": 0.5},
                                {"d_highpass": 1.0}, {"g_ball_mask": True}])
def test_two_steps_tiny(folder, kw):
    t = SSVTrainer(tiny_config(folder, **kw))
    assert (t.G.window is not None) == kw.get("g_ball_mask", False) == (t.G_ema.window is not None)
    before = all_params(t)
    it = t.batches(0)
    for step in range(2):
        terms = t.train_step(next(it), step)
        assert all(torch.isfinite(v) for v in terms.values())
    after = all_params(t)
    assert not torch.equal(before["V.score_head.weight"], after["V.score_head.weight"])
    assert not torch.equal(before["G.to_rgb.weight"], after["G.to_rgb.weight"])
    assert ("d_imc" in terms) == (t.config["w_imc"] > 0) and ("d_sym" in terms) == (t.config["w_sym"] > 0)


def test_critic_step_uses_the_papers_gp_weight_and_drift(folder, monkeypatch):
    """WGAN-GP's weight 10 and the drift 1e-3 (the release README's command) are the defaults, and the configured
    drift and the penalty reach the critic step (value tests of the loss functions cannot see a default or a wiring
    change)."""
    import ssv.trainer as trainer_module

    config = tiny_config(folder, w_imc=0.0, w_sym=0.0, w_gsym=0.0)
    assert (config["gp_weight"], config["drift"]) == (10.0, 1e-3)
    seen = {}
    critic_loss, penalty = trainer_module.losses.wgan_critic_loss, trainer_module.losses.gradient_penalty

    def critic_spy(real, fake, drift):
        seen["drift"] = drift
        return critic_loss(real, fake, drift=drift)

    def penalty_spy(critic, real, fake):
        seen["gp"], seen["gp_images"] = penalty(critic, real, fake), (real, fake)
        return seen["gp"]

    monkeypatch.setattr(trainer_module.losses, "wgan_critic_loss", critic_spy)
    monkeypatch.setattr(trainer_module.losses, "gradient_penalty", penalty_spy)
    t = SSVTrainer({**config, "drift": 0.5})
    batch = next(t.batches(0))
    t.train_step(batch, 0)
    assert seen["drift"] == 0.5 and seen["gp"].item() > 0
    # the penalty interpolates between the step's real batch and its fakes (not fakes and fakes)
    real, fake = seen["gp_images"]
    assert torch.equal(real, trainer_module.to_model_range(batch["image"]))
    assert fake.shape == real.shape and not torch.equal(fake, real)


def test_cpu_preset_two_steps(folder):
    t = SSVTrainer(default_config("cpu", data=str(folder), batch_size=4, g_group=2))
    assert t.config["image_size"] == 32
    before = {k: v.clone() for k, v in all_params(t).items()}
    it = t.batches(0)
    for step in range(2):
        terms = t.train_step(next(it), step)
        assert all(torch.isfinite(v) for v in terms.values()), step
    after = all_params(t)
    for net in ("V.", "G."):  # both phases stepped their networks
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(net)), net


@pytest.mark.slow
def test_paper_preset_two_steps(folder):
    """Two full steps of the 128x128 paper networks at batch 2 (forward and backward of both phases); ~1-3 min on two
    shared CPU cores, hence slow (its time is measured by experiments/bench_ssv.py, not asserted here). The fast
    suite checks the paper networks' shapes in test_ssv_networks.py."""
    t = SSVTrainer(default_config("paper", data=str(folder), phi="critic"))
    assert t.config["batch_size"] == 2 and t.config["image_size"] == 128
    before = {k: v.clone() for k, v in t.G.state_dict().items()}
    before_V = {k: v.clone() for k, v in t.V.state_dict().items()}
    it = t.batches(0)
    for step in range(2):
        terms = t.train_step(next(it), step)
        assert all(torch.isfinite(v) for v in terms.values()), step
    assert any(not torch.equal(before[k], v) for k, v in t.G.state_dict().items())  # S learned
    assert any(not torch.equal(before_V[k], v) for k, v in t.V.state_dict().items())  # V learned


@pytest.mark.parametrize("gain", [0.0, 0.5])
def test_resume_equals_uninterrupted(folder, tmp_path, gain):
    full = SSVTrainer(tiny_config(folder, augment_gain=gain))
    fit(full, tmp_path / "full", steps=4, checkpoint_every=0, progress=False, log_every=0)
    first = SSVTrainer(tiny_config(folder, augment_gain=gain))
    fit(first, tmp_path / "half", steps=2, checkpoint_every=2, progress=False, log_every=0)
    second = SSVTrainer(tiny_config(folder, steps=4, augment_gain=gain))
    torch.manual_seed(1234)  # a fresh process would be in another RNG state: the checkpoint must restore it
    out = fit(second, tmp_path / "half", steps=4, resume="auto", progress=False, log_every=0)
    assert out["start_step"] == 2
    a, b = all_params(full), all_params(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("V", "G"):
        sa, sb = full.optimizers()[name].state_dict(), second.optimizers()[name].state_dict()
        assert sa["state"].keys() == sb["state"].keys()
        for pid in sa["state"]:  # exp_avg, exp_avg_sq and the step count
            for key, value in sa["state"][pid].items():
                assert torch.equal(value, sb["state"][pid][key]), (name, pid, key)


def test_runs_from_before_the_illumination_ramps_still_resume(folder, tmp_path):
    """A checkpoint whose config has no augment_gain (or d_highpass, g_ball_mask) ran without ramps (or high-pass,
    ball mask): it resumes as off, not as any value."""
    from common.errors import ViewsslError
    from common.io import atomic_save

    fit(SSVTrainer(tiny_config(folder)), tmp_path / "old", steps=1, checkpoint_every=1, progress=False, log_every=0)
    (path,) = (tmp_path / "old" / "checkpoints").glob("*.pt")
    ckpt = load_checkpoint(path)
    del ckpt["config"]["augment_gain"], ckpt["config"]["d_highpass"], ckpt["config"]["g_ball_mask"]
    atomic_save(ckpt, path)
    out = fit(SSVTrainer(tiny_config(folder)), tmp_path / "old", steps=2, resume="auto", progress=False, log_every=0)
    assert out["start_step"] == 1
    with pytest.raises(ViewsslError, match="augment_gain"):
        fit(SSVTrainer(tiny_config(folder, augment_gain=0.5)), tmp_path / "old", steps=3, resume=path,
            progress=False, log_every=0)
    with pytest.raises(ViewsslError, match="d_highpass"):
        fit(SSVTrainer(tiny_config(folder, d_highpass=1.0)), tmp_path / "old", steps=3, resume=path,
            progress=False, log_every=0)
    with pytest.raises(ViewsslError, match="g_ball_mask"):
        fit(SSVTrainer(tiny_config(folder, g_ball_mask=True)), tmp_path / "old", steps=3, resume=path,
            progress=False, log_every=0)


def test_supervised_runs_resume_across_gan_only_changes(folder, tmp_path):
    """The supervised baseline never uses the GAN's settings: a change of them does not block its resume; a change of
    what it does use still does."""
    from common.errors import ViewsslError

    fit(SSVTrainer(tiny_config(folder, supervised=True)), tmp_path / "sup", steps=1, checkpoint_every=1,
        progress=False, log_every=0)
    (path,) = (tmp_path / "sup" / "checkpoints").glob("*.pt")
    out = fit(SSVTrainer(tiny_config(folder, supervised=True, lr_d=1e-2, w_imc=0.0)), tmp_path / "sup", steps=2,
              resume=path, progress=False, log_every=0)
    assert out["start_step"] == 1
    with pytest.raises(ViewsslError, match="lr_supervised"):
        fit(SSVTrainer(tiny_config(folder, supervised=True, lr_supervised=0.5)), tmp_path / "sup", steps=3,
            resume=path, progress=False, log_every=0)
    fit(SSVTrainer(tiny_config(folder)), tmp_path / "ssv", steps=1, checkpoint_every=1, progress=False, log_every=0)
    (ssv_path,) = (tmp_path / "ssv" / "checkpoints").glob("*.pt")
    with pytest.raises(ViewsslError, match="lr_d"):  # an SSV run still compares them
        fit(SSVTrainer(tiny_config(folder, lr_d=1e-2)), tmp_path / "ssv", steps=2, resume=ssv_path, progress=False,
            log_every=0)


def test_illumination_ramps(folder):
    """augment_gain 0 leaves images alone; otherwise a ramp linear from one edge, at most 2 x gain in model range,
    the same in every channel, drawn per image, and reused exactly when passed back (L_imc's reconstruction)."""
    x = torch.randn(64, 3, 16, 16)
    off = SSVTrainer(tiny_config(folder))
    same, ramp = off.illuminate(x)
    assert same is x and ramp is None
    t = SSVTrainer(tiny_config(folder, augment_gain=0.4))
    y, ramp = t.illuminate(x)
    assert torch.allclose(y - x, ramp, atol=1e-6)
    peak = ramp.abs().amax(dim=(1, 2, 3))
    assert peak.max() <= 0.8 + 1e-6 and peak.max() > 0.4  # gain U(0, 0.4) in [0, 1] units -> up to 0.8 here
    total = ramp.sum(dim=(1, 2, 3))
    assert (total > 0).any() and (total < 0).any()  # brightening and darkening ramps
    assert torch.equal(ramp, ramp[:, :1].expand_as(ramp))  # one brightness field for all channels
    for r in ramp[:, 0]:
        along_rows = torch.allclose(r, r[:, :1].expand_as(r))  # constant along each row: ramp runs top <-> bottom
        along_cols = torch.allclose(r, r[:1].expand_as(r))
        assert along_rows or along_cols
        line = r[:, 0] if along_rows else r[0]
        assert torch.allclose(line.diff().diff(), torch.zeros(14), atol=1e-5)  # linear
        assert line.abs().min() < 1e-6  # zero at the far edge
    assert not torch.allclose(ramp[0], ramp[1])
    z, again = t.illuminate(torch.zeros_like(x), ramp)
    assert again is ramp and torch.equal(z, ramp)


def test_every_image_v_reads_is_ramped_and_the_reconstruction_gets_its_real_images_ramp(folder, monkeypatch):
    t = SSVTrainer(tiny_config(folder, augment_gain=0.5))
    calls = []
    original = t.illuminate

    def record(images, ramp=None):
        out, used = original(images, ramp)
        calls.append((images.shape[0], ramp, used))
        return out, used

    monkeypatch.setattr(t, "illuminate", record)
    t.train_step(next(t.batches(0)), 0)
    B, n = t.config["batch_size"], t.config["g_group"]
    assert [c[0] for c in calls] == [B, B, B, 3 * n]  # reals, fakes, L_imc's reconstruction, the S step's samples
    assert calls[0][1] is None and calls[1][1] is None and calls[3][1] is None  # fresh ramps...
    assert calls[2][1] is calls[0][2]  # ...but the reconstruction reuses the real images' ramp
    assert not torch.equal(calls[0][2], calls[1][2])


def test_supervised_baseline_learns(folder, tmp_path):
    t = SSVTrainer(tiny_config(folder, supervised=True, lr_supervised=3e-3))
    assert set(t.modules()) == {"V", "V_ema"}
    it = t.batches(0)
    first = [float(t.train_step(next(it), s)["sup_view"]) for s in range(3)]
    for s in range(3, 40):
        last = float(t.train_step(next(it), s)["sup_view"])
    assert last < sum(first) / 3
    out = fit(SSVTrainer(tiny_config(folder, supervised=True)), tmp_path / "sup", steps=2, progress=False)
    ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt["family"] == "ssv" and set(ckpt["modules"]) == {"V", "V_ema"}


def test_highpass_runs_show_what_v_sees_and_reload_with_it(folder, tmp_path):
    t = SSVTrainer(tiny_config(folder, d_highpass=1.0))
    out = fit(t, tmp_path / "run", steps=1, checkpoint_every=1, media_every=1, progress=False, log_every=0)
    assert {p.name for p in (tmp_path / "run" / "samples").iterdir()} == {
        "azimuth-00000001.png", "azimuth-00000001-seen_by_v.png", "elevation-00000001.png",
        "elevation-00000001-seen_by_v.png"}
    raw, seen = t.sample_grid(n_styles=1, n_views=2, seen_by_v=True)
    assert torch.equal(raw, t.sample_grid(n_styles=1, n_views=2)) and raw.shape == seen.shape
    # the seen grid is the high-pass (mean ~0, shown around mid-gray) of the very samples of the raw grid
    z = sample_styles(1, t.config["code_dim"], generator=torch.Generator().manual_seed(t.config["seed"] + 12345))
    v = torch.zeros(2, 3)
    v[:, 0] = torch.linspace(-t.ranges[0], t.ranges[0], 2)
    with torch.no_grad():
        expected = to_unit_range(2.0 * t.V.prefilter(t.G_ema(z.expand(2, -1), v)))
    assert torch.allclose(seen, torch.cat(list(expected), dim=2), atol=1e-6)
    model = load_pose_model(load_checkpoint(out["checkpoint"]))
    images = torch.rand(3, 3, 16, 16)
    ramp = torch.linspace(-0.3, 0.3, 16).view(1, 1, 1, 16)  # in [0, 1] units; the high-pass removes it
    assert torch.allclose(model.predict_angles(images), t.pose_model().predict_angles(images))
    assert torch.allclose(model.predict_angles(images + ramp), model.predict_angles(images), atol=1e-4)


def test_media_evaluation_and_pose_model(folder, tmp_path):
    t = SSVTrainer(tiny_config(folder, eval_data=str(folder)))
    out = fit(t, tmp_path / "run", steps=2, checkpoint_every=0, media_every=2, eval_every=2, progress=False)
    assert (tmp_path / "run" / "samples" / "azimuth-00000002.png").is_file()
    grid = t.sample_grid(n_styles=2, n_views=3)
    assert grid.shape == (3, 2 * 16, 3 * 16) and 0 <= grid.min() and grid.max() <= 1
    assert out["metrics"], "evaluate() returned no metrics"
    # the checkpoint opens as a PoseModel that predicts exactly what the trainer's V predicts
    model = load_pose_model(load_checkpoint(out["checkpoint"]))
    images = torch.rand(3, 3, 16, 16)
    assert model.family == "ssv" and model.input_size == 16
    assert torch.allclose(model.predict_angles(images), t.pose_model().predict_angles(images))
    feats = model.features(images, ["pooled", "block1"])
    assert feats["pooled"].shape == (3, 8) and feats["block1"].shape == (3, 8)
    # resizing: 32x32 inputs are resized to the model's 16
    assert model.predict_angles(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    # and through the shared evaluation module (family "ssv" registered by ssv.model_io)
    from common.eval import load_model

    shared = load_model(tmp_path / "run")
    assert shared.family == "ssv" and torch.allclose(shared.predict_angles(images), model.predict_angles(images))


def test_periodic_evaluation_leaves_the_training_rng_alone(folder):
    """--eval-every must not change what a run trains: evaluate() draws nothing from the global RNG."""
    t = SSVTrainer(tiny_config(folder, eval_data=str(folder)))
    torch.manual_seed(3)
    state = torch.get_rng_state()
    metrics = t.evaluate(0)
    assert "viewpoint/calibrated/mae" in metrics and t.V.training
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_data_is_a_clear_error(tmp_path):
    from common.errors import ViewsslError

    t = SSVTrainer(tiny_config(tmp_path / "missing"))
    with pytest.raises(ViewsslError, match="missing"):
        t.batches(0)


@pytest.mark.parametrize("supervised", [False, True])
def test_v_ema_is_the_ramped_average_of_v_and_never_changes_the_training(folder, supervised):
    """V_ema <- lerp(V_ema, V, 1 - min(decay, (1 + step) / (10 + step))) after each V step, from a copy of the initial
    V; a run with v_ema_decay 0 trains exactly the same V (and S)."""
    with_ema = SSVTrainer(tiny_config(folder, supervised=supervised, v_ema_decay=0.5))
    without = SSVTrainer(tiny_config(folder, supervised=supervised, v_ema_decay=0.0))
    assert without.V_ema is None and "V_ema" not in without.modules()
    expected = {k: v.detach().clone() for k, v in with_ema.V.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in with_ema.V_ema.state_dict().items())
    for t in (with_ema, without):
        torch.manual_seed(7)
        it = t.batches(0)
        for step in range(3):
            t.train_step(next(it), step)
            if t is with_ema:
                decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25: the ramp, then the decay
                expected = {k: decay * e + (1 - decay) * t.V.state_dict()[k] for k, e in expected.items()}
    for k, v in with_ema.V_ema.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    v = with_ema.V.state_dict()
    assert any(not torch.allclose(e, v[k]) for k, e in with_ema.V_ema.state_dict().items())  # an average, not V
    a, b = all_params(with_ema), all_params(without)
    assert set(a) - set(b) == {k for k in a if k.startswith("V_ema.")}
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.requires_grad for p in with_ema.V_ema.parameters())


def test_v_ema_is_evaluated_saved_and_loaded(folder, tmp_path):
    from common.errors import ViewsslError
    from common.eval import load_model

    t = SSVTrainer(tiny_config(folder, eval_data=str(folder)))
    out = fit(t, tmp_path / "run", steps=2, checkpoint_every=2, eval_every=2, progress=False, log_every=0)
    metrics = out["metrics"]
    assert "ema/viewpoint/calibrated/mae" in metrics and "viewpoint/calibrated/mae" in metrics
    images = torch.rand(3, 3, 16, 16)
    ema = load_model(tmp_path / "run", ema=True)
    assert torch.allclose(ema.predict_angles(images), t.pose_model(ema=True).predict_angles(images))
    assert not torch.allclose(ema.predict_angles(images), load_model(tmp_path / "run").predict_angles(images))
    ckpt = load_checkpoint(out["checkpoint"])
    del ckpt["modules"]["V_ema"]
    with pytest.raises(ViewsslError, match="no V_ema"):
        load_pose_model(ckpt, ema=True)
    with pytest.raises(ValueError, match="no EMA of V"):
        SSVTrainer(tiny_config(folder, v_ema_decay=0.0)).pose_model(ema=True)


def test_runs_from_before_v_ema_resume_with_v_ema_starting_at_v(folder, tmp_path):
    from common.io import atomic_save

    fit(SSVTrainer(tiny_config(folder)), tmp_path / "old", steps=1, checkpoint_every=1, progress=False, log_every=0)
    (path,) = (tmp_path / "old" / "checkpoints").glob("*.pt")
    ckpt = load_checkpoint(path)
    del ckpt["modules"]["V_ema"], ckpt["config"]["v_ema_decay"]
    atomic_save(ckpt, path)
    resumed = SSVTrainer(tiny_config(folder))
    out = fit(resumed, tmp_path / "old", steps=1, resume="auto", progress=False, log_every=0)  # loads, trains nothing
    assert out["start_step"] == 1 and resumed.v_ema_since == 1
    for k, v in resumed.V_ema.state_dict().items():
        assert torch.equal(v, ckpt["modules"]["V"][k]), k
    # its ramp-up starts there: the first step after it keeps 1 - 1/10 of the new V, as step 0 of a fresh run does
    before = {k: v.clone() for k, v in resumed.V_ema.state_dict().items()}
    resumed.train_step(next(resumed.batches(1)), 1)
    v = resumed.V.state_dict()
    for k, e in resumed.V_ema.state_dict().items():
        assert torch.allclose(e, 0.1 * before[k] + 0.9 * v[k], atol=1e-6), k
    # and the start is kept by the checkpoints written after it
    out = fit(resumed, tmp_path / "old", steps=3, resume="auto", checkpoint_every=1, progress=False, log_every=0)
    again = SSVTrainer(tiny_config(folder))
    fit(again, tmp_path / "old", steps=3, resume="auto", progress=False, log_every=0)
    assert load_checkpoint(out["checkpoint"])["v_ema_since"] == 1 and again.v_ema_since == 1
    # the evaluations log the step it started at, so that summaries of the run can tell a young V_ema (ssv_seeds)
    again.config["eval_data"] = str(folder)
    assert again.evaluate(3)["ema/since"] == 1.0
    assert SSVTrainer(tiny_config(folder, eval_data=str(folder))).evaluate(0)["ema/since"] == 0.0


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_help_documents_every_option():
    """Every option of every viewssl command has a description, and --help shows each option with it."""
    import click

    from experiments.cli import cli

    def commands(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from commands(sub, (*path, name))
        else:
            yield path, cmd

    found = dict(commands(cli, ()))
    assert {("train", "ssv"), ("eval",)} <= set(found)
    for path, cmd in found.items():
        result = CliRunner().invoke(cli, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        text = " ".join(result.output.split())
        for opt in (p for p in cmd.params if isinstance(p, click.Option)):
            assert (opt.help or "").strip(), (path, opt.opts)  # no option without a description
            assert max(opt.opts, key=len) in text and " ".join(opt.help.split()[:4]) in text, (path, opt.opts)


def test_cli_trains_and_resumes(folder, tmp_path):
    from experiments.cli import cli

    args = ["train", "ssv", "--data", str(folder), "--out", str(tmp_path / "runs"), "--steps", "2", "--batch-size", "4",
            "--g-group", "2", "--device", "cpu", "--no-imc", "--media-every", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "ckpt-00000002.pt").is_file()
    ckpt = load_checkpoint(runs[0] / "checkpoints" / "ckpt-00000002.pt")
    assert ckpt["config"]["w_imc"] == 0 and ckpt["config"]["image_size"] == 32
    # --resume auto continues the same run folder
    result = CliRunner().invoke(cli, args[:7] + ["3"] + args[8:] + ["--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert (runs[0] / "checkpoints" / "ckpt-00000003.pt").is_file() and len(list((tmp_path / "runs").iterdir())) == 1
    # a different config is refused in one line when the run is named
    result = CliRunner().invoke(cli, args[:7] + ["4"] + args[8:] + ["--resume", str(runs[0]), "--w-style", "0.5"])
    assert result.exit_code == 2 and "Error:" in result.output and "w_style" in result.output
    # another ablation row is another run: --resume auto starts it in a folder of its own
    result = CliRunner().invoke(cli, args + ["--resume", "auto", "--no-sym"])
    assert result.exit_code == 0, result.output
    assert [p.name.split("-", 1)[1].split("-")[:2] for p in sorted((tmp_path / "runs").iterdir())] == [
        ["ssv", "no_imc"], ["ssv", "no_imc_sym"]]
    # --lr-decay from the last checkpoint's step continues the run into a decay
    result = CliRunner().invoke(cli, args[:7] + ["4"] + args[8:] + ["--resume", "auto", "--lr-decay", "3", "5"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(runs[0] / "checkpoints" / "ckpt-00000004.pt")
    assert (ckpt["config"]["lr_decay_start"], ckpt["config"]["lr_decay_end"], ckpt["config"]["lr_final"]) == (3, 5, 0.1)
    # the same row with another seed is another run: --resume auto leaves the first one alone
    result = CliRunner().invoke(cli, args[:7] + ["1"] + args[8:] + ["--resume", "auto", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "runs").iterdir())) == 3 and len(list(runs[0].glob("checkpoints/ckpt-*.pt"))) == 3


def test_cli_eval_every_zero_evaluates_only_at_the_end(folder, tmp_path):
    from experiments.cli import cli

    args = ["train", "ssv", "--data", str(folder), "--eval-data", str(folder), "--eval-every", "0", "--out",
            str(tmp_path), "--steps", "2", "--batch-size", "4", "--g-group", "2", "--device", "cpu", "--no-imc",
            "--media-every", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "viewpoint/calibrated/mae:" in result.output
    (run,) = tmp_path.iterdir()
    evals = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]
    assert len(evals) == 1 and '"step": 2,' in evals[0]


def test_phi_weights_are_compared_on_resume(folder, tmp_path):
    """Phi is rebuilt from --phi-weights on resume (it is not in the checkpoint), so another file is another run; a run
    without L_imc has no Phi to compare."""
    from common.errors import ViewsslError

    fit(SSVTrainer(tiny_config(folder, phi="critic")), tmp_path, steps=1, progress=False, log_every=0)
    with pytest.raises(ViewsslError, match="phi_weights"):
        fit(SSVTrainer(tiny_config(folder, phi="critic", phi_weights="other.pth")), tmp_path, steps=2,
            resume="auto", progress=False, log_every=0)
    # without L_imc Phi is never built: a run resumes whatever --phi says
    fit(SSVTrainer(tiny_config(folder, phi="critic", w_imc=0.0)), tmp_path / "no_imc", steps=1, progress=False,
        log_every=0)
    out = fit(SSVTrainer(tiny_config(folder, phi="random", phi_weights="other.pth", w_imc=0.0)), tmp_path / "no_imc",
              steps=2, resume="auto", progress=False, log_every=0)
    assert out["start_step"] == 1
    with pytest.raises(ViewsslError, match="phi"):  # turning L_imc on is another run
        fit(SSVTrainer(tiny_config(folder, phi="random")), tmp_path / "no_imc", steps=3, resume="auto",
            progress=False, log_every=0)


def test_checkpoint_errors_name_the_file(folder, tmp_path):
    from common.errors import ViewsslError
    from common.eval import load_model
    from common.io import atomic_save

    fit(SSVTrainer(tiny_config(folder)), tmp_path / "run", steps=1, progress=False, log_every=0)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt")
    ckpt["config"]["d_feature"] = 16  # V's weights no longer fit its config
    atomic_save(ckpt, tmp_path / "bad.pt")
    # the message names the misfit weights (torch's first line is only a header)
    with pytest.raises(ViewsslError, match=r"bad.pt: SSV checkpoint's V does not match its config \(size mismatch "
                                           r"for \S+\.weight"):
        load_model(tmp_path / "bad.pt")


_FRESH_INTERPRETER = r"""
import importlib, pkgutil, sys
import common
for info in pkgutil.walk_packages(common.__path__, "common."):
    importlib.import_module(info.name)
families = sorted(m for m in sys.modules if m.split(".")[0] in ("ssv", "trajssl", "experiments"))
assert not families, f"common imports {families}"
if sys.argv[2] == "broken":
    sys.modules["ssv.networks"] = None  # a module the family needs cannot be imported
from common.errors import ViewsslError
from common.eval import load_model
try:
    print(load_model(sys.argv[1]).family)
except ViewsslError as e:
    print(e)
"""


def test_common_imports_no_family_and_eval_loads_one_on_demand(folder, tmp_path):
    """In a fresh interpreter: every module of common imports without ssv, trajssl or experiments; load_model then
    imports the checkpoint's family itself; a module the family needs that is missing is named (was "unknown model
    family")."""
    import subprocess
    import sys

    fit(SSVTrainer(tiny_config(folder)), tmp_path / "run", steps=1, progress=False, log_every=0)
    ckpt = str(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt")
    outs = [subprocess.run([sys.executable, "-c", _FRESH_INTERPRETER, ckpt, case], capture_output=True, text=True,
                           timeout=120) for case in ("plain", "broken")]
    assert [o.returncode for o in outs] == [0, 0], [o.stderr[-2000:] for o in outs]
    assert outs[0].stdout.strip().splitlines()[-1] == "ssv"
    assert "cannot load family 'ssv': ssv.model_io needs the missing module 'ssv.networks'" in outs[1].stdout


@pytest.mark.parametrize("damage,detail", [
    (lambda c: c["config"].update(image_size=60), "ValueError: .*power of two"),
    (lambda c: c["config"].update(d_norm="batch"), "ValueError: .*norm"),
    (lambda c: c["config"].update(viewpoint_head="x"), r"ValueError: unknown viewpoint head 'x' \(choose from"),
    (lambda c: c["config"].update(d_channels=None), "TypeError"),
    (lambda c: c.update(config="oops"), "TypeError"),
    (lambda c: c.update(modules=["V"]), "AttributeError"),
    (lambda c: c["modules"].update(V=torch.zeros(3)), "TypeError"),
])
def test_a_loadable_but_malformed_checkpoint_is_a_one_line_error_for_eval(folder, tmp_path, damage, detail):
    """`viewssl eval` of a checkpoint file that loads but holds the wrong things: exit code 2 and one line naming the
    file, the family and the exception (was a traceback)."""
    from experiments.cli import cli
    from common.io import atomic_save

    fit(SSVTrainer(tiny_config(folder)), tmp_path / "run", steps=1, progress=False, log_every=0)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt")
    damage(ckpt)
    atomic_save(ckpt, tmp_path / "bad.pt")
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(folder),
                                   "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert re.search(r"Error: \S*bad\.pt: malformed 'ssv' checkpoint \(" + detail, res.output), res.output
    assert "Traceback" not in res.output


def test_bench_ssv_errors_are_one_line():
    from experiments.bench_ssv import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = CliRunner().invoke(main, ["--device", "cuda", "--preset", "cpu"])
    assert result.exit_code == 2 and "Error:" in result.output and "cuda" in result.output
    assert "Traceback" not in result.output


def test_bench_ssv_times_the_presets_own_batch(tmp_path):
    from experiments.bench_ssv import main

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["--preset", "cpu", "--iters", "1", "--device", "cpu", "--phi", "critic",
                                       "--highpass", "1", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert (figures["batch_size"], figures["g_group"], figures["highpass"]) == (16, 8, 1.0)  # as training uses
    assert figures["seconds_per_iteration"] > 0 and "batch 16 (S-step groups of 8), high-pass sigma 1" in result.output


def test_cli_errors_are_one_line(tmp_path):
    from experiments.cli import cli

    result = CliRunner().invoke(cli, ["train", "ssv", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Error:" in result.output and "nope" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["train", "ssv", "--data", str(tmp_path), "--phi", "alexnet", "--phi-weights",
                                      str(tmp_path / "absent.pth")])
    assert result.exit_code == 2 and "--phi-weights" in result.output
    weights = tmp_path / "alexnet.pth"
    weights.write_bytes(b"")
    result = CliRunner().invoke(cli, ["train", "ssv", "--data", str(tmp_path), "--out", str(tmp_path / "runs"),
                                      "--phi", "critic", "--phi-weights", str(weights)])  # a file nothing reads
    assert result.exit_code == 2 and "--phi critic reads no file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_cli_refuses_a_benchmark_root_a_file_and_eval_every_alone(tmp_path):
    """None of these may allocate a run folder: a benchmark root (SSV would train on its test splits too), a file
    given as --data, --eval-every without --eval-data (it was silently ignored)."""
    from experiments.cli import cli

    bench = tmp_path / "bench"
    (bench / "heads" / "train").mkdir(parents=True)
    (bench / "meta.json").write_text("{}")
    runs = tmp_path / "runs"
    for args, message in [
        (["--data", str(bench)], f"pass one split, e.g. {bench / 'heads' / 'train'}"),
        (["--data", str(bench / "meta.json")], "--data must be a folder"),
        (["--data", str(bench / "heads" / "train"), "--eval-every", "5"], "--eval-every needs --eval-data"),
    ]:
        result = CliRunner().invoke(cli, ["train", "ssv", *args, "--out", str(runs), "--steps", "1"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and not runs.exists()


def test_augment_gain_is_checked(folder):
    from common.errors import ViewsslError
    from ssv.cli import build_config

    assert build_config("cpu", str(folder), augment_gain=0.5)["augment_gain"] == 0.5
    with pytest.raises(ViewsslError, match="--supervised"):
        build_config("cpu", str(folder), supervised=True, augment_gain=0.5)
    with pytest.raises(ViewsslError, match=r"not in \[0, 1\]"):
        build_config("cpu", str(folder), augment_gain=1.5)


def test_phi_is_recorded_as_given_when_l_imc_is_off(folder):
    """Without L_imc Phi is never built: config.json records the --phi given (it said 'auto' whatever was given)."""
    from common.errors import ViewsslError
    from ssv.cli import build_config

    assert build_config("cpu", str(folder), phi="vgg", no_imc=True)["phi"] == "vgg"
    assert build_config("cpu", str(folder), phi="random")["phi"] == "random"  # with L_imc: the resolved network
    with pytest.raises(ViewsslError, match="--phi: unknown feature network 'nope'"):
        build_config("cpu", str(folder), phi="nope", no_imc=True)


def test_v_ema_decay_is_checked(folder):
    from common.errors import ViewsslError
    from ssv.cli import build_config

    assert build_config("cpu", str(folder))["v_ema_decay"] == 0.998
    assert build_config("cpu", str(folder), v_ema_decay=0.0)["v_ema_decay"] == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ViewsslError, match="--v-ema-decay"):
            build_config("cpu", str(folder), v_ema_decay=bad)


def test_highpass_is_checked_and_reaches_the_supervised_v(folder):
    from common.errors import ViewsslError
    from ssv.cli import build_config

    assert build_config("cpu", str(folder), highpass=1.5)["d_highpass"] == 1.5
    config = build_config("cpu", str(folder), supervised=True, highpass=1.0)
    assert SSVTrainer(config).V.highpass == 1.0
    assert build_config("cpu", str(folder), highpass=0.0)["d_highpass"] == 0.0
    for sigma in (-1.0, 0.25, 9.0):
        with pytest.raises(ViewsslError, match="--highpass"):
            build_config("cpu", str(folder), highpass=sigma)
    with pytest.raises(ViewsslError, match="--augment-gain has no effect with --highpass"):
        build_config("cpu", str(folder), highpass=1.0, augment_gain=0.25)
    assert build_config("cpu", str(folder), ball_mask=True)["g_ball_mask"] is True
    assert build_config("cpu", str(folder))["g_ball_mask"] is False


def test_learning_rates_reach_the_v_that_uses_them_and_are_refused_where_unused(folder):
    from common.errors import ViewsslError
    from ssv.cli import build_config

    config = build_config("cpu", str(folder), supervised=True, lr_supervised=5e-3)
    assert SSVTrainer(config).opt_V.param_groups[0]["lr"] == 5e-3
    assert build_config("cpu", str(folder), lr_d=3e-4)["lr_d"] == 3e-4
    with pytest.raises(ViewsslError, match="--lr-d and --lr-g have no effect with --supervised"):
        build_config("cpu", str(folder), supervised=True, lr_d=1e-2)
    with pytest.raises(ViewsslError, match="--lr-supervised has no effect without --supervised"):
        build_config("cpu", str(folder), lr_supervised=1e-2)
    with pytest.raises(ViewsslError, match="--lr-g: a learning rate must be positive"):
        build_config("cpu", str(folder), lr_g=0.0)


# --- the wiring of one step: weights, symmetry targets, EMA, learning rates, the supervised flip -----------------
WEIGHTS = dict(w_style=0.7, w_view=0.3, w_imc=0.25, w_sym=0.6, w_gsym=0.45, gp_weight=7.0, phi="random")


def test_step_totals_are_the_weighted_sums_of_the_terms(folder):
    t = SSVTrainer(tiny_config(folder, **WEIGHTS))
    terms = {k: float(v) for k, v in t.train_step(next(t.batches(0)), 0).items()}
    w = WEIGHTS
    d_total = (terms["d_critic"] + w["w_style"] * terms["d_style"] + w["w_view"] * terms["d_view"]
               + w["w_sym"] * terms["d_sym"] + w["w_imc"] * terms["d_imc"] + w["gp_weight"] * terms["d_gp"])
    g_total = (terms["g_adv"] + w["w_style"] * terms["g_style"] + w["w_view"] * terms["g_view"]
               + w["w_gsym"] * terms["g_sym"])
    assert terms["d_total"] == pytest.approx(d_total, rel=1e-5, abs=1e-6)  # L_imc weighted once (the release: twice)
    assert terms["g_total"] == pytest.approx(g_total, rel=1e-5, abs=1e-6)


def test_symmetry_targets_come_from_the_real_image_flipped(folder, monkeypatch):
    import ssv.losses as ssv_losses

    t = SSVTrainer(tiny_config(folder, **WEIGHTS))
    seen = {}
    forward = t._v_forward

    def v_forward(*images):
        seen["images"], seen["outs"] = images, forward(*images)
        return seen["outs"]

    pseudo_target = t.head.pseudo_target

    def spy_target(view, flip):
        seen["target_in"], seen["flip"] = view, flip
        seen["target"] = pseudo_target(view, flip=flip)
        return seen["target"]

    symmetry = ssv_losses.view_symmetry_loss

    def spy_symmetry(loss_fn, pred, target, z_flipped, z_real):
        seen["sym"] = (pred, target, z_flipped, z_real)
        return symmetry(loss_fn, pred, target, z_flipped, z_real)

    monkeypatch.setattr(t, "_v_forward", v_forward)
    monkeypatch.setattr(t.head, "pseudo_target", spy_target)
    monkeypatch.setattr(ssv_losses, "view_symmetry_loss", spy_symmetry)
    t.train_step(next(t.batches(0)), 0)
    real, mirrored = seen["images"][0], seen["images"][1]
    assert torch.equal(mirrored, torch.flip(real, dims=[-1]))
    out_real, out_mirrored = seen["outs"][0], seen["outs"][1]
    assert seen["target_in"] is out_real["view"] and seen["flip"] is True
    pred, target, z_flipped, z_real = seen["sym"]
    assert pred is out_mirrored["view"] and target is seen["target"]
    assert z_flipped is out_mirrored["z"] and z_real is out_real["z"]


def test_ema_generator_and_the_mapping_networks_learning_rate(folder):
    t = SSVTrainer(tiny_config(folder))
    g0 = {k: v.detach().clone() for k, v in t.G.named_parameters()}
    t.train_step(next(t.batches(0)), 0)
    g1 = dict(t.G.named_parameters())
    decay = min(t.config["ema_decay"], 1 / 10)  # the ramp at step 0
    for k, p in t.G_ema.named_parameters():
        torch.testing.assert_close(p.detach(), decay * g0[k] + (1 - decay) * g1[k].detach(), msg=k)
    # Adam with beta1 = 0 moves a parameter by lr g / (|g| + eps) ~ lr on its first step (the S step's gradients are
    # still on the parameters; entries with |g| ~ eps move less)
    lr = t.config["lr_g"]
    checked = set()
    for k, p in g1.items():
        strong = p.grad.abs() > 1e-5
        if not strong.any():
            continue
        step = (p.detach() - g0[k]).abs()[strong]
        expected = lr * t.config["lr_mapping_mult"] if k.startswith("mapping.") else lr
        torch.testing.assert_close(step, torch.full_like(step, expected), rtol=2e-2, atol=0, msg=k)  # float32 diffs
        checked.add(k.split(".")[0])
    assert {"mapping", "to_rgb"} <= checked


def test_lr_multiplier_is_a_cosine_from_start_to_end():
    from ssv.trainer import lr_multiplier

    assert [lr_multiplier(s, 10, 20, 0.1) for s in (0, 10, 20, 25)] == [1.0, 1.0, pytest.approx(0.1), 0.1]
    assert lr_multiplier(15, 10, 20, 0.1) == pytest.approx(0.55)  # half-way: the mean of 1 and final
    assert lr_multiplier(12, 10, 20, 0.0) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))
    assert lr_multiplier(50, 20, 20, 0.1) == lr_multiplier(50, 30, 20, 0.1) == 1.0  # end <= start: no decay


@pytest.mark.parametrize("supervised", [False, True])
def test_lr_decay_scales_every_step_of_every_optimiser(folder, supervised):
    """The rates the optimisers hold follow the decay, and they reach the updates: with a decay from step 0 the
    weights equal an undecayed run's after step 0 (factor 1) and differ after step 1 (factor 0.625)."""
    from ssv.trainer import lr_multiplier

    t = SSVTrainer(tiny_config(folder, lr_decay_start=0, lr_decay_end=2, lr_final=0.25, supervised=supervised))
    plain = SSVTrainer(tiny_config(folder, supervised=supervised))
    c = t.config
    base = {"V": [c["lr_supervised"]]} if supervised else {"V": [c["lr_d"]],
                                                          "G": [c["lr_g"], c["lr_g"] * c["lr_mapping_mult"]]}
    it, it_plain = t.batches(0), plain.batches(0)
    for step in range(4):
        torch.manual_seed(step)
        terms = t.train_step(next(it), step)
        torch.manual_seed(step)
        plain_terms = plain.train_step(next(it_plain), step)
        m = lr_multiplier(step, 0, 2, 0.25)
        assert float(terms["lr_mult"]) == pytest.approx(m) and "lr_mult" not in plain_terms  # logged with a decay
        for name, opt in t.optimizers().items():
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * m for b in base[name]]), (name, step)
        if step < 2:
            a, b = all_params(t), all_params(plain)
            assert all(torch.equal(a[k], b[k]) for k in a) == (step == 0), step
    assert lr_multiplier(1, 0, 2, 0.25) == pytest.approx(0.625)


def test_a_finished_run_continues_with_a_decay_from_its_last_step(folder, tmp_path):
    """Resuming a 2-step run with a decay from step 2 == one run with that decay from the start; a decay that would
    have changed the steps already run is refused."""
    from common.errors import ViewsslError

    decay = dict(lr_decay_start=2, lr_decay_end=4, lr_final=0.1)
    full = SSVTrainer(tiny_config(folder, **decay))
    fit(full, tmp_path / "full", steps=4, checkpoint_every=0, progress=False, log_every=0)
    fit(SSVTrainer(tiny_config(folder)), tmp_path / "half", steps=2, checkpoint_every=2, progress=False, log_every=0)
    torch.manual_seed(1234)
    second = SSVTrainer(tiny_config(folder, **decay))
    assert fit(second, tmp_path / "half", steps=4, resume="auto", progress=False, log_every=0)["start_step"] == 2
    assert second.optimizers()["V"].param_groups[0]["lr"] == pytest.approx(0.55 * second.config["lr_d"])  # step 3
    a, b = all_params(full), all_params(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fit(SSVTrainer(tiny_config(folder)), tmp_path / "early", steps=2, checkpoint_every=2, progress=False, log_every=0)
    with pytest.raises(ViewsslError, match="lr_decay_end: 0 -> 4"):  # a decay from step 0 changes step 1's rate
        fit(SSVTrainer(tiny_config(folder, lr_decay_start=0, lr_decay_end=4)), tmp_path / "early", steps=4,
            resume="auto", progress=False, log_every=0)


def test_lr_decay_options_are_checked(folder):
    from common.errors import ViewsslError
    from ssv.cli import build_config

    c = build_config("cpu", str(folder), lr_decay=(100, 300), lr_final=0.05)
    assert (c["lr_decay_start"], c["lr_decay_end"], c["lr_final"]) == (100, 300, 0.05)
    assert build_config("cpu", str(folder))["lr_decay_end"] == 0  # off by default
    for bad in ((300, 100), (5, 5), (-1, 10)):
        with pytest.raises(ViewsslError, match="--lr-decay"):
            build_config("cpu", str(folder), lr_decay=bad)
    with pytest.raises(ViewsslError, match="--lr-final"):
        build_config("cpu", str(folder), lr_decay=(0, 10), lr_final=1.5)
    with pytest.raises(ViewsslError, match="without --lr-decay"):
        build_config("cpu", str(folder), lr_final=0.5)


def test_supervised_flip_mirrors_the_labels_with_the_images(folder, monkeypatch):
    from ssv.viewpoint import flip_angles

    t = SSVTrainer(tiny_config(folder, supervised=True))
    batch = next(t.batches(0))
    seen = {}
    forward, encode = t.V.forward, t.head.encode
    monkeypatch.setattr(t.V, "forward", lambda x: (seen.__setitem__("x", x), forward(x))[1])
    monkeypatch.setattr(t.head, "encode", lambda a: (seen.__setitem__("angles", a), encode(a))[1])
    torch.manual_seed(0)  # torch.rand(4) < 0.5: flips items 0, 2, 3, not 1
    t.train_step(batch, 0)
    x0 = to_unit_range(seen["x"])  # back to [0, 1]
    labels = batch["angles"].float()
    mirrored = [not torch.allclose(x0[i], batch["image"][i], atol=1e-5) for i in range(len(labels))]
    assert any(mirrored) and not all(mirrored)
    for i, m in enumerate(mirrored):
        if m:
            torch.testing.assert_close(x0[i], torch.flip(batch["image"][i], dims=[-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["angles"][i], flip_angles(labels[i:i + 1])[0] if m else labels[i])


def test_gradients_are_averaged_over_ranks_not_summed(monkeypatch):
    """Rank 0 holds gradient g, the other rank h: all_reduce (in place) sums them and each rank must end with
    (g + h) / 2 (a missing division doubles the step under SGD and changes Adam's epsilon balance)."""
    import ssv.trainer as ssv_trainer

    net = torch.nn.Linear(3, 2)
    net(torch.ones(4, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    others = [torch.randn_like(g) for g in grads]  # the other rank's gradients
    pending = {p.grad.data_ptr(): h for p, h in zip(net.parameters(), others)}
    monkeypatch.setattr(ssv_trainer.dist_utils, "is_distributed", lambda: True)
    monkeypatch.setattr(ssv_trainer.dist_utils, "world_size", lambda: 2)
    monkeypatch.setattr(ssv_trainer.dist, "all_reduce", lambda t: t.add_(pending.pop(t.data_ptr())))
    ssv_trainer._average_gradients(net)
    assert not pending  # every gradient was reduced in place
    for p, g, h in zip(net.parameters(), grads, others):
        assert torch.allclose(p.grad, (g + h) / 2)


def test_each_term_and_gradient_of_a_step_replays_from_its_own_samples(folder):
    """One step's reported terms, and the gradients each optimiser steps with, recomputed here from the step's own
    samples (z, v) with the networks as they were and the functions of ``ssv.losses``, written out term by term:
    which image is compared with which, which side is the target (no gradient), what reaches V and what reaches S.
    (The gradient penalty is off: its interpolation draws are tested on their own.)"""
    import copy

    from ssv import losses
    from ssv.networks import to_model_range
    from ssv.viewpoint import flip_angles

    t = SSVTrainer(tiny_config(folder, **{**WEIGHTS, "gp_weight": 0.0}))
    c, head = t.config, t.head
    G0, V0 = copy.deepcopy(t.G).train(), copy.deepcopy(t.V).train()
    draws = []
    for name in ("sample_z", "sample_v"):
        def spy(n, sample=getattr(t, name)):
            draws.append(sample(n))
            return draws[-1]
        setattr(t, name, spy)
    grads = {}
    for key, opt, module in (("V", t.opt_V, t.V), ("G", t.opt_G, t.G)):
        def spy_step(*a, step=opt.step, key=key, module=module, **k):
            grads[key] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            return step(*a, **k)
        opt.step = spy_step

    def stepped_with(recorded, total, module):  # the optimiser's gradients == autograd of the replayed total
        params = dict(module.named_parameters())
        for n, expected in zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)):
            if expected is None:
                assert n not in recorded or not recorded[n].any(), n
            else:
                torch.testing.assert_close(recorded[n], expected, rtol=1e-3, atol=1e-6, msg=n)

    batch = next(t.batches(0))
    terms = {k: float(v) for k, v in t.train_step(batch, 0).items()}
    z1, v1, z2, z3, v2, v3 = draws  # the V step's z and v, then the S step's z2, z3, v2, v3

    # ---- V step: S as it was (frozen), V as it was
    x = to_model_range(batch["image"])
    with torch.no_grad():
        fake = G0(z1, v1)
    real, mirrored, seen = V0(x), V0(losses.hflip(x)), V0(fake)
    d = {"d_critic": losses.wgan_critic_loss(real["score"], seen["score"], drift=c["drift"]),
         "d_style": losses.style_loss(seen["z"], z1),
         "d_view": head.loss(seen["view"], head.encode(v1)),
         # the mirrored real image: the real one's viewpoint mirrored (no gradient through the target), its style
         "d_sym": losses.view_symmetry_loss(head.loss, mirrored["view"], head.pseudo_target(real["view"], flip=True),
                                            mirrored["z"], real["z"])}
    for p in G0.parameters():
        p.requires_grad_(False)
    recon = G0(real["z"], V0.decode(real["view"]))  # L_imc reaches V through the predicted style and viewpoint
    with torch.no_grad():
        feat_real = t.phi(x)
    d["d_imc"] = losses.image_consistency_loss(feat_real, t.phi(recon))
    for k, v in d.items():
        assert terms[k] == pytest.approx(float(v.detach()), rel=1e-4, abs=1e-6), k
    total = d["d_critic"] + c["w_style"] * d["d_style"] + c["w_view"] * d["d_view"] + c["w_sym"] * d["d_sym"] \
        + c["w_imc"] * d["d_imc"]
    stepped_with(grads["V"], total, V0)

    # ---- S step: S as it was, V after its step (frozen)
    for p in G0.parameters():
        p.requires_grad_(True)
    V1 = t.V
    zs, vs = torch.cat([z2, z2, z3]), torch.cat([v2, v3, v2])
    images = G0(zs, vs)
    out = V1(images)
    n_g = len(z2)
    g = {"g_adv": -out["score"].mean(),
         "g_style": losses.style_loss(out["z"], zs),
         "g_view": head.loss(out["view"], head.encode(vs)),
         # S(z, flipped v) against the mirrored S(z, v): only the flipped-view render is pulled
         "g_sym": losses.generator_symmetry_loss(G0(z2, flip_angles(v2)), images[:n_g])}
    for k, v in g.items():
        assert terms[k] == pytest.approx(float(v.detach()), rel=1e-4, abs=1e-6), k
    total_g = g["g_adv"] + c["w_style"] * g["g_style"] + c["w_view"] * g["g_view"] + c["w_gsym"] * g["g_sym"]
    stepped_with(grads["G"], total_g, G0)
