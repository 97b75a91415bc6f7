"""Sphere-traced SDF scenes with exact metric depth: an EVALUATION-ONLY renderer for the depth demo (issue #18).

Why it exists: the depth demo trains on toy/scenes.py (analytic ray casts of a box room with boxes and spheres,
a point lamp). A model can score well on that renderer's held-out split by learning its quirks. This module is a
second, independent generator that shares no code path with scenes.py (it does not import it and copies none of
its functions: different geometry, camera, textures, palette and shading), so the demo can be measured on scenes
from a renderer it never trained on. Never train on it: its seeds (EVAL_SEED = 20_001 by default) are for
evaluation only.

What it renders, per scene (chosen at random from np.random.SeedSequence([seed, i])):
- a space: an L-shaped room, a corridor (sometimes with a cross passage), a room with pillars, or an outdoor
  plaza (a ground slab under a sky: rays that leave it see the sky, invalid depth);
- objects standing in it, as signed distance functions (SDFs): upright and lying cylinders, capped cones, tori,
  capsules, rounded boxes, spheres, and composites: a table (top + 4 legs), a stool (seat, 3 legs, a ring),
  stairs, an arch;
- textures of its own (polka dots, bricks, tiles, wood rings, gradients, plain) in colours from an HSV harmony
  palette (analogous, complementary, triadic or muted);
- a directional sun (soft shadows traced through the objects' SDF), hemisphere sky/ground ambient with a short
  SDF ambient occlusion, Blinn-Phong specular, optional distance fog, sRGB encoding;
- a camera given by its vertical field of view (35-75 degrees), a little roll, a height of 0.4-2.5 m and a
  pitch from slightly up to ~40 degrees down, placed anywhere in the free space and aimed at an object.

Rays are sphere-traced, all at once in numpy (a fixed step budget; a ray hits when sdf < HIT_EPS * t), then the
hit is refined by Newton steps along the ray, so depth is exact to float precision on exact SDFs. Depth is the
planar z-distance along the viewing axis (not the ray length), in metres, cast through pixel centres only;
colour is supersampled 2x2 and box-filtered. Depth 0 = invalid (sky, or a ray that did not converge).

Written as the pair-folder layout depth.py's PairDataset reads:
    DIR/rgb/00000.png      8-bit RGB
    DIR/depth/00000.png    16-bit millimetres, 0 = invalid

    python toy/rooms_sdf.py --out runs/data/rooms-sdf --n 128 --size 64      # --seed 20001 (evaluation only)
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: common

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402

EVAL_SEED = 20_001  # evaluation only: no training stream may use this renderer at all
SS = 2  # colour supersampling per axis
MAX_STEPS = 192  # sphere-tracing budget per ray (grazing rays along a wall need ~100-150)
HIT_EPS = 1e-3  # a ray hits when sdf < HIT_EPS * t (1/18 of a pixel at 64 px, 60 degrees)
T_MAX = 40.0  # metres: beyond it a ray has left the scene (sky)
DEPTH_RANGE = (0.1, 30.0)  # depth.DEPTH_RANGES["scenes"]: valid depths lie strictly inside
NORMAL_H = 1e-4  # central-difference step for normals, metres


# ----------------------------------------------------------------------------- SDF primitives (p (N, 3) -> (N,))

def length(a):
    """Euclidean norm of the rows of a (..., 3) (einsum: a reduction over a short last axis is slow in numpy)."""
    return np.sqrt(np.einsum("...i,...i->...", a, a))


def sd_sphere(p, r):
    return length(p) - r


def sd_box(p, half):
    """Exact box of half sizes `half`, centred at the origin."""
    q = np.abs(p) - half
    return length(np.maximum(q, 0)) + np.minimum(np.maximum(np.maximum(q[:, 0], q[:, 1]), q[:, 2]), 0)


def sd_round_box(p, half, r):
    """A box whose edges are rounded with radius r (outer size still 2 half)."""
    return sd_box(p, np.asarray(half) - r) - r


def sd_cylinder(p, r, h):
    """Upright cylinder (axis y) of radius r, half height h."""
    dx, dy = np.hypot(p[:, 0], p[:, 2]) - r, np.abs(p[:, 1]) - h
    return np.minimum(np.maximum(dx, dy), 0) + np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))


def sd_capsule(p, h, r):
    """Capsule: the points within r of the segment y in [-h, h]."""
    q = p.copy()
    q[:, 1] -= np.clip(p[:, 1], -h, h)
    return length(q) - r


def sd_torus(p, big, r):
    """Torus lying in the xz plane: ring radius `big`, tube radius r."""
    return np.hypot(np.hypot(p[:, 0], p[:, 2]) - big, p[:, 1]) - r


def sd_capped_cone(p, h, r1, r2):
    """Exact capped cone (Quilez): axis y, half height h, radius r1 at y = -h and r2 at y = +h."""
    qx, qy = np.hypot(p[:, 0], p[:, 2]), p[:, 1]
    cax = qx - np.minimum(qx, np.where(qy < 0, r1, r2))
    cay = np.abs(qy) - h
    k2x, k2y = r2 - r1, 2 * h
    s = np.clip(((r2 - qx) * k2x + (h - qy) * k2y) / (k2x ** 2 + k2y ** 2), 0, 1)
    cbx, cby = qx - r2 + k2x * s, qy - h + k2y * s
    sign = np.where((cbx < 0) & (cay < 0), -1.0, 1.0)
    return sign * np.sqrt(np.minimum(cax ** 2 + cay ** 2, cbx ** 2 + cby ** 2))


def shifted(p, offset):
    """p relative to a local origin at `offset` (3,)."""
    return p - np.asarray(offset, float)


def lying(p):
    """Swap x and y: a y-axis primitive evaluated on lying(p) lies along x."""
    return p[:, [1, 0, 2]]


def yaw_matrix(a):
    """Rotation about the vertical axis by a radians (columns: the local axes in the world)."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


