"""Is a model's calibrated viewpoint error its frame or its precision? Richer calibrations than SSV's, side by side.

    python -m experiments.calibration_fits CHECKPOINT --data DIR [--kind heads] [--split test] [--ema]
                                           [--calibration 0.1] [--seed 0] [--out FILE.json]

SSV's protocol (``common.eval.pose.calibrated_predictions``) maps each predicted angle to the labels with a line
fitted on a seeded 10 % of the frames and scores the rest. What it leaves is either a mismatch between the model's
frame and the labels' that a line per angle cannot express (a curved scale, one angle leaking into another), or error
that no map of the predictions can remove (image by image noise). This script fits richer maps on top of the
protocol's calibrated predictions c (N, 3) and scores them on the protocol's scored frames:

- ``per-angle linear``: each angle a line in its own c (the protocol's family: on the calibration frames, where the
  protocol fitted a line, it gives the protocol's figure again; an angle whose labels go all around is fitted by a
  sign and an offset there, and by least squares here);
- ``per-angle cubic``: each angle a cubic in its own c;
- ``cross-angle affine``: each angle a line in all three (a small rotation between the frames, to first order);
- ``cross-angle cubic``: each angle a polynomial of degree 3 in all three (20 terms).

Each is fitted twice: on the calibration frames (an honest figure) and on every frame, the scored ones included (in
sample: about what that family of maps could do). If even the in-sample cubic leaves most of the error, most of it is
precision, which no calibration or change of frame will remove. Targets are the labels moved by whole turns to within
pi of c, and errors are wrapped (:func:`common.geometry.angular_difference`), so a wrapped prediction is scored right;
a polynomial is not periodic, though, and for an angle that goes all around (objects' azimuth) the maps beyond the line
are of little use. A map with more terms than the frames it is fitted on is left out (``None``, "n/a" in the table).
Prints a markdown table (degrees) and writes it with the figures as JSON (``--out``).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import click
import numpy as np
import torch

from common.cli import ViewsslCommand, resolve_device
from common.errors import ViewsslError
from common.eval.pose import ANGLE_NAMES, calibrated_predictions, viewpoint_errors
from common.geometry import wrap_angle
from common.io import atomic_write_json

#: map name -> (whether each angle's map reads all three angles, polynomial degree)
FITS = {"per-angle linear": (False, 1), "per-angle cubic": (False, 3), "cross-angle affine": (True, 1),
        "cross-angle cubic": (True, 3)}
MAE_KEYS = tuple(f"{name}_mae" for name in ANGLE_NAMES) + ("mae",)
log = logging.getLogger("viewssl.experiments.calibration_fits")


def design(c: np.ndarray, fit: str, j: int) -> np.ndarray:
    """Columns of the map ``fit`` (:data:`FITS`) for angle ``j`` from calibrated predictions c (N, 3) radians ->
    (N, k): every monomial up to the fit's degree of angle j alone, or of all three, the constant included."""
    cross, degree = FITS[fit]
    if not cross:
        return np.vander(c[:, j], degree + 1)
    cols = [np.ones(len(c))]
    for d in range(1, degree + 1):
        cols += [np.prod(c[:, list(idx)], axis=1) for idx in itertools.combinations_with_replacement(range(3), d)]
    return np.stack(cols, axis=1)


