"""Reproduce the fine-tuning claims of Diff2Flow (arXiv 2506.02221) at toy scale, on CPU; and the command line of
the tiny family's evaluations, each writing its own section of RESULTS.md.

    python toy/evaluate.py reproduce              # RESULTS.md + results.png (the budget: <= 60 min on 2 cores)
    python toy/evaluate.py reproduce --quick      # the same pipeline on tiny settings, ~1 min (tests run it)
    python toy/evaluate.py reproduce --official --checkpoints 100,250 --n-eval 128   # the paper recipes' settings
    python toy/evaluate.py depth --ckpt runs/depth/final.safetensors      # image-to-depth (toy/depth_eval.py)
    python toy/evaluate.py depth --dataset nyuv2 PATH --ckpt ...          # a benchmark (toy/benchmarks.py)
    python toy/evaluate.py reflow --student runs/reflow/final.safetensors  # 2-4 step sampling (toy/reflow_eval.py)
    python toy/evaluate.py t2i --prompts captions_val2017.json --real val2017/ --ckpt ...  # FID, CLIP (toy/t2i_eval.py)

The tiny prior (assets/demo/prior_tiny.safetensors: a v-prediction diffusion model trained at 32 px, playing
SD's role) is fine-tuned to twice its resolution, 64 px, with {diffusion, naive FM, Diff2Flow} x {full, LoRA}
through train.py, all with the same data, steps, learning rate and seeds. Measured (synth.py data, metrics.py):

  FM validation loss   E || v(x_t, t) - (x_1 - x_0) ||^2 on held-out latents, fixed noise and t, every model
                       read as the velocity its sampler integrates (diff2flow.velocity_model), along training
  FD                   Frechet distance of the attribute classifier's features, generated vs held-out real
                       images (FID analogue; lower is better), at several sampling step counts (Euler)
  accuracy             fraction of prompt attributes the classifier finds in the image (CLIP-score analogue)
  floors               the same metrics on real held-out images and on their VAE reconstructions
  zero-shot            the prior sampled as a flow through the Diff2Flow conversion vs DDIM, same step counts
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, unet, ...

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import benchmarks  # noqa: E402
import common  # noqa: E402
import depth  # noqa: E402
import depth_eval  # noqa: E402
import diff2flow  # noqa: E402
import metrics  # noqa: E402
import reflow_eval  # noqa: E402
import sd  # noqa: E402
import sample  # noqa: E402
import synth  # noqa: E402
import t2i_eval  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
OBJECTIVES = ("diffusion", "fm", "diff2flow")
NAMES = {"diffusion": "diffusion", "fm": "naive FM", "diff2flow": "Diff2Flow"}


@dataclass
class Setup:
    prior: str = train.DEMO_PRIOR
    out: str = "runs/reproduce"
    results: str = ROOT  # where RESULTS.md and results.png go
    resolution: int = 64  # the prior's 32 px x 2: the paper's resolution-adaptation setting
    n_train: int = 2048
    checkpoints: tuple = (100, 250, 500)  # training steps where models are measured; the last is the end
    batch_size: int = 32
    lr_full: float = 2e-4
    lr_lora: float = 1e-3  # LoRA's usual 10x (train.py's default ratio)
    lora: str = "base"  # the paper's LoRA: 20% of each layer's width on conv, proj, attn1, attn2
    n_eval: int = 256  # generated and real images per FD / accuracy number
    n_val: int = 256  # held-out latents of the FM validation loss
    sample_steps: tuple = (1, 2, 4, 8)
    cfg: float = 4.0
    classifier_steps: int = 1500
    seed: int = 0
    settings: str = "ours"  # or "official": the paper recipes' settings that do not depend on scale (recipe_args)


# what --official takes from the paper recipes t2i-OBJECTIVE-full/lora (recipes/paper.toml), with their LoRA rule;
# lr, batch, steps and resolution stay the toy's (they depend on the scale)
NON_SCALE = ("optimizer", "weight_decay", "grad_clip", "warmup", "ema", "ema_warmup", "caption_dropout",
             "zero_terminal_snr")
QUICK = dict(out="runs/reproduce-quick", n_train=16, checkpoints=(1, 2), batch_size=4, n_eval=8, n_val=8,
             sample_steps=(1, 2), classifier_steps=20)


# ---------------------------------------------------------------------------------- measurements
# on metrics.held_out's data: validation latents (FM loss), test images and captions (FD, accuracy)


@torch.no_grad()
def fm_val_loss(model, data, seed):
    """FM loss at fixed noise and stratified t (one per item, (k + 0.5) / n): comparable across models."""
    x1 = data["x1"]
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    t = (torch.randperm(len(x1), generator=torch.Generator().manual_seed(seed)) + 0.5) / len(x1)
    return sum(diff2flow.fm_loss(model, x1[i:i + 64], noise[i:i + 64], t[i:i + 64], data["val_ctx"][i:i + 64]).item()
               * len(x1[i:i + 64]) for i in range(0, len(x1), 64)) / len(x1)


@torch.no_grad()
def generate(bundle, model, data, steps, cfg, seed, sampler=diff2flow.sample_euler):
    """One image per test caption, (N, 3, R, R) in [-1, 1]; fixed noise per image."""
    n, f = len(data["test"]), bundle.vae.downsample
    shape = (n, bundle.vae.cfg.embed_dim, data["test"].shape[-2] // f, data["test"].shape[-1] // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    uncond, images = bundle.encode_prompt([""]), []
    for i in range(0, n, 64):
        z = sampler(model, noise[i:i + 64], steps, data["test_ctx"][i:i + 64], uncond, cfg)
        images.append(bundle.vae.decode(z).clamp(-1, 1))
    return torch.cat(images)


def measure(bundle, objective, data, classifier, setup, samples=True, sampler="euler"):
    """FM validation loss, and FD + accuracy at every sampling step count, of one model."""
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, objective)
    out = {"fm_loss": fm_val_loss(model, data, setup.seed)}
    if samples:
        fn = diff2flow.sample_ddim if sampler == "ddim" else diff2flow.sample_euler
        out["samples"] = {}
        for s in setup.sample_steps:
            images = generate(bundle, model, data, s, setup.cfg, setup.seed, fn)
            out["samples"][s] = metrics.image_scores(classifier, images, data)
    return out


def floors(bundle, data, classifier, setup):
    """What no model can beat here: real held-out images (another draw), and the VAE's reconstructions."""
    val, _ = synth.images(synth.VAL_SEED, 0, setup.n_eval, setup.resolution)
    with torch.no_grad():
        recon = bundle.vae.decode(bundle.vae.encode(data["test"])).clamp(-1, 1)
    return {"real": {"fd": metrics.fd_score(classifier, val, data["test"]),
                     "acc": metrics.attribute_accuracy(classifier, data["test"], data["labels"])["mean"]},
            "vae": metrics.image_scores(classifier, recon, data)}


