"""One entry point that opens any dataset folder the project supports: :func:`open_dataset`.

Kinds (``kind=`` names; ``-`` and ``_`` are ignored, case-insensitive):

=============  =====================================================================  ===========================
kind           layout                                                                 class
=============  =====================================================================  ===========================
``labels``     ``labels.csv`` + images (the project's format; synthetic benchmark
               splits)                                                                :class:`CheckedLabeledFolder`
``biwi``       ``[hpdb/]NN/frame_XXXXX_rgb.png`` + ``_pose.txt`` + ``NN/rgb.cal``     :class:`~.faces.BIWI`
``aflw2000``   flat folder of ``name.jpg`` + ``name.mat`` (``Pose_Para``)             :class:`~.faces.AFLW2000`
``300w-lp``    ``name.jpg`` + ``name.mat`` pairs in sub-folders (``AFW/``,
               ``HELEN/``, ...)                                                       :class:`~.faces.W300LP`
``shapenet``   ``<synset>/<model>/<anchor>_<axis>_<k>.png`` or
               ``<synset8>/<model>/<view>.png``                                       :class:`~.folders.ShapeNetRenders`
``objectron``  ``videos/<class>/batch-<i>/<j>/video.MOV`` +
               ``annotations/<class>/batch-<i>/<j>.pbdata``                           :class:`~.objectron.Objectron`
``video``      folders of ``frame_<number>.jpg`` (UCF101 ``class/group/seq/``)        :class:`~.folders.VideoFrames`
``images``     any image files, recursive (unlabeled)                                 :class:`~.folders.ImageFolder`
=============  =====================================================================  ===========================

Detection (``kind=None``) tries the rules in that order on the folder (after ``split`` is applied) and takes the first
that matches:

1. ``labels.csv`` in the folder -> ``labels``.
2. ``rgb.cal`` in the folder, or in a sub-folder of it or of ``hpdb/`` -> ``biwi``; ``annotations/*/*/*.pbdata``
   and ``videos/`` -> ``objectron`` (whose ``split`` is its ``index/<class>_annotations_<split>`` lists).
3. image files with a ``.mat`` of the same name: directly in the folder -> ``aflw2000``; only deeper -> ``300w-lp``.
4. every ``.png`` two levels deep named ``<n>_<0-2>_<0-2>.png``, or ``<n>.png`` under 8-digit synset folders ->
   ``shapenet``.
5. files named ``frame_<number>.<jpg|jpeg|png>`` -> ``video``.
6. any image file -> ``images``.

Before rules 3-6, a folder whose sub-folders are splits (``train/labels.csv``, ``val/...``, or SiamPose's
``split-k/{train,test}``) asks for ``split``. ``split`` opens ``root/split``, or ``root/split-k/split`` when exactly
one ``split-k`` folder has it (SiamPose/UCF101); ``split-1/train`` style values work directly.
A folder that matches nothing is a one-line :class:`ViewsslError` that says what was looked for.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ViewsslError
from .faces import AFLW2000, BIWI, W300LP, biwi_sessions
from .folders import (FRAME_NAME, IMAGE_SUFFIXES, TRIPLET_NAME, VIEW_NAME, ImageFolder, ShapeNetRenders,
                      VideoFrames, natural_key, require_folder, walk_files)
from .labels import LABELS_FILE, LabeledFolder
from .objectron import Objectron, is_objectron

log = logging.getLogger("viewssl.data.formats")

__all__ = ["KINDS", "open_dataset", "detect_format", "resolve_split", "CheckedLabeledFolder", "export_labels"]


class CheckedLabeledFolder(LabeledFolder):
    """:class:`LabeledFolder` with the loaders' bad-input behaviour: opt-in ``skip_bad`` (a bad image is replaced
    by the next readable one and counted in ``skipped``), and :meth:`verify`."""

    kind = "labels"

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None, skip_bad: bool = False):
        super().__init__(root, size=size, transform=transform)
        self.root = self.table.root
        self.skip_bad = bool(skip_bad)
        self.skipped = 0
        self._reported: set[int] = set()
        self.sequence_index = self._sequence
        self.frame = self._frame
        self.category_index = self._category
        self.instance_index = self._instance

    @property
    def paths(self):
        return self.table.paths

    @property
    def angles(self):
        return self.table.angles.float()

    def _item(self, i: int) -> dict:
        return LabeledFolder.__getitem__(self, i)

    # the skip / verify logic of the folder datasets, shared by delegation
    def __getitem__(self, i: int) -> dict:
        from .folders import ImageItems

        return ImageItems.__getitem__(self, i)

    def verify(self, progress: bool = True):
        from .folders import ImageItems

        return ImageItems.verify(self, progress)

    def _drop(self, indices) -> None:
        keep = np.ones(len(self), dtype=bool)
        keep[list(indices)] = False
        if not keep.any():
            raise ViewsslError("every item is bad", self.root)
        t = self.table
        t.paths = [p for p, k in zip(t.paths, keep) if k]
        t.angles = t.angles[keep]
        t.raw = {c: [v for v, k in zip(vals, keep) if k] for c, vals in t.raw.items()}
        for name in ("category_index", "instance_index", "sequence_index", "frame"):
            if getattr(t, name) is not None:
                setattr(t, name, getattr(t, name)[keep])
        for name in ("_category", "_instance", "_sequence", "_frame"):
            setattr(self, name, getattr(self, name)[keep])
        self.sequence_index, self.frame = self._sequence, self._frame
        self.category_index, self.instance_index = self._category, self._instance
        self._reported.clear()


#: kind name -> dataset class (called as ``cls(path, size=size, **kwargs)``); the order is the detection order.
KINDS: dict[str, type] = {
    "labels": CheckedLabeledFolder,
    "biwi": BIWI,
    "aflw2000": AFLW2000,
    "300w-lp": W300LP,
    "shapenet": ShapeNetRenders,
    "objectron": Objectron,
    "video": VideoFrames,
    "images": ImageFolder,
}

_ALIASES = {re.sub(r"[-_ ]", "", k): k for k in KINDS}
_ALIASES.update({"300wlp": "300w-lp", "w300lp": "300w-lp", "aflw": "aflw2000", "aflw20003d": "aflw2000",
                 "labelscsv": "labels", "ucf101": "video", "frames": "video", "imagefolder": "images",
                 "folder": "images", "plain": "images"})


def _kind_name(kind: str) -> str:
    key = re.sub(r"[-_ ]", "", str(kind).lower())
    if key not in _ALIASES:
        raise ViewsslError(f"unknown dataset kind {kind!r}: expected one of {', '.join(KINDS)}")
    return _ALIASES[key]


def _split_folders(root: Path) -> list[str]:
    """Sub-folders that look like splits: holding labels.csv, named train / test / val / valid (as in SiamPose's
    split-k folders), or SiamPose's split-k/{train,test}."""
    out = []
    for d in sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
        if (d / LABELS_FILE).is_file() or d.name in ("train", "test", "val", "valid"):
            out.append(d.name)
        elif re.fullmatch(r"split-?\d+", d.name):
            out += [f"{d.name}/{s.name}" for s in sorted(d.iterdir(), key=lambda s: natural_key(s.name))
                    if s.is_dir() and s.name in ("train", "test", "val", "valid")]
    return out


