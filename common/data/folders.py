"""Image folders the way users have them on disk: plain images, ShapeNet renders, video frames; frame pairs.

Every dataset here returns the project's item dict::

    {"image": (3, S, S) float32 in [0, 1] RGB, "angles": (3,) float32 radians (NaN when unknown), "index": int,
     "category": int, "instance": int, "sequence": int, "frame": int}      # -1 where unknown

and exposes the per-item metadata as numpy arrays (``category_index``, ``instance_index``, ``sequence_index``,
``frame``), the ``paths`` (list of ``Path``), and ``angles`` ((N, 3) float32 tensor, NaN where unknown).

Bad input. A missing or empty folder, an unreadable or truncated image, an image mode that cannot be turned into RGB,
or a file that escapes the dataset folder (a symlink pointing outside it) is a :class:`ViewsslError` naming the file.
Images are read lazily, so a corrupt image fails when its item is read; :meth:`ImageItems.verify` reads every item up
front (with a progress bar). Nothing is skipped silently: ``skip_bad=True`` (opt-in) replaces a bad item by the next
readable one (item i stays a pure function of i) and counts it (``dataset.skipped``), with a log line per bad file
and the total in :meth:`verify`.

Layouts
-------
- :class:`ImageFolder`: any folder of images (a user's own data), recursive, common suffixes, natural sort order on
  the relative path, deterministic. Unlabeled: NaN angles, -1 ids.
- :class:`ShapeNetRenders`: the trajectory paper's ShapeNet renders, ``<synset>/<model_id>/<anchor>_<axis>_<k>.png``
  triplets (k = 0 left, 1 centre, 2 right; ``axis`` 0/1/2 = rotation about the object's x/y/z) and its evaluation
  renders ``<synset>/<model_id>/<view>.png``. The files do not store rotations, see the class for the optional
  ``rotations.npy`` / ``rotations.json``.
- :class:`VideoFrames`: UCF101-style frame folders ``class/group/seq/frame_%06d.jpg`` (any depth: every folder
  holding ``frame_<number>.<jpg|jpeg|png>`` files is one sequence) and SiamPose's
  ``split-k/{train,test}/class-c/group-g/seq-s/frame_%06d.jpg`` (open one ``split-k/train`` folder, or use
  ``common.data.formats.open_dataset(root, split="train")``).
- :class:`FramePairs`: SiamPose-style partner frames (same / nearby / distant / uniform) as a pure function of
  (index, uniform draw), for any dataset with per-item sequence and frame arrays (these datasets, a ``labels.csv``
  folder with ``sequence`` and ``frame`` columns, a ``torch.utils.data.Subset`` of either).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ViewsslError
from ..io import load_rgb, to_rgb_uint8, to_tensor  # noqa: F401  (re-exported: the loaders' image reader)

log = logging.getLogger("viewssl.data.folders")

__all__ = [
    "IMAGE_SUFFIXES", "natural_key", "load_rgb", "to_rgb_uint8", "to_tensor", "check_inside", "list_images",
    "ImageItems", "ImageFolder", "ShapeNetRenders", "VideoFrames", "FramePairs", "sequence_arrays",
]

#: Suffixes (lower case) that the folder scanners treat as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_NUM = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``seq-2`` before ``seq-10``."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t) for t in _NUM.split(s) if t != "")


# --------------------------------------------------------------------------------------------------------------------
# Paths (images are read by common.io.load_rgb / to_tensor)
# --------------------------------------------------------------------------------------------------------------------

def check_inside(root: Path, path: Path, what: str = "file") -> Path:
    """``path`` resolved, refusing one that escapes ``root`` (through ``..`` or a symlink)."""
    resolved = path.resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        raise ViewsslError(f"{what} escapes the dataset folder {os.fspath(root)} (points to {resolved})",
                           path) from None
    return resolved


def require_folder(root: str | os.PathLike) -> Path:
    """``root`` as a Path; a missing path or a file is a :class:`ViewsslError`."""
    root = Path(root)
    if not root.exists():
        raise ViewsslError("no such folder", root)
    if not root.is_dir():
        raise ViewsslError("not a folder", root)
    return root


def walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, in natural order of the relative path. Symlinked folders are not followed (their
    files would lie outside the dataset folder, which :func:`check_inside` refuses); each one is named in a warning."""
    out, linked = [], []

    def unreadable(e: OSError):  # os.walk would skip the folder and its images without a word
        raise ViewsslError(f"cannot read the folder ({e.strerror or e})", e.filename or root)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        linked += [Path(dirpath) / d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for f in filenames:
            if not f.startswith("."):
                out.append(Path(dirpath) / f)
    for d in linked:
        log.warning("%s: not searched, it is a symlink to a folder (%s); a dataset's files must be inside %s "
                    "(copy or bind-mount the folder there)", d, os.path.realpath(d), root)
    out.sort(key=lambda p: natural_key(p.relative_to(root).as_posix()))
    return out


def list_images(root: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files under ``root`` (recursive, by suffix, case-insensitive), naturally sorted by relative path."""
    root = require_folder(root)
    suffixes = tuple(s.lower() for s in suffixes)
    return [p for p in walk_files(root) if p.suffix.lower() in suffixes]


def _nan_angles(n: int) -> torch.Tensor:
    return torch.full((n, 3), float("nan"), dtype=torch.float32)


def _neg(n: int) -> np.ndarray:
    return np.full(n, -1, dtype=np.int64)


def _ids(values: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """String ids -> (sorted names, int index per value); None -> -1."""
    names = sorted({v for v in values if v is not None}, key=natural_key)
    lookup = {n: i for i, n in enumerate(names)}
    return names, np.array([lookup[v] if v is not None else -1 for v in values], dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------------
# Base dataset
# --------------------------------------------------------------------------------------------------------------------

class ImageItems(Dataset):
    """Base of the folder datasets: a list of files plus per-item metadata; images read lazily.

    Subclasses fill ``paths`` and the metadata arrays, and may override :meth:`load_image` (face crops) and
    :meth:`item_angles`. Per-item arrays named in ``_item_arrays`` are kept aligned when :meth:`verify` drops bad
    items under ``skip_bad``.
    """

    _item_arrays = ("category_index", "instance_index", "sequence_index", "frame")

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False):
        self.root = require_folder(root)
        self.size = size
        self.transform = transform
        self.skip_bad = bool(skip_bad)
        self.skipped = 0  # bad items replaced in __getitem__ (this process) or dropped by verify()
        self._reported: set[int] = set()
        self.paths: list[Path] = []
        self._angles = _nan_angles(0)
        self.category_index = _neg(0)
        self.instance_index = _neg(0)
        self.sequence_index = _neg(0)
        self.frame = _neg(0)
        self.categories: list[str] = []
        self.instances: list[str] = []
        self.sequences: list[str] = []

    # -- filled by subclasses ---------------------------------------------------------------------------------------
    def _set_items(self, paths: list[Path], **arrays) -> None:
        n = len(paths)
        if n == 0:
            raise ViewsslError(f"no {self.item_noun} found in this folder", self.root)
        self.paths = paths
        self._angles = _nan_angles(n)
        for name in ImageItems._item_arrays:
            value = arrays.pop(name, None)
            setattr(self, name, _neg(n) if value is None else np.asarray(value, dtype=np.int64))
        for name, value in arrays.items():
            if len(value) != n:
                raise AssertionError(f"{name}: {len(value)} entries for {n} items")
            setattr(self, name, value)

    item_noun = "images"

    @property
    def angles(self) -> torch.Tensor:
        """(N, 3) float32 radians (azimuth, elevation, tilt); NaN where unknown."""
        return self._angles

    @angles.setter
    def angles(self, value: torch.Tensor) -> None:
        self._angles = value

    def load_image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of item i (the crop for face datasets)."""
        return load_rgb(self.paths[i])

    # -- dataset protocol -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def _item(self, i: int) -> dict:
        image = to_tensor(self.load_image(i), self.size)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "angles": self._angles[i].clone(),
            "index": i,
            "category": int(self.category_index[i]),
            "instance": int(self.instance_index[i]),
            "sequence": int(self.sequence_index[i]),
            "frame": int(self.frame[i]),
        }

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        if not self.skip_bad:
            return self._item(i)
        first_error = None
        for k in range(n):
            j = (i + k) % n
            try:
                item = self._item(j)
            except ViewsslError as e:
                first_error = first_error or e
                if j not in self._reported:
                    self._reported.add(j)
                    self.skipped += 1
                    log.warning("skipping bad item %d (skip_bad=True, %d skipped so far in this process): %s",
                                j, self.skipped, e)
                continue
            if k:
                item["index"] = j
            return item
        raise ViewsslError(f"every item is bad (first: {first_error})", self.root)

    def verify(self, progress: bool = True) -> list[tuple[int, str]]:
        """Read every item once (tqdm bar). Returns the list of (index, message) of bad items.

        Without ``skip_bad`` the first bad item raises a :class:`ViewsslError` naming its file (and how many more are
        bad); with ``skip_bad`` the bad items are dropped from the dataset (indices shift), counted in
        ``self.skipped`` and logged.
        """
        from tqdm import tqdm

        bad: list[tuple[int, str]] = []
        for i in tqdm(range(len(self)), desc=f"verify {self.root.name}", unit="img", disable=not progress,
                      leave=False):
            try:
                self._item(i)
            except ViewsslError as e:
                bad.append((i, str(e)))
        if not bad:
            log.info("verified %d items in %s: all readable", len(self), self.root)
            return bad
        if not self.skip_bad:
            more = f" (and {len(bad) - 1} more bad files; pass skip_bad=True to skip them)" if len(bad) > 1 else ""
            raise ViewsslError(bad[0][1] + more)
        self._drop([i for i, _ in bad])
        self.skipped += len(bad)
        log.warning("skipped %d bad of %d items in %s (skip_bad=True); first: %s", len(bad), len(bad) + len(self),
                    self.root, bad[0][1])
        return bad

    def _drop(self, indices: Sequence[int]) -> None:
        keep = np.ones(len(self), dtype=bool)
        keep[list(indices)] = False
        if not keep.any():
            raise ViewsslError("every item is bad", self.root)
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self._angles = self._angles[torch.from_numpy(keep)]
        for name in self._item_arrays:
            value = getattr(self, name, None)
            if value is None:
                continue
            if isinstance(value, np.ndarray):
                setattr(self, name, value[keep])
            elif isinstance(value, torch.Tensor):
                setattr(self, name, value[torch.from_numpy(keep)])
            else:
                setattr(self, name, [v for v, k in zip(value, keep) if k])
        self._reported.clear()


# --------------------------------------------------------------------------------------------------------------------
# Plain image folder
# --------------------------------------------------------------------------------------------------------------------

class ImageFolder(ImageItems):
    """Every image under ``root`` (recursive; suffixes :data:`IMAGE_SUFFIXES`), natural order of the relative path.

    Unlabeled: angles are NaN, ids -1. A symlink that leads outside ``root`` is an error (or, with ``skip_bad``, left
    out and counted).
    """

    kind = "images"

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False,
                 suffixes: Sequence[str] = IMAGE_SUFFIXES):
        super().__init__(root, size, transform, skip_bad)
        paths = _inside_only(self.root, list_images(self.root, suffixes), self.skip_bad, self)
        if not paths:
            what = "files" if not any(self.root.iterdir()) else f"image files ({', '.join(suffixes)})"
            raise ViewsslError(f"folder is empty: no {what}", self.root)
        self._set_items(paths)


