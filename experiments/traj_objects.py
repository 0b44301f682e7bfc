"""Does the trajectory loss make Siamese features more pose-aware? trajSSL's object experiment on the synthetic objects.

    python -m experiments.traj_objects --data BENCH [--methods vicreg,simclr,simsiam] [--traj-weight 0.2]
                                       [--seeds 0,1,2] [--steps 1500] [--batch-size 64] [--out runs/traj_objects]
    python -m experiments.traj_objects --quick            # smoke test: tiny benchmark, 2 steps, 2 seeds (minutes)

For every method (SimCLR, VICReg, SimSiam), with and without the trajectory loss (``--traj-weight``), and every
seed, it trains an encoder on ``BENCH/triplets/train`` (semantic views = augmentations of the centre image; the
trajectory loss on the unaugmented geodesic triplets, pooled features) and evaluates the final checkpoint with the
common evaluation module (:func:`common.eval.run_metrics`) on two feature taps: ``pooled`` (final layer, 512-d) and
``layer3`` (mid layer, 256 x 4 x 4 at 32 px with the small stem, or at 64 px with ``--stem imagenet``). Reported, as
mean +- std over seeds:

- classification: linear-probe and kNN category top-1 (objects/train -> objects/test);
- absolute pose: per-category weighted kNN over the Fib view index (accuracy of the exact view, as the paper) and
  the median geodesic error;
- relative pose: MLP probe on feature pairs of one object, accuracy within 30 deg;
- unseen poses (Fib(100) renders): kNN median geodesic error and the relative-pose probe;
- unseen categories (ood splits): kNN view accuracy and the relative-pose probe trained/tested on them.

Writes ``OUT/results.json`` (every figure of every run, the aggregates and the protocol) and ``OUT/results.md``
(tables per tap, the trajectory effect per method as paired per-seed differences, and mid- vs final-layer).
Runs resume: each run lives in ``OUT/runs/<method>-traj<w>-s<seed>`` with checkpoints and ``eval.json``; rerunning
the command skips finished runs and continues interrupted ones. Without an existing ``--data`` folder the objects
and triplets of the benchmark are rendered there first (``--quick``: a tiny one).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import click
import numpy as np
import torch

from common.cli import ViewsslCommand, comma_list, int_list, invocation, resolve_device
from common.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("viewssl.experiments.traj_objects")

TAPS = ("pooled", "layer3")
TAP_TITLES = {"pooled": "final layer (pooled, 512-d)", "layer3": "mid layer (layer3 map pooled to at most 4x4)"}
#: (column title, result key with {tap}, scale, higher is better)
COLUMNS = [
    ("class linear %", "linear_probe/{tap}/top1", 100.0, True),
    ("class kNN %", "knn_class/{tap}/top1", 100.0, True),
    ("abs pose kNN %", "knn_pose/{tap}/in_domain/acc", 100.0, True),
    ("abs pose med deg", "knn_pose/{tap}/in_domain/median_geodesic", 1.0, False),
    ("rel pose acc30 %", "relative_pose/{tap}/in_domain/acc_30", 100.0, True),
    ("unseen pose kNN med deg", "knn_pose/{tap}/unseen_pose/median_geodesic", 1.0, False),
    ("unseen pose rel acc30 %", "relative_pose/{tap}/unseen_pose/acc_30", 100.0, True),
    ("unseen cat kNN %", "knn_pose/{tap}/ood/acc", 100.0, True),
    ("unseen cat rel acc30 %", "relative_pose/{tap}/unseen_category/acc_30", 100.0, True),
]
METRICS = ["linear_probe", "knn_class", "knn_pose", "relative_pose"]
QUICK_BENCH = dict(categories=("car", "mug", "chair"), ood_categories=("bottle", "lamp"), train_instances=2,
                   val_instances=1, test_instances=1, ood_train_instances=1, ood_test_instances=1, view_stride=5,
                   triplets_per_instance=4)


def run_name(method: str, traj_weight: float, seed: int) -> str:
    return f"{method}-traj{traj_weight:g}-s{seed}"


def ensure_benchmark(data: Path, quick: bool, size: int, kinds: tuple[str, ...] = ("objects", "triplets"),
                     needs: tuple[str, ...] = ("objects/train", "triplets/train"),
                     quick_bench: dict = QUICK_BENCH) -> Path:
    """Use ``data`` if it holds every ``needs`` split (``labels.csv``); otherwise render ``kinds`` there (the ones it
    does not hold yet), if it is a new or empty folder or a benchmark root (never into a folder of other files).
    A benchmark found is used whatever its settings (:func:`describe_benchmark` says which in the tables).
    Shared with frame_pairs."""
    if all((data / n / "labels.csv").is_file() for n in needs):
        return data
    from common.data.synthetic import META_FILE, holds_other_files, render_benchmark
    from common.errors import ViewsslError

    if holds_other_files(data) and not (data / META_FILE).is_file():
        raise ViewsslError(f"--data has no {' and '.join(needs)} (labels.csv) and is not a synthetic benchmark root "
                           f"(no {META_FILE}): pass a benchmark root, or a new folder to render one into", data)

    log.info("rendering the %s benchmark (%s) into %s", "quick" if quick else "full", ", ".join(kinds), data)
    render_benchmark(data, kinds=kinds, size=size, scale="small" if quick else "full", seed=0, progress=not quick,
                     **(quick_bench if quick else {}))
    return data


def describe_benchmark(data: Path) -> str:
    """What the tables trained and evaluated on: the synthetic benchmark's scale, size and seed from its
    ``meta.json`` (a reused ``--data`` may have been rendered by a ``--quick`` run), or a plain dataset folder."""
    from common.data.synthetic import read_meta
    from common.errors import ViewsslError

    try:
        meta = read_meta(data) or {}
    except ViewsslError:
        meta = {}
    if not all(k in meta for k in ("scale", "size", "seed")):
        return "not a synthetic benchmark root (no readable meta.json)"
    return f"synthetic benchmark, {meta['scale']} scale, {meta['size']} px, seed {meta['seed']}"


def evaluate_run(ckpt: dict, bench: Path, device: torch.device, seed: int,
                 eval_options: dict) -> tuple[dict, dict, dict]:
    """The trajectory table's evaluation of one checkpoint: (metrics, protocol, skipped)."""
    from common.eval import run_metrics
    from trajssl.model_io import load_encoder_model

    model = load_encoder_model(ckpt, device)
    res = run_metrics(model, bench, metrics=METRICS, taps=list(TAPS), split="test", device=device, seed=seed,
                      **eval_options)
    return dict(res), res.protocol, dict(res.skipped)


