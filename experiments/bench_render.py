"""Benchmark: render speed of the synthetic benchmark, images/s on one process.

    python -m experiments.bench_render [--size 64] [--n 600] [--repeats 3] [--scales small,full]

For objects, heads and sequences (``scale="full"`` items spread over the split, meshes built beforehand), it times
``SyntheticDataset.render`` (the streaming path: OpenGL render + supersampling resolve + read-back) and render plus
PNG encoding (what ``viewssl data render`` does per image, minus the file write), best of ``--repeats``. With
``--scales`` it also times ``render_benchmark`` end to end (meshes, planning, PNG files) into a temporary folder.
The machine's load counts: run it on an idle machine for the README figure.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from types import SimpleNamespace

import click
import numpy as np

from common.cli import ViewsslCommand, comma_list, invocation


def _rate(fn, indices, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in indices:
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return len(indices) / best


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--size", type=click.IntRange(min=8), default=64, help="Image size in pixels.")
@click.option("--n", type=click.IntRange(min=1), default=600, help="Images per kind and repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, help="Timed passes; the best is reported.")
@click.option("--scales", default="", help="Also time render_benchmark end to end at these comma-separated scales "
              "(small, full).")
def main(**options) -> None:
    """Render speed of the synthetic benchmark, images/s on one process."""
    args = SimpleNamespace(**options)
    scales = comma_list(args.scales, "--scales", ("small", "full")) if args.scales else []
    from common.data.synthetic import SyntheticDataset, get_renderer, render_benchmark
    from common.data.synthetic.benchmark import _encode_png

    renderer = get_renderer()
    gl = renderer.ctx.info.get("GL_RENDERER", "?")
    print(f"# viewssl synthetic render benchmark: {args.size} px, one process, {gl}, "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"# command: {invocation('python -m experiments.bench_render')}")
    print("| kind | triangles (mean) | images/s (render) | images/s (render + PNG) |")
    print("|---|---:|---:|---:|")
    for kind in ("objects", "heads", "sequences"):
        ds = SyntheticDataset(kind, "train", scale="full", size=args.size)
        indices = np.linspace(0, len(ds) - 1, min(args.n, len(ds))).round().astype(int).tolist()
        triangles = np.mean([ds.mesh(i).n_triangles for i in indices])  # builds (and caches) the meshes
        for i in indices[:20]:
            ds.render(i)
        render_rate = _rate(ds.render, indices, args.repeats)
        png_rate = _rate(lambda i: _encode_png(ds.render(i)), indices, args.repeats)
        print(f"| {kind} | {triangles:.0f} | {render_rate:.0f} | {png_rate:.0f} |", flush=True)
    for scale in scales:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = render_benchmark(os.path.join(tmp, "b"), scale=scale, size=args.size, progress=False)
            dt = time.perf_counter() - t0
        print(f"# render_benchmark(scale={scale!r}): {summary['total_images']} images in {dt:.1f} s "
              f"({summary['total_images'] / dt:.0f} images/s end to end)", flush=True)


if __name__ == "__main__":
    main()
