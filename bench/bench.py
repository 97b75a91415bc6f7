"""Benchmarks of our modules against the diffusers/transformers implementations (a script, not a test), on the
CPU by default or on a GPU with --device cuda (then also --compile: torch.compile on both sides).

Each benchmark is a function registered with @benchmark("name"); it returns table rows
(what, ours, reference, unit) and `--only name[,name]` selects which run. diffusers is imported only
inside this script's functions: it is the yardstick, never a dependency of the core modules.

    flock /tmp/heavy.lock python bench/bench.py                 # everything at the defaults, 2 threads
    flock /tmp/heavy.lock python bench/bench.py --only unet --unets sd15 --sizes 64 --batches 2 --precisions fp32
    python bench/bench.py --device cuda --compile --channels-last --sizes 64 --batches 1,2,8   # on a GPU
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, unet, ...
import clip_text  # noqa: E402
import cpu_fast  # noqa: E402
import diff2flow  # noqa: E402
import sd  # noqa: E402
import unet  # noqa: E402
import vae  # noqa: E402
from sample import to_uint8  # noqa: E402

BENCHMARKS = {}  # name -> fn(args) -> list of (what, ours, reference, unit)


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


def sync(device: str = "cpu"):
    """Wait for queued GPU work: CUDA calls return before the kernels have run."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fns, repeat: int, warmup: int, device: str = "cpu") -> list[float]:
    """Best wall time in seconds of each fn over `repeat` calls after `warmup` untimed ones. The fns are
    interleaved so that load from other jobs on a shared machine hits them alike; the best (not the mean)
    is the least noisy estimate of the undisturbed time."""
    best = [float("inf")] * len(fns)
    for i in range(warmup + repeat):
        for j, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                best[j] = min(best[j], time.perf_counter() - start)
    return best


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fast seeded weights with O(1) activations (to_empty() leaves garbage that may hold NaNs/denormals,
    which would distort timings)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.normal_(generator=g)
        p /= p[0].numel() ** 0.5 if p.ndim > 1 else 10.0
    return model


UNET_CONFIGS = {  # diffusers UNet2DConditionModel configs of our PRESETS (as in diffusers' single-file loader)
    "sd15": dict(attention_head_dim=8, cross_attention_dim=768),
    "sd21": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
}


def random_model(cls, cfg):
    """One of our models, built on the meta device (no init cost), then seeded random weights on the CPU."""
    with torch.device("meta"):
        ours = cls(cfg)
    return random_init(ours.to_empty(device="cpu"))


def random_unet(name: str):
    """Our UNet at a preset, seeded random weights, on the CPU."""
    return random_model(unet.UNet, unet.PRESETS[name])


def fast(args, model):
    """Ours with cpu_fast's CPU inference fast paths (packed conv weights, oneDNN Linears) unless --plain: the
    paths only a CPU takes, so on CUDA this changes nothing. Never applied to the reference side."""
    return model if args.plain else cpu_fast.enable(model)


def unet_pair(name: str, ours=None):
    """Our UNet (random weights unless given) and diffusers' UNet2DConditionModel sharing the same weight
    tensors, the latter obtained through diffusers' own LDM checkpoint converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = random_unet(name) if ours is None else ours
    config = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  layers_per_block=2, **UNET_CONFIGS[name])
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, config), strict=True, assign=True)
    return ours.eval(), ref.eval()


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # bf16 = autocast (fp32 weights), on both sides


def autocast(args, precision):
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(args.device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def timed(args, fns, precision, repeat=None, warmup=None):
    """best_of under no_grad and the precision's autocast, on args.device."""
    with torch.no_grad(), autocast(args, precision):
        return best_of(fns, args.repeat if repeat is None else repeat, args.warmup if warmup is None else warmup,
                       args.device)


def prepare(args, *models):
    """The models on args.device, in channels_last with --channels-last, compiled with --compile (the timing
    warm-up compiles; dynamic=False: one static graph per input shape, as a sampler uses)."""
    out = []
    for m in models:
        m = m.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        out.append(torch.compile(m, dynamic=False) if args.compile else m)
    return out


