"""Benchmark: render speed of the synthetic benchmark, images/s on one process.

    python -m experiments.bench_render [--size 64] [--n 600] [--repeats 3] [--scales small full]

For objects, heads and sequences (``scale="full"`` items spread over the split, meshes built beforehand), it times
``SyntheticDataset.render`` (the streaming path: OpenGL render + supersampling resolve + read-back) and render plus
PNG encoding (what ``viewssl data render`` does per image, minus the file write), best of ``--repeats``. With
``--scales`` it also times ``render_benchmark`` end to end (meshes, planning, PNG files) into a temporary folder.
The machine's load counts: run it on an idle machine for the README figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np


def _rate(fn, indices, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in indices:
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return len(indices) / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_render", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--n", type=int, default=600, help="images per kind and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scales", nargs="*", default=[], choices=["small", "full"],
                        help="also time render_benchmark end to end at these scales")
    args = parser.parse_args(argv)

    from common.data.synthetic import SyntheticDataset, get_renderer, render_benchmark
    from common.data.synthetic.benchmark import _encode_png

    renderer = get_renderer()
    gl = renderer.ctx.info.get("GL_RENDERER", "?")
    print(f"# viewssl synthetic render benchmark: {args.size} px, one process, {gl}, "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"# command: python -m experiments.bench_render {' '.join(argv if argv is not None else sys.argv[1:])}"
          .rstrip())
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
    for scale in args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = render_benchmark(os.path.join(tmp, "b"), scale=scale, size=args.size, progress=False)
            dt = time.perf_counter() - t0
        print(f"# render_benchmark(scale={scale!r}): {summary['total_images']} images in {dt:.1f} s "
              f"({summary['total_images'] / dt:.0f} images/s end to end)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