def resolve_split(root: str | os.PathLike, split: str | None) -> Path:
    """The folder to open for ``split`` (see the module doc); ``split=None`` returns ``root``."""
    root = require_folder(root)
    if split is None:
        return root
    split = str(split).strip("/")
    if Path(split).is_absolute() or ".." in Path(split).parts:
        raise ViewsslError(f"split {split!r} must be a folder name inside the dataset", root)
    direct = root / split
    if direct.is_dir():
        return direct
    nested = [d / split for d in sorted(root.iterdir(), key=lambda d: natural_key(d.name))
              if d.is_dir() and re.fullmatch(r"split-?\d+", d.name) and (d / split).is_dir()]
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        names = ", ".join(f"{d.parent.name}/{split}" for d in nested)
        raise ViewsslError(f"split {split!r} is ambiguous: {names}; pass one of them as split", root)
    found = _split_folders(root)
    hint = f" (splits here: {', '.join(found)})" if found else ""
    raise ViewsslError(f"no split {split!r} in this folder{hint}", root)


def detect_format(path: str | os.PathLike) -> str:
    """The kind of dataset in ``path`` (rules in the module doc); a folder that matches none is a ViewsslError."""
    root = require_folder(path)
    if (root / LABELS_FILE).is_file():
        return "labels"
    if biwi_sessions(root):
        return "biwi"
    if is_objectron(root):
        return "objectron"
    splits = _split_folders(root)
    if splits:
        raise ViewsslError(f"this folder holds splits ({', '.join(splits)}); pass split= (e.g. split={splits[0]!r})",
                           root)
    files = walk_files(root)
    if not files:
        linked = sorted(d.name for d in root.iterdir() if d.is_symlink() and d.is_dir())
        raise ViewsslError("folder is empty" + (f" (symlinked folders are not followed: {', '.join(linked)})"
                                                if linked else ""), root)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    names = {p for p in files}
    paired = [p for p in images if p.with_suffix(".mat") in names]
    if paired:
        return "aflw2000" if any(p.parent == root for p in paired) else "300w-lp"
    if images:
        rels = [p.relative_to(root) for p in images]
        pngs = [r for r in rels if r.suffix.lower() == ".png"]
        if pngs and len(pngs) == len(rels) and all(len(r.parts) == 3 for r in rels):
            if all(TRIPLET_NAME.match(r.name) for r in rels):
                return "shapenet"
            if all(TRIPLET_NAME.match(r.name) or (VIEW_NAME.match(r.name) and re.fullmatch(r"\d{8}", r.parts[0]))
                   for r in rels):
                return "shapenet"
        if any(FRAME_NAME.match(p.name) for p in images):
            return "video"
    if images:
        return "images"
    raise ViewsslError(
        "not a dataset folder: looked for labels.csv, BIWI (rgb.cal + frame_XXXXX_rgb.png), Objectron "
        "(annotations/*/*/*.pbdata + videos/), 300W-LP/AFLW2000 "
        f"(.jpg + .mat pairs), ShapeNet renders, video frames (frame_N.jpg) and image files "
        f"({', '.join(IMAGE_SUFFIXES)}); found {len(files)} other files", root)


