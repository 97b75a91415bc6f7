"""Synthetic indoor scenes with exact metric depth: our stand-in for Hypersim (image-to-depth, depth.py).

A room of random size (floor, walls, and a ceiling unless the room is open to the sky) with 0-8 boxes
(turned about the vertical axis, a few hanging as shelves), spheres and upright cylinders of random sizes, or
(20%) an open field: ground to a haze at 18-30 m under the sky, with 3-12 objects up to 4x larger,
plain or textured (checker, stripes or smooth noise, in world coordinates), lit by ambient light of random
level, a point lamp of random place and strength that casts shadows and, in open rooms, a sun from a random
direction, seen by a pinhole camera of random place, height, yaw, pitch, roll and field of view: varied
enough that a depth model has to read the image, not learn one room layout. Everything is a vectorised numpy
ray cast, so depth is exact: depth = planar z-distance along the camera's viewing axis (what Hypersim's and
Marigold's evaluations use, not the distance along the ray), in metres. Rays that leave an open room, or
pass a field's haze, see the sky: no depth there (invalid, stored as 0).

Colour is rendered at 2x2 samples per pixel and box-filtered (antialiased); depth is cast through the
pixel centres only (averaging depths across an edge would invent "flying pixels" between surfaces).

Splits, as in synth.py: scene i of seed s comes from np.random.SeedSequence([s, i]); seeds below
HELDOUT_FROM (10_000) are for training (TRAIN_SEED = 0), TEST_SEED = 10_001 is never trained on.

Written as the pair-folder layout depth.py reads:
    DIR/rgb/00000.png      8-bit RGB
    DIR/depth/00000.png    16-bit millimetres, 0 = invalid (sky)

    python toy/scenes.py --out runs/scenes --n 1000 --size 64 --seed 0
"""
import argparse
import functools
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

TRAIN_SEED, TEST_SEED, HELDOUT_FROM = 0, 10_001, 10_000
OUTDOOR = 0.2  # the share of open fields (v3, data.DEMO_KINDS): without them no training scene is farther than 20 m
EPS = 1e-4  # ray offset off a surface (shadow rays), metres
SUPERSAMPLE = 2


@dataclass
class Surface:
    """One primitive: kind 'plane' (point, normal, y_max cut for open rooms), 'sphere' (centre, radius), 'box'
    (centre, half sizes, yaw in radians) or 'cylinder' (centre of its base, radius, height), with its material."""
    kind: str
    geom: dict
    colors: np.ndarray  # (2, 3) linear RGB in [0, 1]: the texture mixes the two
    texture: str  # flat | checker | stripes | noise
    tex: dict = field(default_factory=dict)  # texture scale / direction / phases


@dataclass
class Scene:
    surfaces: list
    eye: np.ndarray  # (3,) camera centre
    rot: np.ndarray  # (3, 3) camera-to-world: columns right, up, forward
    fov: float  # horizontal field of view, radians
    light: np.ndarray  # (3,) point lamp
    sky: bool  # open room: no ceiling, rays may leave
    ambient: float = 0.3  # light everywhere, shadow or not
    lamp: float = 6.0  # the point lamp's strength (falls off as 1 / (1 + distance^2))
    sun: np.ndarray = None  # (3,) towards the sun, its length the strength: directional light (open rooms)
    far: float = np.inf  # rays that travel farther see the sky (an open field's haze line)


# ----------------------------------------------------------------------------- intersections, vectorised

def hit_plane(o, d, g):
    """Rays o + t d (N, 3) against a plane; t = inf where missed (behind, parallel or above y_max)."""
    n = np.asarray(g["normal"], float)
    denom = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((np.asarray(g["point"]) - o) @ n) / denom
    t = np.where((t > EPS) & np.isfinite(t), t, np.inf)
    y = o[:, 1] + t * d[:, 1]
    t = np.where(np.isfinite(t) & (y > g.get("y_max", np.inf)), np.inf, t)  # open room: walls end at y_max
    return t, np.broadcast_to(n, o.shape)