# ---------------------------------------------------------------------------------- runs


def recipe_args(objective, lora):
    """train.py flags for the NON_SCALE values (and the LoRA rule) of the paper recipe of objective x full/LoRA."""
    r, out = train.RECIPES[f"t2i-{objective}-{'lora' if lora else 'full'}"], []
    for k in NON_SCALE:
        flag = "--" + k.replace("_", "-")
        out += ([flag] if r[k] else []) if isinstance(r[k], bool) else [flag, str(r[k])]
    # the official LoRA rule wraps 1x1 proj convs as convs: on the tiny UNet (SD1 layout) that is `base`
    return out + (["--lora", {"official": "base"}.get(r["lora"], r["lora"])] if lora else [])


def run_args(setup, objective, lora, out, data):
    official = recipe_args(objective, lora) if setup.settings == "official" else []  # given last: they win
    return ["--ckpt", setup.prior, "--data", data, "--out", out, "--objective", objective,
            "--resolution", str(setup.resolution), "--batch-size", str(setup.batch_size),
            "--lr", str(setup.lr_lora if lora else setup.lr_full), "--warmup", "20", "--ema", "0.999",
            "--cache", "--workers", "0", "--sample-every", "0", "--save-every", "0", "--seed", str(setup.seed),
            *(["--lora", setup.lora] if lora else []), *official]


def fine_tune(setup, objective, lora, data_dir, data, classifier):
    """train.py to each checkpoint in turn (--resume), measuring the saved EMA model at each."""
    out = os.path.join(setup.out, f"{objective}-{'lora' if lora else 'full'}")
    if os.path.exists(out):  # a fresh run every time: the numbers must come from this setup
        for name in os.listdir(out):  # ckpt.pt, the kept ckpt-STEP.pt, log.jsonl
            if name == "log.jsonl" or (name.startswith("ckpt") and name.endswith(".pt")):
                os.remove(os.path.join(out, name))
    curve, t0 = {}, time.time()
    for i, steps in enumerate(setup.checkpoints):
        final = train.main(run_args(setup, objective, lora, out, data_dir) + ["--steps", str(steps)]
                           + (["--resume"] if i else []))
        last = steps == setup.checkpoints[-1]
        curve[steps] = measure(sd.load(final), objective, data, classifier, setup, samples=last)
    return {"curve": curve, "minutes": (time.time() - t0) / 60}


