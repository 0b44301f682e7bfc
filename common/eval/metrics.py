"""Metric accumulators, the metric registry and :func:`run_metrics`.

Accumulators (torchmetrics-style ``update`` / ``compute`` / ``reset``) keep exact running state in float64, so feeding
a split batch by batch gives the same figures as one call on everything: :class:`MeanAccumulator`,
:class:`AccuracyAccumulator`, :class:`GeodesicAccumulator`, :class:`IoUAccumulator`, :class:`ViewpointAccumulator`.

The registry :data:`METRICS` maps a name to ``fn(model: PoseModel, ctx: EvalContext) -> dict[str, float]``:

==================  ===========================================================================================
``viewpoint``       viewpoint errors, raw and SSV-calibrated, on ``heads/<split>`` and ``objects/<split>`` (or the
                    folder); needs ``predict_angles``
``viewpoint_readout``  viewpoint MAE of a ridge read-out of the frozen features, fitted on ``<kind>/train``
                    (:mod:`common.eval.readout`)
``knn_pose``        absolute pose by weighted kNN over the Fib view index, per category: ``in_domain``
                    (objects/train -> objects/<split>), ``unseen_pose`` (train_unseen_pose -> test_unseen_pose;
                    without train_unseen_pose: train -> test_unseen_pose, geodesic only since the view sets
                    differ), ``ood`` (ood_train -> ood_test); folder: leave-one-out
``relative_pose``   relative-pose MLP probe: ``in_domain``, ``unseen_pose``, ``unseen_category`` (probe trained
                    and tested on the ood splits)
``linear_probe``    category top-1 of a linear probe, objects/train -> objects/<split>
``knn_class``       category top-1 of weighted kNN (``top1``) and of 1-NN (``top1_1nn``); folder: leave-one-out
``retrieval``       category R@1/5/10/20 over frames; ``retrieval_unit="sequence"``: R@1/5/10/20/50 with one
                    feature per sequence (video), the UCF101 protocol; folder: leave-one-out
``reid``            SiamPose sequence re-identification within sequences/<split> (or the folder)
``box_fit``         SiamPose zero-shot 9-DoF box fitting + exact 3D IoU, sequences/train -> sequences/<split>;
                    also a random-neighbour baseline
==================  ===========================================================================================

Result keys are ``metric[/tap][/set]/figure`` (the tap only when several are evaluated). Leave-one-out searches and
the kNN searches of ``knn_pose``, ``knn_class`` and ``retrieval`` exclude same-instance neighbours
(``ctx.exclude_same_instance``; always the query itself); ``box_fit``'s 1-NN from sequences/train does not (SiamPose's
protocol: its train and test sequences are other instances).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import ViewsslError
from ..geometry import angles_to_matrix
from .boxes import BOX_COLUMNS, box_frames_from_table, box_iou_3d, fit_box
from .context import DataSource, EvalContext, SkipMetric
from .knn import knn_classify, knn_search
from .pose import VIEWPOINT_KEYS, evaluate_viewpoints, geodesic_summary, knn_pose, viewpoint_errors
from .probes import RelativePoseProbe, linear_probe, seeded_rng
from .retrieval import pool_sequences, recall_at_k, reid_metrics
from .taps import parse_compress

__all__ = [
    "MeanAccumulator",
    "AccuracyAccumulator",
    "GeodesicAccumulator",
    "IoUAccumulator",
    "ViewpointAccumulator",
    "METRICS",
    "register_metric",
    "EvalResults",
    "run_metrics",
]

log = logging.getLogger("viewssl.eval")


# ============================================================================ accumulators
class MeanAccumulator:
    """Mean of scalars or tensors: the values are kept (float64) and summed once with :func:`math.fsum`, which
    rounds correctly whatever the order, so any batching gives the one-shot figure exactly."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: list[float] = []

    def update(self, values) -> None:
        self.values.extend(torch.as_tensor(values).detach().cpu().double().flatten().tolist())

    def compute(self) -> float:
        return math.fsum(self.values) / len(self.values) if self.values else math.nan


class AccuracyAccumulator:
    """Share of correct predictions: ``update(pred, target)`` with labels, or ``update(correct_bool)``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.correct, self.count = 0, 0

    def update(self, pred, target=None) -> None:
        pred = torch.as_tensor(pred).detach().cpu().flatten()
        if target is None:
            c = pred.bool()
        else:
            target = torch.as_tensor(target).detach().cpu().flatten()
            if pred.numel() != target.numel():  # (N, 1) against (N,) would broadcast to N x N comparisons
                raise ValueError(f"AccuracyAccumulator: {pred.numel()} predictions for {target.numel()} targets")
            c = pred == target
        self.correct += int(c.sum())
        self.count += c.numel()

    def compute(self) -> float:
        return self.correct / self.count if self.count else math.nan


class _CollectAccumulator:
    """Keeps every per-sample value (needed for medians), on the CPU in float64."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, values) -> None:
        self.values.append(torch.as_tensor(values).detach().cpu().double().flatten())

    def all(self) -> torch.Tensor:
        return torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)