def peak_memory(args, fn, precision):
    """Peak GPU memory (MiB) allocated by one call of fn beyond what was allocated before it."""
    with torch.no_grad(), autocast(args, precision):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def latents(args, batch, size):
    x = torch.randn(batch, 4, size, size, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def suffix(args):
    return "".join([" cl" if args.channels_last else "", " compiled" if args.compile else ""])


@benchmark("unet")
def bench_unet(args):
    """UNet forward over --unets x --sizes x --batches x --precisions (batch 2 = one guided step)."""
    rows, cuda = [], args.device.startswith("cuda")
    for name in args.unets:
        ours, ref = unet_pair(name)
        ours, ref = prepare(args, fast(args, ours), ref)  # channels_last: ours keeps it through its transformers
        width = ours.cfg.context_dim
        for size in args.sizes:
            for batch in args.batches:
                x, t = latents(args, batch, size), torch.full((batch,), 500.0, device=args.device)
                ctx = torch.randn(batch, 77, width, device=args.device)
                for precision in args.precisions:
                    fns = [lambda: ours(x, t, ctx), lambda: ref(x, t, encoder_hidden_states=ctx)]
                    ours_s, ref_s = timed(args, fns, precision)
                    what = f"unet {name} fwd {batch}x4x{size}x{size} {precision}{suffix(args)}"
                    rows.append((what, ours_s * 1e3, ref_s * 1e3, "ms"))
                    if cuda:
                        rows.append((what + ": peak memory", *(peak_memory(args, f, precision) for f in fns), "MiB"))
        del ours, ref
    return rows


@benchmark("flops")
def bench_flops(args):
    """Achieved FLOP/s of our UNet forward (batch --flops-batch, --flops-size latents, bf16 autocast, --compile
    and --channels-last as given) as a fraction of a bf16 matrix product's FLOP/s measured in the same run
    (the GPU target: >= 0.5). FLOPs are counted once on the meta device (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    b, s, n = args.flops_batch, args.flops_size, args.matmul_size
    rows = []
    for name in args.unets:
        width = unet.PRESETS[name].context_dim
        with torch.device("meta"), FlopCounterMode(display=False) as counter:  # shapes only, nothing computed
            unet.UNet(unet.PRESETS[name])(torch.empty(b, 4, s, s), torch.empty(b), torch.empty(b, 77, width))
        flops = counter.get_total_flops()
        (ours,) = prepare(args, fast(args, random_unet(name).eval()))
        x, t = latents(args, b, s), torch.full((b,), 500.0, device=args.device)
        ctx = torch.randn(b, 77, width, device=args.device)
        secs = timed(args, [lambda: ours(x, t, ctx)], "bf16")[0]
        rows.append((f"unet {name} fwd {b}x4x{s}x{s} bf16{suffix(args)} ({flops / 1e9:.1f} GFLOP): achieved "
                     f"vs bf16 matmul {n}x{n}x{n}", flops / secs / 1e12, matmul_tflops(args, n), "TFLOP/s"))
        del ours
    return rows


def matmul_tflops(args, n: int) -> float:
    """bf16 TFLOP/s of an n x n x n matrix product on args.device (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    (secs,) = best_of([lambda: a @ b], args.repeat, args.warmup, args.device)
    return 2 * n**3 / secs / 1e12


KERNEL_SHAPES = {  # SD1.5 UNet layers: (conv in_ch, out_ch, latent side, batch) and (linear tokens, in, out)
    "conv": [(320, 320, 32, 2), (640, 640, 16, 1), (1280, 1280, 8, 1), (2560, 1280, 4, 1), (1280, 1280, 16, 2),
             (960, 320, 32, 2)],
    "linear": [(8192, 320, 2560), (8192, 1280, 320), (2048, 640, 5120), (512, 1280, 10240)],
    "attention": [(4096, 8, 40), (1024, 8, 80)],  # (tokens, heads, head width): self-attention at 64x64 latents
}


@benchmark("kernels")
def bench_kernels(args):
    """cpu_fast's layers against the plain nn.Conv2d / nn.Linear on the same weights, one layer at a time (what
    each fast path buys; the reference column here is PyTorch, not diffusers). CPU only: the fast paths are CPU
    inference paths, so with --device cuda this benchmark has no rows."""
    nn = torch.nn
    rows = []
    if args.device != "cpu":
        return rows
    for (cin, cout, side, batch) in KERNEL_SHAPES["conv"]:
        conv = fast(args, random_init(nn.Conv2d(cin, cout, 3, padding=1)))
        x = torch.randn(batch, cin, side, side)
        for precision in args.precisions:
            s = timed(args, [lambda: conv(x), lambda: nn.Conv2d.forward(conv, x)], precision)
            rows.append((f"conv3x3 {batch}x{cin}x{side}x{side} -> {cout} {precision}", s[0] * 1e3, s[1] * 1e3, "ms"))
    for (n, cin, cout) in KERNEL_SHAPES["linear"]:
        linear, x = fast(args, random_init(nn.Linear(cin, cout))), torch.randn(n, cin)
        for precision in args.precisions:
            s = timed(args, [lambda: linear(x), lambda: nn.Linear.forward(linear, x)], precision)
            rows.append((f"linear {n}x{cin} -> {cout} {precision}", s[0] * 1e3, s[1] * 1e3, "ms"))
    for (n, heads, d) in KERNEL_SHAPES["attention"]:  # unet.CrossAttention copies q, k, v to contiguous heads
        q, k, v = (torch.randn(2, n, heads * d).unflatten(-1, (heads, d)).transpose(1, 2) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for precision in args.precisions:
            s = timed(args, [lambda: sdpa(q.contiguous(), k.contiguous(), v.contiguous()), lambda: sdpa(q, k, v)],
                      precision)
            rows.append((f"attention 2x{heads}x{n}x{d}, contiguous copies vs strided heads {precision}",
                         s[0] * 1e3, s[1] * 1e3, "ms"))
    return rows


def vae_pair(ours=None):
    """Our SD VAE and diffusers' AutoencoderKL on the same weights (diffusers' LDM converter)."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = random_model(vae.AutoencoderKL, vae.PRESETS["sd"]) if ours is None else ours
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                  layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                  scaling_factor=ours.scale_factor)
    ldm = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        ref = DAutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True, assign=True)
    return ours.eval(), ref.eval()


@benchmark("vae")
def bench_vae(args):
    """VAE decode of (1, 4, s, s) latents to (1, 3, 8s, 8s) images, s = --vae-size (default 64: 512 px)."""
    ours, ref = (m.to(args.device) for m in vae_pair())  # not compiled: decode is not forward
    s, sf = args.vae_size, ours.scale_factor
    z = torch.randn(1, 4, s, s, device=args.device) * sf
    rows = []
    for precision in args.precisions:
        ours_s, ref_s = timed(args, [lambda: ours.decode(z), lambda: ref.decode(z / sf).sample], precision,
                              repeat=max(1, args.repeat // 2), warmup=1)
        rows.append((f"vae decode 1x4x{s}x{s} -> {8 * s}px {precision}", ours_s * 1e3, ref_s * 1e3, "ms"))
    return rows


def text_pair(ours=None):
    """Our SD1 text encoder and transformers' CLIPTextModel on the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ours = random_model(clip_text.TextEncoder, clip_text.PRESETS["sd1"]) if ours is None else ours
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):
        ref = CLIPTextModel(cfg)
    state = ours.state_dict()
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers >= 5.6 dropped it
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    ref.load_state_dict(state, strict=True, assign=True)
    for m in ref.modules():  # position_ids is a non-persistent buffer (no state-dict key): still on meta
        if getattr(m, "position_ids", None) is not None and m.position_ids.is_meta:
            m.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)
    return ours.eval(), ref.eval()


@benchmark("text")
def bench_text(args):
    """SD1 text encoding of 2 prompts (prompt + negative, as one guided sampling needs), tokenizing included."""
    ours, ref = (m.to(args.device) for m in text_pair())
    tok, prompts = clip_text.Tokenizer(), ["a photo of an astronaut riding a horse on mars", ""]
    rows = []
    ids = lambda: tok(prompts).to(args.device)  # noqa: E731
    for precision in args.precisions:
        ours_s, ref_s = timed(args, [lambda: ours(ids()), lambda: ref(input_ids=ids())], precision)
        rows.append((f"text encode sd1 2 prompts {precision}", ours_s * 1e3, ref_s * 1e3, "ms"))
    return rows


def sd15_bundle_and_pipeline():
    """Our SD1.5 bundle (eps) and a diffusers StableDiffusionPipeline (DDIM) on the same random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    bundle = sd.create(unet="sd15", vae="sd", text="sd1", version="sd1", prediction="eps")
    for m in (bundle.unet, bundle.vae, bundle.text_encoder):
        random_init(m).eval()
    d_unet, d_vae, d_text = unet_pair("sd15", bundle.unet)[1], vae_pair(bundle.vae)[1], text_pair(bundle.text_encoder)[1]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=d_vae, text_encoder=d_text, tokenizer=None, unet=d_unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return bundle, pipe


@benchmark("sample")
def bench_sample(args):
    """Whole guided sampling at --sample-size latents: both prompts encoded, N batch-2 UNet calls, VAE decode.
    Ours: sd.encode_prompt + diff2flow.sample_euler on the FlowModel + sample.to_uint8. diffusers:
    StableDiffusionPipeline (DDIM) given the CLIPTextModel embeddings of our tokenizer's ids (its tokenizer
    needs vocab files from the Hub; tokenizing is < 1 ms either way)."""
    bundle, pipe = sd15_bundle_and_pipeline()
    for m in (bundle.vae, bundle.text_encoder):
        m.to(args.device)
    pipe.to(args.device)
    bundle.unet, pipe.unet = prepare(args, fast(args, bundle.unet), pipe.unet)  # --compile / --channels-last
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    prompt, s, precision = "a photo of an astronaut riding a horse on mars", args.sample_size, args.sample_precision

    def ours(steps):
        context, uncond = bundle.encode_prompt([prompt]), bundle.encode_prompt([""])
        noise = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(0)).to(args.device)
        return to_uint8(bundle.vae, diff2flow.sample_euler(model, noise, steps, context, uncond, 7.5))

    def ref(steps):
        ids = bundle.tokenizer([prompt, ""]).to(args.device)
        cond, uncond = pipe.text_encoder(input_ids=ids).last_hidden_state.chunk(2)
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                    guidance_scale=7.5, height=8 * s, width=8 * s, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    rows, warmup = [], args.warmup
    for steps in args.steps:
        ours_s, ref_s = timed(args, [lambda: ours(steps), lambda: ref(steps)], precision,
                              repeat=args.sample_repeat, warmup=warmup)
        warmup = 0  # the first step count warmed both up
        rows.append((f"sample sd15 {steps} steps cfg 1x4x{s}x{s} -> {8 * s}px {precision}{suffix(args)}",
                     ours_s * 1e3, ref_s * 1e3, "ms"))
    return rows


# Child processes for the "load" benchmark: peak RSS is per process, so writing the file and loading it
# must happen in fresh processes of their own.
_WRITE = """
import sys, torch, sd
from bench import random_init
b = sd.create(unet="sd15", vae="sd", text="sd1", version="sd1", prediction="eps")
for m in (b.unet, b.vae, b.text_encoder):
    random_init(m)