def train_and_evaluate(bench: Path, run_dir: Path, config: dict, device: torch.device, eval_options: dict,
                       progress: bool = True, evaluate=evaluate_run, eval_during_training: bool = True) -> dict:
    """Train (or resume) one encoder run and evaluate its last checkpoint with ``evaluate(ckpt, bench, device, seed,
    eval_options) -> (metrics, protocol, skipped)``; the result is cached in ``run_dir/eval.json`` (reused when the
    config and the evaluation options are unchanged). Shared by the trajectory and frame-pair experiments."""
    from common.training import RETRAIN_HINT, config_diff, find_checkpoint, fit
    from trajssl.trainer import EncoderTrainer

    cache = run_dir / "eval.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except (OSError, ValueError) as e:  # a foreign or damaged file: the run is evaluated again
            log.warning("%s: unreadable (%s); evaluating the run again", cache, e)
            saved = {}
        if not isinstance(saved, dict):
            saved = {}
        # (config_diff: a data folder named relatively by an older run and absolutely now is the same folder)
        if (isinstance(saved.get("config"), dict) and not config_diff(saved["config"], config)
                and saved.get("eval_options") == eval_options):
            log.info("%s: finished earlier, reusing %s", run_dir.name, cache)
            return saved
    steps = int(config["steps"])
    trainer = EncoderTrainer(config, device)
    eval_every = max(steps // 5, 1) if eval_during_training and steps >= 50 else 0
    result = fit(trainer, run_dir, steps=steps, checkpoint_every=max(steps // 5, 1),
                 log_every=max(min(steps // 50, 50), 1), eval_every=eval_every, resume="auto", progress=progress,
                 force_hint=RETRAIN_HINT)
    trained = steps - int(result["start_step"])
    # the run's training time over every resume (without its evaluations); NaN from a checkpoint older than that
    # record: this call's time of its own steps
    total_known = math.isfinite(result["train_seconds"])
    train_seconds = result["train_seconds"] if total_known else result["call_train_seconds"]
    per_step = (result["call_train_seconds"] / trained if trained else
                train_seconds / steps if total_known else None)
    ckpt, path = find_checkpoint(run_dir)
    t1 = time.perf_counter()
    metrics, protocol, skipped = evaluate(ckpt, bench, device, int(config["seed"]), eval_options)
    out = {
        "config": config, "eval_options": eval_options, "checkpoint": str(path), "metrics": metrics,
        "skipped": skipped, "protocol": protocol, "train_seconds": train_seconds, "trained_steps": trained,
        "sec_per_step": per_step,
        "eval_seconds": time.perf_counter() - t1, "final_terms": result.get("terms", {}),
    }
    atomic_write_json(out, cache)
    return out


def seed_stats(values: list[float]) -> dict:
    """``{mean, std, n}`` of the finite values over seeds (None and NaN left out; sample std, NaN for one value).
    Shared with compare and frame_pairs."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    # one value has no spread to report (not 0): NaN, and the tables print the mean alone
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, "n": len(v)}


def stats_by_group(runs: list[dict], group_of) -> dict:
    """{group: {metric key: :func:`seed_stats` over the group's runs}}, runs grouped by ``group_of(config)``.
    Shared with frame_pairs."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_of(r["config"]), []).append(r)
    return {g: {k: seed_stats([r["metrics"].get(k) for r in rs]) for k in sorted({k for r in rs for k in r["metrics"]})}
            for g, rs in groups.items()}


def aggregate(runs: list[dict]) -> dict:
    """{group: {key: stats}} with group = "<method>-traj<w>", over seeds."""
    return stats_by_group(runs, lambda c: f"{c['method']}-traj{c['traj_weight']:g}")


def paired_deltas(runs: list[dict], key_a: str, key_b: str, select_a, select_b) -> dict:
    """Per-seed differences (b - a) between two run selections on result keys ``key_a`` / ``key_b``."""
    a = {r["config"]["seed"]: r["metrics"].get(key_a) for r in runs if select_a(r["config"])}
    b = {r["config"]["seed"]: r["metrics"].get(key_b) for r in runs if select_b(r["config"])}
    diffs = [b[s] - a[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]
    return seed_stats(diffs)


def format_stats(stats: dict, scale: float) -> str:
    """A table cell of :func:`seed_stats` times ``scale``: "mean ± std", the mean alone for one seed, "n/a" for
    none."""
    if not stats or stats.get("n", 0) == 0 or not math.isfinite(stats["mean"]):
        return "n/a"
    if not math.isfinite(stats["std"]):
        return f"{stats['mean'] * scale:.1f}"
    return f"{stats['mean'] * scale:.1f} ± {stats['std'] * scale:.1f}"


def format_markdown(runs: list[dict], agg: dict, args: dict) -> str:
    methods = sorted({r["config"]["method"] for r in runs}, key=["vicreg", "simclr", "simsiam"].index)
    weights = sorted({float(r["config"]["traj_weight"]) for r in runs})
    seeds = sorted({r["config"]["seed"] for r in runs})
    lines = ["# Trajectory regularisation on the synthetic objects", "",
             f"{len(runs)} runs: methods {', '.join(methods)}; "
             f"trajectory weight {', '.join(f'{w:g}' for w in weights)}; "
             f"seeds {', '.join(map(str, seeds))}; {args['steps']} steps, batch {args['batch_size']}, "
             f"{args['image_size']} px, {args.get('stem', 'small')} stem, {args.get('optimizer', 'lars')}"
             f"{' (QUICK smoke run: numbers are meaningless)' if args['quick'] else ''}"
             f"{'; data: ' + args['benchmark'] if args.get('benchmark') else ''}.",
             *([f"Command: `{args['command']}`; wall time of this invocation {args.get('wall_seconds', 0):.0f} s "
                "(runs it found finished cost none)."]
               if args.get("command") else []),
             "Mean ± std over seeds. Pose accuracies: kNN = exact Fib view index (per category); rel = relative-pose "
             "probe within 30 deg. Median errors in degrees (lower is better).", ""]
    head = "| method | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    for tap in TAPS:
        lines += [f"## {TAP_TITLES[tap]}", "", head, rule]
        for m in methods:
            for w in weights:
                g = f"{m}-traj{w:g}"
                if g not in agg:
                    continue
                name = m + (f" + traj {w:g}" if w > 0 else "")
                cells = [format_stats(agg[g].get(key.format(tap=tap), {}), scale) for _, key, scale, _ in COLUMNS]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(weights) > 1:
        w = max(weights)
        lines += [f"## Trajectory effect (traj {w:g} minus none; paired by seed; points or degrees)", "",
                  "| method, tap | " + " | ".join(c[0] for c in COLUMNS) + " |", rule]
        for m in methods:
            for tap in TAPS:
                cells = []
                for _, key, scale, _ in COLUMNS:
                    k = key.format(tap=tap)
                    d = paired_deltas(runs, k, k, lambda c, m=m: c["method"] == m and c["traj_weight"] == 0,
                                      lambda c, m=m: c["method"] == m and c["traj_weight"] == w)
                    cells.append(format_stats(d, scale))
                lines.append(f"| {m}, {tap} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Mid layer minus final layer (same runs; paired by seed)", "",
              "| method | " + " | ".join(c[0] for c in COLUMNS) + " |", rule]
    for m in methods:
        for wt in weights:
            cells = []
            for _, key, scale, _ in COLUMNS:
                sel = (lambda c, m=m, wt=wt: c["method"] == m and c["traj_weight"] == wt)
                d = paired_deltas(runs, key.format(tap="pooled"), key.format(tap="layer3"), sel, sel)
                cells.append(format_stats(d, scale))
            lines.append(f"| {m}{f' + traj {wt:g}' if wt > 0 else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Paper (trajSSL, ECCV 2024, from paper notes): trajectory +3-4 points of pose with classification "
              "unchanged; mid-layer features +9 / +20 / +11 points of pose over final-layer (in-domain / unseen poses "
              "/ unseen categories).", ""]
    secs = [r["sec_per_step"] for r in runs if r.get("sec_per_step")]
    if secs:
        lines.append(f"Training: median {np.median(secs):.2f} s/step; evaluation median "
                     f"{np.median([r['eval_seconds'] for r in runs]):.0f} s per run.")
    return "\n".join(lines) + "\n"


def encoder_options(image_size: int, stem: str):
    """The encoder options shared by this script and ``experiments.frame_pairs``: --image-size, --stem, --optimizer."""
    options = [
        click.option("--image-size", type=click.IntRange(min=8), default=image_size, help="Training image size."),
        click.option("--stem", type=click.Choice(("small", "imagenet")), default=stem,
                     help="ResNet-18 stem: small (3x3 stride 1, no max-pool; the paper's, on 32 px) or imagenet (7x7 "
                          "stride 2 + max-pool: at 64 px about a quarter of the cost of small at 32 px)."),
        click.option("--optimizer", type=click.Choice(("lars", "sgd", "adamw")), default="lars",
                     help="For every method (SimSiam too, which `viewssl train encoder` trains with sgd): lars, the "
                          "paper's schedule (the method's base lr x batch / 256: SimCLR 0.4, VICReg 0.3, SimSiam "
                          "0.05; warm-up, cosine); sgd (the same lr); adamw (lr 1e-3) learns faster in short runs at "
                          "small batches."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Benchmark root (rendered there if missing)  [default: OUT/benchmark]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder  [default: runs/traj_objects, or runs/traj_objects-quick]")
@click.option("--methods", default="vicreg,simclr,simsiam", help="Comma-separated Siamese methods.")
@click.option("--traj-weight", type=click.FloatRange(min=0, min_open=True), default=0.2,
              help="Weight of the trajectory loss in the runs with it (each method also runs without); > 0.")
@click.option("--seeds", default=None, help="Comma-separated seeds  [default: 0,1,2; quick: 0,1]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps per run  [default: 1500; quick: 2]")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="[default: 64; quick: 8]")
@encoder_options(image_size=32, stem="small")
@click.option("--render-size", type=click.IntRange(min=8), default=64,
              help="Pixel size when rendering the benchmark.")
@click.option("--probe-steps", type=click.IntRange(min=1), default=None,
              help="Relative-pose / linear probe steps  [default: 300; quick: 20]")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="At most this many images per evaluation split.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--quick", is_flag=True, help="Smoke test: tiny benchmark, 2 steps, 2 seeds.")
def main(data, out, methods, traj_weight, seeds, steps, batch_size, image_size, stem, optimizer, render_size,
         probe_steps, eval_limit, device, quick) -> dict:
    """Train SimCLR / VICReg / SimSiam with and without the trajectory loss on the synthetic objects and compare
    their classification, absolute and relative pose figures over seeds."""
    command = invocation("python -m experiments.traj_objects")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from trajssl.methods import METHODS as KNOWN

    q = quick
    seeds = int_list(seeds or ("0,1" if q else "0,1,2"), "--seeds", minimum=0)
    steps = steps or (2 if q else 1500)
    batch = batch_size or (8 if q else 64)
    probe_steps = probe_steps or (20 if q else 300)
    out = out or Path("runs/traj_objects-quick" if q else "runs/traj_objects")
    data = data or (out / "benchmark")
    methods = comma_list(methods, "--methods", KNOWN)
    device = resolve_device(device)
    bench = ensure_benchmark(data, q, render_size)
    eval_options = {"probe_steps": probe_steps, "limit": eval_limit}
    t0 = time.perf_counter()
    runs = []
    plan = [(m, w, s) for m in methods for w in sorted({0.0, traj_weight}) for s in seeds]
    for i, (m, w, s) in enumerate(plan):
        config = {"method": m, "traj_weight": w, "data": str(bench.resolve()), "seed": s, "steps": steps,
                  "batch_size": batch, "image_size": image_size, "small_stem": stem == "small", "optimizer": optimizer}
        run_dir = out / "runs" / run_name(m, w, s)
        log.info("[%d/%d] %s", i + 1, len(plan), run_dir)
        runs.append(train_and_evaluate(bench, run_dir, config, device, eval_options, progress=not q))
    agg = aggregate(runs)
    summary = {"quick": q, "steps": steps, "batch_size": batch, "image_size": image_size, "stem": stem,
               "optimizer": optimizer, "command": command, "wall_seconds": time.perf_counter() - t0,
               "benchmark": describe_benchmark(bench)}
    md = format_markdown(runs, agg, summary)
    deltas = {}
    for m in methods:
        for tap in TAPS:
            for _, key, _, _ in COLUMNS:
                k = key.format(tap=tap)
                deltas[f"{m}/traj_minus_none/{k}"] = paired_deltas(
                    runs, k, k, lambda c, m=m: c["method"] == m and c["traj_weight"] == 0,
                    lambda c, m=m: c["method"] == m and c["traj_weight"] == traj_weight)
    result = {"settings": {**summary, "seeds": seeds, "methods": methods, "traj_weight": traj_weight,
                           "data": str(bench), "eval": eval_options, "device": str(device)},
              "aggregate": agg, "traj_deltas": deltas, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "results.json")
    atomic_write_bytes(out / "results.md", md.encode())
    click.echo(md)
    click.echo(f"results: {out / 'results.md'}, {out / 'results.json'}  ({time.perf_counter() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
