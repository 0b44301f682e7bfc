"""Headless OpenGL renderer (moderngl, EGL, Mesa's llvmpipe on CPU) for the synthetic benchmark.

Coordinates, camera and pixels -- every label of the benchmark follows this, and so do SSV's volume rotation and the
box-fitting metric
====================================================================================================================

**Object frame.** y is up; +z is the object's *front* (the side a viewer faces: a car's hood, a chair's seat edge, a
display's screen, a face); +x is the viewer's right when the object faces the camera (the object's own left side).
The origin is the centre of the object's axis-aligned bounding box (for heads: the centre of the skull).

**Camera frame (OpenGL).** The camera sits at the origin; x points right, y up, and the camera looks down -z
(z points from the scene towards the viewer). A point of the object maps to the camera frame by

    X_cam = R @ X_obj + t,        R = angles_to_matrix(azimuth, elevation, tilt) = R_y(az) @ R_x(el) @ R_z(tilt),

with t = (0, 0, -distance) for the ``objects`` and ``triplets`` kinds (the object origin sits on the optical axis),
t = (0, 0, -distance) plus a small framing jitter (up to 0.08 sideways, 4 % in depth) for ``heads``, and a general
per-frame t for ``sequences`` (``box_cx, box_cy, box_cz`` = t, since the box centre is the object origin).

**Projection to pixels.** u points right and v points down, in pixel units, continuous: the image spans
[0, W] x [0, H], pixel (row j, column i) covers u in [i, i+1) and v in [j, j+1) and its centre is (i + 0.5, j + 0.5).
A camera-frame point (X, Y, Z) with Z < 0 (in front of the camera) lands at

    u = cx + fx * X / (-Z),        v = cy - fy * Y / (-Z).

Equivalently (u, v, 1) ~ K @ diag(1, -1, -1) @ X_cam with K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]: the OpenCV
camera (x right, y down, z forward) is this camera rotated by pi about x. By default cx = W / 2 and cy = H / 2, so
the optical axis passes through the image centre, and fx = fy = (W / 2) / tan(fov / 2).

**What the angles do** (t on the optical axis; "front" = object +z, "top" = object +y). R acts on object points
right to left: first tilt about z, then elevation about x, then azimuth about y, all three axes being the camera's
(which coincide with the object's at the identity); equivalently, intrinsically, azimuth about y, then elevation
about the rotated x, then tilt about the twice-rotated z.

- (0, 0, 0): the front faces the camera, the top is image-up, object +x is image-right.
- azimuth alone: R_y(az) @ (0, 0, 1) = (sin az, 0, cos az). Positive azimuth turns the front towards the image
  right; az = +90 deg shows the object's -x side, az = -90 deg its +x side, 180 deg its back.
- elevation alone: R_x(el) @ (0, 1, 0) = (0, cos el, sin el). Positive elevation tips the top towards the camera:
  the camera looks down on the object (el = +90 deg is the top view) and the front moves down in the image.
- tilt alone: positive tilt rotates the image content counter-clockwise (object +x moves to image-up).
- where the camera is, seen from the object: the unit vector R^T @ (0, 0, 1) (the third row of R).
- upright cameras (``look_at_rotation``, used for the Fib(n) views, triplet centres and sequences): a camera at
  longitude phi (from +z towards +x) and latitude theta (above the object's horizon) has R = R_x(theta) @ R_y(-phi).
  That is a different order from R_y(az) R_x(el), so its labels (from ``matrix_to_angles``) generally carry a
  non-zero tilt; at phi = 0 they are (0, theta, 0), at theta = 0 they are (-phi, 0, 0).
- heads: azimuth = yaw, elevation = pitch, tilt = roll. Positive yaw turns the face to the image right (the
  subject's left), positive pitch lowers the chin (the camera sees the top of the head), positive roll tips the
  head counter-clockwise in the image.

Rendering: Lambert + Blinn-Phong with one directional light given in camera coordinates, ambient term, per-vertex
colours, a vertical/diagonal colour-gradient background, and antialiasing by supersampling (render ``supersample``
times larger, box-filter down). Images come back as (H, W, 3) uint8 RGB with row 0 at the top.

The OpenGL context is created lazily, once per process, with ``backend="egl"`` (no X display needed), and again in
a forked child (a DataLoader worker) the first time it renders: :func:`get_renderer`. Mesa's llvmpipe runs with
``LP_NUM_THREADS=0`` (set unless the environment sets it): its rasteriser threads would not survive the fork.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...errors import ViewsslError

log = logging.getLogger("viewssl.data.render")

__all__ = ["Camera", "Light", "Background", "Renderer", "get_renderer", "project"]


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels for a ``width`` x ``height`` image (see the module docstring for the convention)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_fov(cls, size: int, fov_deg: float) -> "Camera":
        """Square image, principal point at the centre, horizontal and vertical field of view ``fov_deg``."""
        f = (size / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
        return cls(f, f, size / 2.0, size / 2.0, size, size)

    def scaled(self, s: float) -> "Camera":
        """The same camera for an image ``s`` times larger (continuous pixel coordinates scale exactly)."""
        return Camera(self.fx * s, self.fy * s, self.cx * s, self.cy * s, int(round(self.width * s)),
                      int(round(self.height * s)))

    def opengl_projection(self, near: float = 0.05, far: float = 100.0) -> np.ndarray:
        """The 4x4 OpenGL projection matrix (column-vector convention) equivalent to :func:`project`."""
        W, H = self.width, self.height
        P = np.zeros((4, 4), dtype=np.float64)
        P[0, 0] = 2.0 * self.fx / W
        P[0, 2] = 1.0 - 2.0 * self.cx / W
        P[1, 1] = 2.0 * self.fy / H
        P[1, 2] = 2.0 * self.cy / H - 1.0
        P[2, 2] = -(far + near) / (far - near)
        P[2, 3] = -2.0 * far * near / (far - near)
        P[3, 2] = -1.0
        return P


def project(points_cam: np.ndarray, camera: Camera) -> np.ndarray:
    """Camera-frame points (..., 3) with Z < 0 -> pixel coordinates (..., 2) as (u right, v down)."""
    p = np.asarray(points_cam, dtype=np.float64)
    depth = -p[..., 2]
    u = camera.cx + camera.fx * p[..., 0] / depth
    v = camera.cy - camera.fy * p[..., 1] / depth
    return np.stack([u, v], axis=-1)


@dataclass(frozen=True)
class Light:
    """A directional light in **camera** coordinates (``direction`` points from the scene towards the light)."""

    direction: tuple[float, float, float] = (0.4, 0.6, 0.7)
    ambient: float = 0.35
    diffuse: float = 0.75
    specular: float = 0.15
    shininess: float = 24.0


@dataclass(frozen=True)
class Background:
    """A linear gradient from ``color0`` to ``color1`` (RGB in [0, 1]) along the image direction ``angle`` (radians,
    0 = top to bottom, pi/2 = left to right)."""

    color0: tuple[float, float, float] = (0.0, 0.0, 0.0)
    color1: tuple[float, float, float] = (0.0, 0.0, 0.0)
    angle: float = 0.0

    def image(self, height: int, width: int) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1]: the gradient the renderer puts behind the scene (its resolve shader computes
        the same formula per pixel centre)."""
        v = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
        u = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
        ramp = np.cos(self.angle) * v[:, None] + np.sin(self.angle) * u[None, :]
        ramp = np.clip(ramp / math.sqrt(0.5) + 0.5, 0.0, 1.0)[..., None]
        c0 = np.asarray(self.color0, dtype=np.float32)
        c1 = np.asarray(self.color1, dtype=np.float32)
        return c0 + (c1 - c0) * ramp


