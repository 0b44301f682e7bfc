"""Procedural object categories: the ShapeNet analog of the synthetic benchmark.

Each category is one small function ``name(b: Builder)`` that adds coloured parametric parts; every proportion and
colour is drawn from ``b`` (a seeded :class:`~.parts.Builder`), so one (category, seed) pair is one instance.
Frame: y up, +z is the object's front (a car's hood, a chair's seat edge, a screen), +x the viewer's right when the
object faces the camera. Categories whose real counterpart has a front are built asymmetric front/back (and
top/bottom), so their pose is identifiable from a single view; :func:`build_object` centres the bounding box on
the origin and scales its half-diagonal to 1.

The split follows the trajectory paper (3D-R2N2's 13 ShapeNet categories in-domain, 11 out-of-domain):
:data:`IN_DOMAIN`, :data:`OUT_OF_DOMAIN`.
"""
from __future__ import annotations

import math
import zlib
from functools import lru_cache
from typing import Callable

import numpy as np

from .parts import Builder, TriangleMesh, hsv

__all__ = ["CATEGORIES", "IN_DOMAIN", "OUT_OF_DOMAIN", "build_object", "instance_rng"]

GLASS = (0.08, 0.11, 0.16)
LIGHT = (1.0, 0.97, 0.8)
RED_LIGHT = (0.85, 0.08, 0.06)


# ---------------------------------------------------------------------------------------------------------------
# In-domain categories (13)
# ---------------------------------------------------------------------------------------------------------------
def airplane(b: Builder) -> None:
    """Fuselage along z (nose +z), swept wings, fin on top at the back, optional engines under the wings."""
    L, r = b.u(3.0, 4.5), b.u(0.18, 0.28)
    body = hsv(b.u(0, 1), b.u(0.0, 0.15), b.u(0.75, 0.95))
    accent = b.color(sat=(0.6, 0.9), val=(0.4, 0.8))
    b.capsule(r, L, (0, 0, 0), body, axis="z")
    b.sphere(r * 0.7, (0, r * 0.55, L / 2 - r * 1.4), GLASS, scale=(1.0, 0.5, 1.6))
    span, root = b.u(1.6, 2.4), b.u(0.6, 1.0)
    tip, sweep, zw = root * b.u(0.3, 0.6), b.u(0.2, 0.8), b.u(0.0, 0.4)
    for side in (-1, 1):
        b.prism([(0, zw), (side * span, zw - sweep), (side * span, zw - sweep - tip), (0, zw - root)], 0.06,
                (0, -r * 0.35, 0), body, axis="y")
    zt, fin_h, fin_c = -L / 2, b.u(0.5, 0.8), b.u(0.5, 0.8)
    b.prism([(zt + fin_c, r * 0.5), (zt + 0.25, r * 0.5 + fin_h), (zt - 0.05, r * 0.5 + fin_h),
             (zt - 0.05, r * 0.5)], 0.05, (0, 0, 0), accent, axis="x")
    hs = b.u(0.5, 0.8)
    for side in (-1, 1):
        b.prism([(0, zt + 0.55), (side * hs, zt + 0.2), (side * hs, zt + 0.02), (0, zt)], 0.04, (0, r * 0.2, 0),
                accent, axis="y")
    if b.chance(0.75):
        for side in (-1, 1):
            for frac in ((0.35,) if b.chance(0.6) else (0.3, 0.6)):
                x = side * span * frac
                z = zw - sweep * frac - root * 0.15
                b.cylinder(r * 0.45, root * 0.7, (x, -r * 0.35 - r * 0.5, z), b.metal(), axis="z")


def car(b: Builder) -> None:
    """Body box, glass cabin set back (long hood, short trunk), four wheels, headlights front, red lights back."""
    kind = b.choice(["sedan", "hatch", "suv"])
    length, width = b.u(3.8, 4.8), b.u(1.6, 1.9)
    clear = b.u(0.18, 0.3) if kind != "suv" else b.u(0.3, 0.4)
    body_h = b.u(0.45, 0.6)
    cabin_h = b.u(0.4, 0.55) if kind != "suv" else b.u(0.55, 0.75)
    hood = b.u(0.9, 1.3)
    trunk = {"sedan": b.u(0.6, 0.9), "hatch": b.u(0.15, 0.3), "suv": b.u(0.1, 0.2)}[kind]
    paint = b.color(sat=(0.5, 0.95), val=(0.35, 0.9)) if b.chance(0.7) else hsv(0, 0, b.u(0.15, 0.9))
    yb = clear + body_h
    b.box((width, body_h, length), (0, clear + body_h / 2, 0), paint)
    zf, zr = length / 2 - hood, -length / 2 + trunk
    slope_f, slope_r = b.u(0.4, 0.7), b.u(0.1, 0.5)
    b.prism([(zr, yb), (zf, yb), (zf - slope_f, yb + cabin_h), (zr + slope_r, yb + cabin_h)], width * 0.88,
            (0, 0, 0), GLASS, axis="x")
    b.box((width * 0.88 + 0.02, 0.05, (zf - slope_f) - (zr + slope_r)), (0, yb + cabin_h, (zf - slope_f + zr +
          slope_r) / 2), paint)
    wr = b.u(0.3, 0.38)
    for z in (length / 2 - b.u(0.7, 0.9), -length / 2 + b.u(0.7, 0.9)):
        for side in (-1, 1):
            b.cylinder(wr, 0.24, (side * (width / 2 - 0.1), wr, z), (0.06, 0.06, 0.06), axis="x")
            b.cylinder(wr * 0.55, 0.26, (side * (width / 2 - 0.1), wr, z), b.metal(), axis="x")
    for side in (-1, 1):
        b.box((0.32, 0.12, 0.04), (side * (width / 2 - 0.28), clear + body_h * 0.72, length / 2), LIGHT)
        b.box((0.3, 0.1, 0.04), (side * (width / 2 - 0.25), clear + body_h * 0.75, -length / 2), RED_LIGHT)
    b.box((width * 0.38, body_h * 0.3, 0.04), (0, clear + body_h * 0.45, length / 2), (0.1, 0.1, 0.1))