def hit_sphere(o, d, g):
    oc = o - g["center"]
    b = np.einsum("ij,ij->i", oc, d)  # d is unit: t^2 + 2 b t + c = 0
    c = np.einsum("ij,ij->i", oc, oc) - g["radius"] ** 2
    disc = b * b - c
    root = np.sqrt(np.maximum(disc, 0))
    t = np.where(-b - root > EPS, -b - root, -b + root)  # the near root, or the far one from inside
    t = np.where((disc >= 0) & (t > EPS), t, np.inf)
    normal = (o + np.where(np.isfinite(t), t, 0)[:, None] * d - g["center"]) / g["radius"]
    return t, normal


def _yaw(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def hit_box(o, d, g):
    """Slab test in the box's own frame (rotated by yaw about y), normals back in the world frame."""
    R = _yaw(g["yaw"])  # box-to-world
    lo_, ld = (o - g["center"]) @ R, d @ R  # world -> box frame (R orthonormal)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-g["half"] - lo_) / ld, (g["half"] - lo_) / ld  # (N, 3) each
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    near, far = np.nan_to_num(near, nan=-np.inf), np.nan_to_num(far, nan=np.inf)
    tn, tf = near.max(1), far.min(1)
    t = np.where(tn > EPS, tn, tf)  # from outside the near face, from inside the far one
    t = np.where((tn <= tf) & (t > EPS), t, np.inf)
    axis = np.where(tn > EPS, near.argmax(1), far.argmin(1))  # (N,) which slab was hit
    local = np.zeros_like(o)
    local[np.arange(len(o)), axis] = -np.sign(ld[np.arange(len(o)), axis])  # faces the ray
    return t, local @ R.T


def hit_cylinder(o, d, g):
    """An upright cylinder (centre of its base, radius, height): the side by the quadratic in xz, the flat top
    and bottom caps by their planes; the nearest valid of the four roots."""
    oc = o - g["center"]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 2] * d[:, 2]
    c = oc[:, 0] ** 2 + oc[:, 2] ** 2 - g["radius"] ** 2
    root = np.sqrt(np.maximum(b * b - a * c, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = [(-b - root) / a, (-b + root) / a, -oc[:, 1] / d[:, 1], (g["height"] - oc[:, 1]) / d[:, 1]]
    best, normal = np.full(len(o), np.inf), np.zeros_like(o)
    for k, t in enumerate(ts):
        t = np.nan_to_num(t, nan=np.inf, posinf=np.inf, neginf=np.inf)
        q = oc + np.where(np.isfinite(t), t, 0)[:, None] * d
        inside = (q[:, 1] >= 0) & (q[:, 1] <= g["height"]) if k < 2 else \
            (q[:, 0] ** 2 + q[:, 2] ** 2 <= g["radius"] ** 2)
        ok = inside & (t > EPS) & (t < best) & ((b * b - a * c >= 0) if k < 2 else True)
        n = q * [1, 0, 1] / g["radius"] if k < 2 else np.broadcast_to([0.0, -1.0 if k == 2 else 1.0, 0], o.shape)
        best, normal = np.where(ok, t, best), np.where(ok[:, None], n, normal)
    return best, normal


HIT = {"plane": hit_plane, "sphere": hit_sphere, "box": hit_box, "cylinder": hit_cylinder}


def cast(surfaces, o, d):
    """Nearest hit of every ray: t (N,) (inf = nothing), surface index (N,), unit normal (N, 3)."""
    best, idx, normal = np.full(len(o), np.inf), np.full(len(o), -1), np.zeros_like(o)
    for i, s in enumerate(surfaces):
        t, n = HIT[s.kind](o, d, s.geom)
        closer = t < best
        best[closer], idx[closer], normal[closer] = t[closer], i, n[closer]
    return best, idx, normal


# ----------------------------------------------------------------------------- shading

def texture(s, p):
    """Mix weight in [0, 1] of the surface's second colour at world points p (N, 3)."""
    k = s.tex.get("scale", 1.0)
    if s.texture == "checker":
        return (np.floor(p / k + 1e-6).sum(1) % 2).astype(float)  # +1e-6: faces on a cell border
    if s.texture == "stripes":
        return (np.floor(p @ s.tex["dir"] / k) % 2).astype(float)
    if s.texture == "noise":  # smooth value-like noise: a few random plane waves
        w = np.sin(p @ s.tex["freqs"].T / k + s.tex["phases"]).mean(1)  # (N,)
        return 0.5 + 0.5 * np.tanh(2 * w)
    return np.zeros(len(p))


def shade(scene, o, d):
    """Colour (N, 3) in [0, 1] (gamma-encoded) and planar depth (N,) (0 where the ray sees the sky)."""
    t, idx, n = cast(scene.surfaces, o, d)
    hit = t < scene.far
    p = o + np.where(hit, t, 0)[:, None] * d
    n = np.where((n * d).sum(1, keepdims=True) > 0, -n, n)  # face the camera (walls seen from inside)
    albedo = np.zeros_like(p)
    for i, s in enumerate(scene.surfaces):
        m = idx == i
        w = texture(s, p[m])[:, None]
        albedo[m] = (1 - w) * s.colors[0] + w * s.colors[1]
    to_l = scene.light - p
    dist = np.linalg.norm(to_l, axis=1)
    ldir = to_l / np.maximum(dist, 1e-9)[:, None]
    ts, _, _ = cast(scene.surfaces, p + EPS * 10 * n, ldir)
    lit = ts > dist  # nothing between the point and the lamp
    diffuse = np.clip((n * ldir).sum(1), 0, None) * lit * scene.lamp / (1.0 + dist**2)  # inverse-square-like
    if scene.sun is not None:  # parallel rays: lit where nothing lies between the point and the sky
        strength = np.linalg.norm(scene.sun)
        sdir = np.broadcast_to(scene.sun / strength, p.shape)
        ts, _, _ = cast(scene.surfaces, p + EPS * 10 * n, sdir)
        diffuse = diffuse + np.clip((n * sdir).sum(1), 0, None) * np.isinf(ts) * strength
    rgb = albedo * (scene.ambient + diffuse)[:, None]
    sky = np.array([0.55, 0.7, 0.95]) * (0.8 + 0.2 * d[:, 1:2].clip(0, 1))
    rgb = np.where(hit[:, None], rgb, sky)
    depth = np.where(hit, t * (d @ scene.rot[:, 2]), 0.0)  # planar depth along the viewing axis
    return np.clip(rgb, 0, 1) ** (1 / 2.2), depth


def rays(scene, size, ss):
    """Unit ray directions (size*ss*size*ss, 3) through a regular grid of sub-pixel centres, row-major."""
    n = size * ss
    u = (np.arange(n) + 0.5) / n * 2 - 1  # [-1, 1] left to right, top to bottom
    f = 1 / np.tan(scene.fov / 2)
    x, y = np.meshgrid(u, -u)  # image y points down, camera up is +y
    cam = np.stack([x, y, np.full_like(x, f)], -1).reshape(-1, 3)
    d = cam @ scene.rot.T
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def render(scene, size=64):
    """-> RGB uint8 (size, size, 3), planar depth float32 (size, size) in metres, 0 = invalid."""
    d = rays(scene, size, SUPERSAMPLE)
    rgb, _ = shade(scene, np.broadcast_to(scene.eye, d.shape), d)
    rgb = rgb.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))  # box filter
    d = rays(scene, size, 1)
    _, depth = shade(scene, np.broadcast_to(scene.eye, d.shape), d)
    return (rgb * 255).round().astype(np.uint8), depth.reshape(size, size).astype(np.float32)


