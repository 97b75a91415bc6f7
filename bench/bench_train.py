"""Training-step benchmarks (a script, not a test), on one UNet and one batch:

  - time of a Diff2Flow training step vs a plain diffusion step (the paper: no extra cost; target <= 1.02),
  - peak memory of LoRA vs full fine-tuning (each in a fresh process: on CPU the peak resident memory of the
    training steps (Linux VmHWM, reset after loading), on CUDA the peak allocated memory),
  - with --checkpointing: gradient checkpointing on vs off, full and LoRA (peak memory and step time). On the
    CPU, train.py --grad-checkpointing also returns freed memory to the OS (train.return_freed_memory);
    the rows show that against plain training, and checkpointing alone (both sides returning memory).

A step is forward + backward + AdamW on random latents and text context: the VAE and text encoder are the
same for every objective (and cached with train.py --cache), so they are left out.

    flock /tmp/heavy.lock python bench/bench_train.py                                        # tiny UNet
    flock /tmp/heavy.lock python bench/bench_train.py --unet sd15 --channels 128 --size 32    # SD1.5 layout, narrower
    flock /tmp/heavy.lock python bench/bench_train.py --unet sd15 --channels 64 --size 64 --batch 1 --checkpointing

train_rows(args) returns bench.py rows (what, ours, reference, unit): ours/ref is the ratio asked for.
"""
import argparse
import dataclasses
import multiprocessing as mp
import time
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, unet, ...

import torch

import diff2flow
import lora
import sd
import train
from bench import best_of, print_table, random_init
from unet import PRESETS, UNet


def build(args, lora_preset, ckpt=False):
    """A randomly initialised UNet (optionally narrowed), with a LoRA preset or fully trainable, + AdamW;
    ckpt: gradient checkpointing (activations recomputed in backward)."""
    cfg = dataclasses.replace(PRESETS[args.unet], **({"model_channels": args.channels} if args.channels else {}))
    with torch.device("meta"):
        unet = UNet(cfg)
    unet = random_init(unet.to_empty(device=args.device)).train()
    unet.grad_checkpointing = ckpt
    if lora_preset:
        lora.apply_lora(unet, lora.PRESETS[lora_preset])
    else:
        unet.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g).to(args.device)
    context = torch.randn(args.batch, 77, cfg.context_dim, generator=g).to(args.device)
    return unet, opt, x1, context


def step_fn(loss_fn, unet, opt, x1, context, args):
    """One training step; --bf16: under bf16 autocast (fp32 weights), --compile: through torch.compile."""
    device = args.device
    abar, g = sd.sd_alphas_cumprod().to(device), torch.Generator(device).manual_seed(0)
    model = torch.compile(unet) if args.compile else unet
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with amp:
            loss = loss_fn(model, x1, context, abar, "v", generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


def rss(field="VmRSS"):
    """Resident memory in bytes (Linux): VmRSS now, or VmHWM, its peak since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


def peak_memory(args, lora_preset, ckpt, unmap, queue):
    """In a fresh process: (memory with the model loaded, peak over two Diff2Flow training steps (bytes),
    time of the second step (s)); unmap: train.return_freed_memory() first (CPU)."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if unmap and not cuda:
        train.return_freed_memory()
    unet, opt, x1, context = build(args, lora_preset, ckpt)
    step = step_fn(diff2flow.diff2flow_loss, unet, opt, x1, context, args)
    base = torch.cuda.memory_allocated() if cuda else rss()
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()  # the peak of training, not of loading
    step()  # the first step also allocates AdamW's state
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    queue.put((base, torch.cuda.max_memory_allocated() if cuda else rss("VmHWM"), seconds))


def measure(args, lora_preset, ckpt=False, unmap=False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=peak_memory, args=(args, lora_preset, ckpt, unmap, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def train_rows(args):
    torch.set_num_threads(args.threads)
    unet, opt, x1, context = build(args, args.lora)
    shape = (f"{args.unet}{f' ch{args.channels}' if args.channels else ''} {args.batch}x4x{args.size}x{args.size}"
             f"{' bf16' if args.bf16 else ''}{' compiled' if args.compile else ''}")
    steps = [step_fn(loss, unet, opt, x1, context, args)
             for loss in (diff2flow.diff2flow_loss, diff2flow.diffusion_loss)]
    d2f, dm = best_of(steps, args.repeat, args.warmup)
    step_row = (f"train step {shape} LoRA {args.lora}: Diff2Flow vs diffusion", d2f * 1e3, dm * 1e3, "ms")
    print_table([step_row])  # now, not only at the end: a run under a time limit (gpu_check.sh) keeps it
    print(flush=True)
    del unet, opt
    (lora_base, lora_peak, _), (full_base, full_peak, _) = measure(args, args.lora), measure(args, None)
    MiB = 2**20
    rows = [step_row,
            (f"train peak memory {shape}: LoRA {args.lora} vs full", lora_peak / MiB, full_peak / MiB, "MiB"),
            ("  of which above the loaded weights", (lora_peak - lora_base) / MiB, (full_peak - full_base) / MiB,
             "MiB")]
    return rows + (checkpointing_rows(args, shape) if args.checkpointing else [])


def checkpointing_rows(args, shape):
    """Gradient checkpointing on vs off, full and LoRA: peak memory and the time of one step (a single
    timing, the second step of a fresh process; target: peak at least 40% lower at 64x64 latents). On the
    CPU, "--grad-checkpointing" is what train.py does (checkpointing + return_freed_memory); "ckpt alone"
    compares with training that returns freed memory too."""
    rows, MiB, cpu = [], 2**20, not args.device.startswith("cuda")
    for name, preset in [("full", None), (f"LoRA {args.lora}", args.lora)]:
        (_, on_peak, on_s), (_, off_peak, off_s) = measure(args, preset, True, cpu), measure(args, preset, False)
        rows += [(f"train peak memory {shape} {name}: --grad-checkpointing vs none", on_peak / MiB, off_peak / MiB,
                  "MiB"),
                 (f"train step {shape} {name}: --grad-checkpointing vs none (1 step)", on_s * 1e3, off_s * 1e3, "ms")]
        if cpu:
            _, unmapped_peak, unmapped_s = measure(args, preset, False, True)
            rows += [(f"train peak memory {shape} {name}: ckpt alone (both return freed memory)", on_peak / MiB,
                      unmapped_peak / MiB, "MiB"),
                     (f"train step {shape} {name}: none, returning freed memory vs not (1 step)", unmapped_s * 1e3,
                      off_s * 1e3, "ms")]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default="tiny", choices=list(PRESETS), help="UNet preset (default tiny)")
    p.add_argument("--channels", type=int, help="override model_channels (e.g. 128 for a narrower sd15)")
    p.add_argument("--size", type=int, default=16, help="latent height = width (default 16, i.e. 128 px for SD)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--lora", default="small", choices=list(lora.PRESETS), help="LoRA preset (default small)")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per objective; the best is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine OpenMP spin-waits distort 2-thread timings)")
    p.add_argument("--checkpointing", action="store_true",
                   help="add rows: gradient checkpointing on vs off (peak memory, step time), full and LoRA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around fp32 weights (train.py's CUDA default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the warm-up steps compile)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"best of {args.repeat} after {args.warmup} warm-up; memory: fresh process each\n")
    print_table(train_rows(args))


if __name__ == "__main__":
    main()
