"""Fine-tune Stable Diffusion with Diff2Flow (arXiv 2506.02221), naive flow matching or the diffusion loss;
and pretrain the tiny SD family that plays SD's role in the demo and in evaluate.py.

    python train.py --task t2i                  # the demo: Diff2Flow fine-tuning of the tiny prior on synth.py data
    python train.py --task pretrain             # the tiny prior itself (VAE, then UNet + text encoder), ~20 min
    python train.py --task depth                # image-to-depth (depth.py), the prior on scenes.py rooms, 64 px
    python train.py --ckpt v1-5-pruned-emaonly.safetensors --data my_images/ --lora small --steps 2000
    torchrun --nproc_per_node=8 train.py --ckpt ... --data ... --batch-size 4      # DDP, one process per GPU
    python train.py --ckpt ... --data ... --resume                                 # continue after a crash

--data: images with same-name .txt captions, or a Hugging Face style metadata.jsonl (data.py).
Writes under --out: ckpt.pt (everything --resume needs), final.safetensors (full weights, or a LoRA that
names its base; sample.py reads the objective from its metadata, no flags needed), log.jsonl (one line per
step) and samples/step_XXXXXX.png (fixed prompts, fixed seed).

Defaults depend on what is trained (flags always win): with no --ckpt, --task t2i fine-tunes the demo prior
assets/demo/prior_tiny.safetensors on synthetic shapes (synth.py, written once to runs/data/) at its
resolution, 32 px, full fine-tuning, --lr 2e-4, --batch-size 64, --steps 600, --cache: about 3
min on 2 cores.
With --ckpt (real SD): 512 px, --batch-size 4, --steps 1000, --lr 1e-5 (1e-4 with --lora).

--task pretrain (the recipe; --out gets vae.safetensors, prior.safetensors, log.jsonl, samples/):
  1. tiny VAE (vae.py PRESETS["tiny"], 4x downsampling): --vae-steps of L1 + MSE reconstruction
     + 1e-6 x KL on fresh synthetic images; then scale_factor = 1 / std of the latents (what SD's
     0.18215 is for its VAE), so the UNet sees unit-variance latents.
  2. tiny UNet + tiny text encoder, trained JOINTLY from scratch (a random frozen text encoder also
     learns, but slower to follow the prompt): SD's v-prediction loss on SD's schedule, integer
     timesteps, 10% empty captions (for CFG), on --n-images pre-encoded synthetic images, EMA weights;
     captions lose their size / position phrase with probability 0.3 each, so that short prompts work.
"""
import argparse
import ctypes
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import depth
import diff2flow
import lora
import reflow
import scenes
import sd
import synth
from data import DataError, FolderDataset, stream_indices

