"""``viewssl train encoder``: train a Siamese encoder (SimCLR / VICReg / SimSiam, + trajectory loss, frame pairs)."""
from __future__ import annotations

from pathlib import Path

import click

from common.cli import resolve_device, train
from common.errors import ViewsslError

from . import model_io  # noqa: F401  (registers the "encoder" family with common.eval)
from .data import PAIR_MODES
from .methods import METHODS
from .optim import OPTIMIZERS
from .trainer import TRAJ_LAYERS


def run_tag(method: str, traj_weight: float, traj_layer: str, pairs: str) -> str:
    tag = f"encoder-{method}"
    if traj_weight > 0:
        tag += f"-traj{traj_weight:g}" + ("" if traj_layer == "pooled" else f"-{traj_layer}")
    return f"{tag}-{pairs}"


@train.command("encoder")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Dataset folder: the synthetic benchmark root (triplets/train, sequences/train, objects/) or a "
                   "labels.csv folder of your own images.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="vicreg", show_default=True,
              help="Semantic (view-invariance) objective.")
@click.option("--traj-weight", type=float, default=0.0, show_default=True,
              help="Weight of the trajectory loss on unaugmented geodesic triplets (paper: 0.2; 0 = off). Needs "
                   "DIR/triplets/train (--pairs dual: consecutive frames of DIR/sequences/train instead).")
@click.option("--traj-layer", type=click.Choice(TRAJ_LAYERS), default="pooled", show_default=True,
              help="Features the trajectory loss straightens: pooled 512-d, or a mid-layer map average-pooled to "
                   "4x4 cells and flattened.")
@click.option("--pairs", type=click.Choice(PAIR_MODES), default="augment", show_default=True,
              help="Positive pairs: two augmentations of one image (augment), or a frame and a partner of the same "
                   "sequence at offset 0 (same), 1-2 frames in frame order (nearby) or any other frame, adjacent "
                   "ones included (distant), from DIR/sequences/train; dual = two projector heads on one trunk, one "
                   "on nearby and one on distant pairs, losses summed.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Total optimiser steps (a resumed run counts the steps already done).")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Global batch (split over processes under torchrun).")
@click.option("--image-size", type=click.IntRange(min=16), default=32, show_default=True,
              help="Images are resized to this many pixels square.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="Optimiser [default: lars for simclr/vicreg, sgd for simsiam].")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate [default: the method's base lr x batch/256; adamw 1e-3].")
@click.option("--weight-decay", type=float, default=None, help="Weight decay [default: the method's].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps before the cosine decay [default: 5% of the horizon].")
@click.option("--schedule-steps", type=click.IntRange(min=1), default=None,
              help="Horizon of the cosine learning-rate decay [default: --steps]. It is part of the run's config: to "
                   "train a finished run further under its own schedule, resume it with --schedule-steps set to its "
                   "horizon (the rate stays at the final value after it).")
@click.option("--stem", type=click.Choice(["small", "imagenet"]), default="small", show_default=True,
              help="ResNet-18 first layers: small = 3x3 stride-1 conv, no max-pool (for 32-64 px); "
                   "imagenet = 7x7/2 + pool.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local torchvision resnet18 state dict to start from (default: random initialisation).")
@click.option("--augment", type=click.Choice(["full", "none"]), default="full", show_default=True,
              help="Semantic-view augmentations (crop, flip, colour jitter, grayscale, blur) or none.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of initialisation, data order and augmentation.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loading worker processes (image decoding only; augmentation stays in the main process).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Folder of run folders; each run gets out/NNNNN-encoder-<method>...")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue a run: 'auto' = the newest run in --out whose config matches and that has a "
                   "checkpoint (a new one if none), or a run folder / checkpoint file.")
@click.option("--force", is_flag=True, help="Resume even if the configuration differs from the checkpoint's (with "
                                            "--resume auto: the newest run of this method and pairs, whatever its "
                                            "config).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Steps between checkpoints (0 = only at the end).")
@click.option("--eval-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Steps between kNN monitors on DIR/objects (category accuracy, pose error; 0 = off).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between tensorboard / metrics.jsonl records.")
def train_encoder(data, method, traj_weight, traj_layer, pairs, steps, batch_size, image_size, optimizer, lr,
                  weight_decay, warmup_steps, schedule_steps, stem, weights, augment, seed, device, workers, out,
                  resume, force, checkpoint_every, eval_every, log_every):
    """Train a Siamese encoder (SimCLR, VICReg or SimSiam) with optional trajectory regularisation.

    \b
    Examples:
      viewssl train encoder --data bench --method vicreg --traj-weight 0.2
      viewssl train encoder --data bench --method simsiam --pairs nearby --steps 2000
      viewssl train encoder --data bench --method simsiam --pairs dual --traj-weight 0.2
      torchrun --nproc_per_node 4 -m experiments.cli train encoder --data bench --batch-size 256
    """
    from common import distributed as dist_utils
    from common.training import fit, resolve_run_dir

    from .trainer import EncoderTrainer

    if not data.exists():
        raise ViewsslError("--data: no such folder", data)
    dev = resolve_device(device)
    dev = dist_utils.init_from_env(dev)
    config = {
        "method": method, "traj_weight": traj_weight, "traj_layer": traj_layer, "pairs": pairs,
        "data": str(data.resolve()),
        "image_size": image_size, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "schedule_steps": schedule_steps, "steps": steps, "seed": seed,
        "small_stem": stem == "small", "weights": str(weights) if weights else None, "augment": augment,
        "num_workers": workers,
    }
    try:
        tag = run_tag(method, traj_weight, traj_layer, pairs)
        trainer = EncoderTrainer(config, dev)
        run_dir, resume_arg = resolve_run_dir(out, tag, resume, trainer, force)
        if dist_utils.is_main():
            click.echo(f"run folder: {run_dir}", err=True)
        result = fit(trainer, run_dir, steps, checkpoint_every=checkpoint_every, eval_every=eval_every,
                     log_every=log_every, resume=resume_arg, force=force)
        main = dist_utils.is_main()
    finally:
        dist_utils.destroy()
    if main:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in result["terms"].items())
        click.echo(f"done: step {result['step']} in {result['seconds']:.0f} s; {terms}")
        click.echo(f"checkpoint: {result['checkpoint']}")
