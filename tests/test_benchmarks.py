"""The depth benchmarks' loaders and protocol (toy/benchmarks.py, evaluate.py depth --dataset NAME PATH): a few
synthetic files per dataset in Marigold's layout, scored with injected predictors whose metrics are known in
closed form (no diffusion model runs), and one tiny end-to-end call of the demo model."""
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(0)


def rgb(path, shape):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


def png16(path, metres, scale):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(metres * scale).astype(np.uint16)).save(path)


def truth(shape, lo, hi, scale=1000):
    """Depth in metres, rounded to what a 16-bit PNG of that scale (1/1000 m, KITTI 1/256 m) keeps exactly."""
    return np.round(RNG.uniform(lo, hi, shape) * scale) / scale


def split(tmp_path, rows):
    f = tmp_path / "split.txt"
    f.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    return str(f)


def run(name, root, split_file, predictor):
    a = evaluate.parser().parse_args(["depth", "--dataset", name, str(root), "--split", split_file])
    return evaluate.run_benchmark(a, predictor)[0]


def affine_log(expected):
    """A predictor that is an affine map of log(truth) where the protocol should score, garbage elsewhere."""
    def predict(i, image):
        d, valid = expected[i]
        assert image.shape[1:] == d.shape
        return torch.where(valid, 0.3 * torch.log(d.clamp(min=1e-9)) - 0.2, torch.randn(d.shape) * 50)
    return predict


def check_exact(m, expected):
    assert m["abs_rel"] < 1e-6 and m["delta1"] == 1.0, m
    assert m["pixels"] == sum(int(v.sum()) for _, v in expected.values()) / len(expected)
    assert m["n"] == len(expected)


def nyu_files(tmp_path, n=2):
    rows, expected = [], {}
    for i in range(n):
        d = truth((480, 640), 0.5, 9.5)
        d[0:10, :] = 0  # missing depth
        d[100, 100:110] = 12.0  # beyond 10 m
        d[44, 300], d[45, 300], d[470, 300], d[471, 300] = 3.0, 3.0, 3.0, 3.0  # at the crop's edges
        r = [f"test/kitchen_0004/rgb_{i:04d}.png", f"test/kitchen_0004/depth_{i:04d}.png",
             f"test/kitchen_0004/filled_{i:04d}.png"]
        rgb(tmp_path / "nyu" / r[0], d.shape), png16(tmp_path / "nyu" / r[1], d, 1000)
        png16(tmp_path / "nyu" / r[2], np.full_like(d, 5.0), 1000)  # filled: never scored
        crop = np.zeros(d.shape, bool)
        crop[45:471, 41:601] = True  # Eigen's crop of NYUv2, as every NYU evaluation uses
        expected[i] = (torch.tensor(d, dtype=torch.float32), torch.tensor(crop & (d > 1e-3) & (d < 10)))
        rows.append(r)
    return rows, expected


def test_nyuv2_scores_the_raw_depth_inside_eigens_crop_and_range(tmp_path):
    rows, expected = nyu_files(tmp_path)
    m = run("nyuv2", tmp_path / "nyu", split(tmp_path, rows), affine_log(expected))
    check_exact(m, expected)
    assert m["pixels"] < 426 * 560  # the zeros and the 12 m pixels inside the crop are out


def test_a_tar_of_the_folder_reads_the_same(tmp_path):
    rows, expected = nyu_files(tmp_path, n=1)
    with tarfile.open(tmp_path / "nyu.tar", "w") as t:
        t.add(tmp_path / "nyu", arcname=".")  # Marigold's tars name members ./test/...
    check_exact(run("nyuv2", tmp_path / "nyu.tar", split(tmp_path, rows), affine_log(expected)), expected)


def test_kitti_cuts_to_the_benchmark_size_then_eigens_crop(tmp_path):
    rows, expected = [], {}
    for i in range(2):
        d = truth((375, 1242), 2.0, 79.0, 256)
        d[::3, ::2] = 0  # lidar: sparse
        d[200, 500:520] = 85.0  # beyond 80 m
        r = [f"2011_09_26/2011_09_26_drive_0002_sync/image_02/data/{i:010d}.png",
             f"2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/{i:010d}.png", "721.5377"]
        rgb(tmp_path / "kitti" / r[0], d.shape), png16(tmp_path / "kitti" / r[1], d, 256)
        c = d[375 - 352:, 13:13 + 1216]  # the KITTI benchmark crop: bottom 352 rows, centred 1216 columns
        crop = np.zeros(c.shape, bool)
        crop[int(0.3324324 * 352):int(0.91351351 * 352), int(0.0359477 * 1216):int(0.96405229 * 1216)] = True
        expected[i] = (torch.tensor(c, dtype=torch.float32), torch.tensor(crop & (c > 1e-5) & (c < 80)))
        rows.append(r)
    rows.insert(1, ["2011_09_26/x/image_02/data/0000000099.png", "None", "721.5377"])  # no ground truth: skipped
    check_exact(run("kitti", tmp_path / "kitti", split(tmp_path, rows), affine_log(expected)), expected)