DEMO_PRIOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo", "prior_tiny.safetensors")
LOSSES = {  # objective name (as recorded in the checkpoint) -> loss(unet, x1, context, abar, prediction, noise, t)
    "diffusion": diff2flow.diffusion_loss,
    "diff2flow": diff2flow.diff2flow_loss,
    "fm": functools.partial(diff2flow.naive_fm_loss, time="fm"),
    "fm_dm_direction": functools.partial(diff2flow.naive_fm_loss, time="dm_direction"),
}
SAMPLE_STEPS, SAMPLE_CFG, SAMPLE_N = 25, 7.5, 4  # Euler steps and guidance of the sample grids (sample.py's defaults)


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    task: str = arg("t2i", "t2i = text-to-image fine-tuning; pretrain = the tiny SD family from scratch on "
                           "synthetic shapes (VAE, then UNet + text encoder); reflow = the teacher's (noise, latent) "
                           "pairs, then a 1-rectified flow on them (reflow.py); depth = image-to-depth, Marigold-style "
                           "(depth.py), on pair folders (default: scenes.py rooms)",
                    choices=["t2i", "pretrain", "reflow", "depth"])
    ckpt: str = arg("", "model to fine-tune: anything sd.load takes "
                        "(default: the demo prior assets/demo/prior_tiny.safetensors)")
    data: str = arg("", "folder of images + same-name .txt captions, or with a metadata.jsonl (file_name, text) "
                        "(default with the demo prior: synthetic shapes, written once to runs/data/)")
    out: str = arg(None, "output folder (default runs/t2i or runs/pretrain)", type=str)
    objective: str = arg("diff2flow", "training loss", choices=["diff2flow", "fm", "diffusion"])
    fm_time: str = arg("fm", "--objective fm: the UNet's timestep is t_FM itself (official code) or (1 - t_FM)(T - 1)",
                       choices=["fm", "dm_direction"])
    t_sampling: str = arg("uniform", "FM time distribution (diff2flow, fm)", choices=["uniform", "logit_normal"])
    prediction: str = arg(None, "eps or v: override the guess for an original SD2 file whose name does not say",
                          choices=["eps", "v"])
    lora: str = arg(None, "LoRA: a preset (base, small), a rank (64) or a fraction (0.2) of each layer's width, "
                          "the last two with targets conv+attn1+attn2; empty = full fine-tuning "
                          "(default: empty; reflow: small, the paper's rank-64 LoRA, and 16 for the demo)", type=str)
    resolution: int = arg(None, "image side in pixels (shorter side resized, then center crop) "
                                "(default: 512; the demo prior's 32; pretrain 32)", type=int)
    batch_size: int = arg(None, "images per process and micro-step; global batch = this x grad-accum x processes "
                                "(default: 4; demo and pretrain 64)", type=int)
    grad_accum: int = arg(1, "micro-steps per optimizer step")
    lr: float = arg(None, "peak learning rate (default: 1e-4 with --lora, 1e-5 for full fine-tuning; "
                          "demo 2e-4 (LoRA 1e-3); pretrain 1e-3)", type=float)
    warmup: int = arg(None, "linear learning-rate warmup steps, then constant (pretrain: then cosine to 10%%) "
                            "(default: 100; demo 50)", type=int)
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = no clipping)")
    ema: float = arg(None, "EMA decay of the weights that are sampled and saved in final.safetensors (0 = off); "
                           "it warms up as (1 + n) / (10 + n) so that short runs work too "
                           "(default: 0.9999; demo and pretrain 0.999)", type=float)
    caption_dropout: float = arg(None, "fraction of captions replaced by the empty prompt (trains the CFG branch) "
                                       "(default: 0.1; reflow 0: its student is sampled without CFG)", type=float)
    steps: int = arg(None, "optimizer steps in total (raise it with --resume to train on) "
                           "(default: 1000; demo 600; pretrain: UNet steps, 1500)", type=int)
    vae_steps: int = arg(700, "--task pretrain: VAE steps before the UNet")
    vae: str = arg("", "--task pretrain: skip stage 1 and take the VAE of this file (e.g. an earlier run's "
                       "vae.safetensors)")
    n_images: int = arg(16384, "--task pretrain: synthetic training images the UNet sees (the VAE sees fresh ones)")
    pairs: str = arg("", "--task reflow: folder of the teacher's (noise, prompt, latent) pairs, made or completed "
                         "first; --ckpt is the teacher and the student's start (default: OUT/pairs)")
    n_pairs: int = arg(None, "--task reflow: pairs to make and train on (default: 4096 demo, 10000 SD)", type=int)
    prompts: str = arg("", "--task reflow: the pairs' prompts, a file with one per line, drawn at random, or 'synth' "
                           "(synth.py captions: the default with the demo teacher); needed with --ckpt")
    teacher_steps: int = arg(40, "--task reflow: Euler steps of the teacher's ODE per pair")
    teacher_cfg: float = arg(None, "--task reflow: the teacher's guidance scale (default: its metadata 'cfg', "
                                   "else 7.5)", type=float)
    seed: int = arg(0, "seed of the data order, noise, timesteps and caption dropout")
    save_every: int = arg(None, "write ckpt.pt every N steps (0 = only at the end) (default: 500; demo 200)",
                          type=int)
    sample_every: int = arg(None, "write a sample grid every N steps (0 = never) (default: 500; demo 200)",
                            type=int)
    sample_prompts: str = arg("", "file with one prompt per line for the grids (default: the first 4 captions)")
    cache: bool = arg(None, "encode every image (VAE latent mean) and caption once, kept in --out/cache.pt, "
                            "then run only the UNet (default: off; on for the demo)",
                      action=argparse.BooleanOptionalAction)
    bf16: bool = arg(None, "bf16 autocast, fp32 master weights (default: on for CUDA)",
                     action=argparse.BooleanOptionalAction)
    compile: bool = arg(False, "torch.compile the UNet")
    grad_checkpointing: bool = arg(False, "recompute UNet activations in backward: less memory, ~30%% slower "
                                          "(on CPU ~40%%: freed memory also goes back to the OS at once)")
    workers: int = arg(None, "DataLoader processes decoding images (without --cache) (default: 2; demo 0)",
                       type=int)
    threads: int = arg(0, "torch CPU threads (0 = 1 on CPU: on a busy 2-core machine 2 threads can be 10x "
                          "slower for these small models; PyTorch's default on CUDA)")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu (torchrun: cuda:LOCAL_RANK)")
    resume: bool = arg(False, "continue from --out/ckpt.pt (weights, optimizer, EMA, step, RNG, data position)")


# fields that must match the checkpoint on --resume (the rest, e.g. --steps, may change)
SAME_ON_RESUME = ("task", "ckpt", "data", "objective", "fm_time", "t_sampling", "prediction", "lora", "resolution",
                  "lr", "warmup", "weight_decay", "grad_clip", "ema", "caption_dropout", "seed", "pairs", "n_pairs",
                  "prompts", "teacher_steps", "teacher_cfg")


def fail(msg):
    raise SystemExit(f"train.py: error: {msg}")


def parse_args(argv=None) -> TrainConfig:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    for f in dataclasses.fields(TrainConfig):
        kw = dict(f.metadata)
        if isinstance(f.default, bool):
            kw.setdefault("action", "store_true")
        elif "action" not in kw:
            kw.setdefault("type", str if f.default is None else type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)
    return TrainConfig(**vars(p.parse_args(argv)))


# defaults that depend on what is trained (None fields of TrainConfig): real SD, the demo prior, pretraining
DEFAULTS = {
    "sd": dict(out="runs/t2i", resolution=512, batch_size=4, warmup=100, ema=0.9999, steps=1000, save_every=500,
               sample_every=500, cache=False, workers=2),
    "demo": dict(out="runs/t2i", batch_size=64, warmup=50, ema=0.999, steps=600, save_every=200, sample_every=200,
                 cache=True, workers=0),  # resolution: the prior's own
    "pretrain": dict(out="runs/pretrain", resolution=32, batch_size=64, warmup=100, ema=0.999, steps=1500, lr=1e-3,
                     save_every=0, sample_every=0, cache=False, workers=0),
}
# --task reflow, over the above (reflow.py): fixed pairs, no caption dropout; the tiny UNet (widths 32-64) gets a
# small LoRA (rank 64 would be full rank there), which keeps the demo's reflow file small
REFLOW_DEFAULTS = {
    "sd": dict(out="runs/reflow", lora="small", n_pairs=10000, caption_dropout=0.0),  # small: the paper's rank 64
    "demo": dict(out="runs/reflow", lora="16", n_pairs=4096, caption_dropout=0.0, steps=1000, cache=False),
}
DEMO_DATA = dict(n=4096, seed=0)  # synth.py items 0..n-1 of the training stream, written once to runs/data/
# --task depth, over the above (depth.py): 64 px (the 32 px prior's 8x8 latents lose too much depth detail: the
# VAE's own floor, decode(encode(depth)), measured AbsRel 0.127 at 32 px vs 0.097 at 64 px); pairs encoded once
DEPTH_DEFAULTS = {
    "sd": dict(out="runs/depth", caption_dropout=0.0, cache=False),
    "demo": dict(out="runs/depth", resolution=64, batch_size=32, steps=600, caption_dropout=0.0, cache=False),
}
DEPTH_DATA = dict(n=4096, seed=scenes.TRAIN_SEED)  # scenes.py training scenes 0..n-1, written once to runs/data/


