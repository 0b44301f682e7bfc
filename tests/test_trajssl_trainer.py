"""Encoder training: every method trains, exact resume, frame pairs, the CLI, the eval-model interface, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from common.data.labels import write_labels
from common.errors import ViewsslError
from common.io import load_checkpoint, write_image
from common.training import fit
from trajssl.trainer import EncoderTrainer

CPU = torch.device("cpu")
# Tiny sizes: the ImageNet stem (stride 4) keeps ResNet-18 cheap on 16 px images.
TINY = {"image_size": 16, "batch_size": 4, "proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8,
        "eval_gallery": 8, "eval_queries": 4, "small_stem": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """Several test processes share two cores: one thread each avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_fake_benchmark(root: Path, size: int = 16, n_triplets: int = 8, n_seq: int = 3, seq_len: int = 5,
                        n_obj: int = 9, seed: int = 0) -> Path:
    """A miniature benchmark folder (random images) with the layout of ``viewssl data render``."""
    g = torch.Generator().manual_seed(seed)
    root = Path(root)

    def put(folder: Path, name: str) -> str:
        write_image(folder / "images" / name, torch.rand(3, size, size, generator=g))
        return f"images/{name}"

    rows, folder = [], root / "triplets" / "train"
    for t in range(n_triplets):
        for p in range(3):
            rows.append({"path": put(folder, f"t{t}_{p}.png"), "azimuth": 0.3 * p, "elevation": 0.1, "tilt": 0.0,
                         "category": f"c{t % 2}", "instance": f"i{t}", "triplet": str(t), "position": str(p)})
    write_labels(folder / "labels.csv", rows, extra_columns=("triplet", "position"))
    rows, folder = [], root / "sequences" / "train"
    for s in range(n_seq):
        for f in range(seq_len):
            rows.append({"path": put(folder, f"s{s}_{f}.png"), "azimuth": 0.1 * f, "elevation": 0.0, "tilt": 0.0,
                         "category": f"c{s % 2}", "instance": f"i{s}", "sequence": f"seq{s}", "frame": str(f)})
    write_labels(folder / "labels.csv", rows)
    for split in ("train", "val"):
        rows, folder = [], root / "objects" / split
        for i in range(n_obj):
            rows.append({"path": put(folder, f"o{i}.png"), "azimuth": 0.5 * i, "elevation": 0.2, "tilt": 0.0,
                         "category": f"c{i % 3}", "instance": f"i{i}"})
        write_labels(folder / "labels.csv", rows)
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_fake_benchmark(tmp_path_factory.mktemp("bench"))


