"""toy/evaluate.py reproduce --quick (the whole pipeline on tiny settings), toy/pretrain.py tiny, and the
command lines' help."""
import argparse
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import pretrain
import sd
import synth
import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--vae-steps", "2", "--steps", "2", "--n-images", "8", "--batch-size", "4"]


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A few steps of toy/pretrain.py: the same code path as the demo prior, in seconds."""
    out = tmp_path_factory.mktemp("pretrain")
    return pretrain.main(["--out", str(out), *TINY])


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
    path = pretrain.main(["--out", str(tmp_path), "--vae", vae, "--steps", "1", "--n-images", "4",
                          "--batch-size", "2"])
    assert sd.load(path).vae.scale_factor == sd.load(vae).vae.scale_factor
    assert not (tmp_path / "vae.safetensors").exists()  # stage 1 skipped


def test_pretrain_is_deterministic(prior, tmp_path):
    """The same seed gives the same weights, log and samples: the demo prior can be rebuilt exactly."""
    again = pretrain.main(["--out", str(tmp_path), *TINY])
    a, b = load_file(prior), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("log.jsonl", os.path.join("samples", "prior.png")):
        with open(os.path.join(os.path.dirname(prior), name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), name


def test_pretrain_defaults_and_errors(tmp_path):
    cfg = pretrain.parser().parse_args(["--steps", "7"])
    assert (cfg.steps, cfg.resolution, cfg.lr, cfg.batch_size, cfg.out) == (7, 32, 1e-3, 64, "runs/pretrain")
    assert (cfg.vae_steps, cfg.n_images, cfg.ema, cfg.warmup, cfg.caption_dropout) == (700, 16384, 0.999, 100, 0.1)
    for args, status, match in [(["--resolution", "12"], 2, "multiple of 8"), (["--steps", "0"], 2, "--steps must"),
                                (["--ema", "1"], 2, "--ema < 1"),
                                (["--vae", str(tmp_path / "none.safetensors")], 1, "no such file")]:
        with pytest.raises(SystemExit, match=match) as e:
            pretrain.main(["--out", str(tmp_path / "out"), *args])
        assert e.value.code == status
    assert not (tmp_path / "out").exists(), "checked before anything is written"


def help_of(p):
    """(option, its help as --help prints it, its default) of a parser and of its subcommands' parsers."""
    out = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            out += [o for sub in a.choices.values() for o in help_of(sub)]
        elif a.help and a.option_strings and a.help != argparse.SUPPRESS:
            out.append((f"{p.prog} {a.option_strings[0]}", p._get_formatter()._expand_help(a), a.default))
    return out


@pytest.mark.parametrize("parser", [evaluate.parser, pretrain.parser], ids=["evaluate", "pretrain"])
def test_help_shows_each_default_once(parser):
    """Every option with a default (other than off) names it in its help exactly once, none says None."""
    options = help_of(parser())
    assert len(options) > 10
    for name, text, default in options:
        assert "None" not in text and text.count("default") <= 1, (name, text)
        if default not in (None, False, "", argparse.SUPPRESS):
            assert text.count("(default: ") == 1, (name, text)


def test_sd_defaults_fill_only_what_is_not_given(tmp_path):
    cfg = train.parse_args(["--ckpt", "x.safetensors", "--data", str(tmp_path), "--steps", "7"])
    train.check_config(cfg)
    assert cfg.preset == "t2i" and (cfg.resolution, cfg.lr, cfg.ema, cfg.cache) == (512, 1e-5, 0.9999, False)
    assert cfg.steps == 7  # the flag wins over the preset's 1000


