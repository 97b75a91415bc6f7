"""depth.py: the first-conv expansion, the depth encoding, alignment, ensembling, metrics (hand-made
cases), image and depth files, the command line."""
import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import depth
import depth_eval
import sd
import unet as unet_mod
from helpers import random_bundle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny random depth model (8 input channels), saved like train.py saves one."""
    b = random_bundle(0)
    depth.expand_first_conv(b.unet)
    b.objective = "diff2flow"
    path = str(tmp_path_factory.mktemp("model") / "depth.safetensors")
    sd.save(b, path, resolution=32)
    return path


# ----------------------------------------------------------------------------- the model

def test_expanded_first_conv_is_the_prior_for_equal_halves_and_half_of_it_for_a_zero_image():
    u = random_bundle(1).unet
    old = u.input_blocks[0][0]
    x = torch.randn(2, 4, 8, 8)
    prior_conv, bias = old(x), old.bias[:, None, None]
    depth.expand_first_conv(u)
    new = u.input_blocks[0][0]
    assert new.weight.shape == (old.out_channels, 8, 3, 3) and u.cfg.in_channels == 8
    torch.testing.assert_close(new(torch.cat([x, x], 1)), prior_conv)  # W/2 x + W/2 x + b = W x + b
    torch.testing.assert_close(new(torch.cat([x, 0 * x], 1)), (prior_conv - bias) / 2 + bias)
    assert unet_mod.PRESETS["tiny"].in_channels == 4, "the preset must stay untouched"


def test_whole_unet_with_equal_halves_matches_the_prior():
    u = random_bundle(2).unet
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 3.0]), torch.randn(2, 77, 128)
    before = u(x, t, ctx)
    depth.expand_first_conv(u)
    torch.testing.assert_close(u(torch.cat([x, x], 1), t, ctx), before, atol=1e-5, rtol=1e-5)


def test_depth_model_saves_and_loads_with_8_channels(model_path, tmp_path):
    b = sd.load(model_path)
    assert b.unet.cfg.in_channels == 8 and b.objective == "diff2flow"
    depth.check_depth_model(b, model_path)
    with pytest.raises(depth.DepthError, match="input channels"):
        depth.check_depth_model(random_bundle(0), "prior.safetensors")


# ----------------------------------------------------------------------------- encoding

def test_normalize_depth_uses_the_2_and_98_percent_log_quantiles():
    """101 pixels with log depth 0..100: quantiles 2 and 98, so y = (l - 2) / 96 * 2 - 1, clipped."""
    logd = torch.arange(101, dtype=torch.float64) / 10  # log depth 0 .. 10
    d = logd.exp().float().view(1, 1, 1, 101)
    y = depth.normalize_depth(d, torch.ones_like(d, dtype=torch.bool))
    want = ((logd - 0.2) / 9.6 * 2 - 1).clamp(-1, 1).float().view(1, 1, 1, 101)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


def test_normalize_depth_is_invariant_to_scale_and_power_and_masks_invalid():
    d = torch.rand(2, 1, 8, 8) * 10 + 0.5
    valid = torch.ones_like(d, dtype=torch.bool)
    valid[0, 0, 0, :3] = False
    y = depth.normalize_depth(d, valid)
    torch.testing.assert_close(depth.normalize_depth(7 * d**1.5, valid), y, atol=1e-5, rtol=0)
    assert (y[0, 0, 0, :3] == 1).all() and y.min() >= -1 and y.max() <= 1
    assert (depth.normalize_depth(d, torch.zeros_like(valid)) == 1).all()


def test_depth_latents_round_trip_shapes():
    b = random_bundle(0)
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    z = depth.encode_depth(b.vae, y)
    assert z.shape == (2, 4, 4, 4)
    out = depth.decode_depth(b.vae, z)
    assert out.shape == (2, 1, 16, 16) and out.min() >= -1 and out.max() <= 1


# ----------------------------------------------------------------------------- alignment, ensembling, metrics

def test_fit_scale_shift_recovers_an_affine_map_and_ignores_masked_pixels():
    x = torch.randn(3, 50, dtype=torch.float64)
    y = torch.tensor([2.0, -1.0, 0.5])[:, None] * x + torch.tensor([1.0, 3.0, -2.0])[:, None]
    valid = torch.ones_like(x, dtype=torch.bool)
    y[:, :5], valid[:, :5] = 1e3, False  # outliers, masked
    a, b = depth.fit_scale_shift(x, y, valid)
    torch.testing.assert_close(a, torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64))


def test_ensemble_of_affine_copies_gives_the_reference_shape_and_zero_spread():
    base = torch.rand(6, 5)
    members = torch.stack([2 * base + 1, 0.5 * base - 1, base, 3 * base])
    med, spread = depth.ensemble_median(members)
    a, b = depth.fit_scale_shift(base.flatten().double(), med.flatten().double())
    torch.testing.assert_close(med.double(), (a * base.double() + b), atol=1e-5, rtol=0)
    assert spread.abs().max() < 1e-5
    one, s1 = depth.ensemble_median(members[:1])
    torch.testing.assert_close(one, members[0])
    assert (s1 == 0).all()


def test_metrics_perfect_up_to_scale_and_shift():
    gt = torch.rand(16, 16) * 9 + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    m = depth.depth_metrics(3 * gt.log() + 2, gt, valid, 0.1, 30, align="log")
    assert m["abs_rel"] < 1e-6 and m["delta1"] == 1 and m["rmse"] < 1e-5
    m = depth.depth_metrics(-2 * gt + 1, gt, valid, 0.1, 30, align="depth")
    assert m["abs_rel"] < 1e-6 and m["delta1"] == 1 and m["delta3"] == 1


def test_metrics_hand_made_case():
    """Depth space, gt (1, 1, 2, 2) and an uncorrelated prediction (0, 1, 0, 1): the best fit is the mean
    1.5 everywhere, so AbsRel = (0.5 + 0.5 + 0.25 + 0.25) / 4, ratios 1.5 and 4/3 (delta1 0, delta2 1),
    RMSE 0.5. A fifth pixel beyond max depth and a masked sixth are not counted."""
    gt = torch.tensor([1.0, 1.0, 2.0, 2.0, 50.0, 1.0])
    pred = torch.tensor([0.0, 1.0, 0.0, 1.0, 9.0, 9.0])
    valid = torch.tensor([True, True, True, True, True, False])
    m = depth.depth_metrics(pred, gt, valid, 0.1, 10.0, align="depth")
    assert m == pytest.approx({"abs_rel": 0.375, "rmse": 0.5, "delta1": 0.0, "delta2": 1.0, "delta3": 1.0})


def test_metrics_clip_the_aligned_prediction_to_the_depth_range():
    """gt (1, 2, 3), prediction (1, 2, 5): the aligned prediction's largest value (3.077) lies beyond a max
    depth of 3.05 and is clipped to it before the error is measured."""
    gt, pred, valid = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0]), torch.ones(3, dtype=torch.bool)
    a, b = depth.fit_scale_shift(pred.double(), gt.double())
    aligned = (a * pred + b).double()
    assert aligned.max() > 3.05
    m = depth.depth_metrics(pred, gt, valid, 0.1, 3.05, align="depth")
    want = ((aligned.clamp(0.1, 3.05) - gt).abs() / gt).mean()
    assert m["abs_rel"] == pytest.approx(float(want))
    with pytest.raises(depth.DepthError, match="no valid"):
        depth.depth_metrics(pred, gt, ~valid, 0.1, 3.2)


def test_colormap_stops_and_near_is_warm():
    c = depth.colorize(np.array([0.0, 0.25, 0.5, 1.0]))
    np.testing.assert_array_equal(c, depth.SPECTRAL[[0, 1, 2, 4]].astype(np.uint8))
    mid = depth.colorize(np.array([0.125]))[0]
    np.testing.assert_array_equal(mid, np.round((depth.SPECTRAL[0] + depth.SPECTRAL[1]) / 2).astype(np.uint8))
    near, far = depth.colorize(np.array([0.05, 0.95]))
    assert near[0] > near[2] and far[2] > far[0]


def test_processing_size_keeps_aspect_and_the_models_multiple():
    assert depth.processing_size(480, 640, 64, 16) == (48, 64)
    assert depth.processing_size(37, 23, 32, 16) == (32, 16)
    assert depth.processing_size(1, 1000, 64, 16) == (16, 64)


# ----------------------------------------------------------------------------- files

def write_inputs(folder):
    folder.mkdir(exist_ok=True)
    rgba = np.zeros((23, 37, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red: composited onto white
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(np.full((9, 12), 128, np.uint8)).save(folder / "grey.png")
    Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).convert("P").save(folder / "palette.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_read_image_modes(tmp_path):
    f = write_inputs(tmp_path / "in")
    assert (depth.read_image(str(f / "rgba.png")) == 1).all()  # transparent -> white
    g16 = depth.read_image(str(f / "grey16.png"))
    assert g16.shape == (3, 20, 30) and g16[0, 0, 1] == pytest.approx(100 / 65535 * 2 - 1)
    assert depth.read_image(str(f / "grey.png"))[:, 0, 0].tolist() == pytest.approx([128 / 255 * 2 - 1] * 3, abs=1e-6)
    assert depth.read_image(str(f / "photo.jpg")).shape == (3, 16, 16)
    assert depth.read_image(str(f / "palette.png")).shape == (3, 8, 8)
    with pytest.raises(depth.DepthError, match="broken.png: cannot read it as an image"):
        depth.read_image(str(f / "broken.png"))


def test_read_depth_png_millimetres_npy_metres_and_errors(tmp_path):
    Image.fromarray(np.array([[0, 1500], [65535, 20]], np.uint16)).save(tmp_path / "d.png")
    np.testing.assert_allclose(depth.read_depth(str(tmp_path / "d.png")).numpy(), [[0, 1.5], [65.535, 0.02]])
    np.save(tmp_path / "d.npy", np.array([[np.nan, 2.5], [-1, np.inf]], np.float32))
    np.testing.assert_allclose(depth.read_depth(str(tmp_path / "d.npy")).numpy(), [[0, 2.5], [0, 0]])
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(depth.DepthError, match="16-bit"):
        depth.read_depth(str(tmp_path / "d8.png"))


def test_pair_folder_with_mask_and_npy_and_errors(tmp_path):
    (tmp_path / "rgb").mkdir(), (tmp_path / "depth").mkdir(), (tmp_path / "mask").mkdir()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "rgb" / "a.png")
    np.save(tmp_path / "depth" / "a.npy", np.full((4, 6), 3.0, np.float32))
    mask = np.ones((4, 6), np.uint8) * 255
    mask[0] = 0
    Image.fromarray(mask).save(tmp_path / "mask" / "a.png")
    image, d, valid = depth.PairDataset(tmp_path)[0]
    assert image.shape == (3, 4, 6) and (d == 3).all() and valid.sum() == 18 and not valid[0].any()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "rgb" / "b.png")
    with pytest.raises(depth.DepthError, match="1 images have no depth/NAME.png or .npy: b.png"):
        depth.PairDataset(tmp_path)
    with pytest.raises(depth.DepthError, match="needs rgb/ and depth/"):
        depth.PairDataset(tmp_path / "rgb")


def test_square_resizes_depth_by_nearest_neighbour():
    d = torch.tensor([[1.0, 1.0, 5.0, 5.0]] * 2)[None]  # (1, 2, 4): crops to the centre 2x2 at res 2
    out = depth.square(d, 2, "nearest")
    assert out.shape == (1, 2, 2) and set(out.unique().tolist()) <= {1.0, 5.0}


# ----------------------------------------------------------------------------- prediction and the CLI

def test_predict_any_size_is_deterministic_by_seed(model_path):
    b = sd.load(model_path)
    image = torch.rand(3, 23, 37) * 2 - 1
    y, spread = depth.predict(b, image, steps=2, ensemble=3, seed=4)
    assert y.shape == spread.shape == (23, 37) and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(depth.predict(b, image, steps=2, ensemble=3, seed=4)[0], y)
    assert not torch.equal(depth.predict(b, image, steps=2, ensemble=3, seed=5)[0], y)


def test_cli_writes_every_output_at_the_input_size_and_skips_unreadable_files(model_path, tmp_path):
    f = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # broken.png fails: exit status 1, after the others are written
        depth.main([str(f), "--ckpt", model_path, "--steps", "1", "--ensemble", "2", "--out", str(out),
                    "--uncertainty"])
    assert e.value.code == 1
    for stem, (h, w) in {"rgba": (23, 37), "grey16": (20, 30), "grey": (9, 12), "photo": (16, 16),
                         "palette": (8, 8)}.items():
        colour = Image.open(out / f"{stem}_depth.png")
        assert colour.size == (w, h) and colour.mode == "RGB" and colour.text["steps"] == "1"
        d16 = Image.open(out / f"{stem}_depth16.png")
        assert d16.mode.startswith("I") and d16.size == (w, h)
        r = np.load(out / f"{stem}_depth.npy")
        assert r.shape == (h, w) and 0 <= r.min() and r.max() <= 1
        np.testing.assert_array_equal(np.asarray(d16), np.round(r * 65535).astype(np.uint16))
        assert Image.open(out / f"{stem}_uncertainty.png").size == (w, h)
    assert not (out / "broken_depth.png").exists()
    paths = depth.main([str(f / "grey.png"), "--ckpt", model_path, "--steps", "1", "--ensemble", "1",
                        "--out", str(out), "--processing-res", "64"])
    assert len(paths) == 3


def test_cli_errors(model_path, tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        depth.main(["x.png", "--ckpt", model_path, "--steps", "0"])
    prior = str(tmp_path / "prior.safetensors")
    sd.save(random_bundle(0), prior)
    with pytest.raises(SystemExit, match="a depth model takes 8"):
        depth.main(["x.png", "--ckpt", prior])
    with pytest.raises(SystemExit, match="cannot|no such|not"):
        depth.main(["x.png", "--ckpt", str(tmp_path / "missing.safetensors")])


# ----------------------------------------------------------------------------- train.py --task depth, evaluate.py depth

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    import scenes
    return str(scenes.write_pairs(tmp_path_factory.mktemp("pairs"), 6, 32, seed=7))


def tiny_depth_run(pairs, out, *extra):
    import train
    return train.main(["--task", "depth", "--data", pairs, "--resolution", "32", "--batch-size", "2",
                       "--out", str(out), "--sample-every", "0", "--warmup", "1", *extra])


def test_train_depth_writes_a_depth_model_and_resumes_exactly(pairs, tmp_path):
    straight = tiny_depth_run(pairs, tmp_path / "a", "--steps", "2", "--sample-every", "2")
    b = sd.load(straight)
    assert b.unet.cfg.in_channels == 8 and b.objective == "diff2flow"
    assert (b.meta["task"], b.meta["resolution"], b.meta["steps"], b.meta["ensemble"]) == ("depth", "32", "1", "4")
    assert Image.open(tmp_path / "a" / "samples" / "step_000002.png").size == (4 * 32, 3 * 32)
    tiny_depth_run(pairs, tmp_path / "b", "--steps", "1")
    resumed = sd.load(tiny_depth_run(pairs, tmp_path / "b", "--steps", "2", "--resume"))
    for (k, v), w in zip(b.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_depth_py_samples_with_the_steps_the_model_was_trained_for(pairs, tmp_path):
    """The depth-demo preset trains t = 0 only (--t-sampling noise_end), so its file records 1 step; uniform t
    records 10. depth.py uses the file's unless told."""
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    for t_sampling, steps in (("noise_end", "1"), ("uniform", "10")):
        path = tiny_depth_run(pairs, tmp_path / t_sampling, "--steps", "1", "--t-sampling", t_sampling)
        assert (sd.load(path).meta["steps"], sd.load(path).meta["ensemble"]) == (steps, "4")
        out = depth.main([str(image), "--ckpt", path, "--out", str(tmp_path / t_sampling / "out")])
        assert (Image.open(out[0]).text["steps"], Image.open(out[0]).text["ensemble"]) == (steps, "4")
    out = depth.main([str(image), "--ckpt", path, "--out", str(tmp_path / "told"), "--steps", "3", "--ensemble", "2"])
    assert (Image.open(out[0]).text["steps"], Image.open(out[0]).text["ensemble"]) == ("3", "2")