class GeodesicAccumulator(_CollectAccumulator):
    """Geodesic errors in degrees -> ``{median_geodesic, mean_geodesic, acc_30}``."""

    def __init__(self, threshold_deg: float = 30.0):
        self.threshold_deg = threshold_deg
        super().__init__()

    def compute(self) -> dict[str, float]:
        return geodesic_summary(self.all(), self.threshold_deg)


class IoUAccumulator(_CollectAccumulator):
    """3D IoUs -> ``{mean_iou, median_iou, ap_50}`` (ap_50: share with IoU strictly above 0.5, SiamPose's "AP")."""

    def compute(self) -> dict[str, float]:
        v = self.all()
        if not v.numel():
            return {"mean_iou": math.nan, "median_iou": math.nan, "ap_50": math.nan}
        hit = float((v > 0.5).double().mean()) if not v.isnan().any() else math.nan  # an unknown IoU: no hit or miss
        return {"mean_iou": float(v.mean()), "median_iou": float(torch.quantile(v, 0.5)), "ap_50": hit}


class ViewpointAccumulator:
    """Predicted and true angles batch by batch -> :func:`viewpoint_errors` (``calibrated=False``) or
    :func:`evaluate_viewpoints` (both protocols)."""

    def __init__(self, calibration: float = 0.1, seed: int = 0, count: int | None = None):
        self.calibration, self.seed, self.count = calibration, seed, count
        self.reset()

    def reset(self) -> None:
        self.pred: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []

    def update(self, pred_angles, true_angles) -> None:
        self.pred.append(torch.as_tensor(pred_angles).detach().cpu().double().reshape(-1, 3))
        self.true.append(torch.as_tensor(true_angles).detach().cpu().double().reshape(-1, 3))

    def compute(self, calibrated: bool = True) -> dict:
        empty = torch.zeros(0, 3, dtype=torch.float64)
        pred, true = torch.cat([empty, *self.pred]), torch.cat([empty, *self.true])
        if not calibrated:
            return viewpoint_errors(pred, true)
        return evaluate_viewpoints(pred, true, self.calibration, self.seed, self.count)


# ============================================================================ registry
MetricFn = Callable[..., dict]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str, needs: Sequence[str] = ("features",)):
    """Decorator: add ``fn(model, ctx) -> dict[str, float]`` to :data:`METRICS`. ``needs`` (``"angles"``,
    ``"features"``) tells :func:`run_metrics` what to compute."""

    def deco(fn):
        fn.needs = tuple(needs)
        fn.metric_name = name
        METRICS[name] = fn
        return fn

    return deco


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _ids(*lists: Sequence[str] | None) -> list[np.ndarray | None]:
    """Map string ids from several tables to one shared integer space ("" -> -1)."""
    lookup: dict[str, int] = {}
    out = []
    for values in lists:
        if values is None:
            out.append(None)
            continue
        arr = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            arr[i] = -1 if v == "" else lookup.setdefault(v, len(lookup))
        out.append(arr)
    return out


def _has_pair(groups: np.ndarray) -> bool:
    """Whether some group id >= 0 occurs twice (a same-instance pair exists)."""
    g = groups[groups >= 0]
    return len(np.unique(g)) < len(g)


def _instance_keys(o) -> list[str] | None:
    inst = o.strings("instance")
    if inst is None:
        return None
    cat = o.strings("category") or [""] * len(inst)
    return [f"{c}\x1f{i}" if i != "" else "" for c, i in zip(cat, inst)]


def _index_column(o, name: str) -> np.ndarray | None:
    """An index column (``view``, ``frame``) on the evaluated rows as int64, a blank cell as -1 (unknown); None
    when the column is absent. A cell that is not a whole number >= 0 is an error naming the file and line."""
    if name not in o.table.raw:
        return None
    col = o.table.raw[name]
    out = np.full(len(o.indices), -1, dtype=np.int64)
    for j, i in enumerate(o.indices):
        v = col[i]
        if v == "":
            continue
        try:
            value = float(v)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value.is_integer() and value >= 0):
            raise ViewsslError(f"line {o.table.line(int(i))}: {name} is not a whole number >= 0: {v!r}",
                               o.table.csv_path)
        out[j] = int(value)
    return out


