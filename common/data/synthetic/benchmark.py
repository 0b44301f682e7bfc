"""The offline synthetic viewpoint benchmark: what is rendered, streamed and written to disk.

Four kinds, each a set of splits (``DIR/<kind>/<split>/labels.csv`` + ``images/``):

- ``objects`` (the ShapeNet analog of the trajectory paper): the 13 in-domain categories seen from the Fib(50)
  viewpoints (camera directions ``fibonacci_sphere(50)``, upright cameras from ``look_at_rotation``, labels from
  ``matrix_to_angles``: exact), instance-level ``train`` / ``val`` / ``test`` splits; ``test_unseen_pose`` renders the
  test instances from Fib(100) and ``train_unseen_pose`` the train instances from Fib(100) (the gallery for
  pose-index kNN on unseen poses); ``ood_train`` / ``ood_test`` hold the 11 out-of-domain categories (Fib(50)).
  Extra column ``view``: the index in the Fib set of that split (``meta.json`` gives the set size, ``fib``).
- ``heads`` (the 300W-LP analog for SSV): one head identity per image from a pool (train and test identities
  disjoint), yaw/pitch/roll uniform in +-``yaw_range``/``pitch_range``/``roll_range`` degrees (azimuth = yaw,
  elevation = pitch, tilt = roll), random skin, lighting, background and a small framing jitter. ``train`` (its
  labels are written but SSV ignores them) and a labelled ``test``.
- ``triplets`` (trajectory regularisation): for a centre view R_C taken from the Fib(50) train views of a train
  instance, R_L = A @ R_C with A a rotation by ``triplet_step`` degrees about a random axis, and R_R =
  slerp(R_L, R_C, 2) (= A^T @ R_C), so geodesic(L, C) = geodesic(C, R) = step. Rows come in order L, C, R (row
  3 * t + position); extra columns ``triplet``, ``position`` (0 = L, 1 = C, 2 = R) and ``view`` (the centre's Fib
  index). Light and background are shared by the three views.
- ``sequences`` (the Objectron analog): an object on a checkered ground plane filmed along a smooth path (orbit
  with varying elevation, distance, aim point and a little roll), ``frames`` frames each. Extra columns: ``fx, fy,
  cx, cy`` (intrinsics, pixels), ``box_cx, box_cy, box_cz`` (3D box centre = object origin, camera frame),
  ``box_sx, box_sy, box_sz`` (box size along the object's x, y, z), ``plane_nx, plane_ny, plane_nz, plane_d``
  (ground plane n . X + d = 0 in camera coordinates, n pointing up, away from the ground), ``bbox_x0, bbox_y0,
  bbox_x1, bbox_y1`` (bounding box of the 8 projected box corners in pixels, not clipped to the image). The box
  rotation in camera coordinates is angles_to_matrix(azimuth, elevation, tilt). Light is fixed in the world, so
  shading changes with the camera like in a real video.

- ``head_triplets`` (trajectory regularisation on heads): a centre pose drawn like a ``heads`` image (train
  identities), L and R built like ``triplets`` (``triplet_step``); same columns as ``triplets`` minus ``view``.
- ``head_sequences`` (frame pairs on heads): one head (identity, light, background fixed) turning along the
  constant-speed geodesic ``slerp(R_start, R_end, s)``, s = frame / (frames - 1), between two poses drawn like a
  ``heads`` image (at least ``head_turn_min`` degrees apart); ``train`` uses train identities, ``test`` test ones.
  Columns ``sequence`` and ``frame``.

Camera and pixel conventions: ``render.py`` (module docstring). Every image is a pure function of (config, kind,
split, index): :class:`SyntheticDataset` renders item i on demand (map-style, usable in DataLoader workers) and
:func:`render_benchmark` writes the very same images and rows to disk (byte-identical for the same seed).
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ...errors import ViewsslError
from ...geometry import (angles_to_matrix, fibonacci_sphere, geodesic_distance, look_at_rotation, matrix_to_angles,
                         slerp)
from ...io import atomic_write_json, folder_lock, opencv
from ..labels import BOX_COLUMNS, LABELS_FILE, _index, write_labels
from .heads import build_head
from .meshes import CATEGORIES, IN_DOMAIN, OUT_OF_DOMAIN, build_object, instance_rng
from .parts import TriangleMesh, hsv
from .render import Background, Camera, Light, get_renderer, project

log = logging.getLogger("viewssl.data.synthetic")

__all__ = [
    "KINDS", "SPLITS", "BenchmarkConfig", "SyntheticDataset", "ViewSpec", "render_benchmark",
    "summarize", "format_summary", "fib_rotations", "load_config",
]

KINDS = ("objects", "heads", "triplets", "sequences", "head_triplets", "head_sequences")
SPLITS = {
    "objects": ("train", "val", "test", "test_unseen_pose", "train_unseen_pose", "ood_train", "ood_test"),
    "heads": ("train", "test"),
    "triplets": ("train",),
    "sequences": ("train", "test"),
    "head_triplets": ("train",),
    "head_sequences": ("train", "test"),
}
EXTRA_COLUMNS = {"objects": ("view",), "heads": (), "triplets": ("triplet", "position", "view"),
                 "sequences": BOX_COLUMNS, "head_triplets": ("triplet", "position"), "head_sequences": ()}
#: Sequence test instances are numbered from here, so they are disjoint from every object split's instances.
SEQUENCE_TEST_OFFSET = 1000
META_FILE = "meta.json"
CONVENTION = ("X_cam = R @ X_obj + t with R = angles_to_matrix(azimuth, elevation, tilt) = R_y(az) R_x(el) R_z(tilt); "
              "object frame y up, +z front; OpenGL camera x right, y up, looking down -z; "
              "pixel u = cx + fx * X / (-Z), v = cy - fy * Y / (-Z), image spans [0, W] x [0, H] "
              "(see common/data/synthetic/render.py)")
META_VERSION = 1


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every knob of the benchmark. ``BenchmarkConfig.preset("small" | "full", **overrides)``."""

    size: int = 64
    seed: int = 0
    supersample: int = 2
    # objects
    categories: tuple[str, ...] = IN_DOMAIN
    ood_categories: tuple[str, ...] = OUT_OF_DOMAIN
    train_instances: int = 10
    val_instances: int = 2
    test_instances: int = 3
    ood_train_instances: int = 4
    ood_test_instances: int = 2
    views: int = 50
    unseen_views: int = 100
    view_stride: int = 1            # render every k-th Fib view only (tiny test benchmarks); 1 = all of them
    object_fov: float = 30.0        # degrees
    object_distance: float = 4.0    # objects are normalised to half-diagonal 1
    # heads
    head_train: int = 4000
    head_test: int = 1000
    head_train_identities: int = 400
    head_test_identities: int = 100
    yaw_range: float = 90.0         # degrees, uniform in [-range, range]
    pitch_range: float = 60.0
    roll_range: float = 40.0
    head_fov: float = 30.0
    head_distance: float = 5.0
    head_triplets: int = 1000       # triplets of head_triplets/train
    head_sequences_train: int = 100
    head_sequences_test: int = 20
    head_turn_min: float = 40.0     # degrees between the first and last pose of a head sequence
    # triplets
    triplets_per_instance: int = 10
    triplet_step: float = 15.0      # degrees
    # sequences
    sequence_categories: tuple[str, ...] = ("bottle", "camera", "car", "chair", "lamp", "mug", "sofa")
    sequence_train_instances: int = 4
    sequence_test_instances: int = 2
    sequences_per_instance: int = 1
    frames: int = 24

    @classmethod
    def preset(cls, scale: str = "small", **overrides) -> "BenchmarkConfig":
        if scale not in PRESETS:
            raise ViewsslError(f"--scale must be one of {', '.join(PRESETS)}, not {scale!r}")
        config = replace(cls(), **PRESETS[scale])
        try:
            config = replace(config, **{k: _as_field(k, v) for k, v in overrides.items()})
        except TypeError as e:
            raise ViewsslError(f"unknown benchmark option ({e})") from None
        config.validate()
        return config

    @classmethod
    def parse_overrides(cls, pairs: Iterable[str]) -> dict:
        """``["frames=48", "categories=car,mug"]`` -> typed overrides (for ``--set KEY=VALUE`` on the CLI)."""
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        out = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or key not in defaults:
                raise ViewsslError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(defaults)}")
            default = defaults[key]
            try:
                if isinstance(default, tuple):
                    out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
                elif isinstance(default, bool):
                    out[key] = value.strip().lower() in ("1", "true", "yes")
                else:
                    out[key] = type(default)(value)
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise ViewsslError(f"--set {pair!r}: {key} must be {kind}") from None
        return out

    def validate(self) -> None:
        if not 8 <= self.size <= 1024:
            raise ViewsslError(f"--size must be between 8 and 1024 pixels, not {self.size}")
        if self.supersample < 1 or self.supersample > 4:
            raise ViewsslError(f"supersample must be 1..4, not {self.supersample}")
        for name in ("categories", "ood_categories", "sequence_categories"):
            unknown = [c for c in getattr(self, name) if c not in CATEGORIES]
            if unknown:
                raise ViewsslError(f"{name}: unknown categories {', '.join(unknown)} (known: "
                                   f"{', '.join(sorted(CATEGORIES))})")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and v >= 0):
                raise ViewsslError(f"{f.name} must be a finite number >= 0, got {v}")
        for name in ("object_fov", "head_fov"):
            if not 0 < getattr(self, name) < 180:
                raise ViewsslError(f"{name} must be in (0, 180) degrees, got {getattr(self, name)}")
        # the head draws are the labels (azimuth = yaw, elevation = pitch, tilt = roll): they must be in the labels'
        # ranges, elevation in [-90, 90] and the others in (-180, 180]
        for name, top in (("yaw_range", 180), ("pitch_range", 90), ("roll_range", 180)):
            if getattr(self, name) > top:
                raise ViewsslError(f"{name} must be at most {top} degrees, got {getattr(self, name)}")
        if not 0 < self.triplet_step < 90:
            raise ViewsslError(f"triplet_step must be in (0, 90) degrees, got {self.triplet_step}")
        if self.view_stride < 1 or self.views < 1 or self.unseen_views < 1 or self.frames < 1:
            raise ViewsslError("views, unseen_views, view_stride and frames must be >= 1")
        # splits must not share meshes: an instance is a (category, number) pair (see _instances)
        both = sorted(set(self.categories) & set(self.ood_categories))
        if both:
            raise ViewsslError(f"categories and ood_categories share {', '.join(both)}: the unseen-category splits "
                               "would hold training meshes")
        if (set(self.sequence_categories) & set(self.categories)
                and self.sequence_train_instances > self.train_instances):
            raise ViewsslError(f"sequence_train_instances ({self.sequence_train_instances}) must not exceed "
                               f"train_instances ({self.train_instances}): training sequences would use the object "
                               "val / test meshes")
        if (set(self.sequence_categories) & set(self.ood_categories)
                and self.sequence_train_instances > self.ood_train_instances):
            raise ViewsslError(f"sequence_train_instances ({self.sequence_train_instances}) must not exceed "
                               f"ood_train_instances ({self.ood_train_instances}): training sequences of the unseen "
                               "categories would use the objects' ood_test meshes")
        if self.train_instances + self.val_instances + self.test_instances > SEQUENCE_TEST_OFFSET:
            raise ViewsslError(f"at most {SEQUENCE_TEST_OFFSET} object instances per category (the test sequences' "
                               "instances are numbered from there)")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _as_field(name: str, value):
    return tuple(value) if isinstance(value, list) else value