def seed_spread(setup, data, classifier, res, name="diff2flow-full", extra=2):
    """Run-to-run spread of the mean FD: the same fine-tuned model sampled from `extra` other noise seeds.
    Differences between models smaller than about twice its std are not resolved by this setup."""
    bundle = sd.load(os.path.join(setup.out, name, "final.safetensors"))
    fds = [mean_fd(final(res, name))]
    for k in range(1, extra + 1):
        other = dataclasses.replace(setup, seed=setup.seed + k)
        fds.append(mean_fd(measure(bundle, name.split("-")[0], data, classifier, other)))
    return {"model": name, "mean_fd": fds, "std": statistics.stdev(fds)}


def reproduce(setup, report_only=False):
    """Fine-tune and measure everything (report_only: re-measure only what OUT/results.json lacks, e.g. the
    seed spread), then write OUT/results.json, RESULTS.md (section "finetune") and results.png."""
    t0 = time.time()
    torch.set_num_threads(1)  # see train.py --threads
    os.makedirs(setup.out, exist_ok=True)
    classifier = metrics.cached_classifier(setup.out, setup.classifier_steps)
    prior = sd.load(setup.prior)
    data = metrics.held_out(prior, setup.resolution, setup.n_eval, setup.n_val)
    if report_only:
        with open(os.path.join(setup.out, "results.json")) as f:
            res = json.load(f)
    else:
        res = train_and_measure(setup, prior, data, classifier)
        res["minutes"] = (time.time() - t0) / 60
    if "spread" not in res:
        res["spread"] = seed_spread(setup, data, classifier, res)
    for kind in ("full", "lora"):  # diffusion fine-tuning with its own sampler too, as the paper's baseline
        name = f"diffusion-{kind}"
        if name not in res.setdefault("ddim", {}):
            bundle = sd.load(os.path.join(setup.out, name, "final.safetensors"))
            res["ddim"][name] = measure(bundle, "diffusion", data, classifier, setup, sampler="ddim")
    save_json(res, os.path.join(setup.out, "results.json"))
    res = json.loads(json.dumps(res))  # one key type (str) whether measured now or read back
    suffix = "" if setup.settings == "ours" else "-" + setup.settings  # its own section and plot
    plot(res, os.path.join(setup.results, f"results{suffix}.png"))
    metrics.update_results(os.path.join(setup.results, "RESULTS.md"), "finetune" + suffix, report(res))
    return res


def save_json(obj, path):
    with common.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def train_and_measure(setup, prior, data, classifier):
    data_dir = common.written_once(os.path.join(setup.out, f"data-{setup.resolution}px-n{setup.n_train}"),
                                   lambda p: synth.write_folder(p, setup.n_train, setup.resolution, synth.TRAIN_SEED))
    res = {"setup": dataclasses.asdict(setup), "floors": floors(prior, data, classifier, setup),
           "zero_shot": {"diff2flow (Euler)": measure(prior, "diffusion", data, classifier, setup),
                         "DDIM": measure(prior, "diffusion", data, classifier, setup, sampler="ddim"),
                         "naive FM reading": measure(prior, "fm", data, classifier, setup)}, "runs": {}}
    for lora in (False, True):
        for objective in OBJECTIVES:
            name = f"{objective}-{'lora' if lora else 'full'}"
            print(f"== {name}")
            res["runs"][name] = fine_tune(setup, objective, lora, data_dir, data, classifier)
    return res


# ---------------------------------------------------------------------------------- report


def final(res, name):
    """The last checkpoint's measurements of a run."""
    curve = res["runs"][name]["curve"]
    return curve[max(curve, key=int)]


def mean_fd(m):
    return sum(s["fd"] for s in m["samples"].values()) / len(m["samples"])


def verdict(ok):
    return "**reproduces**" if ok else "**does not reproduce**"


def beats(margin, spread):
    """Verdict on an FD margin (baseline - Diff2Flow) given the run-to-run spread (std) of the mean FD."""
    if margin > 2 * spread:
        return verdict(True)
    return verdict(False) + (" (a tie within 2x the seed spread)" if margin > -2 * spread else "")


