"""Generative vs contrastive on the same data and the same metrics: ``viewssl compare``.

Every method trains on the synthetic **heads** (the 300W-LP analog) and is scored on the same labelled
``heads/test`` split by the common evaluation module:

- ``readout`` (every model): a ridge readout of (cos, sin) per angle from the frozen features (SSV: the critic's
  trunk; encoders: the pooled ResNet feature), fitted on the labelled ``heads/train`` and scored on ``heads/test``
  (:mod:`common.eval.readout`);
- ``raw`` and ``calibrated`` (models with an angle head: SSV and the supervised baseline): the network's own angles,
  without any fit, and with SSV's per-angle linear calibration on a seeded 10 % of ``heads/test`` (scored on the
  disjoint rest).

Training data per method (labels are never used, except by the supervised upper bound): SSV and VICReg on the
``heads/train`` images; VICReg + trajectory on ``head_triplets/train`` (geodesic L, C, R views of one head);
SimSiam on nearby / distant frame pairs of ``head_sequences/train`` (a head turning on a constant-speed geodesic).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.cli import invocation, resolve_device
from common.errors import ViewsslError
from common.io import atomic_save_figure, atomic_write_bytes, atomic_write_json

from .traj_objects import seed_stats

log = logging.getLogger("viewssl.experiments.compare")

ANGLES = ("azimuth", "elevation", "tilt")


@dataclass(frozen=True)
class Method:
    title: str
    family: str            # "ssv" | "encoder"
    data: str              # training folder, relative to the benchmark root
    config: dict = field(default_factory=dict)
    steps: tuple[int, int] = (200, 3000)   # (quick, full)


METHODS: dict[str, Method] = {
    "ssv": Method("SSV (cpu preset)", "ssv", "heads/train", {}, (150, 4000)),
    "vicreg": Method("VICReg", "encoder", "heads/train", {"method": "vicreg"}, (60, 1500)),
    "vicreg_traj": Method("VICReg + trajectory", "encoder", "head_triplets/train",
                          {"method": "vicreg", "traj_weight": 0.2}, (60, 1500)),
    "simsiam_nearby": Method("SimSiam, nearby frames", "encoder", "head_sequences/train",
                             {"method": "simsiam", "pairs": "nearby"}, (60, 1500)),
    "simsiam_distant": Method("SimSiam, distant frames", "encoder", "head_sequences/train",
                              {"method": "simsiam", "pairs": "distant"}, (60, 1500)),
    "supervised": Method("supervised upper bound (V + labels)", "ssv", "heads/train", {"supervised": True},
                         (300, 2000)),
}
NEEDED_KINDS = ("heads", "head_triplets", "head_sequences")


def _trainer(method: Method, bench: Path, seed: int, steps: int, device: torch.device, quick: bool):
    data = str((bench / method.data).resolve())  # the run's config names the data wherever it is run from
    if method.family == "ssv":
        from ssv.trainer import SSVTrainer, default_config

        ranges = _head_ranges(bench)
        config = default_config("cpu", data=data, seed=seed, steps=steps, **ranges, **method.config)
        return SSVTrainer(config, device)
    from trajssl.trainer import EncoderTrainer

    # The ImageNet stem at 64 px costs about a quarter of the small stem at 32 px (layer1 at 16x16, not 32x32).
    config = {"data": data, "seed": seed, "steps": steps, "image_size": 64, "small_stem": False,
              "batch_size": 16 if quick else 32,
              "num_workers": 0, **method.config}
    return EncoderTrainer(config, device)


def _head_ranges(bench: Path) -> dict:
    """SSV's viewpoint sampling ranges (radians) from the benchmark's meta.json; {} (SSV's 300W-LP ranges) without."""
    from experiments.ssv_heads import head_ranges

    deg = head_ranges(bench)  # (logs a missing meta.json)
    if deg is None:
        return {}
    return {"az_range": math.radians(deg["az"]), "el_range": math.radians(deg["el"]),
            "tilt_range": math.radians(deg["tilt"])}


def _load_model(run_dir: Path, family: str, device):
    if family == "ssv":
        import ssv.model_io  # noqa: F401  (registers the family)
    else:
        import trajssl.model_io  # noqa: F401
    from common.eval import load_model

    return load_model(run_dir, device)


def _evaluate(model, bench: Path, device, seed: int) -> tuple[dict, dict, object]:
    from common.eval import run_metrics
    from common.eval.context import DataSource, EvalContext

    ctx = EvalContext(source=DataSource.detect(bench / "heads"), split="test", device=device, seed=seed)
    predicts_angles = model.predict_angles(torch.zeros(1, 3, 8, 8, device=device)) is not None
    metrics = ["viewpoint_readout"] + (["viewpoint"] if predicts_angles else [])
    res = run_metrics(model, metrics=metrics, context=ctx)
    return dict(res), res.protocol, ctx


def run_compare(bench: str | Path, out: str | Path, quick: bool = False, seeds: int = 1, device: str = "auto",
                seed: int = 0, methods: list[str] | None = None, steps_scale: float = 1.0) -> dict:
    """Train every method on ``bench`` (a rendered benchmark with heads, head_triplets and head_sequences), evaluate
    it, write ``results.md``, ``results.json`` and plots into ``out``. Runs resume: rerunning continues."""
    from common.training import RETRAIN_HINT, fit

    bench, out = Path(bench), Path(out)
    missing = [k for k in NEEDED_KINDS if not (bench / k).is_dir()]
    if missing:
        raise ViewsslError(f"the benchmark lacks {', '.join(missing)} (render them with `viewssl data render "
                           f"--kind all --out {bench}`)", bench)
    names = methods or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ViewsslError(f"--methods: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    keep: dict[str, dict] = {}   # seed-0 artefacts for the plots
    for name in names:
        method = METHODS[name]
        steps = max(2, int(round((method.steps[0] if quick else method.steps[1]) * steps_scale)))
        for s in range(seeds):
            run_dir = out / "runs" / f"{name}-seed{seed + s}"
            log.info("compare: %s, seed %d, %d steps -> %s", method.title, seed + s, steps, run_dir)
            trainer = _trainer(method, bench, seed + s, steps, dev, quick)
            fitted = fit(trainer, run_dir, steps=steps, checkpoint_every=max(steps // 4, 1),
                         log_every=max(steps // 20, 1), resume="auto", progress=True,
                         force_hint=RETRAIN_HINT)
            train_seconds = fitted["train_seconds"]  # the run's, over every resume (NaN: a checkpoint from before)
            model = _load_model(run_dir, method.family, dev)
            figs, protocol, ctx = _evaluate(model, bench, dev, seed + s)
            rows.setdefault(name, []).append({"seed": seed + s, "steps": steps, "train_seconds": train_seconds, **figs})
            if s == 0:
                keep[name] = {"model": model, "ctx": ctx, "protocol": protocol, "trainer": trainer}
    table = format_table(rows, quick)
    result = {"benchmark": str(bench), "quick": quick, "seeds": seeds, "device": str(dev),
              "command": invocation("viewssl"), "methods": {k: METHODS[k].__dict__ for k in rows},
              "runs": rows, "summary": summarize_rows(rows),
              "protocol": {k: v["protocol"] for k, v in keep.items()}, "seconds": time.perf_counter() - t_start}
    atomic_write_json(result, out / "results.json")
    plots = make_plots(keep, rows, bench, out, dev)
    md = ["# Generative vs contrastive viewpoint learning on the synthetic heads", "",
          f"Command: `{result['command']}`  ", f"Benchmark: `{bench}`; device {dev}; "
          f"{'quick' if quick else 'full'} schedule; {seeds} seed(s); wall time {result['seconds']:.0f} s.", "",
          table, "", PROTOCOL_NOTE, ""] + [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    return {"out": str(out), "table": table, "results": result, "plots": [str(p) for p in plots]}


PROTOCOL_NOTE = (
    "Split: synthetic `heads/test` (identities disjoint from `heads/train`). MAE in degrees with wrap-around. "
    "*readout*: ridge regression of (cos, sin) per angle on frozen features, fitted on labelled `heads/train`. "
    "*raw*: the model's own angles, no fit. *calibrated*: SSV's protocol, a per-angle linear map fitted on a seeded "
    "10% of `heads/test` and scored on the other 90%. Mean +- std over seeds where more than one seed ran.")


def _stat(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) of the finite values (:func:`experiments.traj_objects.seed_stats`); NaN std for one value."""
    s = seed_stats(values)
    return s["mean"], s["std"]


def summarize_rows(rows: dict[str, list[dict]]) -> dict:
    out = {}
    for name, runs in rows.items():
        keys = sorted({k for r in runs for k in r if isinstance(r[k], (int, float)) and k != "seed"})
        out[name] = {k: dict(zip(("mean", "std"), _stat([r.get(k) for r in runs]))) for k in keys}
    return out


def _cell(runs: list[dict], key: str) -> str:
    mean, std = _stat([r.get(key) for r in runs])
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def format_table(rows: dict[str, list[dict]], quick: bool) -> str:
    head = ("| method | readout az | el | tilt | **MAE** | raw MAE | calibrated az | el | tilt | **MAE** | train s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, runs in rows.items():
        r = [f"viewpoint_readout/readout/{k}" for k in ("azimuth_mae", "elevation_mae", "tilt_mae", "mae")]
        c = [f"viewpoint/calibrated/{k}" for k in ("azimuth_mae", "elevation_mae", "tilt_mae", "mae")]
        cells = [_cell(runs, k) for k in r] + [_cell(runs, "viewpoint/raw/mae")] + [_cell(runs, k) for k in c]
        seconds = _stat([x["train_seconds"] for x in runs])[0]
        cells.append(f"{seconds:.0f}" if math.isfinite(seconds) else "-")  # runs from checkpoints older than it
        lines.append(f"| {METHODS[name].title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def per_angle_bars(ax, rows: dict[str, list[dict]]) -> None:
    """Bars of each method's readout MAE per angle on ``ax``: the mean over seeds, with +- one standard deviation
    as error bars only for methods that ran more than one seed (one seed has no spread to draw)."""
    names = list(rows)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        means, stds = zip(*(_stat([r.get(f"viewpoint_readout/readout/{a}_mae") for r in rows[name]]) for a in ANGLES))
        spread = dict(yerr=stds, capsize=3) if len(rows[name]) > 1 else {}
        ax.bar(np.arange(3) + i * width, means, width, label=METHODS[name].title, **spread)
    ax.set_xticks(np.arange(3) + width * (len(names) - 1) / 2, ANGLES)
    ax.set_ylabel("readout MAE (deg)")
    seeds = sorted({len(v) for v in rows.values()})
    n_seeds = seeds[0] if len(seeds) == 1 else "the"
    over_seeds = "" if not seeds or seeds[-1] < 2 else f", mean +- std over {n_seeds} seeds"
    ax.set_title(f"Per-angle viewpoint error on heads/test (frozen-feature readout{over_seeds})")
    ax.legend(fontsize=7, ncol=2)


def make_plots(keep: dict, rows: dict, bench: Path, out: Path, device) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.eval.readout import readout_angles
    from common.geometry import angular_difference

    paths = []
    names = list(rows)
    # 1. per-angle readout error bars per method
    fig, ax = plt.subplots(figsize=(8, 3.6))
    per_angle_bars(ax, rows)
    fig.tight_layout()
    paths.append(_save(fig, out / "per_angle_errors.png"))

    # 2. error vs azimuth (seed 0, readout)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bins = np.linspace(-90, 90, 13)
    for name in names:
        ctx, model = keep[name]["ctx"], keep[name]["model"]
        train, test = ctx.outputs(model, "", "train"), ctx.outputs(model, "", "test")
        pred, _ = readout_angles(ctx.features(model, "", "train"), train.true_angles, ctx.features(model, "", "test"))
        true = test.true_angles
        err = torch.rad2deg(angular_difference(pred, true)).mean(-1).cpu().numpy()
        az = np.degrees(true[:, 0].cpu().numpy())
        idx = np.clip(np.digitize(az, bins) - 1, 0, len(bins) - 2)
        curve = [err[idx == b].mean() if (idx == b).any() else np.nan for b in range(len(bins) - 1)]
        ax.plot((bins[:-1] + bins[1:]) / 2, curve, marker="o", label=METHODS[name].title)
    ax.set_xlabel("true azimuth (yaw, deg)")
    ax.set_ylabel("mean angle error (deg)")
    ax.set_title("Readout error vs azimuth on heads/test")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(_save(fig, out / "error_vs_azimuth.png"))

    # 3. PCA of the embeddings of one test sequence, coloured by frame
    seq_dir = bench / "head_sequences" / "test"
    if (seq_dir / "labels.csv").is_file():
        from common.data.labels import LabeledFolder

        ds = LabeledFolder(seq_dir, size=None)
        frames = [i for i in range(len(ds)) if ds._sequence[i] == ds._sequence[0]]
        images = torch.stack([ds[i]["image"] for i in frames]).to(device)
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            model = keep[name]["model"]
            tap = "pooled" if "pooled" in model.taps else model.taps[0]
            with torch.no_grad():
                f = model.features(images, [tap])[tap].double().cpu()
            f = f - f.mean(0)
            _, _, v = torch.linalg.svd(f, full_matrices=False)
            p = (f @ v[:2].T).numpy()
            ax.scatter(p[:, 0], p[:, 1], c=np.arange(len(frames)), cmap="viridis", s=18)
            ax.plot(p[:, 0], p[:, 1], lw=0.5, color="gray")
            ax.set_title(METHODS[name].title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("PCA of one test head sequence's embeddings (colour = frame)", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out / "sequence_pca.png"))

    # 4. SSV samples under an azimuth sweep
    if "ssv" in keep:
        from common.io import write_image

        trainer = keep["ssv"]["trainer"]
        grid = trainer.sample_grid(n_styles=4, n_views=7, sweep="azimuth")
        path = out / "ssv_azimuth_sweep.png"
        write_image(path, grid)
        paths.append(path)
    return paths


def _save(fig, path: Path) -> Path:
    return atomic_save_figure(fig, path, dpi=110)
