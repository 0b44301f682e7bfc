"""The model side of evaluation: the :class:`PoseModel` protocol and the family registry.

Every model ``viewssl eval`` and the experiments evaluate is seen through :class:`PoseModel`: an input size, the
names of its feature taps, ``predict_angles`` (or None) and ``features``. Each family registers a loader that builds
one from a checkpoint dict::

    from common.eval import register_family
    register_family("ssv", load_pose_model)   # ssv/model_io.py: (ckpt: dict, device, ema=False) -> PoseModel

Registration happens when the family's ``model_io`` module is imported. :func:`load_model` reads a checkpoint (or
the newest readable one of a run folder, via :func:`common.training.find_checkpoint`) and dispatches on
``ckpt["family"]``; if that family is not registered yet it imports the module the family is known to register from
(:data:`FAMILY_MODULES`, a plain name table, so ``common`` still has no import-time dependency on the families) and
tries again.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ..errors import ViewsslError, error_summary

__all__ = ["PoseModel", "FlipAveraged", "FAMILIES", "FAMILY_MODULES", "register_family", "load_model", "MALFORMED",
           "malformed"]

log = logging.getLogger("viewssl.eval.models")

#: what a family loader catches around reading a checkpoint's config and weights: a file that loads but holds the
#: wrong things (a config value of the wrong type, a list for a dict, a tensor for a state dict)
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def malformed(family: str, e: Exception) -> ViewsslError:
    """The one-line error of a family loader for a checkpoint whose contents are not what they should be."""
    return ViewsslError(f"malformed {family!r} checkpoint ({error_summary(e, with_type=True)})")


@runtime_checkable
class PoseModel(Protocol):
    """What evaluation needs from a model. Implementations put themselves in eval mode for these calls."""

    family: str
    input_size: int  # images are resized to input_size x input_size before the model sees them
    taps: list[str]  # feature taps offered, e.g. ["pooled", "layer3", "layer4"]; [] if none

    def predict_angles(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) float in [0, 1] -> (B, 3) (azimuth, elevation, tilt) radians, or None if it cannot."""

    def features(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) float in [0, 1] -> {tap: (B, D) float} on the model's device."""


class FlipAveraged:
    """Test-time flip: a :class:`PoseModel` whose viewpoint is the geodesic midpoint of the model's prediction on the
    image and the mirror (:func:`common.geometry.flip_angles`) of its prediction on the horizontally mirrored image.

    Meant for left-right symmetric classes (heads, most objects) in a frame whose azimuth 0 / tilt 0 view is the
    symmetric one, the frame SSV's L_sym trains; a model that already predicts mirrored views exactly is unchanged.
    Two predictions 180 deg apart have no unique midpoint (one of them is returned). The midpoint is computed in
    float64 on the CPU (MPS has no float64) and returned on the model's device and dtype. Features are the wrapped
    model's (not averaged), as are its other public attributes (``taps``, ``input_size``, ``checkpoint_path``...).
    """

    def __init__(self, model: PoseModel):
        self.model = model

    def __getattr__(self, name: str):
        if name == "model" or name.startswith("__"):  # not set yet (copy / unpickling), or Python's protocols
            raise AttributeError(name)
        return getattr(self.model, name)

    def predict_angles(self, images: torch.Tensor) -> torch.Tensor | None:
        from ..geometry import angles_to_matrix, flip_angles, matrix_to_angles, slerp

        straight = self.model.predict_angles(images)
        if straight is None:
            return None
        mirrored = flip_angles(self.model.predict_angles(images.flip(-1)).detach().to("cpu", torch.float64))
        R0 = angles_to_matrix(*straight.detach().to("cpu", torch.float64).unbind(-1))
        R = slerp(R0, angles_to_matrix(*mirrored.unbind(-1)), 0.5)
        return torch.stack(matrix_to_angles(R), dim=-1).to(straight.device, straight.dtype)

    def features(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.model.features(images, taps)


Loader = Callable[[dict, torch.device], PoseModel]
FAMILIES: dict[str, Loader] = {}
# Where each known family registers itself (imported on demand by load_model).
FAMILY_MODULES: dict[str, str] = {"ssv": "ssv.model_io", "encoder": "trajssl.model_io"}


def register_family(name: str, loader: Loader) -> None:
    """Register (or replace) the loader of checkpoints whose ``family`` is ``name``."""
    if not callable(loader):
        raise TypeError("register_family: loader must be callable (ckpt: dict, device) -> PoseModel")
    FAMILIES[name] = loader


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", ema: bool = False) -> PoseModel:
    """Load any viewssl checkpoint (file or run folder) as a :class:`PoseModel` on ``device``.

    ``ema``: the exponential moving average of the network's weights that the run kept, for families whose loader
    takes an ``ema`` keyword (an error where the family or the run keeps none).
    The model gets ``checkpoint_path`` and ``checkpoint_step`` attributes (where settable)."""
    from ..training import find_checkpoint  # newest readable checkpoint of a run folder, validated

    device = torch.device(device)
    ckpt, ckpt_path = find_checkpoint(path)
    family = ckpt.get("family")
    if not isinstance(family, str):
        raise ViewsslError("not a viewssl checkpoint (no 'family' entry)", ckpt_path)
    if family not in FAMILIES and family in FAMILY_MODULES:
        module = FAMILY_MODULES[family]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise ViewsslError(f"cannot load family {family!r}: {module} needs the missing module {e.name!r}",
                                   ckpt_path) from e
            log.debug("could not import %s for family %r: %s", module, family, e)
    if family not in FAMILIES:
        known = ", ".join(sorted(FAMILIES)) or "none registered"
        raise ViewsslError(f"checkpoint of unknown model family {family!r} (known: {known})", ckpt_path)
    loader = FAMILIES[family]
    if ema and "ema" not in inspect.signature(loader).parameters:
        raise ViewsslError(f"--ema: {family!r} checkpoints keep no EMA weights", ckpt_path)
    try:
        model = loader(ckpt, device, ema=True) if ema else loader(ckpt, device)
    except ViewsslError as e:  # the family's loader may not know the file: name it
        if str(e).startswith(str(ckpt_path)):
            raise
        raise ViewsslError(str(e), ckpt_path) from None
    missing = [a for a in ("input_size", "taps", "predict_angles", "features") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"family {family!r} loader returned an object without {', '.join(missing)}")
    for attr, value in (("checkpoint_path", ckpt_path), ("checkpoint_step", ckpt.get("step"))):
        try:
            setattr(model, attr, value)
        except (AttributeError, TypeError):
            pass
    log.info("loaded %s checkpoint %s (step %s)", family, ckpt_path, ckpt.get("step", "?"))
    return model