def chair(b: Builder) -> None:
    """Seat on four legs, backrest at the back (-z), optional armrests."""
    w, d, h = b.u(0.4, 0.55), b.u(0.4, 0.5), b.u(0.42, 0.5)
    frame = b.wood() if b.chance(0.6) else b.metal()
    seat = b.color(sat=(0.3, 0.8), val=(0.3, 0.85)) if b.chance(0.6) else frame
    t, leg = 0.05, b.u(0.03, 0.05)
    back_h = b.u(0.35, 0.6)
    for sx in (-1, 1):
        for sz in (-1, 1):
            top = h + back_h if sz < 0 else h
            b.box((leg, top, leg), (sx * (w / 2 - leg / 2), top / 2, sz * (d / 2 - leg / 2)), frame)
    b.box((w, t, d), (0, h, 0), seat)
    if b.chance(0.5):
        b.box((w - 2 * leg, back_h * b.u(0.5, 0.8), 0.03), (0, h + back_h * 0.55, -d / 2 + leg / 2), seat)
    else:
        for k in range(b.integer(2, 4)):
            b.box((w - 2 * leg, 0.04, 0.025), (0, h + back_h * (0.3 + 0.2 * k), -d / 2 + leg / 2), frame)
        b.box((w, 0.06, 0.035), (0, h + back_h, -d / 2 + leg / 2), frame)
    if b.chance(0.35):
        for sx in (-1, 1):
            b.box((0.05, 0.04, d), (sx * (w / 2 - 0.025), h + 0.22, 0.0), frame)
            b.box((0.03, 0.22, 0.03), (sx * (w / 2 - 0.025), h + 0.11, d / 2 - 0.05), frame)


def table(b: Builder) -> None:
    """Top on four legs with an apron; a drawer with a knob at the front (+z), a panel at the back."""
    w, d, h = b.u(1.0, 1.8), b.u(0.6, 1.0), b.u(0.7, 0.78)
    t, leg = b.u(0.04, 0.07), b.u(0.05, 0.08)
    wood = b.wood() if b.chance(0.7) else b.color(sat=(0.0, 0.3), val=(0.2, 0.9))
    legs = wood if b.chance(0.6) else b.metal()
    b.box((w, t, d), (0, h - t / 2, 0), wood)
    for sx in (-1, 1):
        for sz in (-1, 1):
            b.box((leg, h - t, leg), (sx * (w / 2 - leg), (h - t) / 2, sz * (d / 2 - leg)), legs)
    apron = 0.1
    b.box((w - 2 * leg, apron, d - 2 * leg), (0, h - t - apron / 2, 0), wood)
    dw = w * b.u(0.25, 0.4)
    dx = b.u(-0.25, 0.25) * w
    drawer = tuple(c * 0.8 for c in wood)
    b.box((dw, apron * 0.8, 0.02), (dx, h - t - apron / 2, d / 2 - leg + 0.01), drawer)
    b.sphere(0.02, (dx, h - t - apron / 2, d / 2 - leg + 0.03), b.metal(), subdivisions=1)
    if b.chance(0.6):
        b.box((w - 2 * leg, (h - t) * b.u(0.35, 0.6), 0.02), (0, h - t - apron - (h - t) * 0.2, -d / 2 + leg),
              wood)


def lamp(b: Builder) -> None:
    """Desk lamp: round base, two arm segments, conical shade aimed forward and down (+z), bulb inside."""
    base_r = b.u(0.12, 0.18)
    metal = b.metal() if b.chance(0.5) else b.color(sat=(0.5, 0.9), val=(0.4, 0.9))
    shade = metal if b.chance(0.5) else b.color(sat=(0.5, 0.9), val=(0.4, 0.9))
    b.cylinder(base_r, 0.04, (0, 0.02, -0.05), metal, sections=20)
    p0 = np.array([0.0, 0.04, -0.05])
    a1, t1 = b.u(0.35, 0.5), math.radians(b.u(-25, 5))
    p1 = p0 + a1 * np.array([0.0, math.cos(t1), math.sin(t1)])
    a2, e2 = b.u(0.3, 0.45), math.radians(b.u(-25, 15))
    p2 = p1 + a2 * np.array([0.0, math.sin(e2), math.cos(e2)])
    b.rod(p0, p1, 0.015, metal)
    b.rod(p1, p2, 0.015, metal)
    b.sphere(0.025, p1, metal, subdivisions=1)
    aim = np.array([0.0, -1.0, b.u(0.3, 1.0)])
    aim /= np.linalg.norm(aim)
    shade_len, shade_r = b.u(0.12, 0.18), b.u(0.08, 0.12)
    b.cone_between(p2 + aim * shade_len, p2 - aim * 0.02, shade_r, shade, sections=20)
    b.sphere(shade_r * 0.45, p2 + aim * shade_len * 0.8, LIGHT, subdivisions=1)


