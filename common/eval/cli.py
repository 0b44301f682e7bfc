"""``viewssl eval``: evaluate any checkpoint (either family) on a benchmark or a labelled folder.

    viewssl eval --checkpoint runs/00003-ssv-heads --data data/bench --metrics viewpoint,knn_pose \\
                 --output metrics.json

Prints a table of every figure (and the metrics skipped, with the reason) and writes JSON with every figure, the
protocol of each metric, the skipped metrics and the evaluation settings. Without ``--output`` the JSON goes to
``<run folder>/eval-<data>-<split>.json``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import click

from ..cli import cli, resolve_device
from ..errors import ViewsslError
from ..io import atomic_write_json

log = logging.getLogger("viewssl.eval")


def format_table(results) -> str:
    """Aligned two-column table of the figures, then the skipped metrics."""
    lines = []
    if results:
        width = max(len(k) for k in results)
        for key, value in results.items():
            v = "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
            lines.append(f"{key:<{width}}  {v:>10}")
    else:
        lines.append("(no figures)")
    for name, reason in results.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def _default_output(model, data: Path, split: str, suffix: str = "") -> Path:
    """<run folder>/eval-<data>-<split>-step<N><suffix>.json: one file per checkpoint evaluated."""
    ckpt = getattr(model, "checkpoint_path", None)
    run_dir = Path(ckpt).parent if ckpt else Path.cwd()
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    step = getattr(model, "checkpoint_step", None)
    step = f"-step{step}" if isinstance(step, int) else ""
    return run_dir / f"eval-{data.resolve().name}-{split or 'all'}{step}{suffix}.json"


def _list_metrics(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .metrics import METRICS

    for name, fn in METRICS.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        click.echo(f"{name:<14} {doc[0] if doc else ''}")
    ctx.exit()


def _finite(obj):
    """NaN / inf -> None, recursively, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@cli.command("eval")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run folder (its newest checkpoint) or a checkpoint file, of either family.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Benchmark root (objects/, heads/, sequences/), a folder of split folders, or a labels.csv folder.")
@click.option("--split", default="test", show_default=True, help="Split evaluated (queries); train is the gallery.")
@click.option("--metrics", "metrics", default=None,
              help="Comma-separated metric names (default: all that apply). See --list-metrics.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="JSON file to write (default: <run folder>/eval-<data>-<split>-step<N>.json).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass when extracting features (memory and speed).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of every subset, split and probe.")
@click.option("--tap", "taps", multiple=True, help="Feature tap(s) to evaluate (repeatable; default: pooled).")
@click.option("--compress", default=None, help="Compress features to a width, e.g. pca:512 or random:512.")
@click.option("--calibration", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fraction of frames used for SSV's per-angle calibration fit (scored on the rest).")
@click.option("--calibration-count", default=None, type=click.IntRange(min=2),
              help="Absolute number of calibration frames (overrides --calibration).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most N frames per split (seeded).")
@click.option("--knn-k", default=20, show_default=True, type=click.IntRange(min=1),
              help="Neighbours of the kNN pose and classification metrics.")
@click.option("--knn-temperature", default=0.07, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Temperature of the kNN classifier's weighted vote, exp(similarity / T).")
@click.option("--probe-steps", default=300, show_default=True, type=click.IntRange(min=1),
              help="Training steps of the relative-pose probe (256 pairs each).")
@click.option("--box-queries", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Seeded number of query frames for box fitting.")
@click.option("--retrieval-unit", type=click.Choice(("frame", "sequence")), default="frame", show_default=True,
              help="What the retrieval metric ranks: frames, or sequences (one feature per video, the mean of its "
                   "L2-normalised frame features: the UCF101 video-retrieval protocol; needs a 'sequence' column).")
@click.option("--flip-average", is_flag=True,
              help="Test-time flip: average each predicted viewpoint with the mirror (-azimuth, elevation, -tilt) of "
                   "the prediction on the mirrored image (left-right symmetric classes; the JSON gets an -flip name).")
@click.option("--ema", is_flag=True,
              help="Evaluate the moving average of the network's weights that the run kept (SSV: V_ema) instead of "
                   "the network itself.")
@click.option("--list-metrics", is_flag=True, is_eager=True, expose_value=False, callback=_list_metrics,
              help="List the metric names and exit.")
def eval_command(checkpoint, data, split, metrics, output, device, batch_size, seed, taps, compress, calibration,
                 calibration_count, limit, knn_k, knn_temperature, probe_steps, box_queries, retrieval_unit,
                 flip_average, ema):
    """Evaluate a checkpoint: viewpoint, kNN pose, relative pose, classification, retrieval, re-ID, 3D boxes."""
    from . import FlipAveraged, load_model, run_metrics
    from .context import DataSource
    from .metrics import _check_names

    names = _check_names(metrics)  # unknown names fail before anything is loaded
    source = DataSource.detect(data)
    if source.layout != "folder" and split not in source.splits():
        raise ViewsslError(f"--split {split!r}: no such split (splits here: {', '.join(source.splits())})",
                           source.root)
    if source.layout == "folder" and click.get_current_context().get_parameter_source("split") == \
            click.core.ParameterSource.COMMANDLINE:
        log.warning("--split %s ignored: %s is one labels.csv folder (all of it is evaluated)", split, source.root)
    dev = resolve_device(device)
    model = load_model(checkpoint, dev, ema=ema)
    if flip_average:
        model = FlipAveraged(model)
    results = run_metrics(
        model, source.root, names, split=split, device=dev, batch_size=batch_size, seed=seed,
        taps=list(taps) or None, compress=compress, calibration=calibration, calibration_count=calibration_count,
        limit=limit, knn_k=knn_k, knn_temperature=knn_temperature, probe_steps=probe_steps, box_queries=box_queries,
        retrieval_unit=retrieval_unit, progress=True,
    )
    click.echo(format_table(results))
    if flip_average and not any(k.startswith("viewpoint/") for k in results):
        log.warning("--flip-average changed nothing: no viewpoint figures (the model predicts no angles, or the "
                    "viewpoint metric was not run)")
    out_path = output or _default_output(model, source.root, results.context.get("split", split),
                                         ("-ema" if ema else "") + ("-flip" if flip_average else ""))
    payload = {
        "checkpoint": str(getattr(model, "checkpoint_path", checkpoint)),
        "step": getattr(model, "checkpoint_step", None),
        "flip_average": flip_average,
        "ema": ema,
        **results.to_json(),
    }
    try:
        atomic_write_json(_finite(payload), out_path)
    except OSError as e:
        raise ViewsslError(f"cannot write the results ({e.strerror})", out_path) from None
    click.echo(f"wrote {out_path}")
