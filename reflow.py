"""Reflow (Liu et al. 2023, "Flow Straight and Fast"), as Diff2Flow (arXiv 2506.02221) applies it: distil a
teacher's guided ODE into a 1-rectified flow whose paths are nearly straight, so that 2-4 Euler steps suffice.

    python train.py --task reflow        # the demo: pairs of assets/demo/d2f_tiny, then a LoRA (15 min, 1 core)
    python train.py --task reflow --ckpt v1-5-pruned-emaonly.safetensors --prompts prompts.txt   # SD: LoRA small
    python sample.py --ckpt runs/reflow/final.safetensors --prompt "a red circle on a blue background"  # 4 steps
    python reflow.py pairs --out runs/reflow/pairs              # step one alone (train.py --task reflow does it)
    python toy/evaluate.py reflow --student runs/reflow/final.safetensors    # RESULTS.md section "reflow"

Step one, pairs. For a prompt c and noise x_0, integrate the teacher's ODE dx/dt = v(x, t, c) with classifier-free
guidance (default: the teacher's metadata 'cfg', else SD's 7.5) for 40 Euler steps to x_1. Prompts: the lines of
a --prompts file in order, pair j taking line j (cycling when there are fewer lines than pairs: each prompt is
used as often as any other). The demo's file is toy/synth.py's captions, each without its size / position phrase
with probability 0.3, like the prior's training (train.py writes it once to runs/data/). Stored in shards of `shard_size` pairs,
OUT/00000.safetensors, ...: tensors "noise" and "latent" and the prompt TEXTS (metadata), not their embeddings:
an SD embedding (77 x 768) is as large as the latent, and the frozen text encoder gives the same one again in
training at a small cost.
Tensors are fp32, fp16 for SD-size latents (>= 32 x 32, half the disk); the noise is rounded to that dtype
BEFORE the solve, so a stored pair is exactly what the teacher computed.
Resumable: shard i depends only on (seed, i) (its noise and prompts), it exists only once complete (temp file,
then rename), and a rerun makes only the missing shards: a killed generation continues to exactly the pairs of
an uninterrupted one. Under torchrun, rank r of w makes shards r, r + w, ... . OUT/pairs.json records the
settings (teacher, steps, cfg, seed, ...): other settings in the same folder are an error, never a mix.

Step two, training (train.py --task reflow): the pairs are streamed from their shards (PairShards: each
micro-batch's pairs read as needed, only those rows, by the rank that trains on them; memory does not grow with
--n-pairs, ~236 GB for the paper's 1.8M SD1.5 pairs in RAM) in the same order as ever, and
the Diff2Flow objective on the FIXED pairs, x_t = t x_1 + (1-t) x_0,
target x_1 - x_0, by default with the paper's rank-64 LoRA (--lora small; rank 16 for the tiny demo, whose UNet
is 32-64 wide) or full. The student learns the GUIDED flow, so it is sampled without CFG (cfg 1: one UNet call per
step, half the teacher's cost per step) and trained without caption dropout: an empty-prompt branch would be
trained toward the average of prompt-specific endpoints and is never used. Its final.safetensors says steps=4,
cfg=1 in the metadata: sample.py needs no flags.

Evaluation (the tiny family): `python toy/evaluate.py reflow` (toy/reflow_eval.py).
"""
import argparse
import functools
import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import cpu_fast
import diff2flow
import sd
from common import DefaultsOnce, atomic_path, fail, one_line_warnings, usage_error
from data import TaskData, batch_indices, parse_resolution, resolution_value, text_grid

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_TEACHER = os.path.join(ROOT, "assets", "demo", "d2f_tiny.safetensors")
STUDENT_STEPS, STUDENT_CFG = 4, 1.0  # what sample.py uses for a reflowed model (its metadata)
SHARD_SIZE = 64  # pairs per shard = per teacher batch (x2 with CFG)


@dataclass
class PairSpec:
    """Everything that decides the pairs (recorded in pairs.json); n may grow later: more shards."""
    teacher: str  # the checkpoint (path or repo id)
    teacher_file: str  # its size and modification time: a rebuilt teacher never reuses old pairs
    prompts: str  # "sha256:..." of the prompt file's lines
    steps: int = 40
    cfg: float = 7.5
    seed: int = 0
    shard_size: int = SHARD_SIZE
    resolution: int = 32  # or "HxW" (data.resolution_value)
    prompt_use: str = "in order"  # pair j takes line j (earlier versions drew lines at random: not continued)


# ---------------------------------------------------------------------------------- step one: pairs


def shard_path(folder, i):
    return os.path.join(folder, f"{i:05d}.safetensors")


def n_shards(n, shard_size):
    return math.ceil(n / shard_size)