def test_eth3d_reads_headerless_float32_of_the_images_size_and_drops_inf(tmp_path):
    rows, expected = [], {}
    for i in range(2):
        d = truth((40, 60), 0.5, 30.0).astype(np.float32)
        d[5, :] = np.inf  # no ground truth
        d[6, :7] = 0
        r = [f"rgb/office/images/dslr_images/DSC_{i:04d}.JPG",
             f"depth/office_dslr_depth/office/ground_truth_depth/dslr_images/DSC_{i:04d}.JPG"]
        rgb(tmp_path / "eth3d" / r[0], d.shape)
        (tmp_path / "eth3d" / r[1]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "eth3d" / r[1]).write_bytes(d.astype("<f4").tobytes())
        expected[i] = (torch.tensor(np.where(np.isinf(d), 0, d)), torch.tensor(np.isfinite(d) & (d > 1e-5)))
        rows.append(r)
    m = run("eth3d", tmp_path / "eth3d", split(tmp_path, rows), affine_log(expected))
    check_exact(m, expected)
    assert m["pixels"] == 40 * 60 - 60 - 7


def test_diode_counts_what_its_mask_says_and_clips_to_its_range(tmp_path):
    rows, expected = [], {}
    for i in range(2):
        d = truth((48, 64), 0.7, 60.0).astype(np.float32)
        mask = RNG.random(d.shape) > 0.3
        d[0, 0], mask[0, 0] = 0.5, True  # under DIODE's 0.6 m yet in its mask: it counts (Marigold's loader)
        base = f"indoors/scene_00021/scan_00189/00021_00189_indoors_{i:03d}_010"
        r = [base + ".png", base + "_depth.npy", base + "_depth_mask.npy"]
        rgb(tmp_path / "diode" / r[0], d.shape)
        np.save(tmp_path / "diode" / r[1], d[..., None]), np.save(tmp_path / "diode" / r[2], mask.astype(np.float32))
        expected[i] = (torch.tensor(d), torch.tensor(mask))
        rows.append(r)
    m = run("diode", tmp_path / "diode", split(tmp_path, rows), affine_log(expected))
    assert m["pixels"] == sum(int(v.sum()) for _, v in expected.values()) / 2
    # the 0.5 m pixel: aligned exactly, then clipped to 0.6 m: AbsRel 0.2 there, 0 elsewhere (float32: 1e-7), per image
    assert m["abs_rel"] == pytest.approx(np.mean([0.2 / int(v.sum()) for _, v in expected.values()]), abs=1e-6)


def test_scannet_per_image_means_in_closed_form(tmp_path):
    """Image 0: an affine map of the depth (AbsRel 0, delta1 1, both alignments). Image 1: depth 1 m and 3 m on
    halves and a constant prediction, so depth-space least squares gives 2 m everywhere: AbsRel (1 + 1/3) / 2,
    delta1 0. The means over the two images are half of each."""
    rows, expected = [], {}
    for i in range(2):
        d = truth((48, 64), 0.5, 9.0) if i == 0 else np.where(np.arange(64) < 32, 1.0, 3.0)[None].repeat(48, 0)
        r = [f"scene0406_02/color/{i:06d}.jpg", f"scene0406_02/depth/{i:06d}.png"]
        rgb(tmp_path / "scannet" / r[0], d.shape), png16(tmp_path / "scannet" / r[1], d, 1000)
        expected[i] = torch.tensor(d, dtype=torch.float32)
        rows.append(r)
    m = run("scannet", tmp_path / "scannet", split(tmp_path, rows),
            lambda i, image: 2 * expected[0] + 1 if i == 0 else torch.zeros(48, 64))
    assert m["depth_abs_rel"] == pytest.approx((1 + 1 / 3) / 4, abs=1e-6)
    assert m["depth_delta1"] == pytest.approx(0.5, abs=1e-9) and m["pixels"] == 48 * 64


def test_layout_errors_are_one_line(tmp_path, capsys):
    rows, _ = nyu_files(tmp_path, n=1)
    (tmp_path / "nyu" / rows[0][1]).unlink()
    with pytest.raises(SystemExit) as e:
        run("nyuv2", tmp_path / "nyu", split(tmp_path, rows), lambda i, image: None)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert e.value.code == 1 and ": error: " in err and "depth_0000.png: cannot read it" in err, err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["depth", "--dataset", "scenes", str(tmp_path / "nyu")])
    assert e.value.code == 2


def test_end_to_end_with_the_demo_depth_model(tmp_path):
    d = truth((48, 64), 0.5, 9.0)
    r = ["scene0406_02/color/000300.jpg", "scene0406_02/depth/000300.png"]
    rgb(tmp_path / "scannet" / r[0], d.shape), png16(tmp_path / "scannet" / r[1], d, 1000)
    rows = evaluate.main(["depth", "--dataset", "scannet", str(tmp_path / "scannet"), "--split",
                          split(tmp_path, [r]), "--steps", "2", "--ensemble", "2", "--processing-res", "64",
                          "--json", str(tmp_path / "rows.json"), "--results", str(tmp_path / "RESULTS.md")])
    m = rows[0]
    assert m["n"] == 1 and m["steps"] == 2 and m["ensemble"] == 2 and m["pixels"] == 48 * 64
    assert all(math.isfinite(m[k]) for k in ("abs_rel", "delta1", "depth_abs_rel", "depth_delta1"))
    assert 0 <= m["delta1"] <= 1 and json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "<!-- begin depth-scannet -->" in (tmp_path / "RESULTS.md").read_text()