PRESETS: dict[str, dict] = {
    # ~5k images (every other Fib view): `make demo` and quick looks
    "small": dict(train_instances=2, val_instances=1, test_instances=1, ood_train_instances=1, ood_test_instances=1,
                  view_stride=2,
                  head_train=400, head_test=100, head_train_identities=40, head_test_identities=10,
                  head_triplets=100, head_sequences_train=10, head_sequences_test=4,
                  triplets_per_instance=4, sequence_train_instances=1, sequence_test_instances=1),
    # what experiments train on
    "full": {},
}


def load_config(root: str | os.PathLike) -> BenchmarkConfig:
    """The configuration a rendered benchmark was made with (from its ``meta.json``)."""
    meta = read_meta(Path(root))
    if meta is None:
        raise ViewsslError(f"no {META_FILE}: not a rendered synthetic benchmark", root)
    known = {f.name for f in fields(BenchmarkConfig)}
    absent = sorted(known - set(meta["config"]))
    if absent or meta.get("version") != META_VERSION:
        # streamed images (SyntheticDataset.from_root) may then differ from the ones on disk
        log.warning("%s/%s: written by another version of viewssl (version %s, this one %s%s): the settings it "
                    "lacks take today's defaults", root, META_FILE, meta.get("version"), META_VERSION,
                    f"; no {', '.join(absent)}" if absent else "")
    return BenchmarkConfig(**{k: _as_field(k, v) for k, v in meta["config"].items() if k in known})