def calibration_fits(pred, true, fraction: float = 0.1, seed: int = 0, count: int | None = None) -> dict:
    """Per fit of :data:`FITS` and fitting set (``calibration``, ``all``), the scored frames' MAE per angle and their
    mean (degrees, :func:`common.eval.pose.viewpoint_errors`), beside the protocol's figures: ``{"protocol": {...},
    "uncalibrated_mae": x, "n_calibration": n, "n_scored": m, "fits": {fit: {"calibration": {azimuth_mae,
    elevation_mae, tilt_mae, mae} or None (fewer frames than terms), "all": {...}}}}``."""
    protocol = calibrated_predictions(pred, true, fraction, seed, count)
    true = torch.as_tensor(true, dtype=torch.float64)
    cal, scored = protocol["calibration"].numpy(), protocol["scored"].numpy()
    c = protocol["mapped"]
    target = (c + wrap_angle(true - c)).numpy()  # labels within pi of c
    c = c.numpy()
    out = {"protocol": {k: v for k, v in viewpoint_errors(protocol["mapped"][scored], true[scored]).items()
                        if k in MAE_KEYS},
           "uncalibrated_mae": viewpoint_errors(protocol["pred"][scored], true[scored])["mae"],
           "n_calibration": int(cal.size), "n_scored": int(scored.size), "fits": {}}
    for fit in FITS:
        out["fits"][fit] = {}
        X = [design(c, fit, j) for j in range(3)]
        for where, rows in (("calibration", cal), ("all", np.arange(len(c)))):
            # fewer frames than terms: no fit (a constant angle, objects' tilt, only makes lstsq pick the smallest
            # weights, as it should)
            if rows.size < X[0].shape[1]:
                log.warning("%s: %d frames cannot fit its %d terms (left out; more calibration frames would do)",
                            fit, rows.size, X[0].shape[1])
                out["fits"][fit][where] = None
                continue
            mapped = np.stack([X[j][scored] @ np.linalg.lstsq(X[j][rows], target[rows, j], rcond=None)[0]
                               for j in range(3)], axis=1)
            figs = viewpoint_errors(torch.from_numpy(mapped), true[scored])
            out["fits"][fit][where] = {k: figs[k] for k in MAE_KEYS}
    return out


def markdown(result: dict, title: str) -> str:
    def cells(f):
        if f is None:
            return " | ".join(["n/a (too few frames)", "", "", ""])
        return " | ".join(f"{f[f'{n}_mae']:.2f}" for n in ANGLE_NAMES) + f" | **{f['mae']:.2f}**"

    lines = [f"## {title}", "",
             f"Scored on {result['n_scored']} frames; fits on the {result['n_calibration']} calibration frames or on "
             "every frame (in sample). MAE in degrees.", "",
             "| map | fitted on | azimuth | elevation | tilt | mean |", "|---|---|---:|---:|---:|---:|",
             f"| SSV protocol (per-angle linear) | calibration | {cells(result['protocol'])} |"]
    for fit, by in result["fits"].items():
        for where in ("calibration", "all"):
            lines.append(f"| {fit} | {'calibration' if where == 'calibration' else 'every frame'} | "
                         f"{cells(by[where])} |")
    lines.append(f"\nUncalibrated (raw) MAE on the same frames: {result['uncalibrated_mae']:.2f}.\n")
    return "\n".join(lines)


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True,
              help="Benchmark root, folder of split folders, or labels.csv folder.")
@click.option("--kind", type=click.Choice(["heads", "objects"]), default="heads",
              help="Which part of a benchmark root (ignored for other folders).")
@click.option("--split", default="test", help="Split evaluated.")
@click.option("--ema", is_flag=True, help="The run's moving average of the weights (SSV: V_ema) instead.")
@click.option("--calibration", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              help="Fraction of frames in the calibration fit (the rest are scored).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the calibration split.")
@click.option("--device", default="auto", help="auto, cpu, cuda, mps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file to write (table and figures).")
def main(checkpoint, data, kind, split, ema, calibration, seed, device, batch_size, out):
    """Richer calibration maps than SSV's per-angle line, on one checkpoint's predicted viewpoints."""
    from common.eval import load_model
    from common.eval.context import DataSource, EvalContext

    dev = resolve_device(device)
    model = load_model(checkpoint, dev, ema=ema)
    ctx = EvalContext(source=DataSource.detect(data), split=split, device=dev, batch_size=batch_size, seed=seed,
                      needs_features=False)
    part, split = ctx.kind(kind), ctx.eval_split
    if not ctx.has_angles(part, split):
        where = ctx.source.path(part, split) or Path(data, part, split)
        raise ViewsslError(f"no labelled split with viewpoints here ({part or 'data'}, split {split or 'none'})",
                           where)
    o = ctx.outputs(model, part, split)
    if o.angles is None:
        raise ViewsslError("the model does not predict angles", checkpoint)
    result = calibration_fits(o.angles.cpu(), o.true_angles.cpu(), calibration, seed)
    step = getattr(model, "checkpoint_step", None)
    title = f"{checkpoint}{' (EMA)' if ema else ''}" + (f", step {step}" if step is not None else "")
    table = markdown(result, title)
    click.echo(table, nl=False)
    if out is not None:
        atomic_write_json({"checkpoint": str(checkpoint), "step": step, "ema": ema, "data": str(data), "kind": part,
                           "split": split, "seed": seed, **result, "table": table}, out)
        click.echo(f"written to {out}")


if __name__ == "__main__":
    main()
