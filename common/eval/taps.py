"""Layer taps: read features from any named layer of a network, pool or flatten them, and compress them.

The trajectory paper finds that mid-layer features (ResNet ``layer3``) carry more pose than the final pooled ones,
and that they "can be compressed to the same dimension as the final layer with minimal loss" (the compression method
is not in its code). The pieces here:

- :class:`LayerTaps`: forward hooks on named sub-modules (``dict(model.named_modules())`` names) that keep their
  outputs; use it inside a :class:`~common.eval.models.PoseModel`'s ``features``.
- :func:`pool_feature_map`: (B, C, H, W) -> (B, D) by global average pooling (``"avg"``), the trajectory paper's
  per-channel spatial L2 "patch norm" flatten (``"patch_norm"``: each channel's H*W vector L2-normalised, then
  flattened to C*H*W), plain flattening (``"flatten"``) or adaptive average pooling to a small grid (``"grid2"``,
  ``"grid4"``: C*g*g).
- :class:`Compressor`: PCA (fitted on reference features) or a seeded Gaussian random projection to a target width.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ViewsslError

__all__ = ["POOLINGS", "pool_feature_map", "LayerTaps", "extract_taps", "Compressor", "parse_compress"]

POOLINGS = ("avg", "patch_norm", "flatten", "grid2", "grid4")


def pool_feature_map(x: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, D); (B, D) inputs pass through unchanged; (B, N, C) token maps are averaged
    over tokens for ``"avg"`` and flattened otherwise."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:  # transformer tokens (B, N, C)
        return x.mean(dim=1) if pooling == "avg" else x.flatten(1)
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "patch_norm":
        return F.normalize(x.reshape(b, c, -1), dim=-1).reshape(b, -1)
    if pooling == "flatten":
        return x.reshape(b, -1)
    if pooling.startswith("grid"):
        g = int(pooling[4:])
        return F.adaptive_avg_pool2d(x, g).reshape(b, -1)
    raise ValueError(f"unknown pooling {pooling!r} (known: {', '.join(POOLINGS)})")


class LayerTaps:
    """Capture the outputs of named sub-modules during a forward pass.

    >>> with LayerTaps(resnet, ["layer3", "layer4"]) as taps:
    ...     resnet(images)
    >>> taps.outputs["layer3"].shape   # (B, 256, h, w)

    An unknown name raises :class:`ViewsslError` listing the available ones. Outputs are kept as produced (not
    detached), so gradients flow if the caller wants them.
    """

    def __init__(self, module: torch.nn.Module, names: Iterable[str]):
        self.module = module
        self.names = list(names)
        available = dict(module.named_modules())
        missing = [n for n in self.names if n not in available]
        if missing:
            known = ", ".join(n for n in available if n)[:400]
            raise ViewsslError(f"no layer named {', '.join(map(repr, missing))} in the network (layers: {known})")
        self._targets = {n: available[n] for n in self.names}
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "LayerTaps":
        self.outputs = {}
        for name, mod in self._targets.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_mod, _inp, out):
            self.outputs[name] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def extract_taps(
    module: torch.nn.Module, images: torch.Tensor, names: Sequence[str], pooling: str | dict[str, str] = "avg"
) -> dict[str, torch.Tensor]:
    """Run ``module(images)`` under :class:`LayerTaps` and pool each tapped map: name -> (B, D)."""
    with LayerTaps(module, names) as taps:
        module(images)
    out = {}
    for n in names:
        p = pooling.get(n, "avg") if isinstance(pooling, dict) else pooling
        out[n] = pool_feature_map(taps.outputs[n], p)
    return out


def parse_compress(spec: str | tuple | None):
    """``"pca:512"`` / ``"random:256"`` / ``("pca", 512)`` / None -> (method, width) or None."""
    if spec is None or spec == "" or spec == "none":
        return None
    if isinstance(spec, str):
        method, _, width = spec.partition(":")
        try:
            spec = (method.strip(), int(width))
        except ValueError:
            raise ViewsslError(f"--compress {spec!r}: expected METHOD:WIDTH, e.g. pca:512 or random:512") from None
    method, width = spec
    if method not in ("pca", "random") or int(width) < 1:
        raise ViewsslError(f"--compress {method}:{width}: method must be pca or random and width >= 1")
    return method, int(width)


class Compressor:
    """Reduce features to ``width`` dimensions: ``"pca"`` (centred, fitted on reference features; deterministic signs)
    or ``"random"`` (seeded Gaussian projection scaled by 1/sqrt(width), data-independent; Johnson-Lindenstrauss).
    Features already no wider than ``width`` pass through unchanged."""

    def __init__(self, method: str, width: int, seed: int = 0):
        if method not in ("pca", "random"):
            raise ValueError(f"unknown compression {method!r}")
        self.method, self.width, self.seed = method, int(width), int(seed)
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None
        self.identity = False

    def fit(self, features: torch.Tensor) -> "Compressor":
        d = features.shape[1]
        if d <= self.width:
            self.identity = True
            return self
        if self.method == "random":
            g = torch.Generator().manual_seed(self.seed)
            proj = torch.randn(d, self.width, generator=g, dtype=torch.float64) / math.sqrt(self.width)
            self.projection = proj.to(device=features.device, dtype=features.dtype)
            self.mean = None
            return self
        x = features.double()
        self.mean = x.mean(dim=0, keepdim=True)
        xc = x - self.mean
        width = min(self.width, x.shape[0])
        if x.shape[0] <= d:  # few samples: eigenvectors of the Gram matrix
            _, _, vh = torch.linalg.svd(xc, full_matrices=False)
            comps = vh[:width].T
        else:
            evals, evecs = torch.linalg.eigh(xc.T @ xc)
            comps = evecs[:, evals.argsort(descending=True)[:width]]
        # Deterministic sign: the largest-magnitude loading of each component is positive.
        idx = comps.abs().argmax(dim=0)
        signs = torch.sign(comps[idx, torch.arange(comps.shape[1])])
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        self.projection = comps.to(features.dtype)
        self.mean = self.mean.to(features.dtype)
        return self

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return features
        if self.projection is None:
            raise RuntimeError("Compressor.transform before fit")
        x = features if self.mean is None else features - self.mean.to(features.device)
        return x @ self.projection.to(device=features.device, dtype=features.dtype)