# ---------------------------------------------------------------------------------------------------------------
# Rotations and random scene parameters
# ---------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def fib_rotations(n: int) -> np.ndarray:
    """(n, 3, 3) float64: the object->camera rotations of the Fib(n) viewpoints (upright cameras looking at the
    origin from the directions ``fibonacci_sphere(n)``)."""
    return look_at_rotation(fibonacci_sphere(n, dtype=torch.float64)).numpy()


@lru_cache(maxsize=8)
def _fib_angles(n: int) -> list[tuple[float, float, float]]:
    a, e, t = matrix_to_angles(torch.from_numpy(fib_rotations(n)))
    return list(zip(a.tolist(), e.tolist(), t.tolist()))


def _angles(R: np.ndarray) -> tuple[float, float, float]:
    a, e, t = matrix_to_angles(torch.from_numpy(np.asarray(R, dtype=np.float64)))
    return float(a), float(e), float(t)


def _axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def _random_light(rng: np.random.Generator) -> Light:
    d = np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.1, 1.0), rng.uniform(0.4, 1.0)])
    return Light(direction=tuple(d / np.linalg.norm(d)), ambient=rng.uniform(0.3, 0.45),
                 diffuse=rng.uniform(0.55, 0.8), specular=rng.uniform(0.05, 0.3), shininess=rng.uniform(10, 40))


def _random_background(rng: np.random.Generator, val: tuple[float, float] = (0.05, 0.6)) -> Background:
    h = rng.uniform(0, 1)
    c0 = hsv(h, rng.uniform(0, 0.45), rng.uniform(*val))
    c1 = hsv(h + rng.uniform(-0.15, 0.15), rng.uniform(0, 0.45), rng.uniform(*val))
    return Background(c0, c1, rng.uniform(0, 2 * math.pi))