def _inside_only(root: Path, paths: list[Path], skip_bad: bool, owner: ImageItems | None = None) -> list[Path]:
    """Paths that stay inside root; one that escapes raises, or is dropped and counted under skip_bad."""
    out, dropped = [], 0
    for p in paths:
        try:
            check_inside(root, p, "image")
        except ViewsslError as e:
            if not skip_bad:
                raise
            dropped += 1
            log.warning("skipping (skip_bad=True): %s", e)
            continue
        out.append(p)
    if dropped:
        log.warning("skipped %d files that escape %s (skip_bad=True)", dropped, root)
        if owner is not None:
            owner.skipped += dropped
    return out


# --------------------------------------------------------------------------------------------------------------------
# ShapeNet renders of the trajectory paper
# --------------------------------------------------------------------------------------------------------------------

TRIPLET_NAME = re.compile(r"^(\d+)_([012])_([012])\.png$", re.IGNORECASE)
VIEW_NAME = re.compile(r"^(\d+)\.png$", re.IGNORECASE)
ROTATIONS_NPY = "rotations.npy"
ROTATIONS_JSON = "rotations.json"


class ShapeNetRenders(ImageItems):
    """ShapeNet renders in the trajectory paper's layout (``<synset>/<model_id>/...png`` under ``root``).

    Two file-name patterns, both accepted in one folder:

    - triplets ``<anchor>_<axis>_<k>.png``: the anchor rotation (one of the Fib(50) / super-Fibonacci samples), the
      axis (0/1/2 = the object's x/y/z) of the +-20 deg step, k = 0 left, 1 centre, 2 right;
    - evaluation views ``<view>.png``: the view number in the Fib(n) set.

    Item ids: ``category`` = synset folder (sorted), ``instance`` = model folder (``synset/model``, sorted),
    ``sequence`` = ``frame`` = -1. Extra per-item arrays: ``view`` (anchor or view number), ``axis`` (-1 for views),
    ``position`` (k; -1 for views), ``triplet_index`` (one id per (model, anchor, axis), -1 for views);
    :meth:`triplets` returns the (T, 3) item indices of the complete (left, centre, right) triplets.

    Angles. The layout does not store rotations, so angles are NaN unless ``root`` holds one of:

    - ``rotations.json``: ``{"<synset>/<model>/<file>.png": R}`` per image, R either a 3x3 object->camera matrix
      in the viewssl convention (nested lists) or ``[azimuth, elevation, tilt]`` in degrees;
    - ``rotations.npy``: (V, 3, 3) float matrices (viewssl convention) indexed by the view number, used for the
      ``<view>.png`` images and for the centre (k = 1) image of a triplet (its anchor); the left / right images of
      a triplet keep NaN angles (their +-20 deg steps are in the renderer's own frame, not stored).

    Both files are read without pickle; a key that escapes ``root`` or an unknown image is an error naming the file.
    """

    kind = "shapenet"

    _item_arrays = ImageItems._item_arrays + ("view", "axis", "position", "triplet_index")
    item_noun = "ShapeNet renders (<synset>/<model>/<anchor>_<axis>_<k>.png or <view>.png)"

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False):
        super().__init__(root, size, transform, skip_bad)
        paths, synsets, models, view, axis, position, trip, ignored = [], [], [], [], [], [], [], []
        for p in _inside_only(self.root, list_images(self.root, (".png",)), self.skip_bad, self):
            rel = p.relative_to(self.root)
            m = TRIPLET_NAME.match(rel.name)
            v = VIEW_NAME.match(rel.name)
            if len(rel.parts) != 3 or not (m or v):
                ignored.append(rel)
                continue
            paths.append(p)
            synsets.append(rel.parts[0])
            models.append(f"{rel.parts[0]}/{rel.parts[1]}")
            if m:
                view.append(int(m.group(1)))
                axis.append(int(m.group(2)))
                position.append(int(m.group(3)))
                trip.append(f"{rel.parts[0]}/{rel.parts[1]}/{m.group(1)}_{m.group(2)}")
            else:
                view.append(int(v.group(1)))
                axis.append(-1)
                position.append(-1)
                trip.append(None)
        if not paths:
            raise ViewsslError(f"no {self.item_noun} found", self.root)
        _log_ignored(self.root, ignored, "<synset>/<model>/<anchor>_<axis>_<k>.png or <view>.png")
        self.categories, cat = _ids(synsets)
        self.instances, inst = _ids(models)
        self.triplet_names, trip_idx = _ids(trip)
        self._set_items(paths, category_index=cat, instance_index=inst, view=np.array(view, dtype=np.int64),
                        axis=np.array(axis, dtype=np.int64), position=np.array(position, dtype=np.int64),
                        triplet_index=trip_idx)
        self._read_rotations()

    def triplets(self) -> np.ndarray:
        """(T, 3) item indices (left, centre, right) of every complete triplet, in triplet-id order."""
        rows = np.full((len(self.triplet_names), 3), -1, dtype=np.int64)
        sel = np.nonzero(self.triplet_index >= 0)[0]
        rows[self.triplet_index[sel], self.position[sel]] = sel
        return rows[(rows >= 0).all(1)]

    def _read_rotations(self) -> None:
        from ..geometry import angles_to_matrix, matrix_to_angles

        npy, js = self.root / ROTATIONS_NPY, self.root / ROTATIONS_JSON
        if npy.is_file():
            try:
                mats = np.load(npy, allow_pickle=False)
            except Exception as e:
                raise ViewsslError(f"not a readable .npy array ({type(e).__name__}: {e})", npy) from None
            if mats.ndim != 3 or mats.shape[1:] != (3, 3) or not np.issubdtype(mats.dtype, np.floating):
                raise ViewsslError(f"expected a float (V, 3, 3) array of rotation matrices, got {mats.dtype} "
                                   f"{tuple(mats.shape)}", npy)
            use = (self.position == 1) | (self.position == -1)
            too_big = use & (self.view >= len(mats))
            if too_big.any():
                i = int(np.nonzero(too_big)[0][0])
                raise ViewsslError(f"has {len(mats)} rotations but {self.paths[i].relative_to(self.root)} needs view "
                                   f"{self.view[i]}", npy)
            for v, mat in enumerate(mats):
                problem = _not_a_rotation(mat)
                if problem:
                    raise ViewsslError(f"rotation {v} {problem}", npy)
            sel = np.nonzero(use)[0]
            az, el, ti = matrix_to_angles(torch.from_numpy(mats[self.view[sel]]).double())
            self._angles[torch.from_numpy(sel)] = torch.stack([az, el, ti], -1).float()
            log.info("%s: angles from %s for %d of %d images", self.root, npy.name, len(sel), len(self))
        if js.is_file():
            try:
                table = json.loads(js.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ViewsslError(f"not valid JSON ({e})", js) from None
            if not isinstance(table, dict):
                raise ViewsslError("expected a JSON object {\"<synset>/<model>/<file>.png\": rotation}", js)
            index = {p.relative_to(self.root).as_posix(): i for i, p in enumerate(self.paths)}
            for key, value in table.items():
                target = self.root / key
                if Path(key).is_absolute():
                    raise ViewsslError(f"key {key!r} is absolute; keys are paths relative to the folder", js)
                try:
                    target.resolve().relative_to(self.root.resolve())
                except ValueError:
                    raise ViewsslError(f"key {key!r} escapes the dataset folder", js) from None
                i = index.get(Path(key).as_posix())
                if i is None:
                    raise ViewsslError(f"key {key!r} is not a render in this folder", js)
                arr = np.asarray(value, dtype=np.float64) if _is_numeric(value) else None
                if arr is not None and arr.shape == (3, 3):
                    problem = _not_a_rotation(arr)
                    if problem:
                        raise ViewsslError(f"key {key!r}: the matrix {problem}", js)
                    a = matrix_to_angles(torch.from_numpy(arr))
                    self._angles[i] = torch.stack(a).float()
                elif arr is not None and arr.shape == (3,):
                    rad = torch.from_numpy(np.radians(arr))
                    a = matrix_to_angles(angles_to_matrix(rad[0], rad[1], rad[2]))
                    self._angles[i] = torch.stack(a).float()
                else:
                    raise ViewsslError(f"key {key!r}: expected a 3x3 matrix or [azimuth, elevation, tilt] in degrees",
                                       js)
            log.info("%s: angles from %s for %d images", self.root, js.name, len(table))


def _not_a_rotation(m: np.ndarray, tol: float = 1e-4) -> str | None:
    """Why the (3, 3) ``m`` is not a rotation matrix, or None (a reflection, e.g. an OpenCV / OpenGL axis mix-up, or a
    scaled matrix would otherwise turn into plausible angles)."""
    m = np.asarray(m, dtype=np.float64)
    if not np.isfinite(m).all():
        return "has non-finite entries"
    if np.abs(m.T @ m - np.eye(3)).max() > tol:
        return f"is not orthonormal (max |R^T R - I| = {np.abs(m.T @ m - np.eye(3)).max():.3g})"
    if np.linalg.det(m) < 0:
        return "is a reflection (determinant -1), not a rotation"
    return None


def _log_ignored(root: Path, ignored: list[Path], pattern: str) -> None:
    """Images that do not fit the layout are left out, with a count in the log (never silently)."""
    if ignored:
        log.warning("%s: left out %d images that do not match %s (first: %s)", root, len(ignored), pattern,
                    ignored[0].as_posix())


def _is_numeric(value) -> bool:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(arr).all())


