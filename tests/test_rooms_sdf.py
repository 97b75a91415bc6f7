"""rooms_sdf.py, the evaluation-only SDF renderer: exact planar depth on constructed scenes (after the 16-bit
millimetre round trip), exact primitives, determinism, sky = invalid, PairDataset reads its folders, and it
shares no code with scenes.py (the training renderer)."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import depth
import rooms_sdf as R

TOY = os.path.dirname(os.path.abspath(R.__file__))
GREY = R.Material(np.full(3, 0.5), np.full(3, 0.2))


def looking_down_z(parts, vfov_deg=70.0, outdoor=False):
    """Camera at the origin, viewing axis +z, no roll; a sun behind it."""
    light = R.Light(np.array([0.0, 0.6, -0.8]), np.ones(3), np.full(3, 0.3), np.full(3, 0.1))
    return R.World(parts, R.Camera(np.zeros(3), np.eye(3), np.deg2rad(vfov_deg)), light, outdoor)


def wall(point, normal):
    """The half space behind a plane (normal towards the camera), as a solid."""
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    return R.Part(lambda p: (p - np.asarray(point, float)) @ n, GREY, casts=False)


def test_facing_wall_depth_is_its_distance_at_every_pixel_after_the_16bit_round_trip(tmp_path):
    """A fronto-parallel wall at 4.321 m: every pixel (corners too: planar z, not the ray length, which is
    ~5.6 m at the corners of a 70 degree view) reads 4.321 m, also back from the 16-bit PNG, to 1 mm."""
    scene = looking_down_z([wall((0, 0, 4.321), (0, 0, -1))])
    rgb, d = R.render(scene, 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8 and d.shape == (16, 16) and d.dtype == np.float32
    np.testing.assert_allclose(d, 4.321, atol=1e-5)
    assert 4.321 / R.camera_rays(scene.camera, 16)[:, 2].min() > 5.5  # corner rays are that much longer
    (tmp_path / "rgb").mkdir(), (tmp_path / "depth").mkdir()
    R.save_pair(tmp_path, "00000", rgb, d)
    back = depth.read_depth(str(tmp_path / "depth" / "00000.png")).numpy()
    np.testing.assert_allclose(back, 4.321, atol=1e-3 / 2 + 1e-6)


def test_oblique_wall_depth_is_exact_not_the_tracers_eps_shell():
    """A wall turned 50 degrees: sphere tracing alone stops up to HIT_EPS * t short; the Newton refinement
    lands on the plane. Planar depth from the analytic ray-plane intersection, per pixel."""
    n = np.array([np.sin(np.deg2rad(50)), 0, -np.cos(np.deg2rad(50))])
    scene = looking_down_z([wall((0, 0, 6.0), n)], vfov_deg=40)
    _, d = R.render(scene, 16)
    rays = R.camera_rays(scene.camera, 16)
    t = (np.array([0, 0, 6.0]) @ n) / (rays @ n)
    np.testing.assert_allclose(d.ravel(), t * rays[:, 2], rtol=1e-6)


def test_objects_in_front_of_a_wall_centre_pixel_depths():
    """Odd image side: the centre pixel's ray is the viewing axis. A sphere of radius 1 at z = 4 reads 3 m
    there; a box turned 45 degrees about y, centred at z = 6, shows its vertical edge at 6 - 0.5 sqrt 2."""
    back = wall((0, 0, 9.0), (0, 0, -1))
    ball = R.Part(lambda p: R.sd_sphere(p, 1.0), GREY, np.array([0.0, 0, 4]))
    _, d = R.render(looking_down_z([back, ball]), 15)
    assert abs(d[7, 7] - 3.0) < 1e-6 and abs(d[0, 0] - 9.0) < 1e-6
    box = R.Part(lambda p: R.sd_box(p, np.full(3, 0.5)), GREY, np.array([0.0, 0, 6]), R.yaw_matrix(np.pi / 4))
    _, d = R.render(looking_down_z([back, box], vfov_deg=30), 15)
    assert abs(d[7, 7] - (6 - 0.5 * np.sqrt(2))) < 1e-6


@pytest.mark.parametrize("name, sdf", [
    ("sphere", lambda p: R.sd_sphere(p, 0.7)), ("box", lambda p: R.sd_box(p, np.array([0.3, 0.6, 0.2]))),
    ("round_box", lambda p: R.sd_round_box(p, np.array([0.3, 0.6, 0.2]), 0.1)),
    ("cylinder", lambda p: R.sd_cylinder(p, 0.4, 0.8)), ("capsule", lambda p: R.sd_capsule(p, 0.5, 0.2)),
    ("torus", lambda p: R.sd_torus(p, 0.6, 0.15)), ("cone", lambda p: R.sd_capped_cone(p, 0.7, 0.5, 0.1))])
def test_primitives_are_exact_distances(name, sdf):
    """Eikonal: |grad sdf| = 1 at random points off the surface; and distance == sdf: stepping sdf along
    the negative gradient lands on the surface (sdf ~ 0)."""
    p = np.random.default_rng(0).uniform(-2, 2, (400, 3))
    f = sdf(p)
    p = p[np.abs(f) > 0.05]
    g = np.stack([(sdf(p + e) - sdf(p - e)) / 2e-5 for e in np.eye(3) * 1e-5], 1)
    norm = np.linalg.norm(g, axis=1)
    assert np.median(np.abs(norm - 1)) < 1e-4 and np.mean(np.abs(norm - 1) < 1e-3) > 0.97, name
    outside = sdf(p) > 0  # outside, the gradient points straight away from the nearest surface point
    landed = sdf(p[outside] - sdf(p[outside])[:, None] * g[outside] / norm[outside, None])
    assert np.quantile(np.abs(landed), 0.97) < 1e-4, name


def test_capped_cone_known_distances():
    cone = lambda p: R.sd_capped_cone(np.array(p, float), 1.0, 1.0, 0.0)  # noqa: E731 (base r 1 at y -1, apex y 1)
    np.testing.assert_allclose(cone([[0, 2, 0], [0, -2, 0], [2, -1, 0]]), [1, 1, 1], atol=1e-12)
    assert cone([[0, 0, 0]])[0] < 0


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = R.render(R.make_scene(R.EVAL_SEED, 3), 24), R.render(R.make_scene(R.EVAL_SEED, 3), 24)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], R.render(R.make_scene(R.EVAL_SEED, 4), 24)[1])
    assert not np.array_equal(a[1], R.render(R.make_scene(R.EVAL_SEED + 1, 3), 24)[1])


def test_depths_in_range_rooms_closed_and_sky_invalid():
    lo, hi = depth.DEPTH_RANGES["scenes"]
    kinds = set()
    for i in range(12):
        s = R.make_scene(R.EVAL_SEED, i)
        _, d = R.render(s, 16)
        kinds.add(s.kind)
        assert (d[d > 0] > lo).all() and (d < hi).all()
        assert s.outdoor or (d > 0).all(), f"scene {i}: a closed {s.kind} has depth everywhere"
    assert len(kinds) >= 3, kinds


def sky_scene():
    """The first evaluation scene that sees the sky at 16 px."""
    for i in range(40):
        s = R.make_scene(R.EVAL_SEED, i)
        if s.outdoor and (R.render(s, 16)[1] == 0).any():
            return i
    raise AssertionError("no sky in 40 scenes")


def test_write_pairs_read_by_pair_dataset_sky_is_zero(tmp_path):
    i = sky_scene()
    out = R.write_pairs(tmp_path / "pairs", i + 1, 16)
    ds = depth.PairDataset(out)
    assert len(ds) == i + 1
    image, d, valid = ds[i]
    _, exact = R.render(R.make_scene(R.EVAL_SEED, i), 16)
    np.testing.assert_allclose(d.numpy(), exact, atol=5e-4)  # whole millimetres
    np.testing.assert_array_equal(valid.numpy(), exact > 0)
    from PIL import Image
    with Image.open(out / "depth" / f"{i:05d}.png") as im:
        raw = np.asarray(im)
        assert im.mode.startswith("I") and (raw[exact == 0] == 0).all() and (raw[exact > 0] > 0).all()
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1


def test_shares_no_code_with_the_training_scenes():
    """rooms_sdf imports neither scenes nor synth (nothing of the training renderer) and defines none of
    scenes.py's functions but the shared API names."""
    tree = ast.parse(open(os.path.join(TOY, "rooms_sdf.py"), encoding="utf-8").read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"scenes", "synth"} and imported <= {"argparse", "json", "os", "sys", "dataclasses",
                                                              "pathlib", "numpy", "PIL", "tqdm", "common"}, imported
    theirs = ast.parse(open(os.path.join(TOY, "scenes.py"), encoding="utf-8").read())
    names = lambda t: {n.name for n in ast.walk(t) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}  # noqa: E731
    assert names(tree) & names(theirs) <= {"make_scene", "render", "write_pairs", "main"}, names(tree) & names(theirs)


def test_cli(tmp_path, capsys):
    root = os.path.dirname(TOY)
    r = subprocess.run([sys.executable, "toy/rooms_sdf.py", "--out", str(tmp_path / "s"), "--n", "2", "--size", "8"],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"out": str(tmp_path / "s"), "n": 2, "size": 8,
                                                            "seed": R.EVAL_SEED}
    assert sorted(p.name for p in (tmp_path / "s" / "depth").iterdir()) == ["00000.png", "00001.png"]
    for argv in (["--out", str(tmp_path / "x"), "--n", "0"], ["--out", str(tmp_path / "x"), "--seed", "-1"],
                 ["--out", str(tmp_path / "s")]):  # the last: it would overwrite
        with pytest.raises(SystemExit) as e:
            R.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and ": error: " in err[0], err
