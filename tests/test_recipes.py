"""The paper recipes (train.py --recipe, recipes/paper.toml), zero terminal SNR from training to sampling, the
official LoRA rule and init, the official depth normalisation and EMA schedule.

Recipes: each --print-config equals its README row; each runs one step on a random-weight file of its
architecture at reduced widths (SD2.1 layout: Linear proj_in/out, OpenCLIP text tower, v; SD1.5: conv proj, CLIP,
eps). Zero terminal SNR: the schedule a trained file gives back (sd.load) is the rescaled one, and on it the
Gaussian optimum (tests/test_diff2flow.py's oracle) gives the exact FM velocity, finite losses and gradients from
t = 0, and sampling from pure noise that recovers the Gaussian.
"""
import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import depth
import diff2flow as d
import lora
import sd
import train
import unet as unet_mod
from clip_text import TextConfig
from test_diff2flow import MU, STD, D, oracle, optimal_fm_velocity, whitened_noise

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
pytestmark = pytest.mark.usefixtures("one_thread")


def print_config(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        train.main(list(argv) + ["--print-config"])
    assert e.value.code == 0
    return json.loads(out.getvalue())


def readme_rows():
    """README's 'Paper recipes' table: {recipe: {column: cell}}."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split("### Paper recipes")[1]
    table = text[text.index("| recipe |"):].split("\n\n")[0].split("\n")
    cols = [c.strip() for c in table[0].strip("|").split("|")][1:]
    return {ln.split("`")[1]: dict(zip(cols, [c.strip() for c in ln.strip("|").split("|")][1:])) for ln in table[2:]}


COLUMNS = {"task": "task", "objective": "objective", "pred": "prediction", "LoRA": "lora", "lr": "lr",
           "optimizer": "optimizer", "weight decay": "weight_decay", "grad clip": "grad_clip", "warmup": "warmup",
           "EMA": "ema", "EMA warm-up": "ema_warmup", "caption dropout": "caption_dropout",
           "zero terminal SNR": "zero_terminal_snr", "depth norm": "depth_norm", "global batch": "global_batch",
           "batch / GPU": "batch_size", "steps": "steps", "resolution": "resolution"}


def cell(v):
    return "''" if v == "" else str(v).lower() if isinstance(v, bool) else str(v)


def test_readme_lists_every_recipe_once():
    assert sorted(readme_rows()) == sorted(train.RECIPES) and len(train.RECIPES) == 10


@pytest.mark.parametrize("name", sorted(train.RECIPES))
def test_print_config_matches_its_readme_row(name):
    row, cfg = readme_rows()[name], print_config("--recipe", name)  # no --ckpt, no data: nothing is loaded
    assert set(row) == set(COLUMNS)
    assert {c: cell(cfg[k]) for c, k in COLUMNS.items()} == row
    assert cfg["global_batch"] == cfg["batch_size"] * cfg["grad_accum"] == {"t2i": 64, "reflow": 128, "depth": 32}[
        cfg["task"]]
    recipe = train.RECIPES[name]
    for k in recipe["sources"]:  # every value of the recipe carries its source
        assert cfg["sources"].get(k), f"{name}: {k} has no source"


def test_global_batch_follows_the_processes_and_flags_win(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = print_config("--recipe", "t2i-diff2flow-full")
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["global_batch"], cfg["world_size"]) == (8, 2, 64, 4)
    cfg = print_config("--recipe", "reflow-sd15", "--batch-size", "2")
    assert (cfg["grad_accum"], cfg["global_batch"]) == (16, 128)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = print_config("--recipe", "depth-lora-small", "--grad-accum", "3", "--lr", "1e-4", "--optimizer", "adamw",
                       "--no-cache", "--zero-terminal-snr")  # given flags win, also over a recipe's False / default
    assert (cfg["grad_accum"], cfg["global_batch"], cfg["lr"], cfg["optimizer"]) == (3, 24, 1e-4, "adamw")
    cfg = print_config("--recipe", "t2i-fm-full", "--weight-decay", "0.01", "--objective", "diff2flow")
    assert (cfg["weight_decay"], cfg["objective"], cfg["zero_terminal_snr"]) == (0.01, "diff2flow", False)
    with pytest.raises(SystemExit) as e:
        train.main(["--recipe", "t2i-diff2flow-full", "--batch-size", "5", "--print-config"])
    assert e.value.code == 2 and "not a multiple of --batch-size 5" in capsys.readouterr().err
    assert print_config()["optimizer"] == "adamw" and print_config()["preset"] == "t2i-demo"  # no recipe: as before
    cfg = print_config("--recipe", "depth-full", "--data", "a/", "--data", "b/", "--data-weights", "0.9,0.1")
    assert (cfg["data"], cfg["data_weights"], cfg["resolution"]) == (["a/", "b/"], "0.9,0.1", "384x512")  # mixed


def test_presets_file_is_the_old_table():
    """recipes/presets.toml holds what train.PRESETS held in code (ckpt made absolute, the demo's resolution 0)."""
    demo = os.path.join(ROOT, "assets", "demo")
    p = train.PRESETS
    assert p["t2i"]["lr"] == 1e-5 and p["t2i"]["lora_lr"] == 1e-4 and p["t2i"]["ema"] == 0.9999
    assert p["t2i-demo"]["ckpt"] == train.DEMO_PRIOR == os.path.join(demo, "prior_tiny.safetensors")
    assert p["reflow-demo"]["ckpt"] == os.path.join(demo, "d2f_tiny.safetensors") and p["reflow-demo"]["lora"] == "16"
    assert p["depth-demo"]["resolution"] == 64 and p["t2i-demo"]["resolution"] == 0


# ----------------------------------------------------------------------------- one step of every recipe

def tiny_arch(version):
    """Reduced widths, the real key layout: SD2.1's (Linear proj, OpenCLIP tower, penultimate layer, v) or SD1.5's."""
    base = unet_mod.PRESETS["tiny"]
    if version == "sd2":
        ucfg = dataclasses.replace(base, use_linear_in_transformer=True, context_dim=64)
        tcfg = TextConfig(width=64, layers=3, heads=4, act="gelu", layout="openclip", output_layer=-2)
        return sd.create(unet=ucfg, text=tcfg, version="sd2", prediction="v")
    return sd.create(version="sd1", prediction="eps")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    torch.manual_seed(0)
    ckpts = {v: str(root / f"{v}.safetensors") for v in ("sd1", "sd2")}
    for v, path in ckpts.items():
        sd.save(tiny_arch(v), path)
    rng = np.random.default_rng(0)
    for sub in ("t2i", "pairs/rgb", "pairs/depth"):
        os.makedirs(root / sub)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "t2i" / f"{i}.png")
        (root / "t2i" / f"{i}.txt").write_text(f"picture {i}")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "pairs/rgb" / f"{i}.png")
        np.save(root / "pairs/depth" / f"{i}.npy", rng.uniform(0.5, 150, (32, 32)).astype(np.float32))
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root, ckpts


