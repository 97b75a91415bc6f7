"""Fine-tune Stable Diffusion with Diff2Flow (arXiv 2506.02221), naive flow matching or the diffusion loss, for
text-to-image (t2i), reflow (reflow.py) or image-to-depth (depth.py). One straight-line script, nanoGPT style.

    python train.py --task t2i            # the demo: Diff2Flow fine-tuning of the tiny prior, ~3 min on 2 cores
    python train.py --task depth          # image-to-depth on synthetic rooms (toy/scenes.py), 64 px
    python train.py --task reflow         # the demo's reflow: teacher pairs, then a LoRA, ~15 min
    python train.py --ckpt v1-5-pruned-emaonly.safetensors --data my_images/ --lora small --steps 2000
    torchrun --nproc_per_node=8 train.py --ckpt ... --data ... --batch-size 4   # DDP, one process per GPU
    python train.py --ckpt ... --data ... --resume                              # continue after a crash

A preset (end of --help) fills each option not given: TASK-demo without --ckpt, TASK with one. --out (one run at
a time) gets ckpt.pt (a link to the newest of --keep checksummed ckpt-STEP.pt), final.safetensors, log.jsonl and
samples/*.png. Ctrl-C or SIGTERM ends the step, writes ckpt.pt and exits; NaN/inf or weights grown 10x stop a run.
"""
import dataclasses
import functools
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cpu_fast
import data
import depth
import diff2flow
import lora
import reflow
import sd
from common import (EMA, CheckpointError, DiskFull, DivergenceGuard, FolderLock, RunLog, dataclass_parser, fail,
                    given_options, load_checkpoint_file, load_settings, lr_at, one_line_warnings, resolve_settings,
                    return_freed_memory, rng_state, save_checkpoint_file, seed_all, set_rng_state, stop_signals,
                    usage_error)

DEMO_PRIOR = os.path.join(data.ROOT, "assets", "demo", "prior_tiny.safetensors")
LOSSES = diff2flow.LOSSES  # objective name (as recorded in the checkpoint) -> its loss
TASKS = {"t2i": data.t2i_task, "reflow": reflow.task, "depth": depth.task}  # (cfg, bundle, env) -> data.TaskData
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
SETTINGS = os.path.join(data.ROOT, "recipes")  # --preset: presets.toml (ckpt: in the repository), --recipe: paper.toml
PRESETS = {n: {k: os.path.join(data.ROOT, v) if k == "ckpt" else v for k, v in p.items()}
           for n, p in load_settings(os.path.join(SETTINGS, "presets.toml")).items()}