def _params(module) -> dict[str, torch.Tensor]:
    """The module's parameters (not its buffers: batch-norm statistics move on any forward pass in train mode)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("method,traj_weight,traj_layer", [
    ("simclr", 0.0, "pooled"), ("simclr", 0.2, "layer4"), ("vicreg", 0.0, "pooled"), ("vicreg", 0.2, "pooled"),
    ("simsiam", 0.0, "pooled"), ("simsiam", 0.2, "layer3"),
])
def test_every_method_trains_two_steps(bench, method, traj_weight, traj_layer):
    tr = EncoderTrainer({**TINY, "method": method, "data": str(bench), "steps": 2, "traj_weight": traj_weight,
                         "traj_layer": traj_layer}, CPU)
    before = {name: _params(m) for name, m in tr.modules().items()}
    batches = tr.batches(0)
    for step in range(2):
        terms = tr.train_step(next(batches), step)
        assert all(torch.isfinite(v) for v in terms.values())
    assert ("trajectory" in terms) == (traj_weight > 0)
    changed = [k for k, v in _params(tr.encoder).items() if not torch.equal(v, before["encoder"][k])]
    assert any("layer4" in k for k in changed) and any("layer1" in k for k in changed)
    for name, module in tr.modules().items():  # the heads learn too
        assert any(not torch.equal(v, before[name][k]) for k, v in _params(module).items()), name


def test_trajectory_term_gets_left_centre_right_and_its_weight(bench, monkeypatch):
    """The trajectory loss receives the tap features of (left, centre, right) in that order, and the step's loss is
    semantic + traj_weight * trajectory, gradients included (a swapped call, a dropped weight or a detached term
    passes every loss-formula test)."""
    import trajssl.trainer as trainer_module
    from trajssl.encoders import tap_vector

    seen, grads, original = [], [], trainer_module.trajectory_loss

    def spy(z_l, z_c, z_r):
        seen.append((z_l.detach(), z_c.detach(), z_r.detach()))
        assert z_l.requires_grad and z_c.requires_grad and z_r.requires_grad  # the encoder is trained through it
        out = original(z_l, z_c, z_r)
        out.register_hook(lambda g: grads.append(g.item()))  # d loss / d trajectory
        return out

    tr = EncoderTrainer({**TINY, "method": "simclr", "data": str(bench), "steps": 1, "traj_weight": 0.3}, CPU)
    batch = next(tr.batches(0))
    with torch.no_grad():
        taps = tr.net.encoder(torch.cat([batch["left"], batch["image"], batch["right"]]), taps=(tr.net.traj_layer,))
        want = tap_vector(taps[tr.net.traj_layer], tr.net.tap_grid).chunk(3)
    monkeypatch.setattr(trainer_module, "trajectory_loss", spy)
    terms = tr.train_step(batch, 0)
    for got, expected in zip(seen[0], want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["semantic"].item() + 0.3 * terms["trajectory"].item(),
                                                 rel=1e-6)
    assert grads == [pytest.approx(0.3)]


def test_simclr_uses_its_configured_temperature():
    from trajssl.losses import info_nce_loss
    from trajssl.methods import METHODS

    method = METHODS["simclr"](8, {"temperature": 0.5, "proj_hidden_dim": 16, "proj_dim": 8})
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    got = method.loss({"z": z1}, {"z": z2})["semantic"]
    torch.testing.assert_close(got, info_nce_loss(z1, z2, 0.5))
    assert not torch.allclose(got, info_nce_loss(z1, z2, 0.2))


def test_vicreg_uses_its_configured_weights():
    from trajssl.losses import vicreg_loss
    from trajssl.methods import METHODS

    weights = {"sim_weight": 2.0, "var_weight": 3.0, "cov_weight": 5.0}
    method = METHODS["vicreg"](8, {**weights, "proj_hidden_dim": 16, "proj_dim": 8})
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    got = method.loss({"z": z1}, {"z": z2})["semantic"]
    torch.testing.assert_close(got, vicreg_loss(z1, z2, **weights))
    assert not torch.allclose(got, vicreg_loss(z1, z2))


@pytest.mark.parametrize("pairs", ["same", "nearby", "distant"])
def test_frame_pairs_train(bench, pairs):
    tr = EncoderTrainer({**TINY, "method": "simsiam", "data": str(bench), "steps": 1, "pairs": pairs,
                         "traj_weight": 0.2}, CPU)
    batch = next(tr.batches(0))
    assert batch["partner"].shape == batch["image"].shape and batch["triplet"].shape[0] == 3 * 4
    if pairs == "same":
        assert torch.equal(batch["partner"], batch["image"])
    assert torch.isfinite(tr.train_step(batch, 0)["loss"])


def test_partner_offsets(bench):
    from trajssl.data import SequenceFrames

    frames = SequenceFrames(bench / "sequences" / "train", 16)
    seq, frame = frames.table.sequence_index, frames.table.frame
    idx = list(range(len(frames)))
    torch.manual_seed(0)
    for _ in range(20):
        near = frames.partners(idx, "nearby")
        far = frames.partners(idx, "distant")
        for i, n, f in zip(idx, near, far):
            assert seq[n] == seq[i] and 1 <= abs(frame[n] - frame[i]) <= 2
            assert seq[f] == seq[i] and f != i
    assert frames.partners(idx, "same") == idx


@pytest.mark.parametrize("variant", [{"method": "vicreg", "traj_weight": 0.2},
                                     {"method": "simsiam", "pairs": "nearby"}])
def test_resume_equals_uninterrupted(bench, tmp_path, variant):
    cfg = {**TINY, **variant, "data": str(bench), "schedule_steps": 4, "seed": 3, "warmup_steps": 1}
    full = EncoderTrainer({**cfg, "steps": 4}, CPU)
    fit(full, tmp_path / "full", steps=4, checkpoint_every=2, progress=False)
    first = EncoderTrainer({**cfg, "steps": 2}, CPU)
    fit(first, tmp_path / "half", steps=2, checkpoint_every=2, progress=False)
    second = EncoderTrainer({**cfg, "steps": 4}, CPU)
    result = fit(second, tmp_path / "half", steps=4, checkpoint_every=2, resume="auto", progress=False)
    assert result["start_step"] == 2
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "ckpt-00000004.pt")
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "ckpt-00000004.pt")
    for group in ("encoder", "heads"):
        for k, v in a["modules"][group].items():
            assert torch.equal(v, b["modules"][group][k]), f"{group}.{k} differs after resume"
    sa, sb = a["optimizers"]["optimizer"]["state"], b["optimizers"]["optimizer"]["state"]
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)


def test_resume_refuses_other_config_unless_forced(bench, tmp_path):
    cfg = {**TINY, "method": "simclr", "data": str(bench), "steps": 1}
    fit(EncoderTrainer(cfg, CPU), tmp_path / "run", steps=1, progress=False)
    with pytest.raises(ViewsslError, match="temperature"):
        fit(EncoderTrainer({**cfg, "temperature": 0.5}, CPU), tmp_path / "run", steps=2, resume="auto", progress=False)
    r = fit(EncoderTrainer({**cfg, "temperature": 0.5}, CPU), tmp_path / "run", steps=2, resume="auto", force=True,
            progress=False)
    assert r["step"] == 2
    # a forced new lr and weight decay are the ones trained with (not the checkpoint's), and the logged lr is the
    # one applied
    forced = EncoderTrainer({**cfg, "temperature": 0.5, "lr": 0.01, "weight_decay": 0.0}, CPU)
    r = fit(forced, tmp_path / "run", steps=3, resume="auto", force=True, progress=False, log_every=1)
    weights = forced.optimizer.param_groups[0]
    assert weights["base_lr"] == 0.01 and weights["weight_decay"] == 0.0
    assert r["terms"]["lr"] == pytest.approx(weights["lr"])


def test_resume_with_more_steps_does_not_stretch_the_schedule(bench, tmp_path):
    """The cosine horizon is part of the config: resuming a 2-step run with --steps 4 would put steps 2-3 on a
    4-step schedule that the first two steps did not follow; it is refused unless the horizon is kept."""
    cfg = {**TINY, "method": "vicreg", "data": str(bench), "seed": 0}
    first = EncoderTrainer({**cfg, "steps": 2}, CPU)
    assert (first.config["schedule_steps"], first.config["warmup_steps"]) == (2, 0)
    fit(first, tmp_path / "run", steps=2, progress=False)
    with pytest.raises(ViewsslError, match="schedule_steps: 2 -> 4"):
        fit(EncoderTrainer({**cfg, "steps": 4}, CPU), tmp_path / "run", steps=4, resume="auto", progress=False)
    kept = EncoderTrainer({**cfg, "steps": 4, "schedule_steps": 2}, CPU)
    assert fit(kept, tmp_path / "run", steps=4, resume="auto", progress=False)["start_step"] == 2
    assert kept.schedule() == (2, 0)
    # a checkpoint from before the schedule was resolved (None: the horizon was its --steps) resumes when they agree
    old = {**first.config, "schedule_steps": None, "warmup_steps": None, "steps": 40}
    assert {"schedule_steps", "warmup_steps"} <= set(EncoderTrainer({**cfg, "steps": 40}, CPU).resume_ignored(old, 2))
    assert "schedule_steps" not in EncoderTrainer({**cfg, "steps": 80}, CPU).resume_ignored(old, 2)


def test_online_monitors(bench):
    """The kNN monitors on features that hold each image's category (weighted 3) and rotation: every query's category
    is found, and its pose error is the geodesic distance to the closest rotation of its category in the gallery
    (scipy), summarised by numpy."""
    from scipy.spatial.transform import Rotation

    from common.geometry import angles_to_matrix

    tr = EncoderTrainer({**TINY, "method": "vicreg", "data": str(bench), "steps": 1}, CPU)
    m = tr.evaluate(1)
    for tap in ("pooled", "layer3"):  # the encoder's own features: figures in range
        assert 0.0 <= m[f"knn_category_acc/{tap}"] <= 1.0
        assert 0.0 <= m[f"knn_pose_median_deg/{tap}"] <= 180.0
    gallery, queries = tr._eval_data()
    # queries turned 3 to 17 deg off the gallery's views, each by another angle: the nearest rotation is no exact match
    turn = torch.linspace(0.05, 0.3, len(queries["angles"]))[:, None] * torch.tensor([1.0, 0.5, 0.0])
    queries = {**queries, "angles": queries["angles"] + turn}
    tr._eval_cache = (gallery, queries)

    def oracle(s):
        rot = angles_to_matrix(*s["angles"].double().unbind(1))
        onehot = torch.nn.functional.one_hot(s["category"], 4).double() * 3
        return torch.cat([onehot, rot.reshape(-1, 9)], 1).float(), Rotation.from_matrix(rot.numpy())

    (fg, rg), (fq, rq) = oracle(gallery), oracle(queries)
    tr.features = lambda images, taps: {t: fg if images is gallery["image"] else fq for t in taps}
    m = tr.evaluate(1)
    cats = gallery["category"].numpy()
    err = np.array([np.degrees(min((rg[j].inv() * rq[i]).magnitude() for j in np.nonzero(cats == c)[0]))
                    for i, c in enumerate(queries["category"].tolist())])
    assert err.max() > 1  # no query has its exact view in the gallery: the errors tell the neighbours apart
    for tap in ("pooled", "layer3"):
        assert m[f"knn_category_acc/{tap}"] == 1.0
        assert m[f"knn_pose_median_deg/{tap}"] == pytest.approx(np.median(err), abs=1e-3)
        assert m[f"knn_pose_acc30/{tap}"] == pytest.approx(np.mean(err < 30))


def test_model_io_features(bench, tmp_path):
    from trajssl.model_io import load_encoder_model

    tr = EncoderTrainer({**TINY, "method": "simsiam", "data": str(bench), "steps": 1, "small_stem": True}, CPU)
    r = fit(tr, tmp_path / "run", steps=1, progress=False)
    model = load_encoder_model(load_checkpoint(r["checkpoint"]), CPU)
    assert model.family == "encoder" and model.input_size == 16
    assert model.predict_angles(torch.rand(2, 3, 16, 16)) is None
    f = model.features(torch.rand(3, 3, 24, 24), ["pooled", "layer3", "layer4"])
    # 16 px, small stem: layer3 4x4x256, layer4 2x2x512
    assert f["pooled"].shape == (3, 512) and f["layer3"].shape == (3, 256 * 16) and f["layer4"].shape == (3, 512 * 4)
    tr.encoder.eval()
    with torch.no_grad():
        ref = tr.encoder(torch.rand(1, 3, 16, 16).clamp(0.5, 0.5))["pooled"]
    assert torch.allclose(model.features(torch.full((1, 3, 16, 16), 0.5), ["pooled"])["pooled"], ref, atol=1e-5)
    model.encoder.train()  # a model shared with training: features are still the eval-mode ones, the mode stays
    assert torch.allclose(model.features(torch.full((1, 3, 16, 16), 0.5), ["pooled"])["pooled"], ref, atol=1e-5)
    assert model.encoder.training
    ckpt = load_checkpoint(r["checkpoint"])
    ckpt["config"]["small_stem"] = False  # the weights are the small stem's: the error names the misfit weights
    with pytest.raises(ViewsslError, match=r"encoder weights do not match the checkpoint's config \((size mismatch "
                                           r"for|Missing key\(s\)|Unexpected key\(s\))"):
        load_encoder_model(ckpt, CPU)


def test_model_io_registered_with_eval():
    import common.eval as eval_mod
    import trajssl.model_io

    assert eval_mod.FAMILIES["encoder"] is trajssl.model_io.load_encoder_model


def _cli():
    from experiments.cli import cli

    return cli


def test_cli_trains_and_resumes(bench, tmp_path):
    runner = CliRunner()
    args = ["train", "encoder", "--data", str(bench), "--method", "vicreg", "--traj-weight", "0.2", "--steps", "2",
            "--batch-size", "4", "--image-size", "16", "--out", str(tmp_path), "--eval-every", "2",
            "--checkpoint-every", "1", "--log-every", "1"]
    r = runner.invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    runs = sorted(tmp_path.glob("*-encoder-vicreg-traj0.2-augment"))
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "ckpt-00000002.pt").is_file()
    assert (runs[0] / "metrics.jsonl").read_text().count('"kind": "eval"') == 1
    # Three steps under the first run's 2-step schedule: the same config, so --resume auto continues that run.
    r = runner.invoke(_cli(), args[:-8] + ["--steps", "3", "--schedule-steps", "2", "--resume", "auto", "--out",
                                           str(tmp_path), "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    assert sorted(tmp_path.glob("*-encoder-vicreg*")) == runs
    assert (runs[0] / "checkpoints" / "ckpt-00000003.pt").is_file()
    # Another seed is another run: --resume auto starts a new folder rather than continue the first one
    r = runner.invoke(_cli(), args[:-8] + ["--steps", "1", "--seed", "1", "--resume", "auto", "--out",
                                           str(tmp_path), "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    assert len(sorted(tmp_path.glob("*-encoder-vicreg*"))) == 2
    assert (runs[0] / "checkpoints" / "ckpt-00000003.pt").is_file()


@pytest.mark.parametrize("args,message", [
    (["--data", "{missing}"], "no such folder"),
    (["--data", "{empty}"], "no training images"),
    (["--data", "{bench}", "--pairs", "nearby", "--traj-weight", "0.2", "--data", "{objects}"], "needs"),
    (["--data", "{bench}", "--method", "byol"], "byol"),
    (["--data", "{bench}", "--resume", "{missing}"], "--resume"),
    (["--data", "{bench}", "--resume", "{ssv_ckpt}"], "'ssv' checkpoint"),
    (["--data", "{bench}", "--resume", "{junk_ckpt}"], "not a readable viewssl checkpoint"),
    (["--data", "{bench}", "--traj-weight", "-1"], "--traj-weight"),
    (["--data", "{bench}", "--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--data", "{bench}", "--weight-decay", "-1"], "--weight-decay -1.0: must be a finite number >= 0"),
    pytest.param(["--data", "{bench}", "--device", "mps"], "--device mps: MPS is not available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_cli_bad_input_one_line_exit_2(bench, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    from common.io import atomic_save

    atomic_save({"family": "ssv", "config": {}, "step": 1, "modules": {}}, tmp_path / "ssv.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    fill = {"missing": str(tmp_path / "nope"), "empty": str(empty), "bench": str(bench),
            "objects": str(bench / "objects" / "train"), "ssv_ckpt": str(tmp_path / "ssv.pt"),
            "junk_ckpt": str(tmp_path / "junk.pt")}
    args = [a.format(**fill) for a in args]
    r = CliRunner().invoke(_cli(), ["train", "encoder", *args, "--steps", "1", "--batch-size", "4", "--image-size",
                                    "16", "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_triplet_folder_rejects_incomplete_triplets(tmp_path):
    from trajssl.data import TripletFolder

    folder = tmp_path / "t"
    rows = []
    for p in (0, 1):
        write_image(folder / f"{p}.png", torch.rand(3, 8, 8))
        rows.append({"path": f"{p}.png", "azimuth": 0.0, "elevation": 0.0, "tilt": 0.0, "triplet": "7",
                     "position": str(p)})
    write_labels(folder / "labels.csv", rows, extra_columns=("triplet", "position"))
    with pytest.raises(ViewsslError, match="triplet 7"):
        TripletFolder(folder)


@pytest.mark.parametrize("sync_flip", [True, False])
def test_a_frame_pair_shares_its_flip_when_asked(sync_flip):
    """SemanticViews with ``sync_flip``: both views of a pair are mirrored or neither (crops and colours, left out
    here, stay independent); without it each view draws its own flip."""
    from trajssl.augment import SemanticViews

    torch.manual_seed(0)
    views = SemanticViews(8)
    views.pipeline = torch.nn.Identity()  # the flip alone
    x = torch.zeros(64, 3, 8, 8)
    x[..., :4] = 1.0  # left half bright: a mirrored view is told apart
    v1, v2 = views(x, x.clone(), sync_flip=sync_flip)
    flipped1, flipped2 = v1[:, 0, 0, -1] == 1, v2[:, 0, 0, -1] == 1
    assert 0 < int(flipped1.sum()) < 64 and 0 < int(flipped2.sum()) < 64  # p 0.5: some of each
    assert torch.equal(flipped1, flipped2) == sync_flip