def _groups(ctx: EvalContext, train_o, query_o, same_set: bool):
    """(train_groups, query_groups) tensors excluding same-instance matches (and self when the sets coincide)."""
    if same_set:
        if ctx.exclude_same_instance and _instance_keys(query_o) is not None:
            (g,) = _ids(_instance_keys(query_o))
            n = len(g)
            # rows without an instance: a group of their own, so that they exclude only themselves (a negative
            # group never matches, so it would exclude nothing, not even the row itself)
            g = np.where(g >= 0, g, g.max(initial=-1) + 1 + np.arange(n))
            # Self-exclusion for rows with an instance is implied by the shared group.
            return torch.from_numpy(g).to(ctx.device), torch.from_numpy(g.copy()).to(ctx.device)
        ids = torch.arange(len(query_o.indices), device=ctx.device)
        return ids, ids.clone()
    if ctx.exclude_same_instance:
        tk, qk = _instance_keys(train_o), _instance_keys(query_o)
        if tk is not None and qk is not None:
            gt, gq = _ids(tk, qk)
            return torch.from_numpy(gt).to(ctx.device), torch.from_numpy(gq).to(ctx.device)
    return None, None


def _rotations(o, device) -> torch.Tensor:
    rot = angles_to_matrix(*o.true_angles.unbind(-1))
    return rot.to(device) if device.type != "mps" else rot.float().to(device)  # MPS has no float64


def _pairs(ctx: EvalContext, sets: Iterable[tuple[str, str, str, str]], angles: bool = False):
    """Keep the (name, kind, train_split, query_split) sets whose datasets exist (and have viewpoints, if
    ``angles``)."""
    has = ctx.has_angles if angles else ctx.has
    return [s for s in sets if has(s[1], s[2]) and has(s[1], s[3])]