# --------------------------------------------------------------------------------------------------------------------
# Video frame folders
# --------------------------------------------------------------------------------------------------------------------

FRAME_NAME = re.compile(r"^frame_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


class VideoFrames(ImageItems):
    """Frames of videos: every folder holding ``frame_<number>.<jpg|jpeg|png>`` files is one sequence.

    ``class/group/seq/frame_%06d.jpg`` (UCF101 as SiamPose extracts it, inside one ``split-k/train`` folder) gives
    ``category`` = class folder, ``instance`` = ``class/group`` folder, ``sequence`` = the sequence folder,
    ``frame`` = the number in the file name. Shallower layouts work too: ``class/video/frame_*.jpg`` (category =
    class, instance -1), ``video/frame_*.jpg`` (category -1). Angles are NaN. Ids are indices in the natural sort order
    of the folder names.
    """

    kind = "video"

    item_noun = "video frames (folders of frame_<number>.jpg)"

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False):
        super().__init__(root, size, transform, skip_bad)
        paths, cats, insts, seqs, frames, ignored = [], [], [], [], [], []
        for p in _inside_only(self.root, list_images(self.root, (".jpg", ".jpeg", ".png")), self.skip_bad, self):
            m = FRAME_NAME.match(p.name)
            if not m:
                ignored.append(p.relative_to(self.root))
                continue
            rel = p.relative_to(self.root)
            folders = rel.parts[:-1]
            paths.append(p)
            frames.append(int(m.group(1)))
            seqs.append("/".join(folders) if folders else ".")
            cats.append(folders[0] if len(folders) >= 2 else None)
            insts.append("/".join(folders[:2]) if len(folders) >= 3 else None)
        if not paths:
            raise ViewsslError(f"no {self.item_noun} found", self.root)
        _log_ignored(self.root, ignored, "frame_<number>.<jpg|jpeg|png>")
        self.categories, cat = _ids(cats)
        self.instances, inst = _ids(insts)
        self.sequences, seq = _ids(seqs)
        order = np.lexsort((np.array(frames), seq))  # sequence by sequence, frames in order
        self._set_items([paths[k] for k in order], category_index=cat[order], instance_index=inst[order],
                        sequence_index=seq[order], frame=np.array(frames, dtype=np.int64)[order])


