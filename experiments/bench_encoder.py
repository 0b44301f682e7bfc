"""Benchmark: training throughput of the Siamese encoder, and the cost of everything around the backbone.

    python -m experiments.bench_encoder [--method vicreg] [--traj-weight 0.2] [--batch-size 32] [--image-size 32]
                                        [--repeats 5] [--data DIR] [--device auto]

It times two things on the same batch, interleaved (so machine load hits both alike), over ``--repeats`` batches:

- the **full training step** of :class:`trajssl.trainer.EncoderTrainer`: lr schedule, two augmented views of the
  centre images (crop, flip, colour jitter, grayscale, blur), the backbone on both views and on the unaugmented
  (left, centre, right) triplet, projector, semantic loss, trajectory loss, backward, LARS step, monitors;
- the **bare backbone**: forward + backward of the same ResNet-18 on exactly the same image tensors (two views and
  the 3B triplet images, same calls), with a trivial loss (sum of the pooled features), no optimiser.

It prints training images/s (centre images per second; each uses five backbone passes: two views + the triplet)
and the ratio full / bare (goal <= 1.15), from the fastest repeat of each (the least disturbed by other processes
on a shared machine) and from the medians, and the ratio of process CPU times (robust to other processes' load
when run with ``--threads 1``). Batches are loaded before timing; the loader's time per batch is
reported separately (in training, the loader's workers overlap it with the step). Without ``--data`` a folder of random
images is written to a temporary directory.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import torch

from common.cli import ViewsslCommand, resolve_device


def _fake_triplets(root: Path, n: int, size: int) -> Path:
    from common.data.labels import write_labels
    from common.io import write_image

    g = torch.Generator().manual_seed(0)
    folder = root / "triplets" / "train"
    rows = []
    for t in range(n):
        for p in range(3):
            name = f"images/{t:05d}_{p}.png"
            write_image(folder / name, torch.rand(3, size, size, generator=g))
            rows.append({"path": name, "azimuth": 0.2 * p, "elevation": 0.0, "tilt": 0.0, "category": "c",
                         "instance": str(t), "triplet": str(t), "position": str(p)})
    write_labels(folder / "labels.csv", rows, extra_columns=("triplet", "position"))
    return root


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--method", type=click.Choice(("simclr", "vicreg", "simsiam")), default="vicreg")
@click.option("--traj-weight", type=click.FloatRange(min=0), default=0.2)
@click.option("--traj-layer", default="pooled", help="The encoder tap the trajectory loss reads.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32)
@click.option("--image-size", type=click.IntRange(min=8), default=32)
@click.option("--repeats", type=click.IntRange(min=1), default=5, help="Timed batches.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, help="Untimed batches first.")
@click.option("--data", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Benchmark folder  [default: random images]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0 = torch's default).")
def main(**options) -> dict:
    """Training throughput of the Siamese encoder, and the cost of everything around the backbone."""
    args = SimpleNamespace(**options)

    from trajssl.trainer import EncoderTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        data = _fake_triplets(Path(tmp.name), args.batch_size * 2, args.image_size)
    n_batches = args.warmup + args.repeats
    config = {"method": args.method, "traj_weight": args.traj_weight, "traj_layer": args.traj_layer,
              "data": str(data), "batch_size": args.batch_size, "image_size": args.image_size,
              "steps": 10 * n_batches, "eval_gallery": 0}
    trainer = EncoderTrainer(config, device)
    it = trainer.batches(0)
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(n_batches)]
    load_s = (time.perf_counter() - t0) / n_batches

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare(batch) -> float:
        """Backbone forward + backward on the very tensors the full step feeds it (views re-drawn, same shapes)."""
        enc = trainer.encoder
        x = batch["image"].to(device)
        with torch.no_grad():
            v1, v2 = trainer.augment(x, x)  # not timed: only the inputs
        tri = batch["triplet"].to(device) if "triplet" in batch else None
        sync()
        t, c = time.perf_counter(), time.process_time()
        loss = enc(v1)["pooled"].sum() + enc(v2)["pooled"].sum()
        if tri is not None:
            loss = loss + enc(tri, taps=(args.traj_layer,))[args.traj_layer].sum()
        loss.backward()
        sync()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        enc.zero_grad(set_to_none=True)
        return dt, dc

    def full(batch, step) -> tuple[float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        terms = trainer.train_step(batch, step)
        float(terms["loss"])
        sync()
        return time.perf_counter() - t, time.process_time() - c

    full_t, bare_t, full_c, bare_c = [], [], [], []
    for i, batch in enumerate(batches):
        (f, fc), (b, bc) = full(batch, i), bare(batch)
        if i >= args.warmup:
            full_t.append(f)
            bare_t.append(b)
            full_c.append(fc)
            bare_c.append(bc)
    full_s, bare_s = min(full_t), min(bare_t)
    full_med, bare_med = statistics.median(full_t), statistics.median(bare_t)
    passes = 2 + (3 if "triplet" in batches[0] else 0)
    result = {
        "method": args.method, "traj_weight": args.traj_weight, "batch_size": args.batch_size,
        "image_size": args.image_size, "device": str(device), "threads": torch.get_num_threads(),
        "full_step_s": full_s, "bare_backbone_s": bare_s, "ratio": full_s / bare_s,
        "full_step_median_s": full_med, "bare_backbone_median_s": bare_med, "ratio_median": full_med / bare_med,
        "images_per_s": args.batch_size / full_s, "backbone_passes_per_s": passes * args.batch_size / full_s,
        "load_s_per_batch": load_s,
        "full_step_cpu_s": statistics.median(full_c), "bare_backbone_cpu_s": statistics.median(bare_c),
        "ratio_cpu": statistics.median(full_c) / statistics.median(bare_c),
    }
    print(f"encoder training benchmark: {args.method} + trajectory {args.traj_weight:g} ({args.traj_layer}), "
          f"batch {args.batch_size}, {args.image_size} px, {device}, {result['threads']} threads, "
          f"best / median of {args.repeats}")
    print(f"  full training step     {full_s * 1000:8.1f} ms / {full_med * 1000:8.1f} ms   "
          f"({result['images_per_s']:.1f} training images/s, {result['backbone_passes_per_s']:.0f} backbone images/s)")
    print(f"  bare backbone fwd+bwd  {bare_s * 1000:8.1f} ms / {bare_med * 1000:8.1f} ms")
    print(f"  ratio full / bare      {result['ratio']:8.3f}    / {result['ratio_median']:8.3f}      (goal <= 1.15)")
    print(f"  ratio of CPU time      {result['ratio_cpu']:8.3f}   (median process CPU time; with --threads 1 "
          "it ignores waiting for other processes)")
    print(f"  loading one batch      {load_s * 1000:8.1f} ms   (not in the step; a loader's workers overlap it)")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