def sofa(b: Builder) -> None:
    """Base with seat cushions, thick back at -z, armrests at +-x, short legs."""
    W, D = b.u(1.6, 2.4), b.u(0.8, 1.0)
    leg_h, base_h = b.u(0.05, 0.12), b.u(0.2, 0.28)
    fabric = b.color(sat=(0.2, 0.7), val=(0.25, 0.8))
    cushion = tuple(min(1.0, c * 1.12) for c in fabric)
    back_t, back_h = b.u(0.18, 0.25), b.u(0.4, 0.55)
    arm_w, arm_h = b.u(0.12, 0.22), b.u(0.2, 0.32)
    y0 = leg_h + base_h
    b.box((W, base_h, D), (0, leg_h + base_h / 2, 0), fabric)
    b.box((W, back_h, back_t), (0, y0 + back_h / 2, -D / 2 + back_t / 2), fabric)
    for sx in (-1, 1):
        b.box((arm_w, arm_h, D), (sx * (W / 2 - arm_w / 2), y0 + arm_h / 2, 0), fabric)
    n = b.integer(2, 3)
    inner = W - 2 * arm_w
    for k in range(n):
        x = -inner / 2 + inner * (k + 0.5) / n
        b.box((inner / n - 0.02, 0.12, D - back_t - 0.04), (x, y0 + 0.06, back_t / 2), cushion)
        if b.chance(0.5):
            b.box((inner / n - 0.03, back_h * 0.7, 0.1), (x, y0 + 0.12 + back_h * 0.3, -D / 2 + back_t + 0.05),
                  cushion, rotate=(("x", -10),))
    legs = b.dark() if b.chance(0.5) else b.wood()
    for sx in (-1, 1):
        for sz in (-1, 1):
            b.cylinder(0.03, leg_h, (sx * (W / 2 - 0.08), leg_h / 2, sz * (D / 2 - 0.08)), legs, sections=8)


def boat(b: Builder) -> None:
    """Hull with a pointed bow (+z) and square stern; either a motor boat (cabin, outboard) or a sailboat."""
    L, B, Hh = b.u(3.0, 5.0), b.u(1.0, 1.6), b.u(0.5, 0.8)
    hull = b.color(sat=(0.0, 0.9), val=(0.3, 0.95))
    outline = [(-B / 2, -L / 2), (B / 2, -L / 2), (B / 2, L * 0.12), (B * 0.3, L * 0.38), (0, L / 2),
               (-B * 0.3, L * 0.38), (-B / 2, L * 0.12)]
    b.prism(outline, Hh, (0, Hh / 2, 0), hull, axis="y")
    keel = [(x * 0.8, z * 0.9 - 0.05 * L) for x, z in outline]
    b.prism(keel, 0.2, (0, -0.1, 0), b.color((0.95, 1.05), (0.6, 0.9), (0.3, 0.6)), axis="y")
    b.prism([(x * 0.95, z * 0.96) for x, z in outline], 0.02, (0, Hh + 0.01, 0), b.wood(), axis="y")
    if b.chance(0.5):
        ch, cz = b.u(0.4, 0.7), b.u(-0.15, 0.1) * L
        b.box((B * 0.6, ch, L * 0.3), (0, Hh + ch / 2, cz), hsv(0, 0, 0.92))
        b.box((B * 0.62, ch * 0.35, L * 0.25), (0, Hh + ch * 0.65, cz + 0.02), GLASS)
        b.box((0.25, 0.6, 0.25), (0, Hh * 0.7, -L / 2 - 0.12), b.dark())
    else:
        zm, top = L * b.u(0.0, 0.15), Hh + b.u(2.5, 3.8)
        b.rod((0, Hh, zm), (0, top, zm), 0.04, b.metal())
        b.rod((0, Hh + 0.35, zm), (0, Hh + 0.35, zm - L * 0.55), 0.03, b.metal())
        b.prism([(zm - 0.05, Hh + 0.4), (zm - 0.05, top - 0.1), (zm - L * 0.55, Hh + 0.4)], 0.02, (0, 0, 0),
                hsv(b.u(0, 1), b.u(0, 0.25), 0.95), axis="x")


def bench(b: Builder) -> None:
    """Park bench: wooden slats for seat and a reclined back (-z), dark side frames, optional armrests."""
    W, d, h = b.u(1.2, 1.8), b.u(0.4, 0.5), b.u(0.42, 0.48)
    frame = b.dark() if b.chance(0.6) else b.metal()
    slat = b.wood() if b.chance(0.8) else b.color(sat=(0.4, 0.8), val=(0.4, 0.8))
    n = b.integer(3, 4)
    for k in range(n):
        z = -d / 2 + d * (k + 0.5) / n
        b.box((W, 0.03, d / n - 0.015), (0, h, z), slat)
    back_h, lean = b.u(0.3, 0.45), b.u(8, 18)
    n2 = b.integer(2, 3)
    for k in range(n2):
        y = h + 0.1 + back_h * (k + 0.5) / n2
        z = -d / 2 - 0.02 - (y - h) * math.tan(math.radians(lean))
        b.box((W, back_h / n2 - 0.03, 0.03), (0, y, z), slat, rotate=(("x", -lean),))
    for sx in (-1, 1):
        x = sx * (W / 2 - 0.08)
        b.box((0.05, h, 0.05), (x, h / 2, d / 2 - 0.05), frame)
        top = h + 0.1 + back_h
        b.rod((x, 0, -d / 2 + 0.02), (x, top, -d / 2 - 0.02 - (top - h) * math.tan(math.radians(lean))), 0.03,
              frame, sections=8)
        b.box((0.05, 0.03, d), (x, h - 0.04, 0), frame)
        if b.chance(0.7):
            b.box((0.05, 0.04, d * 0.9), (x, h + 0.22, 0.02), frame)
            b.box((0.04, 0.22, 0.04), (x, h + 0.11, d / 2 - 0.05), frame)