# --------------------------------------------------------------------------------------------------------------------
# Frame pairs (SiamPose)
# --------------------------------------------------------------------------------------------------------------------

def sequence_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, frame) int arrays, one entry per item of ``dataset``.

    Looks for ``dataset.sequence_index`` / ``dataset.frame`` (the datasets of this package), then
    ``dataset.table.sequence_index`` / ``dataset.table.frame`` (a ``labels.csv`` folder), and maps through
    ``torch.utils.data.Subset``. A dataset without them is a :class:`ViewsslError`.
    """
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        seq, frame = sequence_arrays(dataset.dataset)
        idx = np.asarray(dataset.indices, dtype=np.int64)
        return seq[idx], frame[idx]
    for holder in (dataset, getattr(dataset, "table", None)):
        if holder is None:
            continue
        seq, frame = getattr(holder, "sequence_index", None), getattr(holder, "frame", None)
        if seq is not None and frame is not None and not callable(frame):
            seq, frame = np.asarray(seq, dtype=np.int64), np.asarray(frame, dtype=np.int64)
            if len(seq) != len(frame):
                break
            return seq, frame
    where = getattr(getattr(dataset, "table", None), "csv_path", None) or getattr(dataset, "root", None)
    raise ViewsslError("this dataset has no per-item sequence and frame (a labels.csv needs 'sequence' and 'frame' "
                       "columns)", where)


PAIR_MODES = ("same", "nearby", "distant", "uniform")


class FramePairs:
    """Partner frames for SiamPose-style pairs, as a pure function of (index, uniform draw u in [0, 1)).

    Frames of a sequence are ranked by their frame number (then index), and offsets count ranks, so a subsampled
    stream (every 5th frame kept) pairs kept frames. Modes:

    - ``same``: the frame itself (the two views differ only by augmentation; SiamPose's no-video control);
    - ``nearby``: uniform over the frames 1..``max_offset`` ranks before or after (SiamPose's ``next`` is
      offset +1);
    - ``distant``: uniform over the frames more than ``max_offset`` ranks away; when the sequence has none, uniform
      over the other frames;
    - ``uniform``: uniform over every other frame of the sequence (SiamPose's ``uniform``).

    A frame alone in its sequence, or with an unknown sequence (-1), is its own partner. The randomness stays with
    the caller (draw u in the main process with the global torch RNG): ``partner_index(i, u)``,
    ``partner_indices(idx, u)`` for arrays, ``partner(i, rng)`` with a ``torch.Generator`` or an int seed.
    """

    def __init__(self, dataset, mode: str = "nearby", max_offset: int = 2):
        if mode not in PAIR_MODES:
            raise ViewsslError(f"pair mode {mode!r}: expected one of {', '.join(PAIR_MODES)}")
        if max_offset < 1:
            raise ViewsslError(f"max_offset must be >= 1, got {max_offset}")
        self.dataset = dataset
        self.mode = mode
        self.max_offset = int(max_offset)
        seq, frame = sequence_arrays(dataset)
        n = len(seq)
        self.sequence = seq
        order = np.lexsort((np.arange(n), frame, seq))
        sorted_seq = seq[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_seq))[0] + 1] if n else np.zeros(0, dtype=np.int64)
        lengths = np.diff(np.r_[starts, n])
        group = np.repeat(np.arange(len(starts)), lengths)
        self._order = order                                   # item indices grouped by sequence, in frame order
        self._start = np.empty(n, dtype=np.int64)             # per item: where its sequence starts in _order
        self._length = np.empty(n, dtype=np.int64)            # per item: frames in its sequence
        self._rank = np.empty(n, dtype=np.int64)              # per item: its rank in the sequence
        self._start[order] = starts[group]
        self._length[order] = lengths[group]
        self._rank[order] = np.arange(n) - starts[group]
        unknown = seq < 0
        self._length[unknown] = 1                              # unknown sequence: its own partner
        self._start[unknown] = 0
        self._rank[unknown] = 0
        self._self_only = unknown
        if unknown.any():
            log.warning("FramePairs: %d of %d items have no sequence; they pair with themselves", int(unknown.sum()), n)

    def __len__(self) -> int:
        return len(self.sequence)

    def partner_indices(self, indices, u) -> np.ndarray:
        """Vectorised :meth:`partner_index`: ``indices`` and ``u`` broadcast; returns int64 item indices."""
        idx = np.asarray(indices, dtype=np.int64)
        u = np.clip(np.asarray(u, dtype=np.float64), 0.0, np.nextafter(1.0, 0.0))
        idx, u = np.broadcast_arrays(idx, u)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items")
        n, r, k = self._length[idx], self._rank[idx], self.max_offset
        if self.mode == "same":
            return idx.copy()
        if self.mode == "nearby":
            lo, hi = np.maximum(r - k, 0), np.minimum(r + k, n - 1)
            count = hi - lo                                     # candidates lo..hi without r
            j = np.floor(u * count).astype(np.int64)
            rank = lo + j
            rank = rank + (rank >= r)
        else:
            if self.mode == "distant":
                before = np.maximum(r - k, 0)                   # ranks 0 .. r-k-1
                after = np.maximum(n - 1 - (r + k), 0)          # ranks r+k+1 .. n-1
                count = before + after
                j = np.floor(u * count).astype(np.int64)
                rank = np.where(j < before, j, r + k + 1 + (j - before))
                fallback = count == 0
            else:
                fallback = np.ones(idx.shape, dtype=bool)
                rank = r
            # uniform over the other frames (mode "uniform", or "distant" without distant frames)
            j2 = np.floor(u * (n - 1)).astype(np.int64)
            rank = np.where(fallback, j2 + (j2 >= r), rank)
        alone = (n <= 1) | self._self_only[idx]
        out = self._order[np.clip(self._start[idx] + rank, 0, len(self) - 1)]
        return np.where(alone, idx, out)

    def partner_index(self, i: int, u: float) -> int:
        """The partner of item ``i`` for a uniform draw ``u`` in [0, 1) (a pure function of both)."""
        return int(self.partner_indices(np.array([i]), np.array([u]))[0])

    def partner(self, i: int, rng: torch.Generator | int) -> int:
        """The partner of item ``i`` with ``u`` drawn from ``rng`` (a ``torch.Generator``, or an int seed)."""
        if not isinstance(rng, torch.Generator):
            seed = int(rng)
            rng = torch.Generator()
            rng.manual_seed(seed)
        u = float(torch.rand((), generator=rng))
        return self.partner_index(i, u)

    def pair(self, i: int, u: float) -> tuple[dict, dict]:
        """The two items (i, partner) read from the dataset."""
        return self.dataset[int(i)], self.dataset[self.partner_index(i, u)]
