"""``viewssl data render`` (the synthetic benchmark), ``viewssl data show`` (an image grid of any labels folder) and
``viewssl data export`` (any dataset folder as a ``labels.csv`` folder).

The commands attach to the ``data`` group of :mod:`common.cli`; ``experiments/cli.py`` imports this module.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
import click
import numpy as np

from ..cli import data
from ..errors import ViewsslError
from ..io import atomic_save_figure, atomic_write_json, read_image
from .labels import LABELS_FILE, LabelTable, read_labels

EXPORT_FILE = "export.json"  # how `viewssl data export` made a folder: source, options, the BIWI detector used

__all__ = ["render", "show", "export", "make_grid"]


@data.command("render")
@click.option("--kind", type=click.Choice(["objects", "heads", "triplets", "sequences", "head_triplets",
                                           "head_sequences", "all"]), default="all",
              show_default=True, help="Which part of the benchmark to render.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Benchmark folder (created; DIR/<kind>/<split>/labels.csv + images, DIR/meta.json). Kinds it "
                   "already holds with these settings are kept.")
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True, help="Image size in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Benchmark seed (same seed, same bytes).")
@click.option("--scale", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: ~5k images in seconds (demo); full: what experiments train on (a few minutes).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a benchmark setting (repeatable), e.g. --set triplet_step=20 --set frames=48 "
                   "--set categories=car,chair. Keys: the fields of common.data.synthetic.BenchmarkConfig.")
@click.option("--workers", type=click.IntRange(0, 256), default=1, show_default=True,
              help="Rendering processes (0: one per CPU). The images do not depend on it.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def render(kind: str, out: Path, size: int, seed: int, scale: str, settings: tuple[str, ...], workers: int,
           no_progress: bool) -> None:
    """Render the offline synthetic viewpoint benchmark to disk (objects, heads, triplets, sequences,
    head_triplets, head_sequences).

    Labels are exact; the camera convention is documented in common/data/synthetic/render.py.
    """
    from .synthetic import KINDS, BenchmarkConfig, format_summary, render_benchmark

    kinds = KINDS if kind == "all" else (kind,)
    overrides = BenchmarkConfig.parse_overrides(settings)
    for key in ("size", "seed"):
        if key in overrides:
            raise ViewsslError(f"--set {key}=...: use --{key}")
    summary = render_benchmark(out, kinds=kinds, size=size, seed=seed, scale=scale, progress=not no_progress,
                               workers=workers, **overrides)
    click.echo(format_summary(summary))


@data.command("show")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write  [default: FOLDER/grid.png]")
@click.option("--n", "n", type=click.IntRange(1, 400), default=36, show_default=True,
              help="Number of images in the grid.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Which images are picked.")
def show(folder: Path, out: Path | None, n: int, seed: int) -> None:
    """Write an image grid of FOLDER with each image's labels (degrees).

    FOLDER is a labels.csv folder or a rendered benchmark (every kind gets an equal share of the grid: one
    image per category, whole (L, C, R) triplets, frames spread along sequences).
    """
    path, count = make_grid(folder, out, n=n, seed=seed)
    click.echo(f"wrote {path} ({count} images)")


@data.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (OUT/images/<index>.png + OUT/labels.csv); must not hold a labels.csv yet.")
@click.option("--split", default=None, help="Sub-folder of SOURCE to open (train, test, split-1/train...); for "
              "Objectron the videos listed in index/<class>_annotations_<split>.")
@click.option("--kind", default=None,
              help="SOURCE's format, skipping detection: labels, biwi, aflw2000, 300w-lp, shapenet, objectron, "
                   "video (ucf101), images.")
@click.option("--size", type=click.IntRange(8, 1024), default=64, show_default=True,
              help="Side of the written images in pixels (face datasets: of the face crop).")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (counted in the log) instead of stopping.")
@click.option("--detector", type=click.Choice(["auto", "face-alignment", "haar", "center"]), default=None,
              help="BIWI: how faces are boxed for the crop  [default: auto, the first available of the others]. "
                   "Pin it to make an export reproducible on another machine.")
@click.option("--angles", "angle_mode", type=click.Choice(["viewssl", "dataset"]), default=None,
              help="BIWI, AFLW2000, 300W-LP: the exact rotation in viewssl's convention, or the dataset's own numbers "
                   "(SSV's BIWI labels; Pose_Para's yaw, pitch, roll)  [default: viewssl].")
@click.option("--max-abs-deg", type=click.FloatRange(0, 180, min_open=True), default=None,
              help="AFLW2000, 300W-LP: keep only faces whose Pose_Para pitch, yaw and roll are within this many "
                   "degrees (99: the 1,969-image AFLW2000 test set of Hopenet's tables)  [default: keep all].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export(source: Path, out: Path, split: str | None, kind: str | None, size: int, skip_bad: bool,
           detector: str | None, angle_mode: str | None, max_abs_deg: float | None, no_progress: bool) -> None:
    """Write the dataset in SOURCE as a labels.csv folder, for training and `viewssl eval`.

    Slow crops (BIWI's face detector, 300W-LP's .mat reads) are computed once. Category, instance, sequence and frame
    are kept; a dataset without viewpoints (UCF101's frames) gets blank angle cells, so `viewssl eval --metrics
    retrieval --retrieval-unit sequence` runs on it and the angle metrics are skipped.
    """
    from .formats import export_labels, open_dataset

    options = {k: v for k, v in (("skip_bad", skip_bad or None), ("detector", detector), ("angles", angle_mode),
                                 ("max_abs_deg", max_abs_deg)) if v is not None}
    dataset = open_dataset(source, size=size, split=split, kind=kind, **options)
    written = export_labels(dataset, out, progress=not no_progress)
    how = {"source": str(source), "split": split, "kind": getattr(dataset, "kind", kind), "size": size,
           "options": options, "items": len(dataset), "skipped": getattr(dataset, "skipped", 0)}
    if hasattr(dataset, "detector_name"):
        how.update(detector=dataset.detector_name, detector_fallbacks=dataset.fallbacks)
    if hasattr(dataset, "angle_mode"):
        how["angles"] = dataset.angle_mode
    atomic_write_json(how, written / EXPORT_FILE)
    click.echo(f"wrote {len(dataset)} images and {written / LABELS_FILE} (how: {written / EXPORT_FILE})")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Tile:
    path: Path
    caption: str
    group: int = 1  # size of the group it starts (triplets, sequence frames), 0 inside a group


def _find_tables(folder: Path) -> list[tuple[str, LabelTable]]:
    """(group name, table) for FOLDER itself or every labels.csv one or two levels below it."""
    if not folder.exists():
        raise ViewsslError("no such folder", folder)
    if not folder.is_dir():
        raise ViewsslError("not a folder", folder)
    if (folder / LABELS_FILE).is_file():
        return [("", read_labels(folder))]
    found = sorted(folder.glob(f"*/{LABELS_FILE}")) + sorted(folder.glob(f"*/*/{LABELS_FILE}"))
    # not a hidden folder's (a killed render's .<kind>.partial)
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not found:
        raise ViewsslError(f"no {LABELS_FILE} in this folder or its subfolders (expected a labels folder or a "
                           "rendered benchmark)", folder)
    return [(p.parent.relative_to(folder).parts[0], read_labels(p.parent)) for p in found]


_KIND_ORDER = {"objects": 0, "heads": 1, "triplets": 2, "sequences": 3, "head_triplets": 4, "head_sequences": 5}


def _caption(table: LabelTable, i: int) -> str:
    raw = table.raw
    first = raw["category"][i] if "category" in raw else table.paths[i].name
    if "position" in raw and raw["position"][i] != "":
        first += " " + "LCR"[int(float(raw["position"][i])) % 3]
    elif "frame" in raw and raw["frame"][i] != "":
        first += f" f{raw['frame'][i]}"
    if not table.has_angles:
        return f"{first}\nno viewpoint"
    a, e, t = (int(round(math.degrees(float(x)))) for x in table.angles[i])
    return f"{first}\naz {a} el {e} ti {t}"


def _groups(table: LabelTable) -> dict[str, list[list[int]]]:
    """Row groups shown together (a triplet, frames of a sequence, or one row), bucketed by category."""
    raw, n = table.raw, len(table)
    category = raw.get("category", [""] * n)
    buckets: dict[str, list[list[int]]] = {}
    if "triplet" in raw and "position" in raw:
        by_triplet: dict[str, list[int]] = {}
        for i in range(n):
            by_triplet.setdefault(raw["triplet"][i], []).append(i)
        for rows in by_triplet.values():
            rows.sort(key=lambda i: float(raw["position"][i] or 0))
            buckets.setdefault(category[rows[0]], []).append(rows)
    elif "sequence" in raw and any(raw["sequence"]):
        by_seq: dict[str, list[int]] = {}
        for i in range(n):
            by_seq.setdefault(raw["sequence"][i], []).append(i)
        for rows in by_seq.values():
            rows.sort(key=lambda i: table.frame[i] if table.frame is not None else i)
            picks = sorted({rows[round(k * (len(rows) - 1) / 2)] for k in range(3)})
            buckets.setdefault(category[rows[0]], []).append(picks)
    else:
        for i in range(n):
            buckets.setdefault(category[i], []).append([i])
    return buckets


def _select(tables: list[tuple[str, LabelTable]], n: int, seed: int) -> list[_Tile]:
    """Up to ``n`` tiles, shared about equally between the kinds; within a kind, round-robin over categories."""
    rng = np.random.default_rng(seed)
    kinds: dict[str, dict[str, list[tuple[LabelTable, list[int]]]]] = {}
    for kind, table in tables:
        for category, groups in _groups(table).items():
            kinds.setdefault(kind, {}).setdefault(category, []).extend((table, g) for g in groups)
    names = sorted(kinds, key=lambda k: (_KIND_ORDER.get(k, 9), k))
    queues: dict[str, list[tuple[LabelTable, list[int]]]] = {}
    for kind in names:
        buckets = [kinds[kind][c] for c in sorted(kinds[kind])]
        buckets = [[b[i] for i in rng.permutation(len(b))] for b in buckets]
        depth = max(len(b) for b in buckets)
        queues[kind] = [b[d] for d in range(depth) for b in buckets if d < len(b)][::-1]  # pop() from the end
    chosen: dict[str, list[_Tile]] = {kind: [] for kind in names}
    total = 0
    while True:
        fits = [k for k in names if queues[k] and total + len(queues[k][-1][1]) <= n]
        if not fits:
            break
        kind = min(fits, key=lambda k: len(chosen[k]))  # the kind with the fewest tiles so far (ties: kind order)
        table, rows = queues[kind].pop()
        chosen[kind].extend(_Tile(table.paths[i], _caption(table, i), len(rows) if j == 0 else 0)
                            for j, i in enumerate(rows))
        total += len(rows)
    return [tile for kind in names for tile in chosen[kind]]


def make_grid(folder: str | os.PathLike, out: str | os.PathLike | None = None, n: int = 36, seed: int = 0,
              tile: int = 64) -> tuple[Path, int]:
    """Write a captioned grid of up to ``n`` images of a labels folder or benchmark; returns (path, images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    tiles = _select(_find_tables(folder), n, seed)
    if not tiles:
        raise ViewsslError(f"nothing to show (no images, or every group of frames here, a triplet or a sequence, has "
                           f"more than --n {n})", folder)
    out = Path(out) if out is not None else folder / "grid.png"
    if out.suffix.lower() != ".png":
        raise ViewsslError("--out must be a .png file", out)
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    if any(t.group == 3 for t in tiles):  # keep triplets and frame groups on one row
        cols = 3 * math.ceil(cols / 3)
    rows = math.ceil(len(tiles) / cols)
    w, h, label = 1.0, 1.0, 0.32
    fig = plt.figure(figsize=(cols * w, rows * (h + label)), dpi=110)
    fig.patch.set_facecolor("white")
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        ax = fig.add_axes([c / cols + 0.04 / cols, 1 - (r + 1) / rows + label / (h + label) / rows,
                           0.92 / cols, (h / (h + label)) * 0.96 / rows])
        image = read_image(t.path, tile).permute(1, 2, 0).numpy()
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        ax.text(0.5, -0.03, t.caption, transform=ax.transAxes, ha="center", va="top", fontsize=5.5,
                linespacing=1.1)
    atomic_save_figure(fig, out, facecolor="white")
    return out, len(tiles)
