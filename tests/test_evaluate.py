"""evaluate.py reproduce --quick (the whole pipeline on tiny settings) and train.py --task pretrain, tiny."""
import json
import os

import pytest
import torch
from PIL import Image

import evaluate
import sd
import synth
import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A few steps of --task pretrain: the same code path as the demo prior, in seconds."""
    out = tmp_path_factory.mktemp("pretrain")
    path = train.main(["--task", "pretrain", "--out", str(out), "--vae-steps", "2", "--steps", "2",
                       "--n-images", "8", "--batch-size", "4"])
    return path


def test_pretrain_writes_a_prior_sample_py_can_use(prior):
    b = sd.load(prior)
    assert (b.objective, b.prediction, b.meta["resolution"]) == ("diffusion", "v", "32")
    assert {"steps", "cfg"} <= set(b.meta)
    assert b.vae.scale_factor != 0.18215 and b.vae.cfg.scale_factor == b.vae.scale_factor  # measured, and saved
    assert os.path.exists(os.path.join(os.path.dirname(prior), "samples", "prior.png"))
    # SD's schedule and the tiny presets, so the rest of the repo treats it like SD
    assert torch.allclose(b.alphas_cumprod.float(), sd.create().alphas_cumprod.float())


def test_pretrain_can_reuse_a_vae(prior, tmp_path):
    vae = os.path.join(os.path.dirname(prior), "vae.safetensors")
    path = train.main(["--task", "pretrain", "--out", str(tmp_path), "--vae", vae, "--steps", "1",
                       "--n-images", "4", "--batch-size", "2"])
    assert sd.load(path).vae.scale_factor == sd.load(vae).vae.scale_factor


def test_short_captions_keep_every_attribute_they_name():
    import random
    rng = random.Random(0)
    full = synth.caption(synth.Attributes("circle", "red", "small", "top left", "blue"))
    seen = {train.vary_caption(full, rng) for _ in range(200)}
    assert seen == {full, "a red circle on a blue background", "a small red circle on a blue background",
                    "a red circle at the top left on a blue background"}


def test_demo_defaults_fill_only_what_is_not_given(tmp_path):
    cfg = train.parse_args(["--task", "pretrain", "--steps", "7"])
    train.fill_defaults(cfg)
    assert (cfg.steps, cfg.resolution, cfg.lr, cfg.batch_size) == (7, 32, 1e-3, 64)
    cfg = train.parse_args(["--ckpt", "x.safetensors"])
    train.fill_defaults(cfg)
    assert (cfg.resolution, cfg.steps, cfg.lr, cfg.ema, cfg.cache) == (512, 1000, 1e-5, 0.9999, False)


def test_reproduce_quick_writes_results_and_plot(prior, tmp_path):
    res = evaluate.main(["reproduce", "--quick", "--prior", prior, "--out", str(tmp_path)])
    assert set(res["runs"]) == {f"{o}-{k}" for o in evaluate.OBJECTIVES for k in ("full", "lora")}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Claims" in text and text.count("reproduce") >= 5  # every claim gets a verdict
    assert Image.open(tmp_path / "results.png").size == (1000, 420)
    # the same measurement of the same model agrees: diffusion and Diff2Flow read the prior identically at step 0
    z = res["zero_shot"]
    assert z["diff2flow (Euler)"]["fm_loss"] == z["DDIM"]["fm_loss"]
    json.dumps(res)  # results.json is plain JSON
    assert len(res["spread"]["mean_fd"]) == 3 and set(res["ddim"]) == {"diffusion-full", "diffusion-lora"}
    # --report re-renders from results.json alone (str keys after JSON), measuring nothing new
    (tmp_path / "RESULTS.md").unlink()
    again = evaluate.main(["reproduce", "--quick", "--prior", prior, "--out", str(tmp_path), "--report"])
    assert again["spread"] == json.loads(json.dumps(res["spread"]))
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- begin finetune -->") == 1


def test_beats_needs_a_margin_beyond_twice_the_seed_spread():
    assert evaluate.beats(10.1, 5.0) == "**reproduces**"
    assert "tie" in evaluate.beats(9.9, 5.0) and "tie" in evaluate.beats(-9.9, 5.0)
    assert evaluate.beats(-10.1, 5.0) == "**does not reproduce**"


@pytest.mark.skipif(not os.path.exists(train.DEMO_PRIOR), reason="needs the demo prior (scripts/make_demo.sh)")
def test_t2i_with_no_arguments_fine_tunes_the_demo_prior_on_synthetic_data(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "DEMO_DATA", dict(n=8, seed=0))
    monkeypatch.setattr(train, "synth_folder", lambda r: str(tmp_path / f"shapes{r}"))
    synth.write_folder(tmp_path / "shapes32", 8, 32)
    cfg = train.parse_args([])
    train.check_config(cfg)
    assert (cfg.ckpt, cfg.resolution, cfg.objective, cfg.cache) == (train.DEMO_PRIOR, 32, "diff2flow", True)
    assert cfg.data == str(tmp_path / "shapes32") and cfg.lr == 2e-4 and cfg.lora == ""