@pytest.mark.parametrize("name", sorted(train.RECIPES))
def test_every_recipe_runs_one_step(files, tmp_path, name):
    root, ckpts = files
    task = train.RECIPES[name]["task"]
    extra = {"t2i": ["--data", str(root / "t2i")], "depth": ["--data", str(root / "pairs")],
             "reflow": ["--prompts", str(root / "prompts.txt"), "--n-pairs", "2", "--teacher-steps", "1"]}[task]
    final = train.main(["--recipe", name, "--ckpt", ckpts["sd1" if task == "reflow" else "sd2"], *extra,
                        "--out", str(tmp_path / "run"), "--resolution", "32", "--batch-size", "2", "--grad-accum",
                        "1", "--steps", "1", "--workers", "0", "--sample-every", "0", "--save-every", "0"])
    meta = sd.safetensors_metadata(final)
    recipe = train.RECIPES[name]
    assert meta["zero_terminal_snr"] == str(recipe["zero_terminal_snr"]) and meta["objective"] == recipe["objective"]
    assert meta.get("depth_norm", "ours") == recipe["depth_norm"]
    bundle = sd.load(final)  # a LoRA file: its base has SD's schedule, rescaled by the metadata
    assert (bundle.alphas_cumprod[-1] == 0).item() == recipe["zero_terminal_snr"]
    assert bundle.prediction == recipe["prediction"]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"])
    if task == "depth":  # depth.py decodes as the file says it was trained: official = not clipped
        image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
        y = depth.predict(bundle, image, steps=1, ensemble=1)[0]
        bundle.meta["depth_norm"] = "ours"
        assert torch.equal(depth.predict(bundle, image, steps=1, ensemble=1)[0], y.clamp(-1, 1))


# ----------------------------------------------------------------------------- zero terminal SNR, end to end

@pytest.fixture(scope="module")
def zt(tmp_path_factory):
    """A full file and a LoRA file trained with --zero-terminal-snr (recorded as train.py records it), the plain
    base, and the schedule sd.load gives back for the LoRA file."""
    tmp_path = tmp_path_factory.mktemp("zt")
    torch.manual_seed(0)
    b = sd.create()
    b.alphas_cumprod = d.rescale_zero_terminal_snr(b.alphas_cumprod)
    full = str(tmp_path / "full.safetensors")
    sd.save(b, full, zero_terminal_snr=True)
    base = str(tmp_path / "base.safetensors")
    sd.save(sd.create(), base)
    unet = sd.create().unet
    lora.apply_lora(unet, lora.PRESETS["official"])
    lora_file = str(tmp_path / "lora.safetensors")
    lora.save_lora(unet, lora_file, lora.PRESETS["official"], base=base, objective="diff2flow", prediction="v",
                   zero_terminal_snr=True)
    return full, lora_file, base, sd.load(lora_file).alphas_cumprod.double()


