"""Reflow (Liu et al. 2023, "Flow Straight and Fast"), as Diff2Flow (arXiv 2506.02221) applies it: distil a
teacher's guided ODE into a 1-rectified flow whose paths are nearly straight, so that 2-4 Euler steps suffice.

    python train.py --task reflow        # the demo: pairs of assets/demo/d2f_tiny, then a LoRA (15 min, 1 core)
    python train.py --task reflow --ckpt v1-5-pruned-emaonly.safetensors --prompts prompts.txt   # SD: LoRA small
    python sample.py --ckpt runs/reflow/final.safetensors --prompt "a red circle on a blue background"  # 4 steps
    python reflow.py pairs --out runs/reflow/pairs              # step one alone (train.py --task reflow does it)
    python reflow.py evaluate --student runs/reflow/final.safetensors    # RESULTS.md section "reflow"

Step one, pairs. For a prompt c and noise x_0, integrate the teacher's ODE dx/dt = v(x, t, c) with classifier-free
guidance (default: the teacher's metadata 'cfg', else SD's 7.5) for 40 Euler steps to x_1. Prompts: synth.py
captions (the demo's default, or --prompts synth; each drops its size / position phrase with probability 0.3,
like the prior's training) or lines of a --prompts file drawn at random. Stored in shards of `shard_size` pairs,
OUT/00000.safetensors, ...: tensors "noise" and "latent" and the prompt TEXTS (metadata), not their embeddings:
an SD embedding (77 x 768) is as large as the latent, and the frozen text encoder gives the same one again in
training at a small cost.
Tensors are fp32, fp16 for SD-size latents (>= 32 x 32, half the disk); the noise is rounded to that dtype
BEFORE the solve, so a stored pair is exactly what the teacher computed.
Resumable: shard i depends only on (seed, i) (its noise and prompts), it exists only once complete (temp file,
then rename), and a rerun makes only the missing shards: a killed generation continues to exactly the pairs of
an uninterrupted one. Under torchrun, rank r of w makes shards r, r + w, ... . OUT/pairs.json records the
settings (teacher, steps, cfg, seed, ...): other settings in the same folder are an error, never a mix.

Step two, training (train.py --task reflow): the Diff2Flow objective on the FIXED pairs, x_t = t x_1 + (1-t) x_0,
target x_1 - x_0, by default with the paper's rank-64 LoRA (--lora small; rank 16 for the tiny demo, whose UNet
is 32-64 wide) or full. The student learns the GUIDED flow, so it is sampled without CFG (cfg 1: one UNet call per
step, half the teacher's cost per step) and trained without caption dropout: an empty-prompt branch would be
trained toward the average of prompt-specific endpoints and is never used. Its final.safetensors says steps=4,
cfg=1 in the metadata: sample.py needs no flags.

Evaluation (the tiny family): teacher (with its CFG) vs student (cfg 1) at 1, 2, 4, 8 Euler steps, and the
teacher at 25 and 40: latent MSE and image PSNR against the teacher's 40-step output from the same noise, FD
and prompt-attribute accuracy (metrics.py's classifier, as evaluate.py), the straightness of the 40-step paths
(mean_k ||v_k - (x_1 - x_0)||^2 / ||x_1 - x_0||^2, see euler_path) and the run-to-run spread of FD / accuracy
(the teacher at 25 steps and the student at 2 and 4 from SEEDS noise seeds). RESULTS.md: the demo's student at 4
steps (4 UNet calls) is as good as the teacher at 25 (50 calls), 2 steps close.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import diff2flow
import metrics
import sd
import synth

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_TEACHER = os.path.join(ROOT, "assets", "demo", "d2f_tiny.safetensors")
STUDENT_STEPS, STUDENT_CFG = 4, 1.0  # what sample.py uses for a reflowed model (its metadata)
SHARD_SIZE = 64  # pairs per shard = per teacher batch (x2 with CFG)
SEEDS = 3  # noise seeds of the target rows (teacher@25, reflow@2, reflow@4): their run-to-run spread
KEEP_PHRASE = 0.7  # synth prompts keep their size / position phrase with this probability (as the prior's data)


def fail(msg):
    raise SystemExit(f"reflow: error: {msg}")


@dataclass
class PairSpec:
    """Everything that decides the pairs (recorded in pairs.json); n may grow later: more shards."""
    teacher: str  # the checkpoint (path or repo id)
    teacher_file: str  # its size and modification time: a rebuilt teacher never reuses old pairs
    prompts: str  # "synth", or "sha256:..." of the prompt file's lines
    steps: int = 40
    cfg: float = 7.5
    seed: int = 0
    shard_size: int = SHARD_SIZE
    resolution: int = 32


# ---------------------------------------------------------------------------------- step one: pairs


def shard_path(folder, i):
    return os.path.join(folder, f"{i:05d}.safetensors")


def n_shards(n, shard_size):
    return math.ceil(n / shard_size)


def shard_seed(seed, i):
    """A seed for shard i that depends on (seed, i) only (SeedSequence: no overlap between shards)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def synth_prompt(seed, j):
    """Pair j's synth.py caption, shortened at random so that short prompts are distilled too."""
    rng = synth.item_rng(seed, j)
    a = synth.sample_attributes(rng)
    size = f"{a.size} " if rng.random() < KEEP_PHRASE else ""
    where = f" at the {a.position}" if rng.random() < KEEP_PHRASE else ""
    article = "an" if a.background[0] in "aeiou" else "a"
    return f"a {size}{a.color} {a.shape}{where} on {article} {a.background} background"