RECIPES = load_settings(os.path.join(SETTINGS, "paper.toml"))  # the paper's runs, values with sources (README)


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:  # None: the preset's value
    task: str = arg("t2i", "text-to-image, reflow (reflow.py) or image-to-depth (depth.py)", choices=list(TASKS))
    preset: str = arg(None, "named settings for every option not given (end of --help)")
    recipe: str = arg(None, "a paper run (README 'Paper recipes'): values for every option not given", choices=list(RECIPES))
    ckpt: str = arg(None, "model to fine-tune (reflow: the teacher): anything sd.load takes")
    data: str = arg(None, "t2i: images + .txt captions, a metadata.jsonl or tar shards (data.py); depth: rgb/ + depth/ "
                    "(depth.py); depth mixes several: --data A --data B", action=data.Sources)
    data_weights: str = arg("", "depth: the sources' weights, e.g. 0.9,0.1 (default: their sizes)")
    out: str = arg(None, "output folder")
    objective: str = arg("diff2flow", "training loss", choices=["diff2flow", "fm", "diffusion"])
    fm_time: str = arg("fm", "--objective fm: the UNet's time is t_FM (official) or (1 - t_FM)(T - 1)",
                       choices=["fm", "dm_direction"])
    t_sampling: str = arg("uniform", "FM time distribution (diff2flow, fm)", choices=diff2flow.FM_TIME_SAMPLINGS)
    prediction: str = arg(None, "eps or v: override the guess for an SD2 file whose name does not say",
                          choices=["eps", "v"])
    lora: str = arg(None, "LoRA: a preset (base, small), a rank (64) or a width fraction (0.2); '' = full fine-tuning")
    lora_full: str = arg("first,last", "with --lora, layers trained fully beside it: first,last (the paper's first "
                         "conv + output block), first, or none (a pure LoRA that every tool loads exactly)")
    resolution: str = arg(None, "pixels: a side (512) or HxW (384x512); resized to cover, cropped (else: the ckpt's)")
    crop: str = arg("center", "where the crop to --resolution is taken", choices=["center", "random"])
    random_flip: bool = arg(False, "mirror half the images left-right (depth: with their depth maps)")
    batch_size: int = arg(None, "images per process and micro-step; global batch = this x grad-accum x processes")
    grad_accum: int = arg(1, "micro-steps per optimizer step")
    lr: float = arg(None, "peak learning rate (the preset's lora_lr with --lora)")
    warmup: int = arg(None, "linear learning-rate warmup steps, then --lr-decay")
    lr_decay: str = arg("none", "after the warmup: constant or cosine (to 10%% at --steps)", choices=["none", "cosine"])
    optimizer: str = arg("adamw", "adamw, or adam (the official code's; its weight decay is L2)", choices=list(OPTIMIZERS))
    weight_decay: float = arg(0.01, "weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = no clipping)")
    ema: float = arg(None, "EMA decay of the weights sampled and saved (0 = off), warmed up as --ema-warmup says")
    ema_warmup: str = arg("ours", "(1+n)/(10+n) or official: copy 1000 steps, then 1-(1+n)^-3/4", choices=["ours", "official"])
    zero_terminal_snr: bool = arg(False, "zero terminal SNR schedule (Lin et al.), recorded: sampling follows it")
    caption_dropout: float = arg(None, "fraction of captions replaced by the empty prompt (trains CFG)")
    steps: int = arg(None, "optimizer steps in total (raise it with --resume to train on)")
    pairs: str = arg("", "reflow: folder of the teacher's pairs, made or completed first (default: OUT/pairs)")
    n_pairs: int = arg(None, "reflow: pairs to make and train on")
    prompts: str = arg(None, "reflow: the pairs' prompts, a file with one per line, used in order")
    teacher_steps: int = arg(40, "reflow: Euler steps of the teacher's ODE per pair")
    teacher_cfg: float = arg(None, "reflow: the teacher's guidance (default: its metadata 'cfg', else 7.5)")
    seed: int = arg(0, "seed of the data order, noise, timesteps and caption dropout")
    save_every: int = arg(None, "write ckpt.pt every N steps (0 = only at the end)")
    keep: int = arg(2, "checkpoints kept, as ckpt-STEP.pt (ckpt.pt: a link to the newest)")
    sample_every: int = arg(None, "write a sample grid every N steps (0 = never)")
    sample_prompts: str = arg("", "file with one prompt per line for the grids (default: the first 4 captions)")
    tensorboard: bool = arg(False, "also log to --out/tensorboard (pip install tensorboard); else see samples/loss.png")
    cache: bool = arg(None, "encode every image (and depth map) and caption once (t2i: --out/cache/ shards), then "
                      "run only the UNet")
    bf16: bool = arg(None, "bf16 autocast, fp32 master weights (default: on for CUDA)")
    compile: bool = arg(False, "torch.compile the UNet")
    grad_checkpointing: bool = arg(False, "recompute UNet activations in backward: less memory, ~30-40%% slower")
    workers: int = arg(None, "DataLoader processes decoding images (t2i without --cache)")
    threads: int = arg(0, "torch CPU threads (0: 1 on CPU, fastest for small models on a busy machine)")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu (torchrun: cuda:LOCAL_RANK)")
    resume: bool = arg(False, "continue from --out/ckpt.pt (weights, optimizer, EMA, step, RNG, data position)")
    depth_norm: str = arg("ours", "depth targets' log-depth normalisation (depth.normalize_depth)", choices=list(depth.NORMS))
    print_config: bool = arg(False, "print the resolved settings as JSON and exit (loads nothing)")