def test_reproduce_quick_writes_results_and_plot(prior, tmp_path):
    res = evaluate.main(["reproduce", "--quick", "--prior", prior, "--out", str(tmp_path)])
    assert set(res["runs"]) == {f"{o}-{k}" for o in evaluate.OBJECTIVES for k in ("full", "lora")}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Claims" in text and claim_verdicts(text).keys() == set(CLAIMS)  # every claim gets one verdict
    assert set(claim_verdicts(text).values()) <= VERDICTS
    assert Image.open(tmp_path / "results.png").size == (1000, 420)
    # the zero-shot Euler and DDIM rows measure the same prior and differ only in the sampler: it changes the
    # samples (and their scores), not the FM loss, which no sampler enters; the naive FM reading is another model.
    # (At one step both return the prior's data estimate from pure noise, equal up to rounding: compared from 2.)
    z = res["zero_shot"]
    assert z["diff2flow (Euler)"]["fm_loss"] == z["DDIM"]["fm_loss"] != z["naive FM reading"]["fm_loss"]
    more = [s for s in z["DDIM"]["samples"] if int(s) > 1]
    assert more and all(z["diff2flow (Euler)"]["samples"][s]["fd"] != z["DDIM"]["samples"][s]["fd"] for s in more)
    json.dumps(res)  # results.json is plain JSON
    assert len(res["spread"]["mean_fd"]) == 3 and set(res["ddim"]) == {"diffusion-full", "diffusion-lora"}
    # --report re-renders from results.json alone (str keys after JSON), measuring nothing new
    (tmp_path / "RESULTS.md").unlink()
    again = evaluate.main(["reproduce", "--quick", "--prior", prior, "--out", str(tmp_path), "--report"])
    assert again["spread"] == json.loads(json.dumps(res["spread"]))
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- begin finetune -->") == 1


CLAIMS = [f"Diff2Flow beats {base} fine-tuning ({kind})" for kind in ("full", "lora")
          for base in ("naive FM", "diffusion")] + \
    [f"Diff2Flow beats diffusion fine-tuning sampled with DDIM ({kind})" for kind in ("full", "lora")] + \
    [f"... most clearly under LoRA (vs {base})" for base in ("naive FM", "diffusion")] + \
    ["Diff2Flow starts from a good model, naive FM from a broken one",
     "Zero-shot, the prior sampled as a flow (Diff2Flow conversion, Euler) is as good as DDIM"]
VERDICTS = {"**reproduces**", "**does not reproduce**", "**does not reproduce** (a tie within 2x the seed spread)"}


def claim_verdicts(text):
    """claim -> verdict of the Claims table (each claim once)."""
    table = text.split("### Claims\n", 1)[1].strip("\n").split("\n\n", 1)[0]  # up to the next blank line
    rows = [line.split(" | ") for line in table.splitlines()[2:]]  # below the header and the |---| line
    out = {cells[0].removeprefix("| "): cells[1] for cells in rows}
    assert len(out) == len(rows), "a claim twice"
    return out


def test_beats_needs_a_margin_beyond_twice_the_seed_spread():
    assert evaluate.beats(10.1, 5.0) == "**reproduces**"
    assert "tie" in evaluate.beats(9.9, 5.0) and "tie" in evaluate.beats(-9.9, 5.0)
    assert evaluate.beats(-10.1, 5.0) == "**does not reproduce**"


@pytest.mark.skipif(not os.path.exists(train.DEMO_PRIOR), reason="needs the demo prior (toy/make_demo.sh)")
def test_t2i_with_no_arguments_fine_tunes_the_demo_prior_on_synthetic_data(monkeypatch, tmp_path):
    """The t2i-demo preset: the prior's resolution, and its data made once by toy/synth.py's own writer, the
    same files as synth.write_folder (items 0..n-1 of the training stream, seed 0)."""
    monkeypatch.setattr(data, "DEMO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data, "N_DEMO", 8)
    cfg = train.parse_args([])
    _, makes = train.check_config(cfg)
    assert (cfg.ckpt, cfg.resolution, cfg.objective, cfg.cache) == (train.DEMO_PRIOR, 32, "diff2flow", True)
    assert cfg.data == str(tmp_path / "data" / "shapes-32px-seed0-n8") and cfg.lr == 2e-4 and cfg.lora == ""
    assert not os.path.exists(cfg.data) and len(makes) == 1  # made only once the model is checked
    makes[0]()
    synth.write_folder(tmp_path / "reference", 8, 32, seed=0)
    for name in sorted(os.listdir(tmp_path / "reference")):
        assert (tmp_path / "reference" / name).read_bytes() == open(os.path.join(cfg.data, name), "rb").read(), name
    assert os.path.exists(os.path.join(cfg.data, "done"))
