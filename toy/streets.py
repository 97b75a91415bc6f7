"""Rasterised street scenes with exact metric depth: the depth demo's second training renderer, our stand-in for
Virtual KITTI 2 (Marigold, and the paper's depth task, train on Hypersim + Virtual KITTI; the demo on scenes.py's
rooms + these streets, mixed by train.py --data A --data B --data-weights).

Why a second one: a model trained on one renderer learns its quirks (its camera, its palette, its shading), and
on toy/rooms_sdf.py's unseen scenes the rooms-only demo was only 21% below the trivial baselines. This renderer
shares no code with scenes.py (analytic ray casts) or rooms_sdf.py (evaluation only; sphere tracing): the world is
a triangle mesh, drawn by a z-buffer rasteriser, lit by a sun whose shadows come from a shadow map.

Per scene (from np.random.SeedSequence([seed, i]) alone):
- a street (75%): a road of 1-2 lanes each way with lane marks, kerbed pavements, a row of buildings on each side
  (facades with window grids or bricks, 3-25 m high, gaps between them), parked and driving cars (body, cabin,
  wheels), lamp posts, signs and trees; or a car park (25%): open tarmac with bays, rows of cars and buildings
  at its far edges;
- a camera on the road at a car's height (1.1-2.2 m) looking along it, pitch -11 to +3 degrees (70%), or a
  pedestrian's on the pavement (0.4-1.8 m) looking anywhere, pitch -26 to +9; horizontal field of view 45-100
  degrees, a little roll;
- a sun from a random direction with shadow-mapped shadows, or an overcast sky (no sun); a sky gradient and a
  distance haze that is complete at `far` (22-30 m): beyond it the scene is haze and has no depth (0).

Depth is the planar z-distance along the viewing axis in metres, exact: on a triangle 1/z is affine in screen
space, so the rasteriser interpolates it with the screen-space barycentrics (perspective-correct). It is drawn
through the pixel centres; colour at 2x2 samples per pixel, box-filtered.

Written as the pair-folder layout depth.py reads (scenes.write_pairs, the one file writer of the toy's renderers):
    DIR/rgb/00000.png      8-bit RGB
    DIR/depth/00000.png    16-bit millimetres, 0 = invalid (haze, sky)

    python toy/streets.py --out runs/streets --n 1000 --size 64 --seed 0
"""
import argparse
import json
import os
from dataclasses import dataclass

import numpy as np

import scenes  # the pair-folder writer and the seed convention only: no geometry or shading

NEAR = 0.05  # metres: triangles are clipped to z >= NEAR before projection
TILE = 16  # samples per side of a rasteriser tile
SHADOW_RES = 256  # shadow-map texels per side
SS = 2  # colour samples per pixel per axis


@dataclass
class Mesh:
    """Triangles with what shading needs, per triangle: the three corners (T, 3, 3), a material index (T,), the
    unit normal (T, 3) and a texture frame (origin, u and v axes in metres, each (T, 3))."""
    tri: np.ndarray
    mat: np.ndarray
    normal: np.ndarray
    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray


@dataclass
class Street:
    mesh: Mesh
    materials: list  # dicts: kind, colours c0, c1 (linear RGB) and the pattern's parameters
    eye: np.ndarray  # (3,)
    rot: np.ndarray  # (3, 3) camera-to-world, columns right, up, forward
    fov: float  # horizontal, radians
    sun: np.ndarray  # (3,) towards the sun, its length the strength; zero vector: overcast
    ambient: float
    far: float  # metres: the haze is complete here; farther has no depth
    sky_top: np.ndarray  # (3,) zenith colour; the horizon is the haze colour
    haze: np.ndarray  # (3,)


# ----------------------------------------------------------------------------- building the mesh