SAME_ON_RESUME = ("task", "ckpt", "data", "data_weights", "objective", "fm_time", "t_sampling", "prediction", "lora",
                  "lora_full", "resolution", "crop", "random_flip", "lr", "warmup", "lr_decay", "optimizer", "bf16",
                  "weight_decay", "grad_clip", "ema", "ema_warmup", "caption_dropout", "zero_terminal_snr", "seed",
                  "depth_norm", "pairs", "n_pairs", "prompts", "teacher_steps", "teacher_cfg", "compile")  # others may change


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is an option; booleans are flags, --x/--no-x where the preset decides."""
    rows = [f"  {n:12} " + ", ".join(f"{k}={v!r}" for k, v in p.items() if k not in ("ckpt", "sources"))
            for n, p in PRESETS.items()]
    epilog = "presets (--preset NAME; flags win; the demo presets' --ckpt is the bundled demo):\n" + "\n".join(rows)
    parser = dataclass_parser(TrainConfig, __doc__, epilog + "\nrecipes (--recipe NAME): " + ", ".join(RECIPES))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    cfg.given = given_options(parser, argv)  # what the command line sets: it wins over recipes and presets
    return cfg


def check_config(cfg: TrainConfig):
    """Options not given <- the recipe, then the preset (common.resolve_settings), then the mistakes we can name
    before loading anything (exit status 2); data.check_options: resolution, sources, absolute paths (recorded)."""
    resolve_settings(cfg, PRESETS, RECIPES, int(os.environ.get("WORLD_SIZE", 1)))  # --print-config exits here
    if not cfg.ckpt:
        usage_error(f"--preset {cfg.preset} needs --ckpt: an SD 1.x/2.x checkpoint (.safetensors/.ckpt), a "
                    "diffusers folder or a cached repo id")
    if cfg.ckpt in (DEMO_PRIOR, reflow.DEMO_TEACHER) and not os.path.exists(cfg.ckpt):
        fail(f"no --ckpt given and the demo model {os.path.relpath(cfg.ckpt)} is missing; pass --ckpt with an SD "
             "1.x/2.x checkpoint (or make the demo: toy/make_demo.sh)")
    meta = sd.safetensors_metadata(cfg.ckpt) if os.path.isfile(cfg.ckpt) and cfg.ckpt.endswith(".safetensors") else {}
    cfg.threads = cfg.threads or (1 if cfg.device == "cpu" else torch.get_num_threads())
    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0), ("save_every", 0),
                      ("sample_every", 0), ("workers", 0), ("keep", 1)):
        if getattr(cfg, name) < low:
            usage_error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout <= 1 or not 0 <= cfg.ema < 1 or not 0 < cfg.lr < 1e30:
        usage_error("need 0 <= --caption-dropout <= 1, 0 <= --ema < 1 and 0 < --lr < 1e30")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        usage_error(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    if cfg.task == "reflow" and (not cfg.prompts or cfg.n_pairs < 1 or cfg.teacher_steps < 1):
        usage_error("--task reflow needs --prompts FILE (one per line); --n-pairs and --teacher-steps must be >= 1")
    data.check_args(cfg)
    cfg.bf16 = cfg.device.startswith("cuda") if cfg.bf16 is None else cfg.bf16
    cfg.ckpt = os.path.abspath(cfg.ckpt) if os.path.exists(cfg.ckpt) else cfg.ckpt  # else a repo id
    cfg.pairs = os.path.abspath(cfg.pairs or os.path.join(cfg.out, "pairs")) if cfg.task == "reflow" else cfg.pairs
    lora_cfg = lora.config_from_args(cfg.lora, cfg.lora_full, cfg.task) if cfg.lora else None
    try:  # the data options (data.check_options: resolution, sources, augmentation; the demo's data)
        return lora_cfg, data.check_options(cfg, meta)
    except ValueError as e:
        usage_error(str(e))


def load_resume(cfg, path, world):
    """The state of --out/ckpt.pt, if it was trained with the settings that decide the trajectory."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint {path}")
    state = load_checkpoint_file(path, required=("model", "optimizer", "step", "config", "world_size", "rng"))
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__})
    diff = [f"--{k.replace('_', '-')} {getattr(saved, k)} (now {getattr(cfg, k)})" for k in SAME_ON_RESUME
            if getattr(saved, k) != getattr(cfg, k)]
    if saved.batch_size * saved.grad_accum * state["world_size"] != cfg.batch_size * cfg.grad_accum * world:
        diff.append("another global batch (batch-size x grad-accum x processes)")
    diff += data.resume_conflicts(cfg, saved, state["world_size"], world)
    if diff:
        fail(f"--resume: the checkpoint was trained with {'; '.join(diff)}; use the same settings")
    if cfg.steps < state["step"]:
        fail(f"--resume: --steps {cfg.steps} is below the checkpoint's step {state['step']}; pass --steps >= that")
    return state