def loudspeaker(b: Builder) -> None:
    """Cabinet with woofer(s) and a tweeter on the front (+z), optional bass port."""
    W, H, D = b.u(0.2, 0.35), b.u(0.35, 1.0), b.u(0.22, 0.35)
    cab = b.choice([b.dark(), b.wood(), hsv(0, 0, b.u(0.8, 0.95))])
    b.box((W, H, D), (0, H / 2, 0), cab)
    n = 1 if H < 0.6 else b.integer(1, 2)
    rw = W * 0.38
    for k in range(n):
        y = H * 0.3 + k * rw * 2.3
        b.cylinder(rw, 0.03, (0, y, D / 2 + 0.01), (0.05, 0.05, 0.05), axis="z", sections=20)
        b.sphere(rw * 0.3, (0, y, D / 2 + 0.02), b.metal(), scale=(1, 1, 0.4), subdivisions=1)
    b.cylinder(W * 0.13, 0.03, (0, H - W * 0.28, D / 2 + 0.01), b.metal(), axis="z", sections=16)
    if b.chance(0.5):
        b.cylinder(W * 0.08, 0.02, (0, H * 0.08 + W * 0.1, D / 2 + 0.002), (0.0, 0.0, 0.0), axis="z")


def cabinet(b: Builder) -> None:
    """Box on a dark plinth; doors or drawers with metal handles on the front (+z)."""
    W, H, D = b.u(0.6, 1.2), b.u(0.7, 1.8), b.u(0.4, 0.6)
    body = b.wood() if b.chance(0.6) else b.color(sat=(0.0, 0.5), val=(0.3, 0.95))
    front = tuple(min(1.0, c * b.u(0.8, 1.15)) for c in body)
    plinth = 0.08
    b.box((W, H - plinth, D), (0, plinth + (H - plinth) / 2, 0), body)
    b.box((W - 0.06, plinth, D - 0.06), (0, plinth / 2, -0.02), b.dark())
    b.box((W + 0.04, 0.03, D + 0.03), (0, H + 0.015, 0.0), body)
    gap = 0.015
    if b.chance(0.5):
        for sx in (-1, 1):
            b.box((W / 2 - 2 * gap, H - plinth - 2 * gap, 0.02), (sx * W / 4, plinth + (H - plinth) / 2, D / 2),
                  front)
            b.box((0.02, 0.12, 0.02), (sx * 0.05, plinth + (H - plinth) * 0.6, D / 2 + 0.02), b.metal())
    else:
        n = b.integer(3, 5)
        hd = (H - plinth) / n
        for k in range(n):
            y = plinth + hd * (k + 0.5)
            b.box((W - 2 * gap, hd - 2 * gap, 0.02), (0, y, D / 2), front)
            b.box((W * 0.2, 0.02, 0.02), (0, y + hd * 0.2, D / 2 + 0.02), b.metal())


def display(b: Builder) -> None:
    """Monitor: thin panel with the screen on +z, a bulge at the back, neck and foot behind."""
    W = b.u(0.5, 0.75)
    H, T = W * b.u(0.55, 0.68), b.u(0.03, 0.05)
    bezel = b.dark() if b.chance(0.6) else hsv(0, 0, b.u(0.7, 0.92))
    Ys = b.u(0.3, 0.42)
    b.box((W, H, T), (0, Ys, 0), bezel)
    bez, chin = b.u(0.01, 0.03), b.u(0.0, 0.04)
    screen = GLASS if b.chance(0.5) else b.color(sat=(0.3, 0.7), val=(0.5, 0.9))
    b.box((W - 2 * bez, H - 2 * bez - chin, 0.006), (0, Ys + chin / 2, T / 2 + 0.003), screen)
    b.box((W * 0.55, H * 0.55, T), (0, Ys - H * 0.05, -T * 0.9), bezel)
    b.box((0.06, Ys - 0.02, 0.03), (0, Ys / 2, -T * 1.5), bezel)
    b.box((W * 0.45, 0.02, 0.2), (0, 0.01, -T * 1.5 + 0.04), bezel)


def rifle(b: Builder) -> None:
    """Barrel along +x, receiver, wooden stock at -x, grip and magazine below, scope on top, bolt on +z."""
    metal = b.dark() if b.chance(0.6) else b.metal()
    furniture = b.wood() if b.chance(0.6) else b.dark()
    Lb = b.u(0.5, 0.75)
    b.box((0.35, 0.08, 0.05), (0, 0, 0), metal)
    b.cylinder(0.014, Lb, (0.17 + Lb / 2, 0.015, 0), metal, axis="x", sections=10)
    b.box((0.32, 0.06, 0.055), (0.32, -0.01, 0), furniture)
    sl = b.u(0.4, 0.5)
    b.prism([(-0.17, 0.035), (-0.17 - sl, 0.02), (-0.17 - sl, -0.15), (-0.17, -0.06)], 0.045, (0, 0, 0), furniture,
            axis="z")
    b.box((0.04, 0.11, 0.035), (-0.12, -0.09, 0), furniture, rotate=(("z", -20),))
    mag = b.u(0.1, 0.2)
    b.box((0.06, mag, 0.03), (0.05, -0.04 - mag / 2, 0), metal, rotate=(("z", -10),))
    b.torus(0.03, 0.006, (-0.04, -0.06, 0), metal, axis="z", sections=(12, 6))
    if b.chance(0.6):
        b.cylinder(0.022, 0.3, (0.0, 0.085, 0), (0.05, 0.05, 0.05), axis="x", sections=12)
        b.cylinder(0.03, 0.05, (0.14, 0.085, 0), (0.05, 0.05, 0.05), axis="x", sections=12)
    b.rod((-0.05, 0.02, 0.025), (-0.05, 0.0, 0.09), 0.006, metal, sections=6)
    b.sphere(0.013, (-0.05, 0.0, 0.09), metal, subdivisions=1)
    b.box((0.02, 0.03, 0.01), (0.15 + Lb, 0.045, 0), metal)