def test_train_depth_lora_and_fm_models_load_as_depth_models(pairs, tmp_path):
    lora_model = sd.load(tiny_depth_run(pairs, tmp_path / "l", "--steps", "1", "--lora", "base"))
    depth.check_depth_model(lora_model, "lora")
    fm = sd.load(tiny_depth_run(pairs, tmp_path / "f", "--steps", "1", "--objective", "fm"))
    assert fm.objective == "fm" and fm.unet.cfg.in_channels == 8
    y, _ = depth.predict(lora_model, torch.zeros(3, 20, 20), steps=1, ensemble=1)
    assert y.shape == (20, 20)


def test_train_depth_defaults_and_errors(tmp_path):
    import train
    cfg = train.parse_args(["--task", "depth", "--data", str(tmp_path)])
    train.check_config(cfg)
    assert (cfg.preset, cfg.ckpt) == ("depth-demo", train.DEMO_PRIOR)
    assert (cfg.resolution, cfg.batch_size, cfg.out, cfg.caption_dropout) == (64, 32, "runs/depth", 0.0)
    with pytest.raises(SystemExit, match="not a pair folder"):
        tiny_depth_run(str(tmp_path), tmp_path / "o", "--steps", "1")


def test_evaluate_depth_command(pairs, model_path, tmp_path):
    import json
    import evaluate
    rows = evaluate.main(["depth", "--data", pairs, "--ckpt", model_path, "--steps", "1", "--ensemble", "1", "2",
                          "--n", "2", "--baseline", pairs, "--processing-res", "32", "--json", str(tmp_path / "r.json"),
                          "--results", str(tmp_path / "RESULTS.md")])
    assert [(r["objective"], r["steps"], r["ensemble"]) for r in rows] == [
        ("mean depth map", 0, 0), ("depth linear in row", 0, 0), ("VAE floor", 0, 0), ("diff2flow", 1, 1),
        ("diff2flow", 1, 2)]
    for r in rows:
        assert 0 <= r["delta1"] <= r["delta2"] <= r["delta3"] <= 1 and r["abs_rel"] >= 0 and r["rmse"] >= 0
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    section = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- begin depth -->" in section and "| diff2flow | 2 |" in section and "| VAE floor |" in section
    assert "| mean depth map |" in section and "| depth linear in row |" in section and "% lower AbsRel" in section
    assert "`python toy/evaluate.py depth --ckpt " in section
    with pytest.raises(SystemExit, match="must be >= 1") as e:
        evaluate.main(["depth", "--data", pairs, "--ckpt", model_path, "--steps", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="not a pair folder") as e:
        evaluate.main(["depth", "--data", str(tmp_path), "--ckpt", model_path])
    assert e.value.code == 1


@pytest.mark.parametrize("kind", ["scenes", "streets"])
def test_heldout_sets_of_the_training_renderers_are_written_once(kind, tmp_path, monkeypatch):
    import scenes
    import streets
    calls = []
    monkeypatch.setattr(depth_eval, "ROOT", str(tmp_path))
    monkeypatch.setattr(scenes, "write_pairs", lambda *a, **k: calls.append((a, k)) or os.makedirs(a[0]))
    make = getattr(depth_eval, f"heldout_{kind}")
    first = make(size=16, n=3)
    name = {"scenes": "scenes-v3", "streets": "streets-v1"}[kind]
    assert first == make(size=16, n=3) == str(tmp_path / f"runs/data/{name}-16px-seed10001-n3")
    assert calls == [((first, 3, 16, scenes.TEST_SEED), {} if kind == "scenes" else {"draw": streets.draw})]
    assert os.path.exists(os.path.join(first, "done"))


def test_mean_depth_map_of_one_pair_is_its_normalised_depth_and_scores_as_it(pairs):
    ds = depth.PairDataset(pairs)
    _, d, v = ds[0]

    class One:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return ds[0]
    y = depth_eval.mean_depth_map(One(), 32)
    torch.testing.assert_close(y, depth.normalize_depth(d[None, None], v[None, None])[0, 0])
    m = depth_eval.evaluate_constant(y, One(), depth.DEPTH_RANGES["scenes"])
    assert m["delta1"] > 0.99 and m["abs_rel"] < 0.02  # its own depth, up to the quantile clipping


def test_row_baseline_is_exact_on_a_depth_linear_in_the_row():
    """depth_eval.row_ramp aligned by least squares in depth space reproduces a depth that is linear in the row
    (a floor seen head-on is not, so the baseline is not trivially perfect on scenes)."""
    gt = 1.0 + 0.25 * torch.arange(32.0)[:, None].expand(32, 32)  # 1 m at the top .. 8.75 m at the bottom
    m = depth.depth_metrics(depth_eval.row_ramp(32), gt, gt > 0, 0.1, 30, align="depth")
    assert m["abs_rel"] < 1e-6 and m["delta1"] == 1.0
    m = depth.depth_metrics(depth_eval.row_ramp(32), 1 / (0.1 + torch.arange(32.0)[:, None].expand(32, 32) / 8),
                            torch.ones(32, 32, dtype=torch.bool), 0.1, 30, align="depth")
    assert m["abs_rel"] > 0.1  # 1/row, a floor's depth: not linear in the row


def test_marigold_encoding_is_affine_invariant_and_linear_in_depth():
    """--depth-norm marigold: depth itself mapped to [-1, 1] by its 2%/98% quantiles, so a*depth + b (a > 0) encodes
    the same; the log encoding ("ours") is only scale-invariant."""
    d = 0.5 + 6 * torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    v = torch.ones_like(d, dtype=torch.bool)
    y = depth.normalize_depth(d, v, "marigold")
    lo, hi = torch.quantile(d.double().flatten(), torch.tensor([0.02, 0.98], dtype=torch.float64))
    torch.testing.assert_close(y, ((d - lo) / (hi - lo) * 2 - 1).clamp(-1, 1).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(depth.normalize_depth(3 * d + 2, v, "marigold"), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(depth.normalize_depth(3 * d, v), depth.normalize_depth(d, v), atol=1e-5, rtol=0)
    assert (depth.normalize_depth(3 * d + 2, v) - depth.normalize_depth(d, v)).abs().max() > 0.05


@pytest.mark.skipif(not os.path.exists(depth.DEMO), reason="needs the depth demo (toy/make_depth_demo.sh)")
def test_the_depth_demo_predicts_affine_invariant_depth_through_its_own_vae():
    """toy/make_depth_demo.sh's file: Marigold's encoding, 1 step by default, its own VAE (tuned on the training
    pairs, toy/depth_vae.py --part all) over the prior's text encoder."""
    b, prior = sd.load(depth.DEMO), sd.load(os.path.join(os.path.dirname(depth.DEMO), "prior_tiny.safetensors"))
    assert (b.meta["task"], b.meta["depth_norm"], b.meta["base_model"]) == ("depth", "marigold", "prior_tiny.safetensors")
    assert (b.meta["steps"], b.meta["t_sampling"]) == ("1", "noise_end")
    same = lambda part: all(torch.equal(x, y) for x, y in zip(getattr(b.vae, part).state_dict().values(),
                                                              getattr(prior.vae, part).state_dict().values()))
    assert not same("encoder") and not same("decoder")
    assert all(torch.equal(x, y) for x, y in zip(b.text_encoder.state_dict().values(),
                                                 prior.text_encoder.state_dict().values()))


@pytest.mark.skipif(not os.path.exists(depth.DEMO), reason="needs the depth demo (toy/make_depth_demo.sh)")
def test_readme_command_on_the_shipped_image(tmp_path):
    """`python depth.py assets/room.png`: the README's command, on the image shipped for it."""
    paths = depth.main([os.path.join(depth.ROOT, "assets", "room.png"), "--out", str(tmp_path), "--steps", "1",
                        "--ensemble", "1"])
    assert sorted(os.path.basename(p) for p in paths) == ["room_depth.npy", "room_depth.png", "room_depth16.png"]
    assert np.load(paths[2]).shape == (128, 128)


# ----------------------------------------------------------------------------- paper-scale data (issue 15):
# non-square --resolution (depth and t2i), --random-flip, mixtures of pair folders, streamed pairs

def write_random_pairs(root, n, hw, seed=0, depth_hw=None):
    """n random pairs: rgb/iI.png (H, W) and depth/iI.png (16-bit mm, depth_hw if given), mask-free."""
    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True), (root / "depth").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / "rgb" / f"i{i}.png")
        Image.fromarray(rng.integers(500, 9000, depth_hw or hw).astype(np.uint16)).save(root / "depth" / f"i{i}.png")
    return str(root)


def test_paper_resolution_384x512_depth_and_t2i_steps_run(tmp_path):
    """--resolution 384x512 (HxW, the paper's): a depth step (streamed, random crop and flip, one DataLoader
    worker) and a t2i step, on a micro bundle with SD's 8x VAE (at 384x512 the tiny 4x VAE's mid-block attention
    over 96x128 latents alone takes half a minute here); latents 48x64, metadata 384x512, read back by sample.py."""
    import sample
    import train
    from helpers import randomize, tiny_training_folder
    import unet as unet_mod
    import vae as vae_mod
    b = sd.create(unet=unet_mod.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                           attention_resolutions=(2,), num_heads=-1, num_head_channels=16,
                                           context_dim=128, norm_groups=8),
                  vae=vae_mod.VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4))
    for i, m in enumerate((b.unet, b.vae, b.text_encoder)):
        randomize(m, i).eval()
    ckpt = str(tmp_path / "micro.safetensors")
    sd.save(b, ckpt)
    (tmp_path / "t2i").mkdir()
    images = tiny_training_folder(tmp_path / "t2i", 2, (300, 500))[1]  # wider than 3:4: cropped left-right
    pairs = write_random_pairs(tmp_path / "pairs", 2, (100, 120))
    shapes = []
    common = ["--ckpt", ckpt, "--resolution", "384x512", "--batch-size", "1", "--steps", "1", "--sample-every", "0",
              "--save-every", "0", "--warmup", "0", "--no-cache", "--random-flip", "--crop", "random"]
    loss = train.LOSSES["diff2flow"]
    train.LOSSES["diff2flow"] = lambda net, x1, *a, **k: shapes.append(tuple(x1.shape)) or loss(net, x1, *a, **k)
    try:
        depth_model = train.main(["--task", "depth", "--data", pairs, "--out", str(tmp_path / "d"), "--workers", "1",
                                  *common])
        t2i_model = train.main(["--data", images, "--out", str(tmp_path / "t"), "--workers", "0", *common])
    finally:
        train.LOSSES["diff2flow"] = loss
    assert shapes == [(1, 4, 48, 64)] * 2
    assert sd.safetensors_metadata(depth_model)["resolution"] == "384x512"
    t2i = sd.load(t2i_model)
    assert sample.image_size(sample.parser.parse_args(["--prompt", "x"]), t2i, t2i.meta) == (384, 512)
    with pytest.raises(SystemExit, match=r"--resolution 384y512: give one side in pixels \(512\) or HEIGHTxWIDTH"):
        train.main(["--data", images, "--out", str(tmp_path / "x"), *common[:2], "--resolution", "384y512"])