def save_checkpoint(run, step):
    """ckpt.pt: everything --resume needs. Every process takes part (their RNG states are gathered)."""
    rngs = [None] * run.env.world if run.ddp else [rng_state()]
    if run.ddp:
        dist.all_gather_object(rngs, rng_state())
    if run.env.master:
        state = {"model": lora.lora_state_dict(run.unet) if run.lora_cfg else run.unet.state_dict(), "step": step,
                 "optimizer": run.opt.state_dict(), "ema": run.ema.state_dict() if run.ema else None, "rng": rngs,
                 "data_position": run.data_pos + (step - run.start) * run.G, "world_size": run.env.world,
                 "config": dataclasses.asdict(run.cfg), "guard": run.guard.ref}
        save_checkpoint_file(state, run.ckpt_path, run.cfg.keep)
    run.last_good = run.ckpt_path


def save_final(run):
    """final.safetensors (EMA weights): what sample.py loads with no flags (objective, prediction, resolution in
    the metadata). LoRA: only the trained tensors, naming the base (path or repo id), and final_kohya.safetensors."""
    cfg, bundle, path = run.cfg, run.bundle, os.path.join(run.cfg.out, "final.safetensors")
    extra = dict(resolution=cfg.resolution, train_steps=cfg.steps, task=cfg.task, **run.data.meta,
                 zero_terminal_snr=bool(bundle.alphas_cumprod[-1] == 0))  # sd.load rescales a LoRA's base by it
    with run.ema.applied() if run.ema else nullcontext():
        if run.lora_cfg:
            print(lora.save_final(run.unet, path, run.lora_cfg, base=cfg.ckpt, objective=run.objective,
                                  prediction=bundle.prediction, **extra))
        else:  # sd.save records objective and prediction itself; the base's sampling defaults stay
            extra = {**{k: bundle.meta[k] for k in ("cfg", "steps") if k in bundle.meta}, **extra}
            sd.save(dataclasses.replace(bundle, unet=run.unet, objective=run.objective), path, **extra)
    try_it = f"depth.py IMAGE --ckpt {path}" if cfg.task == "depth" else \
        f"sample.py --ckpt {path} --prompt {json.dumps(run.data.prompts[0])}"
    print(f"wrote {path} ({run.objective}{', LoRA ' + cfg.lora if run.lora_cfg else ''}); try: python {try_it}")
    return path


def load_model(cfg, env):
    """The bundle, checked against the settings before anything is written."""
    try:
        bundle = sd.load(cfg.ckpt, device=env.device, prediction=cfg.prediction)
    except sd.LoadError as e:
        fail(str(e))
    f, need = bundle.vae.downsample, depth.size_multiple(bundle)  # the VAE's factor x the UNet's downsamplings
    if any(side % need for side in data.parse_resolution(cfg.resolution)):
        usage_error(f"--resolution {cfg.resolution} must be a multiple of {need} for this model "
                    f"(VAE factor {f} x UNet downsampling {need // f})")
    if any(isinstance(m, lora.LoRALayer) for m in bundle.unet.modules()):
        usage_error(f"--ckpt {cfg.ckpt} is a LoRA file; train from its base model instead")
    return bundle