@lru_cache(maxsize=64)
def _ground(key: str, y: float, color0: tuple, color1: tuple, half: float = 6.0, tiles: int = 12) -> TriangleMesh:
    """A checkered square at height ``y`` (object frame), normal +y."""
    edges = np.linspace(-half, half, tiles + 1)
    rows = []
    for i in range(tiles):
        for j in range(tiles):
            x0, x1, z0, z1 = edges[i], edges[i + 1], edges[j], edges[j + 1]
            c = color0 if (i + j) % 2 == 0 else color1
            quad = [(x0, y, z0), (x0, y, z1), (x1, y, z1), (x0, y, z0), (x1, y, z1), (x1, y, z0)]
            rows.extend([(*p, 0.0, 1.0, 0.0, *c) for p in quad])
    data = np.asarray(rows, dtype=np.float32)
    return TriangleMesh(key=key, vertex_data=data, extents=np.array([2 * half, 0.0, 2 * half]), center=np.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# One view = one row of labels.csv + what it takes to render it
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ViewSpec:
    """Everything that defines one image: ``row`` (the labels.csv row, angles in radians) and the render recipe."""

    row: dict
    mesh: tuple                      # ("object", category, instance) or ("head", identity)
    rotation: np.ndarray             # (3, 3) object -> camera
    translation: np.ndarray          # (3,)
    camera: Camera
    light: Light
    background: Background
    ground: tuple | None = None      # arguments of _ground, sequences only


def _instances(config: BenchmarkConfig, kind: str, split: str) -> tuple[tuple[str, ...], range]:
    """The categories and the instance numbers of a split."""
    ntr, nv, nte = config.train_instances, config.val_instances, config.test_instances
    if kind in ("objects", "triplets"):
        if split in ("train", "train_unseen_pose"):
            return config.categories, range(0, ntr)
        if split == "val":
            return config.categories, range(ntr, ntr + nv)
        if split in ("test", "test_unseen_pose"):
            return config.categories, range(ntr + nv, ntr + nv + nte)
        if split == "ood_train":
            return config.ood_categories, range(0, config.ood_train_instances)
        if split == "ood_test":
            n0 = config.ood_train_instances
            return config.ood_categories, range(n0, n0 + config.ood_test_instances)
    if kind == "sequences":
        if split == "train":
            return config.sequence_categories, range(config.sequence_train_instances)
        return config.sequence_categories, range(SEQUENCE_TEST_OFFSET,
                                                 SEQUENCE_TEST_OFFSET + config.sequence_test_instances)
    if kind in ("heads", "head_triplets", "head_sequences"):
        n0 = config.head_train_identities
        return ("head",), range(0, n0) if split == "train" else range(n0, n0 + config.head_test_identities)
    raise KeyError((kind, split))


def _plan_objects(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    n_views = config.unseen_views if split.endswith("unseen_pose") else config.views
    rotations, angles = fib_rotations(n_views), _fib_angles(n_views)
    camera = Camera.from_fov(config.size, config.object_fov)
    t = np.array([0.0, 0.0, -config.object_distance])
    categories, instances = _instances(config, "objects", split)
    specs = []
    for category in categories:
        for k in instances:
            for v in range(0, n_views, config.view_stride):
                rng = instance_rng(config.seed, "objects", category, k, n_views, v)
                R = rotations[v]
                az, el, ti = angles[v]
                row = {"path": f"images/{category}/{k:03d}_v{v:03d}.png", "azimuth": az, "elevation": el,
                       "tilt": ti, "category": category, "instance": f"{category}_{k:03d}", "view": v}
                specs.append(ViewSpec(row, ("object", category, k), R, t, camera, _random_light(rng),
                                      _random_background(rng)))
    return specs


def _plan_heads(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    n = config.head_train if split == "train" else config.head_test
    _, identities = _instances(config, "heads", split)
    if n and not len(identities):
        raise ViewsslError(f"heads/{split}: needs at least one identity")
    camera = Camera.from_fov(config.size, config.head_fov)
    specs = []
    for i in range(n):
        rng = instance_rng(config.seed, "heads", split, i)
        identity = identities[int(rng.integers(len(identities)))]
        yaw, pitch, roll = _head_pose(config, rng)
        R = _rotation(yaw, pitch, roll)
        t = _head_translation(config, rng)
        row = {"path": f"images/{i:06d}.png", "azimuth": yaw, "elevation": pitch, "tilt": roll, "category": "head",
               "instance": f"id{identity:05d}"}
        specs.append(ViewSpec(row, ("head", identity), R, t, camera, _random_light(rng),
                              _random_background(rng, (0.1, 0.8))))
    return specs


def _head_pose(config: BenchmarkConfig, rng: np.random.Generator) -> tuple[float, float, float]:
    """(yaw, pitch, roll) radians, uniform in the configured ranges."""
    return tuple(math.radians(rng.uniform(-r, r)) for r in (config.yaw_range, config.pitch_range, config.roll_range))


def _head_translation(config: BenchmarkConfig, rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08),
                     -config.head_distance * rng.uniform(0.96, 1.04)])


def _plan_head_triplets(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    _, identities = _instances(config, "head_triplets", split)
    camera = Camera.from_fov(config.size, config.head_fov)
    step = math.radians(config.triplet_step)
    specs = []
    for k in range(config.head_triplets):
        rng = instance_rng(config.seed, "head_triplets", split, k)
        identity = identities[int(rng.integers(len(identities)))]
        R_C = _rotation(*_head_pose(config, rng))
        R_L = _axis_angle_matrix(rng.normal(size=3), step) @ R_C
        R_R = slerp(torch.from_numpy(R_L), torch.from_numpy(R_C), 2.0).numpy()
        t, light, background = _head_translation(config, rng), _random_light(rng), _random_background(rng, (0.1, 0.8))
        for position, R in enumerate((R_L, R_C, R_R)):
            az, el, ti = _angles(R)
            row = {"path": f"images/{k:06d}_{position}.png", "azimuth": az, "elevation": el, "tilt": ti,
                   "category": "head", "instance": f"id{identity:05d}", "triplet": k, "position": position}
            specs.append(ViewSpec(row, ("head", identity), R, t, camera, light, background))
    return specs


def _plan_head_sequences(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    _, identities = _instances(config, "head_sequences", split)
    camera = Camera.from_fov(config.size, config.head_fov)
    n = config.head_sequences_train if split == "train" else config.head_sequences_test
    specs = []
    for k in range(n):
        rng = instance_rng(config.seed, "head_sequences", split, k)
        identity = identities[int(rng.integers(len(identities)))]
        R0 = torch.from_numpy(_rotation(*_head_pose(config, rng)))
        for _ in range(100):  # the two ends at least head_turn_min apart (the ranges allow it unless tiny)
            R1 = torch.from_numpy(_rotation(*_head_pose(config, rng)))
            if math.degrees(float(geodesic_distance(R0, R1))) >= config.head_turn_min:
                break
        else:
            raise ViewsslError(f"head sequence {k} ({split}): no end pose {config.head_turn_min:g} deg from its start "
                               f"in 100 draws; widen yaw_range / pitch_range / roll_range or lower head_turn_min")
        t, light, background = _head_translation(config, rng), _random_light(rng), _random_background(rng, (0.1, 0.8))
        name = f"head{k:04d}"
        for frame in range(config.frames):
            s = frame / max(config.frames - 1, 1)
            R = slerp(R0, R1, s).numpy()
            az, el, ti = _angles(R)
            row = {"path": f"images/{name}/{frame:03d}.png", "azimuth": az, "elevation": el, "tilt": ti,
                   "category": "head", "instance": f"id{identity:05d}", "sequence": name, "frame": frame}
            specs.append(ViewSpec(row, ("head", identity), R, t, camera, light, background))
    return specs


def _rotation(azimuth: float, elevation: float, tilt: float) -> np.ndarray:
    return angles_to_matrix(torch.tensor(azimuth, dtype=torch.float64), torch.tensor(elevation, dtype=torch.float64),
                            torch.tensor(tilt, dtype=torch.float64)).numpy()


def _plan_triplets(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    rotations = fib_rotations(config.views)
    camera = Camera.from_fov(config.size, config.object_fov)
    t = np.array([0.0, 0.0, -config.object_distance])
    step = math.radians(config.triplet_step)
    categories, instances = _instances(config, "triplets", "train")
    specs, triplet = [], 0
    for category in categories:
        for k in instances:
            rng = instance_rng(config.seed, "triplets", category, k)
            n = min(config.triplets_per_instance, config.views)
            centres = rng.choice(config.views, size=n, replace=False)
            for v in centres:
                v = int(v)
                axis = rng.normal(size=3)
                R_C = rotations[v]
                R_L = _axis_angle_matrix(axis, step) @ R_C
                R_R = slerp(torch.from_numpy(R_L), torch.from_numpy(R_C), 2.0).numpy()
                light, background = _random_light(rng), _random_background(rng)
                for position, R in enumerate((R_L, R_C, R_R)):
                    az, el, ti = _angles(R)
                    row = {"path": f"images/{triplet:06d}_{position}.png", "azimuth": az, "elevation": el,
                           "tilt": ti, "category": category, "instance": f"{category}_{k:03d}", "triplet": triplet,
                           "position": position, "view": v}
                    specs.append(ViewSpec(row, ("object", category, k), R, t, camera, light, background))
                triplet += 1
    return specs


def _plan_sequences(config: BenchmarkConfig, split: str) -> list[ViewSpec]:
    categories, instances = _instances(config, "sequences", split)
    S = config.size
    specs = []
    for category in categories:
        for k in instances:
            mesh = build_object(category, k, config.seed)
            ext = np.asarray(mesh.extents, dtype=np.float64)
            corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * ext / 2
            for j in range(config.sequences_per_instance):
                name = f"{category}_{k:03d}_{j}"
                rng = instance_rng(config.seed, "sequence", category, k, j)
                fov = rng.uniform(40, 55)
                f = (S / 2) / math.tan(math.radians(fov) / 2)
                camera = Camera(f, f, S / 2 + rng.uniform(-0.02, 0.02) * S, S / 2 + rng.uniform(-0.02, 0.02) * S, S, S)
                phi0, sweep = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(100, 200)) * rng.choice([-1, 1])
                el_mid, el_amp = math.radians(rng.uniform(15, 35)), math.radians(rng.uniform(3, 12))
                d_mid, d_amp, d_freq = rng.uniform(3.4, 4.4), rng.uniform(0.1, 0.5), rng.uniform(0.5, 1.5)
                aim0, aim1 = rng.uniform(-0.15, 0.15, 3) * (1, 0.5, 1), rng.uniform(-0.1, 0.1, 3)
                roll_amp = math.radians(rng.uniform(0, 5))
                ph = rng.uniform(0, 2 * math.pi, 4)
                light_world = np.array([rng.uniform(-1, 1), rng.uniform(0.5, 1.5), rng.uniform(-1, 1)])
                light_world /= np.linalg.norm(light_world)
                light = _random_light(rng)
                background = _random_background(rng, (0.4, 0.9))
                g = hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.7))
                ground = (f"ground/{config.seed}/{name}", float(-ext[1] / 2 - 1e-3), g, tuple(c * 0.8 for c in g))
                for frame in range(config.frames):
                    s = frame / max(config.frames - 1, 1)
                    phi = phi0 + sweep * s
                    theta = el_mid + el_amp * math.sin(2 * math.pi * s + ph[0])
                    dist = d_mid + d_amp * math.sin(2 * math.pi * d_freq * s + ph[1])
                    aim = aim0 + aim1 * math.sin(2 * math.pi * s + ph[2])
                    direction = np.array([math.cos(theta) * math.sin(phi), math.sin(theta),
                                          math.cos(theta) * math.cos(phi)])
                    R_look = look_at_rotation(torch.from_numpy(direction)).numpy()
                    roll = np.asarray(_rotation(0.0, 0.0, roll_amp * math.sin(2 * math.pi * s + ph[3])))
                    R = roll @ R_look
                    t = -R @ (aim + dist * direction)
                    normal = R[:, 1]
                    plane_point = R @ np.array([0.0, -ext[1] / 2, 0.0]) + t
                    uv = project(corners @ R.T + t, camera)
                    az, el, ti = _angles(R)
                    row = {"path": f"images/{name}/{frame:03d}.png", "azimuth": az, "elevation": el, "tilt": ti,
                           "category": category, "instance": f"{category}_{k:03d}", "sequence": name,
                           "frame": frame, "fx": camera.fx, "fy": camera.fy, "cx": camera.cx, "cy": camera.cy,
                           "box_cx": t[0], "box_cy": t[1], "box_cz": t[2], "box_sx": ext[0], "box_sy": ext[1],
                           "box_sz": ext[2], "plane_nx": normal[0], "plane_ny": normal[1], "plane_nz": normal[2],
                           "plane_d": -float(normal @ plane_point), "bbox_x0": uv[:, 0].min(),
                           "bbox_y0": uv[:, 1].min(), "bbox_x1": uv[:, 0].max(), "bbox_y1": uv[:, 1].max()}
                    row = {key: float(v) if isinstance(v, np.floating) else v for key, v in row.items()}
                    frame_light = replace(light, direction=tuple(R @ light_world))
                    specs.append(ViewSpec(row, ("object", category, k), R, t, camera, frame_light, background,
                                          ground=ground))
    return specs


_PLANNERS = {"objects": _plan_objects, "heads": _plan_heads, "triplets": _plan_triplets,
             "sequences": _plan_sequences, "head_triplets": _plan_head_triplets,
             "head_sequences": _plan_head_sequences}


# ---------------------------------------------------------------------------------------------------------------
# Streaming dataset
# ---------------------------------------------------------------------------------------------------------------
class SyntheticDataset(Dataset):
    """One split of the benchmark, rendered on the fly (map-style: item i is always the same image).

    Items are the dicts of :class:`common.data.labels.LabeledFolder` -- ``{"image": (3, S, S) float32 in [0, 1],
    "angles": (3,) float32 radians, "index", "category", "instance", "sequence", "frame"}`` -- and equal, bit for
    bit, what ``LabeledFolder`` reads back from the folder :func:`render_benchmark` writes with the same config
    (the defaults agree: ``scale="small"``, 64 px, seed 0, as ``viewssl data render``).
    ``rows`` holds the labels (radians) and ``specs`` the full render recipes (intrinsics, boxes, ...).

    The OpenGL context is created in the process that renders first, so DataLoader workers each get their own.
    """

    def __init__(self, kind: str, split: str, config: BenchmarkConfig | None = None, transform=None,
                 scale: str = "small", **overrides):
        if kind not in SPLITS:
            raise ViewsslError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        if split not in SPLITS[kind]:
            raise ViewsslError(f"{kind} has no split {split!r} (has {', '.join(SPLITS[kind])})")
        self.kind, self.split = kind, split
        self.config = config if config is not None else BenchmarkConfig.preset(scale, **overrides)
        if config is not None and overrides:
            self.config = replace(config, **overrides)
        self.transform = transform
        self.specs: list[ViewSpec] = _PLANNERS[kind](self.config, split)
        self.rows = [s.row for s in self.specs]
        self.extra_columns = EXTRA_COLUMNS[kind]
        n = len(self.rows)
        neg = np.full(n, -1, dtype=np.int64)
        written = [{c: _csv_text(r.get(c, "")) for c in ("category", "instance", "sequence", "frame")}
                   for r in self.rows]
        self.categories, self._category = _index([w["category"] for w in written]) if n else ([], neg)
        self.instances, self._instance = _index([w["instance"] for w in written]) if n else ([], neg)
        if kind in ("sequences", "head_sequences"):
            self.sequences, self._sequence = _index([w["sequence"] for w in written])
            self._frame = np.array([r["frame"] for r in self.rows], dtype=np.int64)
        else:
            self.sequences, self._sequence, self._frame = [], neg, neg
        # angles exactly as LabeledFolder reads them back from labels.csv (degrees with 6 decimals)
        self._angles = torch.tensor([[math.radians(float(f"{math.degrees(r[c]):.6f}")) for c in
                                      ("azimuth", "elevation", "tilt")] for r in self.rows],
                                    dtype=torch.float64).reshape(n, 3)

    @classmethod
    def from_root(cls, root: str | os.PathLike, kind: str, split: str, transform=None) -> "SyntheticDataset":
        """Stream the same split a rendered benchmark folder holds (configuration read from its meta.json)."""
        return cls(kind, split, config=load_config(root), transform=transform)

    def __len__(self) -> int:
        return len(self.specs)

    def mesh(self, i: int) -> TriangleMesh:
        ref = self.specs[i].mesh
        if ref[0] == "head":
            return build_head(ref[1], self.config.seed)
        return build_object(ref[1], ref[2], self.config.seed)

    def render(self, i: int, with_mask: bool = False):
        """Image i as (S, S, 3) uint8 RGB (and, with ``with_mask``, the object's (S, S) coverage in [0, 1])."""
        spec = self.specs[i]
        scenery = [_ground(*spec.ground)] if spec.ground is not None else []
        return get_renderer().render([self.mesh(i)], spec.rotation, spec.translation, spec.camera, spec.light,
                                     spec.background, supersample=self.config.supersample, scenery=scenery,
                                     with_mask=with_mask)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        image = torch.from_numpy(self.render(i)).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "angles": self._angles[i].float(),
            "index": i,
            "category": int(self._category[i]),
            "instance": int(self._instance[i]),
            "sequence": int(self._sequence[i]),
            "frame": int(self._frame[i]),
        }