# ----------------------------------------------------------------------------- composites (local frame, y = 0 floor)

def table(w, d, height, leg_r):
    """Table top (rounded box) on four cylinder legs; w, d half sizes of the top."""
    top_t = 0.03

    def fn(p):
        top = sd_round_box(shifted(p, (0, height - top_t, 0)), (w, top_t, d), 0.015)
        q = np.abs(p) - np.array([w - 2 * leg_r, 0, d - 2 * leg_r])  # mirror the four legs onto one
        q[:, 1] = p[:, 1] - (height - 2 * top_t) / 2
        return np.minimum(top, sd_cylinder(q, leg_r, (height - 2 * top_t) / 2))
    return fn


def stool(r, height):
    """Round seat on three legs tied by a ring (a torus) at half height."""
    legs = [(0.75 * r * np.cos(a), 0.75 * r * np.sin(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]

    def fn(p):
        d = sd_cylinder(shifted(p, (0, height - 0.03, 0)), r, 0.03)
        for x, z in legs:
            d = np.minimum(d, sd_capsule(shifted(p, (x, height / 2, z)), height / 2 - 0.03, 0.025))
        return np.minimum(d, sd_torus(shifted(p, (0, height * 0.4, 0)), 0.75 * r, 0.015))
    return fn


def stairs(w, n, rise, run):
    """n steps up along +z, each a box of half width w (step k spans z in [k run, (k + 1) run])."""
    def fn(p):
        d = np.full(len(p), np.inf)
        for k in range(n):
            top = (k + 1) * rise
            d = np.minimum(d, sd_box(shifted(p, (0, top / 2, (k + 0.5) * run)), (w, top / 2, run / 2)))
        return d
    return fn


def arch(w, height, thick, hole):
    """A block with a round-topped opening of half width `hole` through it (along z)."""
    spring = height - hole - 0.2  # where the opening's half circle starts

    def fn(p):
        block = sd_box(shifted(p, (0, height / 2, 0)), (w, height / 2, thick))
        q = shifted(p, (0, spring, 0))
        round_top = sd_cylinder(q[:, [0, 2, 1]], hole, thick + 0.1)  # cylinder along z
        shaft = sd_box(shifted(p, (0, spring / 2 - 0.05, 0)), (hole, spring / 2 + 0.05, thick + 0.1))
        return np.maximum(block, -np.minimum(round_top, shaft))
    return fn


def primitive_object(kind, rng):
    """(local SDF, footprint radius, height) of one simple object standing on y = 0."""
    r, h = rng.uniform(0.15, 0.5), rng.uniform(0.3, 1.4)
    if kind == "sphere":
        return (lambda p: sd_sphere(shifted(p, (0, r, 0)), r)), r, 2 * r
    if kind == "cylinder":
        return (lambda p: sd_cylinder(shifted(p, (0, h / 2, 0)), r, h / 2)), r, h
    if kind == "lying_cylinder":
        return (lambda p: sd_cylinder(lying(shifted(p, (0, r, 0))), r, h / 2)), max(r, h / 2), 2 * r
    if kind == "cone":
        top = r * rng.uniform(0.0, 0.6)
        return (lambda p: sd_capped_cone(shifted(p, (0, h / 2, 0)), h / 2, r, top)), r, h
    if kind == "torus":
        tube = r * rng.uniform(0.2, 0.4)
        if rng.random() < 0.5:  # flat on the floor
            return (lambda p: sd_torus(shifted(p, (0, tube, 0)), r, tube)), r + tube, 2 * tube
        return (lambda p: sd_torus(shifted(p, (0, r + tube, 0))[:, [0, 2, 1]], r, tube)), r + tube, 2 * (r + tube)
    if kind == "capsule":
        if rng.random() < 0.5:
            return (lambda p: sd_capsule(shifted(p, (0, h / 2 + r / 2, 0)), h / 2, r / 2)), r / 2, h + r
        return (lambda p: sd_capsule(lying(shifted(p, (0, r / 2, 0))), h / 2, r / 2)), h / 2 + r / 2, r
    half = rng.uniform([0.15, 0.15, 0.15], [0.6, 0.7, 0.6])  # rounded box
    rr = rng.uniform(0.02, 0.6) * half.min()
    return (lambda p: sd_round_box(shifted(p, (0, half[1], 0)), half, rr)), float(np.hypot(half[0], half[2])), 2 * half[1]


def composite_object(kind, rng):
    """(local SDF, footprint radius, height) of a table, stool, stairs or arch."""
    if kind == "table":
        w, d, h = rng.uniform(0.3, 0.9), rng.uniform(0.25, 0.6), rng.uniform(0.55, 0.95)
        return table(w, d, h, rng.uniform(0.025, 0.05)), float(np.hypot(w, d)), h
    if kind == "stool":
        r, h = rng.uniform(0.15, 0.25), rng.uniform(0.4, 0.8)
        return stool(r, h), r, h
    if kind == "stairs":
        w, n, rise, run = rng.uniform(0.4, 1.0), int(rng.integers(3, 7)), rng.uniform(0.12, 0.2), rng.uniform(0.22, 0.35)
        fn = stairs(w, n, rise, run)
        return (lambda p: fn(shifted(p, (0, 0, -n * run / 2)))), float(np.hypot(w, n * run / 2)), n * rise
    w, h = rng.uniform(0.6, 1.3), rng.uniform(1.2, 2.4)
    thick = rng.uniform(0.1, 0.3)
    return arch(w, h, thick, w * rng.uniform(0.4, 0.7)), float(np.hypot(w, thick)), h


OBJECT_KINDS = ("sphere", "cylinder", "lying_cylinder", "cone", "torus", "capsule", "round_box",
                "table", "stool", "stairs", "arch")
COMPOSITES = ("table", "stool", "stairs", "arch")


# ----------------------------------------------------------------------------- scene description

@dataclass
class Material:
    """Two linear-RGB colours mixed by a procedural pattern, and a Blinn-Phong highlight."""
    a: np.ndarray  # (3,) base colour
    b: np.ndarray  # (3,) the pattern's colour
    pattern: str = "plain"  # plain | dots | bricks | tiles | wood | gradient
    scale: float = 0.3  # pattern period, metres
    spec: float = 0.0  # specular strength
    shininess: float = 16.0


IDENTITY = np.eye(3)  # the frame of parts that are not turned (tested by identity: no matrix product)
IDENTITY.flags.writeable = False


@dataclass
class Part:
    """A solid: world point p -> fn((p - center) @ rot), rot's columns the local axes in the world. Shell parts
    (the room) pick floor / wall / ceiling materials by height; only casting parts throw sun shadows."""
    fn: object
    material: Material
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rot: np.ndarray = field(default_factory=lambda: IDENTITY)
    casts: bool = True
    zones: tuple = ()  # shell only: (floor Material, ceiling Material, ceiling height); material = walls
    bound: tuple = None  # (centre (3,), radius): a sphere holding the solid (a speed-up of scene_sdf only)

    def local(self, p):
        """World points (N, 3) in this part's frame."""
        q = p - self.center
        return q if self.rot is IDENTITY else q @ self.rot

    def dist(self, p):
        return self.fn(self.local(p))


@dataclass
class Camera:
    eye: np.ndarray  # (3,)
    rot: np.ndarray  # (3, 3) camera-to-world, columns: right, up, forward (the viewing axis)
    vfov: float  # vertical field of view, radians


@dataclass
class Light:
    sun: np.ndarray  # (3,) unit direction towards the sun
    sun_rgb: np.ndarray  # (3,) its radiance
    sky_rgb: np.ndarray  # (3,) hemisphere ambient from above
    ground_rgb: np.ndarray  # (3,) ... and from below
    fog: float = 0.0  # extinction per metre (0: none)
    fog_rgb: np.ndarray = field(default_factory=lambda: np.full(3, 0.7))
    penumbra: float = 8.0  # soft-shadow sharpness k (larger: harder)


@dataclass
class World:
    parts: list
    camera: Camera
    light: Light
    outdoor: bool = False  # rays may leave the scene (sky)
    kind: str = ""


def scene_sdf(parts, p):
    """Distance (N,) from p (N, 3) to the union of `parts`. A part with a bounding sphere is evaluated only at
    the points its sphere is nearer than the union so far (elsewhere it cannot be the minimum): same result."""
    d = np.full(len(p), np.inf)
    for part in parts:
        if part.bound is None:
            d = np.minimum(d, part.dist(p))
            continue
        near = np.flatnonzero(length(p - part.bound[0]) - part.bound[1] < d)
        if len(near):
            d[near] = np.minimum(d[near], part.dist(p[near]))
    return d


def nearest_part(parts, p):
    """Index (N,) of the part nearest to each point."""
    return np.stack([part.dist(p) for part in parts]).argmin(0)


# ----------------------------------------------------------------------------- sphere tracing

def sphere_trace(parts, o, d, t0=0.0, t_max=T_MAX, steps=MAX_STEPS):
    """March rays o + t d (N, 3) through the union SDF, only the still-active rays each step.
    -> t (N,), hit (N,) bool (False: left the scene or ran out of steps)."""
    n = len(d)
    t, hit = np.full(n, float(t0)), np.zeros(n, bool)
    active = np.arange(n)
    for _ in range(steps):
        if not len(active):
            break
        ta = t[active]
        h = scene_sdf(parts, o[active] + ta[:, None] * d[active])
        done = h < HIT_EPS * np.maximum(ta, 0.05)
        hit[active[done]] = True
        t[active] = np.where(done, ta, ta + h)
        active = active[~done & (ta + h < t_max)]
    return t, hit


def gradient(parts, p, h=NORMAL_H):
    """Central-difference gradient (N, 3) of the union SDF."""
    g = np.empty_like(p)
    for k in range(3):
        e = np.zeros(3)
        e[k] = h
        g[:, k] = scene_sdf(parts, p + e) - scene_sdf(parts, p - e)
    return g / (2 * h)


def refine(parts, o, d, t, hit, iters=3):
    """Newton steps on f(t) = sdf(o + t d) at the hits (f' = grad . d), kept only where |sdf| shrinks: exact
    surface points on exact SDFs, not the sphere tracer's eps-shell."""
    idx = np.flatnonzero(hit)
    ti, oi, di = t[idx], o[idx], d[idx]
    for _ in range(iters):
        p = oi + ti[:, None] * di
        f = scene_sdf(parts, p)
        slope = np.einsum("ij,ij->i", gradient(parts, p), di)
        step = np.where(slope < -0.05, -f / np.minimum(slope, -0.05), f)  # grazing: a plain sphere step
        t_new = ti + step
        better = np.abs(scene_sdf(parts, oi + t_new[:, None] * di)) < np.abs(f)
        ti = np.where(better, t_new, ti)
    out = t.copy()
    out[idx] = ti
    return out


def soft_shadow(parts, p, light_dir, k, steps=32, t_max=12.0):
    """Sun visibility in [0, 1] (N,) at p: march towards the sun keeping min(k h / t) (a penumbra estimate).
    A ray stops when blocked, when it rises above every bounded caster's top, or past t_max."""
    n = len(p)
    res, t = np.ones(n), np.full(n, 0.02)
    tops = [q.bound[0][1] + q.bound[1] if q.bound is not None else np.inf for q in parts]
    top = max(tops, default=-np.inf)
    active = np.arange(n)
    for _ in range(steps):
        if not len(active):
            break
        ta = t[active]
        q = p[active] + ta[:, None] * light_dir
        h = scene_sdf(parts, q)
        res[active] = np.minimum(res[active], np.clip(k * h / ta, 0, 1))
        t[active] = ta + np.clip(h, 0.03, 1.0)
        active = active[(res[active] > 0.02) & (t[active] < t_max) & (q[:, 1] < top)]
    return res * res * (3 - 2 * res)  # smoothstep: a softer ramp


# ----------------------------------------------------------------------------- textures and palette

def plane_coords(q, nq):
    """2D coordinates (u, v) on the face a normal points out of (its dominant axis picks the plane)."""
    ax = np.abs(nq).argmax(1)
    u = np.where(ax == 0, q[:, 2], q[:, 0])
    v = np.where(ax == 1, q[:, 2], q[:, 1])
    return u, v


def pattern_weight(m, q, nq):
    """Weight (N,) in [0, 1] of colour b at local points q (N, 3) with local normals nq."""
    s = m.scale
    if m.pattern == "wood":  # rings about the local vertical axis, slightly wavy
        r = np.hypot(q[:, 0], q[:, 2]) + 0.03 * np.sin(7 * q[:, 1] + 3 * q[:, 0])
        return (0.5 + 0.5 * np.cos(2 * np.pi * r / s)) ** 3
    if m.pattern == "gradient":
        return np.clip(q[:, 1] / max(4 * s, 1e-6), 0, 1)
    u, v = plane_coords(q, nq)
    if m.pattern == "dots":
        fu, fv = u / s - np.floor(u / s) - 0.5, v / s - np.floor(v / s) - 0.5
        return (np.hypot(fu, fv) < 0.28).astype(float)
    if m.pattern == "bricks":
        row = np.floor(v / (0.5 * s))
        fu = u / s + 0.5 * (row % 2)
        mortar = 0.06
        return ((v / (0.5 * s) - row < 2 * mortar) | (fu - np.floor(fu) < mortar)).astype(float)
    if m.pattern == "tiles":
        fu, fv = u / s - np.floor(u / s), v / s - np.floor(v / s)
        return ((fu < 0.05) | (fv < 0.05)).astype(float)
    return np.zeros(len(q))


def hsv_to_linear(h, s, v):
    """HSV (hue in turns) -> linear RGB (3,): the sRGB colour decoded, so the palette is picked perceptually."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    srgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return srgb_decode(srgb)


def srgb_decode(c):
    """sRGB transfer function, inverse: encoded [0, 1] -> linear."""
    c = np.asarray(c, float)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def srgb_encode(c):
    """sRGB transfer function: linear [0, 1] -> encoded (the piecewise curve, not a plain 1/2.2 power)."""
    c = np.clip(c, 0, 1)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


HARMONIES = {"analogous": (0.0, 0.08, -0.08), "complementary": (0.0, 0.5, 0.04), "triadic": (0.0, 1 / 3, 2 / 3),
             "muted": (0.0, 0.02, 0.55)}
PATTERNS = ("plain", "plain", "dots", "bricks", "tiles", "wood", "gradient")


def palette(rng):
    """A scene's hues: a base hue and its harmony's offsets, and the harmony's saturation range."""
    name = list(HARMONIES)[rng.integers(len(HARMONIES))]
    base = rng.random()
    sat = (0.05, 0.3) if name == "muted" else (0.35, 0.85)
    return [(base + o) % 1 for o in HARMONIES[name]], sat


def material(rng, pal, patterns=PATTERNS, scale=(0.08, 0.4)):
    """A random Material from the scene's palette: colour b a darker/lighter shade, a neutral, or another hue."""
    hues, sat = pal
    h, s, v = hues[rng.integers(len(hues))] + rng.normal(0, 0.02), rng.uniform(*sat), rng.uniform(0.35, 0.95)
    a = hsv_to_linear(h % 1, s, v)
    pick = rng.random()
    if pick < 0.45:
        b = hsv_to_linear(h % 1, s, v * rng.uniform(0.35, 0.65))
    elif pick < 0.7:
        b = np.full(3, srgb_decode(rng.choice([0.15, 0.85])))
    else:
        b = hsv_to_linear(hues[rng.integers(len(hues))], rng.uniform(*sat), rng.uniform(0.4, 0.9))
    shiny = rng.random() < 0.4
    return Material(a, b, patterns[rng.integers(len(patterns))], float(rng.uniform(*scale)),
                    float(rng.uniform(0.2, 0.6) if shiny else rng.uniform(0, 0.08)), float(rng.choice([8, 24, 64])))


# ----------------------------------------------------------------------------- shading

def part_materials(part, p):
    """[(mask (N,), Material)] of a part at world points p: shells split floor / walls / ceiling by height."""
    if not part.zones:
        return [(np.ones(len(p), bool), part.material)]
    floor, ceiling, height = part.zones
    low, high = p[:, 1] < 0.02, p[:, 1] > height - 0.02
    return [(low, floor), (high, ceiling), (~low & ~high, part.material)]


def surface_colours(parts, p, n, idx):
    """Albedo (N, 3), specular strength (N,) and shininess (N,) at hits p on parts idx with normals n."""
    albedo, spec, shin = np.zeros_like(p), np.zeros(len(p)), np.ones(len(p))
    for i, part in enumerate(parts):
        sel = np.flatnonzero(idx == i)
        if not len(sel):
            continue
        q, nq = part.local(p[sel]), n[sel] @ part.rot
        for mask, m in part_materials(part, p[sel]):
            w = pattern_weight(m, q[mask], nq[mask])[:, None]
            albedo[sel[mask]] = (1 - w) * m.a + w * m.b
            spec[sel[mask]], shin[sel[mask]] = m.spec, m.shininess
    return albedo, spec, shin


def ambient_occlusion(parts, p, n, steps=(0.05, 0.15, 0.35)):
    """Short-range occlusion (N,) in [0, 1]: how much the SDF along the normal falls short of the distance."""
    occ = np.zeros(len(p))
    for k, h in enumerate(steps):
        occ += (h - scene_sdf(parts, p + h * n)) / h * 0.5 ** k
    return np.clip(1 - 0.6 * occ, 0.2, 1)


def sky_colour(light, d):
    """Colour (N, 3) of rays that leave the scene: a zenith-to-horizon gradient and a sun glow."""
    up = np.clip(d[:, 1:2], 0, 1)
    zenith, horizon = light.sky_rgb * 0.9, light.fog_rgb
    glow = np.clip(d @ light.sun, 0, 1)[:, None] ** 64 * light.sun_rgb * 0.5
    return horizon + (zenith - horizon) * np.sqrt(up) + glow


def shade_hits(scene, p, d, t):
    """Linear colour (N, 3) of surface points p seen along d at ray length t."""
    parts, light = scene.parts, scene.light
    n = gradient(parts, p)
    n /= np.maximum(length(n), 1e-12)[:, None]
    albedo, spec, shin = surface_colours(parts, p, n, nearest_part(parts, p))
    casters = [q for q in parts if q.casts]
    lambert = np.clip(n @ light.sun, 0, 1)
    lit = np.flatnonzero(lambert > 0)  # facing away: no shadow ray needed
    lambert[lit] *= soft_shadow(casters, p[lit] + 2e-3 * n[lit], light.sun, light.penumbra)
    up = 0.5 + 0.5 * n[:, 1:2]
    ambient = (up * light.sky_rgb + (1 - up) * light.ground_rgb) * ambient_occlusion(parts, p, n)[:, None]
    half = light.sun - d
    half /= np.maximum(length(half), 1e-12)[:, None]
    highlight = spec * np.clip(np.einsum("ij,ij->i", n, half), 0, 1) ** shin * lambert
    rgb = albedo * (ambient + lambert[:, None] * light.sun_rgb) + highlight[:, None] * light.sun_rgb
    fog = np.exp(-light.fog * t)[:, None]
    return rgb * fog + light.fog_rgb * (1 - fog)


# ----------------------------------------------------------------------------- camera and rendering

def camera_rays(cam, size, ss=1):
    """Unit directions (size*ss * size*ss, 3), row-major from the top left, through the centres of an
    ss x ss grid of samples per pixel; focal length in samples from the vertical field of view."""
    n = size * ss
    f = (n / 2) / np.tan(cam.vfov / 2)
    c = np.arange(n) + 0.5 - n / 2
    x, y = np.meshgrid(c, -c)  # image rows go down, camera up is +y
    d = np.stack([x, y, np.full_like(x, f)], -1).reshape(-1, 3) @ cam.rot.T
    return d / length(d)[:, None]


def trace(scene, d, exact=False):
    """Ray lengths t (N,) and hits (N,) of camera rays d (N, 3); exact: Newton-refined (depth; colour does
    not need it: the tracer's eps-shell is a twentieth of a pixel)."""
    o = np.broadcast_to(scene.camera.eye, d.shape)
    t, hit = sphere_trace(scene.parts, o, d)
    return (refine(scene.parts, o, d, t, hit) if exact else t), hit


def render_colour(scene, size):
    """uint8 RGB (size, size, 3): SS x SS samples per pixel, averaged in linear light, then sRGB-encoded."""
    d = camera_rays(scene.camera, size, SS)
    t, hit = trace(scene, d)
    rgb = sky_colour(scene.light, d) if scene.outdoor else np.broadcast_to(scene.light.fog_rgb * 0.3, d.shape).copy()
    p = scene.camera.eye + t[hit, None] * d[hit]
    rgb[hit] = shade_hits(scene, p, d[hit], t[hit])
    rgb = rgb.reshape(size, SS, size, SS, 3).mean((1, 3))
    return np.round(srgb_encode(rgb) * 255).astype(np.uint8)


def render_depth(scene, size):
    """Planar depth float32 (size, size), metres along the viewing axis, through pixel centres; 0 = invalid."""
    d = camera_rays(scene.camera, size, 1)
    t, hit = trace(scene, d, exact=True)
    z = t * (d @ scene.camera.rot[:, 2])  # ray length -> distance along the viewing axis
    valid = hit & (z > DEPTH_RANGE[0]) & (z < DEPTH_RANGE[1])
    return np.where(valid, z, 0).reshape(size, size).astype(np.float32)


def render(scene, size=64):
    """-> (RGB uint8 (size, size, 3), planar depth float32 (size, size) in metres, 0 = invalid)."""
    return render_colour(scene, size), render_depth(scene, size)


def look_rotation(yaw, pitch, roll):
    """Camera-to-world (3, 3) from Euler angles: R = Ry(yaw) Rx(-pitch) Rz(roll); pitch > 0 looks up."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(-pitch), np.sin(-pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


# ----------------------------------------------------------------------------- random scenes

def in_rects(rng, rects, margin):
    """A random floor point (x, z) inside one of the rectangles (x0, z0, x1, z1) shrunk by margin, or None."""
    ok = [r for r in rects if r[2] - r[0] > 2 * margin and r[3] - r[1] > 2 * margin]
    if not ok:
        return None
    x0, z0, x1, z1 = ok[rng.integers(len(ok))]
    return rng.uniform(x0 + margin, x1 - margin), rng.uniform(z0 + margin, z1 - margin)


def shell(rects, height, wall, floor, ceiling):
    """The room as one solid: everything outside the union of the free boxes over the floor rectangles."""
    boxes = [(np.array([(x0 + x1) / 2, height / 2, (z0 + z1) / 2]), np.array([(x1 - x0) / 2, height / 2, (z1 - z0) / 2]))
             for x0, z0, x1, z1 in rects]

    def fn(p):
        return -np.min([sd_box(p - c, h) for c, h in boxes], axis=0)
    return Part(fn, wall, casts=False, zones=(floor, ceiling, height))


def space_rooms(rng, kind, pal):
    """(shell parts, floor rectangles, ceiling height or None, pillars' discs [(x, z, r)])."""
    h = rng.uniform(2.4, 3.6)
    if kind == "lroom":
        w, d1, b = rng.uniform(3, 6), rng.uniform(5, 10), rng.uniform(2.5, 4)
        rects = [(0, 0, w, d1), (0, d1 - b, w + rng.uniform(2, 5), d1)]
    elif kind == "corridor":
        w, length_ = rng.uniform(1.8, 3), rng.uniform(10, 20)
        rects = [(0, 0, w, length_)]
        if rng.random() < 0.5:
            zc, wc = rng.uniform(3, length_ - 3), rng.uniform(1.8, 3)
            rects.append((-rng.uniform(2, 5), zc, w + rng.uniform(2, 5), zc + wc))
    else:
        rects = [(0, 0, rng.uniform(5, 11), rng.uniform(5, 11))]
    mats = [material(rng, pal, scale=(0.2, 0.9)) for _ in range(3)]
    parts, discs = [shell(rects, h, *mats)], []
    if kind == "pillars":
        column = material(rng, pal)
        for _ in range(rng.integers(1, 5)):
            x, z = in_rects(rng, rects, 1.0)
            r = rng.uniform(0.15, 0.35)
            fn = (lambda p, r=r: sd_cylinder(shifted(p, (0, h / 2, 0)), r, h / 2 + 0.1)) if rng.random() < 0.6 else \
                (lambda p, r=r: sd_round_box(shifted(p, (0, h / 2, 0)), (r, h / 2 + 0.1, r), 0.03))
            parts.append(Part(fn, column, np.array([x, 0.0, z]), bound=(np.array([x, h / 2, z]), h / 2 + 2 * r)))
            discs.append((x, z, r * 1.5))
    return parts, rects, h, discs


def space_outdoor(rng, pal):
    """A ground slab (half size 8-12 m) under the sky, maybe with a few low walls near its edge."""
    half = rng.uniform(8, 12)
    ground = Part(lambda p: sd_box(shifted(p, (0, -0.3, 0)), (half, 0.3, half)),
                  material(rng, pal, ("plain", "tiles", "bricks", "dots"), (0.4, 1.5)), casts=False)
    parts, wall = [ground], material(rng, pal, ("plain", "bricks", "tiles"), (0.3, 0.8))
    for _ in range(rng.integers(0, 4)):
        size = np.array([rng.uniform(1, 4), rng.uniform(0.3, 1.2), rng.uniform(0.15, 0.4)])
        a = rng.uniform(0, 2 * np.pi)
        c = np.array([np.cos(a), 0, np.sin(a)]) * rng.uniform(6.5, half - 0.5)
        parts.append(Part(lambda p, s=size: sd_round_box(shifted(p, (0, s[1], 0)), s, 0.05), wall, c,
                          yaw_matrix(rng.uniform(0, np.pi)), bound=(c + [0, size[1], 0], float(length(size)) + 0.05)))
    return parts, [(-5.5, -5.5, 5.5, 5.5)], None, []


def place_objects(rng, rects, discs, pal, count):
    """Up to `count` random objects standing on the floor, not overlapping each other or the pillars
    (discs in plan). -> (parts, target points (K, 3) for the camera to look at)."""
    parts, targets = [], []
    for _ in range(count):
        kind = OBJECT_KINDS[rng.integers(len(OBJECT_KINDS))]
        fn, radius, height = (composite_object if kind in COMPOSITES else primitive_object)(kind, rng)
        for _ in range(20):
            xz = in_rects(rng, rects, radius + 0.1)
            if xz is not None and all(np.hypot(xz[0] - x, xz[1] - z) > radius + r + 0.1 for x, z, r in discs):
                break
        else:
            continue  # no room left for it
        centre = np.array([xz[0], 0.0, xz[1]])
        bound = (centre + [0, height / 2, 0], float(np.hypot(radius, height / 2)) + 0.05)
        parts.append(Part(fn, material(rng, pal), centre, yaw_matrix(rng.uniform(0, 2 * np.pi)), bound=bound))
        discs.append((xz[0], xz[1], radius))
        targets.append(centre + [0, height / 2, 0])
    return parts, np.array(targets).reshape(-1, 3)


def place_camera(rng, parts, rects, ceiling, targets):
    """A camera in the free space (>= 0.4 m from every surface), aimed near an object 1.2-7 m away that it can
    see, pitch clipped to [-40, +12] degrees, roll within 6 degrees, vertical field of view 35-75 degrees."""
    top = 2.5 if ceiling is None else min(2.5, ceiling - 0.4)
    best = None
    for _ in range(60):
        xz = in_rects(rng, rects, 0.4)
        eye = np.array([xz[0], rng.uniform(0.4, top), xz[1]])
        if len(targets):
            aim = targets[rng.integers(len(targets))] + rng.normal(0, 0.3, 3)
        else:  # nothing placed: look at a point of the floor plan at 1 m
            x, z = in_rects(rng, rects, 0.1)
            aim = np.array([x, 1.0, z])
        to = aim - eye
        dist = length(to)
        if scene_sdf(parts, eye[None])[0] < 0.4:
            continue
        best = best or (eye, look_rotation(np.arctan2(to[0], to[2]), 0.0, 0.0))  # clear of surfaces, at least
        if not 1.2 < dist < 7.0:
            continue
        yaw = np.arctan2(to[0], to[2])
        pitch = np.clip(np.arctan2(to[1], np.hypot(to[0], to[2])) + rng.normal(0, 0.05), np.deg2rad(-40), np.deg2rad(12))
        rot = look_rotation(yaw, pitch, np.deg2rad(rng.uniform(-6, 6)))
        best = eye, rot
        t, hit = sphere_trace(parts, eye[None], rot[None, :, 2])
        if hit[0] and t[0] > 0.7 * dist:  # the aim is not hidden behind a wall
            break
    return Camera(best[0], best[1], np.deg2rad(rng.uniform(35, 75)))


def make_light(rng, outdoor):
    """Sun direction and strength, hemisphere ambient, fog: daylight outdoors, a dimmer key light indoors."""
    elev, azim = rng.uniform(*((0.35, 1.2) if outdoor else (0.5, 1.4))), rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(elev) * np.cos(azim), np.sin(elev), np.cos(elev) * np.sin(azim)])
    warm = np.array([1.0, rng.uniform(0.85, 0.97), rng.uniform(0.7, 0.9)])
    strength = rng.uniform(1.5, 3.2) if outdoor else rng.uniform(0.8, 2.0)
    sky = (np.array([0.45, 0.6, 1.0]) if outdoor else np.array([1.0, 0.95, 0.88])) * rng.uniform(0.25, 0.55)
    fog = rng.uniform(0.01, 0.05) if rng.random() < (0.5 if outdoor else 0.25) else 0.0
    fog_rgb = np.array([0.75, 0.82, 0.95]) if outdoor else np.full(3, rng.uniform(0.3, 0.6))
    return Light(sun, warm * strength, sky, sky * rng.uniform(0.3, 0.6) * warm, fog, fog_rgb,
                 float(rng.uniform(4, 24)))


SPACE_KINDS, SPACE_P = ("lroom", "corridor", "pillars", "outdoor"), (0.25, 0.2, 0.25, 0.3)


def make_scene(seed, i):
    """Scene i of seed `seed`, from np.random.SeedSequence([seed, i]) only: any subset rebuilds in any order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    pal = palette(rng)
    kind = SPACE_KINDS[rng.choice(len(SPACE_KINDS), p=SPACE_P)]
    shell_parts, rects, ceiling, discs = space_outdoor(rng, pal) if kind == "outdoor" else space_rooms(rng, kind, pal)
    objects, targets = place_objects(rng, rects, discs, pal, int(rng.integers(2, 7)))
    parts = shell_parts + objects
    camera = place_camera(rng, parts, rects, ceiling, targets)
    return World(parts, camera, make_light(rng, kind == "outdoor"), kind == "outdoor", kind)


def write_pairs(out, n, size=64, seed=EVAL_SEED, start=0):
    """Scenes start..start+n-1 as out/rgb/NAME.png + out/depth/NAME.png (uint16 mm, 0 = invalid), each
    written atomically. -> out (a Path)."""
    out = Path(out)
    (out / "rgb").mkdir(parents=True, exist_ok=True)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(start, start + n), desc=f"writing {out}", dynamic_ncols=True):
        save_pair(out, f"{i:05d}", *render(make_scene(seed, i), size))
    return out


def save_pair(out, name, rgb, depth):
    """out/rgb/NAME.png (8-bit RGB) and out/depth/NAME.png (uint16 millimetres, 0 = invalid), atomically."""
    mm = np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)
    for array, sub in ((rgb, "rgb"), (mm, "depth")):
        with common.atomic_path(Path(out) / sub / f"{name}.png") as tmp:
            Image.fromarray(array).save(tmp)  # PIL writes a uint16 array as a 16-bit grey PNG


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Write sphere-traced SDF scenes with exact metric depth as a pair folder (rgb/NAME.png +\n"
        "depth/NAME.png, 16-bit millimetres, 0 = invalid), for evaluating depth.py models on a renderer they\n"
        "never trained on. Evaluation only: it shares no code with toy/scenes.py (the training scenes).",
        formatter_class=common.DefaultsOnce)
    p.add_argument("--out", required=True, help="output folder (new, or without rgb/ depth/ images)")
    p.add_argument("--n", type=int, default=128, help="number of scenes")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="scene stream seed (evaluation only)")
    a = p.parse_args(argv)
    if a.n < 1 or a.size < 1:
        common.usage_error("--n and --size must be >= 1")
    if a.seed < 0:
        common.usage_error(f"--seed must be >= 0, got {a.seed}")
    taken = [s for s in ("rgb", "depth") if os.path.isdir(os.path.join(a.out, s)) and os.listdir(os.path.join(a.out, s))]
    if taken:
        common.usage_error(f"{a.out}/{taken[0]} already holds files; pick a new --out (nothing is overwritten)")
    try:
        write_pairs(a.out, a.n, a.size, a.seed)
    except OSError as e:
        common.fail(f"{a.out}: cannot write the pairs there ({type(e).__name__}: {e.strerror or e})")
    print(json.dumps({"out": a.out, "n": a.n, "size": a.size, "seed": a.seed}))


if __name__ == "__main__":
    main()
