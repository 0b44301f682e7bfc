"""``viewssl demo`` and ``viewssl compare``: the commands that compose both families."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from common.cli import cli

log = logging.getLogger("viewssl.experiments")


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the benchmark, the runs and the comparison.")
@click.option("--seed", type=int, default=0, show_default=True, help="Benchmark and training seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--render-only", is_flag=True, help="Only render and summarise the benchmark.")
def demo(out: Path, seed: int, device: str, render_only: bool) -> None:
    """The README's `make demo`: render the small synthetic benchmark, summarise it, write an image grid, then run
    `viewssl compare --quick` on it and print the comparison table."""
    from common.data.cli import make_grid
    from common.data.synthetic import format_summary, render_benchmark

    t0 = time.perf_counter()
    bench = out / "benchmark"
    summary = render_benchmark(bench, scale="small", seed=seed)
    click.echo(format_summary(summary))
    grid, count = make_grid(bench, out / "benchmark_grid.png", n=36, seed=seed)
    click.echo(f"image grid: {grid} ({count} images); rendered in {time.perf_counter() - t0:.1f} s")
    if render_only:
        return
    from .compare import run_compare

    result = run_compare(bench, out / "compare", quick=True, seeds=1, device=device, seed=seed)
    click.echo(result["table"])
    click.echo(f"results: {result['out']}  (total {time.perf_counter() - t0:.0f} s)")