def _csv_text(v) -> str:
    """A label value as ``write_labels`` writes it."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------------
# Rendering to disk
# ---------------------------------------------------------------------------------------------------------------
_ABSENT = object()


def read_meta(root: Path) -> dict | None:
    """The benchmark record ``root/meta.json`` (None when absent); an unreadable one, or one without ``config`` and
    ``kinds``, is a :class:`ViewsslError` naming it."""
    path = root / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ViewsslError(f"unreadable {META_FILE} ({e})", path) from None
    if not isinstance(meta, dict) or "config" not in meta or "kinds" not in meta:
        raise ViewsslError(f"not a synthetic benchmark {META_FILE} (missing 'config' or 'kinds')", path)
    return meta


def _encode_png(image: np.ndarray) -> bytes:
    cv2 = opencv()

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:  # pragma: no cover - cv2 always encodes uint8 images
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


_WORKER_DATASETS: dict = {}


def _write_images(task: tuple) -> int:
    """Render rows ``indices`` of (kind, split) and write their PNGs under ``folder``; runs in pool workers too."""
    config, kind, split, folder, indices = task
    ds = _WORKER_DATASETS.get((kind, split))
    if ds is None or ds.config != config:
        _WORKER_DATASETS.clear()  # one split at a time: keep memory flat
        ds = _WORKER_DATASETS[(kind, split)] = SyntheticDataset(kind, split, config=config)
    for i in indices:
        path = folder / ds.rows[i]["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode_png(ds.render(i)))
    return len(indices)


def render_benchmark(out: str | os.PathLike, kinds: Iterable[str] = KINDS, size: int = 64, seed: int = 0,
                     scale: str = "small", progress: bool = True, workers: int = 1, **overrides) -> dict:
    """Render the benchmark into ``out`` and return its summary (:func:`summarize`).

    ``kinds``: any of :data:`KINDS`; ``scale``: ``"small"`` (seconds, for the demo) or
    ``"full"`` (what experiments train on); ``workers``: processes rendering in parallel (0 = one per CPU; the
    bytes do not depend on it); ``overrides``: any :class:`BenchmarkConfig` field (tests use tiny counts). Each
    kind is written to a temporary folder and moved into place when complete; ``meta.json`` records the
    configuration and the counts. Adding a kind to an existing benchmark requires the same configuration; a kind it
    already holds (rendered by this version) is kept as it is.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ViewsslError(f"--kind must be among {', '.join(KINDS)} or all, not {', '.join(bad) or 'nothing'}")
    config = BenchmarkConfig.preset(scale, size=size, seed=seed, **overrides)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ViewsslError("exists and is not a folder", root)
    if not (root / META_FILE).is_file() and holds_other_files(root):
        # rendering replaces root/<kind>: never into a folder of someone's files (checked before the lock adds one)
        raise ViewsslError(f"holds files but no {META_FILE}, so it is not a synthetic benchmark; render into a new or "
                           "empty folder", root)
    with folder_lock(root, "benchmark render"):  # two renders into one folder would write over each other's kinds
        meta = read_meta(root)  # read under the lock: another render may have finished since
        if meta is not None and meta.get("version") != META_VERSION:
            raise ViewsslError(f"holds a benchmark written by another version of viewssl (benchmark version "
                               f"{meta.get('version')}, this one {META_VERSION}); render into an empty folder", root)
        if meta is not None and meta["config"] != config.to_json():
            saved, wanted = meta["config"], config.to_json()
            differ = [k if k in saved else f"{k} (not recorded: an older version)"
                      for k in sorted(set(saved) | set(wanted)) if saved.get(k, _ABSENT) != wanted.get(k, _ABSENT)]
            raise ViewsslError(f"holds a benchmark rendered with other settings ({', '.join(differ)} differ); render "
                               "into an empty folder", root)
        if meta is None:  # written before the first kind: a render killed at any point leaves a benchmark root
            meta = {"generator": "viewssl.synthetic", "version": META_VERSION, "seed": config.seed,
                    "size": config.size, "scale": scale, "config": config.to_json(), "convention": CONVENTION,
                    "kinds": {}}
            atomic_write_json(meta, root / META_FILE)
        done = [k for k in kinds if k in meta["kinds"] and all((root / k / split / LABELS_FILE).is_file()
                                                               for split in meta["kinds"][k]["splits"])]
        if done:  # same settings, same bytes: rendering them again would only delete and rewrite them
            log.info("%s: %s already rendered with these settings", root, ", ".join(done))
        kinds = tuple(k for k in kinds if k not in done)
        workers = (os.cpu_count() or 1) if workers == 0 else max(1, int(workers))
        pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
        try:
            for kind in kinds:
                _render_kind(root, kind, config, meta, pool, workers, progress)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return summarize(root)