def claims(res):
    """The paper's claims, each checked against our numbers: (claim, verdict, evidence)."""
    out, margins, spread = [], {}, res["spread"]["std"]
    for kind in ("full", "lora"):
        runs = {o: final(res, f"{o}-{kind}") for o in OBJECTIVES}
        fd = {o: mean_fd(m) for o, m in runs.items()}
        for base in ("fm", "diffusion"):
            margins[kind, base] = fd[base] - fd["diff2flow"]
            out.append((f"Diff2Flow beats {NAMES[base]} fine-tuning ({kind})", beats(margins[kind, base], spread),
                        f"mean FD over sampling step counts: {NAMES[base]} {fd[base]:.1f}, Diff2Flow "
                        f"{fd['diff2flow']:.1f} (seed spread: std {spread:.1f}); FM val loss "
                        f"{runs[base]['fm_loss']:.3f} vs {runs['diff2flow']['fm_loss']:.3f}"))
        if f"diffusion-{kind}" in res.get("ddim", {}):
            ddim = mean_fd(res["ddim"][f"diffusion-{kind}"])
            out.append((f"Diff2Flow beats diffusion fine-tuning sampled with DDIM ({kind})",
                        beats(ddim - fd["diff2flow"], spread),
                        f"mean FD: diffusion + DDIM {ddim:.1f}, Diff2Flow {fd['diff2flow']:.1f}"))
    for base in ("fm", "diffusion"):
        lo, fu = margins["lora", base], margins["full", base]
        out.append((f"... most clearly under LoRA (vs {NAMES[base]})", verdict(lo > fu + 2 * spread and lo > 0),
                    f"FD margin of Diff2Flow: LoRA {lo:.1f}, full {fu:.1f}"))
    z = res["zero_shot"]
    good, broken = z["diff2flow (Euler)"]["fm_loss"], z["naive FM reading"]["fm_loss"]
    fd_good, fd_broken = mean_fd(z["diff2flow (Euler)"]), mean_fd(z["naive FM reading"])
    out.append(("Diff2Flow starts from a good model, naive FM from a broken one",
                verdict(good < broken and fd_good < fd_broken),
                f"at step 0, FM validation loss {good:.3f} (Diff2Flow) vs {broken:.3f} (naive FM); "
                f"mean FD {fd_good:.1f} vs {fd_broken:.1f}"))
    flow, ddim = mean_fd(z["diff2flow (Euler)"]), mean_fd(z["DDIM"])
    out.append(("Zero-shot, the prior sampled as a flow (Diff2Flow conversion, Euler) is as good as DDIM",
                verdict(flow <= 1.1 * ddim), f"mean FD {flow:.1f} (flow) vs {ddim:.1f} (DDIM)"))
    return out