class Builder:
    """Collects quads (two triangles each) and materials into a Mesh."""

    def __init__(self):
        self.quads, self.mats, self.materials = [], [], []

    def material(self, **m):
        self.materials.append(m)
        return len(self.materials) - 1

    def quad(self, o, u, v, mat):
        """The parallelogram o, o + u, o + u + v, o + v, facing cross(u, v)."""
        self.quads.append(np.array([o, u, v], float))
        self.mats.append(mat)

    def box(self, centre, size, yaw, mat, top=None):
        """A box standing on centre (its base's middle), size (x, y, z) before the yaw about +y; five faces (no
        bottom), outward; `top` a material for the top face."""
        c, s = np.cos(yaw), np.sin(yaw)
        ax = [np.array([c, 0, -s]) * size[0], np.array([0, size[1], 0.0]), np.array([s, 0, c]) * size[2]]
        lo = np.asarray(centre, float) - ax[0] / 2 - ax[2] / 2
        x, y, z = ax
        self.quad(lo, y, x, mat)  # front (-z), then back, left, right, top
        self.quad(lo + z + x, y, -x, mat)
        self.quad(lo + z, y, -z, mat)
        self.quad(lo + x, y, z, mat)
        self.quad(lo + y, z, x, mat if top is None else top)

    def build(self):
        q = np.stack(self.quads)  # (Q, 3, 3): origin, u, v
        o, u, v = q[:, 0], q[:, 1], q[:, 2]
        tri = np.concatenate([np.stack([o, o + u, o + u + v], 1), np.stack([o, o + u + v, o + v], 1)])
        n = np.cross(u, v)
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        upright = (np.abs(u[:, 1]) > np.abs(v[:, 1]))[:, None]  # textures run u along, v up a wall
        tu, tv = np.where(upright, v, u), np.where(upright, u, v)
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
        two = lambda a: np.concatenate([a, a])
        return Mesh(tri, two(np.array(self.mats)), two(n), two(o), two(unit(tu)), two(unit(tv)))


# ----------------------------------------------------------------------------- rasterising

def clip_near(tri, near=NEAR):
    """Camera-space triangles (T, 3, 3) -> the parts in front of the plane z = near (Sutherland-Hodgman against
    that one plane: a triangle with one or two corners behind it becomes one or two), and each part's source."""
    front = tri[..., 2] >= near
    count = front.sum(1)
    out, src = [tri[count == 3]], [np.nonzero(count == 3)[0]]
    for t in np.nonzero((count > 0) & (count < 3))[0]:
        poly = []
        for a, b in ((0, 1), (1, 2), (2, 0)):
            A, B = tri[t, a], tri[t, b]
            if A[2] >= near:
                poly.append(A)
            if (A[2] >= near) != (B[2] >= near):
                poly.append(A + (near - A[2]) / (B[2] - A[2]) * (B - A))
        out += [np.array([[poly[0], poly[k], poly[k + 1]]]) for k in range(1, len(poly) - 1)]
        src += [[t]] * (len(poly) - 2)
    return np.concatenate(out).reshape(-1, 3, 3), np.concatenate(src).astype(int)


