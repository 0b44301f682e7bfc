"""The frozen feature network Phi of the image-consistency loss L_imc = 1 - cos(Phi(I), Phi(S(z_hat, v_hat))).

Choices (``--phi``):

- ``alexnet``: torchvision AlexNet with ImageNet weights, up to conv2 before its ReLU (``features[:4]``, the layer
  the release uses), on ImageNet-normalised inputs (the release fed [-1, 1] unnormalised; we normalise).
- ``vgg``: torchvision VGG-16 with ImageNet weights, up to relu2_2 (``features[:9]``).
- ``critic``: the viewpoint network's own trunk up to the tap ``block1`` (1/4 resolution), evaluated with
  *detached* parameters at every call: it follows V's current weights but L_imc cannot change them through Phi.
- ``random``: a fixed random 3-layer conv net (seeded by its own generator, so it never touches the global RNG).
- ``auto`` (default): with ``--phi-weights``, the network that file holds (its first convolution: 11x11 AlexNet,
  3x3 VGG-16); else ``alexnet`` if its ImageNet weights are on this machine, else ``vgg`` if those are, else
  ``critic``. The choice is logged once.

**No download is ever attempted.** Pretrained weights are read from ``--phi-weights PATH`` or from the torch hub cache
(``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``, the files torchvision's
``weights=IMAGENET1K_V1`` uses), always with ``weights_only=True``. If neither exists, a :class:`ViewsslError` says
which file is missing and how to provide it.

Every Phi takes model-range images (B, 3, H, W) in [-1, 1] and returns a feature map (B, C, h, w); it has no trainable
parameters.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ViewsslError, error_summary

log = logging.getLogger("viewssl.ssv.features")

__all__ = ["PHI_CHOICES", "hub_weights_path", "pretrained_available", "resolve_phi", "build_phi"]

PHI_CHOICES = ("auto", "alexnet", "vgg", "critic", "random")
_WEIGHT_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_logged: set[tuple] = set()


def hub_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name`` ("alexnet" or "vgg") in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _WEIGHT_FILES[name]


def _weights_file(name: str, weights_path: str | os.PathLike | None) -> Path | None:
    if weights_path:
        return Path(weights_path)
    path = hub_weights_path(name)
    return path if path.is_file() else None


def pretrained_available(name: str, weights_path: str | os.PathLike | None = None) -> bool:
    path = _weights_file(name, weights_path)
    return path is not None and path.is_file()


def resolve_phi(name: str, weights_path: str | os.PathLike | None = None) -> str:
    """``auto`` -> the concrete choice (logged once); other names are checked and returned unchanged."""
    if name not in PHI_CHOICES:
        raise ViewsslError(f"--phi: unknown feature network {name!r} (choose from {', '.join(PHI_CHOICES)})")
    if name != "auto":
        return name
    if weights_path and not Path(weights_path).is_file():
        raise ViewsslError("--phi-weights: file not found", weights_path)
    if weights_path:
        chosen = _architecture_of(weights_path)
        why = f"{_IMAGENET_PHI[chosen][1]} state dict in --phi-weights {weights_path}"
    elif pretrained_available("alexnet"):
        chosen, why = "alexnet", f"ImageNet AlexNet weights found at {hub_weights_path('alexnet')}"
    elif pretrained_available("vgg"):
        chosen, why = "vgg", "ImageNet VGG-16 weights found"
    else:
        chosen = "critic"
        why = (
            f"no ImageNet AlexNet/VGG weights in {hub_weights_path('alexnet').parent} and no --phi-weights; using the "
            "critic's own trunk (detached)"
        )
    key = ("auto", chosen, str(weights_path))
    if key not in _logged:
        _logged.add(key)
        log.info("--phi auto -> %s (%s)", chosen, why)
    return chosen


def _load_state_dict(name: str, weights_path: str | os.PathLike | None) -> dict:
    path = _weights_file(name, weights_path)
    if path is None or not path.is_file():
        where = Path(weights_path) if weights_path else hub_weights_path(name)
        raise ViewsslError(
            f"--phi {name}: ImageNet weights not found at {where} (no download is attempted); copy torchvision's "
            f"{_WEIGHT_FILES[name]} there or pass --phi-weights PATH, or use --phi critic|random"
        )
    return _read_state(path)


def _read_state(path: Path, mmap: bool = False) -> dict:
    from common.io import load_checkpoint

    state = load_checkpoint(path, mmap=mmap)
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _architecture_of(path: str | os.PathLike) -> str:
    """"alexnet" or "vgg": which torchvision network a state dict file holds, by its first convolution's kernel."""
    first = _read_state(Path(path), mmap=True).get("features.0.weight")  # memory-mapped: nothing else is read
    kernel = tuple(first.shape[-2:]) if isinstance(first, torch.Tensor) and first.dim() == 4 else None
    for name, size in (("alexnet", (11, 11)), ("vgg", (3, 3))):
        if kernel == size:
            return name
    raise ViewsslError(f"--phi-weights: neither a torchvision AlexNet nor a VGG-16 state dict (features.0.weight "
                       f"{'missing' if kernel is None else f'has {kernel[0]}x{kernel[1]} kernels'})", path)


