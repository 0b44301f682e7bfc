"""Training data of the Siamese family: geodesic triplets, plain image folders and frame pairs from sequences.

- :class:`TripletFolder`: a ``labels.csv`` folder with extra columns ``triplet`` (id) and ``position`` (0 = left,
  1 = centre, 2 = right), e.g. ``DIR/triplets/train`` of the synthetic benchmark. Item t holds the three images.
- :class:`SequenceFrames`: a ``labels.csv`` folder with ``sequence`` and ``frame`` columns (``DIR/sequences/train``);
  :meth:`SequenceFrames.partners` draws, in the main process with the global torch RNG, the positive partner of each
  frame at offset ``same`` (the frame itself), ``nearby`` (1-2 places away in frame order: ranks among the sequence's
  kept frames, not frame numbers) or ``distant`` (uniform over the rest of its sequence), as SiamPose's pair strategies;
  ``dual`` (the two-head model) uses a nearby and a distant partner per frame, and :meth:`SequenceFrames.consecutive`
  gives the (previous, frame, next) triplets of its trajectory loss.

Items are deterministic (the same index always gives the same tensors); every random choice is made by the trainer.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.labels import LABELS_FILE, LabeledFolder, read_labels
from common.errors import ViewsslError
from common.io import read_image

log = logging.getLogger("viewssl.trajssl.data")

PAIR_MODES = ("augment", "same", "nearby", "distant", "dual")

__all__ = ["PAIR_MODES", "TripletFolder", "SequenceFrames", "ImageFolder", "find_split"]


def _ints(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int64)


def _meta(table, i: int, attr: str) -> int:
    idx = getattr(table, attr)
    return int(idx[i]) if idx is not None else -1


class TripletFolder(Dataset):
    """Geodesic triplets. Item: ``{"left", "image" (centre), "right": (3, S, S), "angles": centre (3,) rad,
    "index": triplet number, "category", "instance", "sequence": -1, "frame": -1}``."""

    def __init__(self, root: str | os.PathLike, size: int = 32):
        self.table = read_labels(root)
        self.size = size
        csv = self.table.csv_path
        for col in ("triplet", "position"):
            if col not in self.table.raw:
                raise ViewsslError(f"not a triplet folder: no {col!r} column (needs triplet and position)", csv)
        triplet, position = _ints(self.table.numeric("triplet")), _ints(self.table.numeric("position"))
        if not np.isin(position, (0, 1, 2)).all():
            raise ViewsslError("column 'position' must be 0 (left), 1 (centre) or 2 (right)", csv)
        ids = np.unique(triplet)
        rows = np.full((len(ids), 3), -1, dtype=np.int64)
        slot = np.searchsorted(ids, triplet)
        for r, (s, p) in enumerate(zip(slot, position)):
            if rows[s, p] != -1:
                raise ViewsslError(f"line {self.table.line(r)}: triplet {ids[s]} has two images at position {p}", csv)
            rows[s, p] = r
        incomplete = np.nonzero((rows < 0).any(1))[0]
        if len(incomplete):
            raise ViewsslError(f"triplet {ids[incomplete[0]]} lacks a left, centre or right image "
                               f"({len(incomplete)} incomplete triplets)", csv)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, t: int) -> dict:
        l, c, r = (int(i) for i in self.rows[t])
        paths = self.table.paths
        return {
            "left": read_image(paths[l], self.size),
            "image": read_image(paths[c], self.size),
            "right": read_image(paths[r], self.size),
            "angles": self.table.angles[c].float(),
            "index": t,
            "category": _meta(self.table, c, "category_index"),
            "instance": _meta(self.table, c, "instance_index"),
            "sequence": -1,
            "frame": -1,
        }


class ImageFolder(LabeledFolder):
    """Any ``labels.csv`` folder as a source of single images (for ``--pairs augment`` on a user's own data)."""


class SequenceFrames(LabeledFolder):
    """Frames of video sequences (``sequence`` and ``frame`` columns) with SiamPose's partner sampling
    (:class:`common.data.folders.FramePairs`; ``distant`` here is its ``uniform``: any other frame of the sequence)."""

    #: --pairs value -> FramePairs mode
    MODES = {"same": "same", "nearby": "nearby", "distant": "uniform"}

    def __init__(self, root: str | os.PathLike, size: int = 32):
        from common.data.folders import FramePairs

        super().__init__(root, size)
        t = self.table
        if t.sequence_index is None or t.frame is None:
            raise ViewsslError("not a sequence folder: needs 'sequence' and 'frame' columns", t.csv_path)
        if (t.sequence_index < 0).any() or (t.frame < 0).any():
            bad = int(np.nonzero((t.sequence_index < 0) | (t.frame < 0))[0][0])
            raise ViewsslError(f"line {t.line(bad)}: empty sequence or frame", t.csv_path)
        self._pairs = {mode: FramePairs(self, fp_mode, max_offset=2) for mode, fp_mode in self.MODES.items()}

    def partners(self, indices: torch.Tensor | list[int], mode: str) -> list[int]:
        """Partner row of each index: ``same`` -> itself; ``nearby`` -> 1 or 2 frames before or after in frame order
        (ranks within the sequence, whatever the gaps between frame numbers); ``distant`` -> uniform over the other
        frames of the sequence. One uniform draw per index from the global torch RNG (main process); a sequence of one
        frame pairs a frame with itself."""
        if mode not in self._pairs:
            raise ViewsslError(f"--pairs {mode!r}: expected same, nearby or distant")
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        u = torch.rand(len(idx), dtype=torch.float64).numpy()
        return [int(i) for i in self._pairs[mode].partner_indices(idx, u)]

    def consecutive(self, indices: torch.Tensor | list[int]) -> tuple[list[int], list[int], list[int]]:
        """(previous, centre, next) rows of three consecutive frames (by frame rank in the sequence) around each
        index, for the trajectory loss on sequences. The centre is the frame itself, moved one frame inwards at
        either end of its sequence; a sequence of one or two frames repeats frames (a degenerate triplet, which
        the trajectory loss counts as zero). Deterministic: no random draw."""
        if not hasattr(self, "_rank_order"):
            seq, frame = self.table.sequence_index, self.table.frame
            n = len(seq)
            order = np.lexsort((np.arange(n), frame, seq))
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n)
            s = seq[order]
            self._rank_order = (order, position, np.searchsorted(s, s, "left"), np.searchsorted(s, s, "right"))
        order, position, first, end = self._rank_order
        p = position[np.asarray([int(i) for i in indices], dtype=np.int64)]
        lo, hi = first[p], end[p] - 1
        c = np.where(hi - lo >= 2, np.clip(p, lo + 1, hi - 1), p)
        left, right = np.maximum(c - 1, lo), np.minimum(c + 1, hi)
        return tuple([int(i) for i in order[x]] for x in (left, c, right))

    def load(self, rows: list[int]) -> torch.Tensor:
        """Images of the given rows, (B, 3, S, S)."""
        return torch.stack([read_image(self.table.paths[r], self.size) for r in rows])


def _has_columns(folder: Path, columns: tuple[str, ...]) -> bool:
    csv = folder / LABELS_FILE
    if not csv.is_file():
        return False
    with open(csv, encoding="utf-8", errors="replace") as f:
        header = [h.strip() for h in f.readline().split(",")]
    return all(c in header for c in columns)


def find_split(data: str | os.PathLike, kind: str) -> Path | None:
    """The training folder of ``kind`` (``triplets``, ``sequences`` or ``objects``) under a benchmark folder
    ``data`` (``data/kind/train``), or ``data`` itself when it is such a folder; None if there is none."""
    data = Path(data)
    if not data.exists():
        raise ViewsslError("no such data folder", data)
    sub = data / kind / "train"
    if (sub / LABELS_FILE).is_file():
        return sub
    needs = {"triplets": ("triplet", "position"), "sequences": ("sequence", "frame"), "objects": ()}[kind]
    if _has_columns(data, needs):
        return data
    return None
