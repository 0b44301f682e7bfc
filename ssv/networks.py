"""SSV's two networks: the viewpoint-aware synthesis network S and the viewpoint network V (which is also the critic).

Sizes come from a config dict (see :data:`PRESETS`): ``paper`` reproduces the release's 128x128 networks (without its
defects), ``cpu`` is a small 32x32 pair that learns on two CPU cores (``cpu64``: the same at 64x64).

**Volume rotation and the camera convention.** S builds a 3-D feature volume in *object* coordinates, rotates it
rigidly into *camera* coordinates with R = angles_to_matrix(azimuth, elevation, tilt) (object -> camera, the
project convention of :mod:`common.geometry`), then collapses the depth axis. The camera is OpenGL's (as in the
synthetic renderer): x right, y up, looking down -z, image rows running down.

A 5-D tensor (B, C, D, H, W) is read through ``affine_grid`` coordinates g = (g_x, g_y, g_z) in [-1, 1]^3 with
g_x along W, g_y along H and g_z along D. We tie them to 3-D coordinates by ``p = G g`` with
G = diag(1, -1, -1) (:data:`GRID_TO_CAMERA`): W runs right (+x), H runs *down* the image (-y), and D runs *away* from
the camera (-z); the same map holds for the object volume, so at R = I the object is seen from its +z side, upright.
``grid_sample`` fills each output (camera) voxel g with the input (object) voxel at theta @ g; the camera point G g
comes from the object point R^T G g, i.e. object grid coordinates G R^T G g, so theta = G R^T G. The projection
then folds D into channels (1x1 conv), keeping (H, W) as the image rows and columns. ``tests/test_ssv_networks.py``
checks with a marked voxel that a point p of the object lands at R p, and in the image at column ~ x, row ~ -y.

Sampling is trilinear (``mode="bilinear"`` on 5-D input), so L_imc passes gradients to the predicted angles (the
release used ``nearest``, which blocks them). ``align_corners=False`` (:data:`ALIGN_CORNERS`) in both affine_grid and
grid_sample: the volume is a cube of side 2 made of voxel *cells*, whose centre (0, 0, 0) is the rotation centre
for any resolution, and 90-degree turns map voxel centres onto voxel centres. Samples outside the cube read 0.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from common.geometry import angles_to_matrix

from .layers import ConstantInput, ConvBlock, EqualConv, EqualLinear, PixelNorm, StyledConvBlock
from .viewpoint import build_head

__all__ = [
    "ALIGN_CORNERS",
    "GRID_TO_CAMERA",
    "rotation_theta",
    "rotate_volume",
    "MappingNetwork",
    "SynthesisNetwork",
    "ViewpointNetwork",
    "PRESETS",
    "NETWORK_KEYS",
    "build_synthesis",
    "build_viewpoint",
    "to_model_range",
    "to_unit_range",
]

ALIGN_CORNERS = False
GRID_TO_CAMERA = torch.diag(torch.tensor([1.0, -1.0, -1.0]))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (the project convention) -> [-1, 1], the range S produces and V reads."""
    return images * 2.0 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model-range images -> [0, 1] (clamped)."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def rotation_theta(R: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) object -> camera rotations -> (B, 3, 4) ``affine_grid`` matrices theta = [G R^T G | 0]."""
    G = GRID_TO_CAMERA.to(dtype=R.dtype, device=R.device)
    theta = G @ R.transpose(-1, -2) @ G
    return torch.cat([theta, torch.zeros_like(theta[..., :1])], dim=-1)


