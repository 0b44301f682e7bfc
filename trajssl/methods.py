"""SimCLR, VICReg and SimSiam: projector / predictor heads and the semantic loss of two views.

A method is an ``nn.Module`` holding its heads; ``heads(h)`` maps pooled backbone features (N, 512) to the
embeddings its loss needs and ``loss(out1, out2)`` returns the loss terms (``semantic`` is the one to optimise; the
others are logged). ``METHODS`` maps a name to its class; each class lists its paper defaults in ``defaults``.

Heads follow the papers (and trajSSL's solo-learn configs): SimCLR 512-2048-256 with ReLU, no BN; VICReg
512-2048-2048-2048 with BN + ReLU between layers; SimSiam a 3-layer projector with BN on every layer (the last one
without affine) and a 2048-512-2048 bottleneck predictor.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common.distributed import gather_with_grad

from .losses import info_nce_loss, simsiam_loss, vicreg_terms

__all__ = ["METHODS", "SimCLR", "VICReg", "SimSiam", "build_method", "method_defaults"]


def mlp(dims: list[int], bn: bool, last_bn: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with (BN +) ReLU between them; optional BN after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (bn and (not last or last_bn))))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine))
    return nn.Sequential(*layers)


class SiameseMethod(nn.Module):
    name = "base"
    #: paper hyper-parameters: base lr is per 256 images (scaled by batch / 256)
    defaults: dict = {}

    def __init__(self, feat_dim: int, config: dict):
        super().__init__()
        self.config = {**self.defaults, **{k: v for k, v in config.items() if k in self.defaults and v is not None}}

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": self.projector(h)}

    def loss(self, out1: dict, out2: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SimCLR(SiameseMethod):
    name = "simclr"
    defaults = {"proj_hidden_dim": 2048, "proj_dim": 256, "temperature": 0.2, "optimizer": "lars", "lr": 0.4,
                "weight_decay": 1e-5}

    def __init__(self, feat_dim: int, config: dict):
        super().__init__(feat_dim, config)
        c = self.config
        self.projector = mlp([feat_dim, c["proj_hidden_dim"], c["proj_dim"]], bn=False)

    def loss(self, out1, out2):
        z1, z2 = gather_with_grad(out1["z"]), gather_with_grad(out2["z"])
        return {"semantic": info_nce_loss(z1, z2, self.config["temperature"])}


class VICReg(SiameseMethod):
    name = "vicreg"
    defaults = {"proj_hidden_dim": 2048, "proj_dim": 2048, "sim_weight": 25.0, "var_weight": 25.0,
                "cov_weight": 1.0, "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-4}

    def __init__(self, feat_dim: int, config: dict):
        super().__init__(feat_dim, config)
        c = self.config
        self.projector = mlp([feat_dim, c["proj_hidden_dim"], c["proj_hidden_dim"], c["proj_dim"]], bn=True)

    def loss(self, out1, out2):
        c = self.config
        t = vicreg_terms(gather_with_grad(out1["z"]), gather_with_grad(out2["z"]))
        semantic = (c["sim_weight"] * t["invariance"] + c["var_weight"] * t["variance"]
                    + c["cov_weight"] * t["covariance"])
        return {"semantic": semantic, **{f"vicreg_{k}": v.detach() for k, v in t.items()}}


class SimSiam(SiameseMethod):
    name = "simsiam"
    defaults = {"proj_hidden_dim": 2048, "proj_dim": 2048, "pred_hidden_dim": 512, "optimizer": "sgd", "lr": 0.05,
                "weight_decay": 1e-4}

    def __init__(self, feat_dim: int, config: dict):
        super().__init__(feat_dim, config)
        c = self.config
        self.projector = mlp([feat_dim, c["proj_hidden_dim"], c["proj_hidden_dim"], c["proj_dim"]], bn=True,
                             last_bn=True, last_bn_affine=False)
        self.predictor = mlp([c["proj_dim"], c["pred_hidden_dim"], c["proj_dim"]], bn=True)

    def heads(self, h):
        z = self.projector(h)
        return {"z": z, "p": self.predictor(z)}

    def loss(self, out1, out2):
        return {"semantic": simsiam_loss(out1["p"], out2["p"], out1["z"], out2["z"])}


METHODS: dict[str, type[SiameseMethod]] = {"simclr": SimCLR, "vicreg": VICReg, "simsiam": SimSiam}


def method_defaults(name: str) -> dict:
    from common.errors import ViewsslError

    if name not in METHODS:
        raise ViewsslError(f"--method {name!r}: unknown method (available: {', '.join(METHODS)})")
    return dict(METHODS[name].defaults)


def build_method(name: str, feat_dim: int, config: dict) -> SiameseMethod:
    method_defaults(name)
    return METHODS[name](feat_dim, config)