def rasterize(xy, key, width, height, ss=1):
    """Screen-space triangles -> the nearest one at every sample. xy (T, 3, 2) in pixels (x right, y down), key
    (T, 3) a per-corner value affine over the triangle in screen space whose minimum is nearest (-1/z through a
    pinhole, z for an orthographic view); samples at the centres of an ss x ss grid in each pixel. Works tile by
    tile over the triangles whose bounding box meets the tile. -> key (H ss, W ss) (inf: empty), index (-1)."""
    H, W = height * ss, width * ss
    best, idx = np.full((H, W), np.inf), np.full((H, W), -1)
    p = xy * ss - 0.5  # in sample units: sample (i, j) sits at (j, i)
    (x0, y0), (x1, y1), (x2, y2) = p[:, 0].T, p[:, 1].T, p[:, 2].T
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    ok = np.abs(area) > 1e-12
    lo, hi = np.floor(p.min(1)), np.ceil(p.max(1))  # (T, 2)
    for ty in range(0, H, TILE):
        for tx in range(0, W, TILE):
            sel = np.nonzero(ok & (lo[:, 0] <= tx + TILE - 1) & (hi[:, 0] >= tx) & (lo[:, 1] <= ty + TILE - 1)
                             & (hi[:, 1] >= ty))[0]
            if len(sel) == 0:
                continue
            sy, sx = np.mgrid[ty:min(ty + TILE, H), tx:min(tx + TILE, W)]
            px, py = sx.reshape(-1, 1), sy.reshape(-1, 1)  # (S, 1) against (Ts,)
            a = area[sel]
            w1 = ((px - x0[sel]) * (y2[sel] - y0[sel]) - (py - y0[sel]) * (x2[sel] - x0[sel])) / a
            w2 = ((x1[sel] - x0[sel]) * (py - y0[sel]) - (y1[sel] - y0[sel]) * (px - x0[sel])) / a
            w0 = 1 - w1 - w2
            k = w0 * key[sel, 0] + w1 * key[sel, 1] + w2 * key[sel, 2]
            k = np.where((w0 >= 0) & (w1 >= 0) & (w2 >= 0), k, np.inf)  # (S, Ts)
            j = k.argmin(1)
            kmin = k[np.arange(len(k)), j].reshape(sy.shape)
            best[sy, sx] = kmin
            idx[sy, sx] = np.where(np.isfinite(kmin), sel[j].reshape(sy.shape), -1)
    return best, idx


def focal(scene, width):
    return width / 2 / np.tan(scene.fov / 2)


def view(scene, width, ss):
    """The camera's picture: planar depth (H ss, W ss) (inf: nothing) and the mesh triangle seen (-1)."""
    m = scene.mesh
    cam = (m.tri - scene.eye) @ scene.rot  # (T, 3, 3) camera space: x right, y up, z forward
    facing = np.einsum("tj,tj->t", m.normal, m.tri[:, 0] - scene.eye) < 0  # back faces never show
    tri, src = clip_near(cam[facing])
    src = np.nonzero(facing)[0][src]
    f = focal(scene, width)
    xy = np.stack([width / 2 + f * tri[..., 0] / tri[..., 2], width / 2 - f * tri[..., 1] / tri[..., 2]], -1)
    inv, part = rasterize(xy, -1 / tri[..., 2], width, width, ss)
    z = np.where(part >= 0, -1 / np.where(part >= 0, inv, -1), np.inf)
    return z, np.where(part >= 0, src[part], -1)


def sample_points(scene, z, width, ss):
    """World points (N, 3) of the samples of planar depth z (H ss, W ss), and the unit view rays (N, 3)."""
    n = width * ss
    c = (np.arange(n) + 0.5) / ss - width / 2
    f = focal(scene, width)
    x, y = np.meshgrid(c / f, -c / f)
    ray = np.stack([x, y, np.ones_like(x)], -1).reshape(-1, 3)  # camera space, z = 1
    world = np.where(np.isfinite(z).reshape(-1, 1), z.reshape(-1, 1), 0) * ray @ scene.rot.T + scene.eye
    d = ray @ scene.rot.T
    return world, d / np.linalg.norm(d, axis=1, keepdims=True)


def sunlit(scene, p, res=SHADOW_RES):
    """Whether each world point p (N, 3) sees the sun: an orthographic depth map of the mesh from the sun over
    the points' extent, compared with a bias of a few texels, averaged over the texel and its 4 neighbours."""
    L = scene.sun / np.linalg.norm(scene.sun)
    right = np.cross([0.0, 1.0, 0.0] if abs(L[1]) < 0.99 else [1.0, 0, 0], L)
    right /= np.linalg.norm(right)
    basis = np.stack([right, np.cross(L, right), -L], 1)  # light space: x, y across the beam, z away from the sun
    q, tri = p @ basis, scene.mesh.tri @ basis
    lo = q[:, :2].min(0) - 1.0
    texel = max((q[:, :2].max(0) + 1.0 - lo).max() / res, 1e-3)
    depth, _ = rasterize((tri[..., :2] - lo) / texel, tri[..., 2], res, res)
    ij = np.floor((q[:, :2] - lo) / texel).astype(int)
    lit = np.zeros(len(p))
    for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        x, y = np.clip(ij[:, 0] + di, 0, res - 1), np.clip(ij[:, 1] + dj, 0, res - 1)
        lit += q[:, 2] <= depth[y, x] + 0.05 + 3 * texel
    return lit / 5


