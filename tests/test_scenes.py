"""scenes.py: exact ray-cast geometry (analytic cases), determinism, the pair-folder files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import depth
import scenes
from scenes import Scene, Surface


def flat(kind, **geom):
    return Surface(kind, geom, np.array([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]), "flat")


def facing_wall(dist, fov_deg=90.0):
    """Camera at the origin looking down +z at a wall z = dist, lamp beside the camera."""
    wall = flat("plane", point=np.array([0, 0, dist]), normal=np.array([0.0, 0, -1]))
    return Scene([wall], np.zeros(3), np.eye(3), np.deg2rad(fov_deg), np.array([0.0, 0, 0.5]), sky=False)


def test_planar_depth_of_a_facing_wall_is_its_distance_everywhere():
    """Depth is the z-distance, not the ray length: a wall at 5 m reads 5 m in every pixel (corner rays of a
    90 degree view travel ~6.1 m)."""
    rgb, d = scenes.render(facing_wall(5.0), 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(d, 5.0, rtol=1e-6)
    rays = scenes.rays(facing_wall(5.0), 16, 1)
    assert 5.0 / rays[:, 2].min() > 6.0


def test_sphere_hits_near_root_outside_far_root_inside_and_misses():
    g = dict(center=np.array([0.0, 0, 4]), radius=1.0)
    o = np.array([[0.0, 0, 0], [0, 0, 4], [0, 3, 0]])
    d = np.array([[0.0, 0, 1], [0, 0, 1], [0, 0, 1]])
    t, n = scenes.hit_sphere(o, d, g)
    np.testing.assert_allclose(t[:2], [3.0, 1.0])
    assert np.isinf(t[2])
    np.testing.assert_allclose(n[0], [0, 0, -1])


def test_box_slabs_with_yaw():
    """A box of half sizes (1, 0.5, 2): from x = -10 along +x it is hit at 9; turned 90 degrees about y its
    long side lies along x, hit at 8. Normals face the ray."""
    o, d = np.array([[-10.0, 0, 0]]), np.array([[1.0, 0, 0]])
    g = dict(center=np.zeros(3), half=np.array([1.0, 0.5, 2.0]), yaw=0.0)
    t, n = scenes.hit_box(o, d, g)
    np.testing.assert_allclose(t, [9.0])
    np.testing.assert_allclose(n[0], [-1, 0, 0], atol=1e-12)
    t, n = scenes.hit_box(o, d, {**g, "yaw": np.pi / 2})
    np.testing.assert_allclose(t, [8.0])
    np.testing.assert_allclose(n[0], [-1, 0, 0], atol=1e-12)
    t, _ = scenes.hit_box(np.array([[-10.0, 5, 0]]), d, g)  # passes above
    assert np.isinf(t[0])


def test_nearest_surface_wins_and_shadows_darken():
    """A sphere in front of the wall occludes it (depth 4 - 1 = 3 at the centre); the wall behind the
    sphere, seen from the lamp's side, is darker than the lit wall beside it."""
    s = facing_wall(8.0, fov_deg=60)
    s.surfaces.append(flat("sphere", center=np.array([0.0, 0, 4]), radius=1.0))
    s.light = np.array([0.0, 0, 0.5])
    t, idx, _ = scenes.cast(s.surfaces, np.zeros((1, 3)), np.array([[0.0, 0, 1]]))
    assert (t[0], idx[0]) == (3.0, 1)
    shadowed = scenes.shade(s, np.array([[0.0, 1.5, 0]]), np.array([[0.0, 0, 1]]))  # wall point (0, 1.5, 8)
    lit = scenes.shade(s, np.array([[0.0, 3.5, 0]]), np.array([[0.0, 0, 1]]))  # (0, 3.5, 8): lamp sees it
    assert scenes.cast(s.surfaces, np.array([[0.0, 0, 0.5]]), np.array([[0.0, 1.5, 7.5]]) / np.hypot(1.5, 7.5))[1][0] == 1
    assert shadowed[0].sum() < lit[0].sum()


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = scenes.render(scenes.make_scene(0, 3), 24), scenes.render(scenes.make_scene(0, 3), 24)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], scenes.render(scenes.make_scene(0, 4), 24)[1])
    assert not np.array_equal(a[1], scenes.render(scenes.make_scene(scenes.TEST_SEED, 3), 24)[1])


def test_depths_are_metric_and_in_range_and_sky_is_invalid():
    lo, hi = depth.DEPTH_RANGES["scenes"]
    skies = 0
    for i in range(12):
        s = scenes.make_scene(0, i)
        _, d = scenes.render(s, 16)
        assert (d[d > 0] > lo).all() and (d < hi).all()
        skies += (d == 0).any()
        if not s.sky:
            assert (d > 0).all(), "a closed room has depth everywhere"
    assert skies > 0, "some rooms are open to the sky (invalid pixels)"