def sample_table(rows, steps):
    head = "| model | FM val loss | " + " | ".join(f"FD / acc @{s}" for s in steps) + " |"
    lines = [head, "|" + "---|" * (2 + len(steps))]
    for name, m in rows:
        cells = [f"{m['samples'][s]['fd']:.1f} / {m['samples'][s]['acc']:.2f}" for s in steps]
        lines.append(f"| {name} | {m['fm_loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(res):
    s = res["setup"]
    steps = [k for k in res["zero_shot"]["DDIM"]["samples"]]
    ckpts = [str(c) for c in s["checkpoints"]]
    fl = res["floors"]
    official = s.get("settings", "ours") == "official"
    md = ["## Diff2Flow fine-tuning claims at toy scale" + (", the paper recipes' settings" if official else "") + "\n",
          (f"With the official non-scale settings of the paper recipes t2i-*-full/lora (`--official`: "
           f"{' '.join(recipe_args('diff2flow', True))}; no zero terminal SNR for diffusion and naive FM), "
           f"{len(s['checkpoints'])} checkpoints, {s['n_eval']} evaluation images. " if official else "") +
          f"Written by `python toy/evaluate.py reproduce` in {res['minutes']:.0f} min (CPU). The tiny prior "
          f"(`{os.path.relpath(s['prior'], ROOT)}`, v-prediction diffusion trained at 32 px) fine-tuned to "
          f"{s['resolution']} px on {s['n_train']} synthetic images, {s['checkpoints'][-1]} steps of batch "
          f"{s['batch_size']}, lr {s['lr_full']} full / {s['lr_lora']} LoRA (`--lora {s['lora']}`), seed {s['seed']}, "
          f"EMA 0.999. Images are sampled with Euler on each model's velocity (diffusion models through the "
          f"Diff2Flow conversion), CFG {s['cfg']}, {s['n_eval']} held-out test captions. FD: Frechet distance of "
          f"the attribute classifier's features against the {s['n_eval']} real test images (lower is better); "
          f"acc: prompt attributes recognised (higher is better); FM val loss on {s['n_val']} held-out latents.\n",
          "Read the diffusion rows with care: a diffusion fine-tune sampled through the Diff2Flow conversion is "
          "already a flow model (the paper's zero-shot use), so \"diffusion\" vs \"Diff2Flow\" compares two ways "
          "of training the same velocity model; the DDIM rows sample the diffusion fine-tunes as diffusion models.\n",
          "### Claims\n", "| paper's claim | here | numbers |", "|---|---|---|"]
    md += [f"| {c} | {v} | {e} |" for c, v, e in claims(res)]
    sp = res["spread"]
    md += [f"\nSeed spread: {NAMES[sp['model'].split('-')[0]]} ({sp['model'].split('-')[1]}) sampled from "
           f"{len(sp['mean_fd'])} noise seeds: mean FD " + ", ".join(f"{v:.1f}" for v in sp["mean_fd"]) +
           f" (std {sp['std']:.1f}); a margin under 2x the std is a tie.\n"]
    md += ["\n### Floors\n", f"Real held-out images (validation vs test): FD {fl['real']['fd']:.1f}, "
           f"acc {fl['real']['acc']:.2f}. VAE reconstructions of the test images: FD {fl['vae']['fd']:.1f}, "
           f"acc {fl['vae']['acc']:.2f}.\n", "### Zero-shot: the prior at 64 px before fine-tuning\n",
           sample_table([(k, v) for k, v in res["zero_shot"].items()], steps),
           "\n### After fine-tuning\n",
           sample_table([(f"{NAMES[n.split('-')[0]]} ({n.split('-')[1]})", final(res, n)) for n in res["runs"]]
                        + [(f"diffusion ({n.split('-')[1]}), DDIM", m) for n, m in res["ddim"].items()], steps),
           "\n### FM validation loss along fine-tuning\n",
           "| run | step 0 | " + " | ".join(ckpts) + " | minutes |", "|" + "---|" * (3 + len(ckpts))]
    for name, run in res["runs"].items():
        start = res["zero_shot"]["naive FM reading" if name.startswith("fm-") else "diff2flow (Euler)"]["fm_loss"]
        md.append(f"| {name} | {start:.3f} | " + " | ".join(f"{run['curve'][c]['fm_loss']:.3f}" for c in
                                                             run["curve"]) + f" | {run['minutes']:.1f} |")
    png = "results.png" if not official else "results-official.png"
    md.append(f"\nPlot: `{png}` (left: FD vs sampling steps after fine-tuning; right: FM validation loss "
              f"along fine-tuning). Raw numbers: `{s.get('out', 'runs/reproduce')}/results.json`.\n")
    return "\n".join(md)


# ---------------------------------------------------------------------------------- plot (PIL only)

COLORS = {"diffusion": (31, 119, 180), "fm": (214, 39, 40), "diff2flow": (44, 160, 44), "DDIM": (127, 127, 127)}


def chart(draw, box, series, title, xlabel, logy=False):
    """Line chart in box (x0, y0, x1, y1): series = [(label, color, dashed, [(x, y), ...])]; x on a log2 axis."""
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + 50, y0 + 25, x1 - 10, y1 - 35
    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts]
    fy = (lambda v: math.log10(max(v, 1e-9))) if logy else (lambda v: v)
    lx = lambda v: math.log2(max(v, 0.5))
    xmin, xmax, ymin, ymax = lx(min(xs)), lx(max(xs)), fy(min(ys)), fy(max(ys))
    xmax, ymax = max(xmax, xmin + 1e-9), max(ymax, ymin + 1e-9)
    X = lambda v: px0 + (lx(v) - xmin) / (xmax - xmin) * (px1 - px0)
    Y = lambda v: py1 - (fy(v) - ymin) / (ymax - ymin) * (py1 - py0)
    draw.rectangle((px0, py0, px1, py1), outline=(0, 0, 0))
    draw.text((px0, y0 + 5), title, fill=(0, 0, 0))
    draw.text(((px0 + px1) // 2 - 30, y1 - 15), xlabel, fill=(0, 0, 0))
    for x in sorted(set(xs)):
        draw.text((X(x) - 4, py1 + 4), str(x), fill=(0, 0, 0))
    for k in range(5):
        v = ymin + (ymax - ymin) * k / 4
        draw.text((x0 + 2, py1 - (py1 - py0) * k / 4 - 5), f"{10 ** v if logy else v:.3g}", fill=(0, 0, 0))
    for i, (label, color, dashed, pts) in enumerate(series):
        pts = [(X(x), Y(y)) for x, y in sorted(pts)]
        for a, b in zip(pts, pts[1:]):
            draw.line((*a, *b), fill=color, width=1 if dashed else 3)
        for x, y in pts:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        ly = py0 + 8 + 14 * i
        draw.line((px1 - 150, ly + 5, px1 - 130, ly + 5), fill=color, width=1 if dashed else 3)
        draw.text((px1 - 125, ly), label, fill=(0, 0, 0))


def plot(res, path):
    img = Image.new("RGB", (1000, 420), "white")
    draw = ImageDraw.Draw(img)
    fd, loss = [], []
    for name, run in res["runs"].items():
        objective, kind = name.split("-")
        label, color, dashed = f"{NAMES[objective]} {kind}", COLORS[objective], kind == "lora"
        fd.append((label, color, dashed, [(int(s), v["fd"]) for s, v in final(res, name)["samples"].items()]))
        loss.append((label, color, dashed, [(int(c), m["fm_loss"]) for c, m in run["curve"].items()]))
    fd.append(("prior, DDIM", COLORS["DDIM"], True,
               [(int(s), v["fd"]) for s, v in res["zero_shot"]["DDIM"]["samples"].items()]))
    chart(draw, (0, 0, 500, 420), fd, "FD after fine-tuning (lower is better)", "sampling steps", logy=True)
    chart(draw, (500, 0, 1000, 420), loss, "FM validation loss", "fine-tuning steps", logy=True)
    img.save(path)


# ---------------------------------------------------------------------------------- command line


def add_reproduce(sub):
    p = sub.add_parser("reproduce", help="the fine-tuning claims: RESULTS.md + results.png",
                       description="Fine-tune the tiny prior with diffusion, naive FM and Diff2Flow (full and LoRA) "
                       "and check the paper's claims: RESULTS.md section 'finetune' and results.png.")
    p.add_argument("--quick", action="store_true", help="tiny settings (a minute): checks the pipeline, not the claims")
    p.add_argument("--prior", default=train.DEMO_PRIOR, help="the diffusion model to fine-tune (tiny family) "
                   f"(default: {os.path.relpath(train.DEMO_PRIOR, ROOT)})")
    p.add_argument("--out", help="work folder (default: runs/reproduce, or runs/reproduce-quick)")
    p.add_argument("--results", help="folder for RESULTS.md and results.png (default: the repository root; "
                   "--quick: the work folder)")
    p.add_argument("--official", action="store_true", help="the paper recipes' non-scale settings (optimizer, EMA, "
                   "caption dropout, zero terminal SNR, LoRA rule): RESULTS.md section 'finetune-official'")
    p.add_argument("--checkpoints", help="comma-separated training steps to measure at, the last is the end "
                   "(default: 100,250,500)")
    p.add_argument("--n-eval", type=int, help="generated and real images per FD number (and validation latents) "
                   "(default: 256)")
    p.add_argument("--report", action="store_true", help="no training: re-write RESULTS.md and results.png from "
                   "OUT/results.json, measuring only what it lacks")
    p.set_defaults(run=run_reproduce)


def run_reproduce(a):
    setup = Setup(prior=os.path.abspath(a.prior), **(QUICK if a.quick else {}),
                  **({"settings": "official"} if a.official else {}),
                  **({"checkpoints": tuple(int(c) for c in a.checkpoints.split(","))} if a.checkpoints else {}),
                  **({"n_eval": a.n_eval, "n_val": a.n_eval} if a.n_eval else {}))
    setup.out = a.out or setup.out
    setup.results = a.results or (setup.out if a.quick else setup.results)
    res = reproduce(setup, a.report)
    print(f"wrote {os.path.join(setup.results, 'RESULTS.md')} ({res['minutes']:.1f} min)")
    return res


def add_depth(sub):
    p = sub.add_parser("depth", help="image-to-depth models on a pair folder or a benchmark (NYUv2, KITTI, ETH3D, "
                       "ScanNet, DIODE): AbsRel, delta1 (depth.py)",
                       description="Marigold's protocol: least-squares scale-and-shift alignment on the valid pixels "
                       "(in log depth: the models predict affine-invariant log depth; depth-space alignment is "
                       "reported beside it), clipped to the dataset's depth range. Every --ckpt x --steps x "
                       "--ensemble; on a pair folder also each model's VAE floor (decode(encode(ground truth))). "
                       "With PATH: the benchmark --dataset in Marigold's layout (toy/benchmarks.py, README).")
    p.add_argument("path", nargs="?", metavar="PATH", help="a benchmark's folder or Marigold's tar of it (with "
                   "--dataset " + "|".join(benchmarks.BENCHMARKS) + ")")
    p.add_argument("--data", action="append", help="pair folder, rgb/ + depth/; repeat for several (default: the "
                   "three held-out sets, written once to runs/data/: 128 scenes.py rooms and 128 streets.py streets of "
                   "seed 10001, and 128 scenes of toy/rooms_sdf.py, the renderer no model trains on)")
    p.add_argument("--ckpt", action="append", help="depth model(s); repeat to compare "
                   f"(default: the bundled demo, {os.path.relpath(depth.DEMO, ROOT)})")
    p.add_argument("--steps", type=int, nargs="+", help="Euler step counts (default: 1 2 4 10; a benchmark: 10)")
    p.add_argument("--ensemble", type=int, nargs="+", help="ensemble sizes (default: 1 4; a benchmark: 4)")
    p.add_argument("--n", type=int, help="only the first N pairs (default: all)")
    p.add_argument("--dataset", choices=list(depth.DEPTH_RANGES) + [b for b in benchmarks.BENCHMARKS
                                                                   if b not in depth.DEPTH_RANGES],
                   default="scenes", help="with PATH: the benchmark; else the pair folder's [min, max] evaluation "
                   "depth range in metres: " + ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in
                                                         depth.DEPTH_RANGES.items()) + " (default: %(default)s)")
    p.add_argument("--split", help="with PATH: the benchmark's file list (default: Marigold's, "
                   "assets/depth_splits/DATASET.txt)")
    p.add_argument("--processing-res", type=int, help="pixels of the longer side the models run at, 0 = the "
                   "image's own (default: a benchmark 512, the paper's 384x512; else each model's training resolution)")
    p.add_argument("--seed", type=int, default=0, help="pair i uses noise seed + i (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--baseline", metavar="DIR", help="also score the mean normalised depth map of this pair folder "
                   "(e.g. the training data) as a prediction: what a model learns that ignores the image")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--results", help="also write the summary as the 'depth' (a benchmark: 'depth-DATASET') section "
                   "of this RESULTS.md")
    p.add_argument("--section", default="depth", help="with --results and a pair folder: the section's name "
                   "(default: %(default)s; toy/make_depth_demo.sh writes the demo's as depth-demo)")
    p.set_defaults(run=run_depth)