def test_fit_and_load_image_crop_to_the_aspect_centre_or_where_asked():
    """A 4x8 image to 2x2: resized to 2x4 (aspect kept), then columns 1..2 (centre) or 0..1 / 2..3 (crop (., 0)
    / (., 0.99)); depth by nearest neighbour. square() is fit()'s square case."""
    x = torch.arange(8.0).repeat_interleave(1).view(1, 1, 8).expand(1, 4, 8)  # column index 0..7
    for crop, cols in ((None, [1, 2]), ((0.5, 0.0), [0, 1]), ((0.5, 0.99), [2, 3])):
        out = depth.fit(x, (2, 2), "nearest", crop)
        assert out.shape == (1, 2, 2) and out[0, 0].tolist() == [2.0 * c for c in cols], crop
    torch.testing.assert_close(depth.fit(x, (2, 2), "nearest", flip=True), depth.fit(x, (2, 2), "nearest").flip(-1))
    torch.testing.assert_close(depth.square(x, 2, "bilinear"), depth.fit(x, (2, 2), "bilinear"))


def test_random_flip_mirrors_the_image_and_its_depth_together(tmp_path):
    """TrainItems' key (item, crop, flip=True): image and normalised depth are both the mirror of the unflipped
    item (a depth map cropped or flipped on its own would teach the wrong depth); a wide image's random crop
    takes the same window of both. augment_keys flips half the positions (10000 draws: 0.5 +- 4 sigma = 0.02),
    each a function of (seed, position) only."""
    import data
    from types import SimpleNamespace
    ds = depth.PairDataset(write_random_pairs(tmp_path, 1, (12, 20)))
    items = depth.TrainItems([ds], (8, 8))
    image, y = items[((0, 0), (0.5, 0.3), False)]
    fimage, fy = items[((0, 0), (0.5, 0.3), True)]
    assert image.shape == (3, 8, 8) and y.shape == (1, 8, 8) and not torch.equal(image, fimage)
    torch.testing.assert_close(fimage, image.flip(-1))
    torch.testing.assert_close(fy, y.flip(-1))
    raw_image, raw_depth, valid = ds[0]  # the same window of both: the crop of the depth is the depth of the crop
    crop_d = depth.fit(raw_depth[None], (8, 8), "nearest", (0.5, 0.3))
    torch.testing.assert_close(y, depth.normalize_depth(crop_d[None], crop_d[None] > 0)[0])
    cfg = SimpleNamespace(seed=3, crop="random", random_flip=True)
    keys = data.augment_keys(cfg, range(10000), range(5000, 15000))
    assert abs(sum(k[2] for k in keys) / 10000 - 0.5) < 0.02 and len({k[1] for k in keys}) == 10000
    assert data.augment_keys(cfg, [7], range(9000, 9001)) == [(7, *keys[4000][1:])]  # the position decides
    x = torch.randn(6, 4, 3, 5)  # tar shards: mirrored in the trainer by the same draws (RGB + depth stacked)
    flips = [k[2] for k in data.augment_keys(cfg, range(6), range(100, 106))]
    expect = torch.stack([xi.flip(-1) if f else xi for xi, f in zip(x, flips)])
    assert torch.equal(data.mirror(cfg, x, range(100, 106)), expect) and 0 < sum(flips) < 6