sd.save(b, sys.argv[1], dtype=getattr(torch, sys.argv[2]))
"""
# Linux VmHWM, not ru_maxrss: exec folds the forking parent's RSS into ru_maxrss, which made every row read
# bench.py's own ~7 GiB once models had been built in it.
_LOAD = """
import sys, torch, sd
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # KiB
base = hwm()
sd.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print(base, hwm())
"""


@benchmark("load")
def bench_load(args):
    """Peak RSS of sd.load on a full-size SD1.5 single file, against the file's size (target <= 1.3x)."""
    rows, here = [], os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}  # sd, and bench itself
    for file_dtype, load_dtype in [("float16", "float16"), ("float32", "float32"), ("float32", "bfloat16")]:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sd15.safetensors")
            subprocess.run([sys.executable, "-c", _WRITE, path, file_dtype], check=True, env=env)
            out = subprocess.run([sys.executable, "-c", _LOAD, path, load_dtype], check=True, env=env,
                                 capture_output=True, text=True).stdout.split()
            size = os.path.getsize(path) / 2**20
        base, peak = int(out[0]) / 1024, int(out[1]) / 1024
        rows.append((f"load sd15 {file_dtype} file as {load_dtype}: peak RSS (python+torch {base:.0f} MiB) vs file",
                     peak, size, "MiB"))
    return rows