# ============================================================================ metrics
@register_metric("viewpoint", needs=("angles",))
def viewpoint_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Viewpoint MAE / median geodesic / Acc@pi/6, raw and SSV-calibrated (needs predict_angles)."""
    if ctx.source.layout == "benchmark":
        sets = [(k, k, ctx.split) for k in ("heads", "objects") if ctx.has_angles(k, ctx.split)]
    else:
        sets = [("", "", ctx.eval_split)] if ctx.has_angles("", ctx.eval_split) else []
    if not sets:
        raise SkipMetric(f"no labelled {ctx.eval_split or 'data'} split with viewpoints")
    out: dict[str, float] = {}
    for name, kind, split in sets:
        o = ctx.outputs(model, kind, split)
        if o.angles is None:
            raise SkipMetric("the model does not predict angles (predict_angles returned None)")
        acc = ViewpointAccumulator(ctx.calibration, ctx.seed, ctx.calibration_count)
        for s in range(0, o.angles.shape[0], ctx.batch_size):  # same figures as one update; kept batch-wise
            acc.update(o.angles[s : s + ctx.batch_size], o.true_angles[s : s + ctx.batch_size])
        res = acc.compute()
        for proto, figs in res.items():
            keep = list(VIEWPOINT_KEYS) + (["n"] if proto == "raw"
                                           else ["uncalibrated_mae", "n_calibration", "n_scored"])
            for key in keep:
                out[_join(name, proto, key)] = float(figs[key])
        info = {"dataset": ctx.name(kind, split), "raw": "no fit; wrap-around per-angle MAE, geodesic on R_y R_x R_z"}
        if "calibrated" in res:
            c = res["calibrated"]
            info["calibrated"] = {
                "protocol": "calibrated",
                "fit": "per angle least squares gt ~ slope * pred + intercept (SSV test_vpnet.py) on the raw "
                       "radians or on the predictions unwrapped around center (cut in their widest gap), whichever "
                       "maps the calibration frames better; an angle whose labels span > 270 deg: sign and "
                       "circular-mean offset",
                "n_calibration": c["n_calibration"], "n_scored": c["n_scored"], "seed": c["seed"],
                "fraction": c["fraction"], "disjoint": True,
                **{k: c[k] for k in c if k.startswith(("slope_", "fit_"))},
                **{f"{k}_deg": None if c[k] is None else math.degrees(c[k])
                   for k in c if k.startswith(("intercept_", "center_"))},
            }
        ctx.record("viewpoint", **{name or "data": info})
    return out


@register_metric("knn_pose")
def knn_pose_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Absolute pose by weighted kNN over the Fib view index, per category (+ geodesic error)."""
    k = ctx.kind("objects")
    if ctx.source.layout == "folder":
        sets = [("", "", "", "")] if ctx.has_angles("", "") else []
    else:
        # Unseen poses: the Fib(100) renders of the train instances are the gallery when rendered (then the view
        # index is shared and accuracy is defined); otherwise the Fib(50) train gallery, geodesic error only.
        unseen_gallery = "train_unseen_pose" if ctx.has(k, "train_unseen_pose") else "train"
        sets = _pairs(ctx, [("in_domain", k, "train", ctx.split),
                            ("unseen_pose", k, unseen_gallery, "test_unseen_pose"),
                            ("ood", k, "ood_train", "ood_test")], angles=True)  # angles: the geodesic error
    out: dict[str, float] = {}
    no_neighbours: list[str] = []
    for name, kind, tr_split, q_split in sets:
        same = tr_split == q_split
        tr_o, q_o = ctx.outputs(model, kind, tr_split), ctx.outputs(model, kind, q_split)
        tr_view, q_view = _index_column(tr_o, "view"), _index_column(q_o, "view")  # blank: -1
        if tr_view is None or q_view is None:
            continue
        use_acc = not (name == "unseen_pose" and tr_split == "train")  # Fib(50) indices vs Fib(100) indices
        tr_f, q_f = ctx.features(model, kind, tr_split), ctx.features(model, kind, q_split)
        tr_cat, q_cat = tr_o.strings("category"), q_o.strings("category")
        tr_cat = tr_cat if tr_cat is not None else [""] * len(tr_o.indices)
        q_cat = q_cat if q_cat is not None else [""] * len(q_o.indices)
        g_tr, g_q = _groups(ctx, tr_o, q_o, same)
        tr_rot, q_rot = _rotations(tr_o, ctx.device), _rotations(q_o, ctx.device)
        acc, geo, per_cat = AccuracyAccumulator(), GeodesicAccumulator(), []
        tr_cat_arr, q_cat_arr = np.array(tr_cat), np.array(q_cat)
        for cat in sorted(set(q_cat)):
            qi = torch.from_numpy(np.nonzero(q_cat_arr == cat)[0]).to(ctx.device)
            # gallery rows without a view index cannot vote for one
            ti = torch.from_numpy(np.nonzero((tr_cat_arr == cat) & (tr_view >= 0))[0]).to(ctx.device)
            if len(ti) == 0 or len(qi) == 0:
                continue
            views_t = torch.from_numpy(tr_view).to(ctx.device).long()[ti]
            views_q = torch.from_numpy(q_view).to(ctx.device).long()[qi] if use_acc else None
            figs, correct, errs = knn_pose(
                tr_f[ti], views_t, tr_rot[ti], q_f[qi], q_rot[qi], views_q, k=ctx.knn_k,
                temperature=ctx.knn_temperature,
                train_groups=None if g_tr is None else g_tr[ti], query_groups=None if g_q is None else g_q[qi],
            )
            geo.update(errs)
            if use_acc and correct.numel():
                acc.update(correct)
                per_cat.append(figs["acc"])
        if geo.all().numel() == 0:
            no_neighbours.append(name or "leave_one_out")
            continue
        if use_acc and per_cat:  # (no query with a known view: no accuracy, the geodesic figures only)
            out[_join(name, "acc")] = acc.compute()
            out[_join(name, "acc_macro")] = float(np.mean(per_cat))
        for key, v in geo.compute().items():
            out[_join(name, key)] = v
        out[_join(name, "n_queries")] = float(geo.all().numel())
        ctx.record("knn_pose", **{name or "leave_one_out": {
            "gallery": ctx.name(kind, tr_split), "queries": ctx.name(kind, q_split), "k": ctx.knn_k,
            "temperature": ctx.knn_temperature, "per_category": True, "class": "view column (Fib index)",
            "exclude_same_instance": bool(g_tr is not None) and ctx.exclude_same_instance}})
    if not out and no_neighbours:
        raise SkipMetric("no query has an admissible neighbour (same-instance neighbours are excluded; every "
                         "category needs two or more instances)")
    if not out:
        raise SkipMetric("needs a 'view' column (Fib view index) and viewpoints in the gallery and query labels")
    return out