def test_mixture_draws_sources_at_their_weights_deterministically_and_resumes(tmp_path):
    """mixture_batches: 0.9 / 0.1 over 20000 positions gives 0.9 within 4 sigma (sqrt(0.09 / 20000) = 0.0021:
    +- 0.0085); each source is read in whole shuffled epochs (its first 7 draws of a 7-item source: each once);
    a resumed stream continues exactly, and 2 ranks' micro-batches together are one process's."""
    import data
    from types import SimpleNamespace
    cfg = SimpleNamespace(seed=1, batch_size=8, grad_accum=2)
    take = lambda it, k: [x for _, b in zip(range(k), it) for x in b]
    one = take(data.mixture_batches(cfg, [50, 7], [0.9, 0.1], 0, 0, 1), 1250)  # 20000 positions
    share = sum(s == 0 for s, _ in one) / len(one)
    assert abs(share - 0.9) < 0.0085, share
    small = [i for s, i in one if s == 1]
    assert sorted(small[:7]) == list(range(7)) and sorted(small[7:14]) == list(range(7))
    assert take(data.mixture_batches(cfg, [50, 7], [0.9, 0.1], 16 * 300, 0, 1), 20) == one[16 * 300:16 * 300 + 160]
    ranks = [data.mixture_batches(cfg, [50, 7], [0.9, 0.1], 0, r, 2) for r in (0, 1)]
    two = [x for _ in range(10) for m in range(2) for r in ranks for x in next(r)]  # [step][micro][rank]
    assert two == take(data.mixture_batches(SimpleNamespace(seed=1, batch_size=8, grad_accum=4), [50, 7],
                                            [0.9, 0.1], 0, 0, 1), 40)
    assert take(data.mixture_batches(SimpleNamespace(seed=2, batch_size=8, grad_accum=2), [50, 7], [0.9, 0.1],
                                     0, 0, 1), 10) != one[:160]