# Training-step rows (Diff2Flow vs diffusion step time, LoRA vs full memory, gradient checkpointing) are in
# bench_train.py.


def print_table(rows):
    head = ("benchmark", "ours", "reference", "unit", "ours/ref")
    # 4 significant digits, never an exponent: a ratio of 0.0445 printed as 0.045 would be 1% off
    sig = lambda v: np.format_float_positional(v, 4, fractional=False, trim="-")  # noqa: E731
    num = lambda v: f"{v:.1f}" if abs(v) >= 10 else sig(v)  # noqa: E731
    body = [(what, num(a), num(b), unit, sig(a / b)) for what, a, b, unit in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *body]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated benchmarks to run, from: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    strs = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--unets", type=strs, default=["sd15", "sd21"], help="UNet configs (default sd15,sd21)")
    parser.add_argument("--sizes", type=ints, default=[32], help="latent sizes for unet (default 32; 64 is ~4x slower)")
    parser.add_argument("--batches", type=ints, default=[1, 2], help="batch sizes for unet (default 1,2; 2 = guidance)")
    parser.add_argument("--precisions", type=strs, default=["fp32", "bf16"],
                        help="fp32 and/or bf16 (autocast) for unet/vae/text (default fp32,bf16)")
    parser.add_argument("--vae-size", type=int, default=64, help="latent size for vae decode (default 64: 512 px)")
    parser.add_argument("--steps", type=ints, default=[4, 25], help="sampling steps for sample (default 4,25)")
    parser.add_argument("--sample-size", type=int, default=32,
                        help="latent size for sample (default 32: 256 px, to keep 25 steps short on a CPU)")
    parser.add_argument("--sample-repeat", type=int, default=2, help="timed runs per sample row (default 2)")
    parser.add_argument("--sample-precision", default="fp32", choices=list(PRECISIONS),
                        help="precision of the sample rows (default fp32; bf16 is the GPU's)")
    parser.add_argument("--flops-batch", type=int, default=8, help="batch of the flops benchmark (default 8)")
    parser.add_argument("--flops-size", type=int, default=64, help="latent size of the flops benchmark (default 64)")
    parser.add_argument("--matmul-size", type=int,
                        help="n of the n x n x n bf16 matmul that flops compares with (default 8192 on cuda, 2048 on cpu)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNets, both sides (unet, flops and sample; the warm-up compiles)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the UNets and their inputs in torch.channels_last memory format (both sides)")
    parser.add_argument("--plain", action="store_true",
                        help="run ours without cpu_fast.enable's CPU inference fast paths (packed conv weights, "
                             "oneDNN Linear) to see what they buy")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls; the best is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    if set(args.precisions) - set(PRECISIONS) or set(args.unets) - set(UNET_CONFIGS):
        parser.error(f"--precisions takes {list(PRECISIONS)}, --unets takes {list(UNET_CONFIGS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device takes cpu or cuda[:N], got {args.device!r}")
    cuda = args.device.startswith("cuda")
    args.matmul_size = args.matmul_size or (8192 if cuda else 2048)
    torch._dynamo.config.cache_size_limit = 64  # --compile: one graph per shape x precision, all kept

    import diffusers  # the oracles: test-only packages, imported once the arguments are good
    import transformers
    fast_on = cpu_fast.available() and not args.plain and not cuda
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}")
    device = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    print(f"device {device}, threads {torch.get_num_threads()}, best of {args.repeat} after {args.warmup} warm-up, "
          f"CPU fast paths (cpu_fast.enable) {'on' if fast_on else 'off'}{', compiled' if args.compile else ''}"
          f"{', channels_last' if args.channels_last else ''}\n")
    rows = [row for name in names for row in BENCHMARKS[name](args)]
    print_table(rows)


if __name__ == "__main__":
    main()