@register_metric("relative_pose")
def relative_pose_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Relative-pose MLP probe (6-D rotation): in-domain, unseen poses, unseen categories."""
    if ctx.source.layout == "folder":
        raise SkipMetric("needs a train split to fit the probe on")
    k = ctx.kind("objects")
    sets = _pairs(ctx, [("in_domain", k, "train", ctx.split), ("unseen_pose", k, "train", "test_unseen_pose"),
                        ("unseen_category", k, "ood_train", "ood_test")], angles=True)
    out: dict[str, float] = {}
    probes: dict[str, tuple] = {}  # one probe per training split (in_domain and unseen_pose share it)
    for name, kind, tr_split, q_split in sets:
        tr_o, q_o = ctx.outputs(model, kind, tr_split), ctx.outputs(model, kind, q_split)
        tk, qk = _instance_keys(tr_o), _instance_keys(q_o)
        if tk is None or qk is None:
            continue
        gt, gq = _ids(tk, qk)
        lonely = [ctx.name(kind, sp) for sp, g in ((tr_split, gt), (q_split, gq)) if not _has_pair(g)]
        if lonely:
            log.info("relative_pose: skipping %s: no instance of %s has two or more items", name, " or ".join(lonely))
            continue
        tr_f, tr_r = ctx.features(model, kind, tr_split), _rotations(tr_o, ctx.device)
        if tr_split not in probes:
            probe = RelativePoseProbe(steps=ctx.probe_steps, hidden=ctx.probe_hidden, seed=ctx.seed).fit(tr_f, tr_r, gt)
            probes[tr_split] = (probe, float(torch.quantile(probe.errors(tr_f, tr_r, gt, ctx.probe_pairs), 0.5)))
        probe, train_median = probes[tr_split]
        figs = probe.score(ctx.features(model, kind, q_split), _rotations(q_o, ctx.device), gq, ctx.probe_pairs)
        figs["train_median_geodesic"] = train_median
        for key, v in figs.items():
            out[_join(name, key)] = v
        ctx.record("relative_pose", **{name: {
            "train": ctx.name(kind, tr_split), "test": ctx.name(kind, q_split), "target": "R_j @ R_i^T",
            "probe": f"MLP 2D->{ctx.probe_hidden}->{ctx.probe_hidden}->6 (6-D rotation), geodesic loss, Adam 1e-3, "
                     f"{ctx.probe_steps} steps x 256 pairs, seed {ctx.seed}", "test_pairs": ctx.probe_pairs}})
    if not out:
        raise SkipMetric("needs an 'instance' column and train/test splits with viewpoints (objects/train + "
                         "objects/test), with an instance of two or more items in each")
    return out


def _train_query(ctx: EvalContext, model, column: str):
    """Gallery/query outputs for the category metrics: objects/train -> objects/<split>, or the folder itself."""
    if ctx.source.layout == "folder":
        o = ctx.outputs(model, "", "")
        if o.strings(column) is None:
            raise SkipMetric(f"needs a '{column}' column")
        return "", "", "", o, o, True
    kind = ctx.kind("objects")
    if not (ctx.has(kind, "train") and ctx.has(kind, ctx.split)):
        raise SkipMetric(f"needs {ctx.name(kind, 'train')} and {ctx.name(kind, ctx.split)}")
    tr_o, q_o = ctx.outputs(model, kind, "train"), ctx.outputs(model, kind, ctx.split)
    if tr_o.strings(column) is None or q_o.strings(column) is None:
        raise SkipMetric(f"needs a '{column}' column")
    return kind, "train", ctx.split, tr_o, q_o, False


@register_metric("linear_probe")
def linear_probe_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Category top-1 of a linear probe (objects/train -> objects/<split>)."""
    if ctx.source.layout == "folder":
        raise SkipMetric("needs a train split to fit the probe on")
    kind, trs, qs, tr_o, q_o, _ = _train_query(ctx, model, "category")
    yt, yq = _ids(tr_o.strings("category"), q_o.strings("category"))
    keep_t, keep_q = yt >= 0, yq >= 0
    for keep, split in ((keep_t, trs), (keep_q, qs)):
        if not keep.any():
            raise SkipMetric(f"no row of {ctx.name(kind, split)} has a category")
    figs = linear_probe(ctx.features(model, kind, trs)[torch.from_numpy(keep_t).to(ctx.device)],
                        torch.from_numpy(yt[keep_t]),
                        ctx.features(model, kind, qs)[torch.from_numpy(keep_q).to(ctx.device)],
                        torch.from_numpy(yq[keep_q]))
    ctx.record("linear_probe", train=ctx.name(kind, trs), test=ctx.name(kind, qs),
               probe="standardised features, multinomial logistic regression, L-BFGS from zero, L2 1e-4")
    return figs


