"""``viewssl train ssv``: train SSV (or its supervised baseline) on an image folder."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import click

from common.cli import resolve_device, train
from common.errors import ViewsslError

log = logging.getLogger("viewssl.ssv.cli")

PRESET_CHOICES = ("cpu", "cpu64", "cpu64w", "paper")
DEFAULT_STEPS = {"cpu": 4000, "cpu64": 4000, "cpu64w": 4000, "paper": 500_000}


def run_tag(data: str | Path, supervised: bool = False, no_imc: bool = False, no_sym: bool = False) -> str:
    """Run-folder tag: ``ssv-<parent>-<folder>`` of the data path; ``ssv-sup-...`` for the supervised baseline, and
    ``ssv-no_imc-...``, ``ssv-no_sym-...``, ``ssv-no_imc_sym-...`` for the ablations (so ``--resume auto`` finds a run
    of the same row)."""
    p = Path(data).resolve()
    parts = [x for x in (p.parent.name, p.name) if x]
    dropped = "_".join(loss for loss, off in (("imc", no_imc), ("sym", no_sym)) if off)
    kind = "ssv-sup" if supervised else f"ssv-no_{dropped}" if dropped else "ssv"
    tag = "-".join([kind, *parts])
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)


def build_config(
    preset: str,
    data: str | None,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    g_group: int | None = None,
    eval_data: str | None = None,
    no_imc: bool = False,
    no_sym: bool = False,
    phi: str = "auto",
    phi_weights: str | None = None,
    viewpoint_head: str = "spherical",
    supervised: bool = False,
    az_range_deg: float | None = None,
    el_range_deg: float | None = None,
    tilt_range_deg: float | None = None,
    lr_d: float | None = None,
    lr_g: float | None = None,
    lr_supervised: float | None = None,
    augment_gain: float | None = None,
    highpass: float | None = None,
    ball_mask: bool | None = None,
    v_ema_decay: float | None = None,
    lr_decay: tuple[int, int] | None = None,
    lr_final: float | None = None,
    weights: dict | None = None,
    num_workers: int = 0,
    steps: int | None = None,
) -> dict:
    """The trainer config from command-line values (degrees -> radians here; ``phi: auto`` resolved and recorded)."""
    from .features import PHI_CHOICES, resolve_phi
    from .trainer import default_config

    overrides: dict = {"seed": seed, "viewpoint_head": viewpoint_head, "supervised": supervised,
                       "num_workers": num_workers}
    if data is not None:
        overrides["data"] = str(Path(data).resolve())
    if eval_data is not None:
        overrides["eval_data"] = str(Path(eval_data).resolve())
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if g_group is not None:
        overrides["g_group"] = g_group
    for key, deg in (("az_range", az_range_deg), ("el_range", el_range_deg), ("tilt_range", tilt_range_deg)):
        if deg is not None:
            if not 0 <= deg <= 180:
                raise ViewsslError(f"--{key.replace('_', '-')}: {deg} is not in [0, 180] degrees")
            overrides[key] = math.radians(deg)
    if supervised and (lr_d is not None or lr_g is not None):
        raise ViewsslError("--lr-d and --lr-g have no effect with --supervised (its V trains at --lr-supervised)")
    if lr_supervised is not None and not supervised:
        raise ViewsslError("--lr-supervised has no effect without --supervised (SSV's V trains at --lr-d)")
    for key, lr in (("lr_d", lr_d), ("lr_g", lr_g), ("lr_supervised", lr_supervised)):
        if lr is not None:
            if not lr > 0:
                raise ViewsslError(f"--{key.replace('_', '-')}: a learning rate must be positive ({lr})")
            overrides[key] = lr
    if augment_gain is not None:
        if not 0 <= augment_gain <= 1:
            raise ViewsslError(f"--augment-gain: {augment_gain} is not in [0, 1]")
        if supervised and augment_gain > 0:
            raise ViewsslError("--augment-gain has no effect with --supervised (the ramps are for SSV's V)")
        overrides["augment_gain"] = augment_gain
    if highpass is not None:
        if highpass != 0 and not 0.5 <= highpass <= 8:
            raise ViewsslError(f"--highpass: sigma {highpass} is not 0 (off) or in [0.5, 8] pixels")
        if highpass > 0 and (augment_gain or 0) > 0:
            raise ViewsslError("--augment-gain has no effect with --highpass (the high-pass removes its linear ramps)")
        overrides["d_highpass"] = highpass
    if ball_mask is not None:
        overrides["g_ball_mask"] = bool(ball_mask)
    if v_ema_decay is not None:
        if not 0 <= v_ema_decay < 1:
            raise ViewsslError(f"--v-ema-decay: {v_ema_decay} is not 0 (off) or in (0, 1)")
        overrides["v_ema_decay"] = v_ema_decay
    if lr_decay is not None:
        start, end = (int(x) for x in lr_decay)
        if not 0 <= start < end:
            raise ViewsslError(f"--lr-decay {start} {end}: expected 0 <= START < END (steps)")
        overrides["lr_decay_start"], overrides["lr_decay_end"] = start, end
    if lr_final is not None:
        if not 0 <= lr_final <= 1:
            raise ViewsslError(f"--lr-final: {lr_final} is not in [0, 1]")
        if lr_decay is None:
            raise ViewsslError("--lr-final has no effect without --lr-decay START END")
        overrides["lr_final"] = lr_final
    for key, value in (weights or {}).items():
        if value is not None:
            if value < 0:
                raise ViewsslError(f"--{key.replace('_', '-')}: a loss weight cannot be negative ({value})")
            overrides[key] = value
    if no_imc:
        overrides["w_imc"] = 0.0
    if no_sym:
        overrides["w_sym"] = 0.0
        overrides["w_gsym"] = 0.0
    if steps is not None:
        overrides["steps"] = steps
    if phi_weights and phi in ("critic", "random"):  # recorded, it would refuse a resume with another file
        raise ViewsslError(f"--phi-weights is read by --phi auto, alexnet or vgg; --phi {phi} reads no file")
    overrides["phi_weights"] = str(Path(phi_weights).resolve()) if phi_weights else None
    config = default_config(preset, **overrides)
    if config["batch_size"] < 1 or config["g_group"] < 1:
        raise ViewsslError("--batch-size and --g-group must be at least 1")
    # record the concrete Phi when L_imc uses it (so config.json says what ran); otherwise keep the name as given
    if not supervised and config["w_imc"] > 0:
        config["phi"] = resolve_phi(phi, phi_weights)
    elif phi not in PHI_CHOICES:
        raise ViewsslError(f"--phi: unknown feature network {phi!r} (choose from {', '.join(PHI_CHOICES)})")
    else:
        config["phi"] = phi
    return config


@train.command("ssv", context_settings={"show_default": True})
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Training images: a labels.csv folder (labels ignored unless --supervised), or any folder the data "
                   "module opens (plain images, 300W-LP, the synthetic heads DIR/heads/train).")
@click.option("--preset", type=click.Choice(PRESET_CHOICES), default="cpu",
              help="Network sizes: cpu = 32x32 for two CPU cores, cpu64 = the same at 64x64, cpu64w = cpu64 with "
                   "twice S's channels, paper = the release's 128x128 networks (batch 2).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"),
              help="Root of the numbered run folders (OUT/NNNNN-ssv-<data>).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Total training steps (one V step + one S step each) [default: 4000 for cpu, cpu64 and cpu64w; "
                   "500000 for paper].")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue a run: 'auto' = the newest run in --out of this data and row (SSV, supervised, "
                   "ablation) whose config matches and that has a checkpoint (else start fresh); or a run folder / "
                   "checkpoint file.")
@click.option("--force", is_flag=True, help="Resume even if the config differs from the checkpoint's (with --resume "
                                            "auto: the newest run of this data and row, whatever its config).")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--seed", type=click.IntRange(min=0), default=0,
              help="Seed of initial weights, data order and all sampling.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Real images per step [default: cpu 16, paper 2].")
@click.option("--g-group", type=click.IntRange(min=1), default=None,
              help="Generator samples per group in the S step (3 groups: same style / same view) "
                   "[default: cpu 8, paper 2].")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Labelled test folder (labels.csv) for periodic pose evaluation of V.")
@click.option("--eval-every", type=click.IntRange(min=0), default=None,
              help="Evaluate every N steps (0 = only at the end) [default: 500 with --eval-data].")
@click.option("--no-imc", is_flag=True, help="Ablation: drop the image-consistency loss L_imc (w_imc = 0).")
@click.option("--no-sym", is_flag=True, help="Ablation: drop both symmetry losses (w_sym = w_gsym = 0).")
@click.option("--phi", type=click.Choice(("auto", "alexnet", "vgg", "critic", "random")), default="auto",
              help="Frozen feature network of L_imc. auto = ImageNet AlexNet/VGG if their weights are on this "
                   "machine, else the critic's own (detached) trunk. Nothing is downloaded.")
@click.option("--phi-weights", type=click.Path(path_type=Path), default=None,
              help="A local torchvision AlexNet/VGG-16 state dict for --phi alexnet|vgg, or auto (which takes the "
                   "network the file holds); read with weights_only.")
@click.option("--viewpoint-head", type=click.Choice(("spherical", "6d")), default="spherical",
              help="spherical = SSV's (cos^2, sin^2) magnitudes + sign quadrants per angle; 6d = continuous 6-D "
                   "rotation.")
@click.option("--supervised", is_flag=True,
              help="Train the same viewpoint network with the labels instead (the supervised baseline).")
@click.option("--az-range", type=float, default=None, help="Sampled azimuth range +- DEG [default: 80.2].")
@click.option("--el-range", type=float, default=None, help="Sampled elevation range +- DEG [default: 68.8].")
@click.option("--tilt-range", type=float, default=None, help="Sampled tilt range +- DEG [default: 43.0].")
@click.option("--lr-d", type=float, default=None,
              help="Learning rate of V (the critic; not with --supervised) [default: 2e-3 for the cpu presets, "
                   "5e-4 for paper].")
@click.option("--lr-g", type=float, default=None,
              help="Learning rate of S (mapping MLP: x0.01; not with --supervised) [default: 2e-3 for the cpu "
                   "presets, 5e-4 for paper].")
@click.option("--lr-supervised", type=float, default=None,
              help="Learning rate of V in the supervised baseline (with --supervised) [default: 1e-3].")
@click.option("--augment-gain", type=float, default=None,
              help="Random linear illumination ramps (gain up to this, in [0, 1] image units, from a random image "
                   "edge) on every image V reads, which makes shading a less reliable cue to S's azimuth; 0 = off, as "
                   "the release [default: 0].")
@click.option("--highpass", type=float, default=None,
              help="V (critic and heads) reads its input minus a Gaussian blur of this sigma in pixels (0 or 0.5 to "
                   "8), so linear shading and background ramps are invisible to it and smooth ones faint; applies "
                   "to --supervised too; excludes --augment-gain; 0 = off, as the release [default: 0].")
@click.option("--ball-mask/--no-ball-mask", default=None,
              help="S multiplies its rotated 3-D volume by a ball, so the volume has the same outline from every "
                   "viewpoint (without it the turning cube's corners draw a viewpoint cue no real image has); not in "
                   "the release [default: off].")
@click.option("--v-ema-decay", type=float, default=None,
              help="Keep a moving average of V's weights with this decay, evaluated beside V (viewssl eval --ema); "
                   "it never changes the training; 0 = none, as the release [default: 0.998].")
@click.option("--lr-decay", type=int, nargs=2, default=None, metavar="START END",
              help="Cosine decay of every learning rate from step START to step END, down to --lr-final x, constant "
                   "after; a finished run can be resumed with a decay starting at its last step; not in the release "
                   "[default: none].")
@click.option("--lr-final", type=float, default=None,
              help="Learning-rate factor reached at the end of --lr-decay [default: 0.1].")
@click.option("--w-imc", type=float, default=None, help="Weight of L_imc [default: 0.4, applied once].")
@click.option("--w-sym", type=float, default=None, help="Weight of the symmetry loss on V [default: 0.4].")
@click.option("--w-gsym", type=float, default=None, help="Weight of the symmetry loss on S [default: 0.5].")
@click.option("--w-style", type=float, default=None, help="Weight of the style cycle term [default: 0.8].")
@click.option("--w-view", type=float, default=None, help="Weight of the viewpoint cycle term [default: 0.8].")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500,
              help="Checkpoint every N steps (0 = only at the end; a stop by SIGTERM/SIGINT always writes one).")
@click.option("--log-every", type=click.IntRange(min=0), default=10, help="Log losses every N steps (0 = never).")
@click.option("--media-every", type=click.IntRange(min=0), default=500,
              help="Write azimuth/elevation sweep grids every N steps (0 = never).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, help="Image-loading worker processes.")
def train_ssv(data, preset, out, steps, resume, force, device, seed, batch_size, g_group, eval_data, eval_every,
              no_imc, no_sym, phi, phi_weights, viewpoint_head, supervised, az_range, el_range, tilt_range, lr_d,
              lr_g, lr_supervised, augment_gain, highpass, ball_mask, v_ema_decay, lr_decay, lr_final, w_imc, w_sym,
              w_gsym, w_style, w_view, checkpoint_every, log_every, media_every, num_workers):
    """Train SSV: synthesis network S + viewpoint network V (the critic) without pose labels.

    Writes a numbered run folder with config.json, tensorboard logs, metrics.jsonl, sample sweeps and checkpoints;
    the final V is evaluated on --eval-data when given.
    """
    from common import distributed as dist_utils
    from common.training import fit, resolve_run_dir

    from .trainer import SSVTrainer

    if not data.exists():
        raise ViewsslError("--data: no such folder", data)
    if not data.is_dir():
        raise ViewsslError("--data must be a folder (of images, or with a labels.csv)", data)
    if (data / "meta.json").is_file():
        raise ViewsslError(f"--data is a synthetic benchmark root: SSV would train on every kind and split in it, "
                           f"test images included; pass one split, e.g. {data / 'heads' / 'train'} (and --eval-data "
                           f"{data / 'heads' / 'test'})", data)
    if eval_data is not None and not eval_data.exists():
        raise ViewsslError("--eval-data: no such folder", eval_data)
    if eval_every is not None and eval_data is None:
        raise ViewsslError("--eval-every needs --eval-data (the labelled folder to evaluate on)")
    if phi_weights is not None and not phi_weights.is_file():
        raise ViewsslError("--phi-weights: no such file", phi_weights)
    steps = steps or DEFAULT_STEPS[preset]
    config = build_config(
        preset, str(data), seed=seed, batch_size=batch_size, g_group=g_group,
        eval_data=str(eval_data) if eval_data else None, no_imc=no_imc, no_sym=no_sym, phi=phi,
        phi_weights=str(phi_weights) if phi_weights else None, viewpoint_head=viewpoint_head, supervised=supervised,
        az_range_deg=az_range, el_range_deg=el_range, tilt_range_deg=tilt_range, lr_d=lr_d, lr_g=lr_g,
        lr_supervised=lr_supervised, augment_gain=augment_gain, highpass=highpass, ball_mask=ball_mask,
        v_ema_decay=v_ema_decay, lr_decay=lr_decay, lr_final=lr_final,
        weights={"w_imc": w_imc, "w_sym": w_sym, "w_gsym": w_gsym, "w_style": w_style, "w_view": w_view},
        num_workers=num_workers, steps=steps,
    )
    if eval_every is None:
        eval_every = 500 if eval_data else 0
    elif eval_every == 0 and eval_data:
        eval_every = steps  # 0 = only at the end
    dev = dist_utils.init_from_env(resolve_device(device))
    try:
        tag = run_tag(data, supervised, no_imc=config["w_imc"] == 0,
                      no_sym=config["w_sym"] == 0 and config["w_gsym"] == 0)
        trainer = SSVTrainer(config, dev)
        run_dir, resume_from = resolve_run_dir(out, tag, resume, trainer, force)
        log.info("training SSV (%s preset%s) in %s", preset, ", supervised" if supervised else "", run_dir)
        result = fit(trainer, run_dir, steps, checkpoint_every=checkpoint_every, eval_every=eval_every,
                     log_every=log_every, media_every=0 if supervised else media_every, resume=resume_from,
                     force=force)
        main = dist_utils.is_main()
    finally:
        dist_utils.destroy()
    if main:
        click.echo(f"run folder: {run_dir}")
        click.echo(f"checkpoint: {result['checkpoint']}")
        for k, v in sorted((result.get("metrics") or {}).items()):
            click.echo(f"  {k}: {v:.4g}")
