"""streets.py, the second training renderer: exact perspective-correct depth from the rasteriser (analytic
cases), near-plane clipping, the z-test, shadow-map shadows, determinism and the pair-folder files."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import depth
import streets
from streets import Builder, Street

TOY = os.path.dirname(os.path.abspath(streets.__file__))


def world(b, eye, rot=np.eye(3), fov_deg=90.0, sun=(0.0, 0.0, 0.0), far=1e9):
    sky = np.array([0.3, 0.5, 0.9])
    return Street(b.build(), b.materials, np.asarray(eye, float), rot, np.deg2rad(fov_deg), np.asarray(sun, float),
                  0.5, far, sky, sky)


def plain(b, grey=0.5):
    return b.material(kind="plain", c0=np.full(3, grey), c1=0)


def test_a_facing_wall_reads_its_distance_in_every_pixel():
    """Planar depth, not ray length: a wall at 5 m reads 5 m everywhere (the corner rays travel ~8.7 m)."""
    b = Builder()
    b.quad((-20, -20, 5), (0, 40, 0), (40, 0, 0), plain(b))  # facing -z, towards the camera
    rgb, d = streets.render(world(b, (0, 0, 0)), 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(d, 5.0, rtol=1e-6)


def test_ground_depth_is_exact_under_perspective_and_clipped_behind_the_camera():
    """A camera 1.5 m above a ground quad that runs behind it (so the rasteriser must clip it at the near plane),
    looking level: the pixel row r below the horizon sees the ground at z = h f / (r + 1/2 - W/2)."""
    b = Builder()
    b.quad((-50, 0, -50), (0, 0, 100), (100, 0, 0), plain(b))
    size, h = 32, 1.5
    _, d = streets.render(world(b, (0, h, 0)), size)
    f = size / 2 / np.tan(np.deg2rad(45))
    rows = np.arange(size // 2, size)
    exact = h * f / (rows + 0.5 - size / 2)
    seen = exact < 50 / np.sqrt(2)  # every row's ray stays on the 50 m quad
    np.testing.assert_allclose(d[rows[seen]], np.repeat(exact[seen, None], size, 1), rtol=1e-6)  # float32
    assert (d[: size // 2] == 0).all()  # above the horizon: sky


def test_clipping_keeps_the_part_in_front_of_the_near_plane():
    tri = np.array([[[0.0, 0, -1], [1, 0, 1], [-1, 0, 1]]])  # one corner behind: a quad in front
    parts, src = streets.clip_near(tri, near=0.5)
    assert len(parts) == 2 and (src == 0).all() and (parts[..., 2] >= 0.5 - 1e-12).all()
    area = lambda t: 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum()
    assert area(parts) == pytest.approx(0.875)  # its width at z is z + 1: the integral from z = 0.5 to 1
    two_behind = np.array([[[0.0, 0, 2], [1, 0, 0], [-1, 0, 0]]])
    parts, _ = streets.clip_near(two_behind, near=1.0)
    assert len(parts) == 1 and area(parts) == pytest.approx(0.5 * 1.0 * 1.0)
    assert len(streets.clip_near(-two_behind, near=0.1)[0]) == 0


def test_the_nearer_surface_wins_and_back_faces_are_culled():
    b = Builder()
    b.quad((-20, -20, 8), (0, 40, 0), (40, 0, 0), plain(b))
    b.quad((-0.5, -0.5, 3), (0, 1, 0), (1, 0, 0), plain(b, 0.9))  # a small card at 3 m, drawn second
    b.quad((-0.5, -0.5, 2), (1, 0, 0), (0, 1, 0), plain(b, 0.1))  # at 2 m but facing away: invisible
    _, d = streets.render(world(b, (0, 0, 0)), 16)
    assert d[8, 8] == pytest.approx(3.0) and d[0, 0] == pytest.approx(8.0)


def test_a_box_casts_its_shadow_away_from_the_sun():
    """A 1 m cube on the ground, the sun low in +x: the ground just past the cube in -x is shadowed, the ground
    on the sun's side and the cube's sunlit face are lit."""
    b = Builder()
    b.quad((-20, 0, -20), (0, 0, 40), (40, 0, 0), plain(b))
    b.box((0, 0, 0), (1, 1, 1), 0.0, plain(b))
    scene = world(b, (0, 5, -8), sun=(1.0, 0.5, 0.0))
    p = np.array([[-1.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0], [-3.0, 0, 0]])
    np.testing.assert_allclose(streets.sunlit(scene, p), [0, 1, 1, 1])


def test_scenes_are_deterministic_by_seed_and_index_and_in_range():
    rgb, d = streets.draw(0, 3, 32)
    rgb2, d2 = streets.draw(0, 3, 32)
    np.testing.assert_array_equal(rgb, rgb2)
    np.testing.assert_array_equal(d, d2)
    assert not np.array_equal(streets.draw(0, 4, 32)[1], d)
    lo, hi = depth.DEPTH_RANGES["scenes"]
    for i in range(8):
        _, d = streets.draw(1, i, 32)
        v = d[d > 0]
        assert v.size > 0 and lo < v.min() and v.max() < hi, i


def test_pairs_load_and_match_the_render(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(TOY, "streets.py"), "--out", str(tmp_path / "s"), "--n", "2",
                        "--size", "16", "--seed", "3", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 2
    ds = depth.PairDataset(str(tmp_path / "s"))
    image, d, valid = ds[1]
    _, exact = streets.draw(3, 1, 16)
    np.testing.assert_allclose(d.numpy(), exact, atol=5e-4)  # whole millimetres
    np.testing.assert_array_equal(valid.numpy(), exact > 0)
    with pytest.raises(SystemExit, match="--n, --size and --workers"):
        streets.main(["--out", str(tmp_path / "x"), "--n", "0"])


def test_shares_no_rendering_code_with_the_other_renderers():
    """streets takes only scenes.py's file writer and seeds, and nothing of the evaluation-only rooms_sdf."""
    tree = ast.parse(open(os.path.join(TOY, "streets.py"), encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"argparse", "json", "os", "numpy", "scenes"}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "scenes"}
    assert used == {"write_pairs", "TRAIN_SEED", "HELDOUT_FROM", "TEST_SEED"}