# ----------------------------------------------------------------------------- shading

def value_noise(u, v, seed):
    """Smooth noise in [0, 1] on the plane: hashed lattice values, bilinear with a smoothstep."""
    i, j = np.floor(u), np.floor(v)
    fu, fv = u - i, v - j
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    h = lambda a, b: np.modf(np.abs(np.sin(a * 127.1 + b * 311.7 + seed * 74.7) * 43758.5453))[0]
    top = h(i, j) * (1 - fu) + h(i + 1, j) * fu
    bottom = h(i, j + 1) * (1 - fu) + h(i + 1, j + 1) * fu
    return top * (1 - fv) + bottom * fv


def pattern(m, u, v):
    """Weight of a material's second colour at texture coordinates (u, v) in metres."""
    kind = m["kind"]
    if kind == "windows":  # a grid of panes, one per bay and storey
        fu, fv = np.modf(u / m["bay"])[0] % 1, np.modf((v - m["sill"]) / m["storey"])[0] % 1
        return ((fu > m["gap"]) & (fu < 1 - m["gap"]) & (fv > 0.3) & (fv < 0.85) & (v > m["sill"])).astype(float)
    if kind == "bricks":  # mortar lines, alternate courses shifted by half a brick
        row = np.floor(v / m["course"])
        fu = np.modf(u / (2 * m["course"]) + 0.5 * (row % 2))[0] % 1
        return ((np.modf(v / m["course"])[0] % 1 < 0.15) | (fu < 0.06)).astype(float)
    if kind == "tiles":
        fu, fv = np.modf(u / m["size"])[0] % 1, np.modf(v / m["size"])[0] % 1
        return ((fu < 0.05) | (fv < 0.05)).astype(float)
    if kind == "grain":  # tarmac, grass, leaves: noise at two scales
        return 0.6 * value_noise(u / m["size"], v / m["size"], m["seed"]) + 0.4 * value_noise(
            u / m["size"] * 4.1, v / m["size"] * 4.1, m["seed"] + 1)
    return np.zeros_like(u)


def albedo(scene, tri, p):
    """Linear RGB albedo (N, 3) of mesh triangles tri (N,) at world points p (N, 3)."""
    m = scene.mesh
    rel = p - m.origin[tri]
    u, v = np.einsum("nj,nj->n", rel, m.u[tri]), np.einsum("nj,nj->n", rel, m.v[tri])
    out = np.zeros_like(p)
    for k in np.unique(m.mat[tri]):
        sel = m.mat[tri] == k
        mat = scene.materials[k]
        w = pattern(mat, u[sel], v[sel])[:, None]
        out[sel] = (1 - w) * mat["c0"] + w * mat["c1"]
    return out


def sky(scene, d):
    """The sky seen along unit rays d (N, 3): haze at the horizon to the zenith colour overhead."""
    up = np.clip(d[:, 1:2], 0, 1) ** 0.6
    return (1 - up) * scene.haze + up * scene.sky_top


def shade(scene, z, tri, width, ss):
    """Colour (N, 3), sRGB in [0, 1], of the samples with planar depth z and triangles tri (flattened)."""
    p, d = sample_points(scene, z, width, ss)
    z, tri = z.reshape(-1), tri.reshape(-1)
    hit = (tri >= 0) & (z < scene.far)
    rgb = sky(scene, d)
    ph, th = p[hit], tri[hit]
    n = scene.mesh.normal[th]
    light = scene.ambient * (0.6 + 0.4 * n[:, 1:2]) * (0.5 * scene.sky_top + 0.5 * scene.haze) / 0.7
    strength = np.linalg.norm(scene.sun)
    if strength > 0 and len(ph):
        direct = np.clip(n @ (scene.sun / strength), 0, None) * sunlit(scene, ph) * strength
        light = light + direct[:, None] * np.array([1.0, 0.95, 0.85])
    fog = (1 - np.exp(-3 * (z[hit] / scene.far) ** 4))[:, None]  # faint to 16% at half of far, 95% at far
    rgb[hit] = (1 - fog) * albedo(scene, th, ph) * light + fog * scene.haze
    return np.clip(rgb, 0, 1) ** (1 / 2.2)


