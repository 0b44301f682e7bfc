"""Building blocks with equalized learning rate (ProGAN/StyleGAN): weights ~ N(0, 1), scaled at run time.

Every convolution and linear layer of S and V uses them, as in SSV's release (which takes them from rosinality's
StyleGAN port): the stored weight is N(0, 1) and is multiplied by ``sqrt(2 / fan_in)`` in ``forward``, so Adam
sees parameters of one scale everywhere. Biases start at 0 (or a given value).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EqualLinear", "EqualConv", "PixelNorm", "AdaIN", "StyledConvBlock", "ConvBlock", "ConstantInput"]


class EqualLinear(nn.Module):
    """Linear layer with equalized LR: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = math.sqrt(2.0 / in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class EqualConv(nn.Module):
    """2-D or 3-D convolution with equalized LR (``dims`` = 2 or 3); stride 1."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, dims: int = 2):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        self.dims = dims
        self.padding = padding
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, *([kernel] * dims)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = math.sqrt(2.0 / (in_ch * kernel**dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(x, self.weight * self.scale, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k = self.weight.shape[:3]
        return f"{i}, {o}, kernel={k}, padding={self.padding}, dims={self.dims}"


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2) + 1e-8) over the feature dimension: (B, D) -> (B, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-channel normalisation over all spatial dims (no affine): (B, C, *S) -> same shape."""
    return F.instance_norm(x, eps=eps)


class AdaIN(nn.Module):
    """Adaptive instance norm: instance_norm(x) * gamma(w) + beta(w); gamma starts at 1, beta at 0.

    forward: x (B, C, *S), w (B, style_dim) -> (B, C, *S).
    """

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.style = EqualLinear(style_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1.0
            self.style.bias[channels:] = 0.0

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(w).chunk(2, dim=1)
        shape = (*gamma.shape, *([1] * (x.dim() - 2)))
        return instance_norm(x) * gamma.reshape(shape) + beta.reshape(shape)


class ConstantInput(nn.Module):
    """A learned constant (1, C, *[size] * dims), repeated over the batch."""

    def __init__(self, channels: int, size: int, dims: int = 3):
        super().__init__()
        self.value = nn.Parameter(torch.randn(1, channels, *([size] * dims)))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.value.expand(batch_size, *self.value.shape[1:])


class StyledConvBlock(nn.Module):
    """(conv 3x3(x3) -> AdaIN -> LReLU) x 2; the first conv is skipped for the initial constant block.

    forward: x (B, in_ch, *S), w (B, style_dim) -> (B, out_ch, *S). With ``initial=True`` in_ch must equal out_ch.
    """

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, dims: int, initial: bool = False):
        super().__init__()
        if initial and in_ch != out_ch:
            raise ValueError("the initial block keeps the constant's channel count")
        self.conv1 = None if initial else EqualConv(in_ch, out_ch, 3, padding=1, dims=dims)
        self.adain1 = AdaIN(out_ch, style_dim)
        self.conv2 = EqualConv(out_ch, out_ch, 3, padding=1, dims=dims)
        self.adain2 = AdaIN(out_ch, style_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv1 is not None:
            x = self.conv1(x)
        x = F.leaky_relu(self.adain1(x, w), 0.2)
        x = self.conv2(x)
        return F.leaky_relu(self.adain2(x, w), 0.2)


class ConvBlock(nn.Module):
    """Critic block: conv k1 -> [norm] -> LReLU -> conv k2 -> [norm unless last] -> LReLU;
    (B, in, H, W) -> (B, out, H', W').

    ``norm`` is "instance" (SSV's critic) or "none". The last block uses a valid 4x4 second conv (4x4 -> 1x1).
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "instance", last: bool = False):
        super().__init__()
        if norm not in ("instance", "none"):
            raise ValueError(f"unknown critic norm {norm!r}")
        self.norm = norm == "instance"
        self.last = last
        self.conv1 = EqualConv(in_ch, out_ch, 3, padding=1)
        self.conv2 = EqualConv(out_ch, out_ch, 4 if last else 3, padding=0 if last else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.norm:
            x = instance_norm(x)
        x = F.leaky_relu(x, 0.2)
        x = self.conv2(x)
        if self.norm and not self.last:
            x = instance_norm(x)
        return F.leaky_relu(x, 0.2)