def open_dataset(path: str | os.PathLike, size: int | None = 64, split: str | None = None, kind: str | None = None,
                 **kwargs):
    """Open a dataset folder as a torch Dataset of the project's item dicts.

    ``path``: the folder. ``size``: images are (3, size, size) (face datasets: the face crop resized).
    ``split``: a sub-folder to open (``train``, ``test``, ``split-1/train``; see :func:`resolve_split`).
    ``kind``: one of :data:`KINDS` (skips detection). Further keyword arguments go to the dataset class
    (``transform``, ``skip_bad``, and e.g. ``detector`` / ``angles`` for BIWI, ``angles`` for 300W-LP / AFLW2000).
    """
    if split is not None and (_kind_name(kind) == "objectron" if kind is not None else is_objectron(Path(path))):
        root, name = require_folder(path), "objectron"  # Objectron's splits are index lists, not folders
        kwargs = {**kwargs, "subset": str(split)}
    else:
        root = resolve_split(path, split)
        name = detect_format(root) if kind is None else _kind_name(kind)
    cls = KINDS[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        takes = ", ".join(p for p in accepted if p not in ("self", "root", "size"))
        raise ViewsslError(f"{name} dataset: unknown option(s) {', '.join(unknown)} (takes: {takes})", root)
    dataset = cls(root, size=size, **kwargs)
    log.info("opened %s as %s: %d items", root, name, len(dataset))
    return dataset


def export_labels(dataset, out: str | os.PathLike, progress: bool = True) -> Path:
    """Write every item of a labelled dataset as ``out/images/<index>.png`` + ``out/labels.csv`` (angles, and the
    category / instance / sequence / frame ids where known), so slow crops (BIWI's detector, 300W-LP's .mat reads)
    are computed once and later runs open a plain ``labels.csv`` folder. Category, instance and sequence are written
    as the dataset's names for them (a split exported alone means the same as another), the frame as its number.
    A dataset without viewpoints (UCF101's frames) is written with blank angle cells; one that has angles for some
    items and not for others is an error naming the first item that differs. Returns ``out``."""
    from tqdm import tqdm

    from ..io import write_image
    from .labels import write_labels

    out = Path(out)
    if (out / LABELS_FILE).exists():
        raise ViewsslError(f"already holds a {LABELS_FILE}; choose an empty folder", out)
    if getattr(dataset, "skip_bad", False):
        # drop the bad items first: read lazily, a bad item is replaced by another one, which would be written twice
        dataset.verify(progress=progress)
    rows = []
    width = max(6, len(str(len(dataset))))
    categories, instances, sequences = (list(getattr(dataset, f, None) or []) for f in
                                        ("categories", "instances", "sequences"))
    extra = dataset.extra_columns() if hasattr(dataset, "extra_columns") else {}  # e.g. Objectron's box geometry
    first_has = None  # whether item 0 has a viewpoint: every other item must agree
    for i in tqdm(range(len(dataset)), desc=f"export {out.name}", unit="img", disable=not progress):
        item = dataset[i]
        angles = item["angles"]
        finite = np.isfinite(angles.numpy())
        has = bool(finite.all())
        first_has = has if first_has is None else first_has
        if has != first_has or (finite.any() and not has):
            where = getattr(dataset, "paths", None)
            what = "some but not all of its angles" if finite.any() and not has else \
                f"{'a' if has else 'no'} viewpoint and item 0 {'does not' if has else 'has one'}"
            raise ViewsslError(f"item {i} has {what}; a {LABELS_FILE} has a viewpoint on every row or on none",
                               where[i] if where is not None else None)
        rel = f"images/{int(item['index']):0{width}d}.png"
        write_image(out / rel, item["image"])
        row = {"path": rel, "azimuth": float(angles[0]), "elevation": float(angles[1]), "tilt": float(angles[2])}
        for key, names in (("category", categories), ("instance", instances), ("sequence", sequences),
                           ("frame", [])):
            index = int(item[key])
            # names, not the dataset's own indices: two splits exported apart must agree on what "car" is
            row[key] = "" if index < 0 else names[index] if index < len(names) else index
        row.update({c: float(v[int(item["index"])]) for c, v in extra.items()})
        rows.append(row)
    write_labels(out / LABELS_FILE, rows, extra_columns=list(extra))
    log.info("exported %d items to %s", len(rows), out)
    return out