def shard_inputs(spec, prompt_list, i, shape, dtype):
    """Noise (S, *shape), rounded to the storage dtype, and the S prompts of shard i."""
    g = torch.Generator().manual_seed(shard_seed(spec.seed, i))
    noise = torch.randn((spec.shard_size, *shape), generator=g).to(dtype).float()
    if prompt_list is None:
        start = i * spec.shard_size
        return noise, [synth_prompt(spec.seed, j) for j in range(start, start + spec.shard_size)]
    picks = torch.randint(len(prompt_list), (spec.shard_size,), generator=g).tolist()
    return noise, [prompt_list[k] for k in picks]


def storage_dtype(shape):
    return torch.float16 if min(shape[-2:]) >= 32 else torch.float32


def latent_shape(bundle, resolution):
    f = bundle.vae.downsample
    return (bundle.unet.cfg.out_channels, resolution // f, resolution // f)


def check_manifest(folder, spec):
    """pairs.json = spec, written by the first run; any other spec in this folder is an error."""
    path = os.path.join(folder, "pairs.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in asdict(spec).items() if saved.get(k) != v]
        if diff:
            fail(f"{folder} holds pairs made with {'; '.join(diff)}: delete it or choose another pairs folder")
        return
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(asdict(spec), f, indent=1)
    os.replace(tmp, path)


def save_shard(path, noise, latent, prompts):
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"noise": noise.contiguous(), "latent": latent.contiguous()}, tmp,
              metadata={"prompts": json.dumps(prompts)})
    os.replace(tmp, path)  # a shard exists only when complete