def test_zero_snr_is_recorded_and_followed_by_sd_load(zt):
    full, lora_file, base, ac = zt
    want = d.rescale_zero_terminal_snr(sd.sd_alphas_cumprod())
    assert ac[-1] == 0 and torch.allclose(ac, want, rtol=0, atol=1e-7)  # LoRA: its base's (float32), rescaled
    full_ac = sd.load(full).alphas_cumprod  # stored rescaled (float32) and followed: idempotent
    assert full_ac[-1] == 0 and torch.allclose(full_ac, want, rtol=0, atol=1e-7)
    assert torch.equal(sd.load(base).alphas_cumprod, sd.sd_alphas_cumprod().float().double())


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_snr_exact_velocity_from_t0_on_the_loaded_schedule(zt, prediction):
    """The converted Gaussian optimum is the optimal FM velocity on [t_lo, t_hi]; with zero terminal SNR a
    v-model's t_lo is exactly 0 (pure noise has a timestep), an eps-model's the f_t of T-2, max_dm_time."""
    ac = zt[3]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    assert flow.t_dm_max == (999 if prediction == "v" else 998)
    assert flow.t_lo == 0 if prediction == "v" else 0 < flow.t_lo < 1e-3
    t = torch.linspace(flow.t_lo, flow.t_hi, 501, dtype=torch.float64)
    x = MU * t.reshape(-1, 1) + 2 * torch.randn(len(t), D, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64)
    err = (flow(x, t) - optimal_fm_velocity(x, t)).abs().max().item()
    assert err < 1e-5, f"{prediction}: max |v - v*| = {err:.1e} (tol 1e-5)"


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_snr_losses_finite_from_t0(zt, prediction):
    """Training losses at the noise end (t_FM = 0, t_DM = T-1 where alpha = 0): finite values and gradients."""
    ac = zt[3]
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    net = oracle(ac, prediction)
    scaled = lambda x, t, c: w * net(x, t, c)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    x1 = MU + STD * torch.randn(6, D, generator=g, dtype=torch.float64)
    noise = torch.randn(6, D, generator=g, dtype=torch.float64)
    t_fm = torch.tensor([0.0, 1e-9, 1e-4, 0.5, 1 - 1e-9, 1.0], dtype=torch.float64)
    t_dm = torch.tensor([999.0, 999, 998, 500, 1, 0], dtype=torch.float64)
    losses = [d.diff2flow_loss(scaled, x1, None, ac, prediction, noise=noise, t=t_fm),
              d.diffusion_loss(scaled, x1, None, ac, prediction, noise=noise, t=t_dm)]
    sum(losses).backward()
    assert all(torch.isfinite(v) for v in losses) and torch.isfinite(w.grad)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_snr_sampling_from_pure_noise_recovers_the_gaussian(zt, prediction):
    """Heun, 40 steps from t = 0 on the optimum with the loaded schedule: finite, mean and std right up to the
    end rule's first-order bias (test_diff2flow.end_bias: 0 at the noise end for v, t_lo = 0) + 1.5e-3."""
    ac = zt[3]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    x = d.sample_heun(flow, whitened_noise(), 40)
    assert torch.isfinite(x).all() and (x.mean(0) - MU).abs().max() < 3e-3
    bias = flow.t_lo**2 * STD**2 / 2 - (1 - flow.t_hi) ** 2 / (2 * STD**2)
    assert ((x.std(0) / STD - 1) - bias).abs().max() < 1.5e-3


# ----------------------------------------------------------------------------- LoRA, depth, EMA

def official_rule_count(model, conv=0.2, attn=0.2, mlp=None):
    """Trainable parameters by the official code's loop (trainer_module.py add_lora_to_unet, with
    c0.2_fullA0.2_FL or c64_fullA64_m64_FL), written out independently over our UNet's LDM paths: first conv
    and out block fully; paths with "attn": q/k/v LoRA, the rest skipped (so to_out.0 too); bias paths skipped;
    every other Conv2d a LoRA (same-kernel down, 1x1 up); then the mlp Linears. Rank: an int, or
    ceil(ratio x max(in, out))."""
    rank = lambda r, i, o: r if isinstance(r, int) else math.ceil(max(i, o) * r)  # noqa: E731
    n = sum(p.numel() for k, p in model.named_parameters() if k.startswith(("input_blocks.0.0.", "out.")))
    for path in model.state_dict():
        mod = model.get_submodule(path.rpartition(".")[0])
        if path.startswith(("input_blocks.0.0.", "out.")):
            continue
        if "attn" in path:
            if path.split(".")[-2] in ("to_q", "to_k", "to_v"):
                n += rank(attn, mod.in_features, mod.out_features) * (mod.in_features + mod.out_features)
        elif path.endswith("bias"):
            continue
        elif isinstance(mod, torch.nn.Conv2d):
            r = rank(conv, mod.in_channels, mod.out_channels)
            n += r * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] + r * mod.out_channels
        elif mlp and any(k in path for k in ("to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")):
            n += rank(mlp, mod.in_features, mod.out_features) * (mod.in_features + mod.out_features)
    return n