def rotate_volume(volume: torch.Tensor, R: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Rigidly rotate object-space volumes into camera space: (B, C, D, H, W), (B, 3, 3) -> (B, C, S, S, S).

    Trilinear, zero padding, ``align_corners=ALIGN_CORNERS``; the content at object point p moves to R p (see the
    module docstring for the axes). ``size`` resamples onto an S^3 output grid (default: the input's D, H, W), so
    an 8^3 volume can be rotated straight onto 16^3 (trilinear upsampling and rotation in one step).
    """
    theta = rotation_theta(R.to(volume.dtype))
    shape = list(volume.shape) if size is None else [volume.shape[0], volume.shape[1], size, size, size]
    grid = F.affine_grid(theta, shape, align_corners=ALIGN_CORNERS)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)


def ball_window(size: int, inner: float = 0.7, outer: float = 1.0) -> torch.Tensor:
    """(size, size, size) weights at the voxel centres of a cube [-1, 1]^3 (``align_corners=False`` centres): 1
    within radius ``inner``, a cosine fall-off to 0 at ``outer``, 0 beyond. A ball is mapped onto itself by every
    rotation, so a volume multiplied by it has the same support from every viewpoint."""
    c = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    r = torch.sqrt(c.view(-1, 1, 1) ** 2 + c.view(1, -1, 1) ** 2 + c.view(1, 1, -1) ** 2)
    t = ((r - inner) / (outer - inner)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class MappingNetwork(nn.Module):
    """PixelNorm then ``n_mlp`` x (EqualLinear, LReLU 0.2); (B, code_dim) -> (B, code_dim). Shared by both codes."""

    def __init__(self, code_dim: int, n_mlp: int):
        super().__init__()
        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(n_mlp):
            layers += [EqualLinear(code_dim, code_dim), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _PlainConvBlock3d(nn.Module):
    """(conv3d 3^3 -> LReLU) x 2 without styles (the release's post-rotation blocks)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = EqualConv(in_ch, out_ch, 3, padding=1, dims=3)
        self.conv2 = EqualConv(out_ch, out_ch, 3, padding=1, dims=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)


class SynthesisNetwork(nn.Module):
    """Viewpoint-aware synthesis network S(z, v) (HoloGAN-style, SSV's ``VPAwareSynthesizer_ssv`` layout).

    z = [z3d, z2d], each ``code_dim``; both go through the shared mapping MLP. A learned constant volume
    (channels_3d[0] x volume_size^3) is styled by w3d through 3-D blocks (x2 trilinear upsampling between them),
    rotated by R(v) (onto a ``rotate_size``^3 grid if given: upsampling and rotation in one trilinear resampling),
    refined by unstyled 3-D blocks, projected (depth folded into channels, 1x1 conv, PReLU) and
    styled by w2d through 2-D blocks (x2 bilinear upsampling before each), then a 1x1 conv to RGB (linear, no tanh).

    ``ball_mask`` (not in the release): the rotated volume is multiplied by :func:`ball_window`. Without it the
    corners of the cube leave the sampling grid as it turns (zero padding), so the projected outline of the cube
    changes with the viewpoint: a cue V can read on S's images that no real image has. With it the volume's support
    is the same ball from every viewpoint, up to a faint rim: the window reaches 0 at radius 1, but zero padding
    already dims samples beyond the outermost input voxel centre (1 - 1 / input size), more along the axes than
    along the diagonals (a windowed constant volume turned by any rotation stays within 0.03 of the window).

    forward: z (B, 2 * code_dim), angles (B, 3) radians (or R (B, 3, 3)) -> images (B, 3, S, S) in model range
    (about [-1, 1]).
    """

    def __init__(
        self,
        image_size: int,
        code_dim: int,
        n_mlp: int,
        channels_3d: list[int],
        channels_3d_post: list[int],
        projection: int,
        channels_2d: list[int],
        volume_size: int = 4,
        rotate_size: int | None = None,
        ball_mask: bool = False,
    ):
        super().__init__()
        styled_res = volume_size * 2 ** (len(channels_3d) - 1)
        vol_res = rotate_size or styled_res
        if vol_res < styled_res:
            raise ValueError(f"synthesis network: rotate_size {vol_res} is below the 3-D resolution {styled_res}")
        out = vol_res * 2 ** len(channels_2d)
        if out != image_size:
            raise ValueError(
                f"synthesis network: rotated volume {vol_res}^3 x 2^{len(channels_2d)} = {out}, "
                f"not the image size {image_size}"
            )
        self.image_size = image_size
        self.code_dim = code_dim
        self.vol_res = vol_res
        self.rotate_size = rotate_size
        # not saved in the state dict: a function of the size, and checkpoints from before the option still load
        self.register_buffer("window", ball_window(vol_res) if ball_mask else None, persistent=False)
        self.mapping = MappingNetwork(code_dim, n_mlp)
        self.const = ConstantInput(channels_3d[0], volume_size, dims=3)
        blocks = [StyledConvBlock(channels_3d[0], channels_3d[0], code_dim, dims=3, initial=True)]
        for c_in, c_out in zip(channels_3d[:-1], channels_3d[1:]):
            blocks.append(StyledConvBlock(c_in, c_out, code_dim, dims=3))
        self.blocks_3d = nn.ModuleList(blocks)
        post, c = [], channels_3d[-1]
        for c_out in channels_3d_post:
            post.append(_PlainConvBlock3d(c, c_out))
            c = c_out
        self.blocks_3d_post = nn.ModuleList(post)
        self.project = EqualConv(c * vol_res, projection, 1)
        self.project_act = nn.PReLU(projection)
        blocks2, c = [], projection
        for c_out in channels_2d:
            blocks2.append(StyledConvBlock(c, c_out, code_dim, dims=2))
            c = c_out
        self.blocks_2d = nn.ModuleList(blocks2)
        self.to_rgb = EqualConv(c, 3, 1)

    def styles(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2 * code_dim) -> (w3d, w2d), each (B, code_dim)."""
        z3d, z2d = z[:, : self.code_dim], z[:, self.code_dim :]
        return self.mapping(z3d), self.mapping(z2d)

    def forward(self, z: torch.Tensor, angles: torch.Tensor | None = None, R: torch.Tensor | None = None):
        if R is None:
            if angles is None:
                raise ValueError("give angles (B, 3) or R (B, 3, 3)")
            R = angles_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        w3d, w2d = self.styles(z)
        x = self.const(z.shape[0])
        for i, block in enumerate(self.blocks_3d):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = block(x, w3d)
        x = rotate_volume(x, R, self.rotate_size)
        if self.window is not None:
            x = x * self.window
        for block in self.blocks_3d_post:
            x = block(x)
        B, C, D, H, W = x.shape
        x = self.project_act(self.project(x.reshape(B, C * D, H, W)))
        for block in self.blocks_2d:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(x, w2d)
        return self.to_rgb(x)


def _odd_reflect_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dimensions by ``r`` with odd reflection, ``2 x[0] - x[k]`` (a linear image stays linear)."""
    x = torch.cat([2 * x[..., :1] - x[..., 1 : r + 1].flip(-1), x, 2 * x[..., -1:] - x[..., -r - 1 : -1].flip(-1)], -1)
    return torch.cat([2 * x[..., :1, :] - x[..., 1 : r + 1, :].flip(-2), x,
                      2 * x[..., -1:, :] - x[..., -r - 1 : -1, :].flip(-2)], -2)


class ViewpointNetwork(nn.Module):
    """Viewpoint network V = WGAN critic: one trunk, heads for the critic score, the style code and the viewpoint.

    Trunk: 1x1 from-RGB conv (+LReLU) at full resolution, then ConvBlocks each followed by 2x2 average pooling down
    to 4x4 (every block is live: the release's discarded first block is not reproduced), optional minibatch stddev
    (one scalar channel), and a last block (3x3 conv, 4x4 valid conv) giving a ``feature_dim`` vector. Optionally
    (``highpass`` > 0, not in the release) the trunk reads a high-passed image: see :meth:`prefilter`.

    forward: images (B, 3, S, S) in model range [-1, 1] -> {"score": (B,), "z": (B, 2 * code_dim),
    "view": head output (see :mod:`ssv.viewpoint`), "feat": (B, feature_dim)}.
    """

    def __init__(
        self,
        image_size: int,
        channels: list[int],
        feature_dim: int,
        code_dim: int,
        head: str = "spherical",
        head_hidden: int = 256,
        norm: str = "instance",
        mbstd: bool = False,
        dropout: float = 0.5,
        highpass: float = 0.0,
    ):
        super().__init__()
        if highpass != 0 and not 0.5 <= highpass <= (image_size - 1) / 3:
            raise ValueError(
                f"viewpoint network: high-pass sigma {highpass} is not 0 or in [0.5, {(image_size - 1) / 3:g}] pixels "
                f"(below 0.5 almost nothing passes; above, the 3-sigma kernel outgrows the {image_size}-px image)"
            )
        self.highpass = float(highpass)
        n_blocks = int(round(math.log2(image_size / 4)))
        if 4 * 2**n_blocks != image_size or len(channels) != n_blocks + 1:
            raise ValueError(
                f"viewpoint network: image size {image_size} needs a power of two >= 4 and "
                f"{n_blocks + 1} channel counts (got {len(channels)})"
            )
        self.image_size = image_size
        self.mbstd = mbstd
        self.from_rgb = EqualConv(3, channels[0], 1)
        self.blocks = nn.ModuleList(ConvBlock(a, b, norm=norm) for a, b in zip(channels[:-1], channels[1:]))
        self.final = ConvBlock(channels[-1] + int(mbstd), feature_dim, norm=norm, last=True)
        self.score_head = EqualLinear(feature_dim, 1)
        self.style_head = EqualLinear(feature_dim, 2 * code_dim)
        self.view_head = build_head(head, feature_dim, head_hidden, dropout=dropout)
        self.tap_names = [f"block{i}" for i in range(len(self.blocks))] + ["pooled"]

    def prefilter(self, x: torch.Tensor) -> torch.Tensor:
        """What the trunk sees: ``x`` itself, or with ``highpass`` = sigma > 0, ``x`` minus its Gaussian blur (sigma
        in pixels, kernel radius ceil(3 sigma)). The border is padded by odd reflection (numpy's
        ``reflect_type="odd"``: ``2 x[0] - x[k]``), which continues a linear ramp as a ramp, so a linear brightness
        ramp is removed exactly, border included; smooth shading that is not linear is strongly attenuated, not
        removed (a half-cosine across 32 px keeps at most 0.25 % of its range at sigma 1, 0.9 % at sigma 2, 8 % at
        sigma 8), and the contrast of an edge against its background passes. So the critic and the heads barely see
        the light direction or a background gradient, and S can barely show a viewpoint with them; edges,
        silhouettes and facial features pass. (B, 3, S, S) -> (B, 3, S, S)."""
        if self.highpass <= 0:
            return x
        from kornia.filters import gaussian_blur2d

        r = max(1, math.ceil(3.0 * self.highpass))
        if r >= min(x.shape[-2:]):
            raise ValueError(f"high-pass sigma {self.highpass}: a {tuple(x.shape[-2:])} image is too small for its "
                             f"radius-{r} kernel")
        padded = _odd_reflect_pad(x, r)
        blur = gaussian_blur2d(padded, 2 * r + 1, (self.highpass, self.highpass))[..., r:-r, r:-r]
        return x - blur

    def trunk(self, x: torch.Tensor, taps: bool = False):
        """(B, 3, S, S) model range -> (B, feature_dim) [and {"block<i>": (B, C_i, S / 2^(i+1), ...), "pooled"}]."""
        out = {}
        h = F.leaky_relu(self.from_rgb(self.prefilter(x)), 0.2)
        for i, block in enumerate(self.blocks):
            h = F.avg_pool2d(block(h), 2)
            if taps:
                out[f"block{i}"] = h
        if self.mbstd:
            # training: the std over the batch; eval: its value for a batch of one, sqrt(0 + 1e-8) (what the release's
            # test_vpnet.py computed with batch 1), so a frame's prediction does not depend on the frames beside it
            if self.training:
                std = torch.sqrt(h.var(dim=0, unbiased=False) + 1e-8).mean()
            else:
                std = h.new_tensor(1e-4)
            h = torch.cat([h, std.expand(h.shape[0], 1, *h.shape[2:])], dim=1)
        feat = self.final(h).flatten(1)
        if taps:
            out["pooled"] = feat
            return feat, out
        return feat

    def tap(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The trunk's feature map ``name`` ("block<i>"), computing only the blocks up to it;
        (B, 3, S, S) -> (B, C, h, w)."""
        if name not in self.tap_names[:-1]:
            raise ValueError(f"unknown tap {name!r} (have {', '.join(self.tap_names[:-1])})")
        last = int(name[len("block") :])
        h = F.leaky_relu(self.from_rgb(self.prefilter(x)), 0.2)
        for block in self.blocks[: last + 1]:
            h = F.avg_pool2d(block(h), 2)
        return h

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """Critic score only: (B, 3, S, S) -> (B,). Used by the gradient penalty."""
        return self.score_head(self.trunk(x)).squeeze(1)

    def heads(self, feat: torch.Tensor) -> dict:
        return {
            "score": self.score_head(feat).squeeze(1),
            "z": self.style_head(feat),
            "view": self.view_head(feat),
            "feat": feat,
        }

    def forward(self, x: torch.Tensor) -> dict:
        return self.heads(self.trunk(x))

    def decode(self, view: dict) -> torch.Tensor:
        """Head output -> (B, 3) radians."""
        return self.view_head.decode(view)


# ----------------------------------------------------------------------------------------------------------------
# Presets. "paper" = the release's sizes at 128x128 (S: 17.2 M parameters, like VPAwareSynthesizer_ssv; V: the live
# part of VPNet with its first 128x128 block made live). "cpu" = a 32x32 pair small enough to train on two CPU cores
# (1.3 s per step at batch 16 on one thread with another job on the other core), "cpu64" = the same at 64x64,
# "cpu64w" = cpu64 with twice S's channels.

NETWORK_KEYS = (
    "image_size",
    "code_dim",
    "n_mlp",
    "volume_size",
    "rotate_size",
    "g_ball_mask",
    "g_channels_3d",
    "g_channels_3d_post",
    "g_projection",
    "g_channels_2d",
    "d_channels",
    "d_feature",
    "d_head_hidden",
    "d_norm",
    "mbstd",
    "dropout",
    "viewpoint_head",
    "d_highpass",
)

PRESETS: dict[str, dict] = {
    "paper": {
        "image_size": 128,
        "code_dim": 64,
        "n_mlp": 8,
        "volume_size": 4,
        "rotate_size": None,  # rotate at the 3-D resolution, 16^3
        "g_ball_mask": False,
        "g_channels_3d": [512, 256, 128],  # 4^3 -> 8^3 -> 16^3
        "g_channels_3d_post": [64, 64],
        "g_projection": 512,  # 64 * 16 = 1024 -> 512
        "g_channels_2d": [256, 64, 32],  # 32^2, 64^2, 128^2
        "d_channels": [128, 256, 512, 512, 512, 512],  # 128 -> 64 -> 32 -> 16 -> 8 -> 4
        "d_feature": 512,
        "d_head_hidden": 256,
        "d_norm": "instance",
        "mbstd": True,
        "dropout": 0.5,
        "viewpoint_head": "spherical",
        "d_highpass": 0.0,
    },
    # 32x32, about 12 GFLOP per training step at batch 16 (S: 28 M multiply-adds per image, V: 12 M). Styled 3-D
    # convs at 4^3 and 8^3 only; the 8^3 volume is rotated straight onto a 16^3 grid (no 3-D conv at 16^3).
    "cpu": {
        "image_size": 32,
        "code_dim": 32,
        "n_mlp": 4,
        "volume_size": 4,
        "rotate_size": 16,
        "g_ball_mask": False,
        "g_channels_3d": [32, 16],  # 4^3 -> 8^3, rotated onto 16^3
        "g_channels_3d_post": [],
        "g_projection": 64,  # 16 * 16 = 256 -> 64 at 16^2
        "g_channels_2d": [16],  # 32^2
        # V: twice the channels of a first guess ([8, 16, 32, 64]) and no head dropout (the release's 0.5): on the
        # synthetic heads this V reads the generator's viewpoint ~1.4x faster per step (cycle L_v 3.5 vs 5.0 after
        # 250 steps) for 1.3x the step time, and with labels it learns azimuth twice as fast.
        "d_channels": [16, 32, 64, 128],  # 32 -> 16 -> 8 -> 4
        "d_feature": 128,
        "d_head_hidden": 64,
        "d_norm": "instance",
        "mbstd": False,
        "dropout": 0.0,
        "viewpoint_head": "spherical",
        "d_highpass": 0.0,
    },
}
# the same design at 64x64: one more styled 2-D block in S, one more block in V
PRESETS["cpu64"] = {
    **copy.deepcopy(PRESETS["cpu"]),
    "image_size": 64,
    "g_channels_2d": [32, 16],  # 32^2, 64^2
    "d_channels": [8, 16, 32, 64, 128],  # 64 -> 32 -> 16 -> 8 -> 4
}
# cpu64 with an S of twice the channels everywhere (0.43 M parameters instead of 0.12 M; V unchanged): about 1.5x the
# step time of cpu64
PRESETS["cpu64w"] = {
    **copy.deepcopy(PRESETS["cpu64"]),
    "g_channels_3d": [64, 32],
    "g_projection": 128,
    "g_channels_2d": [64, 32],
}


def build_synthesis(config: dict) -> SynthesisNetwork:
    return SynthesisNetwork(
        image_size=config["image_size"],
        code_dim=config["code_dim"],
        n_mlp=config["n_mlp"],
        channels_3d=list(config["g_channels_3d"]),
        channels_3d_post=list(config["g_channels_3d_post"]),
        projection=config["g_projection"],
        channels_2d=list(config["g_channels_2d"]),
        volume_size=config.get("volume_size", 4),
        rotate_size=config.get("rotate_size"),
        ball_mask=config.get("g_ball_mask", False),
    )


def build_viewpoint(config: dict) -> ViewpointNetwork:
    return ViewpointNetwork(
        image_size=config["image_size"],
        channels=list(config["d_channels"]),
        feature_dim=config["d_feature"],
        code_dim=config["code_dim"],
        head=config.get("viewpoint_head", "spherical"),
        head_hidden=config["d_head_hidden"],
        norm=config.get("d_norm", "instance"),
        mbstd=bool(config.get("mbstd", False)),
        dropout=config.get("dropout", 0.5),
        highpass=float(config.get("d_highpass", 0.0)),
    )


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy for the EMA generator."""
    ema = copy.deepcopy(module)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def ramped_decay(decay: float, t: int) -> float:
    """The EMA decay after ``t`` updates: min(decay, (1 + t) / (10 + t)), so an EMA started ``t`` steps ago is already
    an average of what it has seen (short CPU runs get a useful average)."""
    return min(float(decay), (1.0 + t) / (10.0 + t))


@torch.no_grad()
def ema_update(ema: nn.Module, module: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * module for the parameters; buffers (S's constant ball window) are copied."""
    for pe, p in zip(ema.parameters(), module.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), module.buffers()):
        be.copy_(b)