@torch.no_grad()
def generate_pairs(bundle, folder, spec, n, prompt_list=None, rank=0, world=1, device="cpu", amp=nullcontext,
                   progress=True):
    """Make this rank's missing shards (r, r + w, ...) of the first n pairs; returns the shards it made."""
    check_manifest(folder, spec)
    todo = [i for i in range(rank, n_shards(n, spec.shard_size), world) if not os.path.exists(shard_path(folder, i))]
    if not todo:
        return []
    shape = latent_shape(bundle, spec.resolution)
    dtype = storage_dtype(shape)
    bundle.unet.eval()
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    uncond = bundle.encode_prompt([""])
    for i in tqdm(todo, desc=f"teacher pairs ({spec.steps} steps, cfg {spec.cfg})", disable=not progress,
                  dynamic_ncols=True):
        noise, prompts = shard_inputs(spec, prompt_list, i, shape, dtype)
        with amp():
            context = bundle.encode_prompt(prompts)
            z = diff2flow.sample_euler(model, noise.to(device), spec.steps, context, uncond, spec.cfg)
        save_shard(shard_path(folder, i), noise.to(dtype), z.float().cpu().to(dtype), prompts)
    return todo


@dataclass
class Pairs:
    noise: torch.Tensor  # (N, C, h, w) float32: x_0
    x1: torch.Tensor  # (N, C, h, w) float32: the teacher's endpoint
    prompts: list

    def __len__(self):
        return len(self.prompts)


def load_pairs(folder, n):
    """The first n pairs of a complete folder (float32)."""
    with open(os.path.join(folder, "pairs.json")) as f:
        spec = PairSpec(**json.load(f))
    noise, x1, prompts = [], [], []
    for i in range(n_shards(n, spec.shard_size)):
        path = shard_path(folder, i)
        if not os.path.exists(path):
            fail(f"{path} is missing: make the pairs first (python reflow.py pairs, or train.py --task reflow)")
        with safe_open(path, "pt") as f:
            prompts += json.loads(f.metadata()["prompts"])
        t = load_file(path)
        noise.append(t["noise"].float())
        x1.append(t["latent"].float())
    return Pairs(torch.cat(noise)[:n], torch.cat(x1)[:n], prompts[:n])


def read_prompt_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read --prompts {path}: {e.strerror}")
    if not lines:
        fail(f"--prompts {path} has no prompts (one per line, blank lines are skipped)")
    return lines


def pair_spec(bundle, teacher, prompt_file, steps, cfg, seed, shard_size, resolution):
    """The spec, and the prompt list (None: synth.py captions)."""
    prompt_list = read_prompt_file(prompt_file) if prompt_file not in ("", None, "synth") else None
    digest = "synth" if prompt_list is None else \
        "sha256:" + hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()[:16]
    cfg = float(bundle.meta.get("cfg", 7.5)) if cfg is None else float(cfg)
    stat = os.stat(teacher) if os.path.isfile(teacher) else None
    file = f"{stat.st_size} bytes, modified {stat.st_mtime:.0f}" if stat else ""
    return PairSpec(teacher, file, digest, steps, cfg, seed, shard_size, resolution), prompt_list


# ---------------------------------------------------------------------------------- evaluation


def euler_path(model, noise, steps, context, uncond=None, cfg_scale=1.0):
    """diff2flow.sample_euler, also returning the straightness of the path it took:
    S = mean_k ||v_k - (x_1 - x_0)||^2 / ||x_1 - x_0||^2 (mean over images), 0 for a straight line. With
    uniform Euler steps x_1 - x_0 = mean_k v_k, so S is the variance of the velocity along the path."""
    x, vs = noise, []
    ts = diff2flow.fm_timesteps(steps)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = diff2flow._guided(model, x, t0, context, uncond, cfg_scale)  # sample_euler's step, exactly
        vs.append(v)
        x = x + float(t1 - t0) * v
    d = (x - noise).flatten(1)  # (B, D)
    dev = torch.stack([(v.flatten(1) - d).pow(2).sum(1) for v in vs]).mean(0)  # (B,)
    return x, (dev / d.pow(2).sum(1)).mean().item()


def psnr(a, b):
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


@torch.no_grad()
def solve(bundle, context, noise, steps, cfg, batch=128):
    """Latents (N, C, h, w) and the straightness of their Euler paths (mean over batches)."""
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    uncond, zs, s = bundle.encode_prompt([""]), [], []
    for i in range(0, len(noise), batch):
        z, straight = euler_path(model, noise[i:i + batch], steps, context[i:i + batch], uncond, cfg)
        zs.append(z)
        s.append(straight * len(z))
    return torch.cat(zs), sum(s) / len(noise)