class _ImageNetPhi(nn.Module):
    """A frozen torchvision feature extractor on ImageNet-normalised, optionally resized inputs."""

    def __init__(self, features: nn.Module, input_size: int | None):
        super().__init__()
        self.features = features
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1.0) * 0.5 - self.mean) / self.std
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.features(x)


#: name -> (torchvision builder, name in errors, how many ``features`` layers Phi keeps)
_IMAGENET_PHI = {"alexnet": ("alexnet", "an AlexNet", 4), "vgg": ("vgg16", "a VGG-16", 9)}


def _imagenet_phi(name: str, weights_path, input_size) -> nn.Module:
    """The first layers of a torchvision ImageNet network, from local weights only."""
    import torchvision

    builder, title, n_layers = _IMAGENET_PHI[name]
    state = _load_state_dict(name, weights_path)
    with torch.device("meta"):  # no random init (fast, and the global RNG is untouched)
        model = getattr(torchvision.models, builder)(weights=None)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # "Error(s) in loading state_dict for VGG:" then the missing / unexpected / misfit keys
        raise ViewsslError(f"--phi {name}: not {title} state dict ({error_summary(e, 240)})",
                           _weights_file(name, weights_path)) from None
    return _ImageNetPhi(model.features[:n_layers], input_size)


class _TapOf(nn.Module):
    """Holds V as a submodule so ``functional_call`` can swap in detached parameters."""

    def __init__(self, critic: nn.Module, tap: str):
        super().__init__()
        self.v = critic
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.tap(x, self.tap)


class CriticPhi(nn.Module):
    """Phi = V's trunk up to ``tap``, with V's *current* parameters detached (no gradient into V through Phi)."""

    def __init__(self, critic: nn.Module, tap: str = "block1"):
        super().__init__()
        self._wrapper = [_TapOf(critic, tap)]  # a list: not a registered submodule, so never saved or optimised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wrapper = self._wrapper[0]
        state = {name: p.detach() for name, p in wrapper.named_parameters()}
        state.update(dict(wrapper.named_buffers()))
        return torch.func.functional_call(wrapper, state, (x,))


class RandomPhi(nn.Module):
    """A fixed random conv net: 3 x (conv 3x3, ReLU), strides 2, 2, 1, channels 32, 64, 64 (Kaiming normal, seed 0).

    The weights come from a private generator (the global RNG is untouched) and are non-persistent buffers.
    """

    _LAYERS = ((3, 32, 2), (32, 64, 2), (64, 64, 1))

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for i, (c_in, c_out, _) in enumerate(self._LAYERS):
            w = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2.0 / (c_in * 9)) ** 0.5
            self.register_buffer(f"w{i}", w, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (_, _, stride) in enumerate(self._LAYERS):
            x = F.relu(F.conv2d(x, getattr(self, f"w{i}"), stride=stride, padding=1))
        return x


def build_phi(
    name: str,
    critic: nn.Module | None = None,
    weights_path: str | os.PathLike | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """A frozen Phi: model-range images (B, 3, H, W) -> features (B, C, h, w).

    ``input_size`` resizes inputs for the pretrained nets (None keeps the image size); ``critic`` is required for
    ``critic``. ``auto`` is resolved with :func:`resolve_phi`.
    """
    name = resolve_phi(name, weights_path)
    if name in _IMAGENET_PHI:
        return _imagenet_phi(name, weights_path, input_size)
    if name == "critic":
        if critic is None:
            raise ValueError("--phi critic needs the viewpoint network")
        return CriticPhi(critic)
    return RandomPhi()