def render(scene, size=64):
    """-> RGB uint8 (size, size, 3) and planar depth float32 (size, size) in metres, 0 = invalid (haze, sky)."""
    z, tri = view(scene, size, SS)
    rgb = shade(scene, z, tri, size, SS).reshape(size, SS, size, SS, 3).mean((1, 3))
    z, tri = view(scene, size, 1)
    depth = np.where((tri >= 0) & (z < scene.far), z, 0.0)
    return (rgb * 255).round().astype(np.uint8), depth.astype(np.float32)


# ----------------------------------------------------------------------------- random streets

def colour(rng, base, jitter=0.08):
    """A linear-RGB colour near `base` (sRGB triple): brighter or darker by up to +-jitter, each channel moved by
    up to a third of that (a grey stays grey)."""
    shift = rng.uniform(-jitter, jitter) + rng.uniform(-jitter, jitter, 3) / 3
    return np.clip(np.asarray(base) + shift, 0.02, 0.98) ** 2.2


FACADES = [(0.85, 0.8, 0.7), (0.7, 0.7, 0.7), (0.6, 0.3, 0.25), (0.95, 0.95, 0.92), (0.8, 0.65, 0.5),
           (0.5, 0.55, 0.6), (0.9, 0.85, 0.6), (0.4, 0.35, 0.3), (0.75, 0.8, 0.85)]  # plaster, concrete, brick...
PAINTS = [(0.8, 0.1, 0.1), (0.1, 0.2, 0.6), (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), (0.6, 0.6, 0.65), (0.9, 0.7, 0.1),
          (0.2, 0.45, 0.25), (0.5, 0.15, 0.4), (0.3, 0.55, 0.8)]


def facade(rng, b):
    """A building's wall material: windows (a bay 1.4-3.2 m wide, storeys of 2.7-3.6 m) or bricks."""
    wall = colour(rng, FACADES[rng.integers(len(FACADES))])
    if rng.random() < 0.2:
        return b.material(kind="bricks", c0=wall, c1=colour(rng, (0.8, 0.8, 0.78)), course=rng.uniform(0.15, 0.3))
    glass = colour(rng, (0.15, 0.2, 0.28) if rng.random() < 0.8 else (0.85, 0.75, 0.45), 0.1)
    return b.material(kind="windows", c0=wall, c1=glass, bay=rng.uniform(1.4, 3.2), storey=rng.uniform(2.7, 3.6),
                      gap=rng.uniform(0.12, 0.35), sill=rng.uniform(0.0, 1.5))


def grain(rng, b, base, size):
    return b.material(kind="grain", c0=colour(rng, base), c1=colour(rng, np.asarray(base) * 0.6),
                      size=size, seed=rng.uniform(0, 100))