@register_metric("knn_class")
def knn_class_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Category top-1 of weighted kNN and of 1-NN, over the queries with a category and an admissible labelled
    neighbour (as knn_pose; how many had none is recorded in the protocol)."""
    kind, trs, qs, tr_o, q_o, same = _train_query(ctx, model, "category")
    yt, yq = _ids(tr_o.strings("category"), q_o.strings("category"))
    g_tr, g_q = _groups(ctx, tr_o, q_o, same)
    tr_f, q_f = ctx.features(model, kind, trs), ctx.features(model, kind, qs)
    yt_t, yq_t = torch.from_numpy(yt).to(ctx.device), torch.from_numpy(yq).to(ctx.device)
    nc = int(max(yt.max(), yq.max())) + 1
    out, unscored = {}, 0
    for key, k in (("top1", ctx.knn_k), ("top1_1nn", 1)):
        pred = knn_classify(tr_f, yt_t, q_f, k=k, temperature=ctx.knn_temperature, num_classes=nc,
                            train_groups=g_tr, query_groups=g_q)
        valid = (yq_t >= 0) & (pred >= 0)  # -1: every neighbour excluded or without a category
        if not valid.any():
            raise SkipMetric(f"no query of {ctx.name(kind, qs)} has a category and an admissible labelled neighbour")
        unscored = int((yq_t >= 0).sum() - valid.sum())
        out[key] = float((pred[valid] == yq_t[valid]).double().mean())
    ctx.record("knn_class", gallery=ctx.name(kind, trs), queries=ctx.name(kind, qs), k=ctx.knn_k,
               temperature=ctx.knn_temperature, vote="exp(cos/T) (solo-learn)", leave_one_out=same,
               exclude_same_instance=ctx.exclude_same_instance and g_tr is not None,
               queries_without_neighbour=unscored)
    return out


def _sequences(o, features: torch.Tensor):
    """One row per sequence of ``o``: (pooled features, category strings, instance keys or None), in order of first
    appearance; frames with a blank sequence cell are left out. A sequence whose frames disagree on the category or
    the instance is an error naming the labels file."""
    seq = o.strings("sequence")
    if seq is None:
        raise SkipMetric("--retrieval-unit sequence needs a 'sequence' column")
    cats, inst = o.strings("category"), _instance_keys(o)
    index: dict[str, int] = {}
    seq_cat: list[str] = []
    seq_inst: list[str] = []
    rows, ids = [], []
    for i, s in enumerate(seq):
        if s == "":
            continue
        j = index.setdefault(s, len(index))
        if j == len(seq_cat):
            seq_cat.append(cats[i])
            seq_inst.append(inst[i] if inst is not None else "")
        elif cats[i] != seq_cat[j] or (inst is not None and inst[i] != seq_inst[j]):
            what = "category" if cats[i] != seq_cat[j] else "instance"
            raise ViewsslError(f"sequence {s!r} has frames of more than one {what}: one feature per sequence needs "
                               "one label per sequence", o.table.csv_path)
        rows.append(i)
        ids.append(j)
    if not rows:
        raise SkipMetric("no frame has a sequence")
    keep = torch.as_tensor(rows, device=features.device)
    pooled = pool_sequences(features[keep], ids, len(index))
    return pooled, seq_cat, (seq_inst if inst is not None else None)


def _sequence_groups(ctx: EvalContext, tr_inst, q_inst, n_tr: int, n_q: int, same: bool):
    """kNN exclusion groups for per-sequence retrieval: the query sequence itself (same set) and, with
    ``exclude_same_instance``, sequences of its instance."""
    if same:
        g = np.arange(n_q)
        if ctx.exclude_same_instance and q_inst is not None:
            (ids,) = _ids(q_inst)
            g = np.where(ids >= 0, ids, ids.max(initial=-1) + 1 + np.arange(n_q))
        return torch.from_numpy(g).to(ctx.device), torch.from_numpy(g.copy()).to(ctx.device)
    if ctx.exclude_same_instance and tr_inst is not None and q_inst is not None:
        gt, gq = _ids(tr_inst, q_inst)
        return torch.from_numpy(gt).to(ctx.device), torch.from_numpy(gq).to(ctx.device)
    return None, None


#: R@k of the per-sequence (video) protocol: VCOP / Luo et al. report k = 1, 5, 10, 20, 50
SEQUENCE_KS = (1, 5, 10, 20, 50)


@register_metric("retrieval")
def retrieval_metric(model, ctx: EvalContext) -> dict[str, float]:
    """Category retrieval R@1/5/10/20 over frames, or R@1/5/10/20/50 over sequences (``retrieval_unit``)."""
    kind, trs, qs, tr_o, q_o, same = _train_query(ctx, model, "category")
    if ctx.retrieval_unit == "sequence":
        tr_f, tr_cat, tr_inst = _sequences(tr_o, ctx.features(model, kind, trs))
        q_f, q_cat, q_inst = (tr_f, tr_cat, tr_inst) if same else _sequences(q_o, ctx.features(model, kind, qs))
        yt, yq = _ids(tr_cat, q_cat)
        g_tr, g_q = _sequence_groups(ctx, tr_inst, q_inst, len(tr_cat), len(q_cat), same)
        figs = recall_at_k(tr_f, yt, q_f, yq, SEQUENCE_KS, train_groups=g_tr, query_groups=g_q)
        ctx.record("retrieval", gallery=ctx.name(kind, trs), queries=ctx.name(kind, qs), relevance="same category",
                   unit="sequence: mean of L2-normalised frame features, renormalised; cosine",
                   gallery_sequences=len(tr_cat), query_sequences=len(q_cat), leave_one_out=same,
                   exclude_same_instance=ctx.exclude_same_instance and tr_inst is not None)
        return figs
    yt, yq = _ids(tr_o.strings("category"), q_o.strings("category"))
    g_tr, g_q = _groups(ctx, tr_o, q_o, same)
    figs = recall_at_k(ctx.features(model, kind, trs), yt, ctx.features(model, kind, qs), yq,
                       train_groups=g_tr, query_groups=g_q)
    ctx.record("retrieval", gallery=ctx.name(kind, trs), queries=ctx.name(kind, qs), relevance="same category",
               unit="frame", leave_one_out=same, exclude_same_instance=ctx.exclude_same_instance and g_tr is not None)
    return figs


@register_metric("reid")
def reid_metric(model, ctx: EvalContext) -> dict[str, float]:
    """SiamPose sequence re-identification: top-1, mAP, PR-AUC, frame jitter."""
    kind, split = (ctx.kind("sequences"), ctx.eval_split)
    if not ctx.has(kind, split):
        raise SkipMetric(f"no {ctx.name(kind, split)} split")
    o = ctx.outputs(model, kind, split)
    seq = o.strings("sequence")
    if seq is None:
        raise SkipMetric("needs a 'sequence' column")
    (ids,) = _ids(seq)
    frames = _index_column(o, "frame")  # blank: -1, left out of the jitter
    figs = reid_metrics(ctx.features(model, kind, split), ids, frames)
    ctx.record("reid", dataset=ctx.name(kind, split), self_match="excluded from the ranking",
               map="mean per-query average precision", auc="SiamPose trapezoidal PR-AUC ('mAP' in its notebooks)")
    return figs


@register_metric("box_fit")
def box_fit_metric(model, ctx: EvalContext) -> dict[str, float]:
    """SiamPose zero-shot 9-DoF box fitting: mean / median 3D IoU and AP@0.5."""
    if ctx.source.layout == "folder":
        raise SkipMetric("needs a train split of sequences as gallery")
    kind = ctx.kind("sequences")
    if not (ctx.has(kind, "train") and ctx.has(kind, ctx.split)):
        raise SkipMetric(f"needs {ctx.name(kind, 'train')} and {ctx.name(kind, ctx.split)}")
    if not (ctx.has_angles(kind, "train") and ctx.has_angles(kind, ctx.split)):
        raise SkipMetric("needs viewpoints (the box rotations) in both splits")
    tr_o, q_o = ctx.outputs(model, kind, "train"), ctx.outputs(model, kind, ctx.split)
    missing = [c for c in BOX_COLUMNS if c not in tr_o.table.raw or c not in q_o.table.raw]
    if missing:
        raise SkipMetric(f"needs the box columns ({', '.join(missing[:4])}...)")
    tr_frames = box_frames_from_table(tr_o.table)
    q_frames = box_frames_from_table(q_o.table)
    n_q = len(q_o.indices)
    rng = np.random.default_rng(ctx.seed)
    chosen = np.arange(n_q)
    if ctx.box_queries is not None and n_q > ctx.box_queries:
        chosen = np.sort(rng.choice(n_q, size=ctx.box_queries, replace=False))
    q_f = ctx.features(model, kind, ctx.split)[torch.from_numpy(chosen).to(ctx.device)]
    nn_idx = knn_search(ctx.features(model, kind, "train"), q_f, 1).indices[:, 0].cpu().numpy()
    rand_idx = rng.integers(0, len(tr_o.indices), size=len(chosen))
    ious, base = IoUAccumulator(), IoUAccumulator()
    for qi, ni, ri in zip(chosen, nn_idx, rand_idx):
        q = q_frames[q_o.indices[qi]]
        for acc, nb in ((ious, ni), (base, ri)):
            nbf = tr_frames[tr_o.indices[nb]]
            c, s, r = fit_box(nbf, q)
            acc.update(box_iou_3d(c, s, r, q.center, q.size, q.rotation))
    out = ious.compute()
    out.update({f"random_neighbor/{k}": v for k, v in base.compute().items()})
    out["n_queries"] = float(len(chosen))
    ctx.record("box_fit", gallery=ctx.name(kind, "train"), queries=ctx.name(kind, ctx.split),
               n_queries=len(chosen), seed=ctx.seed, retrieval="1-NN cosine",
               fit="SiamPose zero-shot: up-axis alignment, ray through the 2D-box centre (+ neighbour offset), "
                   "plane snap at the neighbour's height, 4 x isotropic rescale (alpha 2)",
               oracle="query 2D box, ground plane and intrinsics from the labels (as SiamPose)",
               ap_50="share of queries with IoU > 0.5 (strict)", baseline="random_neighbor: a random train frame")
    return out


# ============================================================================ running
class EvalResults(dict):
    """Flat ``{key: float}`` of every figure, plus :attr:`protocol` (metric -> description), :attr:`skipped`
    (metric -> reason), :attr:`context` and :attr:`seconds` (metric -> wall time)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.protocol: dict = {}
        self.skipped: dict[str, str] = {}
        self.context: dict = {}
        self.seconds: dict[str, float] = {}

    def to_json(self) -> dict:
        return {"metrics": dict(self), "protocol": self.protocol, "skipped": self.skipped, "context": self.context,
                "seconds": self.seconds}


