"""One evaluation module for every viewssl model: viewpoint (raw and SSV-calibrated), absolute pose by kNN, the
relative-pose probe, classification (linear probe, kNN), retrieval / re-identification, SiamPose's 9-DoF box fitting
with exact 3D IoU, and layer taps.

Public API::

    knn_classify(train_features, train_labels, query_features, k=20, temperature=0.07)   # -> (M,) labels
    knn_search(train_features, query_features, k)                                         # -> (similarities, indices)
    box_iou_3d(center_a, size_a, rotation_a, center_b, size_b, rotation_b)                 # exact oriented-box IoU
    viewpoint_errors(pred_angles, true_angles)   # azimuth_mae, elevation_mae, tilt_mae, mae, median_geodesic, acc_pi_6
    calibrated_viewpoint_errors(pred, true, fraction=0.1, seed=0)                          # SSV's protocol
    run_metrics(model, data_root, metrics=[...], ...)                                      # -> EvalResults
    METRICS                                                                                # name -> fn(model, ctx)
    register_family(name, loader); load_model(run_or_ckpt, device)                         # PoseModel loading

``viewssl eval`` (``common/eval/cli.py``) is the command-line face of :func:`run_metrics`.
"""
from .boxes import box_corners, box_iou_3d, fit_box
from .context import DataSource, EvalContext, SkipMetric
from .knn import knn_classify, knn_search, weighted_vote
from .metrics import (
    METRICS,
    AccuracyAccumulator,
    EvalResults,
    GeodesicAccumulator,
    IoUAccumulator,
    MeanAccumulator,
    ViewpointAccumulator,
    register_metric,
    run_metrics,
)
from .models import FAMILIES, FlipAveraged, PoseModel, load_model, register_family
from .pose import calibrated_viewpoint_errors, evaluate_viewpoints, knn_pose, viewpoint_errors
from .probes import linear_probe, relative_pose_probe
from .retrieval import recall_at_k, reid_metrics
from .taps import Compressor, LayerTaps, extract_taps, pool_feature_map

from . import readout  # noqa: E402,F401  (registers the "viewpoint_readout" metric)

__all__ = [
    "knn_classify", "knn_search", "weighted_vote",
    "box_iou_3d", "box_corners", "fit_box",
    "viewpoint_errors", "calibrated_viewpoint_errors", "evaluate_viewpoints", "knn_pose",
    "linear_probe", "relative_pose_probe", "recall_at_k", "reid_metrics",
    "Compressor", "LayerTaps", "extract_taps", "pool_feature_map",
    "METRICS", "register_metric", "run_metrics", "EvalResults", "EvalContext", "DataSource", "SkipMetric",
    "MeanAccumulator", "AccuracyAccumulator", "GeodesicAccumulator", "IoUAccumulator", "ViewpointAccumulator",
    "PoseModel", "FlipAveraged", "FAMILIES", "register_family", "load_model",
]