_VERTEX_SHADER = """
#version 330
uniform mat3 u_rotation;
uniform vec3 u_translation;
uniform mat4 u_projection;
in vec3 in_position;
in vec3 in_normal;
in vec3 in_color;
out vec3 v_position;
out vec3 v_normal;
out vec3 v_color;
void main() {
    vec3 p = u_rotation * in_position + u_translation;
    v_position = p;
    v_normal = u_rotation * in_normal;
    v_color = in_color;
    gl_Position = u_projection * vec4(p, 1.0);
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 u_light_dir;
uniform float u_ambient;
uniform float u_diffuse;
uniform float u_specular;
uniform float u_shininess;
uniform float u_label;
in vec3 v_position;
in vec3 v_normal;
in vec3 v_color;
out vec4 f_color;
void main() {
    vec3 n = normalize(v_normal);
    vec3 view = normalize(-v_position);
    if (dot(n, view) < 0.0) n = -n;           // two-sided lighting
    vec3 l = normalize(u_light_dir);
    float lambert = max(dot(n, l), 0.0);
    float spec = pow(max(dot(n, normalize(l + view)), 0.0), u_shininess);
    vec3 c = v_color * (u_ambient + u_diffuse * lambert) + u_specular * spec;
    f_color = vec4(clamp(c, 0.0, 1.0), u_label);
}
"""