def _check_names(metrics: Sequence[str] | str | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ViewsslError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    if not metrics:
        raise ViewsslError(f"no metric named (known: {', '.join(METRICS)})")
    return list(dict.fromkeys(metrics))


def run_metrics(
    model,
    data_root: str | Path | None = None,
    metrics: Sequence[str] | str | None = None,
    *,
    split: str = "test",
    device: torch.device | str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    taps: Sequence[str] | None = None,
    compress=None,
    context: EvalContext | None = None,
    **options,
) -> EvalResults:
    """Evaluate ``model`` (a :class:`~common.eval.models.PoseModel`) with the named metrics (default: all).

    ``data_root``: a benchmark root, a folder of split folders, or a ``labels.csv`` folder. ``options`` set any other
    :class:`EvalContext` field (``calibration``, ``calibration_count``, ``knn_k``, ``knn_temperature``,
    ``probe_steps``, ``limit``, ``box_queries``, ``exclude_same_instance``, ``progress``...). Pass ``context`` to
    reuse a context (and its cached model outputs) across calls with the same model; its fields are the settings
    then, and any other given here is a ``TypeError``.

    Metrics the model or the data cannot serve are skipped with a logged reason (``results.skipped``); an unknown
    metric name is a :class:`ViewsslError`. The global RNG state is saved and restored, so calling this during
    training does not change what the training run does next.
    """
    names = _check_names(metrics)
    if context is not None:
        # the context holds the evaluation's settings (and outputs computed under them): another value here would be
        # silently ignored
        given = [k for k, v in (("data_root", data_root), ("taps", taps), ("compress", compress)) if v is not None]
        given += [k for k, v, default, held in (("split", split, "test", context.split),
                                                ("batch_size", batch_size, 64, context.batch_size),
                                                ("seed", seed, 0, context.seed)) if v != default and v != held]
        if device is not None and torch.device(device) not in (context.device, context.model_device):
            given.append("device")
        if given or options:
            raise TypeError(f"run_metrics: {', '.join([*given, *options])} cannot be set with context= (set them "
                            "on the EvalContext)")
    else:
        if data_root is None:
            raise ViewsslError("run_metrics needs data_root (or a context)")
        dev = torch.device(device) if device is not None else torch.device(getattr(model, "device", "cpu"))
        unknown = [k for k in options if k not in EvalContext.__dataclass_fields__ or k.startswith("_")]
        if unknown:
            raise TypeError(f"run_metrics: unknown option(s) {', '.join(unknown)}")
        context = EvalContext(source=DataSource.detect(data_root), split=split, device=dev, batch_size=batch_size,
                              seed=seed, taps=list(taps) if taps else None, compress=parse_compress(compress),
                              **options)
    ctx = context
    ctx.needs_angles = any("angles" in METRICS[n].needs for n in names)
    ctx.needs_features = any("features" in METRICS[n].needs for n in names)
    results = EvalResults()
    tap_list = ctx.requested_taps(model) if ctx.needs_features else []
    multi_tap = len(tap_list) > 1
    with seeded_rng(ctx.seed):
        for name in names:
            fn = METRICS[name]
            runs = [(t, t) for t in tap_list] if "features" in fn.needs else [(None, None)]
            if "features" in fn.needs and not tap_list:
                results.skipped[name] = "the model offers no feature taps"
                log.info("skipping metric %s: %s", name, results.skipped[name])
                continue
            for tap, label in runs:
                ctx.tap = tap
                t0 = time.perf_counter()
                try:
                    figs = fn(model, ctx)
                except SkipMetric as e:
                    results.skipped[name] = str(e)
                    log.info("skipping metric %s: %s", name, e)
                    break
                prefix = _join(name, label if multi_tap else "")
                for key, v in figs.items():
                    results[_join(prefix, key)] = float(v)
                results.seconds[prefix] = time.perf_counter() - t0
                if tap is not None and name in ctx.protocol:
                    ctx.protocol[name]["tap"] = tap_list if multi_tap else tap
    ctx.tap = None
    results.protocol = {k: v for k, v in ctx.protocol.items() if k in names}
    results.context = ctx.describe()
    results.context["family"] = getattr(model, "family", None)
    results.context["taps"] = tap_list
    return results
