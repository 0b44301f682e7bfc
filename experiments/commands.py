"""``viewssl demo`` and ``viewssl compare``: the commands that compose both families."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import click

from common.cli import cli

log = logging.getLogger("viewssl.experiments")


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the benchmark, the runs and the comparison.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training seed (the benchmark has seed 0 whatever it is, so one OUT serves every seed).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--render-only", is_flag=True, help="Only render and summarise the benchmark.")
def demo(out: Path, seed: int, device: str, render_only: bool) -> None:
    """The README's `make demo`: render the small synthetic benchmark, summarise it, write an image grid, then run
    `viewssl compare --quick` on it and print the comparison table."""
    from common.cli import resolve_device
    from common.data.cli import make_grid
    from common.data.synthetic import format_summary, render_benchmark

    if not render_only:
        resolve_device(device)  # a device that is not there: said before minutes of rendering
    t0 = time.perf_counter()
    bench = out / "benchmark"
    summary = render_benchmark(bench, scale="small", seed=0)
    click.echo(format_summary(summary))
    grid, count = make_grid(bench, out / "benchmark_grid.png", n=36, seed=seed)
    click.echo(f"image grid: {grid} ({count} images); rendered in {time.perf_counter() - t0:.1f} s")
    if render_only:
        return
    from .compare import run_compare

    result = run_compare(bench, out / "compare", quick=True, seeds=1, device=device, seed=seed)
    click.echo(result["table"])
    click.echo(f"results: {result['out']}  (total {time.perf_counter() - t0:.0f} s)")


@cli.command("compare")
@click.option("--data", "bench", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A rendered benchmark (with heads, head_triplets, head_sequences); default: render one into "
                   "OUT/benchmark.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder  [default: runs/compare-quick or runs/compare-full]")
@click.option("--quick", is_flag=True, help="Short schedules and the small benchmark (minutes on 2 cores).")
@click.option("--seeds", type=click.IntRange(1, 20), default=1, show_default=True, help="Seeds per method.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="First training seed (the benchmark rendered without --data has seed 0 whatever it is).")
@click.option("--methods", default=None, help="Comma-separated subset of: " + "ssv, vicreg, vicreg_traj, "
              "simsiam_nearby, simsiam_distant, supervised.")
@click.option("--steps-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every method's step count (e.g. 0.01 for a smoke run).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
def compare(bench: Path | None, out: Path | None, quick: bool, seeds: int, seed: int, methods: str | None,
            steps_scale: float, device: str) -> None:
    """Train SSV, VICReg, VICReg + trajectory, SimSiam on nearby and on distant frame pairs, and a supervised upper
    bound on the synthetic heads; evaluate all with the common evaluation module; write results.md, results.json and
    plots."""
    from common.data.synthetic import render_benchmark

    from common.cli import comma_list, resolve_device
    from common.errors import ViewsslError

    from .compare import METHODS, run_compare

    if not math.isfinite(steps_scale):
        raise ViewsslError(f"--steps-scale must be a finite number > 0, not {steps_scale}")
    names = comma_list(methods, "--methods", list(METHODS)) if methods is not None else None
    out = out or Path(f"runs/compare-{'quick' if quick else 'full'}")
    resolve_device(device)  # before minutes of rendering
    if bench is None:
        bench = out / "benchmark"  # one benchmark for every --seed: a series can be extended in the same OUT
        render_benchmark(bench, scale="small" if quick else "full", seed=0)
    result = run_compare(bench, out, quick=quick, seeds=seeds, device=device, seed=seed, methods=names,
                         steps_scale=steps_scale)
    click.echo(result["table"])
    click.echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(result['plots'])} plots")