@pytest.mark.parametrize("arch, preset, official, count", [
    ("sd21", "official", {}, 207_459_652), ("sd15", "base", {}, 214_262_980),
    ("sd21", "small", dict(conv=64, attn=64, mlp=64), 61_513_156), ("sd15", "small", dict(conv=64, attn=64, mlp=64),
                                                                    60_988_868)])
def test_lora_presets_are_the_official_rules(arch, preset, official, count):
    """On the full SD2.1 / SD1.5 UNets (meta device), what the official loop trains with c0.2_fullA0.2_FL is
    'official' on SD2.1 (207.5M, paper 222M; our 'base' 217.4M adds its Linear proj_in/out) and 'base' on SD1.5
    (whose 1x1 proj convs the official loop wraps as convs); with c64_fullA64_m64_FL, 'small' on both (SD2.1:
    61.5M, paper 62M)."""
    with torch.device("meta"):
        ref, model = unet_mod.UNet(unet_mod.PRESETS[arch]), unet_mod.UNet(unet_mod.PRESETS[arch])
    lora.apply_lora(model, lora.PRESETS[preset])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == official_rule_count(ref, **official) == count


def test_conv_lora_down_init_is_kaiming_normal_a1():
    """Official LoRAConv: nn.init.kaiming_normal_(A.weight, a=1), std 1/sqrt(fan_in) (PyTorch's default conv init:
    0.577/sqrt(fan_in)); the Linear down keeps nn.Linear's default, as the official LoraLinear's A."""
    torch.manual_seed(0)
    conv = lora.LoRAConv2d(torch.nn.Conv2d(320, 640, 3, padding=1), 128)
    fan_in = 320 * 9
    assert abs(conv.lora_down.weight.std().item() * fan_in**0.5 - 1) < 0.01  # 368640 draws: ~0.1% std error
    assert conv.lora_up.weight.abs().max() == 0
    lin = lora.LoRALinear(torch.nn.Linear(320, 640), 64)
    assert abs(lin.lora_down.weight.std().item() * 320**0.5 - 3**-0.5) < 0.02


def test_official_depth_normalisation():
    """Capped at 120 m, gaps interpolated along the raster order, 1%/99% log percentiles of ALL pixels, no clip."""
    g = torch.Generator().manual_seed(3)
    dep = torch.exp(torch.randn(1, 1, 20, 30, generator=g)) * 5
    dep[0, 0, 0, :3] = 500.0  # beyond the far plane: capped
    dep[0, 0, 5, 7] = 0.0  # a gap: interpolated from its raster neighbours
    y = depth.normalize_depth(dep, torch.ones_like(dep, dtype=torch.bool), "official")
    ref = np.minimum(dep.double().numpy().reshape(-1), 120.0)
    i = 5 * 30 + 7
    ref[i] = (ref[i - 1] + ref[i + 1]) / 2
    lo, hi = np.log(np.percentile(ref, (1, 99)))
    want = (np.log(ref) - lo) / (hi - lo) * 2 - 1
    assert np.allclose(y.numpy().reshape(-1), want, atol=1e-6)
    assert y.min() < -1 and y.max() > 1  # not clipped: ~1% of pixels on each side lie beyond
    assert abs((y > 1).double().mean().item() - 0.01) < 0.01
    assert torch.equal(depth.normalize_depth(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=bool), "official"),
                       torch.ones(1, 1, 4, 4))


def test_official_ema_schedule():
    """ema-pytorch with update_after_step 1000, power 3/4 (the official trainer): copy, then 1 - (1 + e)^-3/4."""
    assert [common.ema_decay(n, 0.999, "official") for n in (1, 1001)] == [0.0, 0.0]
    assert math.isclose(common.ema_decay(1002, 0.999, "official"), 1 - 2**-0.75)
    assert common.ema_decay(1001 + 10**4, 0.999, "official") == 0.999
    assert common.ema_decay(1, 0.999) == 2 / 11  # ours unchanged