# Second pass: one fragment per output pixel averages its s x s block of the supersampled render (premultiplied
# colour, coverage by any geometry, coverage by the object), then puts the background gradient behind it.
_RESOLVE_VERTEX_SHADER = """
#version 330
void main() {
    vec2 corners[3] = vec2[3](vec2(-1.0, -1.0), vec2(3.0, -1.0), vec2(-1.0, 3.0));
    gl_Position = vec4(corners[gl_VertexID], 0.0, 1.0);
}
"""

_RESOLVE_FRAGMENT_SHADER = """
#version 330
uniform sampler2D u_scene;
uniform int u_factor;
uniform vec2 u_size;          // output width, height
uniform vec3 u_bg0;
uniform vec3 u_bg1;
uniform vec2 u_bg_dir;        // (cos angle, sin angle)
out vec4 f_color;
void main() {
    ivec2 p = ivec2(gl_FragCoord.xy);            // OpenGL pixel, row 0 at the bottom
    vec3 rgb = vec3(0.0);
    float covered = 0.0;
    float object = 0.0;
    for (int dy = 0; dy < u_factor; ++dy) {
        for (int dx = 0; dx < u_factor; ++dx) {
            vec4 t = texelFetch(u_scene, p * u_factor + ivec2(dx, dy), 0);
            rgb += t.rgb;
            covered += t.a > 0.0 ? 1.0 : 0.0;
            object += t.a > 0.75 ? 1.0 : 0.0;
        }
    }
    float n = float(u_factor * u_factor);
    rgb /= n;
    covered /= n;
    object /= n;
    // image coordinates of the pixel centre in [-0.5, 0.5], v pointing down
    float u = gl_FragCoord.x / u_size.x - 0.5;
    float v = 0.5 - gl_FragCoord.y / u_size.y;
    float ramp = clamp((u_bg_dir.x * v + u_bg_dir.y * u) / sqrt(0.5) + 0.5, 0.0, 1.0);
    vec3 bg = mix(u_bg0, u_bg1, ramp);
    f_color = vec4(rgb + (1.0 - covered) * bg, object);
}
"""


