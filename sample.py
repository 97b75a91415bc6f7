"""Sample images from Stable Diffusion 1.x/2.x as a FLOW: Diff2Flow (arXiv 2506.02221) needs no training
to read a diffusion UNet as an FM velocity model, so any SD checkpoint samples with an ODE solver as is.

    python sample.py --prompt "a red circle" --steps 4                        # the tiny bundled demo
    python sample.py --ckpt v2-1_768-ema-pruned.safetensors --prompt "a photo of a cat" --steps 25
    python sample.py --ckpt runwayml/stable-diffusion-v1-5 --prompts prompts.txt --n 4 --batch 4 --sampler heun

--ckpt takes anything sd.load takes: an original .safetensors/.ckpt, a diffusers folder, a repo id already
in the local Hugging Face cache, our own checkpoints (diffusion | diff2flow | fm | fm_dm_direction, read
from their metadata) or a LoRA file that names its base. PNGs carry their settings as text chunks.
"""
import argparse
import os
import re

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cpu_fast
import diff2flow
import sd
from common import (DefaultsOnce, atomic_path, exclusive_names, fail, one_line_warnings, remove_stale_temps,
                    usage_error)
from data import parse_resolution

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
DEMO = os.path.join(DEMO_DIR, "reflow_tiny.safetensors")  # the demo's reflowed model: 4 steps, no CFG (reflow.py)
if not os.path.exists(DEMO):  # not built: the Diff2Flow model that it is a LoRA of
    DEMO = os.path.join(DEMO_DIR, "d2f_tiny.safetensors")
SAMPLERS = {"euler": diff2flow.sample_euler, "heun": diff2flow.sample_heun, "ddim": diff2flow.sample_ddim}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsOnce)
parser.add_argument("--ckpt", help="checkpoint, diffusers folder, cached repo id or LoRA file (default: the tiny demo)")
parser.add_argument("--prompt", action="append", default=[], help="text prompt; repeat for several")
parser.add_argument("--prompts", metavar="FILE", help="file with one prompt per line (blank lines skipped)")
parser.add_argument("--negative", default="", help="negative prompt: the unconditional side of CFG")
parser.add_argument("--lora", metavar="FILE", help="a LoRA .safetensors merged into --ckpt: ours (train.py) or a "
                    "kohya/A1111/ComfyUI SD1/SD2 LoRA (lora_unet_*/lora_te_* keys)")
parser.add_argument("--steps", type=int, help="solver steps (default: checkpoint metadata 'steps', else 25)")
parser.add_argument("--cfg", type=float, help="guidance scale; 1 = no CFG (default: metadata 'cfg', else 7.5)")
parser.add_argument("--sampler", choices=SAMPLERS, default="euler",
                    help="euler | heun (FM ODE, heun = 2 UNet calls per step) | ddim (diffusion variables)")
parser.add_argument("--shift", type=float, default=1.0, help="SD3 time shift; > 1 spends more steps near noise")
parser.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i")
parser.add_argument("--n", type=int, default=1, help="images per prompt")
parser.add_argument("--batch", type=int, default=4, help="images per UNet batch (x2 with CFG)")
parser.add_argument("--height", type=int, help="pixels (default: metadata 'resolution', else 512; 768 for SD2 v)")
parser.add_argument("--width", type=int, help="pixels (default: the native size, as for --height)")
parser.add_argument("--zero-terminal-snr", action="store_true", help="sample with the schedule rescaled to zero "
                    "terminal SNR (Lin et al.); not needed for a model trained so: its file records it")
