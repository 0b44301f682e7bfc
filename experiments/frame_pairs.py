"""Which frame pairs make Siamese features pose-informed, which make them instance-invariant, and can one model be
both? SiamPose's Table 2 (same / nearby / distant pairs) on the synthetic object sequences, plus a two-head model.

    python -m experiments.frame_pairs --data BENCH [--methods simsiam[,vicreg]] [--modes same,nearby,distant,dual]
                                      [--dual-traj-weight 0.2] [--seeds 0,1,2] [--steps 1500] [--batch-size 32]
                                      [--out runs/frame_pairs]
    python -m experiments.frame_pairs --quick            # smoke test: tiny sequences, 2 steps, 2 seeds (minutes)

For every method (SimSiam by default; VICReg with ``--methods simsiam,vicreg``), pair mode and seed it trains an
encoder on ``BENCH/sequences/train`` (:mod:`trajssl.trainer`, ``--pairs same | nearby | distant | dual``) and
evaluates the last checkpoint with the common evaluation module (:func:`common.eval.run_metrics`) on the sequences
splits (``BENCH/sequences`` as a train/test split folder; the test sequences are other instances of the same
categories):

- pose-informed: SiamPose's zero-shot 9-DoF box fitting (``box_fit``: 1-NN train frame by cosine, oracle 2D box,
  ground plane and intrinsics of the query; AP@0.5 = share of the scored test frames with 3D IoU > 0.5, and the mean
  IoU; a seeded ``--box-queries`` of them when there are more), the pose of the 1-NN train frame of every test frame
  (median geodesic error of its rotation, computed here from the evaluation's cached features), and a ridge readout
  of the viewpoint angles (``viewpoint_readout``, MAE);
- instance-invariant: kNN category top-1 (``knn_class``, train -> test) and sequence re-identification mAP
  (``reid``, within the test frames, the query itself excluded).

``dual`` is the two-head model of :mod:`trajssl.trainer` (one trunk, head A on nearby pairs, head B on distant
pairs, losses summed); with ``--dual-traj-weight w > 0`` a second dual row adds the trajectory loss on
(previous, frame, next) consecutive frames. Features are read from the trunk (``pooled``, and ``layer3`` as the mid
layer) and, as a separate table, from the projector heads themselves (each model's projector; the dual model's
head A and head B). Reported as mean +- std over seeds; the dual rows also as paired per-seed differences to each
single-purpose model.

Writes ``OUT/results.json`` (every figure of every run, the aggregates, the protocol, the command and the wall
time) and ``OUT/results.md``. Runs resume: each run lives in ``OUT/runs/<method>-<pairs>[-traj<w>]-s<seed>`` with
its checkpoints and ``eval.json``; rerunning the command skips finished runs and continues interrupted ones. Without
sequences in ``--data`` they are rendered there first (``--quick``: a tiny set).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import click
import numpy as np
import torch

from common.cli import ViewsslCommand, comma_list, int_list, invocation, resolve_device
from common.io import atomic_write_bytes, atomic_write_json

from .traj_objects import (describe_benchmark, encoder_options, ensure_benchmark, format_stats, paired_deltas,
                           seed_stats, stats_by_group, train_and_evaluate)

log = logging.getLogger("viewssl.experiments.frame_pairs")

MODES = ("same", "nearby", "distant", "dual")
TRUNK_TAPS = ("pooled", "layer3")
TAP_TITLES = {"pooled": "trunk, final layer (pooled, 512-d)",
              "layer3": "trunk, mid layer (layer3 map pooled to at most 4x4)",
              "head": "projector heads (each model's projector output; dual: head A = nearby, head B = distant)"}
#: (column title, result key with {tap}, scale, higher is better, kind)
COLUMNS = [
    ("box AP@0.5 %", "box_fit/{tap}/ap_50", 100.0, True, "pose"),
    ("box mean IoU %", "box_fit/{tap}/mean_iou", 100.0, True, "pose"),
    ("pose 1-NN med deg", "pose_nn/{tap}/median_geodesic", 1.0, False, "pose"),
    ("pose readout MAE deg", "viewpoint_readout/{tap}/readout/mae", 1.0, False, "pose"),
    ("class kNN %", "knn_class/{tap}/top1", 100.0, True, "instance"),
    ("re-ID mAP %", "reid/{tap}/map", 100.0, True, "instance"),
    ("re-ID top-1 %", "reid/{tap}/top1", 100.0, True, "instance"),
]
METRICS = ["box_fit", "viewpoint_readout", "knn_class", "reid"]
#: tiny sequences for --quick: 3 categories, 1 train + 1 test instance each, 12 frames
QUICK_BENCH = dict(sequence_categories=("car", "mug", "chair"), frames=12)
PAPER_NOTE = ("SiamPose (Jean, St-Charles et al.; paper tables not retrievable here, see "
              "shared/reference/trajssl_and_siampose.md): nearby frame pairs give pose-informed latents (better "
              "zero-shot box fitting) and distant pairs instance-invariant ones (better re-identification / "
              "classification); a model with both is stated as open.")


def variant_name(method: str, pairs: str, traj_weight: float) -> str:
    return f"{method}-{pairs}" + (f"-traj{traj_weight:g}" if traj_weight > 0 else "")


def run_name(method: str, pairs: str, traj_weight: float, seed: int) -> str:
    return f"{variant_name(method, pairs, traj_weight)}-s{seed}"


def variant_title(method: str, pairs: str, traj_weight: float) -> str:
    name = {"same": "same frame", "nearby": "nearby frames", "distant": "distant frames",
            "dual": "dual: nearby + distant heads"}[pairs]
    return f"{method}, {name}" + (f" + traj {traj_weight:g}" if traj_weight > 0 else "")


class HeadTaps:
    """A trained encoder as a PoseModel whose taps also include the projector outputs: ``head`` (the run's
    ``heads`` module, i.e. head A of a dual model) and, for a dual model, ``head_distant`` (head B)."""

    family = "encoder"

    def __init__(self, ckpt: dict, device: torch.device):
        from trajssl.methods import build_method
        from trajssl.model_io import load_encoder_model

        self.base = load_encoder_model(ckpt, device)
        self.input_size, self.device = self.base.input_size, self.base.device
        config = ckpt["config"]
        self.heads = {}
        for tap, module in (("head", "heads"), ("head_distant", "heads_distant")):
            if module in ckpt["modules"]:
                m = build_method(config["method"], self.base.encoder.feat_dim, config)
                m.load_state_dict(ckpt["modules"][module])
                self.heads[tap] = m.to(self.device).eval()
        self.taps = list(self.base.taps) + list(self.heads)

    def predict_angles(self, images):
        return None

    @torch.no_grad()
    def features(self, images: torch.Tensor, taps=("pooled",)) -> dict[str, torch.Tensor]:
        trunk = [t for t in taps if t not in self.heads]
        need = list(dict.fromkeys(trunk + (["pooled"] if len(trunk) < len(taps) else [])))
        f = self.base.features(images, need)
        return {t: self.heads[t].projector(f["pooled"]).float() if t in self.heads else f[t] for t in taps}


def pose_nearest_neighbour(model, ctx, taps) -> dict[str, float]:
    """Rotation error of the 1-NN training frame (cosine, the neighbour box_fit uses) for every test frame, per tap:
    ``pose_nn/<tap>/{median_geodesic, mean_geodesic, acc_30}``. Reads the features cached in the context."""
    from common.eval.knn import knn_search
    from common.eval.pose import geodesic_errors_deg, geodesic_summary
    from common.geometry import angles_to_matrix

    tr_o, q_o = ctx.outputs(model, "", "train"), ctx.outputs(model, "", ctx.split)
    rot_tr = angles_to_matrix(*tr_o.true_angles.unbind(-1))
    rot_q = angles_to_matrix(*q_o.true_angles.unbind(-1))
    out = {}
    for tap in taps:
        nn_idx = knn_search(ctx.features(model, "", "train", tap), ctx.features(model, "", ctx.split, tap), 1)
        errs = geodesic_errors_deg(rot_tr[nn_idx.indices[:, 0].cpu()], rot_q)
        out.update({f"pose_nn/{tap}/{k}": v for k, v in geodesic_summary(errs).items()})
    return out


def evaluate_run(ckpt: dict, bench: Path, device: torch.device, seed: int,
                 eval_options: dict) -> tuple[dict, dict, dict]:
    """(metrics, protocol, skipped) of one checkpoint on ``bench/sequences`` (train = gallery, test = queries)."""
    from common.eval import run_metrics
    from common.eval.context import DataSource, EvalContext

    model = HeadTaps(ckpt, device)
    taps = list(TRUNK_TAPS) + list(model.heads)
    ctx = EvalContext(source=DataSource.detect(bench / "sequences"), split="test", device=device, seed=seed,
                      taps=taps, **eval_options)
    res = run_metrics(model, metrics=METRICS, context=ctx)
    metrics = {**dict(res), **pose_nearest_neighbour(model, ctx, taps)}
    protocol = {**res.protocol, "pose_nn": {
        "gallery": "sequences/train", "queries": "sequences/test", "neighbour": "1-NN cosine (as box_fit)",
        "error": "geodesic angle between the neighbour's and the query's camera-frame rotation, degrees"}}
    return metrics, protocol, dict(res.skipped)


def _variant(config: dict) -> str:
    return variant_name(config["method"], config["pairs"], float(config["traj_weight"]))


def aggregate(runs: list[dict]) -> dict:
    """{variant: {key: stats over seeds}} with variant = "<method>-<pairs>[-traj<w>]"."""
    return stats_by_group(runs, _variant)


def dual_deltas(runs: list[dict], tap: str = "pooled") -> dict:
    """Paired per-seed differences (dual variant minus single-purpose variant) on every column, for each method,
    dual variant and single mode: ``{"<dual variant> - <single variant>": {column key: stats}}``."""
    out = {}
    variants = {(r["config"]["method"], r["config"]["pairs"], float(r["config"]["traj_weight"])) for r in runs}
    for m, p, w in sorted(variants):
        if p != "dual":
            continue
        for single in ("nearby", "distant"):
            if (m, single, 0.0) not in variants:
                continue
            name = f"{variant_name(m, p, w)} - {variant_name(m, single, 0.0)}"
            out[name] = {key.format(tap=tap): paired_deltas(
                runs, key.format(tap=tap), key.format(tap=tap),
                lambda c, m=m, s=single: (c["method"], c["pairs"], float(c["traj_weight"])) == (m, s, 0.0),
                lambda c, m=m, p=p, w=w: (c["method"], c["pairs"], float(c["traj_weight"])) == (m, p, w))
                for _, key, _, _, _ in COLUMNS}
    return out


def _ordered_variants(runs: list[dict]) -> list[tuple[str, str, float]]:
    order = {m: i for i, m in enumerate(MODES)}
    variants = {(r["config"]["method"], r["config"]["pairs"], float(r["config"]["traj_weight"])) for r in runs}
    return sorted(variants, key=lambda v: (v[0] != "simsiam", v[0], order.get(v[1], 9), v[2]))


def _row(title: str, stats: dict, tap: str) -> str:
    cells = [format_stats(stats.get(key.format(tap=tap), {}), scale) for _, key, scale, _, _ in COLUMNS]
    return f"| {title} | " + " | ".join(cells) + " |"


def _claim_sentence(agg: dict, runs: list[dict], method: str, tap: str = "pooled") -> list[str]:
    """Whether nearby beats distant on the pose columns and distant beats nearby on the instance columns (paired
    by seed), one honest line per column."""
    near, far = variant_name(method, "nearby", 0.0), variant_name(method, "distant", 0.0)
    if near not in agg or far not in agg:
        return []
    lines = []
    for title, key, scale, higher, kind in COLUMNS:
        k = key.format(tap=tap)
        d = paired_deltas(runs, k, k, lambda c: _variant(c) == far, lambda c: _variant(c) == near)
        if d["n"] == 0 or not math.isfinite(d["mean"]):
            continue
        spread = f" ± {d['std'] * scale:.1f}" if math.isfinite(d["std"]) else " (one seed)"
        head = f"- {title}: nearby minus distant {d['mean'] * scale:+.1f}{spread}"
        if d["mean"] == 0:
            lines.append(f"{head} (no difference; SiamPose expects {'nearby' if kind == 'pose' else 'distant'} "
                         "better).")
            continue
        near_better = (d["mean"] > 0) == higher
        clear = d["n"] > 1 and abs(d["mean"]) > 2 * d["std"] / math.sqrt(d["n"])
        verdict = "as SiamPose's claim" if near_better == (kind == "pose") else "**against SiamPose's claim**"
        lines.append(f"{head} ({'nearby' if near_better else 'distant'} better, {verdict}; "
                     f"{'beyond' if clear else 'within'} 2 standard errors over {d['n']} seed(s)).")
    return lines


def format_markdown(runs: list[dict], agg: dict, args: dict) -> str:
    variants = _ordered_variants(runs)
    seeds = sorted({r["config"]["seed"] for r in runs})
    head = "| model | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    quick = " (QUICK smoke run: numbers are meaningless)" if args["quick"] else ""
    quick += f"; data: {args['benchmark']}" if args.get("benchmark") else ""
    lines = ["# Frame pairs on the synthetic object sequences (SiamPose Table 2 analog) and a two-head model", "",
             f"{len(runs)} runs: {len(variants)} variants x seeds {', '.join(map(str, seeds))}; {args['steps']} "
             f"steps, batch {args['batch_size']}, {args['image_size']} px, {args['stem']} stem, "
             f"{args.get('optimizer', 'lars')}{quick}.",
             "Trained on `sequences/train`; box fit and pose 1-NN: gallery `sequences/train`, queries "
             "`sequences/test` (other instances of the same categories); pose readout: ridge on train, scored on "
             "test; class kNN: category, train -> test; re-ID: within `sequences/test`. Mean ± std over seeds. "
             "Pose-informed columns first (box, pose), instance-invariant ones last (class, re-ID).", ""]
    for tap in (*TRUNK_TAPS, "head"):
        lines += [f"## {TAP_TITLES[tap]}", "", head, rule]
        for m, p, w in variants:
            g = agg[variant_name(m, p, w)]
            if tap == "head" and p == "dual":
                lines.append(_row(variant_title(m, p, w) + ", head A (nearby)", g, "head"))
                lines.append(_row(variant_title(m, p, w) + ", head B (distant)", g, "head_distant"))
            else:
                lines.append(_row(variant_title(m, p, w), g, tap))
        if tap == "pooled":  # the random-neighbour baseline depends on the seed only: one run per seed
            first = [r for r in runs if _variant(r["config"]) == variant_name(*variants[0])]
            cells = [format_stats(seed_stats([r["metrics"].get(f"box_fit/pooled/random_neighbor/{k}") for r in first]),
                                  100.0) for k in ("ap_50", "mean_iou")]
            lines.append("| random train frame (box baseline) | " + " | ".join(cells + ["n/a"] * (len(COLUMNS) - 2))
                         + " |")
        lines.append("")
    deltas = dual_deltas(runs)
    if deltas:
        lines += ["## One model that has both? Dual minus each single-purpose model (pooled trunk; paired by seed; "
                  "points or degrees)", "", "| comparison | " + " | ".join(c[0] for c in COLUMNS) + " |", rule]
        for name, d in deltas.items():
            lines.append(f"| {name} | " + " | ".join(format_stats(d[key.format(tap='pooled')], scale)
                                                     for _, key, scale, _, _ in COLUMNS) + " |")
        lines += ["", "Read: the dual model has both if it is no worse than `nearby` on the pose columns (box: "
                  "higher is better, degrees: lower) and no worse than `distant` on the instance columns.", ""]
    lines += ["## Against SiamPose's claim (pooled trunk)", ""]
    for m in sorted({v[0] for v in variants}):
        claim = _claim_sentence(agg, runs, m)
        if claim:
            lines += [f"{m}:"] + claim + [""]
    lines += [PAPER_NOTE, ""]
    secs = {}
    for r in runs:
        if r.get("sec_per_step"):
            secs.setdefault(_variant(r["config"]), []).append(r["sec_per_step"])
    if secs:
        lines.append("Training s/step (median): " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in secs.items())
                     + f"; evaluation median {np.median([r['eval_seconds'] for r in runs]):.0f} s per run.")
    if args.get("command"):
        lines.append(f"Command: `{args['command']}`; wall time of this invocation {args.get('wall_seconds', 0):.0f} s "
                     "(runs it found finished cost none).")
    return "\n".join(lines) + "\n"


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Benchmark root (sequences rendered there if missing)  [default: OUT/benchmark]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder  [default: runs/frame_pairs, or runs/frame_pairs-quick]")
@click.option("--methods", default="simsiam", help="Comma-separated: simsiam, vicreg, simclr.")
@click.option("--modes", default=",".join(MODES), help="Comma-separated pair modes.")
@click.option("--dual-traj-weight", type=click.FloatRange(min=0), default=0.2,
              help="An extra dual row with the trajectory loss on consecutive frames at this weight (0 = none).")
@click.option("--seeds", default=None, help="Comma-separated seeds  [default: 0,1,2; quick: 0,1]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps per run  [default: 1500; quick: 2]")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="[default: 32; quick: 8]")
@encoder_options(image_size=64, stem="imagenet")
@click.option("--render-size", type=click.IntRange(min=8), default=64, help="Pixel size when rendering the sequences.")
@click.option("--box-queries", type=click.IntRange(min=1), default=1000,
              help="Test frames scored by the box fit (SiamPose: 1000).")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--quick", is_flag=True, help="Smoke test: tiny sequences, 2 steps, 2 seeds.")
def main(data, out, methods, modes, dual_traj_weight, seeds, steps, batch_size, image_size, stem, optimizer,
         render_size, box_queries, device, quick) -> dict:
    """Train Siamese encoders on frame pairs of one video (same / nearby / distant frames, and both on two heads)
    and compare their pose, box, re-identification and classification figures over seeds."""
    command = invocation("python -m experiments.frame_pairs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from trajssl.methods import METHODS as KNOWN

    q = quick
    seeds = int_list(seeds or ("0,1" if q else "0,1,2"), "--seeds", minimum=0)
    steps = steps or (2 if q else 1500)
    batch = batch_size or (8 if q else 32)
    out = out or Path("runs/frame_pairs-quick" if q else "runs/frame_pairs")
    data = data or (out / "benchmark")
    methods = comma_list(methods, "--methods", KNOWN)
    modes = comma_list(modes, "--modes", MODES)
    device = resolve_device(device)
    bench = ensure_benchmark(data, q, render_size, kinds=("sequences",), needs=("sequences/train", "sequences/test"),
                             quick_bench=QUICK_BENCH)
    eval_options = {"box_queries": box_queries}
    t0 = time.perf_counter()
    plan = []
    for m in methods:
        for mode in modes:
            weights = [0.0] + ([dual_traj_weight] if mode == "dual" and dual_traj_weight > 0 else [])
            plan += [(m, mode, w, s) for w in weights for s in seeds]
    runs = []
    for i, (m, mode, w, s) in enumerate(plan):
        config = {"method": m, "pairs": mode, "traj_weight": w, "data": str(bench.resolve()), "seed": s, "steps": steps,
                  "batch_size": batch, "image_size": image_size, "small_stem": stem == "small",
                  "optimizer": optimizer}
        run_dir = out / "runs" / run_name(m, mode, w, s)
        log.info("[%d/%d] %s", i + 1, len(plan), run_dir)
        runs.append(train_and_evaluate(bench, run_dir, config, device, eval_options, progress=not q,
                                       evaluate=evaluate_run, eval_during_training=False))
    agg = aggregate(runs)
    wall = time.perf_counter() - t0
    summary = {"quick": q, "steps": steps, "batch_size": batch, "image_size": image_size, "stem": stem,
               "optimizer": optimizer, "command": command, "wall_seconds": wall, "benchmark": describe_benchmark(bench)}
    md = format_markdown(runs, agg, summary)
    result = {"settings": {**summary, "seeds": seeds, "methods": methods, "modes": modes,
                           "dual_traj_weight": dual_traj_weight, "data": str(bench), "eval": eval_options,
                           "device": str(device)},
              "columns": [{"title": t, "key": k, "scale": sc, "higher_is_better": h, "kind": kind}
                          for t, k, sc, h, kind in COLUMNS],
              "aggregate": agg, "dual_deltas": {tap: dual_deltas(runs, tap) for tap in TRUNK_TAPS},
              "protocol": runs[0]["protocol"] if runs else {}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "results.json")
    atomic_write_bytes(out / "results.md", md.encode())
    click.echo(md)
    click.echo(f"results: {out / 'results.md'}, {out / 'results.json'}")
    click.echo(f"wall time {wall:.0f} s; command: {command}")
    return result


if __name__ == "__main__":
    main()