def telephone(b: Builder) -> None:
    """Smartphone standing upright: screen and speaker slit on +z, camera bump on the back, side buttons on +x."""
    W = b.u(0.065, 0.08)
    H, T = W * b.u(1.9, 2.2), b.u(0.009, 0.013)
    body = b.choice([b.dark(), hsv(0, 0, b.u(0.8, 0.95)), b.color(sat=(0.2, 0.5), val=(0.6, 0.9)), b.metal()])
    b.box((W, H, T), (0, H / 2, 0), body)
    bez, bez_tb = b.u(0.002, 0.005), b.u(0.004, 0.012)
    screen = GLASS if b.chance(0.6) else b.color(sat=(0.3, 0.7), val=(0.4, 0.8))
    b.box((W - 2 * bez, H - 2 * bez_tb, 0.001), (0, H / 2, T / 2 + 0.0005), screen)
    b.box((W * 0.25, 0.002, 0.0012), (0, H - bez_tb / 2, T / 2 + 0.0006), (0.02, 0.02, 0.02))
    cam = W * b.u(0.3, 0.42)
    cx = -W / 2 + cam / 2 + 0.006  # top left seen from the back (-z) is +x... keep it off-centre, at -x
    b.box((cam, cam, 0.0025), (cx, H - cam / 2 - 0.006, -T / 2 - 0.00125), tuple(c * 0.7 for c in body))
    for k in range(b.integer(1, 3)):
        b.cylinder(cam * 0.18, 0.002, (cx - cam * 0.22 + (k % 2) * cam * 0.44, H - cam * (0.3 + 0.4 * (k // 2))
                   - 0.006, -T / 2 - 0.003), (0.02, 0.02, 0.03), axis="z", sections=10)
    b.box((0.002, H * 0.12, T * 0.4), (W / 2 + 0.001, H * 0.7, 0), body)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-domain categories (11)
# ---------------------------------------------------------------------------------------------------------------
def bookshelf(b: Builder) -> None:
    """Open shelves facing +z with a back panel and rows of coloured books."""
    W, H, D, t = b.u(0.6, 1.2), b.u(0.8, 2.0), b.u(0.25, 0.4), 0.025
    wood = b.wood() if b.chance(0.7) else hsv(0, 0, b.u(0.3, 0.95))
    for sx in (-1, 1):
        b.box((t, H, D), (sx * (W / 2 - t / 2), H / 2, 0), wood)
    b.box((W, H, t), (0, H / 2, -D / 2 + t / 2), tuple(c * 0.85 for c in wood))
    n = b.integer(2, 5)
    gap = (H - t) / n
    for k in range(n + 1):
        b.box((W - 2 * t, t, D), (0, t / 2 + k * gap, 0), wood)
    for k in range(n):
        x, y0 = -W / 2 + t, t + k * gap
        while True:
            bw = b.u(0.02, 0.06)
            if x + bw > W / 2 - t:
                break
            if b.chance(0.85):
                bh, bd = gap * b.u(0.55, 0.85), D * b.u(0.65, 0.9)
                b.box((bw - 0.002, bh, bd), (x + bw / 2, y0 + bh / 2, -D / 2 + t + bd / 2),
                      b.color(sat=(0.3, 0.9), val=(0.25, 0.9)))
            x += bw


def camera(b: Builder) -> None:
    """DSLR: body, lens on the front (+z), grip at -x, viewfinder hump and shutter button on top."""
    W, H, D = b.u(0.12, 0.15), b.u(0.08, 0.1), b.u(0.05, 0.07)
    body = b.dark() if b.chance(0.7) else b.metal()
    b.box((W, H, D), (0, H / 2, 0), body)
    b.box((0.032, H * 0.95, D * 1.5), (-W / 2 + 0.016, H * 0.48, D * 0.25), (0.06, 0.06, 0.06))
    lr, ll = H * b.u(0.3, 0.38), b.u(0.04, 0.1)
    lx = b.u(0.0, 0.012)
    b.cylinder(lr, ll, (lx, H * 0.45, D / 2 + ll / 2), (0.08, 0.08, 0.08), axis="z", sections=20)
    b.cylinder(lr * 1.05, 0.01, (lx, H * 0.45, D / 2 + ll * 0.7), b.metal(), axis="z", sections=20)
    b.cylinder(lr * 0.75, 0.004, (lx, H * 0.45, D / 2 + ll + 0.002), (0.1, 0.15, 0.3), axis="z", sections=20)
    b.prism([(-W * 0.16, 0), (W * 0.16, 0), (W * 0.1, H * 0.28), (-W * 0.1, H * 0.28)], D * 0.8, (lx, H, -D * 0.05),
            body, axis="z")
    b.cylinder(0.007, 0.008, (-W / 2 + 0.02, H + 0.004, D * 0.2), b.metal(), sections=10)
    b.cylinder(0.012, 0.01, (W / 2 - 0.03, H + 0.005, -D * 0.1), b.dark(), sections=12)


def guitar(b: Builder) -> None:
    """Standing guitar: two-bout body, sound hole or pickups on the front (+z), neck and headstock up (+y)."""
    r1 = b.u(0.17, 0.21)
    r2, t = r1 * b.u(0.7, 0.85), b.u(0.07, 0.1)
    electric = b.chance(0.4)
    body = b.color(sat=(0.6, 0.95), val=(0.4, 0.9)) if electric else b.wood()
    neck_c = b.wood()
    b.cylinder(r1, t, (0, r1, 0), body, axis="z", sections=24)
    y2 = 2 * r1 + r2 * 0.5
    b.cylinder(r2, t, (0, y2, 0), body, axis="z", sections=24)
    if electric:
        for y in (r1 * 0.9, r1 * 1.4):
            b.box((0.08, 0.025, 0.01), (0, y, t / 2 + 0.004), b.dark())
        b.sphere(0.015, (r1 * 0.55, r1 * 0.45, t / 2), b.metal(), scale=(1, 1, 0.6), subdivisions=1)
    else:
        b.cylinder(r2 * 0.4, 0.004, (0, y2 - r2 * 0.45, t / 2 + 0.001), (0.05, 0.03, 0.02), axis="z", sections=20)
    b.prism([(r1 * 0.15, r1 * 0.9), (r1 * 0.75, r1 * 1.1), (r1 * 0.6, r1 * 1.6), (r1 * 0.2, r1 * 1.7)], 0.003,
            (0, 0, t / 2 + 0.002), b.choice([(0.05, 0.05, 0.05), (0.45, 0.2, 0.08), (0.9, 0.9, 0.88)]), axis="z")
    b.box((0.12, 0.025, 0.01), (0, r1 * 0.6, t / 2 + 0.005), (0.2, 0.12, 0.06))
    top = y2 + r2 * 0.8
    Ln = b.u(0.42, 0.52)
    b.box((0.05, Ln + r2, 0.03), (0, top + Ln / 2 - r2 / 2, t / 2 - 0.01), neck_c)
    b.box((0.048, Ln + r2, 0.006), (0, top + Ln / 2 - r2 / 2, t / 2 + 0.008), (0.12, 0.07, 0.04))
    hy = top + Ln + 0.08
    b.box((0.08, 0.17, 0.02), (0, hy, t / 2 - 0.02), neck_c, rotate=(("x", -12),))
    for k in range(3):
        for sx in (-1, 1):
            b.cylinder(0.008, 0.03, (sx * 0.05, hy - 0.05 + k * 0.045, t / 2 - 0.03), b.metal(), axis="x",
                       sections=6)


def motorcycle(b: Builder) -> None:
    """Two wheels along z, fork and headlight at the front (+z), tank, seat, engine, exhaust on the +x side."""
    wr, wb = b.u(0.3, 0.36), b.u(1.3, 1.6)
    paint = b.color(sat=(0.5, 0.95), val=(0.35, 0.9))
    tyre, metal = (0.06, 0.06, 0.06), b.metal()
    for z in (-wb / 2, wb / 2):
        b.torus(wr - 0.055, 0.055, (0, wr, z), tyre, axis="x", sections=(20, 6))
        b.cylinder(0.09, 0.1, (0, wr, z), metal, axis="x", sections=12)
    b.box((0.26, 0.28, 0.42), (0, wr + 0.04, -0.02), metal)
    b.sphere(1.0, (0, wr + 0.42, 0.12), paint, scale=(0.17, 0.12, 0.32))
    b.box((0.24, 0.08, 0.55), (0, wr + 0.38, -0.36), (0.08, 0.07, 0.07))
    b.box((0.2, 0.06, 0.35), (0, wr + 0.3, -wb / 2 + 0.02), paint, rotate=(("x", -12),))
    b.box((0.1, 0.05, 0.03), (0, wr + 0.33, -wb / 2 - 0.16), RED_LIGHT)
    head = np.array([0.0, wr + 0.62, wb / 2 - 0.22])
    for sx in (-1, 1):
        b.rod((sx * 0.08, wr, wb / 2), head + (sx * 0.08, 0, 0), 0.025, metal, sections=8)
    bar = b.u(0.3, 0.4)
    b.rod(head + (-bar, 0.08, -0.05), head + (bar, 0.08, -0.05), 0.018, metal, sections=8)
    for sx in (-1, 1):
        b.cylinder(0.025, 0.1, head + (sx * bar, 0.08, -0.05), (0.05, 0.05, 0.05), axis="x", sections=8)
    b.cylinder(0.08, 0.08, head + (0, -0.06, 0.08), paint, axis="z", sections=16)
    b.cylinder(0.065, 0.01, head + (0, -0.06, 0.125), LIGHT, axis="z", sections=16)
    b.rod(head, (0, wr + 0.3, -wb / 2 + 0.25), 0.03, metal, sections=8)
    b.rod((0.14, wr - 0.02, 0.05), (0.2, wr - 0.02, -wb / 2 - 0.1), 0.04, metal, sections=10)


def pistol(b: Builder) -> None:
    """Slide along +x (muzzle), grip slanting down and back, trigger guard, safety lever on +z."""
    metal = b.dark() if b.chance(0.6) else b.metal()
    grip_c = b.choice([b.dark(), b.wood(), metal])
    Ls = b.u(0.17, 0.22)
    b.box((Ls, 0.035, 0.028), (0, 0, 0), metal)
    b.box((Ls * 0.9, 0.02, 0.026), (-0.005, -0.027, 0), tuple(c * 0.8 for c in metal))
    gl = b.u(0.1, 0.13)
    b.box((0.035, gl, 0.03), (-Ls / 2 + 0.03 - gl * 0.13, -0.03 - gl / 2, 0), grip_c, rotate=(("z", -15),))
    b.torus(0.018, 0.004, (-Ls / 2 + 0.075, -0.05, 0), metal, axis="z", sections=(12, 6))
    b.box((0.005, 0.02, 0.006), (-Ls / 2 + 0.07, -0.045, 0), metal)
    b.cylinder(0.006, 0.004, (Ls / 2 + 0.001, 0.003, 0), (0.0, 0.0, 0.0), axis="x", sections=10)
    b.box((0.006, 0.008, 0.006), (Ls / 2 - 0.01, 0.021, 0), metal)
    b.box((0.01, 0.008, 0.018), (-Ls / 2 + 0.006, 0.021, 0), metal)
    b.box((0.02, 0.008, 0.004), (-Ls / 2 + 0.04, -0.012, 0.016), metal)


def mug(b: Builder) -> None:
    """Open cylindrical mug, handle on the +x side, a printed decal on the front (+z)."""
    r, h = b.u(0.04, 0.05), b.u(0.08, 0.11)
    color = b.color(sat=(0.0, 0.8), val=(0.4, 0.95))
    b.lathe([(0, 0), (r * 0.96, 0), (r, 0.006), (r, h), (r * 0.88, h), (r * 0.88, 0.01), (0, 0.01)], (0, 0, 0),
            color, sections=24)
    b.torus(h * 0.28, r * 0.16, (r + h * 0.1, h * 0.5, 0), color, axis="z", sections=(16, 6))
    decal = b.color(sat=(0.6, 1.0), val=(0.3, 0.9)) if sum(color) > 1.5 else hsv(0, 0, 0.95)
    b.band(r * 1.01, h * 0.3, h * 0.75, decal, center_deg=0, width_deg=b.u(50, 90), sections=6)


def bottle(b: Builder) -> None:
    """Bottle with shoulder, neck and cap; a label wrapping the front (+z) only."""
    r, hb = b.u(0.03, 0.045), b.u(0.12, 0.2)
    sh, nr, nh = b.u(0.03, 0.06), r * b.u(0.3, 0.4), b.u(0.03, 0.07)
    glass = b.choice([(0.1, 0.35, 0.12), (0.35, 0.18, 0.05), (0.55, 0.7, 0.75), b.color(sat=(0.3, 0.7))])
    top = hb + sh + nh
    b.lathe([(0, 0), (r * 0.95, 0), (r, 0.005), (r, hb), (r * 0.7, hb + sh * 0.6), (nr, hb + sh), (nr, top),
             (0, top)], (0, 0, 0), glass, sections=20)
    b.cylinder(nr * 1.15, 0.016, (0, top, 0), b.color(sat=(0.5, 0.9), val=(0.3, 0.9)), sections=12)
    b.band(r * 1.01, hb * 0.3, hb * 0.8, hsv(b.u(0, 1), b.u(0, 0.6), b.u(0.75, 0.98)), center_deg=0,
           width_deg=b.u(110, 200), sections=10)


def bed(b: Builder) -> None:
    """Frame and mattress, headboard at the back (-z), pillows at the head, blanket over the foot end."""
    W, L = b.u(1.0, 1.8), b.u(1.9, 2.1)
    fh, mt = b.u(0.25, 0.35), b.u(0.15, 0.25)
    wood = b.wood() if b.chance(0.7) else b.color(sat=(0.0, 0.4), val=(0.2, 0.9))
    b.box((W, fh - 0.1, L), (0, 0.1 + (fh - 0.1) / 2, 0), wood)
    for sx in (-1, 1):
        for sz in (-1, 1):
            b.box((0.06, 0.1, 0.06), (sx * (W / 2 - 0.03), 0.05, sz * (L / 2 - 0.03)), wood)
    b.box((W - 0.04, mt, L - 0.04), (0, fh + mt / 2, 0), hsv(0, 0, 0.92))
    bl = L * b.u(0.55, 0.7)
    b.box((W + 0.03, mt + 0.08, bl), (0, fh + (mt + 0.08) / 2 - 0.03, L / 2 - bl / 2 + 0.01),
          b.color(sat=(0.3, 0.8), val=(0.35, 0.85)))
    hh = b.u(0.5, 0.9)
    b.box((W + 0.05, fh + mt + hh, 0.06), (0, (fh + mt + hh) / 2, -L / 2 - 0.03), wood)
    if b.chance(0.5):
        b.box((W + 0.05, fh + mt * 0.5, 0.05), (0, (fh + mt * 0.5) / 2, L / 2 + 0.025), wood)
    pc = b.color(sat=(0.0, 0.3), val=(0.8, 0.98))
    n = 1 if W < 1.3 else 2
    for k in range(n):
        x = 0 if n == 1 else (k - 0.5) * W * 0.48
        b.sphere(1.0, (x, fh + mt + 0.04, -L / 2 + 0.28), pc, scale=(W * 0.42 / n, 0.07, 0.17))


def bus(b: Builder) -> None:
    """Long box: windscreen, destination sign and headlights at the front (+z), doors on the -x side, wheels."""
    L, W, H, cl = b.u(9.0, 12.0), 2.5, b.u(2.8, 3.3), 0.35
    paint = b.choice([(0.95, 0.75, 0.1), (0.8, 0.1, 0.1), hsv(0, 0, 0.92), b.color(sat=(0.5, 0.9))])
    hb = H - cl
    b.box((W, hb, L), (0, cl + hb / 2, 0), paint)
    b.box((W + 0.02, hb * 0.32, L * 0.78), (0, cl + hb * 0.66, -L * 0.06), GLASS)
    b.box((W * 0.92, hb * 0.48, 0.05), (0, cl + hb * 0.6, L / 2), GLASS)
    b.box((W * 0.6, 0.22, 0.06), (0, H - 0.2, L / 2 + 0.005), (1.0, 0.6, 0.1))
    b.box((W * 0.6, hb * 0.25, 0.05), (0, cl + hb * 0.7, -L / 2), GLASS)
    b.box((W * 0.5, hb * 0.2, 0.05), (0, cl + hb * 0.2, -L / 2), (0.1, 0.1, 0.1))
    for sx in (-1, 1):
        b.box((0.35, 0.15, 0.05), (sx * (W / 2 - 0.3), cl + 0.35, L / 2), LIGHT)
        b.box((0.25, 0.3, 0.05), (sx * (W / 2 - 0.25), cl + 0.5, -L / 2), RED_LIGHT)
    for z in (L / 2 - 1.1, -0.5):
        b.box((0.05, hb * 0.78, 1.0), (-W / 2 - 0.01, cl + hb * 0.4, z), GLASS)
    for z in (L / 2 - 2.3, -L / 2 + 2.8):
        for sx in (-1, 1):
            b.cylinder(0.5, 0.3, (sx * (W / 2 - 0.15), 0.5, z), (0.06, 0.06, 0.06), axis="x")
            b.cylinder(0.28, 0.32, (sx * (W / 2 - 0.15), 0.5, z), b.metal(), axis="x")


def piano(b: Builder) -> None:
    """Upright piano: tall case at the back, keyboard sticking out at the front (+z), music desk, pedals."""
    W, H, D = b.u(1.35, 1.55), b.u(1.1, 1.3), b.u(0.55, 0.65)
    case = b.choice([(0.04, 0.04, 0.05), b.wood(), hsv(0, 0, 0.93)])
    b.box((W, H - 0.45, D * 0.55), (0, 0.45 + (H - 0.45) / 2, -D * 0.22), case)
    b.box((W * 0.95, 0.45, D * 0.45), (0, 0.225, -D * 0.27), case)
    b.box((W, 0.1, D * 0.45), (0, 0.68, D * 0.22), case)
    kw = W * 0.86
    b.box((kw, 0.025, D * 0.28), (0, 0.74, D * 0.3), (0.95, 0.94, 0.9))
    n_white = 36
    for i in range(n_white - 1):
        if i % 7 in (2, 6):
            continue
        x = -kw / 2 + kw * (i + 1) / n_white
        b.box((kw / n_white * 0.55, 0.02, D * 0.16), (x, 0.755, D * 0.24), (0.03, 0.03, 0.03))
    for sx in (-1, 1):
        b.box((0.07, 0.16, D * 0.45), (sx * (W / 2 - 0.035), 0.76, D * 0.22), case)
        if b.chance(0.6):
            b.cylinder(0.035, 0.63, (sx * (W / 2 - 0.07), 0.315, D * 0.38), case, sections=10)
    b.box((W * 0.5, 0.22, 0.02), (0, 0.95, D * 0.07), case, rotate=(("x", -12),))
    for k in range(b.integer(2, 3)):
        b.box((0.04, 0.015, 0.08), ((k - 1) * 0.08, 0.04, D * 0.02), (0.85, 0.7, 0.3))


def birdhouse(b: Builder) -> None:
    """Box on a pole with a gable roof; entrance hole and perch on the front (+z)."""
    W, H, D = b.u(0.15, 0.22), b.u(0.18, 0.28), b.u(0.15, 0.22)
    pole = b.u(0.2, 0.45)
    body = b.wood() if b.chance(0.5) else b.color(sat=(0.2, 0.6), val=(0.5, 0.95))
    roof = b.color(hue=(0.0, 0.4), sat=(0.4, 0.8), val=(0.25, 0.7))
    b.box((0.2, 0.02, 0.2), (0, 0.01, 0), b.dark())
    b.cylinder(0.02, pole, (0, pole / 2, 0), b.wood(), sections=10)
    b.box((W, H, D), (0, pole + H / 2, 0), body)
    ov = 0.03
    b.prism([(-W / 2 - ov, pole + H), (W / 2 + ov, pole + H), (0, pole + H + W * 0.55)], D + 2 * ov,
            (0, 0, 0.0), roof, axis="z")
    b.cylinder(W * 0.16, 0.004, (0, pole + H * 0.62, D / 2 + 0.001), (0.04, 0.03, 0.02), axis="z", sections=16)
    b.rod((0, pole + H * 0.35, D / 2), (0, pole + H * 0.35, D / 2 + 0.05), 0.006, b.wood(), sections=6)


# ---------------------------------------------------------------------------------------------------------------
CATEGORIES: dict[str, Callable[[Builder], None]] = {
    f.__name__: f
    for f in (airplane, bench, boat, cabinet, car, chair, display, lamp, loudspeaker, rifle, sofa, table, telephone,
              bed, birdhouse, bookshelf, bottle, bus, camera, guitar, motorcycle, mug, piano, pistol)
}
#: The 13 in-domain categories (3D-R2N2's ShapeNet set, watercraft -> boat).
IN_DOMAIN: tuple[str, ...] = ("airplane", "bench", "boat", "cabinet", "car", "chair", "display", "lamp",
                              "loudspeaker", "rifle", "sofa", "table", "telephone")
#: The 11 out-of-domain categories.
OUT_OF_DOMAIN: tuple[str, ...] = ("bed", "birdhouse", "bookshelf", "bottle", "bus", "camera", "guitar", "motorcycle",
                                  "mug", "piano", "pistol")


def stable_hash(*keys) -> int:
    """A process-independent 32-bit hash of ints and strings (Python's ``hash`` of str is salted per process)."""
    return zlib.crc32("\x1f".join(str(k) for k in keys).encode())


def instance_rng(seed: int, *keys) -> np.random.Generator:
    """The random generator of one named thing (an instance, an image, a sequence) of a benchmark seed."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stable_hash(*keys)]))


@lru_cache(maxsize=512)
def build_object(category: str, instance: int, seed: int = 0) -> TriangleMesh:
    """Instance ``instance`` of ``category`` for benchmark ``seed``: normalised (bounding box centred on the origin,
    half-diagonal 1). Cached per process; the same arguments always give the same mesh."""
    if category not in CATEGORIES:
        raise KeyError(f"unknown category {category!r} (known: {', '.join(sorted(CATEGORIES))})")
    b = Builder(instance_rng(seed, "object", category, instance))
    CATEGORIES[category](b)
    return b.build(key=f"object/{seed}/{category}/{instance}")
