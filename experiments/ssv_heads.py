"""SSV on the synthetic heads: self-supervised viewpoint vs the supervised baseline and a random floor, with ablations.

    python -m experiments.ssv_heads --data DIR [--out runs/ssv_heads] [--preset cpu] [--steps 4000] [--sup-steps 2000]
        [--quick]

Trains SSV (``--preset``, default ``cpu``) on ``DIR/heads/train`` (labels ignored) and evaluates on the labelled
``DIR/heads/test`` through ``common.eval.run_metrics`` (metric ``viewpoint``): raw MAE (V's own frame, no fit) and
calibrated MAE (SSV's protocol: a per-angle linear map fitted on a seeded 10% of the test frames, scored on the
rest). Rows:

- ``full``: every loss; ``no_imc``: without L_imc; ``no_imc_sym``: without L_imc and both symmetry losses
  (the paper's ablation rows);
- ``supervised``: the same viewpoint network trained with the training labels;
- ``random``: angles drawn uniformly in the test labels' per-angle range (the floor; calibrated, it becomes
  "predict the mean"), always with seed 0, so runs of every ``--seed`` show the same floor.

The viewpoint sampling ranges of S are the benchmark's head pose ranges (from ``DIR/meta.json``), as SSV used
300W-LP's. Each row trains in ``OUT/<row>`` with ``resume="auto"``: rerunning the command after a crash continues.
Every ``--eval-every`` steps V is evaluated on the test heads during training (``OUT/<row>/metrics.jsonl`` and
tensorboard); ``OUT/learning_curves.png`` plots each row's calibrated MAE against the step (with the 1.3x goal
dash-dotted when the table has the full and the supervised row). Writes ``OUT/ssv_heads.md`` and ``OUT/ssv_heads.json``
(rows that an earlier command with other ``--rows`` trained in ``OUT`` stay in both, with that command) and prints the
wall time. Goal (issue 4): SSV-full calibrated MAE within 1.3x of the supervised one, and full < no_imc < no_imc_sym.
Every row is also scored with V_ema, the moving average of V's weights that training keeps beside V (column *cal MAE, V
EMA*; ``ema/`` keys in the JSON and the in-training evaluations); the goals are checked on V, and the 1.3x goal once
more with V_ema on both rows. A goal whose rows were trained with other settings (a row kept from an earlier command,
e.g. without ``--highpass``) is not compared: the table names the keys.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import click
import numpy as np
import torch
from click.core import ParameterSource

from common.cli import ViewsslCommand, comma_list, invocation, resolve_device
from common.errors import ViewsslError
from common.io import atomic_save_figure
from common.training import eval_mode, same_place
from ssv.cli import PRESET_CHOICES
from ssv.trainer import SSVTrainer, default_config, lr_multiplier, lr_schedule, sample_styles, sample_viewpoints

log = logging.getLogger("viewssl.experiments.ssv_heads")

ROWS = {
    "full": dict(),
    "no_imc": dict(no_imc=True),
    "no_imc_sym": dict(no_imc=True, no_sym=True),
    "supervised": dict(supervised=True),
}
ROW_TITLES = {
    "full": "SSV full",
    "no_imc": "SSV w/o L_imc",
    "no_imc_sym": "SSV w/o L_imc and L_sym",
    "supervised": "supervised (same V, labels)",
    "random": "random prediction (floor)",
}
KEYS = ("azimuth_mae", "elevation_mae", "tilt_mae", "mae")
#: issue 4's goal: SSV full's calibrated MAE at most this many times the supervised V's
GOAL_RATIO = 1.3
#: config keys in which two rows may differ (the switches of ROWS; the seed and the steps, which the ablation
#: ordering checks on its own: its rows must share them, full and supervised need not)
ROW_KEYS = {"seed", "steps", "eval_data", "supervised", "w_imc", "w_sym", "w_gsym"}
#: L_imc's feature network: unused without L_imc (only the seeds of one row must agree on it)
PHI_KEYS = set(SSVTrainer.PHI_KEYS)
#: what only changes what is evaluated beside V, never the training (runs from before V_ema have no such key)
EVAL_ONLY_KEYS = {"v_ema_decay"}


def head_ranges(root: Path) -> dict[str, float] | None:
    """(yaw, pitch, roll) half-ranges in degrees from the benchmark's meta.json, or None (logged: SSV's 300W-LP
    ranges are used then)."""
    meta = root / "meta.json"
    try:
        config = json.loads(meta.read_text())["config"]
        return {"az": float(config["yaw_range"]), "el": float(config["pitch_range"]),
                "tilt": float(config["roll_range"])}
    except (OSError, KeyError, ValueError, TypeError):
        log.warning("no head pose ranges in %s: using SSV's 300W-LP ranges", meta)
        return None


def evaluate(model, test_dir: Path, device) -> dict[str, float]:
    from common.eval import run_metrics

    return table_metrics(run_metrics(model, test_dir, metrics=["viewpoint"], device=device))


def table_metrics(res: dict, prefix: str = "") -> dict[str, float]:
    """The table's ``raw/...`` and ``calibrated/...`` figures from the flat ``{prefix}viewpoint/...`` keys of
    ``run_metrics`` or of a training evaluation (``prefix="ema/"``: V_ema's); {} when it has none."""
    out = {}
    for proto in ("raw", "calibrated"):
        for k in KEYS + ("median_geodesic", "acc_pi_6"):
            key = f"{prefix}viewpoint/{proto}/{k}"
            if key in res:
                out[f"{proto}/{k}"] = float(res[key])
    return out


def brightness_asymmetry(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> (B,) mean gray of the left half minus the right half (the light and the background
    gradient both move it)."""
    gray = images.mean(dim=1)
    half = gray.shape[-1] // 2
    return gray[..., :half].mean(dim=(1, 2)) - gray[..., -half:].mean(dim=(1, 2))


def sign_accuracy(pred, true, min_turn_deg: float = 20.0) -> float:
    """Share of the items turned at least ``min_turn_deg`` (|true| in radians) whose predicted side (sign) is right,
    up to one flip of the whole predicted frame: max(share right, share wrong). A zero (or NaN) prediction has no
    side and counts as neither; NaN when no item is turned that far."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    turned = np.abs(true) >= math.radians(min_turn_deg)
    if not turned.any():
        return float("nan")
    agree = np.sign(pred[turned]) * np.sign(true[turned])
    return float(max(np.mean(agree > 0), np.mean(agree < 0)))


def _pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def shading_shortcut(model, test_dir: Path, limit: int = 2000, batch: int = 250, plot: Path | None = None,
                     title: str = "") -> dict[str, float]:
    """Does V read the light as the azimuth? Pearson r of V's raw azimuth on (the first ``limit``) test heads with
    their true azimuth (``r_az_true``) and with their left-right brightness asymmetry (``r_az_shading``, see
    :func:`brightness_asymmetry`; ``r_true_shading`` is how much that asymmetry says about the true azimuth). A V that
    learned the shading shortcut has a high ``r_az_shading`` and a low ``r_az_true``. V's azimuth zero is fixed by
    the symmetry loss (a mirrored head has the opposite azimuth), so magnitude and sign can be told apart:
    ``r_abs_az`` is the r of |V's azimuth| with |true azimuth| (frontal versus profile), ``az_sign_acc`` the share of
    the heads turned at least 20 deg whose sign V gets right, up to one flip of V's whole frame (0.5 = chance).
    ``plot``: also write both scatter plots there (PNG)."""
    from common.data.labels import LabeledFolder
    from common.geometry import wrap_angle
    from ssv.model_io import predict_dataset

    data = LabeledFolder(test_dir, size=None)
    items = [data[i] for i in range(min(len(data), limit))]  # read once: for the model and for the asymmetry
    pred, true = (a[:, 0] for a in predict_dataset(model, items, batch_size=batch))
    asym = brightness_asymmetry(torch.stack([it["image"] for it in items])).double().numpy()
    # L_sym puts V's azimuth zero (facing the camera) at 0 or at 180 deg: measure from whichever is nearer its mean
    zero = 0.0 if np.cos(pred).mean() >= 0 else math.pi
    from_zero = wrap_angle(torch.from_numpy(pred - zero)).numpy()
    result = {"r_az_true": _pearson(pred, true), "r_az_shading": _pearson(pred, asym),
              "r_true_shading": _pearson(true, asym), "r_abs_az": _pearson(np.abs(from_zero), np.abs(true)),
              "az_sign_acc": sign_accuracy(from_zero, true)}
    if plot is not None:
        _scatter(plot, np.degrees(pred), [(np.degrees(true), "true azimuth (deg)", result["r_az_true"]),
                                          (asym, "left-right brightness asymmetry", result["r_az_shading"])], title)
    return result


def _scatter(path: Path, y, panels, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for ax, (x, label, r) in zip(axes, panels):
        ax.scatter(x, y, s=3, alpha=0.4)
        ax.set_xlabel(label)
        ax.set_title(f"r = {r:+.2f}")
    axes[0].set_ylabel("V's azimuth (deg)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=110)


def eval_history(run_dir: Path, key: str = "viewpoint/calibrated/mae") -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the periodic evaluations of ``run_dir/metrics.jsonl``, sorted by step; a step
    logged twice (a run resumed from a checkpoint older than its last evaluation) keeps its last value."""
    by_step: dict[int, float] = {}
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(rec, dict) and rec.get("kind") == "eval" and isinstance(rec.get(key), (int, float)):
            by_step[int(rec["step"])] = float(rec[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def learning_curves(rows: dict, path: Path, title: str = "") -> bool:
    """Plot every row's calibrated MAE on the test heads against the training step (from its periodic evaluations),
    V_ema's dotted in the same colour where it was evaluated, with the random floor as a dashed line; False (nothing
    written) when no row has two evaluations."""
    curves = {name: eval_history(r["run_dir"]) for name, r in rows.items() if r.get("run_dir")}
    curves = {name: c for name, c in curves.items() if len(c[0]) >= 2}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {}
    for name, (steps, values) in curves.items():
        line, = ax.plot(steps, values, marker="o", markersize=3, label=ROW_TITLES.get(name, name))
        colors[name] = line.get_color()
        ema_steps, ema_values = ema_history(rows[name]["run_dir"])
        if len(ema_steps) >= 2:
            ax.plot(ema_steps, ema_values, color=line.get_color(), linestyle=":",
                    label=f"{ROW_TITLES.get(name, name)}, V EMA")
    floor = rows.get("random", {}).get("metrics", {}).get("calibrated/mae")
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label=ROW_TITLES["random"])
    supervised = rows.get("supervised", {}).get("metrics", {}).get("calibrated/mae")
    if supervised is not None and "full" in rows:
        draw_goal(ax, supervised, colors.get("supervised"), f" at {rows['supervised']['steps']}")
    ax.set_ylim(bottom=0)
    save_mae_plot(fig, ax, path, title)
    return True


def draw_goal(ax, supervised: float, color=None, at: str = "") -> None:
    """The 1.3x goal as a dash-dotted line: GOAL_RATIO x the supervised V's calibrated MAE (``at``: its step)."""
    ax.axhline(GOAL_RATIO * supervised, color=color or "black", linestyle="-.", linewidth=1,
               label=f"goal: {GOAL_RATIO} x supervised{at} = {GOAL_RATIO * supervised:.1f}")


def save_mae_plot(fig, ax, path: Path, title: str = "") -> None:
    """Label the axes of a calibrated-MAE-against-step plot, write it to ``path`` and close it."""
    ax.set_xlabel("training step")
    ax.set_ylabel("calibrated MAE on the test heads (deg)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=110)


@torch.no_grad()
def cycle_errors(trainer, n: int = 512, seed: int = 0) -> dict[str, float]:
    """How well V reads the generator's own viewpoint: MAE in degrees of V's angles on ``n`` EMA-generator samples
    at viewpoints drawn from S's sampling ranges (a private RNG: training randomness is untouched), and how S shows
    the azimuth: ``cycle/r_az_shading``, Pearson r of the sampled azimuth with the samples' left-right brightness
    asymmetry. {} without S."""
    from common.geometry import angular_difference

    if getattr(trainer, "supervised", True):
        return {}
    gen = torch.Generator().manual_seed(seed)
    z = sample_styles(n, int(trainer.config["code_dim"]), generator=gen)
    v = sample_viewpoints(n, trainer.ranges, generator=gen)
    with eval_mode(trainer.V):
        images = trainer.G_ema(z.to(trainer.device), v.to(trainer.device))
        pred = trainer.V.decode(trainer.V(images)["view"]).cpu()
    err = torch.rad2deg(angular_difference(pred, v)).mean(dim=0)
    return {"cycle/azimuth_mae": float(err[0]), "cycle/mae": float(err.mean()),
            "cycle/r_az_shading": _pearson(v[:, 0], brightness_asymmetry(images.float().cpu()))}


def side_probes(trainer, train_dir: Path, test_dir: Path, limit: int = 4000, n_fake: int = 4000, seed: int = 0,
                min_turn_deg: float = 20.0) -> dict[str, float]:
    """Where is the side of the azimuth lost: in V's features or in its head? Two linear probes
    (:func:`common.eval.probes.linear_probe`) for the side (sign of the true azimuth) of the test heads turned at least
    ``min_turn_deg``, on the feature vector every head of V reads:

    - ``side_probe_real``: trained on (the first ``limit``) *training heads with their labels*, a diagnostic that uses
      labels (SSV never does): how well V's features carry the side of real heads;
    - ``side_probe_fake``: trained on ``n_fake`` EMA-generator samples with the side of their sampled azimuth (a
      private RNG), like V's head is: how well the side as S shows it transfers to real heads, up to one flip of the
      frame (as ``az_sign_acc``).

    A high real and a low fake probe say the features have the side and the head, taught on S's samples, reads it
    from a cue real heads do not share. {} without S."""
    from common.data.labels import LabeledFolder
    from common.eval.probes import linear_probe
    from ssv.model_io import SSVPoseModel

    if getattr(trainer, "supervised", True):
        return {}
    model = SSVPoseModel(trainer.V, trainer.config, trainer.device)
    turn = math.radians(min_turn_deg)

    def features(images):
        return torch.cat([model.features(images[i : i + 250], ["pooled"])["pooled"].cpu()
                          for i in range(0, len(images), 250)])

    def real(folder, n):
        data = LabeledFolder(folder, size=None)
        items = [data[i] for i in range(min(len(data), n))]
        azimuth = torch.stack([it["angles"][0] for it in items]).float()
        turned = azimuth.abs() >= turn
        return features(torch.stack([it["image"] for it in items])[turned]), (azimuth[turned] > 0).long()

    f_test, side_test = real(test_dir, limit)
    if len(side_test) == 0:
        return {}
    f_train, side_train = real(train_dir, limit)
    gen = torch.Generator().manual_seed(seed)
    z = sample_styles(n_fake, int(trainer.config["code_dim"]), generator=gen)
    v = sample_viewpoints(n_fake, trainer.ranges, generator=gen)
    with torch.no_grad():
        fakes = torch.cat([trainer.G_ema(z[i : i + 250].to(trainer.device), v[i : i + 250].to(trainer.device))
                           for i in range(0, n_fake, 250)])
    f_fake = features((fakes + 1.0) * 0.5)  # to [0, 1] without clamping: V reads S's unbounded output as it is
    fake_turned = v[:, 0].abs() >= turn
    out = {"side_probe_real": linear_probe(f_train, side_train, f_test, side_test)["top1"]}
    fake_probe = linear_probe(f_fake[fake_turned], (v[fake_turned, 0] > 0).long(), f_test, side_test)["top1"]
    out["side_probe_fake"] = max(fake_probe, 1.0 - fake_probe)
    return out


FLOOR_SEED = 0  # one floor for every run of the script, whatever its --seed, so tables of different seeds agree


def random_floor(test_dir: Path, seed: int = FLOOR_SEED) -> dict[str, float]:
    from common.data.labels import read_labels
    from common.eval import evaluate_viewpoints

    true = read_labels(test_dir).angles.double()
    lo, hi = true.min(dim=0).values, true.max(dim=0).values
    gen = torch.Generator().manual_seed(seed)
    pred = lo + (hi - lo) * torch.rand(true.shape, generator=gen, dtype=torch.float64)
    res = evaluate_viewpoints(pred, true)
    return {f"{proto}/{k}": float(res[proto][k]) for proto in ("raw", "calibrated") if proto in res
            for k in KEYS + ("median_geodesic", "acc_pi_6")}


def markdown(results: dict, command: str, wall: float) -> str:
    lines = [
        "# SSV on the synthetic heads",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall / 60:.1f} min on {results.get('threads', torch.get_num_threads())} thread(s)"
        + (" (rows trained by an earlier run of the command keep that run's train time)."
           if any(r.get("trained_earlier") for r in results["rows"].values()) else "."),
        "*train min* is the row's training time over every run that trained it (a resumed run adds its own to the "
        "time its checkpoint kept); *s/step* is this run's, or the row's mean when this run trained no step.",
        "",
        "MAE in degrees on the labelled test heads. *raw*: V's own frame, no fit; *calibrated*: SSV's protocol "
        "(per-angle linear fit on a seeded 10% of the test frames, scored on the other 90%). "
        "*r(az)*, *r(az, shading)*: Pearson r of V's raw azimuth with the true azimuth and with the image's left-right "
        "brightness asymmetry (moved by the light and the background, not only the pose). *r(abs az)*: r of |V's "
        "azimuth| with |true azimuth| (does V tell frontal from profile?); *sign*: share of the heads turned 20 deg or "
        "more whose azimuth sign V gets right, up to one global flip (0.5 = chance). *probe real*, *probe fake*: the "
        "same share for a linear probe on V's features trained on the labelled training heads (a diagnostic that uses "
        "labels) and on EMA-generator samples with their sampled azimuth (up to one flip): does V's feature vector "
        "carry the side of real heads, and does the side as S shows it transfer to them? *cycle*: V's MAE on 512 "
        "samples of the EMA generator at known viewpoints (does V read S's viewpoint?); *S: r(az, shading)*: Pearson r "
        "of the sampled azimuth with the samples' brightness asymmetry (does S show azimuth as shading?).",
        "",
        "| method | steps | raw az | raw el | raw tilt | raw MAE | cal az | cal el | cal tilt | cal MAE "
        "| cal MAE, V EMA | r(az) | r(az, shading) | r(abs az) | sign | probe real | probe fake | cycle az | cycle MAE "
        "| S: r(az, shading) | train min | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if results.get("quick"):
        lines[2:2] = ["**Quick smoke run (a few steps per row, small probes): the numbers below mean nothing.**", ""]
    for row, r in results["rows"].items():
        m = r["metrics"]

        def f(key, fmt=".1f"):
            v = m.get(key)
            return format(v, fmt) if v is not None and math.isfinite(v) else "-"

        def corr(key):
            return f(key, "+.2f")

        cells = [ROW_TITLES.get(row, row), str(r.get("steps", "-"))]
        cells += [f(f"raw/{k}") for k in KEYS] + [f(f"calibrated/{k}") for k in KEYS] + [f("ema/calibrated/mae")]

        cells += [corr("r_az_true"), corr("r_az_shading"), corr("r_abs_az"), f("az_sign_acc", ".2f"),
                  f("side_probe_real", ".2f"), f("side_probe_fake", ".2f"),
                  f("cycle/azimuth_mae"), f("cycle/mae"),
                  corr("cycle/r_az_shading")]
        cells.append(f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-")
        cells.append(f"{r['sec_per_step']:.2f}" if r.get("sec_per_step") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    earlier = {r["earlier_command"] for r in results["rows"].values() if r.get("earlier_command")}
    if earlier:
        lines += ["", "Rows kept from earlier commands in the same folder (not re-run here): "
                  + ", ".join(ROW_TITLES.get(n, n) for n, r in results["rows"].items() if r.get("earlier_command"))
                  + "; " + "; ".join(f"`{c}`" for c in sorted(earlier)) + "."]
    r_true = [r["metrics"]["r_true_shading"] for r in results["rows"].values() if "r_true_shading" in r["metrics"]]
    if r_true:
        lines += ["", f"On this test split the brightness asymmetry has r = {r_true[0]:+.2f} with the true azimuth."]
    goals = results.get("goals", {})
    if goals:
        lines += ["", "Goals (issue 4, calibrated MAE):", ""]
        for name, g in goals.items():
            verdict = "not compared" if g["met"] is None else "met" if g["met"] else "NOT met"
            lines.append(f"- {name}: {verdict} ({g['detail']})")
    if results.get("learning_curves"):
        lines += ["", "Calibrated MAE against the training step (periodic evaluations): `learning_curves.png`."]
    return "\n".join(lines) + "\n"


def settings_diff(config: dict, row: str, other: dict, other_row: str, steps: int | None = None) -> list[str]:
    """The config keys in which the runs of two rows differ beyond what rows of one ablation may (the seed, the
    steps, the loss switches, Phi, V_ema's decay; every setting of S when one is the supervised row, which trains V
    alone). A key a config lacks (a run from before its option) has the value that runs from before it trained with.
    The learning-rate decay keys count only where the two schedules differ on one of the first ``steps`` steps (the
    steps both rows trained; None: any difference counts), so that a decay that starts after the shorter row stopped
    is no difference."""
    ignore = ROW_KEYS | PHI_KEYS | EVAL_ONLY_KEYS | set(SSVTrainer.LR_DECAY_KEYS)
    if "supervised" in (row, other_row):
        ignore |= set(SSVTrainer.GAN_ONLY_KEYS)
    config, other = ({**SSVTrainer.resume_defaults, **c} for c in (config, other))
    diff = [k for k in (set(config) | set(other)) - ignore
            if config.get(k) != other.get(k) and not same_place(k, config.get(k), other.get(k))]
    lr = [k for k in SSVTrainer.LR_DECAY_KEYS if config.get(k) != other.get(k)]
    if lr and steps is not None:
        schedules = [lr_schedule(c) for c in (config, other)]
        if all(lr_multiplier(s, *schedules[0]) == lr_multiplier(s, *schedules[1]) for s in range(steps)):
            lr = []
    return sorted(diff + lr)


def check_goals(rows: dict, configs: dict | None = None) -> dict:
    """Issue 4's goals on the table's rows: {name: {"met": True | False | None, "detail"}}. ``configs``: each row's
    run config; a goal whose rows were trained with other settings (rows kept from an earlier command in the same
    folder) is not compared ("met" None, the keys named)."""
    def cal(row):
        return rows.get(row, {}).get("metrics", {}).get("calibrated/mae")

    def incomparable(names, one_run_length: bool = False) -> str:
        configs_ = configs or {}
        if one_run_length:  # the rows of an ablation: same steps, same seed (full and supervised train apart)
            steps = {r: rows.get(r, {}).get("steps") for r in names}
            seeds = {r: configs_[r].get("seed") for r in names if r in configs_}
            for what, values in (("steps", steps), ("seed", seeds)):
                if len(set(values.values())) > 1:
                    return (f"not compared: trained with other {what} ("
                            + ", ".join(f"{r} {v}" for r, v in values.items()) + ")")
        for a, b in itertools.combinations(names, 2):
            if a in configs_ and b in configs_:
                trained = [rows.get(r, {}).get("steps") for r in (a, b)]
                both = min(trained) if all(isinstance(t, int) for t in trained) else None
                diff = settings_diff(configs_[a], a, configs_[b], b, both)
                if diff:
                    return f"not compared: {a} and {b} were trained with other {', '.join(diff)}"
        return ""

    goals = {}
    full, sup, floor = cal("full"), cal("supervised"), cal("random")
    learned = None
    if full is not None and floor is not None:
        # a model at the random floor is "within 1.3x" of a weak supervised row without having learned anything
        learned = bool(full <= 0.9 * floor)
        goals["SSV full learned (at least 10% below the random floor)"] = {
            "met": learned, "detail": f"{full:.2f} vs 0.9 x {floor:.2f} = {0.9 * floor:.2f}"}
    if full is not None and sup is not None:
        goals["SSV full within 1.3x of supervised"] = {
            "met": bool(full <= GOAL_RATIO * sup and learned is not False),
            "detail": f"{full:.2f} vs {GOAL_RATIO} x {sup:.2f} = {GOAL_RATIO * sup:.2f}"
                      + ("; not counted: SSV full is at the floor" if learned is False else "")}
    full_ema, sup_ema = (rows.get(r, {}).get("metrics", {}).get("ema/calibrated/mae") for r in ("full", "supervised"))
    if full_ema is not None and sup_ema is not None:
        goals["SSV full within 1.3x of supervised, V EMA on both"] = {
            "met": bool(full_ema <= GOAL_RATIO * sup_ema and learned is not False),
            "detail": f"{full_ema:.2f} vs {GOAL_RATIO} x {sup_ema:.2f} = {GOAL_RATIO * sup_ema:.2f}"}
    chain = [(r, cal(r)) for r in ("full", "no_imc", "no_imc_sym")]
    if all(v is not None for _, v in chain):
        ok = chain[0][1] < chain[1][1] < chain[2][1]
        at = rows.get("full", {}).get("steps")
        goals["ablation ordering full < no_imc < no_imc_sym"] = {
            "met": bool(ok), "detail": " < ".join(f"{r} {v:.2f}" for r, v in chain)
            + (f" (at {at} steps)" if isinstance(at, int) else "")}
    for name, g in goals.items():
        why = (incomparable(("full", "supervised")) if "supervised" in name else
               incomparable(("full", "no_imc", "no_imc_sym"), one_run_length=True) if "ordering" in name else "")
        if why:
            g.update(met=None, detail=f"{g['detail']}; {why}")
    return goals


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Synthetic benchmark root with heads/train and heads/test (viewssl data render).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/ssv_heads"), help="Output folder.")
@click.option("--preset", type=click.Choice(PRESET_CHOICES), default="cpu", show_default=True,
              help="Network sizes of S and V (see `viewssl train ssv --help`).")
@click.option("--steps", type=click.IntRange(min=1), default=4000, help="Training steps of each SSV row.")
@click.option("--sup-steps", type=click.IntRange(min=1), default=2000, help="Training steps of the supervised row.")
@click.option("--rows", default="full,no_imc,no_imc_sym,supervised", help="Rows to train (comma-separated).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Real images per step (preset default).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--device", default="auto")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (1 is faster when other jobs share the cores).")
@click.option("--phi", type=click.Choice(("auto", "alexnet", "vgg", "critic", "random")), default="auto")
@click.option("--augment-gain", type=float, default=None,
              help="SSV rows: random illumination ramps on V's inputs (see viewssl train ssv --help) [default: off].")
@click.option("--highpass", type=float, default=None,
              help="Every row, supervised too: V reads high-passed images (see viewssl train ssv --help) "
                   "[default: off].")
@click.option("--ball-mask", is_flag=True, default=None,
              help="SSV rows: S's rotated volume is windowed by a ball (see viewssl train ssv --help) [default: off].")
@click.option("--viewpoint-head", type=click.Choice(("spherical", "6d")), default="spherical",
              help="Every row: V's viewpoint head (see viewssl train ssv --help).")
@click.option("--lr-decay", type=int, nargs=2, default=None, metavar="START END",
              help="Every row: cosine learning-rate decay from step START to END (see viewssl train ssv --help); "
                   "an existing row resumed with a decay starting at its last step continues from there "
                   "[default: none].")
@click.option("--lr-final", type=float, default=None, help="Learning-rate factor at the end of --lr-decay [0.1].")
@click.option("--eval-every", type=click.IntRange(min=0), default=500,
              help="Evaluate V on the test heads every N training steps, for the learning curves (0 = off).")
@click.option("--quick", is_flag=True,
              help="Smoke test: 4 steps per row unless --steps / --sup-steps are given, and small post-training "
                   "probes (numbers meaningless).")
def main(data, out, preset, steps, sup_steps, rows, batch_size, seed, device, threads, phi, augment_gain, highpass,
         ball_mask, viewpoint_head, lr_decay, lr_final, eval_every, quick):
    """Train SSV (full and ablations) and the supervised baseline on the synthetic heads; report MAE tables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from common.io import folder_lock

    row_names = check_inputs(data, rows)  # before --out is made (the lock creates it)
    ssv_only = [o for o, v in (("--augment-gain", augment_gain), ("--ball-mask", ball_mask)) if v is not None]
    if ssv_only and row_names == ["supervised"]:
        raise ViewsslError(f"{' and '.join(ssv_only)} act{'s' if len(ssv_only) == 1 else ''} on the SSV rows only, "
                           "and --rows is supervised alone")
    if quick:  # 4 steps where the command gave no number of its own
        given = click.get_current_context().get_parameter_source
        steps, sup_steps = (n if given(name) != ParameterSource.DEFAULT else 4
                            for name, n in (("steps", steps), ("sup_steps", sup_steps)))
    # every row's config and the device before --out exists (the lock creates it): a bad value leaves no folder
    dev = resolve_device(device)
    ranges = head_ranges(Path(data))
    configs = row_configs(data, ranges, preset, row_names, steps, sup_steps, batch_size=batch_size, seed=seed,
                          phi=phi, augment_gain=augment_gain, highpass=highpass, ball_mask=ball_mask,
                          viewpoint_head=viewpoint_head, lr_decay=lr_decay, lr_final=lr_final, eval_every=eval_every)
    # two runs on one --out would train the same rows twice, and each would rewrite ssv_heads.json without the other's
    with folder_lock(out, "experiments.ssv_heads run"):
        run(data, ranges, out, preset, configs, dev, threads, quick, eval_every=eval_every)


def check_inputs(data, rows: str) -> list[str]:
    """The row names of ``--rows``, after checking them and that ``data`` has heads/train and heads/test."""
    for d in (Path(data) / "heads" / "train", Path(data) / "heads" / "test"):
        if not (d / "labels.csv").is_file():
            raise ViewsslError("no labels.csv: expected a benchmark root with heads/train and heads/test", d)
    return comma_list(rows, "--rows", ROWS)


def row_configs(data, ranges: dict | None, preset, row_names: list[str], steps: int, sup_steps: int, *,
                batch_size=None, seed=0, phi="auto", augment_gain=None, highpass=None, ball_mask=None,
                viewpoint_head="spherical", lr_decay=None, lr_final=None, eval_every=0) -> dict[str, dict]:
    """The trainer config of each row of ``row_names`` (in order), on ``data``'s heads and their pose ``ranges``
    (:func:`head_ranges`)."""
    from ssv.cli import build_config

    train_dir, test_dir = Path(data) / "heads" / "train", Path(data) / "heads" / "test"
    return {row: build_config(preset, str(train_dir), seed=seed, batch_size=batch_size, phi=phi,
                              az_range_deg=ranges and ranges["az"], el_range_deg=ranges and ranges["el"],
                              tilt_range_deg=ranges and ranges["tilt"],
                              steps=sup_steps if row == "supervised" else steps,
                              augment_gain=None if row == "supervised" else augment_gain, highpass=highpass,
                              ball_mask=None if row == "supervised" else ball_mask, viewpoint_head=viewpoint_head,
                              lr_decay=lr_decay, lr_final=lr_final,
                              eval_data=str(test_dir) if eval_every else None, **ROWS[row])
            for row in row_names}


def run(data, ranges: dict | None, out, preset, configs: dict[str, dict], dev: torch.device, threads, quick,
        eval_every=0) -> dict:
    """Train (or resume) each row of ``configs`` (:func:`row_configs`) in ``out/<row>``, evaluate it on the test
    heads, and write the tables; returns what ``ssv_heads.json`` holds."""
    from common.training import RETRAIN_HINT, fit

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    train_dir, test_dir = Path(data) / "heads" / "train", Path(data) / "heads" / "test"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": invocation("python -m experiments.ssv_heads"),
                     "preset": preset, "data": str(Path(data).resolve()), "ranges_deg": ranges, "quick": quick,
                     "threads": torch.get_num_threads(), "rows": {}}
    previous, previous_command = _previous_rows(out)
    # rows of OUT trained by an earlier command stay in the table (and the JSON), with that command: those of other
    # --rows for good, those of this one until they are run again (a command killed between rows loses none)
    for row, r in previous.items():
        if row in ROWS and "metrics" in r:
            results["rows"][row] = {**r, "earlier_command": r.get("earlier_command") or r.get("command")
                                    or previous_command or "unknown"}

    for row, config in configs.items():
        n_steps = config["steps"]
        trainer = SSVTrainer(config, dev)
        log.info("row %s: %d steps in %s", row, n_steps, out / row)
        res = fit(trainer, out / row, n_steps, checkpoint_every=500, log_every=20, eval_every=eval_every,
                  media_every=0 if row == "supervised" or quick else 500, resume="auto", progress=True,
                  force_hint=RETRAIN_HINT)
        train_seconds = res["call_train_seconds"]  # this command's, without the in-training evaluations
        done = n_steps - res["start_step"]
        # fit's own evaluation at the last step when it made one (with --eval-every: training ended on a multiple
        # of it, or the last step is off its multiples, even on a rerun with nothing to train), else one here
        last = res.get("metrics") or {}
        metrics = table_metrics(last) or evaluate(trainer.pose_model(), test_dir, dev)
        if ema_is_an_average(trainer, n_steps):
            ema = table_metrics(last, "ema/") or evaluate(trainer.pose_model(ema=True), test_dir, dev)
            metrics.update({f"ema/{k}": v for k, v in ema.items()})
        metrics.update(shading_shortcut(trainer.pose_model(), test_dir, plot=out / f"{row}_azimuth_scatter.png",
                                        title=f"{ROW_TITLES.get(row, row)}, {n_steps} steps: V on the test heads"))
        metrics.update(cycle_errors(trainer, n=64 if quick else 512, seed=config["seed"]))
        metrics.update(side_probes(trainer, train_dir, test_dir, seed=config["seed"], n_fake=256 if quick else 4000))
        results["rows"][row] = {
            # no step trained and no earlier table to take the time from (killed before it was written): unknown
            "steps": n_steps, "metrics": metrics, "train_seconds": train_seconds if done > 0 else None,
            "sec_per_step": train_seconds / done if done > 0 else None, "run_dir": str((out / row).resolve()),
            "phi": getattr(trainer, "phi_name", None), "command": results["command"],
        }
        old = previous.get(row, {})
        if math.isfinite(res["train_seconds"]) and res["train_seconds"] > 0:
            # the run's own training time over every resume (checkpoints keep it since 2026-12-04)
            results["rows"][row]["train_seconds"] = res["train_seconds"]
            if done == 0:
                results["rows"][row].update(sec_per_step=res["train_seconds"] / n_steps, trained_earlier=True)
        elif done == 0 and old.get("steps") == n_steps and old.get("sec_per_step"):
            # already trained by an earlier run of this command: keep the time it took then
            results["rows"][row].update(train_seconds=old["train_seconds"], sec_per_step=old["sec_per_step"],
                                        trained_earlier=True)
        elif done > 0 and res["start_step"] > 0 and old.get("steps") == res["start_step"] and old.get("train_seconds"):
            # resumed where the last finished run of this command stopped: the row's time is the sum of both
            results["rows"][row]["train_seconds"] = old["train_seconds"] + train_seconds
        log.info("row %s: calibrated MAE %.2f deg, raw MAE %.2f deg (%.1f min, %s s/step)", row,
                 metrics.get("calibrated/mae", float("nan")), metrics.get("raw/mae", float("nan")),
                 train_seconds / 60, f"{train_seconds / done:.2f}" if done > 0 else "-")
        _write(results, out, t_start)
    results["rows"]["random"] = {"metrics": random_floor(test_dir), "steps": "-"}
    results["goals"] = check_goals(results["rows"], _row_configs(out, results["rows"]))
    if learning_curves(results["rows"], out / "learning_curves.png", title=f"SSV on the synthetic heads ({preset})"):
        results["learning_curves"] = str(out / "learning_curves.png")
    wall = _write(results, out, t_start)
    click.echo(markdown(results, results["command"], wall))
    click.echo(f"wall time: {wall / 60:.1f} min; tables in {out / 'ssv_heads.md'} and {out / 'ssv_heads.json'}")
    return results


def ema_scored_from(since: int, decay: float) -> float:
    """The first step at which V_ema is worth scoring: any step when it was kept from step 0 (its ramp-up makes it an
    average at once); in a run resumed from before V_ema existed (it started there, at ``since``), 3 / (1 - decay)
    steps later (1,500 at 0.998), when the V it started from weighs under 5 %."""
    return 0.0 if since == 0 else since + 3.0 / (1.0 - decay)


def ema_is_an_average(trainer, steps: int) -> bool:
    """Whether the row's V_ema is worth scoring at ``steps`` (:func:`ema_scored_from`); a row trained before V_ema
    and only re-evaluated would report V twice."""
    if trainer.V_ema is None:
        return False
    if steps >= ema_scored_from(trainer.v_ema_since, trainer.v_ema_decay):
        return True
    log.info("V_ema not scored: it started at step %d of %d (the run is from before it)", trainer.v_ema_since, steps)
    return False


def ema_since(run_dir: Path) -> int:
    """The step V_ema started at in the run ``run_dir``: the ``ema/since`` of its periodic evaluations
    (``metrics.jsonl``); in a log from before that key, the ``v_ema_since`` of its newest checkpoint; without one
    either, 0 when the first evaluation already scored V_ema, else the step of the first one that did (V_ema started
    after the last evaluation without it: the latest it can have started, so that no evaluation of a V_ema younger
    than :func:`ema_scored_from` allows is taken)."""
    from common.training import find_checkpoint

    _, since = eval_history(run_dir, "ema/since")
    if since:
        return int(since[-1])
    try:
        ckpt, _ = find_checkpoint(run_dir)
        if "v_ema_since" in ckpt:
            return int(ckpt["v_ema_since"])
    except ViewsslError:
        pass  # no readable checkpoint
    v_steps, _ = eval_history(run_dir)
    ema_steps, _ = eval_history(run_dir, "ema/viewpoint/calibrated/mae")
    return 0 if not ema_steps or not v_steps or ema_steps[0] <= v_steps[0] else ema_steps[0]


def ema_history(run_dir: Path, key: str = "viewpoint/calibrated/mae") -> tuple[list[int], list[float]]:
    """As :func:`eval_history` for V_ema's ``ema/{key}``, without the evaluations of a V_ema too young to score
    (:func:`ema_scored_from`; the decay from the run's ``config.json``)."""
    steps, values = eval_history(run_dir, f"ema/{key}")
    if not steps:
        return steps, values
    try:
        decay = json.loads((Path(run_dir) / "config.json").read_text()).get("v_ema_decay")
    except (OSError, ValueError, AttributeError):
        decay = None
    first = ema_scored_from(ema_since(run_dir), float(decay or default_config()["v_ema_decay"]))
    kept = [i for i, s in enumerate(steps) if s >= first]
    return [steps[i] for i in kept], [values[i] for i in kept]


def _row_configs(out: Path, rows: dict) -> dict[str, dict]:
    """The run config of every row of ``rows`` trained in ``out`` (its ``config.json``; rows without one: none)."""
    configs = {}
    for row in rows:
        try:
            configs[row] = json.loads((out / row / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return configs


def _previous_rows(out: Path) -> tuple[dict, str | None]:
    """The rows and the command of an earlier ``OUT/ssv_heads.json`` (({}, None) if there is none). One that cannot be
    read is an error naming it, not a file to overwrite: the rows of earlier commands are kept there."""
    path = out / "ssv_heads.json"
    if not path.exists():
        return {}, None
    try:
        previous = json.loads(path.read_text())
        rows = previous.get("rows", {})
        if not isinstance(rows, dict):
            raise TypeError(f"'rows' is a {type(rows).__name__}, not a mapping")
        return dict(rows), previous.get("command")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ViewsslError(f"cannot read the rows of earlier commands ({type(e).__name__}: {e}); move it aside to "
                           f"start the table afresh", path) from None


def _write(results: dict, out: Path, t_start: float) -> float:
    from common.io import atomic_write_bytes, atomic_write_json

    wall = time.perf_counter() - t_start
    results["wall_seconds"] = wall
    atomic_write_json(results, out / "ssv_heads.json")
    atomic_write_bytes(out / "ssv_heads.md", markdown(results, results["command"], wall).encode())
    return wall


if __name__ == "__main__":
    main()