def holds_other_files(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a folder with entries other than a killed render's ``.<kind>.partial`` folders and its
    ``.lock`` file (a render killed before its meta.json leaves a benchmark to render into again)."""
    root = Path(root)
    return root.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".partial") and p.is_dir())
                                 and not (p.name == ".lock" and p.is_file()) for p in root.iterdir())


def _render_kind(root: Path, kind: str, config: BenchmarkConfig, meta: dict, pool, workers: int,
                 progress: bool) -> None:
    """Render one kind into ``root/.<kind>.partial``, move it to ``root/<kind>`` and record it in meta.json."""
    tmp = root / f".{kind}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    kind_meta = {"splits": {}, "extra_columns": list(EXTRA_COLUMNS[kind])}
    for split in SPLITS[kind]:
        ds = SyntheticDataset(kind, split, config=config)
        if not len(ds):
            continue
        folder = tmp / split
        chunk = 64 if pool is None else max(8, min(256, len(ds) // (4 * workers) + 1))
        tasks = [(config, kind, split, folder, range(a, min(a + chunk, len(ds)))) for a in range(0, len(ds), chunk)]
        with tqdm(total=len(ds), desc=f"{kind}/{split}", unit="img", disable=not progress, leave=False,
                  mininterval=0.5) as bar:
            if pool is None:
                _WORKER_DATASETS[(kind, split)] = ds
                for task in tasks:
                    bar.update(_write_images(task))
            else:
                for n in pool.imap_unordered(_write_images, tasks):
                    bar.update(n)
        _WORKER_DATASETS.clear()
        write_labels(folder / LABELS_FILE, ds.rows, extra_columns=ds.extra_columns)
        info = {"images": len(ds), "categories": ds.categories, "instances": len(ds.instances)}
        if kind == "objects":
            info["fib"] = config.unseen_views if split.endswith("unseen_pose") else config.views
        if kind in ("sequences", "head_sequences"):
            info["sequences"] = len(ds.sequences)
        if kind in ("triplets", "head_triplets"):
            info["triplets"] = len(ds) // 3
        if kind != "sequences":
            cam = ds.specs[0].camera
            info["intrinsics"] = {"fx": cam.fx, "fy": cam.fy, "cx": cam.cx, "cy": cam.cy}
            info["distance"] = config.head_distance if kind.startswith("head") else config.object_distance
        kind_meta["splits"][split] = info
    final = root / kind
    if final.exists():
        shutil.rmtree(final)
    if tmp.exists():
        os.replace(tmp, final)
    meta["kinds"][kind] = kind_meta
    atomic_write_json(meta, root / META_FILE)
    log.info("rendered %s: %s", kind, ", ".join(f"{s} {v['images']}" for s, v in kind_meta["splits"].items()))


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------
def summarize(root: str | os.PathLike) -> dict:
    """Counts of a rendered benchmark: ``{"root", "seed", "size", "scale", "total_images", "kinds": {kind:
    {"splits": {split: {"images", "instances", "categories", ...}}}}}``, read from ``meta.json`` and checked
    against each split's labels.csv."""
    root = Path(root)
    meta = read_meta(root)
    if meta is None:
        raise ViewsslError(f"no {META_FILE}: not a rendered synthetic benchmark", root)
    total = 0
    kinds = {}
    for kind, info in meta["kinds"].items():
        splits = {}
        for split, s in info["splits"].items():
            csv_path = root / kind / split / LABELS_FILE
            if not csv_path.is_file():
                raise ViewsslError(f"missing (listed in {META_FILE})", csv_path)
            with open(csv_path, encoding="utf-8") as f:
                n = sum(1 for _ in f) - 1
            if n != s["images"]:
                raise ViewsslError(f"has {n} rows but {META_FILE} says {s['images']}", csv_path)
            splits[split] = dict(s)
            total += n
        kinds[kind] = {"splits": splits}
    return {"root": str(root), "seed": meta["seed"], "size": meta["size"], "scale": meta.get("scale"),
            "total_images": total, "kinds": kinds}


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s counts."""
    lines = [f"synthetic benchmark {summary['root']}  (seed {summary['seed']}, {summary['size']} px, "
             f"scale {summary['scale']}, {summary['total_images']} images)",
             f"  {'kind/split':28s} {'images':>7s} {'inst.':>6s} {'cat.':>5s}  notes"]
    for kind, info in summary["kinds"].items():
        for split, s in info["splits"].items():
            notes = []
            if "fib" in s:
                notes.append(f"Fib({s['fib']})")
            if "triplets" in s:
                notes.append(f"{s['triplets']} triplets")
            if "sequences" in s:
                notes.append(f"{s['sequences']} sequences")
            lines.append(f"  {kind + '/' + split:28s} {s['images']:7d} {s['instances']:6d} {len(s['categories']):5d}"
                         f"  {', '.join(notes)}")
    return "\n".join(lines)