# ----------------------------------------------------------------------------- random scenes

def random_material(rng, scale_range=(0.3, 1.2)):
    """Two colours of one random hue family (or a contrasting second) and a texture, plain (flat) in 40% of
    the cases, with its parameters."""
    base = rng.uniform(0.05, 0.95, 3)
    other = np.clip(base * rng.uniform(0.3, 0.8) if rng.random() < 0.6 else rng.uniform(0.05, 0.95, 3), 0, 1)
    kind = "flat" if rng.random() < 0.4 else ("checker", "stripes", "noise")[rng.integers(3)]
    direction = rng.normal(size=3)
    tex = dict(scale=rng.uniform(*scale_range), dir=direction / np.linalg.norm(direction),
               freqs=rng.normal(size=(4, 3)), phases=rng.uniform(0, 2 * np.pi, 4))
    return np.stack([base, other]), kind, tex


def room(rng, w, dd, h, sky, outdoor=False):
    """Floor, four walls and (closed rooms) a ceiling of a room [-w/2, w/2] x [0, h] x [-1, dd]; outdoors the
    floor alone."""
    walls = [((0, 0, 0), (0, 1, 0))] + ([] if outdoor else [
        ((-w / 2, 0, 0), (1, 0, 0)), ((w / 2, 0, 0), (-1, 0, 0)), ((0, 0, dd), (0, 0, -1)), ((0, 0, -1), (0, 0, 1))])
    if not sky:
        walls.append(((0, h, 0), (0, -1, 0)))
    out = []
    for point, normal in walls:
        g = dict(point=np.array(point, float), normal=np.array(normal, float))
        if sky and normal[1] == 0:
            g["y_max"] = h
        out.append(Surface("plane", g, *random_material(rng, (0.2, 2.0))))
    return out


