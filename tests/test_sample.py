"""sample.py end to end on tiny random checkpoints: files, PNG metadata, seeds, samplers, objectives, LoRA, errors."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import diff2flow
import lora
import sample
import sd
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny diffusion checkpoint, the same weights as a naive-FM checkpoint, and a LoRA on top of the first."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    bundle = sd.create()
    with torch.no_grad():  # random norms too, so the images are not flat
        for p in bundle.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd.save(bundle, str(d / "base.safetensors"), resolution=32)
    bundle.objective = "fm"
    sd.save(bundle, str(d / "fm.safetensors"), resolution=32)
    bundle.objective = "diffusion"
    cfg = lora.PRESETS["small"]
    lora.apply_lora(bundle.unet, cfg)
    with torch.no_grad():
        for m in bundle.unet.modules():
            if isinstance(m, lora.LoRALayer):
                m.lora_up.weight.normal_(std=0.02)
    lora.save_lora(bundle.unet, str(d / "lora.safetensors"), cfg, base="base.safetensors")
    return {k: str(d / f"{k}.safetensors") for k in ("base", "fm", "lora")}


def run(tmp_path, *args, out="out"):
    return sample.main(["--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / out), *args])


def pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def error_of(capsys, argv):
    """Run main(argv), expecting a one-line error and a non-zero exit; returns that line."""
    capsys.readouterr()  # drop earlier runs' progress bars
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code not in (0, None) and len(err.splitlines()) == 1, f"exit {e.value.code}: {err!r}"
    return err


def test_cli_writes_pngs_with_metadata(ckpts, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpts["base"], "--prompt", "a red circle",
                        "--steps", "2", "--out", str(out), "--negative", "blurry", "--cfg", "3", "--seed", "7"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / "0000-7.png")]
    img = Image.open(out / "0000-7.png")
    assert img.size == (32, 32) and img.mode == "RGB"  # resolution=32 from the checkpoint's metadata
    want = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": "7", "steps": "2", "sampler": "euler",
            "cfg": "3.0", "model": "base.safetensors", "objective": "diffusion", "size": "32x32"}
    assert {k: img.text.get(k) for k in want} == want
    assert img.text["parameters"].startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: euler, "
                                             "CFG scale: 3.0, Seed: 7, Size: 32x32")


def test_seeds_and_numbering(ckpts, tmp_path):
    a, = run(tmp_path, "--ckpt", ckpts["base"], "--seed", "3")
    b, = run(tmp_path, "--ckpt", ckpts["base"], "--seed", "3")
    c, = run(tmp_path, "--ckpt", ckpts["base"], "--seed", "4")
    assert [os.path.basename(p) for p in (a, b, c)] == ["0000-3.png", "0001-3.png", "0002-4.png"]  # no overwrite
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).max() > 10 and pixels(a).std() > 5  # images are not flat


def test_batch_independence(ckpts, tmp_path):
    """--n 2 in one batch gives seeds s and s+1, each the image a single run with that seed gives."""
    pair = run(tmp_path, "--ckpt", ckpts["base"], "--seed", "5", "--n", "2", "--batch", "2", out="pair")
    assert [os.path.basename(p) for p in pair] == ["0000-5.png", "0001-6.png"]
    for path, seed in zip(pair, (5, 6)):
        single, = run(tmp_path, "--ckpt", ckpts["base"], "--seed", str(seed), "--batch", "1", out=f"s{seed}")
        assert np.abs(pixels(path) - pixels(single)).max() <= 1, "batched vs single image: tolerance 1/255"


@pytest.mark.parametrize("sampler", ["heun", "ddim"])
def test_other_samplers(ckpts, tmp_path, sampler):
    path, = run(tmp_path, "--ckpt", ckpts["base"], "--sampler", sampler, "--height", "48", "--width", "64")
    img = Image.open(path)
    assert img.size == (64, 48) and img.text["sampler"] == sampler and img.text["size"] == "64x48"


def test_fm_objective(ckpts, tmp_path, capsys):
    fm, = run(tmp_path, "--ckpt", ckpts["fm"])
    base, = run(tmp_path, "--ckpt", ckpts["base"], out="base")
    assert Image.open(fm).text["objective"] == "fm"
    assert not np.array_equal(pixels(fm), pixels(base))  # same weights, read as a velocity instead
    err = error_of(capsys, ["--ckpt", ckpts["fm"], "--prompt", "x", "--sampler", "ddim", "--out", str(tmp_path)])
    assert "ddim" in err and "'fm'" in err and "euler" in err


def test_velocity_model_objectives():
    torch.manual_seed(0)
    bundle = sd.create()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.75]), torch.randn(2, 77, 128)
    model = lambda objective: diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, "v", objective)
    assert isinstance(model("diff2flow"), diff2flow.FlowModel)
    with torch.no_grad():
        v, want = model("fm_dm_direction")(x, t, ctx), bundle.unet(x, (1 - t) * 999, ctx)
        torch.testing.assert_close(v, want, msg="fm_dm_direction: UNet output at timestep (1 - t)(T - 1)")
        torch.testing.assert_close(model("fm")(x, t, ctx), bundle.unet(x, t, ctx), msg="fm: timestep t_fm")
    with pytest.raises(ValueError, match="unknown objective"):
        model("x0")


def test_native_size():
    """Metadata 'resolution', else 768 for SD2 v-prediction and 512 otherwise; real SD needs multiples of 64."""
    args = sample.parser.parse_args(["--prompt", "x"])
    real = lambda version, prediction: SimpleNamespace(version=version, prediction=prediction,
                                                        vae=SimpleNamespace(downsample=8),
                                                        unet=SimpleNamespace(cfg=unet.PRESETS["sd15"]))
    assert sample.image_size(args, real("sd1", "eps"), {}) == (512, 512)
    assert sample.image_size(args, real("sd2", "eps"), {}) == (512, 512)
    assert sample.image_size(args, real("sd2", "v"), {}) == (768, 768)
    assert sample.image_size(args, real("sd2", "v"), {"resolution": "256"}) == (256, 256)
    args = sample.parser.parse_args(["--prompt", "x", "--height", "640"])
    assert sample.image_size(args, real("sd1", "eps"), {}) == (640, 512)


def test_lora(ckpts, tmp_path):
    """A LoRA file as --ckpt loads its base and changes the image; --lora on the base gives the same image."""
    as_ckpt, = run(tmp_path, "--ckpt", ckpts["lora"], out="a")
    on_top, = run(tmp_path, "--ckpt", ckpts["base"], "--lora", ckpts["lora"], out="b")
    base, = run(tmp_path, "--ckpt", ckpts["base"], out="c")
    assert Image.open(as_ckpt).size == (32, 32)  # resolution from the base's metadata
    assert np.abs(pixels(as_ckpt) - pixels(base)).max() > 10
    assert np.abs(pixels(as_ckpt) - pixels(on_top)).max() <= 1, "LoRA file vs --lora: tolerance 1/255"


def test_demo_default(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEMO", str(tmp_path / "missing.safetensors"))
    err = error_of(capsys, ["--prompt", "x", "--out", str(tmp_path)])
    assert "--ckpt" in err and "diffusers folder" in err
    monkeypatch.setattr(sample, "DEMO", ckpts["base"])
    run(tmp_path)
    notes = [line for line in capsys.readouterr().out.splitlines() if "tiny demo" in line]
    assert len(notes) == 1 and "--ckpt" in notes[0]


def test_errors(ckpts, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["--ckpt", ckpts["base"], "--out", str(tmp_path / "out")]
    assert "no such file" in error_of(capsys, ["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x"])
    assert "has no prompts" in error_of(capsys, [*base, "--prompts", str(empty)])
    assert "no prompt" in error_of(capsys, base)
    assert "multiple of 16" in error_of(capsys, [*base, "--prompt", "x", "--height", "40"])  # VAE 4 x UNet 4
    assert "--steps must be >= 1" in error_of(capsys, [*base, "--prompt", "x", "--steps", "0"])
    assert "--n must be >= 1" in error_of(capsys, [*base, "--prompt", "x", "--n", "0"])
    assert "not a LoRA" in error_of(capsys, [*base, "--prompt", "x", "--lora", ckpts["base"]])
    assert not os.path.exists(tmp_path / "out")
