"""SSV volume rotation: a marked voxel of the object volume lands where R = angles_to_matrix(a, e, t) says.

Camera convention (the synthetic renderer's, OpenGL): x right, y up, z towards the viewer; image rows run down.
"""
import math

import pytest
import torch

from common.geometry import angles_to_matrix
from ssv.networks import rotate_volume
from ssv.viewpoint import flip_angles

N = 32
#: the grid axes in camera coordinates as ssv.networks documents them (W: +x, H: -y, D: -z), written out here, not
#: imported, so that a change of ssv.networks.GRID_TO_CAMERA fails the marked-voxel tests
GRID = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))


def _axis_coords(n=N):
    # voxel-centre coordinates in [-1, 1] for align_corners=False
    return (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1


def blob_volume(p_obj, sigma=0.08):
    """A (1, 1, D, H, W) volume with a Gaussian blob at object point p_obj (x right, y up, z towards the camera)."""
    g = GRID @ torch.as_tensor(p_obj, dtype=torch.float64)  # grid coords (W, H, D)
    c = _axis_coords()
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")  # D, H, W
    d2 = (xx - g[0]) ** 2 + (yy - g[1]) ** 2 + (zz - g[2]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))[None, None]


def centroid_camera(volume):
    """Centroid of a (1, 1, D, H, W) volume in camera coordinates."""
    v = volume[0, 0].double().clamp_min(0)
    c = _axis_coords()
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    m = v.sum()
    g = torch.stack([(v * xx).sum() / m, (v * yy).sum() / m, (v * zz).sum() / m])
    return GRID @ g


def rotate(volume, a, e, t):
    R = angles_to_matrix(torch.tensor([a]), torch.tensor([e]), torch.tensor([t])).float()
    return rotate_volume(volume.float(), R)


@pytest.mark.parametrize(
    "p_obj, angles, expected",
    [
        # identity: nothing moves
        ((0.5, 0.2, -0.3), (0.0, 0.0, 0.0), (0.5, 0.2, -0.3)),
        # azimuth +90 deg (about y): the front of the object (+z, facing the camera) turns to the image right (+x)
        ((0.0, 0.0, 0.6), (math.pi / 2, 0.0, 0.0), (0.6, 0.0, 0.0)),
        # ... and its right side (+x) turns away from the camera (-z)
        ((0.6, 0.0, 0.0), (math.pi / 2, 0.0, 0.0), (0.0, 0.0, -0.6)),
        # elevation +90 deg (about x): the front (+z) goes down the image (-y)
        ((0.0, 0.0, 0.6), (0.0, math.pi / 2, 0.0), (0.0, -0.6, 0.0)),
        # tilt +90 deg (about the viewing axis z): +x goes up (+y), a counter-clockwise turn in the image
        ((0.6, 0.0, 0.0), (0.0, 0.0, math.pi / 2), (0.0, 0.6, 0.0)),
    ],
)
def test_marked_voxel_moves_by_R(p_obj, angles, expected):
    out = rotate(blob_volume(p_obj), *angles)
    got = centroid_camera(out)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=0.03), got


def test_marked_voxel_general_rotation():
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        a, e, t = ((torch.rand(3, generator=gen) * 2 - 1) * torch.tensor([2.5, 1.2, 2.5])).tolist()
        p = torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1
        p = 0.6 * p / p.norm()
        R = angles_to_matrix(torch.tensor(a), torch.tensor(e), torch.tensor(t)).double()
        got = centroid_camera(rotate(blob_volume(p), a, e, t))
        assert torch.allclose(got, R @ p, atol=0.03), (got, R @ p)


def test_projection_image_axes():
    """Collapsing depth (as S's projection does) puts camera x on image columns and camera y up the rows."""
    p = (0.0, 0.0, 0.6)
    out = rotate(blob_volume(p), math.radians(30), math.radians(20), 0.0)[0, 0]  # (D, H, W)
    image = out.sum(dim=0).double()  # (H, W), rows run down
    c = _axis_coords()
    col = (image.sum(0) * c).sum() / image.sum()
    row = (image.sum(1) * c).sum() / image.sum()
    R = angles_to_matrix(torch.tensor(math.radians(30)), torch.tensor(math.radians(20)), torch.tensor(0.0)).double()
    x, y, _ = (R @ torch.tensor(p, dtype=torch.float64)).tolist()
    assert col.item() == pytest.approx(x, abs=0.03)  # right of centre when x > 0
    assert row.item() == pytest.approx(-y, abs=0.03)  # above centre (smaller row) when y > 0


def test_mirror_symmetric_volume_flip_equivariance():
    """For a left-right symmetric object, the view under (-a, e, -t) is the mirror image of the view under (a, e, t)."""
    gen = torch.Generator().manual_seed(0)
    vol = torch.rand(1, 2, 16, 16, 16, generator=gen)
    vol = vol + torch.flip(vol, dims=[-1])  # symmetric in object x (= W)
    angles = torch.tensor([[0.7, -0.4, 0.3], [-1.2, 0.5, -0.6]])
    R = angles_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    Rf = angles_to_matrix(*flip_angles(angles).unbind(-1))
    vols = vol.expand(2, -1, -1, -1, -1)
    view, view_flipped = rotate_volume(vols, R), rotate_volume(vols, Rf)
    assert torch.allclose(view_flipped, torch.flip(view, dims=[-1]), atol=1e-5)
    # not true of a rotation that did nothing, or gave the two viewpoints one view
    assert (view - vols).abs().max() > 0.1 and (view_flipped - view).abs().max() > 0.1


def test_rotation_passes_gradient_to_angles():
    """Trilinear sampling (not the release's nearest) lets a loss on the image reach the angles."""
    vol = blob_volume((0.3, 0.1, 0.4)).float()
    angles = torch.tensor([[0.3, 0.2, 0.1]], requires_grad=True)
    R = angles_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    out = rotate_volume(vol, R)
    (out * torch.linspace(0, 1, N).view(1, 1, 1, 1, N)).sum().backward()
    assert angles.grad is not None and angles.grad.abs().sum() > 0


def test_rotation_onto_a_finer_grid():
    """Rotating a coarse volume straight onto a finer grid (the cpu preset's 8^3 -> 16^3) keeps the geometry."""
    p = torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64)
    coarse = torch.nn.functional.avg_pool3d(blob_volume(p.tolist(), sigma=0.15), 2)  # 16^3
    a, e, t = 0.5, -0.3, 0.2
    R = angles_to_matrix(torch.tensor([a]), torch.tensor([e]), torch.tensor([t])).float()
    out = rotate_volume(coarse.float(), R, size=N)
    assert out.shape == (1, 1, N, N, N)
    got = centroid_camera(out)
    assert torch.allclose(got, R[0].double() @ p, atol=0.04), got
