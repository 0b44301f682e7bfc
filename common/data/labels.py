"""``labels.csv``: the project's open format for any labelled image folder, a user's own data included.

Columns: ``path, azimuth, elevation, tilt`` (angles in **degrees**; ``path`` relative to the folder that holds the
CSV) and optional ``category, instance, sequence, frame``. A folder without viewpoints (UCF101's videos, for
retrieval) leaves all three angle cells blank on every row, or has no angle columns: its angles are NaN and
:attr:`LabelTable.has_angles` is False. A table has a viewpoint on every row or on none. Any further columns are
kept as raw strings and can be read as numbers with :meth:`LabelTable.numeric` (the synthetic sequences store their
3D boxes, intrinsics and ground plane that way). Inside the code angles are radians; conversion happens here, at the
edge.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ViewsslError
from ..io import atomic_write_bytes, read_image

LABELS_FILE = "labels.csv"
REQUIRED_COLUMNS = ("path", "azimuth", "elevation", "tilt")
OPTIONAL_COLUMNS = ("category", "instance", "sequence", "frame")
ANGLE_COLUMNS = ("azimuth", "elevation", "tilt")
#: extra columns of a folder that box fitting can run on (common.eval.boxes): intrinsics (pixels), the 3D box in the
#: camera frame (centre, size), the ground plane n . x + d = 0 and the 2D box; the synthetic sequences and an exported
#: Objectron folder have them
BOX_COLUMNS = ("fx", "fy", "cx", "cy", "box_cx", "box_cy", "box_cz", "box_sx", "box_sy", "box_sz", "plane_nx",
               "plane_ny", "plane_nz", "plane_d", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")

__all__ = ["LABELS_FILE", "LabelTable", "read_labels", "write_labels", "LabeledFolder", "resolve_inside"]


def resolve_inside(root: Path, relative: str, csv_path: Path, line: int) -> Path:
    """``root / relative``, refusing absolute paths and paths that escape ``root`` (``..``, symlinks)."""
    if not relative:
        raise ViewsslError(f"line {line}: empty path", csv_path)
    candidate = Path(relative)
    if candidate.is_absolute():
        raise ViewsslError(f"line {line}: path {relative!r} is absolute; paths must be relative to the folder",
                           csv_path)
    resolved = (root / candidate).resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        raise ViewsslError(f"line {line}: path {relative!r} escapes the dataset folder", csv_path) from None
    return resolved


def _index(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Map string ids to ints (sorted, numeric-aware); empty string -> -1."""
    names = sorted({v for v in values if v != ""}, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))
    # (a finite number sorts by value, anything else -- "nan", "inf", words -- by its text, after the numbers)
    lookup = {n: i for i, n in enumerate(names)}
    return names, np.array([lookup.get(v, -1) for v in values], dtype=np.int64)


def _is_number(s: str) -> bool:
    """A finite number ("nan" would make the sort order depend on the hash seed)."""
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