def shard_seed(seed, i):
    """A seed for shard i that depends on (seed, i) only (SeedSequence: no overlap between shards)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def shard_inputs(spec, prompt_list, i, shape, dtype):
    """Noise (S, *shape), rounded to the storage dtype, and the S prompts of shard i (pair j: line j mod L)."""
    g = torch.Generator().manual_seed(shard_seed(spec.seed, i))
    noise = torch.randn((spec.shard_size, *shape), generator=g).to(dtype).float()
    start = i * spec.shard_size
    return noise, [prompt_list[j % len(prompt_list)] for j in range(start, start + spec.shard_size)]


def storage_dtype(shape):
    return torch.float16 if min(shape[-2:]) >= 32 else torch.float32


def latent_shape(bundle, resolution):
    """(C, H/f, W/f) of --resolution (a side, or "HxW")."""
    f, (H, W) = bundle.vae.downsample, parse_resolution(resolution)
    return (bundle.unet.cfg.out_channels, H // f, W // f)


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
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(asdict(spec), f, indent=1)


def save_shard(path, noise, latent, prompts):
    with atomic_path(path) as tmp:  # a shard exists only when complete
        save_file({"noise": noise.contiguous(), "latent": latent.contiguous()}, tmp,
                  metadata={"prompts": json.dumps(prompts)})


@torch.no_grad()
def generate_pairs(bundle, folder, spec, n, prompt_list, rank=0, world=1, device="cpu", amp=nullcontext,
                   progress=True):
    """Make this rank's missing shards (r, r + w, ...) of the first n pairs; returns the shards it made."""
    check_manifest(folder, spec)
    todo = [i for i in range(rank, n_shards(n, spec.shard_size), world) if not os.path.exists(shard_path(folder, i))]
    if not todo:
        return []
    shape = latent_shape(bundle, spec.resolution)
    dtype = storage_dtype(shape)
    bundle.unet.eval()
    if device == "cpu":  # the teacher's inference
        cpu_fast.enable(bundle.unet)
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