def fill_defaults(cfg: TrainConfig):
    """None fields <- DEFAULTS of this kind of run; the demo's resolution and data come from the prior."""
    kind = "pretrain" if cfg.task == "pretrain" else "sd" if cfg.ckpt else "demo"
    for k, v in {"lora": "", "caption_dropout": 0.1, **DEFAULTS[kind],
                 **(REFLOW_DEFAULTS[kind] if cfg.task == "reflow" else {}),
                 **(DEPTH_DEFAULTS[kind] if cfg.task == "depth" else {})}.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if kind == "demo" and os.path.exists(DEMO_PRIOR):
        cfg.resolution = cfg.resolution or int(file_metadata(DEMO_PRIOR).get("resolution", 32))
        if not cfg.data and cfg.task == "t2i":
            cfg.data = synth_folder(cfg.resolution)
        if not cfg.data and cfg.task == "depth":
            cfg.data = scenes_folder(cfg.resolution)
    if cfg.lr is None:
        cfg.lr = (1e-3 if cfg.lora else 2e-4) if kind == "demo" else 1e-4 if cfg.lora else 1e-5
    cfg.threads = cfg.threads or (1 if cfg.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(cfg.threads)


def file_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def written_once(name, write):
    """runs/data/NAME, made by write(path) on first use (deterministic data); a 'done' file marks it complete."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "data", name)
    if not os.path.exists(os.path.join(path, "done")):
        write(path)
        open(os.path.join(path, "done"), "w").close()
    return path


def synth_folder(resolution):
    """The demo's training data: synth.py images with captions (~10 s)."""
    n, seed = DEMO_DATA["n"], DEMO_DATA["seed"]
    return written_once(f"shapes-{resolution}px-seed{seed}-n{n}", lambda p: synth.write_folder(p, n, resolution, seed))


def scenes_folder(resolution):
    """--task depth's demo data: scenes.py pairs, rgb/ + depth/ (~4 min)."""
    n, seed = DEPTH_DATA["n"], DEPTH_DATA["seed"]
    return written_once(f"scenes-{resolution}px-seed{seed}-n{n}", lambda p: scenes.write_pairs(p, n, resolution, seed))


def check_config(cfg: TrainConfig):
    """The mistakes we can name before loading anything. Paths become absolute: they are recorded."""
    if cfg.resolution is not None and (cfg.resolution < 8 or cfg.resolution % 8):
        fail(f"--resolution {cfg.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if not cfg.ckpt and cfg.task in ("t2i", "depth") and not os.path.exists(DEMO_PRIOR):
        fail(f"no --ckpt given and the demo prior {os.path.relpath(DEMO_PRIOR)} is missing; pass --ckpt with "
             "an SD 1.x/2.x checkpoint (.safetensors/.ckpt), a diffusers folder or a cached repo id "
             "(or make the demo: scripts/make_demo.sh)")
    fill_defaults(cfg)
    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0), ("save_every", 0),
                      ("sample_every", 0), ("workers", 0), ("vae_steps", 0), ("n_images", 1)):
        if getattr(cfg, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout <= 1 or not 0 <= cfg.ema < 1 or cfg.lr <= 0:
        fail("need 0 <= --caption-dropout <= 1, 0 <= --ema < 1 and --lr > 0")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    cfg.bf16 = cfg.device.startswith("cuda") if cfg.bf16 is None else cfg.bf16
    if cfg.task == "pretrain":
        return None
    if cfg.task == "reflow":  # no --data: the teacher makes it
        check_reflow(cfg)
    elif not cfg.data and cfg.task == "depth":
        fail("--data is required with --ckpt: a folder of pairs, rgb/NAME.png + depth/NAME.png (16-bit mm) or .npy")
    elif not cfg.data:
        fail("--data is required: a folder of images with .txt captions, or with a metadata.jsonl")
    cfg.ckpt = cfg.ckpt or DEMO_PRIOR
    cfg.ckpt = os.path.abspath(cfg.ckpt) if os.path.exists(cfg.ckpt) else cfg.ckpt  # else a cached repo id
    cfg.data = os.path.abspath(cfg.data) if cfg.data else ""
    return lora_config(cfg.lora) if cfg.lora else None


def check_reflow(cfg: TrainConfig):
    """--task reflow: the teacher is --ckpt or the demo's Diff2Flow model; prompts from a file or synth.py."""
    if not cfg.ckpt and not os.path.exists(reflow.DEMO_TEACHER):
        fail(f"no --ckpt given and the demo teacher {os.path.relpath(reflow.DEMO_TEACHER)} is missing; pass --ckpt "
             "(the teacher) and --prompts FILE (or make the demo: scripts/make_demo.sh)")
    if cfg.ckpt and not cfg.prompts:
        fail("--task reflow with --ckpt needs --prompts FILE (one prompt per line) for the teacher's pairs "
             "(or --prompts synth: synth.py captions, for a tiny-family teacher)")
    if cfg.n_pairs < 1 or cfg.teacher_steps < 1:
        fail(f"--n-pairs and --teacher-steps must be >= 1, got {cfg.n_pairs} and {cfg.teacher_steps}")
    cfg.ckpt = cfg.ckpt or reflow.DEMO_TEACHER
    cfg.pairs = os.path.abspath(cfg.pairs or os.path.join(cfg.out, "pairs"))
    cfg.prompts = os.path.abspath(cfg.prompts) if cfg.prompts not in ("", "synth") else cfg.prompts


def lora_config(spec: str):
    if spec in lora.PRESETS:
        return dataclasses.replace(lora.PRESETS[spec])
    try:
        rank = float(spec)
    except ValueError:
        fail(f"unknown --lora {spec!r}: use a preset ({', '.join(lora.PRESETS)}), a rank (e.g. 64) "
             "or a fraction (e.g. 0.2)")
    if not (0 < rank < 1 or rank == int(rank) >= 1):
        fail(f"--lora {spec}: a rank must be an integer >= 1, a fraction must lie in (0, 1)")
    return lora.LoRAConfig(rank=int(rank) if rank >= 1 else rank)


def objective_name(cfg):
    return "fm_dm_direction" if cfg.objective == "fm" and cfg.fm_time == "dm_direction" else cfg.objective


# ----------------------------------------------------------------------------- state that survives a crash

def save_atomic(obj, path):
    """torch.save to a temp file, flushed to disk, then renamed over `path`: a crash leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    """Every RNG a step could touch (LoRA dropout uses torch's; python/numpy for user code), as plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # weights_only loads tensors
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class EMA:
    """Exponential moving average of the trainable weights (fp32, beside them). The decay warms up as
    min(decay, (1 + n) / (10 + n)): early on it follows the weights instead of averaging in the start."""

    def __init__(self, params, decay):
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @contextmanager
    def applied(self):
        """Swap the averaged weights in (to sample or save them), then back."""
        backup = [p.detach().clone() for p in self.params]
        torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_([p.data for p in self.params], backup)

    def state_dict(self):
        return {"n": self.n, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state):
        self.n = state["n"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)  # saved is on the CPU


def trainable_state(unet, lora_cfg):
    return lora.lora_state_dict(unet) if lora_cfg else unet.state_dict()


def open_log(path, upto):
    """log.jsonl, keeping only the lines of steps <= upto (the checkpoint's): steps redone after --resume
    are not logged twice, and a line cut short by a kill (no newline) is dropped."""
    lines = []
    if upto and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= upto]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def load_resume(cfg, path, world):
    """The state of --out/ckpt.pt, if it was trained with the settings that decide the trajectory."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainConfig(**state["config"])
    diff = [f"--{k.replace('_', '-')} {getattr(saved, k)} (now {getattr(cfg, k)})" for k in SAME_ON_RESUME
            if getattr(saved, k) != getattr(cfg, k)]
    if saved.batch_size * saved.grad_accum * state["world_size"] != cfg.batch_size * cfg.grad_accum * world:
        diff.append("another global batch (batch-size x grad-accum x processes)")
    if diff:
        fail(f"--resume: the checkpoint was trained with {'; '.join(diff)}; use the same settings")
    return state


def save_checkpoint(path, cfg, unet, lora_cfg, opt, ema, step, data_pos, ddp, master):
    """ckpt.pt: everything --resume needs. Every process takes part (their RNG states are gathered)."""
    world = dist.get_world_size() if ddp else 1
    rngs = [None] * world if ddp else [rng_state()]
    if ddp:
        dist.all_gather_object(rngs, rng_state())
    if master:
        save_atomic({"model": trainable_state(unet, lora_cfg), "optimizer": opt.state_dict(),
                     "ema": ema.state_dict() if ema else None, "step": step, "data_position": data_pos,
                     "rng": rngs, "world_size": world, "config": dataclasses.asdict(cfg)}, path)


# ----------------------------------------------------------------------------- data

def batch_indices(cfg, n, position, rank, world):
    """Dataset indices of this process's micro-batches, from stream position `position` on. Each step takes
    the next G = grad_accum x world x batch_size positions, laid out as [micro-step][rank][item]: so the same
    global batch spread over fewer or more processes sees the same items per step."""
    G = cfg.batch_size * cfg.grad_accum * world
    for pos in itertools.count(position, G):
        idx = stream_indices(n, cfg.seed, pos, G)
        for m in range(cfg.grad_accum):
            start = (m * world + rank) * cfg.batch_size
            yield idx[start:start + cfg.batch_size]


@torch.no_grad()
def encode(bundle, images, captions, amp):
    """Images (B, 3, R, R) in [-1, 1] -> latent means (B, 4, R/8, R/8); captions -> context (B, 77, width)."""
    with amp():
        return bundle.vae.encode(images).float(), bundle.encode_prompt(list(captions)).float()


def build_cache(cfg, ds, bundle, device, amp):
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
    lat, ctx = [], []
    for images, captions in tqdm(loader, desc="caching latents and text", dynamic_ncols=True):
        z, c = encode(bundle, images.to(device), captions, amp)
        lat.append(z.cpu())
        ctx.append(c.cpu())
    return torch.cat(lat), torch.cat(ctx)


def cached_data(cfg, ds, bundle, device, amp, master, ddp):
    """--cache: rank 0 encodes the data once into --out/cache.pt (reused while data and model are unchanged)."""
    path = os.path.join(cfg.out, "cache.pt")
    mtime = os.path.getmtime(cfg.ckpt) if os.path.exists(cfg.ckpt) else 0.0
    key = {"files": ds.files, "captions": ds.captions, "resolution": cfg.resolution, "ckpt": cfg.ckpt, "mtime": mtime}
    if master:
        cache = torch.load(path, weights_only=True) if os.path.exists(path) else None
        if cache is None or cache["key"] != key:
            latents, context = build_cache(cfg, ds, bundle, device, amp)
            cache = {"key": key, "latents": latents, "context": context}
            save_atomic(cache, path)
    if ddp:
        dist.barrier()
        if not master:
            cache = torch.load(path, weights_only=True)
    return cache["latents"], cache["context"]


def micro_batches(cfg, ds, bundle, cache, device, amp, position, rank, world):
    """Endless (latents, context) micro-batches of this process, from the cache or decoded by workers."""
    indices = batch_indices(cfg, len(ds), position, rank, world)
    if cache is not None:
        for idx in map(torch.tensor, indices):
            yield cache[0][idx].to(device), cache[1][idx].to(device)
    else:  # generator=: the loader must not draw from the global RNG, whose state --resume restores
        loader = torch.utils.data.DataLoader(ds, batch_sampler=indices, num_workers=cfg.workers,
                                             generator=torch.Generator(), pin_memory=device.startswith("cuda"))
        for images, captions in loader:
            yield encode(bundle, images.to(device, non_blocking=True), captions, amp)


@dataclass
class TaskData:
    """What a task feeds train(): `n` items, `batches(position, rank, world)` -> endless micro-batches (dicts on
    the device) from a stream position, and the sample grid. Batch keys: "x1" (target latents (B, C, h, w)),
    "context" (text embeddings (B, 77, width)), optionally "noise" (a fixed FM x_0 for each item, e.g. reflow
    pairs) and "cond" (latents concatenated to the UNet input along channels, e.g. depth's image latent)."""
    n: int
    batches: object
    prompts: list  # the sample grids' prompts (text-to-image grids)
    what: str = "images"
    grid: object = None  # (bundle, unet, objective, path, amp) -> writes a PNG; None: text-to-image rows
    sample: tuple = (SAMPLE_STEPS, SAMPLE_CFG)  # Euler steps and CFG of the text-to-image rows
    meta: dict = field(default_factory=dict)  # final.safetensors metadata over the base's (reflow: steps=4, cfg=1)


def t2i_data(cfg, bundle, device, amp, master, ddp):
    """--task t2i: images + captions from --data (FolderDataset), decoded by workers or cached once."""
    try:
        ds = FolderDataset(cfg.data, cfg.resolution)
    except DataError as e:
        fail(str(e))
    cache = cached_data(cfg, ds, bundle, device, amp, master, ddp) if cfg.cache else None

    def batches(position, rank, world):
        for x1, context in micro_batches(cfg, ds, bundle, cache, device, amp, position, rank, world):
            yield {"x1": x1, "context": context}
    return TaskData(len(ds), batches, list(dict.fromkeys(ds.captions))[:SAMPLE_N])


def reflow_data(cfg, bundle, device, amp, master, ddp):
    """--task reflow: the teacher's (noise, prompt, latent) pairs (reflow.py), made first where missing (each DDP
    rank its own shards); the teacher is the loaded --ckpt, before training touches it. Prompts are encoded per
    micro-batch by the frozen text encoder: the pairs store text, not embeddings."""
    spec, prompt_list = reflow.pair_spec(bundle, cfg.ckpt, cfg.prompts, cfg.teacher_steps, cfg.teacher_cfg,
                                         cfg.seed, reflow.SHARD_SIZE, cfg.resolution)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    reflow.generate_pairs(bundle, cfg.pairs, spec, cfg.n_pairs, prompt_list, rank, world, device, amp, master)
    if ddp:
        dist.barrier()  # every rank's shards are written
    pairs = reflow.load_pairs(cfg.pairs, cfg.n_pairs)

    def batches(position, rank, world):
        for idx in map(torch.tensor, batch_indices(cfg, len(pairs), position, rank, world)):
            with torch.no_grad(), amp():
                context = bundle.encode_prompt([pairs.prompts[i] for i in idx]).float().to(device)
            yield {"x1": pairs.x1[idx].to(device), "noise": pairs.noise[idx].to(device), "context": context}
    meta = dict(steps=reflow.STUDENT_STEPS, cfg=reflow.STUDENT_CFG, teacher_steps=spec.steps, teacher_cfg=spec.cfg,
                n_pairs=len(pairs))
    return TaskData(len(pairs), batches, pairs.prompts[:SAMPLE_N], "pairs",
                    sample=(reflow.STUDENT_STEPS, reflow.STUDENT_CFG), meta=meta)


def depth_data(cfg, bundle, device, amp, master, ddp):
    """--task depth: (image, depth) pairs from --data (depth.PairDataset), encoded once: x1 = the depth latent,
    cond = the image latent, context = the empty prompt. The prior's UNet gets its first conv widened to take
    both (depth.expand_first_conv); a depth model given as --ckpt is trained on as it is."""
    ucfg = bundle.unet.cfg
    if ucfg.in_channels == ucfg.out_channels:
        depth.expand_first_conv(bundle.unet)
    try:
        depth.check_depth_model(bundle, cfg.ckpt)
        ds = depth.PairDataset(cfg.data)
        with amp():
            x1, cond = depth.encode_pairs(bundle, ds, cfg.resolution)
    except depth.DepthError as e:
        fail(str(e))
    empty = bundle.encode_prompt([""]).float().to(device)  # (1, 77, width), the only text

    def batches(position, rank, world):
        for idx in map(torch.tensor, batch_indices(cfg, len(ds), position, rank, world)):
            yield {"x1": x1[idx].to(device), "cond": cond[idx].to(device), "context": empty.expand(len(idx), -1, -1)}

    def grid(bundle, unet, objective, path, amp):  # the first 4 pairs: image, target, prediction
        depth.sample_grid(bundle, unet, objective, x1[:4].to(device), cond[:4].to(device), empty, path, amp)
    return TaskData(len(ds), batches, [""], "depth pairs", grid=grid, meta=dict(steps=10, ensemble=4))


# task -> fn(cfg, bundle, device, amp, master, ddp) -> TaskData. It runs before the UNet is set up for
# training, so it may also adapt bundle.unet (depth widens the first conv to take the image latent).
TASK_DATA = {"t2i": t2i_data, "reflow": reflow_data, "depth": depth_data}


def draw(cfg, objective, step, n, shape, T, device):
    """Noise, timesteps and caption-dropout flags of the whole global step (n items) from a generator seeded
    with (seed, step): every process draws the same numbers and keeps its slice, so N processes see what one
    process with the same global batch sees, and a resumed run redraws exactly what it would have."""
    g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
    noise = torch.randn((n, *shape), generator=g, device=device)
    if objective == "diffusion":  # integer timesteps, as SD was trained (diffusion_loss's own default)
        t = (torch.rand(n, generator=g, device=device, dtype=torch.float64) * T).floor().clamp(max=T - 1)
    else:
        t = diff2flow.sample_fm_time(n, cfg.t_sampling, g, device)
    return noise, t, torch.rand(n, generator=g, device=device) < cfg.caption_dropout


# ----------------------------------------------------------------------------- samples and outputs

@torch.no_grad()
def sample_grid(bundle, unet, objective, context, uncond, noise, path, amp, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG):
    """One row of images for the fixed prompts and noise, saved atomically as PNG."""
    model = diff2flow.velocity_model(unet, bundle.alphas_cumprod, bundle.prediction, objective)
    unet.eval()
    with amp():
        z = diff2flow.sample_euler(model, noise, steps, context, uncond, cfg)
        images = bundle.vae.decode(z.to(next(bundle.vae.parameters()).dtype)).float()
    unet.train()
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, 3, H, W)
    grid = images.permute(2, 0, 3, 1).flatten(1, 2)  # (H, N*W, 3): the images side by side
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(grid.numpy()).save(tmp)
    os.replace(tmp, path)


def save_final(cfg, path, bundle, unet, lora_cfg, step, meta=None):
    """final.safetensors: what sample.py loads with no flags (objective + prediction + resolution in the
    metadata). LoRA: only the trained tensors; the metadata names the base (absolute path or repo id)."""
    extra = dict(resolution=cfg.resolution, train_steps=step, task=cfg.task, **(meta or {}))
    if lora_cfg:
        lora.save_lora(unet, path, lora_cfg, base=cfg.ckpt, objective=objective_name(cfg),
                       prediction=bundle.prediction, **extra)
    else:  # sd.save records the bundle's objective and prediction itself; the base's sampling defaults stay
        extra = {**{k: bundle.meta[k] for k in ("cfg", "steps") if k in bundle.meta}, **extra}  # (a LoRA: its base's)
        sd.save(dataclasses.replace(bundle, unet=unet, objective=objective_name(cfg)), path, **extra)


# ----------------------------------------------------------------------------- --task pretrain: the tiny family

PRETRAIN_PROMPTS = ["a large red circle at the center on a blue background",
                    "a small yellow star at the top left on a black background",
                    "a large green square at the bottom right on a white background",
                    "a large white triangle at the center on a purple background"]
PRETRAIN_SAMPLING = dict(steps=25, cfg=4.0)  # sample.py's defaults for the prior (metadata)


def shapes(seed, start, n, size):
    """Items start..start+n-1 of synth.ShapesDataset(seed): images (n, 3, size, size) in [-1, 1], captions."""
    ds = synth.ShapesDataset(seed, start + n, size)
    items = [ds[i] for i in range(start, start + n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def cosine_lr(cfg, step, total):
    """Linear warmup, then cosine decay to 10% of --lr: short from-scratch runs end on small steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.55 + 0.45 * math.cos(math.pi * (step - cfg.warmup) / max(1, total - cfg.warmup)))


def vae_loss(vae, x, kl_weight=1e-6):
    """L1 + MSE reconstruction of the posterior mean + kl_weight x KL(q(z|x) || N(0, I)) per latent element
    (LDM's tiny KL weight: the latents only need to stay bounded, not Gaussian). From the mean, not a
    posterior sample: at init that sample's noise (std 1) buries the latent, and in a few hundred steps
    the VAE only learned the background colour; the diffusion model uses the mean anyway (vae.encode)."""
    mean, logvar = vae.encode_moments(x)  # (B, 4, R/f, R/f) each, unscaled
    recon = vae.decoder(vae.post_quant_conv(mean))
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    # the shape covers ~5% of the pixels: weighted 10x (pixels off the median = background colour), else the
    # VAE spends hundreds of steps on backgrounds alone and decodes shapes as blurs
    mask = (x - x.flatten(2).median(2).values[..., None, None]).abs().sum(1, keepdim=True) > 0.1  # (B, 1, H, W)
    w = 1 + 9 * mask.float()
    err = recon - x
    return (w * (err.abs() + err**2)).mean() / w.mean() + kl_weight * kl


VAE_LR = 2e-3
VAE_BATCH = 32  # flat-coloured shapes: small batches reconstruct fine, and the VAE is the costlier model per image


def pretrain_vae(cfg, vae, log):
    """Stage 1: the VAE on a fresh batch of synthetic images every step, then its latent scale."""
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)):
        x, _ = shapes(cfg.seed, step * VAE_BATCH, VAE_BATCH, cfg.resolution)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(dataclasses.replace(cfg, lr=VAE_LR), step, cfg.vae_steps)
        loss = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"stage": "vae", "step": step + 1, "loss": loss.item()}) + "\n")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's 0.18215 is 1 / std of its VAE's latents; ours is measured the same way
        x, _ = shapes(cfg.seed + 1, 0, 512, cfg.resolution)
        vae.scale_factor = vae.cfg.scale_factor = 1.0 / vae.encode_moments(x)[0].std().item()
        err = (vae.decode(vae.encode(x)) - x).abs().mean().item()
    print(f"vae: latent scale_factor {vae.scale_factor:.4f}, reconstruction L1 {err:.4f} (images in [-1, 1])")


def vary_caption(text, rng, keep=0.7):
    """Drop the size and the position phrase, each with probability 1 - keep: the prior also learns short
    prompts such as "a red circle on a blue background" (the README's first command)."""
    a = synth.parse_caption(text)
    size = f"{a.size} " if rng.random() < keep else ""
    where = f" at the {a.position}" if rng.random() < keep else ""
    return f"a {size}{a.color} {a.shape}{where} on {'an' if a.background[0] in 'aeiou' else 'a'} {a.background} background"


@torch.no_grad()
def encode_dataset(cfg, bundle):
    """--n-images synthetic images -> latent means (N, 4, R/f, R/f) and caption token ids (N, 77)."""
    latents, ids, rng = [], [], random.Random(cfg.seed)
    for start in tqdm(range(0, cfg.n_images, 256), desc="encoding", dynamic_ncols=True):
        x, captions = shapes(cfg.seed, start, min(256, cfg.n_images - start), cfg.resolution)
        latents.append(bundle.vae.encode(x))
        ids.append(bundle.tokenizer([vary_caption(c, rng) for c in captions]))
    return torch.cat(latents), torch.cat(ids)


def pretrain_prior(cfg, bundle, log):
    """Stage 2: UNet + text encoder jointly, SD's diffusion loss (v-prediction, integer timesteps)."""
    latents, ids = encode_dataset(cfg, bundle)
    empty = bundle.tokenizer([""])  # (1, 77): dropped captions train the unconditional branch of CFG
    unet, text = bundle.unet.train(), bundle.text_encoder.train()
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema, abar = EMA(params, cfg.ema), bundle.alphas_cumprod
    for step in (bar := tqdm(range(cfg.steps), desc="unet + text", dynamic_ncols=True)):
        idx = torch.tensor(stream_indices(len(latents), cfg.seed, step * cfg.batch_size, cfg.batch_size))
        noise, t, drop = draw(cfg, "diffusion", step, len(idx), latents.shape[1:], len(abar), "cpu")
        context = text(torch.where(drop[:, None], empty, ids[idx]))  # (B, 77, width), with gradients
        loss = diff2flow.diffusion_loss(unet, latents[idx], context, abar, bundle.prediction, noise=noise, t=t)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg, step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        opt.step()
        ema.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"stage": "unet", "step": step + 1, "loss": loss.item()}) + "\n")
    torch._foreach_copy_([p.data for p in params], ema.shadow)  # keep the averaged weights
    unet.eval().requires_grad_(False), text.eval().requires_grad_(False)


def pretrain(cfg):
    """--task pretrain: the tiny VAE, then the tiny prior; writes vae.safetensors and prior.safetensors."""
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    torch.manual_seed(cfg.seed)
    bundle = sd.create(unet="tiny", vae="tiny", text="tiny", prediction="v")  # SD's schedule (sd_alphas_cumprod)
    print(f"pretraining the tiny family at {cfg.resolution} px, {cfg.threads} thread(s): VAE "
          f"{cfg.vae or cfg.vae_steps} "
          f"steps, then UNet + text encoder {cfg.steps} steps of {cfg.batch_size} on {cfg.n_images} images")
    t0 = time.time()
    with open(os.path.join(cfg.out, "log.jsonl"), "a" if cfg.vae else "w") as log:
        if cfg.vae:  # stage 1 done before: reuse that VAE (with its scale_factor)
            bundle.vae = sd.load(cfg.vae).vae.eval().requires_grad_(False)
        else:
            pretrain_vae(cfg, bundle.vae, log)
            sd.save(bundle, os.path.join(cfg.out, "vae.safetensors"), resolution=cfg.resolution)
        t1 = time.time()
        pretrain_prior(cfg, bundle, log)
    t2 = time.time()
    final = os.path.join(cfg.out, "prior.safetensors")
    sd.save(bundle, final, resolution=cfg.resolution, **PRETRAIN_SAMPLING, train_steps=cfg.steps,
            vae_steps=cfg.vae_steps, vae_minutes=f"{(t1 - t0) / 60:.1f}", unet_minutes=f"{(t2 - t1) / 60:.1f}")
    empty = bundle.encode_prompt([""])
    noise = torch.randn((len(PRETRAIN_PROMPTS), bundle.vae.cfg.embed_dim, cfg.resolution // bundle.vae.downsample,
                         cfg.resolution // bundle.vae.downsample), generator=torch.Generator().manual_seed(cfg.seed))
    sample_grid(bundle, bundle.unet, "diffusion", bundle.encode_prompt(PRETRAIN_PROMPTS), empty, noise,
                os.path.join(cfg.out, "samples", "prior.png"), nullcontext)
    print(f"wrote {final} (VAE {(t1 - t0) / 60:.1f} min, UNet + text {(t2 - t1) / 60:.1f} min); "
          f"try: python sample.py --ckpt {final} --prompt {json.dumps(PRETRAIN_PROMPTS[0])}")
    return final


# ----------------------------------------------------------------------------- main

def return_freed_memory():
    """Linux CPU training with --grad-checkpointing: have glibc give freed tensors back to the OS at once.
    After the first large free glibc raises its mmap threshold (up to 32 MiB), so activations of 1-32 MiB
    then come from the heap, and the pages of freed ones stay resident between live ones: 640 MiB of the
    3.6 GiB peak RSS of a 64x64 batch-4 full fine-tuning step with checkpointing (bench_train.py). A fixed
    1 MiB threshold gives each such tensor its own mapping, unmapped when freed; the page faults cost ~10%
    of a step (best of 3)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (malloc.h)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            pass


def main(argv=None):
    cfg = parse_args(argv)
    lora_cfg = check_config(cfg)
    if cfg.task == "pretrain":
        return pretrain(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun (nanoGPT style)
    if ddp:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg.device)
    else:
        rank, world = 0, 1
    try:
        return train(cfg, lora_cfg, ddp, rank, world)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, lora_cfg, ddp, rank, world):
    master, device, objective = rank == 0, cfg.device, objective_name(cfg)
    amp = functools.partial(torch.autocast, torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    ckpt_path, G = os.path.join(cfg.out, "ckpt.pt"), cfg.batch_size * cfg.grad_accum * world
    state = load_resume(cfg, ckpt_path, world) if cfg.resume else None
    if state is None and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if master:
        os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)

    try:
        bundle = sd.load(cfg.ckpt, device=device, prediction=cfg.prediction)
    except sd.LoadError as e:
        fail(str(e))
    unet, f = bundle.unet, bundle.vae.downsample
    need = f * 2 ** (len(unet.cfg.channel_mult) - 1)  # the VAE's factor x the UNet's downsamplings
    if cfg.resolution % need:
        fail(f"--resolution {cfg.resolution} must be a multiple of {need} for this model "
             f"(VAE factor {f} x UNet downsampling {need // f})")
    if any(isinstance(m, lora.LoRALayer) for m in unet.modules()):
        fail(f"--ckpt {cfg.ckpt} is a LoRA file; train from its base model instead")
    data = TASK_DATA[cfg.task](cfg, bundle, device, amp, master, ddp)
    unet = bundle.unet  # the task may have adapted it

    # the model: fp32 master weights; only the UNet (or its LoRA) trains
    torch.manual_seed(cfg.seed + rank)  # LoRA's random init (DDP broadcasts rank 0's), then e.g. LoRA dropout
    if lora_cfg:
        lora.apply_lora(unet, lora_cfg)
    else:
        unet.requires_grad_(True)
    unet.train()
    unet.grad_checkpointing = cfg.grad_checkpointing
    if cfg.grad_checkpointing and device == "cpu":
        return_freed_memory()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.startswith("cuda"))
    start, data_pos, last_good = 0, 0, "none (no checkpoint written yet)"
    if state is not None:
        lora.load_exact(unet, state["model"], trainable_state(unet, lora_cfg).keys(), ckpt_path)
        opt.load_state_dict(state["optimizer"])
        start, data_pos, last_good = state["step"], state["data_position"], ckpt_path
    model = torch.compile(unet) if cfg.compile else unet
    if ddp:  # the frozen VAE and text encoder stay outside: DDP would only see unused parameters there
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    ema = EMA(params, cfg.ema) if cfg.ema and master else None  # after DDP: it has broadcast rank 0's weights
    if ema and state is not None:
        ema.load_state_dict(state["ema"])
    if master:
        n_train = sum(p.numel() for p in params)
        print(f"{objective} on {bundle.name} ({bundle.version}, {bundle.prediction}-prediction): "
              f"{'LoRA ' + cfg.lora if lora_cfg else 'full fine-tuning'}, {n_train / 1e6:.2f}M trainable, "
              f"{data.n} {data.what}, global batch {G}, {world} process(es)")

    # data, and the fixed prompts + noise of the sample grids
    empty = bundle.encode_prompt([""]).float()  # (1, 77, width): dropped captions and the CFG branch
    prompts = data.prompts
    if cfg.sample_prompts:
        with open(cfg.sample_prompts, encoding="utf-8") as fp:
            prompts = [line.strip() for line in fp if line.strip()]
        if not prompts:
            fail(f"--sample-prompts {cfg.sample_prompts}: no prompts in it (one per line)")
    sample_ctx = bundle.encode_prompt(prompts).float()
    shape = (bundle.vae.cfg.embed_dim, cfg.resolution // f, cfg.resolution // f)
    sample_noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    if cfg.cache:  # every context is computed now: the text encoder and VAE encoder can leave the GPU
        bundle.text_encoder.to("cpu"), bundle.vae.encoder.to("cpu")
    batches = data.batches(data_pos, rank, world)

    def grid(path):
        if data.grid:
            return data.grid(bundle, unet, objective, path, amp)
        sample_grid(bundle, unet, objective, sample_ctx, empty, sample_noise, path, amp, *data.sample)

    if master:
        log = open_log(os.path.join(cfg.out, "log.jsonl"), start)
        if state is None and cfg.sample_every:
            grid(os.path.join(cfg.out, "samples", "step_000000.png"))
    if state is not None:
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    abar, loss_fn = bundle.alphas_cumprod.to(device), LOSSES[objective]

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not master, dynamic_ncols=True)
    for step in bar:  # `step` optimizer steps are done; this is step + 1
        t0 = time.time()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        noise, t, drop = draw(cfg, objective, step, G, shape, len(abar), device)
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            b = next(batches)
            i = slice((m * world + rank) * cfg.batch_size, (m * world + rank + 1) * cfg.batch_size)
            context = torch.where(drop[i, None, None], empty, b["context"])
            net = diff2flow.ConcatCond(model, b["cond"]) if "cond" in b else model
            if ddp:  # all-reduce the gradients only once, after the last micro-step
                model.require_backward_grad_sync = m == cfg.grad_accum - 1
            with amp():
                loss = loss_fn(net, b["x1"], context, abar, bundle.prediction, noise=b.get("noise", noise[i]),
                               t=t[i])
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
        loss_val = loss_sum.item()
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            what = f"loss is {loss_val}" if not math.isfinite(loss_val) else f"gradient norm is {grad_norm}"
            bar.close()
            fail(f"{what} at step {step + 1}; stopped without updating the weights; last good checkpoint: {last_good}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema.update()
        done = step + 1

        if master:
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
            log.write(json.dumps({"step": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                                  "time": time.time() - t0}) + "\n")
            log.flush()
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            save_checkpoint(ckpt_path, cfg, unet, lora_cfg, opt, ema, done, data_pos + (done - start) * G, ddp, master)
            last_good = ckpt_path
        if master and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            with ema.applied() if ema else nullcontext():
                grid(os.path.join(cfg.out, "samples", f"step_{done:06d}.png"))
    bar.close()

    final = os.path.join(cfg.out, "final.safetensors")
    if master:
        log.close()
        with ema.applied() if ema else nullcontext():
            save_final(cfg, final, bundle, unet, lora_cfg, cfg.steps, data.meta)
        try_it = (f"python depth.py IMAGE --ckpt {final}" if cfg.task == "depth" else
                  f"python sample.py --ckpt {final} --prompt {json.dumps(prompts[0] if prompts else '')}")
        print(f"wrote {final} ({objective}{', LoRA ' + cfg.lora if lora_cfg else ''}); try: {try_it}")
    return final


if __name__ == "__main__":
    main()