def car(rng, b, x, z, yaw):
    """A car or van at (x, z) heading yaw: body on four wheels, a glass cabin; -> its footprint radius."""
    length, width = rng.uniform(3.6, 5.0), rng.uniform(1.6, 1.95)
    van = rng.random() < 0.2
    body_h = rng.uniform(1.3, 1.8) if van else rng.uniform(0.55, 0.8)
    paint = b.material(kind="plain", c0=colour(rng, PAINTS[rng.integers(len(PAINTS))], 0.05), c1=0)
    glass = b.material(kind="plain", c0=colour(rng, (0.12, 0.14, 0.18), 0.04), c1=0)
    tyre = b.material(kind="plain", c0=colour(rng, (0.08, 0.08, 0.08), 0.02), c1=0)
    c, s = np.cos(yaw), np.sin(yaw)
    along, across = np.array([s, 0, c]), np.array([c, 0, -s])
    for fa in (-0.32, 0.32):
        for fb in (-0.45, 0.45):
            b.box(np.array([x, 0, z]) + fa * length * along + fb * width * across, (0.22, 0.6, 0.6), yaw, tyre)
    b.box((x, 0.3, z), (width, body_h, length), yaw, paint)
    if not van:
        shift = rng.uniform(-0.1, 0.05) * length * along
        b.box(np.array([x, 0.3 + body_h, z]) + shift, (width * 0.85, rng.uniform(0.45, 0.6), length * 0.5), yaw,
              glass, top=paint)
    return np.hypot(length, width) / 2


def lamp_post(rng, b, x, z, side, mat):
    height = rng.uniform(4, 8)
    b.box((x, 0, z), (0.14, height, 0.14), 0.0, mat)
    b.box((x - side * 0.6, height - 0.2, z), (1.2, 0.12, 0.25), 0.0, mat)


def sign(rng, b, x, z, mat):
    b.box((x, 0, z), (0.08, rng.uniform(2.0, 2.8), 0.08), 0.0, mat)
    face = b.material(kind="plain", c0=colour(rng, PAINTS[rng.integers(len(PAINTS))], 0.1), c1=0)
    b.box((x, rng.uniform(2.0, 2.6), z), (rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8), 0.06), rng.uniform(-0.4, 0.4),
          face)


def tree(rng, b, x, z, bark, leaves):
    trunk = rng.uniform(1.8, 3.5)
    b.box((x, 0, z), (0.25, trunk + 0.5, 0.25), 0.0, bark)
    for k in range(rng.integers(1, 3)):
        size = rng.uniform(1.5, 3.5, 3) * [1, 0.8, 1]
        b.box((x + rng.uniform(-0.4, 0.4), trunk + k * 0.6, z + rng.uniform(-0.4, 0.4)), size, rng.uniform(0, 1.6),
              leaves)


def row_of_buildings(rng, b, side, edge, z0, z1):
    """Buildings along the road from z0 to z1 on `side` (-1 left, +1 right), their fronts from `edge` outwards,
    with gaps (alleys) and a second row behind some of them."""
    z = z0
    while z < z1:
        width = rng.uniform(5, 20)
        if rng.random() < 0.15:
            z += rng.uniform(2, 8)  # an alley: what is behind shows through
            continue
        depth_, height = rng.uniform(8, 15), rng.uniform(3, 25) if rng.random() < 0.8 else rng.uniform(3, 7)
        front = edge + rng.uniform(0, 1.5) * (rng.random() < 0.5)
        b.box((side * (front + depth_ / 2), 0, z + width / 2), (depth_, height, width), 0.0, facade(rng, b),
              top=b.material(kind="plain", c0=colour(rng, (0.35, 0.33, 0.32)), c1=0))
        if rng.random() < 0.4:
            back = rng.uniform(6, 15)
            b.box((side * (front + depth_ + back / 2 + 1), 0, z + width / 2), (back, rng.uniform(8, 35), width), 0.0,
                  facade(rng, b))
        z += width