def build(cfg, lora_cfg, makes, env, ddp, lock=None):
    """Model, task data, optimizer and EMA, from --resume's checkpoint if asked. Returns what the loop touches
    (model: the UNet as trained, compiled / DDP; start: steps done, at stream position data_pos) and that state."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    state = load_resume(cfg, ckpt_path, env.world) if cfg.resume else None  # a fresh run: the lock checks ckpt.pt
    bundle = load_model(cfg, env)
    for make in makes if env.master else ():  # the demo's data, once
        make()
    if ddp:
        dist.barrier()
    try:
        task = TASKS[cfg.task](cfg, bundle, env)  # it may adapt the UNet (depth widens its first conv)
    except (data.DataError, depth.DepthError) as e:
        fail(str(e))
    if cfg.zero_terminal_snr:  # after the task: a reflow teacher's pairs keep the teacher's own schedule
        bundle.alphas_cumprod = diff2flow.rescale_zero_terminal_snr(bundle.alphas_cumprod)
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)  # the inputs are good: now the outputs
    if lock:  # held from here (and killed writers' temp files are removed)
        lock.acquire()
    unet = bundle.unet
    seed_all(cfg.seed + env.rank)  # LoRA's random init (DDP broadcasts rank 0's), then e.g. LoRA dropout
    lora.apply_lora(unet, lora_cfg) if lora_cfg else unet.requires_grad_(True)
    unet.train().grad_checkpointing = cfg.grad_checkpointing
    if cfg.grad_checkpointing and env.device == "cpu":
        return_freed_memory()
    if env.device == "cpu":  # the sample grids run the CPU fast paths (training itself, the plain layers)
        cpu_fast.enable(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=env.device.startswith("cuda"))
    if state is not None:
        keys = (lora.lora_state_dict(unet) if lora_cfg else unet.state_dict()).keys()
        lora.load_exact(unet, state["model"], keys, ckpt_path)
        opt.load_state_dict(state["optimizer"])
    model = torch.compile(unet) if cfg.compile else unet
    if ddp:  # the frozen VAE and text encoder stay outside: DDP would only see unused parameters there
        model = DDP(model, device_ids=[torch.cuda.current_device()] if env.device.startswith("cuda") else None)
    ema = EMA(params, cfg.ema, cfg.ema_warmup) if cfg.ema and env.master else None  # after DDP broadcast rank 0's
    if ema and state is not None:
        ema.load_state_dict(state["ema"])
    objective = "fm_dm_direction" if cfg.objective == "fm" and cfg.fm_time == "dm_direction" else cfg.objective
    run = SimpleNamespace(cfg=cfg, env=env, ddp=ddp, bundle=bundle, data=task, unet=unet, model=model, params=params,
                          lora_cfg=lora_cfg, opt=opt, ema=ema, ckpt_path=ckpt_path, objective=objective,
                          G=cfg.batch_size * cfg.grad_accum * env.world, start=state["step"] if state else 0,
                          data_pos=state["data_position"] if state else 0,
                          last_good=ckpt_path if state else "none (no checkpoint written yet)",
                          guard=DivergenceGuard(params, state.get("guard") if state else None))
    return run, state


def train_step(run, step, batches, empty):
    """Optimizer step step + 1: grad_accum micro-steps, the gradients all-reduced once. Returns loss, grad norm."""
    cfg, env, W, bundle = run.cfg, run.env, run.env.world, run.bundle
    abar, shape = bundle.alphas_cumprod.to(env.device), data.latent_shape(bundle, cfg.resolution)
    noise, t, drop = data.draw(cfg, run.objective, step, run.G, shape, len(abar), env.device)
    loss_sum = torch.zeros((), device=env.device)
    for m in range(cfg.grad_accum):
        b = next(batches)
        i = slice((m * W + env.rank) * cfg.batch_size, (m * W + env.rank + 1) * cfg.batch_size)
        context = torch.where(drop[i, None, None], empty, b["context"])
        net = diff2flow.ConcatCond(run.model, b["cond"]) if "cond" in b else run.model
        if run.ddp:  # all-reduce the gradients only once, after the last micro-step
            run.model.require_backward_grad_sync = m == cfg.grad_accum - 1
        with env.amp():
            loss = LOSSES[run.objective](net, b["x1"], context, abar, bundle.prediction,
                                         noise=b.get("noise", noise[i]), t=t[i])
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
    if run.ddp:
        dist.all_reduce(loss_sum)
        loss_sum /= W
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or float("inf")).item()
    loss_val = loss_sum.item()
    if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
        what = f"loss is {loss_val}" if not math.isfinite(loss_val) else f"gradient norm is {grad_norm}"
        fail(f"{what} at step {step + 1}; stopped without updating the weights; last good checkpoint: {run.last_good}")
    run.opt.step()
    if why := run.guard.check():
        fail(f"{why} after step {step + 1}; stopped; last good checkpoint: {run.last_good}")
    run.opt.zero_grad(set_to_none=True)
    if run.ema:
        run.ema.update()
    return loss_val, grad_norm


def stop_if_asked(run, done, flag, bar, now=False):
    """If any process was signalled (all must agree: they save together): ckpt.pt, then exit 128 + signal."""
    stop = torch.tensor(float(bool(flag)), device=run.env.device)
    if run.ddp and not now:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item() > 0:
        bar.close()
        save_checkpoint(run, done)
        name = flag[0] if flag else "SIGTERM"  # another process was signalled
        fail(f"stopped by {name} after step {done}; wrote {run.ckpt_path}; continue with --resume",
             128 + signal.Signals[name].value)


def loop(run, state):
    """The steps from run.start to --steps: log, checkpoints, sample grids, then final.safetensors."""
    cfg, env, sample = run.cfg, run.env, run.data.grid
    empty = run.bundle.encode_prompt([""]).float()  # (1, 77, width): dropped captions
    if cfg.cache:  # every context is computed now: the text encoder and VAE encoder can leave the GPU
        run.bundle.text_encoder.to("cpu"), run.bundle.vae.encoder.to("cpu")
    batches, grid = run.data.batches(run.data_pos), lambda n: os.path.join(cfg.out, "samples", f"step_{n:06d}.png")
    log = RunLog(cfg.out, run.start, run.G, cfg.tensorboard, env.master)  # log.jsonl, loss.png, TB (no-op off rank 0)
    if env.master and state is None and cfg.sample_every:
        sample(run.unet, run.objective, grid(0))
    if state is not None:
        set_rng_state(state["rng"][env.rank] if len(state["rng"]) == env.world else state["rng"][0])
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not env.master,
               dynamic_ncols=True, unit="step")
    with stop_signals() as flag:
        for step in bar:  # `step` optimizer steps are done; this is step + 1
            t0, lr = time.time(), lr_at(cfg.lr, step, cfg.warmup, cfg.steps, cfg.lr_decay)
            for group in run.opt.param_groups:
                group["lr"] = lr
            try:
                loss, grad_norm = train_step(run, step, batches, empty)
            except (KeyboardInterrupt, RuntimeError):  # e.g. a DataLoader worker stopped by the same Ctrl-C
                if not flag:
                    raise
                stop_if_asked(run, step, flag, bar, now=True)
            done, sec = step + 1, time.time() - t0
            log.step(bar, done, loss, lr, grad_norm, sec, run.data.counts)
            if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                save_checkpoint(run, done)
            if env.master and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                with run.ema.applied() if run.ema else nullcontext():
                    sample(run.unet, run.objective, grid(done))
                log.grid(grid(done), done)
            if done < cfg.steps:
                stop_if_asked(run, done, flag, bar)
    log.close()  # (the bar closed itself at the end of its range)
    return save_final(run) if env.master else os.path.join(cfg.out, "final.safetensors")


def main(argv=None):
    one_line_warnings()
    cfg = parse_args(argv)
    lora_cfg, makes = check_config(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun (nanoGPT style)
    if ddp:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    amp = functools.partial(torch.autocast, torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    env = data.Env(cfg.device, amp, dist.get_rank() if ddp else 0, dist.get_world_size() if ddp else 1)
    fresh = None if cfg.resume else os.path.join(cfg.out, "ckpt.pt")  # must not exist once the lock is held
    lock = FolderLock(cfg.out, fresh) if env.master else None  # one run per --out: held from here if it exists
    try:
        run, state = build(cfg, lora_cfg, makes, env, ddp, lock)
        b, n, how = run.bundle, sum(p.numel() for p in run.params) / 1e6, f"LoRA {cfg.lora}" if lora_cfg else "full"
        if env.master:
            print(f"{run.objective} on {b.name} ({b.version}, {b.prediction}-prediction), {how} fine-tuning: "
                  f"{n:.2f}M trainable, {run.data.n} {run.data.what}, global batch {run.G}, {env.world} process(es)")
        return loop(run, state)
    except (CheckpointError, DiskFull, data.DataError) as e:  # DataError: data met while training
        fail(str(e))
    finally:
        if lock:
            lock.release()
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
