"""Safe, atomic file I/O: checkpoints, JSON, images.

- :func:`atomic_save` writes to a temporary file in the same folder, fsyncs it and renames it over the target, so a
  crash leaves either the old file or the new one, never half of one.
- :func:`load_checkpoint` always uses ``torch.load(..., weights_only=True)``: no pickle of anything a user passes in.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ViewsslError

__all__ = ["atomic_write_bytes", "atomic_save", "atomic_write_json", "load_checkpoint", "read_image", "write_image"]


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a :class:`ViewsslError`."""
    path = Path(path)
    if not path.is_file():
        raise ViewsslError("checkpoint not found", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with forbidden globals, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ViewsslError(f"not a readable viewssl checkpoint ({first[:200]})", path) from e
    if not isinstance(obj, dict):
        raise ViewsslError(f"not a viewssl checkpoint (holds a {type(obj).__name__}, expected a dict)", path)
    return obj


def read_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read an image file as float32 RGB (3, H, W) in [0, 1]; optionally resized to ``size`` x ``size``.

    Grayscale and RGBA images are converted to RGB (RGBA composited on black). A missing, unreadable or truncated
    file is a :class:`ViewsslError` naming the file.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ViewsslError("image not found", path)
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ViewsslError("unreadable or truncated image", path)
    if img.dtype == np.uint16:
        img = (img / 257.0).astype(np.uint8)
    if img.dtype != np.uint8:
        raise ViewsslError(f"unsupported image type {img.dtype}", path)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = cv2.cvtColor((img[..., :3] * alpha).astype(np.uint8), cv2.COLOR_BGR2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise ViewsslError(f"unsupported image mode with {img.shape[2]} channels", path)
    if size is not None and (img.shape[0] != size or img.shape[1] != size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def write_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write (3, H, W) float in [0, 1] or (H, W, 3) uint8 RGB as PNG/JPEG (by suffix), atomically."""
    import cv2

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