def street(rng, b):
    """A road along +z with lane marks, pavements, buildings, cars, posts, signs and trees; -> (lane x range,
    pavement x ranges, obstacles (x, z, radius))."""
    lane = rng.uniform(2.7, 3.6)
    half = lane * rng.integers(1, 3)
    pave = rng.uniform(1.5, 4)
    kerb = rng.uniform(0.1, 0.18)
    road = grain(rng, b, (0.22, 0.22, 0.23), rng.uniform(0.05, 0.4))
    b.quad((-80, 0, -80), (0, 0, 200), (160, 0, 0), road)
    white = b.material(kind="plain", c0=colour(rng, (0.85, 0.85, 0.8), 0.05), c1=0)
    dash, period = rng.uniform(1.5, 4), rng.uniform(5, 12)
    for x in np.arange(-half + lane, half - 0.1, lane):
        for z in np.arange(-60, 80, period):
            b.quad((x - 0.07, 0.004, z), (0, 0, dash), (0.14, 0, 0), white)
    paving = b.material(kind="tiles", c0=colour(rng, (0.55, 0.53, 0.5), 0.1), c1=colour(rng, (0.35, 0.35, 0.35)),
                        size=rng.uniform(0.3, 0.8))
    post = b.material(kind="plain", c0=colour(rng, (0.3, 0.32, 0.3)), c1=0)
    bark = grain(rng, b, (0.35, 0.25, 0.15), 0.3)
    leaves = grain(rng, b, (0.25, 0.45, 0.15), rng.uniform(0.2, 0.6))
    obstacles = []
    for side in (-1, 1):
        b.box((side * (half + pave / 2), 0, 10), (pave, kerb, 140), 0.0, paving)
        row_of_buildings(rng, b, side, half + pave, -60, 80)
        for z in np.arange(-60 + rng.uniform(0, 20), 80, rng.uniform(12, 30)):
            x = side * (half + 0.4)
            lamp_post(rng, b, x, z, side, post) if rng.random() < 0.7 else sign(rng, b, x, z, post)
            obstacles.append((x, z, 0.3))
        for z in np.arange(-60 + rng.uniform(0, 15), 80, rng.uniform(8, 25)) if rng.random() < 0.6 else []:
            x = side * (half + pave * rng.uniform(0.4, 0.7))
            tree(rng, b, x, z, bark, leaves)
            obstacles.append((x, z, 1.8))  # the crown hangs down to 1.8 m
        parked = rng.uniform(0, 0.8)
        for z in np.arange(-40, 60, rng.uniform(5.5, 7.5)):
            if rng.random() < parked:
                x = side * (half - 1.1)
                obstacles.append((x, z, car(rng, b, x, z, rng.uniform(-0.05, 0.05))))
    for _ in range(rng.integers(0, 6)):  # traffic, in the lanes (left-hand lanes come towards us)
        x, z = rng.uniform(-half + 1, half - 1), rng.uniform(-20, 50)
        obstacles.append((x, z, car(rng, b, x, z, (0 if x > 0 else np.pi) + rng.uniform(-0.1, 0.1))))
    return (-half + 0.8, half - 0.8), [(-half - pave + 0.3, -half - 0.3), (half + 0.3, half + pave - 0.3)], obstacles


def car_park(rng, b):
    """Open tarmac with marked bays, rows of cars, lamp posts, and buildings 8-35 m away on three sides;
    -> (free x range, [], obstacles)."""
    b.quad((-80, 0, -80), (0, 0, 200), (160, 0, 0), grain(rng, b, (0.28, 0.28, 0.28), rng.uniform(0.1, 0.5)))
    white = b.material(kind="plain", c0=colour(rng, (0.85, 0.85, 0.8), 0.05), c1=0)
    bay, aisle = rng.uniform(2.4, 2.9), rng.uniform(12, 16)
    obstacles, post = [], b.material(kind="plain", c0=colour(rng, (0.4, 0.4, 0.42)), c1=0)
    for z in np.arange(rng.uniform(4, 10), 45, aisle):
        for x in np.arange(-30, 30, bay):
            b.quad((x, 0.004, z), (0, 0, 5), (0.12, 0, 0), white)
            if rng.random() < 0.6:
                cx, cz = x + bay / 2, z + 2.5
                obstacles.append((cx, cz, car(rng, b, cx, cz, rng.uniform(-0.08, 0.08) + np.pi * rng.integers(2))))
        for x in np.arange(-28, 30, rng.uniform(10, 25)):
            lamp_post(rng, b, x, z + 5.2, 1, post)
    for side in (-1, 1):
        row_of_buildings(rng, b, side, rng.uniform(8, 25), -40, 80)
    back = rng.uniform(15, 35)
    for x in np.arange(-60, 60, rng.uniform(10, 25)):
        b.box((x, 0, back + 6), (rng.uniform(8, 25), rng.uniform(4, 20), 12), 0.0, facade(rng, b))
    return (-25.0, 25.0), [], obstacles


