"""Safe, atomic file I/O: checkpoints, JSON, images.

- :func:`atomic_save` writes to a temporary file in the same folder, fsyncs it, renames it over the target and fsyncs
  the folder, so a crash leaves either the old file or the new one, never half of one.
- :func:`load_checkpoint` always uses ``torch.load(..., weights_only=True)``: no pickle of anything a user passes in.
- :func:`folder_lock` keeps a second process from writing into a folder another one is writing.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ViewsslError, error_summary

__all__ = ["atomic_write_bytes", "atomic_save", "atomic_write_json", "folder_lock", "load_checkpoint", "load_rgb",
           "read_image", "to_rgb_uint8", "to_tensor", "write_image"]


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode an ordinary open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """A rename is on disk only once its folder is: without this a power cut can bring back the old file (POSIX; a
    system that cannot open or sync a folder keeps the file's own fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure to ``path`` as PNG, atomically (a reader never sees half a plot); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, who: str):
    """Hold an exclusive lock on ``folder`` (an ``flock`` on its ``.lock`` file, made with the folder if need be) while
    the block runs. A second holder, in this process or another, gets a :class:`ViewsslError` naming the folder
    instead of writing over the first one's files. The lock goes with the process, even a killed one. The empty
    ``.lock`` file stays afterwards on purpose: deleting it on release would let a process that opened it just before
    lock a file no longer in the folder while a third locks a new one. Where there is no ``fcntl`` (Windows) the
    folder is not guarded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ViewsslError(f"another {who} is writing to this folder; wait for it to end or choose another "
                               "output folder", folder) from None
        yield


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a :class:`ViewsslError`.

    ``mmap``: map the tensors' storage from the file instead of reading it (to look at a few tensors of a large file);
    the files ``torch.save`` has written since torch 1.6 allow it, older ones are read in full."""
    path = Path(path)
    if not path.is_file():
        raise ViewsslError("checkpoint not found", path)
    try:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)  # not a zip file: no mmap
    except Exception as e:  # truncated zip, pickle with forbidden globals, not a torch file at all
        raise ViewsslError(f"not a readable viewssl checkpoint ({error_summary(e, with_type=True)})", path) from e
    if not isinstance(obj, dict):
        raise ViewsslError(f"not a viewssl checkpoint (holds a {type(obj).__name__}, expected a dict)", path)
    return obj


def opencv():
    """The ``cv2`` module. An OpenCV that cannot load (``opencv-python`` needs the system's libGL and GLib) is a
    one-line error naming the packages to install, instead of an ImportError deep in a data loader."""
    try:
        import cv2
    except ImportError as e:
        raise ViewsslError(f"cannot import OpenCV ({error_summary(e)}); on Debian/Ubuntu install libgl1 and "
                           "libglib2.0-0") from e
    return cv2


def _jpeg_complete(data: np.ndarray, path: Path) -> bool:
    """A JPEG ends with the EOI marker (FF D9), possibly followed by padding. When it does not, ask Pillow (which
    accepts trailing junk after a complete image but refuses a truncated one)."""
    tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
    if tail.endswith(b"\xff\xd9"):
        return True
    try:
        from PIL import Image, ImageFile

        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as im:
            im.load()
        return True
    except ImportError:  # no Pillow: a JPEG without its end marker is treated as truncated
        return False
    except Exception:
        return False


def to_rgb_uint8(img: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Convert a decoded OpenCV array (BGR order) to (H, W, 3) uint8 RGB, or raise naming ``path``.

    Convertible: 8-bit and 16-bit integers (16-bit scaled by 1/257), float images with values in [0, 1];
    1 channel (gray), 2 (gray + alpha), 3 (BGR), 4 (BGRA); alpha is composited on black.
    Not convertible (error): other integer types (e.g. 32-bit), non-finite or out-of-range floats, other channel
    counts, empty images.
    """
    cv2 = opencv()

    if img.size == 0 or img.ndim not in (2, 3):
        raise ViewsslError(f"unsupported image shape {tuple(img.shape)}", path)
    if img.dtype == np.uint8:
        pass
    elif img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        if not np.isfinite(img).all():
            raise ViewsslError("unsupported image: float pixels that are not finite", path)
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ViewsslError(f"unsupported image: float pixels outside [0, 1] (range {lo:.3g}..{hi:.3g})", path)
        img = (img * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ViewsslError(f"unsupported image mode: {img.dtype} pixels (expected 8- or 16-bit, or float in [0, 1])",
                           path)
    channels = 1 if img.ndim == 2 else img.shape[2]
    if img.ndim == 3 and channels == 1:
        img = img[..., 0]
    if channels == 1:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        alpha = img[..., 1:2].astype(np.float32) / 255.0
        gray = (img[..., 0:1].astype(np.float32) * alpha + 0.5).astype(np.uint8)
        return np.repeat(gray, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        rgb = (img[..., :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
        return cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)
    raise ViewsslError(f"unsupported image mode with {channels} channels (expected 1, 2, 3 or 4)", path)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; a missing, empty, unreadable, truncated or unconvertible file is a
    :class:`ViewsslError` naming it."""
    cv2 = opencv()

    path = Path(path)
    if not path.is_file():
        raise ViewsslError("image not found", path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ViewsslError(f"cannot read image ({e.strerror or e})", path) from None
    if data.size == 0:
        raise ViewsslError("empty image file (0 bytes)", path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ViewsslError("unreadable or truncated image", path)
    if data[:2].tobytes() == b"\xff\xd8" and not _jpeg_complete(data, path):
        raise ViewsslError("truncated JPEG (no end-of-image marker)", path)
    return to_rgb_uint8(img, path)


def to_tensor(img: np.ndarray, size: int | None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32 in [0, 1], resized to ``size`` x ``size`` (area filter when shrinking)
    unless ``size`` is None."""
    cv2 = opencv()

    if size is not None and (img.shape[0] != size or img.shape[1] != size):
        shrink = img.shape[0] > size or img.shape[1] > size
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def read_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read an image file as float32 RGB (3, H, W) in [0, 1]; optionally resized to ``size`` x ``size``.

    :func:`load_rgb` then :func:`to_tensor`: gray, gray + alpha, RGBA (composited on black), 16-bit and float images
    are converted; a missing, unreadable, truncated or unconvertible file is a :class:`ViewsslError` naming it.
    """
    return to_tensor(load_rgb(path), size)


def write_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write (3, H, W) float in [0, 1] or (H, W, 3) uint8 RGB as PNG/JPEG (by suffix), atomically."""
    cv2 = opencv()

    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dtype.is_floating_point:
            arr = (arr.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
        arr = arr.permute(1, 2, 0).numpy()
    else:
        arr = image
    ok, buf = cv2.imencode(Path(path).suffix or ".png", cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ViewsslError("could not encode image", path)
    atomic_write_bytes(path, buf.tobytes())