def random_object(rng, w, dd, h, scale=1.0):
    """One box, sphere or cylinder of random size (times scale) standing on the floor (or, a few boxes, hanging
    from the ceiling height as shelves), anywhere in the room from 0.8 m before the camera's end wall."""
    kind = ("box", "box", "sphere", "cylinder")[rng.integers(4)]
    size = scale * rng.uniform(0.08, 1.0) * rng.uniform(0.4, 1.0, 3)  # flat, tall, long or cube-like
    x, z = rng.uniform(-w / 2 + 0.1, w / 2 - 0.1), rng.uniform(0.8, dd - 0.1)
    mat = random_material(rng, (0.05, 0.5))
    if kind == "sphere":
        r = size[0]
        return Surface("sphere", dict(center=np.array([x, r, z]), radius=r), *mat)
    if kind == "cylinder":
        return Surface("cylinder", dict(center=np.array([x, 0.0, z]), radius=size[0], height=3 * size[1]), *mat)
    half = size * [1, 1.6, 1]
    y = half[1] if rng.random() < 0.85 else rng.uniform(half[1] + 0.3, max(half[1] + 0.31, h - half[1]))
    return Surface("box", dict(center=np.array([x, y, z]), half=half, yaw=rng.uniform(0, np.pi / 2)), *mat)


def clear_of(eye, surface, margin=0.25):
    """Whether the camera stands outside the object (its bounding sphere plus a margin)."""
    g = surface.geom
    c = g["center"] + ([0, g["height"] / 2, 0] if surface.kind == "cylinder" else 0)
    r = {"sphere": lambda: g["radius"], "cylinder": lambda: np.hypot(g["radius"], g["height"] / 2),
         "box": lambda: np.linalg.norm(g["half"])}[surface.kind]()
    return np.linalg.norm(eye - c) > r + margin


def camera(rng, w, dd, h):
    """Eye anywhere in the front third of the room at 0.3-2.6 m, looking into it with yaw, pitch (from
    looking down steeply to slightly up) and a little roll; horizontal field of view 35-95 degrees."""
    eye = np.array([rng.uniform(-w / 2.5, w / 2.5), rng.uniform(0.3, min(2.6, h - 0.2)), rng.uniform(-0.8, dd / 3)])
    yaw, pitch, roll = rng.uniform(-0.8, 0.8), rng.uniform(-0.75, 0.25), rng.uniform(-0.08, 0.08)
    fwd = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross([0, 1, 0], fwd)
    right /= np.linalg.norm(right)
    up = np.cross(fwd, right)
    right, up = np.cos(roll) * right + np.sin(roll) * up, np.cos(roll) * up - np.sin(roll) * right
    return eye, np.stack([right, up, fwd], 1), rng.uniform(np.deg2rad(35), np.deg2rad(95))


def lights(rng, w, dd, h, sky):
    """The point lamp (anywhere under the ceiling height), its strength, the ambient level and, for open
    rooms, a sun from a random direction above the horizon with a random strength."""
    lamp = np.array([rng.uniform(-w / 2.2, w / 2.2), rng.uniform(0.5, 0.95) * h, rng.uniform(0, dd)])
    sun = None
    if sky:
        el, az = rng.uniform(0.2, 1.4), rng.uniform(0, 2 * np.pi)
        sun = rng.uniform(0.3, 1.2) * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    return lamp, rng.uniform(2.0, 12.0), rng.uniform(0.08, 0.5), sun