def run_depth(a):
    if a.path:
        return run_benchmark(a)
    a.steps, a.ensemble = a.steps or [1, 2, 4, 10], a.ensemble or [1, 4]
    if min(a.steps + a.ensemble) < 1 or (a.n is not None and a.n < 1):
        common.usage_error("--steps, --ensemble and --n must be >= 1")
    if a.dataset not in depth.DEPTH_RANGES:
        common.usage_error(f"--dataset {a.dataset} is a benchmark: give its folder, evaluate.py depth --dataset "
                           f"{a.dataset} PATH")
    torch.set_num_threads(1)  # the tiny models: one thread is fastest on a busy CPU (see train.py --threads)
    ckpts = a.ckpt or [depth.DEMO]
    data = a.data or [depth_eval.heldout_scenes(), depth_eval.heldout_streets(), depth_eval.unseen_scenes()]
    try:
        rows = depth_eval.evaluate_models(ckpts, data, a.steps, a.ensemble, a.n, depth.DEPTH_RANGES[a.dataset],
                                          a.processing_res, a.seed, a.baseline, a.device)
    except depth.DepthError as e:
        common.fail(str(e))
    print(depth_eval.markdown_table(rows))
    if a.results:
        command = "python toy/evaluate.py depth " + " ".join(f"--ckpt {os.path.relpath(c)}" for c in ckpts)
        metrics.update_results(a.results, a.section, depth_eval.results_section(rows, command, data))
    if a.json:
        save_json(rows, a.json)
    return rows