@torch.no_grad()
def decode(bundle, z, batch=256):
    return torch.cat([bundle.vae.decode(z[i:i + batch]).clamp(-1, 1) for i in range(0, len(z), batch)])


def noise_of(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def evaluate_reflow(teacher, student, n=512, steps=(1, 2, 4, 8), ref_steps=(25, 40), seed=0, results=None,
                    classifier_dir="runs/reproduce", classifier_steps=1500):
    """The numbers of RESULTS.md's "reflow" section (see the module docstring); returns them as a dict."""
    import evaluate  # lazily: evaluate imports train, which imports this module
    t0 = time.time()
    tb, sb = sd.load(teacher), sd.load(student)
    setup = evaluate.Setup(out=classifier_dir, resolution=int(tb.meta.get("resolution", 32)), n_eval=n, n_val=1,
                           classifier_steps=classifier_steps)
    classifier, data = evaluate.get_classifier(setup), evaluate.held_out(setup, tb)
    # name -> (bundle, test contexts, guidance): the teacher with its CFG, the student with its own (1)
    models = {"teacher": (tb, data["test_ctx"], float(tb.meta.get("cfg", 7.5))),
              "reflow": (sb, evaluate.held_out(setup, sb)["test_ctx"], float(sb.meta.get("cfg", STUDENT_CFG)))}
    shape = (n, *latent_shape(tb, setup.resolution))
    noise = noise_of(shape, seed)
    ref_z, ref_s = solve(*models["teacher"][:2], noise, 40, models["teacher"][2])
    ref = (ref_z, decode(tb, ref_z))

    def scores(name, k, noise, z=None):
        """Latents and FD / acc of model `name` at k steps from `noise`."""
        bundle, ctx, cfg = models[name]
        z = solve(bundle, ctx, noise, k, cfg)[0] if z is None else z
        img = decode(bundle, z)
        return z, img, evaluate.image_scores(classifier, img, data)

    def row(name, k):
        z, img, sc = scores(name, k, noise, ref_z if (name, k) == ("teacher", 40) else None)
        r = {"model": name, "steps": k, "calls": k * (2 if models[name][2] != 1 else 1), "cfg": models[name][2],
             "mse": (z - ref[0]).pow(2).mean().item(), "psnr": psnr(img, ref[1]), **sc}
        print(json.dumps(r))
        return r

    res = {"n": n, "teacher": os.path.relpath(teacher, ROOT), "student": os.path.relpath(student, ROOT),
           "teacher_cfg": models["teacher"][2], "student_cfg": models["reflow"][2],
           "rows": [row(m, k) for k in steps for m in ("teacher", "reflow")] + [row("teacher", k) for k in ref_steps],
           "student_meta": {k: sb.meta[k] for k in ("n_pairs", "teacher_steps", "teacher_cfg", "train_steps",
                                                     "lora_config") if k in sb.meta}}
    res["seeds"] = {}  # FD / acc of the target rows from SEEDS noise seeds: the run-to-run spread
    for name, k in (("teacher", 25), ("reflow", 4), ("reflow", 2)):
        first = next(r for r in res["rows"] if (r["model"], r["steps"]) == (name, k))
        res["seeds"][f"{name}@{k}"] = [{"fd": first["fd"], "acc": first["acc"]}] + [
            scores(name, k, noise_of(shape, seed + i))[2] for i in range(1, SEEDS)]
    res["straightness"] = {"teacher": ref_s, "reflow": solve(*models["reflow"][:2], noise, 40, models["reflow"][2])[1]}
    res["minutes"] = (time.time() - t0) / 60
    if results:
        metrics.update_results(results, "reflow", report(res))
    return res


def seed_stats(runs):
    """Mean and spread (max - min) of FD and acc over noise seeds."""
    out = {}
    for key in ("fd", "acc"):
        v = [r[key] for r in runs]
        out[key], out[key + "_spread"] = sum(v) / len(v), max(v) - min(v)
    return out


def verdicts(res):
    """Targets on the means over the seeds: reflow at 4 steps as good as the teacher at 25 (FD no higher, acc no
    lower, than the teacher's plus / minus its seed-to-seed spread), at 2 steps close (within 3x that spread)."""
    st = {name: seed_stats(runs) for name, runs in res["seeds"].items()}
    ref = st["teacher@25"]

    def ok(name, slack):
        s = st[name]
        return s["fd"] <= ref["fd"] + slack * ref["fd_spread"] + 1e-9 and \
            s["acc"] >= ref["acc"] - slack * ref["acc_spread"] - 1e-9
    return {"stats": st, "four": ok("reflow@4", 1), "two": ok("reflow@2", 1), "two_close": ok("reflow@2", 3)}


def how(meta):
    """One line on how the student was made, from its metadata (train.py --task reflow writes it)."""
    if "n_pairs" not in meta:
        return ""
    rank = json.loads(meta["lora_config"])["rank"] if "lora_config" in meta else None
    return (f"The student: `train.py --task reflow`, {meta['n_pairs']} pairs of the teacher ({meta['teacher_steps']} "
            f"Euler steps, CFG {meta['teacher_cfg']}), {meta.get('train_steps', '?')} steps, "
            f"{f'LoRA rank {rank:g}' if rank else 'full fine-tuning'}.")


def report(res):
    v = verdicts(res)
    md = ["## Reflow: 2-4 step sampling (tiny family)\n",
          f"Written by `python reflow.py evaluate` in {res['minutes']:.1f} min. Teacher `{res['teacher']}` "
          f"(Euler, CFG {res['teacher_cfg']}); student `{res['student']}`, its 1-rectified flow (Euler, "
          f"CFG {res['student_cfg']}: one UNet call per step). {res['n']} held-out test captions, the same noise "
          "for every row. MSE (latents) and PSNR (decoded images) against the teacher's 40-step output from "
          "that noise; FD / acc as in the fine-tuning section (classifier features vs real test images; "
          "prompt attributes recognised).", how(res.get("student_meta", {})) + "\n",
          "| model | steps | UNet calls | latent MSE to teacher@40 | PSNR (dB) | FD | acc |",
          "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        psnr_cell = "(reference)" if r["mse"] == 0 else f"{r['psnr']:.1f}"
        md.append(f"| {r['model']} | {r['steps']} | {r['calls']} | {r['mse']:.4f} | {psnr_cell} | "
                  f"{r['fd']:.1f} | {r['acc']:.3f} |")
    s = res["straightness"]
    md += ["", f"Straightness of the 40-step paths, mean_k ||v_k - (x_1 - x_0)||^2 / ||x_1 - x_0||^2 (0 = straight): "
           f"teacher {s['teacher']:.4f}, reflow {s['reflow']:.4f}.\n",
           f"Run-to-run spread: FD / acc over {len(res['seeds']['teacher@25'])} noise seeds (mean, and max - min):\n",
           "| model | steps | FD mean | FD spread | acc mean | acc spread |", "|---|---|---|---|---|---|"]
    for name, st in v["stats"].items():
        model, k = name.split("@")
        md.append(f"| {model} | {k} | {st['fd']:.1f} | {st['fd_spread']:.1f} | {st['acc']:.3f} | "
                  f"{st['acc_spread']:.3f} |")
    md += ["", "Targets, on these means (\"as good as\" = FD no higher and acc no lower than the teacher@25's, "
           "give or take its spread): reflow at 4 steps as good as the teacher at 25: "
           f"**{'met' if v['four'] else 'not met'}**; reflow at 2 steps close (within 3x the spread): "
           f"**{'met' if v['two_close'] else 'not met'}**{' (even within 1x)' if v['two'] else ''}.\n"]
    return "\n".join(md)


# ---------------------------------------------------------------------------------- CLI


def cmd_pairs(a):
    bundle = sd.load(a.ckpt, device=a.device)
    res = a.resolution or int(bundle.meta.get("resolution", 512))
    spec, prompt_list = pair_spec(bundle, os.path.abspath(a.ckpt) if os.path.exists(a.ckpt) else a.ckpt, a.prompts,
                                  a.steps, a.cfg, a.seed, a.shard_size, res)
    if not a.prompts and a.ckpt != DEMO_TEACHER:
        fail("--prompts FILE is needed with a --ckpt other than the demo ('--prompts synth': synth.py captions)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun: disjoint shards
    cuda = a.device.startswith("cuda")
    amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else nullcontext
    made = generate_pairs(bundle, a.out, spec, a.n, prompt_list, rank, world, a.device, amp)
    print(f"{a.out}: made {len(made)} shard(s) of {spec.shard_size} pairs (rank {rank} of {world})")


def cmd_evaluate(a):
    res = evaluate_reflow(a.teacher, a.student, a.n, seed=a.seed, results=a.results, classifier_dir=a.classifier_dir)
    os.makedirs(os.path.dirname(os.path.abspath(a.raw)), exist_ok=True)
    with open(a.raw, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote the 'reflow' section of {a.results}; raw numbers: {a.raw}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = sub.add_parser("pairs", help="step one: the teacher's (noise, prompt, latent) pairs, resumable", **fmt)
    g.add_argument("--ckpt", default=DEMO_TEACHER, help="the teacher: anything sd.load takes")
    g.add_argument("--prompts", help="file, one prompt per line, drawn at random, or 'synth' (synth.py captions; "
                   "needed unless the teacher is the demo's)")
    g.add_argument("--out", default="runs/reflow/pairs", help="the pairs folder (a rerun completes it)")
    g.add_argument("--n", type=int, default=4096, help="pairs (whole shards are made)")
    g.add_argument("--steps", type=int, default=40, help="Euler steps of the teacher's ODE")
    g.add_argument("--cfg", type=float, help="teacher's guidance (None: its metadata 'cfg', else 7.5)")
    g.add_argument("--seed", type=int, default=0, help="shard i's noise and prompts come from (seed, i)")
    g.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="pairs per shard = per teacher batch")
    g.add_argument("--resolution", type=int, help="pixels (None: the teacher's metadata, else 512)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 (CUDA: bf16 autocast, as train.py)")
    g.set_defaults(run=cmd_pairs)
    e = sub.add_parser("evaluate", help="teacher vs reflowed student at 1-8 steps: RESULTS.md section 'reflow'",
                       **fmt)
    e.add_argument("--teacher", default=DEMO_TEACHER, help="sampled with its metadata's CFG")
    e.add_argument("--student", default="runs/reflow/final.safetensors", help="sampled with its metadata's CFG (1)")
    e.add_argument("--n", type=int, default=512, help="held-out test captions (one image each)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (and seed + 1, seed + 2 for the spread)")
    e.add_argument("--results", default=os.path.join(ROOT, "RESULTS.md"), help="markdown file of the section")
    e.add_argument("--raw", default="runs/reflow/eval.json", help="the numbers as JSON")
    e.add_argument("--classifier-dir", default="runs/reproduce",
                   help="where the metric classifier is (or is trained once), shared with evaluate.py")
    e.set_defaults(run=cmd_evaluate)
    for sp in (g, e):
        sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see train.py --threads)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in ("n", "steps", "shard_size"):
        if getattr(a, name, 1) is not None and getattr(a, name, 1) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    return a.run(a)


if __name__ == "__main__":
    main()