def make_scene(seed, i):
    """Scene i of seed `seed`: depends on (seed, i) only, so any subset can be rebuilt in any order. Rooms from
    2.5 x 3 m to 12 x 20 m, 2.2-5 m high (30% open to the sky), 0-8 objects the camera is not inside; or (OUTDOOR)
    a field of 15-50 x 15-40 m seen to a haze line 18-30 m away (inside depth.DEPTH_RANGES' 30 m), 3-12 objects
    of 1-4x the size, sunlit."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    outdoor = rng.random() < OUTDOOR
    w, dd = (rng.uniform(15, 50), rng.uniform(15, 40)) if outdoor else (rng.uniform(2.5, 12), rng.uniform(3, 20))
    h = rng.uniform(2.2, 5.0)
    sky = outdoor or rng.random() < 0.3
    eye, rot, fov = camera(rng, w, dd, h)
    scale, count = (rng.uniform(1, 4), rng.integers(3, 13)) if outdoor else (1.0, rng.integers(0, 9))
    objects = [random_object(rng, w, dd, h, scale) for _ in range(count)]
    surfaces = room(rng, w, dd, h, sky, outdoor) + [o for o in objects if clear_of(eye, o)]
    light, lamp, ambient, sun = lights(rng, w, dd, h, sky)
    far = rng.uniform(18, 30) if outdoor else np.inf
    return Scene(surfaces, eye, rot, fov, light, sky, ambient, 0.0 if outdoor else lamp, sun, far)


def draw(seed, i, size):
    """Scene i of seed -> (RGB uint8, planar depth float32): write_pairs' renderer unless given another's."""
    return render(make_scene(seed, i), size)


def write_pair(out, size, seed, draw, i):
    """Scene i as out/rgb/NAME.png + out/depth/NAME.png (uint16 mm, 0 = invalid)."""
    rgb, depth = draw(seed, i, size)
    mm = np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)
    Image.fromarray(rgb).save(out / "rgb" / f"{i:05d}.png")
    Image.fromarray(mm).save(out / "depth" / f"{i:05d}.png")  # PIL writes uint16 arrays as 16-bit PNG


def write_pairs(out, n, size=64, seed=TRAIN_SEED, start=0, workers=1, draw=draw):
    """Scenes start..start+n-1 as a pair folder, rendered by `workers` processes (each scene depends on (seed, i)
    only, so the files are the same for any number); `draw(seed, i, size)` renders one (streets.py passes its own)."""
    out = Path(out)
    (out / "rgb").mkdir(parents=True, exist_ok=True)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    job, ids = functools.partial(write_pair, out, size, seed, draw), range(start, start + n)
    bar = functools.partial(tqdm, total=n, desc=f"writing {out}", dynamic_ncols=True)
    if workers == 1:
        for _ in bar(map(job, ids)):
            pass
        return out
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in bar(pool.imap_unordered(job, ids, chunksize=max(1, n // (8 * workers)))):
            pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Write ray-cast synthetic scenes with exact metric depth as a "
                                "pair folder (rgb/NAME.png + depth/NAME.png, 16-bit millimetres) for depth.py.")
    p.add_argument("--out", required=True, help="output folder, created if missing")
    p.add_argument("--n", type=int, default=1000, help="number of scenes")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=TRAIN_SEED,
                   help=f"stream seed: < {HELDOUT_FROM} for training data, {TEST_SEED} for held-out tests")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rendering processes (default: %(default)s, up to 4 of this machine's cores)")
    a = p.parse_args(argv)
    if a.n < 1 or a.size < 1 or a.workers < 1:
        raise SystemExit("scenes.py: error: --n, --size and --workers must be >= 1")
    write_pairs(a.out, a.n, a.size, a.seed, workers=a.workers)
    print(json.dumps({"out": a.out, "n": a.n, "size": a.size, "seed": a.seed}))


if __name__ == "__main__":
    main()