def test_open_fields_reach_far_and_end_in_sky_within_the_evaluation_range():
    """The fields (scenes.OUTDOOR) are the training scenes' only depths beyond a room's 20 m: ground that runs to
    a haze line, sky above it, depth up to the range depth.py evaluates in."""
    lo, hi = depth.DEPTH_RANGES["scenes"]
    fields = [s for s in (scenes.make_scene(0, i) for i in range(40)) if np.isfinite(s.far)]
    assert 3 <= len(fields) <= 16  # about 20% of 40
    for s in fields[:3]:
        assert s.sky and s.lamp == 0 and sum(o.kind == "plane" for o in s.surfaces) == 1  # ground only, sunlit
        _, d = scenes.render(s, 24)
        assert (d == 0).any() and d.max() > 15 and d.max() < hi


def test_write_pairs_16bit_millimetres_read_back(tmp_path):
    out = scenes.write_pairs(tmp_path / "pairs", 3, 16, seed=5)
    ds = depth.PairDataset(out)
    assert len(ds) == 3
    image, d, valid = ds[1]
    _, exact = scenes.render(scenes.make_scene(5, 1), 16)
    np.testing.assert_allclose(d.numpy(), exact, atol=5e-4)  # rounded to whole millimetres
    np.testing.assert_array_equal(valid.numpy(), exact > 0)
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1


def test_cli(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(scenes.__file__)))  # as toy/make_depth_demo.sh runs it
    r = subprocess.run([sys.executable, "toy/scenes.py", "--out", str(tmp_path / "s"), "--n", "2", "--size", "16",
                        "--seed", "3"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 2
    assert sorted(p.name for p in (tmp_path / "s" / "depth").iterdir()) == ["00000.png", "00001.png"]
    with pytest.raises(SystemExit, match="--n, --size and --workers"):
        scenes.main(["--out", str(tmp_path / "x"), "--n", "0"])


def test_cylinder_side_caps_and_misses():
    """An upright cylinder, base centre (0, 0, 5), radius 1, height 2: along +z at y = 1 its side at z = 4; from above
    (y = 10, straight down) its top cap at t = 8; past its top (y = 3) nothing; from inside, the far side."""
    g = dict(center=np.array([0.0, 0, 5]), radius=1.0, height=2.0)
    o = np.array([[0.0, 1, 0], [0, 10, 5], [0, 3, 0], [0, 1, 5]])
    d = np.array([[0.0, 0, 1], [0, -1, 0], [0, 0, 1], [0, 0, 1]])
    t, n = scenes.hit_cylinder(o, d, g)
    np.testing.assert_allclose(t[[0, 1, 3]], [4.0, 8.0, 1.0])
    assert np.isinf(t[2])
    np.testing.assert_allclose(n[0], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(n[1], [0, 1, 0])


def test_scenes_vary_in_camera_room_objects_and_light():
    """The rooms differ in what a depth model must read: field of view, camera height and pitch, room size, the
    number and kinds of objects, plain and textured materials, lamp strength, ambient level, sun or ceiling."""
    s = [scenes.make_scene(0, i) for i in range(60)]
    fov, height = np.rad2deg([x.fov for x in s]), [x.eye[1] for x in s]
    pitch = np.rad2deg([np.arcsin(x.rot[1, 2]) for x in s])
    assert fov.min() < 45 and fov.max() > 85 and min(height) < 0.7 and max(height) > 2.0
    assert pitch.min() < -30 and pitch.max() > 5
    kinds = [k for x in s for k in {o.kind for o in x.surfaces if o.kind != "plane"}]
    assert {"box", "sphere", "cylinder"} <= set(kinds)
    counts = [sum(o.kind != "plane" for o in x.surfaces) for x in s]
    assert min(counts) == 0 and max(counts) >= 6
    textures = {o.texture for x in s for o in x.surfaces}
    assert textures == {"flat", "checker", "stripes", "noise"}
    assert np.ptp([x.lamp for x in s]) > 5 and np.ptp([x.ambient for x in s]) > 0.3
    assert all((x.sun is not None) == x.sky for x in s) and 5 < sum(x.sky for x in s) < 40


def test_write_pairs_is_the_same_for_any_number_of_workers(tmp_path):
    a = scenes.write_pairs(tmp_path / "a", 3, 16, seed=2)
    b = scenes.write_pairs(tmp_path / "b", 3, 16, seed=2, workers=2)
    for sub in ("rgb", "depth"):
        for name in ("00000.png", "00001.png", "00002.png"):
            assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes()