@dataclass
class LabelTable:
    """A parsed ``labels.csv``. ``angles`` is (N, 3) float64 radians (azimuth, elevation, tilt)."""

    root: Path
    csv_path: Path
    paths: list[Path]
    angles: torch.Tensor
    raw: dict[str, list[str]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    category_index: np.ndarray | None = None
    instances: list[str] = field(default_factory=list)
    instance_index: np.ndarray | None = None
    sequences: list[str] = field(default_factory=list)
    sequence_index: np.ndarray | None = None
    frame: np.ndarray | None = None
    lines: list[int] = field(default_factory=list)  # the file's line number of each row (for error messages)

    @property
    def has_angles(self) -> bool:
        """True if the rows have viewpoints (a table has them on every row or on none: then ``angles`` is NaN)."""
        return bool(torch.isfinite(self.angles).all()) if len(self) else False

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def columns(self) -> list[str]:
        return list(self.raw)

    def numeric(self, column: str) -> np.ndarray:
        """A column as float64; an unknown column or a non-numeric cell is an error naming the file and line."""
        if column not in self.raw:
            raise ViewsslError(f"no column {column!r} (has: {', '.join(self.raw)})", self.csv_path)
        out = np.empty(len(self), dtype=np.float64)
        for i, v in enumerate(self.raw[column]):
            try:
                out[i] = float(v)
            except ValueError:
                raise ViewsslError(f"line {self.line(i)}: column {column!r} is not a number: {v!r}",
                                   self.csv_path) from None
        return out

    def line(self, i: int) -> int:
        """The file's line number of row ``i``."""
        return self.lines[i] if i < len(self.lines) else i + 2


def read_labels(folder_or_csv: str | os.PathLike, check_files: bool = True) -> LabelTable:
    """Parse and validate a ``labels.csv`` (given the folder that holds it, or the file itself)."""
    p = Path(folder_or_csv)
    csv_path = p / LABELS_FILE if p.is_dir() else p
    if not p.exists():
        raise ViewsslError("no such folder or file", p)
    if not csv_path.is_file():
        raise ViewsslError(f"no {LABELS_FILE} in this folder", p)
    root = csv_path.parent
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise ViewsslError(f"column(s) {', '.join(twice)} appear twice in the header", csv_path)
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if len(missing) == len(ANGLE_COLUMNS) and "path" in header:
                missing = []  # no angle columns at all: a folder without viewpoints
            if missing:
                raise ViewsslError(
                    f"missing column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)}, the three angles "
                    f"all absent for a folder without viewpoints; has {', '.join(header) or 'none'})",
                    csv_path,
                )
            reader.fieldnames = header
            rows, lines = [], []
            for row in reader:
                if None in row:  # more cells than the header has columns (a decimal comma, a stray separator)
                    raise ViewsslError(f"line {reader.line_num}: {len(header) + len(row[None])} cells, the header "
                                       f"has {len(header)} columns", csv_path)
                rows.append(row)
                lines.append(reader.line_num)  # blank lines and quoted line breaks make it differ from i + 2
    except UnicodeDecodeError:
        raise ViewsslError("not a UTF-8 text CSV", csv_path) from None
    except csv.Error as e:
        raise ViewsslError(f"malformed CSV ({e})", csv_path) from None
    if not rows:
        raise ViewsslError("has a header but no rows", csv_path)

    raw: dict[str, list[str]] = {h: [] for h in header}
    paths: list[Path] = []
    angles = np.full((len(rows), 3), np.nan, dtype=np.float64)
    with_angles = all(c in header for c in ANGLE_COLUMNS)
    first_blank = first_set = None  # the first row without / with a viewpoint
    for i, row in enumerate(rows):
        line = lines[i]
        for h in header:
            v = row.get(h)
            raw[h].append("" if v is None else v.strip())
        path = resolve_inside(root, raw["path"][i], csv_path, line)
        if check_files and not path.is_file():
            raise ViewsslError(f"line {line}: image {raw['path'][i]!r} does not exist", csv_path)
        paths.append(path)
        if not with_angles:
            continue
        blank = [name for name in ANGLE_COLUMNS if raw[name][i] == ""]
        if blank and len(blank) < len(ANGLE_COLUMNS):
            raise ViewsslError(f"line {line}: {', '.join(blank)} blank but not the other angle(s); a row has all "
                               f"three angles or none", csv_path)
        if blank:
            first_blank = first_blank or line
            continue
        first_set = first_set or line
        for j, name in enumerate(ANGLE_COLUMNS):
            try:
                value = float(raw[name][i])
            except ValueError:
                raise ViewsslError(f"line {line}: {name} is not a number: {raw[name][i]!r}", csv_path) from None
            if not math.isfinite(value):
                raise ViewsslError(f"line {line}: {name} is not finite: {raw[name][i]!r}", csv_path)
            if name == "elevation" and abs(value) > 90:
                raise ViewsslError(f"line {line}: elevation {raw[name][i]} is outside [-90, 90] degrees", csv_path)
            angles[i, j] = math.radians(value)
    if first_blank is not None and first_set is not None:
        raise ViewsslError(f"line {first_blank} has no viewpoint (blank angles) but line {first_set} has one; a "
                           f"{LABELS_FILE} has a viewpoint on every row or on none", csv_path)

    table = LabelTable(root=root, csv_path=csv_path, paths=paths, angles=torch.from_numpy(angles), raw=raw, lines=lines)
    if "category" in raw:
        table.categories, table.category_index = _index(raw["category"])
    if "instance" in raw:
        table.instances, table.instance_index = _index(raw["instance"])
    if "sequence" in raw:
        table.sequences, table.sequence_index = _index(raw["sequence"])
    if "frame" in raw:
        frames = np.full(len(rows), -1, dtype=np.int64)
        for i, v in enumerate(raw["frame"]):
            if v == "":
                continue
            try:
                value = float(v)
            except ValueError:
                raise ViewsslError(f"line {lines[i]}: frame is not a number: {v!r}", csv_path) from None
            if not value.is_integer():
                raise ViewsslError(f"line {lines[i]}: frame is not a whole number: {v!r}", csv_path)
            if not 0 <= value < 2 ** 53:  # -1 stands for "no frame"; beyond 2^53 a float no longer holds every integer
                raise ViewsslError(f"line {lines[i]}: frame must be between 0 and 2^53: {v!r}", csv_path)
            frames[i] = int(value)
        table.frame = frames
    return table


def write_labels(path: str | os.PathLike, rows: Iterable[dict], extra_columns: Sequence[str] = ()) -> None:
    """Write rows (dicts with ``path`` and ``azimuth/elevation/tilt`` in **radians**) as ``labels.csv`` in degrees.

    A missing or NaN angle is written as a blank cell (a folder without viewpoints has all three blank on every row).

    Optional columns present in the first row are written too, then ``extra_columns`` in the given order.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("write_labels: no rows")
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in rows[0]] + list(extra_columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c, "")
            if c in ANGLE_COLUMNS:
                v = "" if v == "" or v is None or math.isnan(float(v)) else f"{math.degrees(float(v)):.6f}"
            elif isinstance(v, float):
                v = f"{v:.6g}"
            out.append(v)
        writer.writerow(out)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))  # a bad row leaves the old file and no temp file


class LabeledFolder(Dataset):
    """A ``labels.csv`` folder as a dataset.

    Item: ``{"image": (3, S, S) float32 in [0, 1], "angles": (3,) float32 radians (NaN without viewpoints),
    "index": int, "category": int, "instance": int, "sequence": int, "frame": int}`` (-1 where the column is absent
    or empty).
    ``transform``, if given, is applied to the image tensor.
    """

    def __init__(self, root: str | os.PathLike, size: int | None = 64, transform=None):
        self.table = read_labels(root)
        self.size = size
        self.transform = transform
        n = len(self.table)
        neg = np.full(n, -1, dtype=np.int64)
        self._category = self.table.category_index if self.table.category_index is not None else neg
        self._instance = self.table.instance_index if self.table.instance_index is not None else neg
        self._sequence = self.table.sequence_index if self.table.sequence_index is not None else neg
        self._frame = self.table.frame if self.table.frame is not None else neg

    def __len__(self) -> int:
        return len(self.table)

    @property
    def categories(self) -> list[str]:
        return self.table.categories

    @property
    def instances(self) -> list[str]:
        return self.table.instances

    @property
    def sequences(self) -> list[str]:
        return self.table.sequences

    def __getitem__(self, i: int) -> dict:
        return self.item(i, read_image(self.table.paths[i], self.size))

    def item(self, i: int, image: torch.Tensor) -> dict:
        """The item dict of row ``i`` around an already decoded ``image`` (the transform is applied here)."""
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "angles": self.table.angles[i].float(),
            "index": i,
            "category": int(self._category[i]),
            "instance": int(self._instance[i]),
            "sequence": int(self._sequence[i]),
            "frame": int(self._frame[i]),
        }