def look(yaw, pitch, roll):
    """Camera-to-world rotation (columns right, up, forward) of a camera turned yaw about +y (0: +z), pitched
    up by pitch and rolled by roll."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    fwd = np.array([sy * cp, sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    up = np.cross(fwd, right)
    return np.stack([cr * right + sr * up, cr * up - sr * right, fwd], 1)


def camera(rng, lanes, pavements, obstacles):
    """A driver's eye in a lane looking along the road, or (30%, or always without pavements at 30%) a
    pedestrian's anywhere; retried until clear of every obstacle."""
    for _ in range(100):
        walker = rng.random() < 0.3
        xs = pavements[rng.integers(len(pavements))] if walker and pavements else lanes
        eye = np.array([rng.uniform(*xs), rng.uniform(0.4, 1.8) if walker else rng.uniform(1.1, 2.2),
                        rng.uniform(-8, 8)])
        if all(np.hypot(eye[0] - x, eye[2] - z) > r + 0.6 for x, z, r in obstacles):
            break
    yaw = rng.uniform(0, 2 * np.pi) if walker else rng.uniform(-0.5, 0.5) + np.pi * (rng.random() < 0.2)
    rot = look(yaw, rng.uniform(-0.45, 0.15) if walker else rng.uniform(-0.2, 0.05), rng.uniform(-0.05, 0.05))
    return eye, rot, np.deg2rad(rng.uniform(45, 100))


def make_scene(seed, i):
    """Scene i of seed `seed`: depends on (seed, i) only, so any subset can be rebuilt in any order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    b = Builder()
    lanes, pavements, obstacles = street(rng, b) if rng.random() < 0.75 else car_park(rng, b)
    eye, rot, fov = camera(rng, lanes, pavements, obstacles)
    overcast = rng.random() < 0.25
    el, az = rng.uniform(0.15, 1.3), rng.uniform(0, 2 * np.pi)
    sun = np.zeros(3) if overcast else rng.uniform(0.8, 1.6) * np.array(
        [np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    haze = colour(rng, (0.75, 0.78, 0.8) if overcast else (0.72, 0.8, 0.9), 0.06) ** (1 / 2.2)
    top = colour(rng, (0.6, 0.62, 0.65) if overcast else (0.3, 0.5, 0.85), 0.06) ** (1 / 2.2)
    ambient = rng.uniform(0.8, 1.3) if overcast else rng.uniform(0.25, 0.6)
    return Street(b.build(), b.materials, eye, rot, fov, sun, ambient, rng.uniform(22, 30), top, haze)


def draw(seed, i, size):
    """scenes.write_pairs' renderer: scene i of seed -> (RGB uint8, planar depth float32)."""
    return render(make_scene(seed, i), size)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write rasterised street scenes (a Virtual KITTI stand-in) with exact "
                                "metric depth as a pair folder (rgb/NAME.png + depth/NAME.png, 16-bit millimetres) "
                                "for depth.py.")
    p.add_argument("--out", required=True, help="output folder, created if missing")
    p.add_argument("--n", type=int, default=1000, help="number of scenes (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=scenes.TRAIN_SEED,
                   help=f"stream seed: < {scenes.HELDOUT_FROM} for training data, {scenes.TEST_SEED} for held-out "
                   "tests (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rendering processes (default: %(default)s, up to 4 of this machine's cores)")
    a = p.parse_args(argv)
    if a.n < 1 or a.size < 1 or a.workers < 1:
        raise SystemExit("streets.py: error: --n, --size and --workers must be >= 1")
    scenes.write_pairs(a.out, a.n, a.size, a.seed, workers=a.workers, draw=draw)
    print(json.dumps({"out": a.out, "n": a.n, "size": a.size, "seed": a.seed}))


if __name__ == "__main__":
    main()
