"""Evaluation context: where the data is, how to run the model over it, and a cache of its outputs per split.

Three data layouts are accepted as ``data_root``:

- ``"benchmark"``: the synthetic benchmark root, ``DIR/{objects,heads,sequences,triplets}/<split>/labels.csv``;
- ``"splits"``: one kind's folder with split sub-folders, ``DIR/<split>/labels.csv`` (e.g. ``DIR/objects``, or a
  user's own ``train/`` + ``test/``);
- ``"folder"``: a single ``labels.csv`` folder (a user's own labelled images). Only split-free metrics run on it
  (viewpoint raw/calibrated, and leave-one-out kNN / retrieval / re-ID where the columns allow).

A dataset is addressed as ``(kind, split)``: kind is ``"objects"``, ``"heads"``, ``"sequences"``... in the benchmark
layout and ``""`` otherwise; split is ``""`` for the folder layout. :meth:`EvalContext.outputs` runs the model once
per dataset (batched, no grad, on ``device``) and caches the true labels, the predicted angles (if the model has
them and a metric needs them) and the features of every requested tap.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.labels import LABELS_FILE, LabeledFolder, LabelTable, read_labels
from ..errors import ViewsslError
from .taps import Compressor

__all__ = ["DataSource", "SplitOutputs", "EvalContext", "SkipMetric"]

log = logging.getLogger("viewssl.eval")

BENCHMARK_KINDS = ("objects", "heads", "sequences", "triplets")


class SkipMetric(Exception):
    """Raised by a metric that cannot run on this model or data; the message is the logged reason."""


@dataclass
class DataSource:
    root: Path
    layout: str  # "benchmark" | "splits" | "folder"

    @classmethod
    def detect(cls, root) -> "DataSource":
        root = Path(root)
        if not root.exists():
            raise ViewsslError("no such data folder", root)
        if root.is_file():
            if root.name == LABELS_FILE:
                return cls(root.parent, "folder")
            raise ViewsslError(f"--data must be a folder (a benchmark root or a folder with {LABELS_FILE})", root)
        if (root / LABELS_FILE).is_file():
            return cls(root, "folder")
        if any((root / k).is_dir() and any((root / k).glob(f"*/{LABELS_FILE}")) for k in BENCHMARK_KINDS):
            return cls(root, "benchmark")
        if any(root.glob(f"*/{LABELS_FILE}")):
            return cls(root, "splits")
        raise ViewsslError(
            f"not a dataset: expected {LABELS_FILE} here, in split sub-folders (train/, test/) or a benchmark root "
            f"with objects/, heads/, sequences/",
            root,
        )

    def kind(self, preferred: str) -> str:
        """The kind name to use for ``preferred`` (e.g. "objects") in this layout."""
        return preferred if self.layout == "benchmark" else ""

    def path(self, kind: str, split: str) -> Path | None:
        if self.layout == "folder":
            p = self.root if (kind, split) == ("", "") else None
        elif self.layout == "splits":
            p = self.root / split if kind == "" and split else None
        else:
            p = self.root / kind / split if kind and split else None
        return p if p is not None and (p / LABELS_FILE).is_file() else None

    def has(self, kind: str, split: str) -> bool:
        return self.path(kind, split) is not None

    def splits(self) -> list[str]:
        """The split names present (any kind's, in the benchmark layout); ``[]`` for a single folder."""
        if self.layout == "folder":
            return []
        found = self.root.glob(f"*/{LABELS_FILE}") if self.layout == "splits" else \
            (p for k in BENCHMARK_KINDS for p in (self.root / k).glob(f"*/{LABELS_FILE}"))
        return sorted({p.parent.name for p in found})


@dataclass
class SplitOutputs:
    table: LabelTable
    indices: np.ndarray  # rows of the table that were evaluated (all, or a seeded subset under ``limit``)
    true_angles: torch.Tensor  # (N, 3) float64 radians, on the CPU
    angles: torch.Tensor | None  # (N, 3) float64 predicted (CPU), or None
    features: dict[str, torch.Tensor]  # tap -> (N, D) on the context's device
    angles_asked: bool = False  # whether the model was asked for angles (``angles`` is None if it had none)

    def column(self, name: str) -> np.ndarray | None:
        """A numeric extra column restricted to the evaluated rows, or None if absent."""
        return self.table.numeric(name)[self.indices] if name in self.table.raw else None

    def strings(self, name: str) -> list[str] | None:
        if name not in self.table.raw:
            return None
        col = self.table.raw[name]
        return [col[i] for i in self.indices]


@dataclass
class EvalContext:
    """Everything a metric needs besides the model. Metrics read options from here and record their protocol in
    :attr:`protocol` (metric -> JSON-able description)."""

    source: DataSource
    split: str = "test"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the metrics run (see below)
    batch_size: int = 64
    seed: int = 0
    taps: list[str] | None = None  # None: the model's default tap ("pooled" if offered, else its first)
    compress: tuple[str, int] | None = None  # ("pca" | "random", width)
    calibration: float = 0.1  # fraction of frames used to fit SSV's per-angle calibration
    calibration_count: int | None = None  # or an absolute count (overrides the fraction)
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 300
    probe_hidden: int = 256
    probe_pairs: int = 2000
    box_queries: int | None = 1000  # seeded subset of query frames for box fitting (SiamPose: 1000); None = all
    limit: int | None = None  # at most this many frames per dataset (seeded subset); None = all
    exclude_same_instance: bool = True
    retrieval_unit: str = "frame"  # "frame" or "sequence" (one pooled feature per video: the UCF101 protocol)
    num_workers: int = 0
    progress: bool = False
    needs_angles: bool = True
    needs_features: bool = True
    protocol: dict[str, Any] = field(default_factory=dict)
    tap: str | None = None  # the tap the feature metrics currently use (set by run_metrics)
    _outputs: dict = field(default_factory=dict, repr=False)
    _compressors: dict = field(default_factory=dict, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)
    model_device: torch.device | None = None  # where the model runs: the images go there (default: device)

    def __post_init__(self):
        if self.retrieval_unit not in ("frame", "sequence"):
            raise ViewsslError(f"retrieval unit must be 'frame' or 'sequence', not {self.retrieval_unit!r}")
        self.device = torch.device(self.device)
        self.model_device = torch.device(self.model_device) if self.model_device is not None else self.device
        if self.device.type == "mps":
            # the exact figures (kNN tie checks, ridge, AP, geodesic errors) are float64, which MPS does not have:
            # the model stays on MPS, its features come to the CPU for the metrics
            log.info("evaluation: the model runs on mps, the metrics on the cpu (mps has no float64)")
            self.device = torch.device("cpu")

    # ---------------------------------------------------------------- data
    def kind(self, preferred: str) -> str:
        return self.source.kind(preferred)

    def has(self, kind: str, split: str) -> bool:
        return self.source.has(kind, split)

    @property
    def eval_split(self) -> str:
        return "" if self.source.layout == "folder" else self.split

    def has_angles(self, kind: str, split: str) -> bool:
        """The dataset exists and its rows have viewpoints (UCF101-like folders have blank angle cells)."""
        return self.has(kind, split) and self.table(kind, split).has_angles

    def name(self, kind: str, split: str) -> str:
        return "/".join(p for p in (kind, split) if p) or self.source.root.name

    def table(self, kind: str, split: str) -> LabelTable:
        key = (kind, split)
        if key not in self._tables:
            path = self.source.path(kind, split)
            if path is None:
                raise SkipMetric(f"no dataset {self.name(kind, split)!r} under {self.source.root}")
            self._tables[key] = read_labels(path)
        return self._tables[key]

    def subset(self, kind: str, split: str) -> np.ndarray:
        n = len(self.table(kind, split))
        if self.limit is None or n <= self.limit:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, zlib.crc32(f'{kind}/{split}'.encode())])
        return np.sort(rng.choice(n, size=int(self.limit), replace=False))

    # ---------------------------------------------------------------- model outputs
    def default_tap(self, model) -> str:
        taps = list(getattr(model, "taps", []) or [])
        if not taps:
            raise SkipMetric("the model offers no feature taps")
        return "pooled" if "pooled" in taps else taps[0]

    def requested_taps(self, model) -> list[str]:
        if self.taps:
            offered = list(getattr(model, "taps", []) or [])
            unknown = [t for t in self.taps if t not in offered]
            if unknown:
                raise ViewsslError(
                    f"--tap {', '.join(unknown)}: the model offers {', '.join(offered) or 'no taps'}"
                )
            return list(self.taps)
        try:
            return [self.default_tap(model)]
        except SkipMetric:
            return []

    def outputs(self, model, kind: str, split: str) -> SplitOutputs:
        """Run the model over a dataset once (cached): predicted angles where needed, features of every tap. A cached
        run that lacks what the current metrics need (angles, a tap) is run again for everything both need."""
        key = (kind, split)
        table = self.table(kind, split)
        taps = self.requested_taps(model) if self.needs_features else []
        want_angles = self.needs_angles and split == self.eval_split and table.has_angles
        cached = self._outputs.get(key)
        if cached is not None:
            if (cached.angles_asked or not want_angles) and all(t in cached.features for t in taps):
                return cached
            want_angles = want_angles or cached.angles_asked
            taps = list(dict.fromkeys([*cached.features, *taps]))
        asked = want_angles
        idx = self.subset(kind, split)
        ds = LabeledFolder(self.source.path(kind, split), size=int(model.input_size))
        subset = torch.utils.data.Subset(ds, idx.tolist())
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        angles, feats = [], {t: [] for t in taps}
        it = loader
        if self.progress:
            from tqdm import tqdm

            it = tqdm(loader, desc=f"eval {self.name(kind, split)}", unit="batch", leave=False)
        with torch.no_grad():
            for batch in it:
                images = batch["image"].to(self.model_device)
                if want_angles:
                    a = model.predict_angles(images)
                    if a is None:
                        want_angles, angles = False, None
                    else:
                        angles.append(a.detach().to("cpu", torch.float64))
                if taps:
                    out = model.features(images, taps)
                    for t in taps:
                        if t not in out:
                            raise ViewsslError(f"the model's features() returned no tap {t!r} (got {', '.join(out)})")
                        feats[t].append(out[t].detach().to(self.device).flatten(1).float())
        result = SplitOutputs(
            table=table,
            indices=idx,
            true_angles=table.angles[idx].to(torch.float64),
            angles=torch.cat(angles) if want_angles and angles else None,
            features={t: torch.cat(v) for t, v in feats.items() if v},
            angles_asked=asked,
        )
        self._outputs[key] = result
        return result

    def features(self, model, kind: str, split: str, tap: str | None = None) -> torch.Tensor:
        """Features of the current tap (compressed if :attr:`compress` is set), (N, D) on :attr:`device`."""
        tap = tap or self.tap or self.default_tap(model)
        out = self.outputs(model, kind, split)
        if tap not in out.features:
            raise SkipMetric(f"no features for tap {tap!r}")
        x = out.features[tap]
        if not bool(torch.isfinite(x).all()):  # a diverged model: no neighbour, probe or readout means anything
            raise SkipMetric(f"the features of tap {tap!r} on {self.name(kind, split)} hold NaN or inf")
        if self.compress is None:
            return x
        ref_split = self._reference_split(kind, split)
        ckey = (kind, ref_split, tap)
        if ckey not in self._compressors:
            ref = self.outputs(model, kind, ref_split).features[tap]
            if not bool(torch.isfinite(ref).all()):
                raise SkipMetric(f"the features of tap {tap!r} on {self.name(kind, ref_split)} hold NaN or inf")
            self._compressors[ckey] = Compressor(*self.compress, seed=self.seed).fit(ref)
        return self._compressors[ckey].transform(x)

    def _reference_split(self, kind: str, split: str) -> str:
        """The split a PCA is fitted on: the matching training split when there is one."""
        if split.startswith("ood") and self.has(kind, "ood_train"):
            return "ood_train"
        if self.has(kind, "train"):
            return "train"
        return split

    def record(self, metric: str, **info) -> None:
        self.protocol.setdefault(metric, {}).update(info)

    def describe(self) -> dict:
        return {
            "data": str(self.source.root),
            "layout": self.source.layout,
            "split": self.eval_split,
            "device": str(self.device),
            **({"model_device": str(self.model_device)} if self.model_device != self.device else {}),
            "seed": self.seed,
            "limit": self.limit,
            "compress": None if self.compress is None else f"{self.compress[0]}:{self.compress[1]}",
        }