class PairShards:
    """The first n pairs of a complete pairs folder, streamed: pair j is row j % S of shard j // S. read(idx)
    returns those pairs only, each shard they fall in opened once (safetensors safe_open, which maps the file:
    only the rows asked for are read) and nothing kept between calls, so memory does not grow with n and each
    DDP rank reads only its own micro-batches' pairs. Folders of every earlier version load (same format)."""

    def __init__(self, folder, n):
        try:
            with open(os.path.join(folder, "pairs.json")) as f:
                self.spec = PairSpec(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            fail(f"{folder}: no readable pairs.json ({e}); make the pairs first (python reflow.py pairs, or train.py "
                 "--task reflow)")
        self.folder, self.n, self.peak_rows = folder, n, 0  # peak_rows: the most pairs one read held
        names = set(os.listdir(folder))  # one listing, not a stat or an open per shard
        missing = [i for i in range(n_shards(n, self.spec.shard_size)) if os.path.basename(shard_path(folder, i))
                   not in names]
        if missing:
            fail(f"{shard_path(folder, missing[0])} is missing ({len(missing)} shard(s) in all): make the pairs "
                 "first (python reflow.py pairs, or train.py --task reflow)")

    def __len__(self):
        return self.n

    def read(self, idx):
        """Pairs idx -> noise, x1 (len(idx), C, h, w) float32 and their prompts, in the order of idx."""
        idx, S = [int(j) for j in idx], self.spec.shard_size
        by_shard, rows = {}, [None] * len(idx)
        for k, j in enumerate(idx):
            by_shard.setdefault(j // S, []).append((k, j % S))
        for i, wanted in sorted(by_shard.items()):
            path = shard_path(self.folder, i)
            try:
                with safe_open(path, "pt") as f:
                    texts, noise = json.loads(f.metadata()["prompts"]), f.get_slice("noise")
                    latent = f.get_slice("latent")
                    for k, r in wanted:
                        rows[k] = noise[r:r + 1], latent[r:r + 1], texts[r]
            except Exception as e:  # safetensors raises its own error types for truncated or foreign files
                fail(f"{path}: cannot read this pairs shard ({type(e).__name__}: {e}); delete it and run python "
                     "reflow.py pairs (or train.py --task reflow) again to remake it")
        self.peak_rows = max(self.peak_rows, len(rows))
        noise, x1, prompts = zip(*rows)
        return torch.cat(noise).float(), torch.cat(x1).float(), list(prompts)


def load_pairs(folder, n):
    """The first n pairs of a complete folder (float32), all in memory: for evaluations and tests; training
    streams them (PairShards)."""
    return Pairs(*PairShards(folder, n).read(range(n)))


def read_prompt_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read --prompts {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"--prompts {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it, "
             "e.g. iconv -f latin1 -t utf-8")
    if not lines:
        fail(f"--prompts {path} has no prompts (one per line, blank lines are skipped)")
    return lines


def pair_spec(bundle, teacher, prompt_file, steps, cfg, seed, shard_size, resolution):
    """The spec, and the prompt list."""
    prompt_list = read_prompt_file(prompt_file)
    digest = "sha256:" + hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()[:16]
    cfg = float(bundle.meta.get("cfg", 7.5)) if cfg is None else float(cfg)
    stat = os.stat(teacher) if os.path.isfile(teacher) else None
    file = f"{stat.st_size} bytes, modified {stat.st_mtime:.0f}" if stat else ""
    return PairSpec(teacher, file, digest, steps, cfg, seed, shard_size, resolution), prompt_list


# ---------------------------------------------------------------------------------- step two: the task's data

def task(cfg, bundle, env):
    """--task reflow: the teacher's (noise, prompt, latent) pairs, made first where missing (each DDP rank its own
    shards); the teacher is the loaded --ckpt, before training touches it. Prompts are encoded per micro-batch
    by the frozen text encoder: the pairs store text, not embeddings."""
    spec, prompt_list = pair_spec(bundle, cfg.ckpt, cfg.prompts, cfg.teacher_steps, cfg.teacher_cfg, cfg.seed,
                                  SHARD_SIZE, cfg.resolution)
    generate_pairs(bundle, cfg.pairs, spec, cfg.n_pairs, prompt_list, env.rank, env.world, env.device, env.amp,
                   env.master)
    if env.world > 1:
        torch.distributed.barrier()  # every rank's shards are written
    pairs = PairShards(cfg.pairs, cfg.n_pairs)  # streamed: this rank's micro-batches are read as they are needed

    def batches(position):
        for idx in batch_indices(cfg, len(pairs), position, env.rank, env.world):
            noise, x1, prompts = pairs.read(idx)
            with torch.no_grad(), env.amp():
                context = bundle.encode_prompt(prompts).float().to(env.device)
            yield {"x1": x1.to(env.device), "noise": noise.to(env.device), "context": context}
    meta = dict(steps=STUDENT_STEPS, cfg=STUDENT_CFG, teacher_steps=spec.steps, teacher_cfg=spec.cfg,
                n_pairs=len(pairs))
    prompts, grid = text_grid(cfg, bundle, env, pairs.read(range(min(4, len(pairs))))[2], STUDENT_STEPS, STUDENT_CFG)
    return TaskData(len(pairs), batches, prompts, grid, "pairs", meta=meta)


# ---------------------------------------------------------------------------------- CLI


def cmd_pairs(a):
    bundle = sd.load(a.ckpt, device=a.device)
    try:
        res = resolution_value(a.resolution or bundle.meta.get("resolution", 512))
    except ValueError as e:
        usage_error(str(e))
    spec, prompt_list = pair_spec(bundle, os.path.abspath(a.ckpt) if os.path.exists(a.ckpt) else a.ckpt, a.prompts,
                                  a.steps, a.cfg, a.seed, a.shard_size, res)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun: disjoint shards
    cuda = a.device.startswith("cuda")
    amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else nullcontext
    made = generate_pairs(bundle, a.out, spec, a.n, prompt_list, rank, world, a.device, amp)
    print(f"{a.out}: made {len(made)} shard(s) of {spec.shard_size} pairs (rank {rank} of {world})")


def main(argv=None):
    one_line_warnings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=DefaultsOnce)
    g = sub.add_parser("pairs", help="step one: the teacher's (noise, prompt, latent) pairs, resumable", **fmt)
    g.add_argument("--ckpt", default=DEMO_TEACHER, help="the teacher: anything sd.load takes")
    g.add_argument("--prompts", required=True, help="file, one prompt per line, used in order (the demo's: "
                   "python toy/synth.py --prompts FILE --n 4096)")
    g.add_argument("--out", default="runs/reflow/pairs", help="the pairs folder (a rerun completes it)")
    g.add_argument("--n", type=int, default=4096, help="pairs (whole shards are made)")
    g.add_argument("--steps", type=int, default=40, help="Euler steps of the teacher's ODE")
    g.add_argument("--cfg", type=float, help="teacher's guidance (None: its metadata 'cfg', else 7.5)")
    g.add_argument("--seed", type=int, default=0, help="shard i's noise and prompts come from (seed, i)")
    g.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="pairs per shard = per teacher batch")
    g.add_argument("--resolution", help="pixels, a side or HxW (None: the teacher's metadata, else 512)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 (CUDA: bf16 autocast, as train.py)")
    g.set_defaults(run=cmd_pairs)
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see train.py --threads)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in ("n", "steps", "shard_size"):
        if getattr(a, name) < 1:
            usage_error(f"--{name.replace('_', '-')} must be >= 1")
    return a.run(a)


if __name__ == "__main__":
    main()