def _preload_triton() -> None:
    """Import triton (if installed) before the EGL context exists: loading it afterwards segfaults the process, and
    torch imports it lazily (torchvision, torch._dynamo), so any later model code would crash."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or broken: then nothing will import it later either
        pass


class Renderer:
    """Renders triangle meshes (objects exposing ``key`` and ``vertex_data``: (N, 9) float32 rows of position,
    normal, colour) into uint8 RGB images. Use :func:`get_renderer` rather than building one: it owns a GL context.
    """

    #: alpha written for object pixels; ground/scenery meshes write ``SCENERY_LABEL``; empty pixels stay 0
    OBJECT_LABEL = 1.0
    SCENERY_LABEL = 0.5

    def __init__(self, cache_size: int = 512):
        import moderngl

        # llvmpipe's rasteriser threads do not survive fork(): a DataLoader worker forked from a process that has
        # rendered would hang creating its own context. Rasterising in the calling thread avoids that, and is as
        # fast for these small images (one process per core is the way to scale). Set LP_NUM_THREADS to override.
        os.environ.setdefault("LP_NUM_THREADS", "0")
        _preload_triton()
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as e:  # missing libEGL / Mesa
            raise ViewsslError(
                f"cannot create a headless OpenGL (EGL) context for the synthetic renderer ({e}); on Debian/Ubuntu "
                "install libegl1, libgl1 and libgl1-mesa-dri"
            ) from e
        self.pid = os.getpid()
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.resolve = self.ctx.program(vertex_shader=_RESOLVE_VERTEX_SHADER,
                                        fragment_shader=_RESOLVE_FRAGMENT_SHADER)
        self._resolve_vao = self.ctx.vertex_array(self.resolve, [])
        self._framebuffers: dict[tuple, tuple] = {}
        self._meshes: OrderedDict[str, tuple] = OrderedDict()
        self.cache_size = cache_size
        log.debug("OpenGL context: %s", self.ctx.info.get("GL_RENDERER"))

    def _framebuffers_for(self, width: int, height: int, factor: int):
        """(scene framebuffer, its colour texture, output framebuffer) for an output size and supersampling."""
        key = (width, height, factor)
        if key not in self._framebuffers:
            big = (width * factor, height * factor)
            texture = self.ctx.texture(big, 4)
            texture.filter = (self.ctx.NEAREST, self.ctx.NEAREST)
            scene = self.ctx.framebuffer(color_attachments=[texture],
                                         depth_attachment=self.ctx.depth_renderbuffer(big))
            out = self.ctx.framebuffer(color_attachments=[self.ctx.renderbuffer((width, height), components=4)])
            self._framebuffers[key] = (scene, texture, out)
        return self._framebuffers[key]

    def _vertex_array(self, mesh):
        entry = self._meshes.get(mesh.key)
        if entry is not None:
            self._meshes.move_to_end(mesh.key)
            return entry[1]
        data = np.ascontiguousarray(mesh.vertex_data, dtype=np.float32)
        vbo = self.ctx.buffer(data.tobytes())
        vao = self.ctx.vertex_array(self.program, [(vbo, "3f 3f 3f", "in_position", "in_normal", "in_color")])
        self._meshes[mesh.key] = (vbo, vao)
        while len(self._meshes) > self.cache_size:
            _, (old_vbo, old_vao) = self._meshes.popitem(last=False)
            old_vao.release()
            old_vbo.release()
        return vao

    def render(
        self,
        meshes: Sequence,
        rotation: np.ndarray,
        translation: np.ndarray,
        camera: Camera,
        light: Light = Light(),
        background: Background = Background(),
        supersample: int = 2,
        scenery: Sequence = (),
        with_mask: bool = False,
    ):
        """Render ``meshes`` (the object) and ``scenery`` (e.g. a ground plane), both placed with
        X_cam = rotation @ X + translation, seen through ``camera``.

        Returns (H, W, 3) uint8 RGB, and with ``with_mask`` also the (H, W) float32 fraction of each pixel covered by
        the object (scenery excluded).
        """
        s = int(supersample)
        big = camera.scaled(s)
        scene, texture, out = self._framebuffers_for(camera.width, camera.height, s)
        scene.use()
        # Every mesh is closed and wound counter-clockwise seen from outside: cull back faces (about 2x faster).
        self.ctx.enable(self.ctx.DEPTH_TEST | self.ctx.CULL_FACE)
        scene.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        prog = self.program
        # GLSL matrices are column-major: pass the transpose's row-major bytes.
        prog["u_rotation"].write(np.asarray(rotation, dtype=np.float32).T.tobytes())
        prog["u_translation"].value = tuple(float(x) for x in translation)
        prog["u_projection"].write(big.opengl_projection().astype(np.float32).T.tobytes())
        d = np.asarray(light.direction, dtype=np.float64)
        prog["u_light_dir"].value = tuple(float(x) for x in d / np.linalg.norm(d))
        prog["u_ambient"].value = float(light.ambient)
        prog["u_diffuse"].value = float(light.diffuse)
        prog["u_specular"].value = float(light.specular)
        prog["u_shininess"].value = float(light.shininess)
        for group, label in ((meshes, self.OBJECT_LABEL), (scenery, self.SCENERY_LABEL)):
            prog["u_label"].value = label
            for mesh in group:
                self._vertex_array(mesh).render()
        # resolve: average the s x s blocks and composite over the background
        out.use()
        self.ctx.disable(self.ctx.DEPTH_TEST | self.ctx.CULL_FACE)
        texture.use(0)
        res = self.resolve
        res["u_scene"].value = 0
        res["u_factor"].value = s
        res["u_size"].value = (float(camera.width), float(camera.height))
        res["u_bg0"].value = tuple(float(c) for c in background.color0)
        res["u_bg1"].value = tuple(float(c) for c in background.color1)
        res["u_bg_dir"].value = (math.cos(background.angle), math.sin(background.angle))
        self._resolve_vao.render(mode=self.ctx.TRIANGLES, vertices=3)
        raw = np.frombuffer(out.read(components=4, dtype="f1"), dtype=np.uint8)
        rgba = raw.reshape(camera.height, camera.width, 4)[::-1]  # OpenGL row 0 is the bottom
        image = np.ascontiguousarray(rgba[..., :3])
        if not with_mask:
            return image
        return image, rgba[..., 3].astype(np.float32) / 255.0


_RENDERER: Renderer | None = None


def get_renderer() -> Renderer:
    """The process's renderer, created on first use; a forked child (DataLoader worker) gets its own context."""
    global _RENDERER
    if _RENDERER is None or _RENDERER.pid != os.getpid():
        # Never touch (or release) a context inherited through fork: it belongs to the parent's driver state.
        _RENDERER = Renderer()
    return _RENDERER