def test_train_depth_on_two_mixed_folders_resumes_exactly_and_names_mismatched_sizes(pairs, tmp_path):
    """--data A --data B --data-weights: trains and resumes bit-exactly (streamed, no --cache); a pair whose
    depth map is not the image's size is one line naming the file and what to do."""
    other = write_random_pairs(tmp_path / "other", 3, (32, 32), seed=1)
    mix = ["--data", other, "--data-weights", "0.7,0.3", "--no-cache", "--random-flip"]
    b = sd.load(tiny_depth_run(pairs, tmp_path / "a", "--steps", "2", *mix))
    tiny_depth_run(pairs, tmp_path / "b", "--steps", "1", *mix)
    resumed = sd.load(tiny_depth_run(pairs, tmp_path / "b", "--steps", "2", "--resume", *mix))
    for (k, v), w in zip(b.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(SystemExit, match="--data-weights 1,2,3: give 2 non-negative numbers"):
        tiny_depth_run(pairs, tmp_path / "c", "--steps", "1", "--data", other, "--data-weights", "1,2,3")
    bad = write_random_pairs(tmp_path / "bad", 2, (32, 32), depth_hw=(16, 16))
    with pytest.raises(SystemExit) as e:
        tiny_depth_run(bad, tmp_path / "e", "--steps", "1", "--no-cache", "--workers", "1")  # raised in a worker
    msg = str(e.value)
    assert "\n" not in msg and "i0.png: the image is 32x32 but its depth" in msg and "16x16" in msg
    assert "write the depth map at the image's size" in msg


def test_train_depth_on_tar_shards_resumes_exactly_and_skips_a_damaged_member(pairs, tmp_path):
    """Depth tar shards (KEY.rgb.png + KEY.depth.png, read by data.py's generic reader): training resumes
    bit-exactly (--random-flip mirrors image and depth as one tensor), a damaged depth member is skipped by name
    and counted in log.jsonl, a shard without depth members is one line naming it."""
    import io
    import json
    import tarfile
    ds = depth.PairDataset(pairs)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(3 * s, 3 * s + 3):
                rgb, dep = ds.paths(i)
                payloads = [("rgb.png", open(rgb, "rb").read()), ("depth.png", open(dep, "rb").read())]
                if i == 4:
                    payloads[1] = ("depth.png", b"not a png")
                for suffix, payload in payloads:
                    info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    args = ["--no-cache", "--random-flip", "--batch-size", "2"]
    a = sd.load(tiny_depth_run(str(shards), tmp_path / "a", "--steps", "3", *args))
    tiny_depth_run(str(shards), tmp_path / "b", "--steps", "1", *args)
    b = sd.load(tiny_depth_run(str(shards), tmp_path / "b", "--steps", "3", "--resume", *args))
    for (k, v), w in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(v, w), k
    rows = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert sum(r.get("skipped", 0) for r in rows) >= 1
    with tarfile.open(tmp_path / "rgb-only.tar", "w") as tar:
        info = tarfile.TarInfo("00000.rgb.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(SystemExit, match="rgb-only.tar: 00000: no KEY.depth.png or KEY.depth.npy; shards need"):
        tiny_depth_run(str(tmp_path / "rgb-only.tar"), tmp_path / "c", "--steps", "1", "--no-cache")


def test_depth_cache_is_disk_shards_per_source_reused_on_resume_and_read_lazily(pairs, tmp_path, monkeypatch):
    """--cache on two mixed folders: every pair encoded once into OUT/cache/ shards (CACHE_ITEMS a file, the
    sources' files numbered on) holding its centre crop's x1 and cond (as encode_items gives them, to 1e-5: the
    encode batches differ); a --resume reuses them without encoding; rows are read from disk per item."""
    import data
    import train
    from safetensors.torch import load_file
    monkeypatch.setattr(depth, "CACHE_ITEMS", 4)
    other = write_random_pairs(tmp_path / "other", 3, (32, 40), seed=1)
    norm = sd.load(tiny_depth_run(pairs, tmp_path / "a", "--steps", "1", "--data", other, "--cache")).meta["depth_norm"]
    folder = tmp_path / "a" / "cache"
    names = sorted(os.listdir(folder))
    assert names == [f"0000{j}.safetensors" for j in range(3)] + ["cache.json"]  # 6 pairs: 4 + 2; other's 3
    x1, cond = (load_file(folder / "00002.safetensors")[k] for k in depth.CACHE_NAMES)
    bundle = sd.load(train.DEMO_PRIOR)
    items = depth.TrainItems([depth.PairDataset(other)], (32, 32), norm)  # the depth-demo preset's encoding
    ref = depth.encode_items(bundle, *map(torch.stack, zip(*(items[((0, i), None, False)] for i in range(3)))),
                             contextlib.nullcontext)
    assert x1.shape == cond.shape == ref[0].shape and len(x1) == 3
    torch.testing.assert_close(x1, ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond, ref[1], atol=1e-5, rtol=0)
    stamps = {n: os.stat(folder / n).st_mtime_ns for n in names}
    monkeypatch.setattr(depth, "encode_cache", lambda *a: pytest.fail("a complete cache is encoded again"))
    tiny_depth_run(pairs, tmp_path / "a", "--steps", "2", "--data", other, "--cache", "--resume")
    assert {n: os.stat(folder / n).st_mtime_ns for n in names} == stamps
    # lazily: the dataset holds the shards' headers, so a shard rewritten under it is what it reads next
    ds = data.CacheDataset([str(folder / "00002.safetensors")], depth.CACHE_NAMES)
    w = data.CacheWriter(str(folder / "00002.safetensors"), depth.CACHE_NAMES)
    w.append(-x1, cond + 1), w.close()
    assert torch.equal(ds[1][0], -x1[1]) and torch.equal(ds[2][1], cond[2] + 1)


# ----------------------------------------------------------------------------- a depth model's own VAE (#18)

def vae_flat(m, part):
    return torch.cat([p.flatten() for p in getattr(m.vae, part).parameters()])


def test_depth_vae_decoder_is_tuned_saved_beside_its_base_and_loaded(pairs, tmp_path):
    """toy/depth_vae.py --part decoder on a tiny depth model saved UNet-only beside its base: the file it writes holds
    the UNet and the tuned decoder (sd.save(..., own_vae="decoder")); sd.load takes those and the encoder / text
    encoder of the base. A file with only part of a decoder is refused by name; --out is never overwritten."""
    import depth_vae
    import train
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    run = sd.load(tiny_depth_run(pairs, tmp_path / "run", "--steps", "1"))
    base = str(tmp_path / "base.safetensors")
    sd.save(sd.load(train.DEMO_PRIOR), base)
    unet_only = str(tmp_path / "model.safetensors")
    sd.save(run, unet_only, base="base.safetensors", **{k: run.meta[k] for k in ("task", "resolution", "steps")})
    out = str(tmp_path / "sub" / "tuned.safetensors")
    os.makedirs(os.path.dirname(out))
    depth_vae.main(["--ckpt", unet_only, "--data", pairs, "--out", out, "--part", "decoder", "--steps", "2",
                    "--batch-size", "2", "--warmup", "1"])
    with safe_open(out, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["base_model"] == os.path.join("..", "base.safetensors") and meta["depth_vae_steps"] == "2"
    assert {k.split(".")[1] for k in keys if k.startswith("first_stage_model.")} == {"decoder", "post_quant_conv"}
    tuned, b = sd.load(out), sd.load(base)
    assert tuned.meta["task"] == "depth" and tuned.unet.cfg.in_channels == 8
    torch.testing.assert_close(vae_flat(tuned, "encoder"), vae_flat(b, "encoder"), atol=0, rtol=0)
    assert not torch.equal(vae_flat(tuned, "decoder"), vae_flat(b, "decoder"))
    tensors = load_file(out)
    save_file({k: v for k, v in tensors.items() if "decoder.up" not in k}, str(tmp_path / "sub" / "part.safetensors"),
              metadata=meta)
    with pytest.raises(sd.LoadError, match="part of a VAE"):
        sd.load(str(tmp_path / "sub" / "part.safetensors"))
    with pytest.raises(SystemExit, match="exists"):
        depth_vae.main(["--ckpt", unet_only, "--data", pairs, "--out", out, "--steps", "1"])
    # --from: that decoder onto another depth model (here the whole-bundle run), naming --base
    grafted = str(tmp_path / "sub" / "grafted.safetensors")
    depth_vae.main(["--ckpt", str(tmp_path / "run" / "final.safetensors"), "--from", out, "--part", "decoder",
                    "--base", os.path.join("..", "base.safetensors"), "--dtype", "float16", "--out", grafted])
    g = sd.load(grafted)
    torch.testing.assert_close(vae_flat(g, "decoder"), vae_flat(tuned, "decoder").half().float(), atol=0, rtol=0)
    torch.testing.assert_close(vae_flat(g, "encoder"), vae_flat(b, "encoder"), atol=0, rtol=0)
    with pytest.raises(SystemExit, match="not both") as e:
        depth_vae.main(["--ckpt", unet_only, "--data", pairs, "--from", out, "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_depth_vae_all_tunes_the_prior_before_training_and_travels_whole(pairs, tmp_path):
    """--part all on the prior: a whole bundle whose encoder and decoder both moved (latent scale kept), that
    train.py --task depth trains from; its VAE then travels whole in the model's UNet-only file
    (own_vae="all", config and scale_factor from the file). Tuning a trained depth model's encoder, or the decoder
    of a model that is not a depth model, is refused in one line."""
    import depth_vae
    import train
    from safetensors import safe_open
    prior = sd.load(train.DEMO_PRIOR)
    tuned_path = str(tmp_path / "prior_vae.safetensors")
    depth_vae.main(["--ckpt", train.DEMO_PRIOR, "--data", pairs, "--out", tuned_path, "--resolution", "32",
                    "--steps", "2", "--batch-size", "2", "--warmup", "1"])
    tuned = sd.load(tuned_path)
    assert "base_model" not in tuned.meta and tuned.meta["depth_vae_part"] == "all"
    assert tuned.vae.scale_factor == prior.vae.scale_factor
    for part in ("encoder", "decoder"):
        assert not torch.equal(vae_flat(tuned, part), vae_flat(prior, part))
    torch.testing.assert_close(tuned.unet.state_dict(), prior.unet.state_dict(), atol=0, rtol=0)
    run = tiny_depth_run(pairs, tmp_path / "run", "--steps", "1", "--ckpt", tuned_path, "--preset", "depth-demo")
    small = str(tmp_path / "small.safetensors")
    depth_vae.main(["--ckpt", run, "--from", tuned_path, "--base", os.path.relpath(train.DEMO_PRIOR, tmp_path),
                    "--dtype", "float16", "--out", small])
    with safe_open(small, "pt") as f:
        parts = {k.split(".")[1] for k in f.keys() if k.startswith("first_stage_model.")}
    assert parts == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    m = sd.load(small)
    assert m.meta["task"] == "depth" and m.vae.scale_factor == prior.vae.scale_factor
    for part in ("encoder", "decoder"):
        torch.testing.assert_close(vae_flat(m, part), vae_flat(tuned, part).half().float(), atol=0, rtol=0)
    torch.testing.assert_close(m.text_encoder.state_dict(), prior.text_encoder.state_dict(), atol=0, rtol=0)
    with pytest.raises(SystemExit, match="moves the latents"):
        depth_vae.main(["--ckpt", run, "--data", pairs, "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="needs a depth model"):
        depth_vae.main(["--ckpt", train.DEMO_PRIOR, "--data", pairs, "--part", "decoder",
                        "--out", str(tmp_path / "y.safetensors")])



def test_the_depth_demo_preset_mixes_the_two_training_renderers(tmp_path, monkeypatch):
    """--task depth without --data: 8192 scenes.py rooms and 4096 streets.py streets, each made once by its own
    writer (data.demo), mixed by their sizes."""
    import train
    cfg = train.parse_args(["--task", "depth"])
    train.check_config(cfg)
    names = [os.path.basename(p) for p in cfg.data]
    assert names == ["scenes-v3-64px-seed0-n8192", "streets-v1-64px-seed0-n4096"] and cfg.data_weights == ""
    monkeypatch.setattr(data, "DEMO_DATA", str(tmp_path))
    runs = []
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **k: runs.append(cmd))
    path, make = data.demo("demo:streets", 16)
    make()
    assert path == str(tmp_path / "streets-v1-16px-seed0-n4096") and os.path.exists(os.path.join(path, "done"))
    assert runs[0][1].endswith(os.path.join("toy", "streets.py")) and runs[0][2:] == [
        "--out", path, "--n", "4096", "--size", "16", "--seed", "0"]
