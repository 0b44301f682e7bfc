"""Time one SSV training iteration (one V step + one S step) and report seconds per iteration and peak memory.

    python -m experiments.bench_ssv [--preset paper] [--batch-size 2] [--iters 3] [--threads N] [--device auto]

Random images stand in for data (no I/O in the timing). The first iteration is a warm-up (oneDNN kernel selection,
lazy imports) and is reported separately. Peak memory: the process's peak resident set size on CPU (everything,
including Python and the weights), ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import click
import torch

from common.cli import ViewsslCommand, resolve_device
from ssv.cli import PRESET_CHOICES


def _rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(PRESET_CHOICES), default="paper")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Real images per step (default: the preset's, as training uses; paper: 2).")
@click.option("--g-group", type=click.IntRange(min=1), default=None, help="S-step group size (default: the preset's).")
@click.option("--highpass", type=click.FloatRange(min=0), default=None,
              help="High-pass sigma of V's input, as `viewssl train ssv --highpass` (default: the preset's).")
@click.option("--iters", type=click.IntRange(min=1), default=3, help="Timed iterations after the warm-up.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--device", default="auto")
@click.option("--phi", type=click.Choice(("auto", "alexnet", "vgg", "critic", "random")), default="auto")
@click.option("--json-out", type=click.Path(), default=None, help="Also write the figures as JSON here.")
def main(preset, batch_size, g_group, highpass, iters, threads, device, phi, json_out):
    """Seconds per SSV training iteration and peak memory."""
    from ssv.cli import build_config
    from ssv.trainer import SSVTrainer

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    config = build_config(preset, None, batch_size=batch_size, g_group=g_group, highpass=highpass, phi=phi)
    batch_size = config["batch_size"]
    rss0 = _rss_mb()
    trainer = SSVTrainer(config, dev)
    n_g = sum(p.numel() for p in trainer.G.parameters())
    n_v = sum(p.numel() for p in trainer.V.parameters())
    size = config["image_size"]
    gen = torch.Generator().manual_seed(0)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(iters + 1):
        batch = {"image": torch.rand(batch_size, 3, size, size, generator=gen)}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        trainer.train_step(batch, i)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
    figures = {
        "preset": preset, "image_size": size, "batch_size": batch_size, "g_group": config["g_group"],
        "highpass": config.get("d_highpass", 0.0),
        "device": str(dev), "threads": torch.get_num_threads(), "phi": trainer.phi_name,
        "params_S": n_g, "params_V": n_v,
        "warmup_seconds": times[0], "seconds_per_iteration": statistics.median(times[1:]),
        "min_seconds_per_iteration": min(times[1:]), "timed_iterations": iters,
        "peak_memory_mb": peak, "memory_kind": "cuda max allocated" if dev.type == "cuda" else "process peak RSS",
        "rss_before_models_mb": rss0 if dev.type != "cuda" else None,
    }
    click.echo(f"SSV --preset {preset}: {size}x{size}, batch {batch_size} (S-step groups of {config['g_group']}), "
               f"high-pass sigma {figures['highpass']:g}, "
               f"{dev}, {torch.get_num_threads()} thread(s), Phi={trainer.phi_name}")
    click.echo(f"  parameters: S {n_g / 1e6:.2f} M, V {n_v / 1e6:.2f} M")
    click.echo(f"  warm-up iteration: {times[0]:.2f} s")
    click.echo(f"  seconds/iteration: {figures['seconds_per_iteration']:.2f} (median of {iters}; min "
               f"{figures['min_seconds_per_iteration']:.2f})")
    click.echo(f"  peak memory: {peak:.0f} MB ({figures['memory_kind']})")
    if json_out:
        from common.io import atomic_write_json

        atomic_write_json(figures, json_out)


if __name__ == "__main__":
    main()