parser.add_argument("--prediction", choices=["eps", "v"], help="override eps/v for original files that do not say")
parser.add_argument("--out", default="out", help="output folder; numbering continues after existing files")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:1, ... (default: cuda if available)")
parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first batch compiles)")
parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: 1 for the tiny models, whose small "
                    "kernels only pay threading overhead (the demo: 4 s vs 12 s on a busy 2-core machine); "
                    "PyTorch's default for SD)")


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if line.strip()]
        except OSError as e:
            fail(f"cannot read --prompts {args.prompts}: {e.strerror}")
        except UnicodeDecodeError as e:
            fail(f"--prompts {args.prompts}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert "
                 "it, e.g. iconv -f latin1 -t utf-8")
        if not from_file:
            fail(f"--prompts {args.prompts} has no prompts (one per line, blank lines are skipped)")
        prompts += from_file
    if not prompts:
        usage_error("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE; --prompt '' samples unconditionally")
    return prompts


def load_model(args, dtype):
    ckpt = args.ckpt or DEMO
    if not args.ckpt and not os.path.exists(DEMO):
        fail(f"no --ckpt given and the demo {os.path.relpath(DEMO)} is missing; pass --ckpt with an SD 1.x/2.x "
             "checkpoint (.safetensors/.ckpt), a diffusers folder or a cached repo id")
    if not args.ckpt:
        print(f"using the tiny demo model {os.path.relpath(DEMO)}; for real images pass --ckpt with SD 1.x/2.x "
              "weights (e.g. v1-5-pruned-emaonly.safetensors or a diffusers folder)")
    try:
        bundle = sd.load(ckpt, device=args.device, dtype=dtype, prediction=args.prediction)
        if args.lora:  # merged (W += up @ down): the LoRA then costs nothing per step
            sd.apply_lora(bundle, args.lora)  # (and a LoRA trained with zero terminal SNR brings it)
        if args.zero_terminal_snr:
            bundle.alphas_cumprod = diff2flow.rescale_zero_terminal_snr(bundle.alphas_cumprod)
    except (sd.LoadError, OSError, KeyError, ValueError) as e:
        fail(str(e).strip("'\""))
    return bundle


OUR_NAME = re.compile(r"(\d{4,})-(-?\d+)\.png$")  # NNNN-SEED.png: what main() writes


def next_index(out):
    """Continue the numbering of earlier runs' NNNN-SEED.png files; other files (2023-holiday.png) are not ours."""
    found = [int(m[1]) for f in os.listdir(out) if (m := OUR_NAME.fullmatch(f))]
    return max(found, default=-1) + 1


def reserve(out, seed):
    """The next free NNNN-SEED.png, created empty here (O_EXCL): samplers started together never share a name."""
    return exclusive_names(out, lambda i: [f"{i:04d}-{seed}.png"], next_index(out))[0]


def png_info(fields, prompt, negative):
    """Our fields as PNG text chunks + A1111's `parameters` string (what its PNG Info tab parses)."""
    info = PngInfo()
    for k, v in fields.items():
        info.add_text(k, str(v))
    a1111 = (f"Steps: {fields['steps']}, Sampler: {fields['sampler']}, CFG scale: {fields['cfg']}, "
             f"Seed: {fields['seed']}, Size: {fields['size']}, Model: {fields['model']}, Shift: {fields['shift']}")
    info.add_text("parameters", prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + a1111)
    return info