def run_benchmark(a, predictor=None):
    """evaluate.py depth --dataset NAME PATH: every --ckpt x steps x ensemble on the benchmark (toy/benchmarks.py).
    predictor (tests): (i, image) -> prediction, instead of the models."""
    a.steps, a.ensemble = a.steps or [10], a.ensemble or [4]  # the paper's
    res = 512 if a.processing_res is None else a.processing_res
    if min(a.steps + a.ensemble) < 1 or (a.n is not None and a.n < 1) or res < 0:
        common.usage_error("--steps, --ensemble and --n must be >= 1, --processing-res >= 0")
    if a.dataset not in benchmarks.BENCHMARKS or a.data or a.baseline:
        common.usage_error(f"PATH is a benchmark's folder: --dataset {'|'.join(benchmarks.BENCHMARKS)}, and no "
                           "--data or --baseline (those are for pair folders)")
    rows = []
    try:
        ds = benchmarks.BenchmarkDataset(a.dataset, a.path, a.split)
        for ckpt in ([None] if predictor else a.ckpt or [depth.DEMO]):
            bundle = depth.load_model(ckpt, a.device) if ckpt else None
            for s, e in ((s, e) for s in a.steps for e in a.ensemble):
                fn = predictor or benchmarks.model_predictor(bundle, s, e, a.seed, res)
                m = benchmarks.evaluate(ds, fn, a.n, f"{a.dataset} steps {s} ens {e}")
                rows.append({"model": bundle.name if bundle else "predictor", "dataset": a.dataset, "steps": s,
                             "ensemble": e, "processing_res": res, **m})
                print(benchmarks.markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    except depth.DepthError as e:
        common.fail(str(e))
    print(benchmarks.markdown_table(rows))
    if a.results:
        metrics.update_results(a.results, f"depth-{a.dataset}", f"## Depth: {a.dataset}\n\n`python toy/evaluate.py "
                               f"depth --dataset {a.dataset} {a.path}`, processing resolution {res}: per-image "
                               f"metrics, aligned in log depth and in depth (Marigold's).\n\n"
                               + benchmarks.markdown_table(rows))
    if a.json:
        save_json(rows, a.json)
    return rows


def add_reflow(sub):
    p = sub.add_parser("reflow", help="teacher vs reflowed student at 1-8 steps: RESULTS.md section 'reflow'",
                       description=reflow_eval.__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=reflow_eval.DEMO_TEACHER, help="sampled with its metadata's CFG "
                   f"(default: {os.path.relpath(reflow_eval.DEMO_TEACHER, ROOT)})")
    p.add_argument("--student", default="runs/reflow/final.safetensors",
                   help="sampled with its metadata's CFG, 1 for a reflowed model (default: %(default)s)")
    p.add_argument("--n", type=int, default=512, help="held-out test captions, one image each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, and seed + 1, seed + 2 for the spread "
                   "(default: %(default)s)")
    p.add_argument("--results", default=os.path.join(ROOT, "RESULTS.md"), help="markdown file of the section "
                   "(default: the repository's RESULTS.md)")
    p.add_argument("--raw", default="runs/reflow/eval.json", help="the numbers as JSON (default: %(default)s)")
    p.add_argument("--classifier-dir", default="runs/reproduce", help="where the metric classifier is (or is "
                   "trained once), shared with reproduce (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see train.py --threads) "
                   "(default: %(default)s)")
    p.add_argument("--prior", default=os.path.join(ROOT, "assets", "demo", "prior_tiny.safetensors"),
                   help="also the attribute accuracies of this model at its own resolution, 4 and 25 steps, '' for "
                   "none (default: the demo prior, assets/demo/prior_tiny.safetensors)")
    p.set_defaults(run=run_reflow)


def run_reflow(a):
    if a.n < 1 or a.threads < 1:
        common.usage_error("--n and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    try:
        res = reflow_eval.evaluate_reflow(a.teacher, a.student, a.n, seed=a.seed, results=a.results,
                                          classifier_dir=a.classifier_dir, prior=a.prior or None)
    except sd.LoadError as e:
        common.fail(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(a.raw)), exist_ok=True)
    save_json(res, a.raw)
    print(f"wrote the 'reflow' section of {a.results}; raw numbers: {a.raw}")
    return res


def add_t2i(sub):
    p = sub.add_parser("t2i", help="FID and CLIP score of one sample per caption (COCO), resumable, torchrun-sharded",
                       description=t2i_eval.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="captions.txt (one per line) or COCO's captions_*.json")
    p.add_argument("--real", help="folder of the real images FID compares with (e.g. COCO val2017/)")
    p.add_argument("--ckpt", help="checkpoint, diffusers folder or cached repo id (default: the tiny demo)")
    p.add_argument("--lora", metavar="FILE", help="a LoRA .safetensors merged into --ckpt's UNet")
    p.add_argument("--prediction", choices=["eps", "v"], help="override eps/v for original files that do not say")
    p.add_argument("--zero-terminal-snr", action="store_true", help="rescale the schedule to zero terminal SNR "
                   "(for a model trained so that does not record it: sample.py's flag)")
    p.add_argument("--n", type=int, help="only the first N captions (default: all)")
    p.add_argument("--steps", type=int, help="ODE steps (default: metadata 'steps', else 25)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: metadata 'cfg', else 7.5)")
    p.add_argument("--sampler", choices=list(sample.SAMPLERS), default="euler", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="caption i uses noise seed + i (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="images per UNet batch (default: %(default)s)")
    p.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--out", default="runs/t2i-eval", help="images/, real_features.pt, metrics.json (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=list(sample.DTYPES), help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--inception", metavar="FILE", help=f"{t2i_eval.INCEPTION} (default: clean-fid's place for it, "
                   "the temp folder)")
    p.add_argument("--clip", default=t2i_eval.DEFAULT_CLIP, help="CLIP folder or cached repo id "
                   "(default: %(default)s)")
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    p.set_defaults(run=run_t2i)


def run_t2i(a):
    if min(a.n or 1, a.batch, a.steps or 1) < 1:
        common.usage_error("--n, --batch and --steps must be >= 1")
    if not a.real and not a.no_fid:
        common.usage_error("FID needs --real DIR (the real images, e.g. COCO val2017/), or pass --no-fid")
    return t2i_eval.evaluate(a)


COMMANDS = [add_reproduce, add_depth, add_reflow, add_t2i]  # each adds its subcommand: evaluate.py reproduce | ...


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    return a.run(a)


if __name__ == "__main__":
    common.one_line_warnings()
    main()