def check_args(args):
    for name in ("n", "batch", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            usage_error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.cfg is not None and args.cfg < 0:
        usage_error(f"--cfg must be >= 0 (1 = no guidance), got {args.cfg}")
    if args.shift <= 0:
        usage_error(f"--shift must be > 0, got {args.shift}")
    if args.threads < 0:
        usage_error(f"--threads must be >= 0 (0 = automatic), got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        usage_error(f"--device {args.device}: CUDA is not available here; use --device cpu")


def check_model(args, bundle):
    if args.sampler == "ddim" and bundle.objective not in ("diffusion", "diff2flow"):
        usage_error(f"--sampler ddim needs a diffusion-parameterised UNet; this one was trained with objective "
             f"'{bundle.objective}' (its output is a velocity): use --sampler euler or heun")
    ucfg = bundle.unet.cfg
    if ucfg.in_channels != ucfg.out_channels:
        fail(f"the UNet takes {ucfg.in_channels} input channels (a depth/inpainting model); sample.py is text-to-image")


def image_size(args, bundle, meta):
    """(H, W): the flags, else the checkpoint's native size; each a multiple of what the model needs."""
    native = parse_resolution(meta.get("resolution", 768 if bundle.version == "sd2" and bundle.prediction == "v"
                                       else 512))
    f, levels = bundle.vae.downsample, len(bundle.unet.cfg.channel_mult)
    need = f * 2 ** (levels - 1)  # the UNet halves the latent levels-1 times and its skips must line up
    for name, side in zip(("height", "width"), native):  # metadata "HxW" (train.py --resolution 384x512): its sides
        size = getattr(args, name) or side
        if size < 1 or size % need:
            usage_error(f"--{name} {size} must be a positive multiple of {need} for this model "
                 f"(VAE factor {f} x UNet downsampling {need // f})")
    return args.height or native[0], args.width or native[1]


def to_uint8(vae, z):
    """Scaled latents -> (B, H, W, 3) uint8 images; tiled decoding bounds the memory of large images."""
    z = z.to(next(vae.parameters()).dtype)
    images = vae.decode_tiled(z) if max(z.shape[-2:]) > 96 else vae.decode(z)  # (B, 3, H, W) in ~[-1, 1]
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def main(argv=None):
    one_line_warnings()
    args = parser.parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    bundle = load_model(args, dtype)
    if args.device == "cpu":  # after the LoRA merge, before any torch.compile
        cpu_fast.enable(bundle.unet)
    if args.threads or (args.device == "cpu" and sum(p.numel() for p in bundle.unet.parameters()) < 50e6):
        torch.set_num_threads(args.threads or 1)
    meta = bundle.meta
    check_model(args, bundle)
    H, W = image_size(args, bundle, meta)
    steps = args.steps or int(meta.get("steps", 25))
    cfg = args.cfg if args.cfg is not None else float(meta.get("cfg", 7.5))
    latent_shape = (1, bundle.unet.cfg.out_channels, H // bundle.vae.downsample, W // bundle.vae.downsample)

    if args.compile:
        print("compiling the UNet: the first batch is slow")
        bundle.unet = torch.compile(bundle.unet)
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    contexts = [bundle.encode_prompt([p]) for p in prompts]  # (1, 77, width) each, encoded once
    uncond = bundle.encode_prompt([args.negative]) if cfg != 1 else None  # cfg 1: no unconditional pass
    jobs = [(i, args.seed + k) for i in range(len(prompts)) for k in range(args.n)]  # (prompt index, seed)
    os.makedirs(args.out, exist_ok=True)
    remove_stale_temps(args.out)  # the temp files of killed writers (dead pids only)
    paths = []
    for b in range(0, len(jobs), args.batch):
        batch = jobs[b:b + args.batch]
        # each image's noise from its own CPU generator: a seed gives the same image in any batch, on any device
        noise = torch.cat([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
        context = torch.cat([contexts[i] for i, _ in batch])
        z = SAMPLERS[args.sampler](model, noise.to(args.device), steps, context, uncond, cfg, args.shift, progress=True)
        for (i, seed), img in zip(batch, to_uint8(bundle.vae, z)):
            fields = {"prompt": prompts[i], "negative_prompt": args.negative, "seed": seed, "steps": steps,
                      "sampler": args.sampler, "cfg": cfg, "shift": args.shift, "size": f"{W}x{H}",
                      "model": bundle.name + (f" + {os.path.basename(args.lora)}" if args.lora else ""),
                      "objective": bundle.objective, "prediction": bundle.prediction}
            paths.append(reserve(args.out, seed))
            with atomic_path(paths[-1]) as tmp:  # over our own empty placeholder
                Image.fromarray(img.numpy()).save(tmp, pnginfo=png_info(fields, prompts[i], args.negative))
            print(paths[-1])
    return paths


if __name__ == "__main__":
    main()
